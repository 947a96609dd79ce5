"""``fm-index import-dump``: the authors' label dumps (``doc_*.pkl`` from their SGLang fork) -> our label shards.

Their server, in dump mode, writes one pickle per request: a dict of CPU torch tensors (the fields read here,
per target layer ``i``, a CSA index):

    hidden_layer_{i}     [T, d] bf16     the attention input of layer i at each of the T decode tokens
    positions_layer_{i}  [T] int64       the decode tokens' positions
    compk_layer_{i}      [N, D + 4] uint8  per compressed entry: its index key as D FP8 e4m3 bytes (after RoPE and
                                          the Hadamard rotation), then one float32 scale; key = fp8 * scale
    label_indices [Ntot] int32, label_scores [Ntot] int32, label_pointers [T + 1] int32
                                          per decode token, the golden entries (CSR) and their layer counts

A trigger every ``tau`` decode tokens (t0 = 0, tau, 2 tau, ... with the whole window t0 .. t0 + tau - 1 inside
the dump) becomes one row per layer: h_t0, position t0, and the union of the window's golden sets, restricted to
the entries visible at t0 (s < (position + 1) // 4), as our own labels are. The keys are dequantised and rotated
back (the Hadamard matrix is its own inverse), so they are what transformers computes: our runtime's keys. The
dumps carry neither the native top-k picks nor the positives before the vote: ``native_topk_union`` is empty and
``n_candidates`` counts the positives.

A pickle can run code when loaded, so the dumps are read by an unpickler that admits exactly what a dict of
torch tensors needs (``torch._utils._rebuild_tensor_v2``, ``collections.OrderedDict``, and storages read with
``torch.load(weights_only=True)``) and refuses anything else: one line, exit 2, nothing written.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import re
from dataclasses import asdict
from pathlib import Path

import torch

from lsa_runtime.backbone import csa_layers, load_config
from lsa_runtime.errors import FmIndexError
from lsa_runtime.outputs import OutputLock, check_output_dir, remove_stale_temps

from .build_labels import FORMAT, LabelParams, _backbone_block, _summarise, _versions
from .shards import LabelRow, ShardError, ShardWriter, completed_documents, write_json

DUMP_FILE = re.compile(r"^doc_(\d+)\.pkl$")


class DumpError(FmIndexError):
    """A dump file that cannot be imported (unsafe, malformed, or made for another geometry)."""


def _storage(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


class _TensorUnpickler(pickle.Unpickler):
    """Admits only the globals a pickled dict of torch tensors uses."""

    allowed = {("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
               ("collections", "OrderedDict"): collections.OrderedDict,
               ("torch.storage", "_load_from_bytes"): _storage}

    def find_class(self, module: str, name: str):
        found = self.allowed.get((module, name))
        if found is None:
            raise DumpError(f"refuses to load {module}.{name}: a label dump holds torch tensors only")
        return found


def read_dump(path: str | Path) -> dict[str, torch.Tensor]:
    """One dump file, read safely (see the module docstring)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            blob = _TensorUnpickler(f).load()
    except DumpError as exc:
        raise DumpError(f"{path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - truncated or not a pickle at all
        raise DumpError(f"{path} is not a readable label dump: {str(exc).splitlines()[0] if str(exc) else exc}") \
            from None
    if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise DumpError(f"{path} is not a label dump: expected a dict of tensors")
    return blob


def hadamard(n: int) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix of size n (a power of two): symmetric, its own inverse."""
    if n < 1 or n & (n - 1):
        raise DumpError(f"index keys of width {n}: the Hadamard rotation needs a power of two")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


def dequantize_keys(compk: torch.Tensor) -> torch.Tensor:
    """[N, D + 4] uint8 (D FP8 e4m3 bytes, then a float32 scale) -> the unrotated keys [N, D] float32."""
    if compk.dtype != torch.uint8 or compk.ndim != 2 or compk.shape[1] <= 4:
        raise DumpError(f"compk must be [entries, D + 4] uint8, got {tuple(compk.shape)} {compk.dtype}")
    width = compk.shape[1] - 4
    fp8 = compk[:, :width].contiguous().view(torch.float8_e4m3fn).float()
    scale = compk[:, width:].contiguous().view(torch.float32)  # [N, 1], little-endian as written
    rotated = fp8 * scale
    return (rotated.double() @ hadamard(width)).float()  # H is symmetric: rows times H undo the rotation


def quantize_keys(keys: torch.Tensor) -> torch.Tensor:
    """The dumps' key format for keys [N, D] (rotate, per-row scale max(1e-4, amax) / 448, FP8 e4m3, scale
    bytes): what the release's server writes; used by tests and to check a round trip."""
    width = keys.shape[1]
    rotated = (keys.double() @ hadamard(width)).float()
    scale = rotated.abs().amax(1, keepdim=True).clamp_min(1e-4) / 448.0
    fp8 = (rotated / scale).to(torch.float8_e4m3fn).view(torch.uint8)
    return torch.cat([fp8, scale.contiguous().view(torch.uint8)], 1)


