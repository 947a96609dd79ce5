"""The query route of the dual encoder: the trainable gated query tower (W_DQ, latent RMSNorm, W_IUQ, W_w, RoPE).

A sentence-transformers ``InputModule`` over float inputs: a "query" is one label row's trigger hidden state
h_t0 at memory-indexer layer L, its position t0 and L. The tower wraps :class:`lsa_runtime.memory_indexer.
MemoryIndexer` (one independent indexer per layer) and turns a batch into q [B, H, dh] (after RoPE_t0) and
w [B, H]; the gated score against the frozen keys is computed by the loss / evaluator, because
sum_h w_h relu(q_h . k_s) is none of sentence-transformers' similarity functions.

Saved as a plain folder: ``config.json`` (the :class:`MemoryIndexerConfig`) and ``model.safetensors`` whose
tensor names are exactly the export's (``layers.{L}.W_DQ.weight`` ...).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from sentence_transformers.base.modules import InputModule

from lsa_runtime.memory_indexer import MemoryIndexer, MemoryIndexerConfig

FEATURES = "input_features"  # the Trainer collects a column's features by this suffix (see collator.py)


class GatedQueryTower(InputModule):
    """h_t0 [d], t0, L  ->  q = RoPE_t0(W_IUQ RMSNorm(W_DQ h_t0)) [H, dh],  w = W_w h_t0 H^-1/2 [H]."""

    config_keys = ["memory_indexer"]
    config_file_name = "config.json"
    save_in_root = False

    def __init__(self, memory_indexer: dict | MemoryIndexerConfig, indexer: MemoryIndexer | None = None):
        super().__init__()
        config = memory_indexer if isinstance(memory_indexer, MemoryIndexerConfig) else \
            MemoryIndexerConfig.from_json(memory_indexer)
        self.indexer = indexer if indexer is not None else MemoryIndexer(config)

    @property
    def config(self) -> MemoryIndexerConfig:
        return self.indexer.config

    @property
    def memory_indexer(self) -> dict:
        return self.config.to_json()

    @property
    def modalities(self) -> list[str]:
        # Rows are dicts of floats. Training never goes through modality inference (collator.py builds the
        # features); sentence-transformers requires a non-empty list here, and float arrays would read as audio.
        return ["text"]

    def preprocess(self, inputs, prompt: str | None = None, **kwargs) -> dict[str, Any]:
        """Rows {"hidden": [d], "position": t0, "layer": L} -> {input_features [B, d], positions [B], layers [B]}."""
        hidden = torch.stack([torch.as_tensor(row["hidden"]).float().reshape(-1) for row in inputs])
        positions = torch.tensor([int(row["position"]) for row in inputs], dtype=torch.long)
        layers = torch.tensor([int(row["layer"]) for row in inputs], dtype=torch.long)
        return {FEATURES: hidden, "positions": positions, "layers": layers}

    def forward(self, features: dict[str, torch.Tensor], **kwargs) -> dict[str, torch.Tensor]:
        hidden, positions, layers = features[FEATURES], features["positions"], features["layers"]
        rows = hidden.shape[0]
        cfg = self.config
        q = hidden.new_zeros(rows, cfg.index_n_heads, cfg.index_head_dim, dtype=torch.float32)
        w = hidden.new_zeros(rows, cfg.index_n_heads, dtype=torch.float32)
        parts_q, parts_w, index = [], [], []
        for L in cfg.layers:
            sel = torch.nonzero(layers == L, as_tuple=False).reshape(-1)
            if sel.numel() == 0:
                continue
            q_l, w_l = self.indexer.layer(L).query(hidden[sel], positions[sel])
            parts_q.append(q_l.float())
            parts_w.append(w_l.float())
            index.append(sel)
        if index:
            index = torch.cat(index)
            q = q.index_copy(0, index, torch.cat(parts_q))
            w = w.index_copy(0, index, torch.cat(parts_w))
        features.update({"query_heads": q, "head_weights": w,
                         "sentence_embedding": torch.cat([q.flatten(1), w], dim=1)})
        return features

    def get_embedding_dimension(self) -> int:
        return self.config.index_n_heads * (self.config.index_head_dim + 1)

    # -- a plain folder: config.json + model.safetensors (export tensor names) ----------------------------
    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        from safetensors.torch import save_file

        os.makedirs(output_path, exist_ok=True)
        with open(os.path.join(output_path, self.config_file_name), "w") as f:
            json.dump({"memory_indexer": self.memory_indexer}, f, indent=2, sort_keys=True)
        save_file(self.indexer.export_state_dict(), os.path.join(output_path, "model.safetensors"))

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", **kwargs) -> "GatedQueryTower":
        return cls.from_folder(os.path.join(model_name_or_path, subfolder))

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "GatedQueryTower":
        from safetensors.torch import load_file

        with open(os.path.join(folder, cls.config_file_name)) as f:
            tower = cls(json.load(f)["memory_indexer"])
        tower.indexer.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
        return tower
