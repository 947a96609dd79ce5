"""Label shards on disk: per-document Arrow files (memory-mappable) and ``manifest.json``.

Layout and schemas are fixed in docs/DESIGN.md ("Label shards"). Every file is written under a temporary name
unique to the writing process (``lsa_runtime.outputs.temp_path``) and renamed when complete; ``done/{doc}.json`` is written last, so a document counts as finished only
when its rows and keys are both in place. A crashed run therefore never leaves a half document that a
reader or a ``--resume`` would take as complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from lsa_runtime.errors import FmIndexError
from lsa_runtime.outputs import temp_path

FORMAT = "fm-index-labels/1"


class ShardError(FmIndexError):
    """Label shards that are missing, corrupt, unfinished or made for something else."""


def rows_schema(hidden_size: int) -> pa.Schema:
    return pa.schema([
        ("doc_id", pa.string()),
        ("doc_index", pa.int64()),
        ("layer", pa.int16()),
        ("position", pa.int64()),
        ("n_visible", pa.int32()),
        ("hidden", pa.list_(pa.float16(), hidden_size)),
        ("positives", pa.list_(pa.int32())),
        ("native_topk_union", pa.list_(pa.int32())),
        ("n_candidates", pa.int32()),
    ])


def keys_schema(layers: list[int], head_dim: int) -> pa.Schema:
    return pa.schema([(f"layer_{layer}", pa.list_(pa.float16(), head_dim)) for layer in layers])


def _fixed_list(matrix: np.ndarray, dtype=pa.float16()) -> pa.FixedSizeListArray:
    matrix = np.ascontiguousarray(matrix, dtype=np.float16)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), type=dtype), matrix.shape[1])


def write_atomic_bytes(path: Path, data: bytes) -> None:
    tmp = temp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_atomic_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _write_table(path: Path, table: pa.Table, stream: bool) -> None:
    """Arrow IPC: the stream format for rows (what ``datasets.Dataset.from_file`` memory-maps), the random-access
    file format for keys."""
    tmp = temp_path(path)
    opener = pa.ipc.new_stream if stream else pa.ipc.new_file
    with pa.OSFile(str(tmp), "wb") as sink, opener(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)



def read_label_rows(directory: str | Path) -> dict[tuple[int, int, int], dict]:
    """Every label row of a label directory as a plain dict, keyed by (doc_index, layer, position), read with pyarrow
    alone (no datasets): for comparing two label directories table for table."""
    out = {}
    for path in sorted((Path(directory) / "rows").glob("*.arrow")):
        for row in pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all().to_pylist():
            out[(row["doc_index"], row["layer"], row["position"])] = row
    return out


def read_key_tables(directory: str | Path) -> dict[str, pa.Table]:
    """Every document's key table of a label directory, by file name (pyarrow alone)."""
    return {path.name: pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
            for path in sorted((Path(directory) / "keys").glob("*.arrow"))}

@dataclass
class LabelRow:
    doc_id: str
    doc_index: int
    layer: int
    position: int
    n_visible: int
    hidden: torch.Tensor  # [d]
    positives: torch.Tensor  # int32
    native_topk_union: torch.Tensor  # int32
    n_candidates: int


def doc_name(doc_index: int) -> str:
    return f"{doc_index:08d}"


class ShardWriter:
    """Writes one document at a time into ``out_dir`` (rows, keys, then the done marker)."""

    def __init__(self, out_dir: str | Path, hidden_size: int, layers: list[int], head_dim: int):
        self.out = Path(out_dir)
        for sub in ("rows", "keys", "done"):
            (self.out / sub).mkdir(parents=True, exist_ok=True)
        self.hidden_size, self.layers, self.head_dim = hidden_size, list(layers), head_dim

    def write_document(self, doc_index: int, rows: list[LabelRow], keys: dict[int, torch.Tensor], stats: dict):
        name = doc_name(doc_index)
        hidden = np.stack([r.hidden.float().cpu().numpy() for r in rows]) if rows else \
            np.zeros((0, self.hidden_size), np.float16)
        table = pa.table({
            "doc_id": pa.array([r.doc_id for r in rows], pa.string()),
            "doc_index": pa.array([r.doc_index for r in rows], pa.int64()),
            "layer": pa.array([r.layer for r in rows], pa.int16()),
            "position": pa.array([r.position for r in rows], pa.int64()),
            "n_visible": pa.array([r.n_visible for r in rows], pa.int32()),
            "hidden": _fixed_list(hidden),
            "positives": pa.array([r.positives.tolist() for r in rows], pa.list_(pa.int32())),
            "native_topk_union": pa.array([r.native_topk_union.tolist() for r in rows], pa.list_(pa.int32())),
            "n_candidates": pa.array([r.n_candidates for r in rows], pa.int32()),
        }, schema=rows_schema(self.hidden_size))
        keys_table = pa.table(
            {f"layer_{L}": _fixed_list(keys[L].float().cpu().numpy()) for L in self.layers},
            schema=keys_schema(self.layers, self.head_dim),
        )
        _write_table(self.out / "rows" / f"{name}.arrow", table, stream=True)
        _write_table(self.out / "keys" / f"{name}.arrow", keys_table, stream=False)
        write_json(self.out / "done" / f"{name}.json", stats)


