"""The fetch threshold chosen for a target recall on the held-out labels (``fm-index export --target-recall R``).

A trained indexer's scores sigmoid(I_L[t0, s]) are calibrated by its loss, not by what decoding needs: with focal
loss the golden entries of a weak indexer often score below the default 0.5, and it fetches a few entries with
recall ~0.4 (docs/RESULTS.md, section 7). Decoding needs the golden entries resident, so the threshold can instead
be the highest one at which the OR-union of the memory layers (combined as the export's ``ensemble``: max, or mean)
still holds a share ``R`` of the golden entries, micro-averaged over the held-out triggers of the training run:

    recall(T) = sum_t |{s in G_t : u_t(s) >= T}| / sum_t |G_t|      T* = max { T : recall(T) >= R }

T* is the ceil(R * |G|)-th highest union score among all golden entries, stored lowered by a relative
``THRESHOLD_MARGIN``: the choice scores a document's triggers in one batch, the runtime one trigger at a time, and
fp32 matmuls over other row counts round differently (a golden entry scored exactly T* here once scored just under
it through ``MemoryIndexer.score`` row by row, and the recall fell below R by that one entry). Measured on the
training run's held-out documents (never on evaluation prompts); the export records T*, the recall and the
retrieval ratio it gives there.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from lsa_runtime.errors import FmIndexError

from .evaluator import trigger_scores

THRESHOLD_MARGIN = 1e-4  # relative; scores' rounding between batch shapes is ~1e-6 relative in fp32


@dataclass(frozen=True)
class ThresholdChoice:
    """T* and what it gives on the held-out triggers it was chosen on."""

    threshold: float
    target_recall: float
    recall: float
    precision: float
    retrieval_ratio: float  # fetched / visible entries, micro-averaged
    triggers: int
    golden: int

    def as_dict(self) -> dict:
        return asdict(self)


def check_target_recall(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise FmIndexError(f"--target-recall must be a share in (0, 1], got {value!r}")
    return float(value)


def union_scores(probs: dict[int, torch.Tensor], ensemble: str) -> torch.Tensor:
    """The memory layers' scores of one trigger combined as the runtime combines them before the threshold."""
    stacked = torch.stack(list(probs.values()))
    return stacked.max(0).values if ensemble == "max" else stacked.mean(0)


def choose_threshold(indexer, shards, documents, target_recall: float, chunk_size: int = 8192,
                     progress=None) -> ThresholdChoice:
    """T* for ``target_recall`` over the triggers of ``documents`` (see the module doc)."""
    target_recall = check_target_recall(target_recall)
    ensemble = indexer.config.ensemble
    golden_scores, all_scores, triggers = [], [], 0
    for trigger in trigger_scores(indexer, shards, documents, chunk_size, progress=progress):
        union = union_scores(trigger.probs, ensemble)
        golden_scores.append(union[trigger.gold])
        all_scores.append(union)
        triggers += 1
    gold = torch.cat(golden_scores) if golden_scores else torch.zeros(0)
    if gold.numel() == 0:
        raise FmIndexError("the held-out documents hold no golden entry: no recall to aim at")
    k = math.ceil(target_recall * gold.numel())
    threshold = float(torch.sort(gold, descending=True).values[k - 1]) * (1.0 - THRESHOLD_MARGIN)
    # a threshold lives in (0, 1): saturated sigmoids (exactly 0 or 1 in fp32) move to the nearest valid value
    threshold = min(max(threshold, float(torch.finfo(torch.float32).tiny)), math.nextafter(1.0, 0.0))
    scores = torch.cat(all_scores)
    fetched = int((scores >= threshold).sum())
    hits = int((gold >= threshold).sum())
    return ThresholdChoice(threshold=threshold, target_recall=target_recall, recall=hits / gold.numel(),
                           precision=hits / fetched if fetched else 0.0, retrieval_ratio=fetched / scores.numel(),
                           triggers=triggers, golden=int(gold.numel()))
