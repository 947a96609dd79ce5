"""Where a DeepSeek-V4 backbone's parts go: device maps, where each layer computes, and whether the weights fit.

A device map is checked against the model before any weight is read (:func:`parse_device_map`: every decoder layer
placed exactly once, on the CPU or an existing CUDA device; ``_no_split_modules`` keeps a decoder layer whole) and
handed to transformers, which dispatches it through accelerate. accelerate's semantics are kept: a module mapped to
"cpu" beside a GPU is offloaded (meta weights in the module, the real ones in host memory, streamed to the map's
first GPU at each forward), so :func:`execution_device` is where it computes. :func:`check_fits` sizes a checkpoint
from its safetensors headers alone against the free memory of each device it is placed on.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BackboneError, first_line

# ---- placement: which device each part of the model goes to ---------------------------------------------------

AUTO_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
DEVICE_MAP_HELP = ('"auto", "balanced", one device, "DEVICE:FIRST-LAST,..." (e.g. "0:0-21,1:22-42"; DEVICE is a '
                   'CUDA index, cuda:N or cpu) or a dict of module name -> device')


def placement_units(config) -> list[str]:
    """The parts a device map places, each whole on one device (``_no_split_modules``: a decoder layer is not
    split). ``model.rotary_emb`` holds only recomputed buffers."""
    layers = [f"model.layers.{i}" for i in range(config.num_hidden_layers)]
    return ["model.embed_tokens", "model.rotary_emb", *layers, "model.norm", "model.hc_head", "lm_head"]


def parse_device_map(spec, config) -> str | dict[str, int | str]:
    """Check a device map against the model before any weight is read; return what ``from_pretrained`` takes.

    "auto" / "balanced" (accelerate plans them, over the GPUs) pass through; one device (``"cpu"``, ``"cuda:1"``,
    ``1``) takes the whole model. ``"0:0-21,1:22-42"`` places layers 0-21 on cuda:0 and 22-42 on cuda:1; the
    embeddings go with the first layer, the final norm, ``hc_head`` and ``lm_head`` with the last. A dict maps
    module names (``""``, ``"model.layers.3"``, ``"lm_head"`` ...) to devices, the most specific name winning.
    Every layer must be placed exactly once, on cpu or an existing CUDA device. "cpu" next to a GPU means CPU
    offload, as accelerate implements device maps: those weights stay in host memory and are streamed to the map's
    first GPU, which computes them, at every forward (slow, the last resort for a model larger than the GPUs; their
    KV state lives on that GPU, see :func:`execution_device`). A map of "cpu" alone runs on the CPU. "auto" spreads
    over the GPUs only and never offloads.
    """
    if isinstance(spec, str) and spec.strip() in AUTO_DEVICE_MAPS:
        return spec.strip()
    whole = isinstance(spec, (int, torch.device)) or \
        (isinstance(spec, str) and re.fullmatch(r"cpu|cuda|cuda:\d+|\d+", spec.strip()))
    if whole:  # one device: the whole model
        return _expand_units({"": _map_device(spec, f"'{spec}'")}, config)
    if isinstance(spec, str):
        return _expand_units(_layer_ranges(spec, config.num_hidden_layers), config)
    if isinstance(spec, dict):
        return _expand_units(_module_map(spec, placement_units(config)), config)
    raise BackboneError(f"device map {spec!r} is not one of {DEVICE_MAP_HELP}")


def _layer_ranges(text: str, n_layers: int) -> dict[str, int | str]:
    placed: dict[int, int | str] = {}
    for entry in (part.strip() for part in text.split(",")):
        device, colon, span = entry.rpartition(":")
        first, dash, last = span.partition("-")
        try:
            lo, hi = int(first), int(last if dash else first)
        except ValueError:
            lo = hi = -1
        if not colon or not device or lo < 0 or hi < lo:
            raise BackboneError(f"device map entry '{entry}' is not DEVICE:FIRST-LAST (the map is {DEVICE_MAP_HELP})")
        target = _map_device(device, f"entry '{entry}'")
        for layer in range(lo, hi + 1):
            if layer >= n_layers:
                raise BackboneError(f"device map entry '{entry}': layer {layer} does not exist (the model has "
                                    f"{n_layers} layers, 0 to {n_layers - 1})")
            if layer in placed:
                raise BackboneError(f"device map places layer {layer} twice (entry '{entry}')")
            placed[layer] = target
    _check_every_layer(set(placed), n_layers)
    units = {f"model.layers.{i}": d for i, d in placed.items()}
    first, last = placed[0], placed[n_layers - 1]
    return {"model.embed_tokens": first, "model.rotary_emb": first, **units, "model.norm": last,
            "model.hc_head": last, "lm_head": last}


def _module_map(spec: dict, units: list[str]) -> dict[str, int | str]:
    chosen: dict[str, tuple[int, int | str]] = {}  # unit -> (length of the key that placed it, device)
    for key, value in spec.items():
        if not isinstance(key, str):
            raise BackboneError(f"device map key {key!r} is not a module name")
        covered = [u for u in units if key == "" or u == key or u.startswith(key + ".")]
        if not covered:
            inside = next((u for u in units if key.startswith(u + ".")), None)
            if inside is not None:
                raise BackboneError(f"device map key '{key}' splits {inside}, which stays whole on one device")
            raise BackboneError(f"device map key '{key}' is no module of this model (place model.embed_tokens, "
                                "model.layers.N, model.norm, model.hc_head, lm_head, or a prefix of them)")
        target = _map_device(value, f"key '{key}'")
        for unit in covered:
            if unit not in chosen or chosen[unit][0] < len(key):
                chosen[unit] = (len(key), target)
    placed = {unit: device for unit, (_, device) in chosen.items()}
    if "model.rotary_emb" not in placed and "model.embed_tokens" in placed:
        placed["model.rotary_emb"] = placed["model.embed_tokens"]  # buffers only: it follows the embeddings
    n_layers = sum(u.startswith("model.layers.") for u in units)
    _check_every_layer({int(u.rsplit(".", 1)[1]) for u in placed if u.startswith("model.layers.")}, n_layers)
    missing = [u for u in units if u not in placed]
    if missing:
        raise BackboneError(f"device map leaves {', '.join(missing)} nowhere")
    return placed


def _check_every_layer(placed: set[int], n_layers: int) -> None:
    missing = [i for i in range(n_layers) if i not in placed]
    if missing:
        spans = []
        for i in missing:
            if spans and spans[-1][1] == i - 1:
                spans[-1][1] = i
            else:
                spans.append([i, i])
        text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)
        raise BackboneError(f"device map leaves layer{'s' if len(missing) > 1 else ''} {text} nowhere (the model "
                            f"has layers 0 to {n_layers - 1})")


def _expand_units(placed: dict[str, int | str], config) -> dict[str, int | str]:
    return {unit: placed[unit] if unit in placed else placed[""] for unit in placement_units(config)}


def _map_device(value, where: str) -> int | str:
    """A device-map value -> ``"cpu"`` or a CUDA index, refused with one line when this machine has no such device."""
    if isinstance(value, torch.device):
        text = str(value)
    elif isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        text = f"cuda:{int(value)}"
    else:
        text = str(value).strip()
    if text in ("disk", "meta"):
        raise BackboneError(f"device map {where}: '{text}' offloading is not supported; place weights on cpu or cuda")
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise BackboneError(f"device map {where}: '{value}' is not a device (a CUDA index, cuda:N or cpu)") from None
    if device.type == "cpu":
        return "cpu"
    if device.type != "cuda":
        raise BackboneError(f"device map {where}: fm-index places weights on cpu or cuda devices, not {device.type}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = device.index if device.index is not None else (torch.cuda.current_device() if count else 0)
    if index >= count:
        have = f"{count} CUDA device(s), cuda:0 to cuda:{count - 1}" if count else "no CUDA device"
        raise BackboneError(f"device map {where}: cuda:{index} does not exist (this machine has {have})")
    return index


def _placement_devices(placement) -> set:
    """The devices a placement uses ("auto"-style maps: every CUDA device, or the CPU on a machine without one)."""
    if isinstance(placement, dict):
        return set(placement.values())
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return set(range(count)) if count else {"cpu"}


# ---- size: does the checkpoint fit where it is placed? --------------------------------------------------------

@dataclass
class UnitWeights:
    """Elements of one placement unit's tensors, from the safetensors headers."""

    plain: int = 0  # unquantized floating-point elements
    quantized: int = 0  # logical elements of FP8 / FP4 weights (an FP4 byte holds two)
    stored_quantized: int = 0  # bytes those weights and their scales take as stored
    integer_bytes: int = 0  # integer tables (the hash router's tid2eid): loaded as stored

    def nbytes(self, itemsize: int, quantized: bool) -> int:
        packed = self.stored_quantized if quantized else self.quantized * itemsize
        return self.plain * itemsize + packed + self.integer_bytes


