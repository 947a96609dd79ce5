"""The DeepSeek-V4 backbone, loaded through transformers and never forked.

A backbone is named either by a bundled model (``tiny``, ``reference``; see ``data/``) or by a checkpoint
directory that transformers can load as ``DeepseekV4ForCausalLM`` (official DeepSeek tensor names and
FP8/FP4 weights are converted by transformers itself). Anything that is not a DeepSeek-V4 model is refused
with a :class:`BackboneError`.

Layer vocabulary (DeepSeek-V4 paper, section 2.3): ``sliding_attention`` layers keep only the sliding
window; ``compressed_sparse_attention`` (CSA) layers compress every ``m = 4`` tokens into one entry and
carry the Lightning Indexer; ``heavily_compressed_attention`` (HCA) layers compress every ``m' = 128``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import types
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import FmIndexError

CSA = "compressed_sparse_attention"
HCA = "heavily_compressed_attention"
SLIDING = "sliding_attention"

# FlashMemory's memory-indexer layers, as the authors' release numbers them: indices into the list of CSA layers
# (21 on DeepSeek-V4-Flash, where they are model layers 22, 26, 42).
FLASH_MEMORY_CSA_INDICES = (10, 12, 20)
FLASH_CSA_LAYERS = 21

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
# Bundled models by name; see default_model_name() for which one commands use without --model.
BUNDLED_MODELS = {"reference": DATA_DIR / "reference", "tiny": DATA_DIR / "tiny"}


class BackboneError(FmIndexError):
    """A backbone that cannot be used: missing, not DeepSeek-V4, or a layer choice that does not fit it."""


def default_model_name() -> str:
    """The bundled model every command uses when ``--model`` is not given.

    A bundled model is eligible when its folder holds a checkpoint and its ``fm_index.json`` says
    ``"default": true`` (the reference model sets it once it meets its retrieval targets); ``tiny`` otherwise.
    """
    for name, path in BUNDLED_MODELS.items():
        if not ((path / "config.json").is_file() and any(path.glob("*.safetensors"))):
            continue
        try:
            meta = json.loads((path / "fm_index.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if meta.get("default"):
            return name
    return "tiny"


def resolve_model_path(name_or_path: str | Path) -> Path:
    """Map a bundled name (``tiny``) or a directory to the directory holding ``config.json``."""
    key = str(name_or_path)
    if key in BUNDLED_MODELS:
        path = BUNDLED_MODELS[key]
        if not (path / "config.json").is_file():
            raise BackboneError(f"bundled model '{key}' is not installed at {path}")
        return path
    path = Path(key).expanduser()
    if not path.is_dir():
        known = ", ".join(BUNDLED_MODELS)
        raise BackboneError(f"model '{key}' is neither a bundled model ({known}) nor a directory")
    if not (path / "config.json").is_file():
        raise BackboneError(f"model directory {path} has no config.json")
    return path


def load_config(name_or_path: str | Path):
    """Load and check the backbone's ``DeepseekV4Config`` without loading weights."""
    from transformers import AutoConfig

    path = resolve_model_path(name_or_path)
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BackboneError(f"cannot read {path / 'config.json'}: {exc}") from None
    model_type = raw.get("model_type")
    if model_type != "deepseek_v4":
        raise BackboneError(f"{path} is a '{model_type}' model, not DeepSeek-V4 (model_type 'deepseek_v4')")
    config = AutoConfig.from_pretrained(path)
    if not csa_layers(config):
        raise BackboneError(f"{path} has no compressed sparse attention (CSA) layer: nothing to index")
    return config