def dump_layers(blob: dict) -> list[int]:
    """The CSA indices a dump holds (``hidden_layer_{i}``)."""
    return sorted(int(k.rsplit("_", 1)[1]) for k in blob if re.fullmatch(r"hidden_layer_\d+", k))


def dump_fields(blob: dict, layers: list[int], indices: list[int], path: Path, hidden_size: int, key_dim: int):
    """The tensors :func:`dump_rows` reads, checked (present, shapes agreeing with each other and the backbone):
    label pointers, label entries, and per model layer its hidden states, positions and packed keys."""
    try:
        pointers = blob["label_pointers"].long()
        entries = blob["label_indices"].long()
        hidden = {L: blob[f"hidden_layer_{i}"] for L, i in zip(layers, indices)}
        positions = {L: blob[f"positions_layer_{i}"].long() for L, i in zip(layers, indices)}
        compk = {L: blob[f"compk_layer_{i}"] for L, i in zip(layers, indices)}
    except KeyError as exc:
        raise DumpError(f"{path} lacks {exc.args[0]}") from None
    n_tokens = pointers.numel() - 1
    if any(h.dim() != 2 or h.shape[0] != n_tokens for h in hidden.values()) \
            or any(p.numel() != n_tokens for p in positions.values()):
        raise DumpError(f"{path}: hidden states, positions and labels disagree on the number of decode tokens")
    if any(h.shape[1] != hidden_size for h in hidden.values()) \
            or any(c.dim() != 2 or c.shape[1] != key_dim + 4 for c in compk.values()):
        raise DumpError(f"{path}: hidden states or keys are not {hidden_size}-dim and {key_dim}-dim (+ a scale) as "
                        "the backbone's")
    return pointers, entries, hidden, positions, compk