_ELEMENT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I64": 8,
                  "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_SCALE_SUFFIXES = (".scale", ".weight_scale_inv", ".activation_scale", ".qscale_weight")


def read_safetensors_headers(path: Path) -> dict[str, dict]:
    """Every tensor's header entry (dtype, shape, and ``file``: the safetensors file holding it) in a checkpoint
    directory; reads only the headers."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise BackboneError(f"cannot read {index}: {first_line(exc)}") from None
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise BackboneError(f"{path} holds no *.safetensors weights")
    tensors: dict[str, dict] = {}
    for name in files:
        try:
            with open(path / name, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                if not 0 < size < 1 << 30:
                    raise ValueError(f"header size {size}")
                header = json.loads(f.read(size))
        except (OSError, ValueError) as exc:
            raise BackboneError(f"cannot read the safetensors header of {path / name}: {first_line(exc)}") from None
        tensors.update({k: {**v, "file": name} for k, v in header.items() if k != "__metadata__"})
    return tensors


def placement_unit(name: str) -> str | None:
    """The placement unit a stored tensor belongs to, in either naming (``layers.3.attn.wq_a.weight``,
    ``model.layers.3.self_attn.q_a_proj.weight``); None for the release's MTP layer, which transformers skips."""
    bare = name.removeprefix("model.")
    layer = re.match(r"layers\.(\d+)\.", bare)
    if layer:
        return f"model.layers.{layer.group(1)}"
    head = bare.split(".", 1)[0]
    if head == "mtp":
        return None
    if head.startswith("hc_head"):
        return "model.hc_head"
    return {"embed": "model.embed_tokens", "embed_tokens": "model.embed_tokens", "norm": "model.norm",
            "head": "lm_head", "lm_head": "lm_head"}.get(head, "lm_head")