def load_backbone(
    name_or_path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
):
    """Load ``(model, tokenizer)``: a ``DeepseekV4ForCausalLM`` in eval mode and its tokenizer (or None).

    ``dtype`` defaults to float32 on CPU (exact, and bf16 matmuls are slow there) and to the checkpoint's own
    dtype on an accelerator.
    """
    from transformers import AutoTokenizer, DeepseekV4ForCausalLM

    path = resolve_model_path(name_or_path)
    config = load_config(path)
    device = parse_device(device)
    if dtype is not None:
        dtype = parse_dtype(dtype)
    else:
        dtype = torch.float32 if device.type == "cpu" else "auto"
    kwargs = {"dtype": dtype}
    model = DeepseekV4ForCausalLM.from_pretrained(path, config=config, **kwargs)
    model.eval().to(device)
    fix_fp32_norms(model)
    tokenizer = None
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def _norm_casts_once(self, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm as later transformers releases compute it for DeepSeek-V4: fp32 statistics, fp32 weight, one cast.
    Bound to a ``DeepseekV4RMSNorm`` instance as its ``forward`` (a bound method: deepcopy rebinds it)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return (self.weight * h).to(x.dtype)


def fix_fp32_norms(model) -> int:
    """Work around transformers 5.17's ``DeepseekV4RMSNorm`` in reduced precision; returns how many norms were fixed.

    ``from_pretrained(dtype=bf16)`` keeps the norm weights in fp32 (``_keep_in_fp32_modules_strict``); 5.17's norm
    multiplies that fp32 weight by the bf16-cast activations, so its output is fp32 and the next bf16 projection
    (``q_a_proj``) raises "expected m1 and m2 to have the same dtype". Later releases multiply in fp32 and cast
    once at the end. Where a norm returns a dtype other than its input's, this replaces that instance's forward
    with the later releases' computation (no weight or class is changed; fp32 models are untouched).
    """
    fixed = 0
    for module in model.modules():
        if type(module).__name__ != "DeepseekV4RMSNorm" or module.weight.dtype != torch.float32:
            continue
        probe = torch.ones(1, module.weight.shape[-1], dtype=torch.bfloat16, device=module.weight.device)
        with torch.no_grad():
            if module(probe).dtype == probe.dtype:
                continue
        module.forward = types.MethodType(_norm_casts_once, module)
        fixed += 1
    return fixed


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """--dtype: float32, bfloat16 or float16 (fp32 / bf16 / fp16); anything else is refused with one line."""
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    if name not in DTYPES:
        raise BackboneError(f"--dtype {name} is not supported: use float32, bfloat16 or float16")
    return DTYPES[name]


def parse_device(text: str | torch.device | None) -> torch.device:
    """--device: ``cpu``, ``cuda`` or ``cuda:N`` (None: cuda where available, else cpu). A name torch does not
    know, or a CUDA device this machine does not have, is refused with one line."""
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise BackboneError(f"--device {text} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BackboneError(f"--device {text}: this machine has no CUDA device (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BackboneError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type != "cpu":
        raise BackboneError(f"--device {text}: fm-index runs on cpu or cuda devices")
    return device


def csa_layers(config) -> list[int]:
    """Indices of the compressed sparse attention layers (Flash: 2, 4, ..., 42)."""
    return [i for i, t in enumerate(config.layer_types) if t == CSA]


def csa_rate(config) -> int:
    """m: source tokens per CSA compressed entry (4 in every released V4)."""
    return int(config.compress_rates[CSA])


def default_memory_layers(config) -> list[int]:
    """FlashMemory's layers: CSA indices 10, 12 and 20 of V4-Flash's 21 CSA layers (model layers 22, 26, 42); on a
    backbone with another number of CSA layers, the CSA layers at the same positions in the CSA list (10/21,
    12/21 and 20/21 of the way through it, rounded, distinct)."""
    csa = csa_layers(config)
    chosen: list[int] = []
    for index in FLASH_MEMORY_CSA_INDICES:
        target = min(len(csa) - 1, round(index * len(csa) / FLASH_CSA_LAYERS))
        # few CSA layers: the nearest free position (later first), so that three distinct layers are kept
        free = [p for p in range(len(csa)) if csa[p] not in chosen]
        if free:
            chosen.append(csa[min(free, key=lambda p: (abs(p - target), p < target))])
    return sorted(chosen)


def csa_index(config, layer: int) -> int:
    """The position of model layer ``layer`` in the list of CSA layers (the authors' release numbering)."""
    return csa_layers(config).index(int(layer))


def validate_memory_layers(config, layers) -> list[int]:
    """Check that every requested memory-indexer layer is a CSA layer; return them sorted and unique."""
    layers = sorted({int(x) for x in layers})
    if not layers:
        raise BackboneError("no memory-indexer layer given")
    csa = csa_layers(config)
    for layer in layers:
        if layer < 0 or layer >= config.num_hidden_layers:
            raise BackboneError(f"layer {layer} does not exist (the model has {config.num_hidden_layers} layers)")
        if layer not in csa:
            raise BackboneError(
                f"layer {layer} is a {config.layer_types[layer]} layer, not CSA; CSA layers are {csa}"
            )
    return layers


LAYERS_HELP = ("model layer ids (22,26,42), or CSA indices as the authors' release numbers them (csa:10,12,20: "
               "the 11th, 13th and 21st CSA layer)")


def parse_layer_list(text: str | None) -> tuple[int, ...] | str | None:
    """``"22,26,42"`` -> (22, 26, 42); ``"csa:10,12,20"`` -> the same text (CSA indices, resolved against a model by
    :func:`parse_layers`); None or empty -> None (the caller's default)."""
    if text is None or str(text).strip() == "":
        return None
    text = str(text).strip()
    body = text[4:] if text.startswith("csa:") else text
    if not body.strip():
        raise BackboneError(f"--layers names no layer: {LAYERS_HELP}")
    try:
        values = tuple(int(part) for part in body.split(","))
    except ValueError:
        raise BackboneError(f"--layers must be comma-separated integers ({LAYERS_HELP}), got '{text}'") from None
    if not values:
        raise BackboneError(f"--layers names no layer: {LAYERS_HELP}")
    return text if text.startswith("csa:") else values


def resolve_csa_indices(config, indices) -> list[int]:
    """CSA indices (the release's numbering) -> model layer ids, checked."""
    csa = csa_layers(config)
    bad = [i for i in indices if not 0 <= int(i) < len(csa)]
    if bad:
        raise BackboneError(f"CSA index {bad[0]} does not exist: the model has {len(csa)} CSA layers (csa:0 to "
                            f"csa:{len(csa) - 1})")
    return [csa[int(i)] for i in indices]


def model_memory_layers(name_or_path: str | Path, config) -> list[int]:
    """The memory layers a backbone's folder names as its own choice (``fm_index.json``, key ``memory_layers``:
    model layer ids, chosen by measurement on that model), else :func:`default_memory_layers`."""
    try:
        meta = json.loads((resolve_model_path(name_or_path) / "fm_index.json").read_text())
    except (OSError, json.JSONDecodeError, FmIndexError):
        return default_memory_layers(config)
    layers = meta.get("memory_layers")
    if layers is None:
        return default_memory_layers(config)
    return validate_memory_layers(config, [int(x) for x in layers])


def parse_layers(text: str | None, config, model: str | Path | None = None) -> list[int]:
    """``--layers``: model layer ids (``"22,26,42"``), CSA indices (``"csa:10,12,20"``), or None for the default
    (``model``'s own choice, :func:`model_memory_layers`, where ``model`` is given; else
    :func:`default_memory_layers`); validated against the config. Returns model layer ids, sorted."""
    layers = parse_layer_list(text)
    if layers is None:
        return model_memory_layers(model, config) if model is not None else default_memory_layers(config)
    if isinstance(layers, str):
        layers = resolve_csa_indices(config, [int(x) for x in layers[4:].split(",") if x.strip()])
    return validate_memory_layers(config, layers)


def describe_layers(config, layers) -> str:
    """``"22, 26, 42 (CSA indices 10, 12, 20)"``: both numberings, for tables and messages."""
    return f"{', '.join(str(x) for x in layers)} (CSA indices {', '.join(str(csa_index(config, x)) for x in layers)})"


def config_hash(config) -> str:
    """A stable fingerprint of everything in the config that shapes the indexer keys and hidden states.

    Labels, trained indexers and exports carry it so that a mismatch with another backbone is caught.
    """
    fields = config.to_dict()
    for volatile in ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures",
                     "quantization_config", "use_cache", "output_router_logits", "_attn_implementation_autoset"):
        fields.pop(volatile, None)
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cache_kwarg() -> str:
    """The name transformers gives the cache argument of ``DeepseekV4Model.forward`` (5.17: past_key_values)."""
    from transformers import DeepseekV4Model

    params = inspect.signature(DeepseekV4Model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@dataclass(frozen=True)
class IndexerGeometry:
    """Shape facts of the native Lightning Indexer that the memory indexer copies (heads x head_dim, RoPE)."""

    hidden_size: int
    index_n_heads: int
    index_head_dim: int
    rope_dim: int
    compress_rate: int
    index_topk: int

    @classmethod
    def from_config(cls, config) -> "IndexerGeometry":
        return cls(
            hidden_size=config.hidden_size,
            index_n_heads=config.index_n_heads,
            index_head_dim=config.index_head_dim,
            rope_dim=int(config.qk_rope_head_dim),
            compress_rate=csa_rate(config),
            index_topk=config.index_topk,
        )