def dump_rows(blob: dict, doc_id: str, doc_index: int, layers: list[int], indices: list[int], tau: int,
              rate: int, path: Path, hidden_size: int, key_dim: int
              ) -> tuple[list[LabelRow], dict[int, torch.Tensor], dict]:
    """Rows, keys (model layer -> [N, D] fp16) and stats of one dump, for model ``layers`` = CSA ``indices``."""
    pointers, entries, hidden, positions, compk = dump_fields(blob, layers, indices, path, hidden_size, key_dim)
    n_tokens = pointers.numel() - 1
    first = layers[0]
    keys = {L: dequantize_keys(c).half() for L, c in compk.items()}
    n_entries = min(k.shape[0] for k in keys.values())
    rows = []
    for t0 in range(0, n_tokens - tau + 1, tau):
        position = int(positions[first][t0])
        n_visible = min((position + 1) // rate, n_entries)
        window = entries[pointers[t0]:pointers[t0 + tau]]
        golden = torch.unique(window[window < n_visible]).to(torch.int32)
        for L in layers:
            rows.append(LabelRow(doc_id=doc_id, doc_index=doc_index, layer=L, position=position,
                                 n_visible=n_visible, hidden=hidden[L][t0].to(torch.float16),
                                 positives=golden, native_topk_union=torch.zeros(0, dtype=torch.int32),
                                 n_candidates=int(golden.numel())))
    triggers = len(rows) // len(layers)
    stats = {"doc_id": doc_id, "tokens": n_tokens, "triggers": triggers, "rows": len(rows), "entries": n_entries,
             "positives_sum": sum(int(r.positives.numel()) for r in rows[::len(layers)]),
             "candidates_sum": sum(r.n_candidates for r in rows[::len(layers)]), "native_topk_sum": 0,
             "visible_sum": sum(r.n_visible for r in rows[::len(layers)]), "imported_from": path.name}
    return rows, {L: k[:n_entries] for L, k in keys.items()}, stats


def import_dumps(dump_dir: str | Path, model: str, out: str | Path, tau: int = 64, layers: str | None = None,
                 nucleus: float = 0.6, min_votes: int = 3, resume: bool = False, progress=None) -> dict:
    """Convert every ``doc_*.pkl`` of ``dump_dir`` into label shards in ``out`` (see the module docstring).

    ``model``: the backbone the dumps came from (its config only: the CSA list, the geometry, the hash the shards
    carry); ``layers``: the layers to import (model ids or ``csa:I,J``; default every layer of the dumps);
    ``nucleus`` / ``min_votes``: what the dumps were made with (recorded, not recomputed)."""
    from lsa_runtime.backbone import parse_layer_list, resolve_csa_indices

    dump_dir, out = Path(dump_dir), Path(out)
    if not dump_dir.is_dir():
        raise DumpError(f"dump directory {dump_dir} does not exist")
    files = sorted((p for p in dump_dir.iterdir() if DUMP_FILE.match(p.name)), key=lambda p: int(p.stem[4:]))
    if not files:
        raise DumpError(f"{dump_dir} holds no doc_*.pkl dump files")
    if tau < 1:
        raise FmIndexError(f"--tau must be >= 1, got {tau}")
    config = load_config(model)
    csa = csa_layers(config)
    first = read_dump(files[0])  # every file is read (safely) before anything is written: this one decides layers
    present = dump_layers(first)
    if not present:
        raise DumpError(f"{files[0]} has no hidden_layer_{{i}} tensor")
    wanted = parse_layer_list(layers)
    if isinstance(wanted, tuple) and any(L not in csa for L in wanted):
        raise DumpError(f"layer {next(L for L in wanted if L not in csa)} is not a CSA layer of {model} (its CSA "
                        f"layers: {', '.join(map(str, csa))}; or name CSA indices: --layers csa:I,J)")
    indices = present if wanted is None else (
        [int(x) for x in wanted[4:].split(",")] if isinstance(wanted, str) else [csa.index(L) for L in wanted])
    indices = sorted(set(indices))
    if any(i not in present for i in indices):
        raise DumpError(f"layers {layers} are not all in the dumps (they hold CSA indices {present})")
    model_layers = resolve_csa_indices(config, indices)
    for path in files:  # the structure of every dump, before anything is written
        dump_fields(first if path == files[0] else read_dump(path), model_layers, indices, path, config.hidden_size,
                    config.index_head_dim)
    check_output_dir(out)
    params = LabelParams(layers=tuple(model_layers), tau=tau, nucleus=nucleus, min_votes=min_votes,
                         softmax_over="topk", source="generate", chunk_size=1, dtype="bfloat16")
    header = {"format": FORMAT, "backbone": _backbone_block(model, config), "params": asdict(params),
              "memory_layers": {"layers": model_layers, "csa_indices": indices}, "shard": {"index": 0, "count": 1},
              "corpus": {"path": str(dump_dir), "documents": len(files),
                         "fingerprint": {"documents": len(files), "files": [p.name for p in files]}},
              "imported": {"from": "FlashMemory release dumps", "native_topk_union": "absent",
                           "n_candidates": "the positives (the dumps hold only voted entries)"}}
    manifest = out / "manifest.json"
    with OutputLock(out, "import-dump"):
        if manifest.exists():
            if not resume:
                raise FmIndexError(f"{out} already holds labels; pass --resume to continue, or another --out")
            try:
                old = json.loads(manifest.read_text())
            except json.JSONDecodeError as exc:
                raise FmIndexError(f"--resume: corrupt {manifest} (line {exc.lineno}: {exc.msg}); import into "
                                   "another --out") from None
            if old.get("params") != json.loads(json.dumps(header["params"])) or \
                    old.get("corpus", {}).get("fingerprint") != header["corpus"]["fingerprint"]:
                raise FmIndexError(f"--resume: {out} was imported from other dumps or with other options")
            if old.get("backbone", {}).get("config_hash") != header["backbone"]["config_hash"]:
                raise FmIndexError(f"--resume: {out} was imported for another backbone (config "
                                   f"{old.get('backbone', {}).get('config_hash')}, --model {model}: "
                                   f"{header['backbone']['config_hash']})")
        elif out.exists() and any(p for p in out.iterdir() if not p.name.startswith(".fm-index")):
            raise FmIndexError(f"output directory {out} exists and is not empty")
        remove_stale_temps(out)
        write_json(manifest, {**header, "complete": False, "versions": _versions()})
        done = completed_documents(out)
        writer = ShardWriter(out, config.hidden_size, model_layers, config.index_head_dim)
        rate = int(config.compress_rates["compressed_sparse_attention"])
        for doc_index, path in enumerate(files):
            if doc_index not in done:
                rows, keys, stats = dump_rows(read_dump(path), path.stem, doc_index, model_layers, indices, tau,
                                              rate, path, config.hidden_size, config.index_head_dim)
                if rows:
                    writer.write_document(doc_index, rows, keys, stats)
                else:
                    write_json(out / "done" / f"{doc_index:08d}.json",
                               {"doc_id": path.stem, "tokens": stats["tokens"], "skipped": True,
                                "reason": f"{stats['tokens']} decode tokens < tau = {tau}: no full window"})
            if progress is not None:
                progress(doc_index + 1, len(files))
        summary = _summarise(completed_documents(out))
        if summary["documents"] == 0:
            raise ShardError(f"no dump held a full window of tau = {tau} decode tokens; the labels stay incomplete")
        write_json(manifest, {**header, "complete": True, "counts": summary, "versions": _versions()})
    return summary
