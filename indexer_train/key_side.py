"""The document route of the dual encoder: the frozen key side, K^IComp of each document from the label shards.

The "document" of a label row is its source document: the backbone's compressed indexer keys k_s of every
memory-indexer layer (docs/DESIGN.md, keys files). Nothing here is trained and the backbone is never run:
keys come from :class:`indexer_train.shards.LabelShards` and are moved to the device once per document,
then shared by every row of that document in the batch (the sampler keeps a document's rows together).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from sentence_transformers.base.modules import InputModule

from .query_tower import FEATURES


class FrozenKeySide(InputModule):
    """Rows {"doc_index", "layer"} -> ``key_groups``: one (row indices, layer, keys [T, dh]) per document and layer.

    ``attach(key_source)`` gives it the keys: ``key_source(doc_index, layer) -> float16 [T, dh]`` (normally
    ``LabelShards(dir).keys``). Up to ``cache_documents`` documents stay on the device.
    """

    config_keys = ["layers", "index_head_dim"]
    save_in_root = False

    def __init__(self, layers: list[int], index_head_dim: int, cache_documents: int = 2):
        super().__init__()
        self.layers = [int(x) for x in layers]
        self.index_head_dim = int(index_head_dim)
        self.cache_documents = cache_documents
        self.key_source: Callable[[int, int], torch.Tensor] | None = None
        self._cache: OrderedDict[int, dict[int, torch.Tensor]] = OrderedDict()
        self.register_buffer("_device_probe", torch.zeros(0), persistent=False)

    @property
    def modalities(self) -> list[str]:
        return ["text"]

    def attach(self, key_source: Callable[[int, int], torch.Tensor]) -> "FrozenKeySide":
        self.key_source = key_source
        self._cache.clear()
        return self

    def document_keys(self, doc_index: int, layer: int) -> torch.Tensor:
        """K^IComp [T, dh] of one document at one layer, on this module's device (cached per document)."""
        if self.key_source is None:
            raise RuntimeError("FrozenKeySide has no key source: call attach(LabelShards(dir).keys) first")
        doc = self._cache.get(doc_index)
        if doc is None:
            device = self._device_probe.device
            doc = {L: self.key_source(doc_index, L).to(device) for L in self.layers}  # once per document
            self._cache[doc_index] = doc
            while len(self._cache) > self.cache_documents:
                self._cache.popitem(last=False)
        self._cache.move_to_end(doc_index)
        return doc[layer]

    def preprocess(self, inputs, prompt: str | None = None, **kwargs) -> dict[str, Any]:
        docs = torch.tensor([int(row["doc_index"]) for row in inputs], dtype=torch.long)
        layers = torch.tensor([int(row["layer"]) for row in inputs], dtype=torch.long)
        return {FEATURES: docs, "layers": layers}

    def forward(self, features: dict[str, torch.Tensor], **kwargs) -> dict[str, Any]:
        docs, layers = features[FEATURES].cpu(), features["layers"].cpu()
        groups = []
        pairs = torch.stack([docs, layers], dim=1)
        for doc, layer in torch.unique(pairs, dim=0).tolist():
            rows = torch.nonzero((docs == doc) & (layers == layer), as_tuple=False).reshape(-1)
            groups.append((rows, int(layer), self.document_keys(int(doc), int(layer))))
        features["key_groups"] = groups
        return features

    def save(self, output_path: str, *args, **kwargs) -> None:
        os.makedirs(output_path, exist_ok=True)
        with open(os.path.join(output_path, self.config_file_name), "w") as f:
            json.dump({"layers": self.layers, "index_head_dim": self.index_head_dim}, f, indent=2)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", **kwargs) -> "FrozenKeySide":
        with open(os.path.join(model_name_or_path, subfolder, cls.config_file_name)) as f:
            return cls(**json.load(f))
