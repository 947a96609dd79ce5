"""Synthetic label shards in the docs/DESIGN.md format, with a planted, learnable structure.

A fixed secret map A (d -> dh, non-rotary channels only) defines the target direction
v = A h_t0 of a trigger; the golden entries are the visible entries whose keys score highest against v
(top ``share``), so a query tower that learns q ~ A h retrieves them, while recency and chance do not.
``native_topk_union`` = golden plus a few random visible entries.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from indexer_train.shards import FORMAT, LabelRow, ShardWriter, write_json

HIDDEN, HEADS, HEAD_DIM, ROPE_DIM, RATE, TAU = 16, 8, 8, 4, 4, 16
ROPE = {"rope_type": "default", "rope_theta": 160000.0, "partial_rotary_factor": 0.25}


def manifest(layers, n_docs, config_hash="synthetic0000001", complete=True) -> dict:
    return {
        "format": FORMAT,
        "backbone": {"name": "synthetic", "config_hash": config_hash, "num_hidden_layers": 8,
                     "csa_layers": [2, 4, 6], "hidden_size": HIDDEN, "index_n_heads": HEADS,
                     "index_head_dim": HEAD_DIM, "rope_dim": ROPE_DIM, "compress_rate": RATE, "index_topk": 8,
                     "rope": dict(ROPE), "max_position_embeddings": 4096},
        "params": {"layers": list(layers), "tau": TAU, "nucleus": 0.6, "min_votes": 2, "max_tokens": None,
                   "dtype": "float32"},
        "shard": {"index": 0, "count": 1},
        "counts": {"documents": n_docs, "skipped": 0},
        "versions": {"fm_index": "test"},
        "complete": complete,
    }


def write_synthetic_shards(out: str | Path, n_docs: int = 6, tokens: int = 384, layers=(2, 4), seed: int = 0,
                           share: float = 0.15, config_hash: str = "synthetic0000001") -> Path:
    """Write ``n_docs`` documents of ``tokens`` tokens; returns ``out``."""
    out = Path(out)
    gen = torch.Generator().manual_seed(seed)
    secret = torch.randn(HEAD_DIM - ROPE_DIM, HIDDEN, generator=gen)
    key_mean = torch.zeros(HEAD_DIM)
    key_mean[0] = 1.5
    writer = ShardWriter(out, HIDDEN, list(layers), HEAD_DIM)
    n_entries = tokens // RATE
    for doc in range(n_docs):
        # like real K^IComp (RMS-normalised with a learned weight) the keys share a mean direction
        shared_keys = torch.randn(n_entries, HEAD_DIM, generator=gen) + key_mean
        keys = {L: shared_keys for L in layers}  # the planted structure is the same at every layer
        rows = []
        for t0 in range(TAU, tokens - TAU + 1, TAU):
            nv = (t0 + 1) // RATE
            h0 = torch.randn(HIDDEN, generator=gen)
            # golden = the top-share visible entries by <A h, k_nope> (labels do not depend on the layer)
            score = shared_keys[:nv, : HEAD_DIM - ROPE_DIM] @ (secret @ h0)
            k = max(1, int(round(share * nv)))
            positives = torch.sort(torch.topk(score, k).indices).values.to(torch.int32)
            extra = torch.randint(0, nv, (3,), generator=gen)
            native = torch.unique(torch.cat([positives.long(), extra])).to(torch.int32)
            for L in layers:
                h = h0 + 0.05 * torch.randn(HIDDEN, generator=gen)  # each layer sees a slightly different h_t0
                rows.append(LabelRow(doc_id=f"doc{doc}", doc_index=doc, layer=L, position=t0, n_visible=nv,
                                     hidden=h.to(torch.float16), positives=positives,
                                     native_topk_union=native, n_candidates=int(positives.numel()) + 2))
        writer.write_document(doc, rows, keys, {"doc_id": f"doc{doc}", "tokens": tokens})
    write_json(out / "manifest.json", manifest(layers, n_docs, config_hash))
    return out


def set_manifest(out: str | Path, **changes) -> None:
    path = Path(out) / "manifest.json"
    blob = json.loads(path.read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            blob[section][field] = value
        else:
            blob[section] = value
    write_json(path, blob)
