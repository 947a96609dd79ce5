"""The DeepSeek-V4 backbone, loaded through transformers and never forked.

A backbone is named either by a bundled model (``tiny``, ``reference``; see ``data/``) or by a checkpoint
directory that transformers can load as ``DeepseekV4ForCausalLM``: its own format, or DeepSeek's release format
(``layers.{i}.attn.wq_a.weight`` ..., FP8 e4m3 weights with 128 x 128 UE8M0 block scales, FP4 routed experts),
which transformers renames and, where no FP8/FP4 kernel can run it, dequantizes while loading. Anything that is
not a DeepSeek-V4 model, or is quantized in another scheme, is refused with a :class:`BackboneError`; so are a
device map that leaves a layer nowhere or names a missing device, and a dtype whose weights cannot fit where they
are placed (estimated from the safetensors headers). All of that is checked before a weight is read.

Layer vocabulary (DeepSeek-V4 paper, section 2.3): ``sliding_attention`` layers keep only the sliding
window; ``compressed_sparse_attention`` (CSA) layers compress every ``m = 4`` tokens into one entry and
carry the Lightning Indexer; ``heavily_compressed_attention`` (HCA) layers compress every ``m' = 128``.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BackboneError, FmIndexError, first_line
from .placement import (
    _map_device,
    _placement_devices,
    check_fits,
    device_memory_bytes,
    execution_device,
    parse_device_map,
)

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
    check_quantization(raw, path)
    config = AutoConfig.from_pretrained(path)
    if not csa_layers(config):
        raise BackboneError(f"{path} has no compressed sparse attention (CSA) layer: nothing to index")
    return config


def load_backbone(
    name_or_path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    device_map: str | dict | None = None,
    dequantize: bool | None = None,
):
    """Load ``(model, tokenizer)``: a ``DeepseekV4ForCausalLM`` in eval mode and its tokenizer (or None).

    The weights go straight to where they run: ``device``, or ``device_map`` when given (None, "auto",
    "balanced", ``"DEVICE:FIRST-LAST,..."`` such as ``"0:0-21,1:22-42"``, or a dict of module name -> device; see
    :func:`parse_device_map`). ``dtype`` defaults to float32 when every weight lands on the CPU (exact, and bf16
    matmuls are slow there) and to the checkpoint's own dtype otherwise.

    A checkpoint in DeepSeek's FP8/FP4 release format stays quantized where transformers has kernels for it (a
    CUDA GPU with FP8 support and the kernels loadable, checked with a small probe matmul); elsewhere its
    weights are dequantized to ``dtype`` while loading, with a one-line notice on stderr saying why.
    ``dequantize=True`` always dequantizes; ``dequantize=False`` refuses to load where the quantized path cannot run.
    """
    from transformers import AutoTokenizer, DeepseekV4ForCausalLM

    path = resolve_model_path(name_or_path)
    config = load_config(path)
    placement = parse_device_map(device_map, config) if device_map is not None else \
        {"": _map_device(parse_device(device), "device")}
    on_cpu_only = _placement_devices(placement) == {"cpu"}
    dtype = parse_dtype(dtype) if dtype is not None else (torch.float32 if on_cpu_only else checkpoint_dtype(config))
    reason = None
    if getattr(config, "quantization_config", None) is not None:
        reason = _dequantize_reason(path, config, placement, dtype, dequantize)
    check_fits(path, config, placement, dtype, quantized=config_is_quantized(config) and reason is None)
    if reason is not None:
        _mark_dequantize(path, config, dtype, reason)
    kwargs = {"device_map": placement}
    if isinstance(placement, str) and torch.cuda.is_available():  # "auto" spreads over the GPUs, never CPU or disk
        kwargs["max_memory"] = {d: device_memory_bytes(d) for d in _placement_devices(placement)}
    try:
        model = DeepseekV4ForCausalLM.from_pretrained(path, config=config, dtype=dtype, **kwargs)
    except ValueError as exc:  # accelerate planned "auto" with a disk part: transformers asks for an offload_folder
        if isinstance(placement, str) and "offload" in str(exc):
            raise BackboneError(f"device map '{placement}': the weights do not fit on the GPUs (accelerate would "
                                "offload part of them to disk); give an explicit map with CPU offload, e.g. "
                                "'0:0-33,cpu:34-42'") from None
        raise
    model.eval()
    if getattr(config, "quantization_config", None) is not None:
        match_unquantized_dtypes(model, dtype)
    fix_fp32_norms(model)
    tokenizer = None
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


# ---- the native indexer path, read from the checkpoint alone ------------------------------------------------

# The tensors a memory-indexer tower copies from a CSA layer (MemoryIndexerLayer.copy_native), under the names of the
# checkpoint formats: DeepSeek's (release and transformers' saved checkpoints: "layers.{L}.attn.wq_a", with or
# without "model.") and transformers' module names ("model.layers.{L}.self_attn.q_a_proj").
NATIVE_INDEXER_TENSORS = {
    "q_a": ("attn.wq_a", "self_attn.q_a_proj"),
    "q_norm": ("attn.q_norm", "self_attn.q_a_norm"),
    "q_b": ("attn.indexer.wq_b", "self_attn.compressor.indexer.q_b_proj"),
    "weights_proj": ("attn.indexer.weights_proj", "self_attn.compressor.indexer.scorer.weights_proj"),
}


def read_native_indexer(name_or_path: str | Path, layers) -> dict[int, dict[str, torch.Tensor]]:
    """Per CSA layer in ``layers``, the native indexer path's weights (``NATIVE_INDEXER_TENSORS``) as fp32, read
    from the safetensors files alone: no model is built, so ``--init native`` works for a checkpoint of any size.
    FP8 weights are dequantized with their block scales (``<name>.scale``, DeepSeek's, or ``weight_scale_inv``,
    transformers'; value = e4m3 x scale per ``weight_block_size`` block)."""
    from safetensors import safe_open

    from .placement import read_safetensors_headers

    path = resolve_model_path(name_or_path)
    config = load_config(path)
    headers = read_safetensors_headers(path)
    quant = getattr(config, "quantization_config", None) or {}
    block = tuple(quant.get("weight_block_size", (128, 128))) if isinstance(quant, dict) else (128, 128)
    handles = {}

    def tensor(name: str) -> torch.Tensor:
        file = headers[name]["file"]
        if file not in handles:
            handles[file] = safe_open(str(path / file), framework="pt")
        return handles[file].get_tensor(name)

    out = {}
    for layer in layers:
        out[int(layer)] = {}
        for key, stems in NATIVE_INDEXER_TENSORS.items():
            names = [f"{prefix}layers.{layer}.{stem}.weight" for stem in stems for prefix in ("model.", "")]
            name = next((n for n in names if n in headers), None)
            if name is None:
                raise BackboneError(f"{path}: no native indexer weight for layer {layer} ({names[0]} or "
                                    f"{names[2]}): not a CSA layer of this checkpoint")
            value = tensor(name)
            scale_name = next((name.removesuffix(".weight") + s for s in (".scale", ".weight_scale_inv")
                               if name.removesuffix(".weight") + s in headers), None)
            if scale_name is not None:
                scale = tensor(scale_name).float()
                rows, cols = value.shape
                scale = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
                value = value.float() * scale
            out[int(layer)][key] = value.float()
    return out


# ---- DeepSeek's release format: the quantization scheme we can load ------------------------------------------

SUPPORTED_QUANTIZATION = ("DeepSeek's FP8 release format (quant_method fp8, fmt e4m3, scale_fmt ue8m0 or float, "
                          "expert_dtype fp8 or fp4)")


def check_quantization(raw: dict, path: Path) -> None:
    """Refuse, with one line, a ``quantization_config`` that is not DeepSeek's FP8 release format (what transformers'
    ``FineGrainedFP8Config`` loads: e4m3 weights, per-block fp32 or UE8M0 scales, FP8 or FP4-packed experts)."""
    quant = raw.get("quantization_config")
    if quant is None:
        return
    if not isinstance(quant, dict):
        raise BackboneError(f"{path / 'config.json'}: quantization_config is not an object")
    method = quant.get("quant_method")
    if method != "fp8":
        raise BackboneError(f"{path} is quantized with '{method}': fm-index loads DeepSeek-V4 unquantized or in "
                            f"{SUPPORTED_QUANTIZATION}")
    fields = {"fmt": quant.get("fmt", "e4m3"), "scale_fmt": quant.get("scale_fmt", "float"),
              "expert_dtype": quant.get("expert_dtype", raw.get("expert_dtype", "fp8")),
              "activation_scheme": quant.get("activation_scheme", "dynamic")}
    allowed = {"fmt": ("e4m3",), "scale_fmt": ("float", "ue8m0"), "expert_dtype": ("fp8", "fp4"),
               "activation_scheme": ("dynamic", "static")}
    problems = [f"{key} '{value}'" for key, value in fields.items() if value not in allowed[key]]
    block = quant.get("weight_block_size", [128, 128])
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        problems.append(f"weight_block_size {block}")
    if problems:
        raise BackboneError(f"{path} uses an FP8 variant fm-index cannot load ({', '.join(problems)}): expected "
                            f"{SUPPORTED_QUANTIZATION}")


def config_is_quantized(config) -> bool:
    """Whether the weights will stay FP8/FP4 in memory (a quantization config not switched to dequantize)."""
    quant = getattr(config, "quantization_config", None)
    return isinstance(quant, dict) and not quant.get("dequantize", False)


def checkpoint_dtype(config) -> torch.dtype:
    """The dtype a checkpoint's unquantized tensors are stored in (its config's ``dtype``; bfloat16 if unsaid)."""
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.bfloat16
    if isinstance(stored, str):
        stored = getattr(torch, stored, torch.bfloat16)
    return stored if isinstance(stored, torch.dtype) and stored.is_floating_point else torch.bfloat16


def _dequantize_reason(path: Path, config, placement, dtype: torch.dtype, dequantize: bool | None) -> str | None:
    """Why a quantized checkpoint is to be dequantized while loading (None: it stays FP8/FP4); refuses when
    ``dequantize=False`` and it cannot stay quantized. Changes nothing: see :func:`_mark_dequantize`."""
    reason = "asked for (dequantize=True)" if dequantize else quantized_kernel_gap(config, placement, dtype)
    if reason is not None and dequantize is False:
        raise BackboneError(f"{path} cannot run quantized here: {reason}")
    return reason


def _mark_dequantize(path: Path, config, dtype: torch.dtype, reason: str) -> None:
    """Mark the config so that transformers folds each weight's scales in as it reads it, straight into ``dtype``
    (``Fp8Dequantize``), and say so on stderr."""
    config.quantization_config = {**config.quantization_config, "dequantize": True}
    name = str(dtype).removeprefix("torch.")
    print(f"fm-index: {path}: FP8/FP4 weights dequantized to {name} while loading: {reason}", file=sys.stderr)


def quantized_kernel_gap(config, placement, dtype: torch.dtype) -> str | None:
    """Why the FP8/FP4 weights cannot stay quantized where ``placement`` puts them, or None when they can.

    Facts from transformers 5.24: FP8Linear / FP8Experts run through DeepGEMM or the Triton kernel
    ``kernels-community/finegrained-fp8``, both CUDA-only hub kernels (``integrations/finegrained_fp8.py``
    ``fp8_linear``); FP4 experts have no DeepGEMM kernel before Blackwell (``integrations/deepgemm.py``
    ``_assert_sm100_requirements``); DeepGEMM is switched off when a model spans several GPUs
    (``_disable_deepgemm_on_multi_device``). So on CUDA this runs the same ``fp8_linear`` on a small FP8 (and,
    for FP4 experts, FP4) weight and compares it with the dequantized matmul.
    """
    devices = _placement_devices(placement)
    if devices == {"cpu"}:
        return "there are no FP8/FP4 kernels on CPU"
    cuda = sorted(d for d in devices if d != "cpu")  # "cpu" beside a GPU is offload: those layers compute on a GPU
    for index in cuda:
        capability = torch.cuda.get_device_capability(index)
        if capability < (8, 9):
            return f"cuda:{index} (compute capability {capability[0]}.{capability[1]}) has no FP8 support (needs 8.9+)"
    if dtype != torch.bfloat16:
        return f"the FP8/FP4 kernels compute in bfloat16, and {str(dtype).removeprefix('torch.')} was asked for"
    expert_fp4 = config.quantization_config.get("expert_dtype") == "fp4"
    return _probe_fp8_matmul(cuda[0], expert_fp4, allow_deepgemm=len(cuda) == 1)


def _unquantized_dtype_rule(model, dtype: torch.dtype):
    """name -> the dtype transformers' unquantized path gives a floating-point tensor loaded at ``dtype``: the
    model's keep-in-fp32 plan where it names the tensor (``_get_dtype_plan``, matched as the loader matches it: a
    regex search, ``*`` as ``.*``), ``dtype`` elsewhere (DeepSeek-V4 creates every floating tensor in ``dtype``)."""
    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    patterns = [(re.compile(key.replace("*", ".*")), want) for key, want in plan.items()]
    return lambda name: next((want for pattern, want in patterns if pattern.search(name)), dtype)


def match_unquantized_dtypes(model, dtype: torch.dtype) -> int:
    """Give every plain floating-point tensor of a release-format load the dtype the unquantized load gives it;
    returns how many tensors were cast.

    transformers 5.17.0 loads a pre-quantized checkpoint's renamed tensors in their stored dtype
    (``core_model_loading.py`` line 1697, ``convert_and_load_state_dict_in_model``: ``_dtype = None`` when
    ``hf_quantizer.pre_quantized`` and ``original_key != renamed_key``, before the keep-in-fp32 plan is looked at),
    and every tensor of DeepSeek's release is renamed: in a float32 load its BF16 embeddings, head, norms, router
    and compressor projections stayed bfloat16 next to float32 dequantized weights (the first projection then
    raises "expected m1 and m2 to have the same dtype"); in a bfloat16 load its norms stayed bfloat16 where the plan
    keeps them float32. Later releases (5.24: ``HfQuantizer.get_new_dtype``) cast them as the unquantized path
    does; this reproduces that and, there, changes nothing. Each cast goes once from the stored value to the
    target, as transformers' own cast would. FP8/FP4 modules (weights and scales) and integer tables
    (``tid2eid``, left in its stored int32 by both releases) are left as loaded.
    """
    rule = _unquantized_dtype_rule(model, dtype)
    plain = (torch.float32, torch.bfloat16, torch.float16)
    cast = 0
    for module_name, module in model.named_modules():
        if type(module).__module__.endswith("finegrained_fp8"):  # FP8Linear, FP8Experts: the quantizer's own
            continue
        tensors = [(n, p, True) for n, p in module.named_parameters(recurse=False)]
        tensors += [(n, b, False) for n, b in module.named_buffers(recurse=False)
                    if n not in module._non_persistent_buffers_set]
        for name, tensor, is_param in tensors:
            if tensor is None or tensor.dtype not in plain:
                continue
            want = rule(f"{module_name}.{name}" if module_name else name)
            if tensor.dtype == want:
                continue
            if is_param:
                tensor.data = tensor.data.to(want)  # the same Parameter object: ties and hooks keep it
            else:
                setattr(module, name, tensor.to(want))
            cast += 1
    return cast


_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _probe_fp8_matmul(index: int, expert_fp4: bool, allow_deepgemm: bool) -> str | None:
    """Run transformers' ``fp8_linear`` on cuda:``index`` for a 128 x 256 FP8 block weight (and an FP4 one) and
    compare with the dequantized matmul; the activations are quantized to FP8 on the fly, hence the 10 % bound."""
    try:
        from transformers.integrations.finegrained_fp8 import fp8_linear
    except ImportError as exc:
        return f"transformers' FP8 integration does not import ({first_line(exc)})"
    device = torch.device("cuda", index)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 256, generator=gen).to(device, torch.bfloat16)
    fp8 = (torch.randn(128, 256, generator=gen) * 8).to(torch.float8_e4m3fn)
    fp8_scale = torch.full((1, 2), 127 - 6, dtype=torch.uint8).view(torch.float8_e8m0fnu)  # 2^-6 per block
    cases = [("FP8", fp8, fp8_scale, fp8.float() * 2.0 ** -6)]
    if expert_fp4:
        codes = torch.randint(0, 256, (128, 128), generator=gen, dtype=torch.uint8)
        lut = torch.tensor(_E2M1)
        value = torch.stack([lut[(codes & 0xF).long()], lut[(codes >> 4).long()]], dim=-1).reshape(128, 256)
        fp4_scale = torch.full((128, 8), 127 - 2, dtype=torch.uint8).view(torch.float8_e8m0fnu)  # 2^-2 per 32
        cases.append(("FP4", codes.view(torch.int8), fp4_scale, value * 2.0 ** -2))
    for name, weight, scale, value in cases:
        try:
            got = fp8_linear(x, weight.to(device), scale.to(device), [128, 128], allow_deepgemm=allow_deepgemm)
            torch.cuda.synchronize(device)
        except Exception as exc:  # a missing kernel surfaces as ImportError, RuntimeError, NotImplementedError ...
            return f"no {name} matmul kernel runs on cuda:{index} ({type(exc).__name__}: {first_line(exc)})"
        want = x.float() @ value.to(device).T
        error = float((got.float() - want).norm() / want.norm())
        if not error < 0.1:
            return f"the {name} kernel on cuda:{index} disagrees with the dequantized matmul (error {error:.2g})"
    return None


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
        # an offloaded norm (device map with CPU offload) holds a meta weight and computes on its hook's device
        probe = torch.ones(1, module.weight.shape[-1], dtype=torch.bfloat16, device=execution_device(module))
        with torch.no_grad():
            if module(probe).dtype == probe.dtype:
                continue
        if hasattr(module, "_old_forward"):  # accelerate's hook (device-map offload) wraps forward: keep it around
            module._old_forward = types.MethodType(_norm_casts_once, module)
        else:
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


@functools.cache
def cache_kwarg() -> str:
    """The name transformers gives the cache argument of ``DeepseekV4Model.forward`` (5.17: past_key_values);
    read once (batched decoding asks every step)."""
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