def checkpoint_weights(path: Path) -> dict[str, UnitWeights]:
    """Per placement unit, what the checkpoint's tensors hold (from the headers; no weight is read)."""
    tensors = read_safetensors_headers(path)
    units: dict[str, UnitWeights] = {}
    for name, entry in tensors.items():
        unit = placement_unit(name)
        if unit is None:
            continue
        weights = units.setdefault(unit, UnitWeights())
        dtype, numel = entry.get("dtype"), math.prod(entry.get("shape", []))
        stored = numel * _ELEMENT_BYTES.get(dtype, 4)
        stem = name.removesuffix(".weight")
        has_scale = any(stem + suffix in tensors for suffix in (".scale", ".weight_scale_inv"))
        if name.endswith(_SCALE_SUFFIXES):
            weights.stored_quantized += stored
        elif has_scale:
            weights.quantized += numel * (2 if dtype in ("I8", "U8") else 1)  # FP4: two e2m1 codes per byte
            weights.stored_quantized += stored
        elif dtype in ("I64", "I32", "I16", "I8", "U8", "BOOL"):
            weights.integer_bytes += stored
        else:
            weights.plain += numel
    return units


def host_memory_bytes() -> int:
    """Memory the host can still give (``MemAvailable``; physical memory where /proc/meminfo is missing)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory_bytes(device: int | str) -> int:
    """Free memory on a placement device ("cpu": the host's)."""
    if device == "cpu":
        return host_memory_bytes()
    return torch.cuda.mem_get_info(device)[0]


def check_fits(path: Path, config, placement, dtype: torch.dtype, quantized: bool) -> None:
    """Refuse, with the numbers, a load whose weights (estimated from the safetensors headers) exceed the free memory
    of a device they are placed on; "auto"-style maps are checked against all devices together."""
    units = checkpoint_weights(path)
    itemsize = torch.empty((), dtype=dtype).element_size()
    need: dict[int | str, int] = {}
    for unit, weights in units.items():
        where = placement.get(unit, placement.get("")) if isinstance(placement, dict) else "all"
        need[where] = need.get(where, 0) + weights.nbytes(itemsize, quantized)
    name = str(dtype).removeprefix("torch.")
    for where, nbytes in need.items():
        devices = sorted(_placement_devices(placement), key=str) if where == "all" else [where]
        free = sum(device_memory_bytes(d) for d in devices)
        if nbytes <= free:
            continue
        on = "the devices together" if where == "all" else ("the CPU" if where == "cpu" else f"cuda:{where}")
        hint = "" if where == "cpu" else "; spread the layers over more GPUs with a device map"
        if dtype == torch.float32:
            half = sum(w.nbytes(2, quantized) for w in units.values())
            hint = f"; in bfloat16 the whole model needs about {_gb(half)}"
        raise BackboneError(f"{path} in {name} needs about {_gb(nbytes)} on {on}, which has {_gb(free)} free"
                            f"{hint}")


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:,.1f} GB"


def _device_hooks(module) -> list:
    """accelerate's hooks on ``module`` (a device map with CPU offload or several devices attaches them)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def execution_device(module) -> torch.device:
    """Where ``module`` computes. A device map that puts a module on "cpu" while a GPU is in the map offloads it,
    as accelerate does: its weights wait in host memory (meta tensors in the module) and are streamed to the map's
    first GPU, where it runs, at each forward. Otherwise: where its parameters are."""
    for hook in _device_hooks(module):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def offloaded_modules(model) -> list[str]:
    """The placement units (``model.layers.N``, ``lm_head`` ...) whose weights a device map left in host memory,
    streamed to the GPU at each forward. accelerate hooks each submodule that holds tensors, not the unit itself."""
    units = {}
    for name, module in model.named_modules():
        if any(getattr(hook, "offload", False) for hook in _device_hooks(module)):
            layer = re.match(r"model\.layers\.\d+", name)
            units[layer.group(0) if layer else ".".join(name.split(".")[:2])] = None
    return list(units)
