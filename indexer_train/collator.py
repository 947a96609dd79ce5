"""Batching label rows for the dual encoder: the document-grouped batch sampler and the collator.

A batch holds whole triggers (a trigger t0 of a document has one row per memory-indexer layer L), and the
triggers of a document sit next to each other, so the frozen keys K^IComp of a document go to the device once
and are shared by all its rows in the batch (:class:`~indexer_train.key_side.FrozenKeySide`). Every batch thus
also uses every layer's W_DQ, W_IUQ, W_w (DDP needs no unused-parameter search).

The collator emits the two routes' features under the names sentence-transformers' Trainer recognises
(``query_input_features`` ..., ``document_input_features`` ...) and the multi-hot targets as padded positive
lists in ``label`` ([B, P] int64, -1 = padding): ragged positives cannot go through the stock collator.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from sentence_transformers.base.sampler import DefaultBatchSampler
from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator

from .query_tower import FEATURES

ROW_COLUMNS = ["doc_index", "layer", "position", "n_visible", "hidden", "positives"]


def trigger_groups(doc_index: list[int], position: list[int]) -> dict[int, dict[int, list[int]]]:
    """doc -> position -> dataset row indices (one per memory layer)."""
    groups: dict[int, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for row, (doc, pos) in enumerate(zip(doc_index, position)):
        groups[int(doc)][int(pos)].append(row)
    return groups


class DocumentBatchSampler(DefaultBatchSampler):
    """Batches of ``batch_size`` triggers (all their layer rows), documents kept contiguous.

    Order per epoch (seeded by ``seed + epoch``, so a resumed run replays it exactly): shuffle the documents,
    shuffle the triggers inside each document, concatenate, cut into batches.
    """

    def __init__(self, dataset, batch_size: int, drop_last: bool = False, valid_label_columns=None,
                 generator: torch.Generator | None = None, seed: int = 0, shuffle: bool = True):
        super().__init__(dataset, batch_size=batch_size, drop_last=drop_last, valid_label_columns=valid_label_columns,
                         generator=generator, seed=seed)
        self.seed = seed
        self.shuffle = shuffle
        self.groups = trigger_groups(dataset["doc_index"], dataset["position"])
        self.n_triggers = sum(len(p) for p in self.groups.values())
        sizes = {len(rows) for doc in self.groups.values() for rows in doc.values()}
        if len(sizes) > 1:
            raise ValueError(f"triggers with different numbers of layer rows {sorted(sizes)}: inconsistent shards")
        # accelerate's BatchSamplerShard (DDP) compares yielded batch lengths with `batch_size`: count rows
        self.triggers_per_batch = batch_size
        self.rows_per_trigger = sizes.pop() if sizes else 1
        self.batch_size = batch_size * self.rows_per_trigger

    def _trigger_order(self) -> list[list[int]]:
        gen = torch.Generator().manual_seed(int(self.seed) + int(self.epoch))
        docs = sorted(self.groups)
        if self.shuffle:
            docs = [docs[i] for i in torch.randperm(len(docs), generator=gen).tolist()]
        order = []
        for doc in docs:
            positions = sorted(self.groups[doc])
            if self.shuffle:
                positions = [positions[i] for i in torch.randperm(len(positions), generator=gen).tolist()]
            order.extend(self.groups[doc][p] for p in positions)
        return order

    def __iter__(self):
        order = self._trigger_order()
        for start in range(0, len(order), self.triggers_per_batch):
            chunk = order[start : start + self.triggers_per_batch]
            if self.drop_last and len(chunk) < self.triggers_per_batch:
                return
            yield [row for trigger in chunk for row in trigger]

    def __len__(self) -> int:
        if self.drop_last:
            return self.n_triggers // self.triggers_per_batch
        return (self.n_triggers + self.triggers_per_batch - 1) // self.triggers_per_batch


def pad_positives(lists: list, fill: int = -1) -> torch.Tensor:
    """Ragged positive lists -> [B, max(P, 1)] int64 padded with ``fill``."""
    lists = [torch.as_tensor(x, dtype=torch.long).reshape(-1) for x in lists]
    width = max([x.numel() for x in lists] + [1])
    out = torch.full((len(lists), width), fill, dtype=torch.long)
    for i, x in enumerate(lists):
        out[i, : x.numel()] = x
    return out


@dataclass
class LabelRowCollator(SentenceTransformerDataCollator):
    """Label rows -> {query_input_features [B, d], query_positions, query_layers, query_n_visible, query_task,
    document_input_features (doc_index) [B], document_layers, document_task, label [B, P]}."""

    preprocess_fn: Any = None
    valid_label_columns: list[str] = field(default_factory=lambda: ["positives"])

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        hidden = torch.stack([torch.as_tensor(row["hidden"]).float().reshape(-1) for row in features])
        as_long = lambda name: torch.tensor([int(row[name]) for row in features], dtype=torch.long)  # noqa: E731
        layers = as_long("layer")
        return {
            f"query_{FEATURES}": hidden,
            "query_positions": as_long("position"),
            "query_layers": layers,
            "query_n_visible": as_long("n_visible"),
            "query_task": "query",
            f"document_{FEATURES}": as_long("doc_index"),
            "document_layers": layers.clone(),
            "document_task": "document",
            "label": pad_positives([row["positives"] for row in features]),
        }