def completed_documents(out_dir: str | Path) -> dict[int, dict]:
    """doc_index -> stats of every document whose done marker exists."""
    done = {}
    for path in sorted((Path(out_dir) / "done").glob("*.json")):
        try:
            done[int(path.stem)] = json.loads(path.read_text())
        except (ValueError, json.JSONDecodeError):
            raise ShardError(f"corrupt done marker {path}") from None
    return done


class LabelShards:
    """Read side: ``manifest``, ``rows()`` (a memory-mapped ``datasets.Dataset``), ``keys(doc, layer)``."""

    def __init__(self, directory: str | Path, require_complete: bool = True):
        self.dir = Path(directory)
        path = self.dir / "manifest.json"
        if not path.is_file():
            raise ShardError(f"{self.dir} holds no label shards (no manifest.json); run fm-index build-labels")
        try:
            self.manifest = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise ShardError(f"corrupt manifest {path}") from None
        if self.manifest.get("format") != FORMAT:
            raise ShardError(f"{path} is not an fm-index label manifest (format {self.manifest.get('format')!r})")
        if require_complete and not self.manifest.get("complete"):
            raise ShardError(f"label shards in {self.dir} are unfinished; rerun build-labels with --resume "
                             "(or fm-index merge-labels for --shard runs)")
        self.layers = list(self.manifest["params"]["layers"])
        self.documents = sorted(int(p.stem) for p in (self.dir / "rows").glob("*.arrow"))
        self._keys_cache: dict[int, pa.Table] = {}

    @property
    def config_hash(self) -> str:
        return self.manifest["backbone"]["config_hash"]

    def row_files(self, doc_indices=None) -> list[Path]:
        docs = self.documents if doc_indices is None else sorted(doc_indices)
        return [self.dir / "rows" / f"{doc_name(d)}.arrow" for d in docs]

    def rows(self, doc_indices=None):
        """All rows (or those of some documents) as one memory-mapped ``datasets.Dataset``."""
        from datasets import Dataset, concatenate_datasets

        parts = []
        for path in self.row_files(doc_indices):
            try:
                parts.append(Dataset.from_file(str(path)))
            except Exception as exc:
                raise ShardError(f"corrupt rows file {path}: {exc}") from None
        if not parts:
            raise ShardError(f"no label rows in {self.dir}")
        return concatenate_datasets(parts) if len(parts) > 1 else parts[0]

    def _keys_table(self, doc_index: int) -> pa.Table:
        table = self._keys_cache.get(doc_index)
        if table is None:
            path = self.dir / "keys" / f"{doc_name(doc_index)}.arrow"
            try:
                table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
            except (OSError, pa.ArrowInvalid) as exc:
                raise ShardError(f"corrupt or missing keys file {path}: {exc}") from None
            self._keys_cache = {doc_index: table}  # keep one document mapped at a time
        return table

    def keys(self, doc_index: int, layer: int) -> torch.Tensor:
        """Compressed indexer keys of one document at one memory layer: float16 [n_entries, index_head_dim]."""
        table = self._keys_table(doc_index)
        column = f"layer_{layer}"
        if column not in table.column_names:
            raise ShardError(f"layer {layer} is not in the label shards of {self.dir} (layers {self.layers})")
        arr = table.column(column).combine_chunks()
        width = arr.type.list_size
        flat = arr.values.to_numpy(zero_copy_only=False)
        return torch.from_numpy(np.array(flat, dtype=np.float16).reshape(-1, width))  # a copy: torch needs writable
