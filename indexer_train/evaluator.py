"""Held-out evaluation of a memory indexer against the golden labels and the native top-k picks.

For each held-out trigger t0 (documents never seen in training) and each memory layer L, the fetched set is
F_L = { s < n_visible : I_L[t0, s] >= threshold } and the indexer's set is the OR-union F = U_L F_L. Against
the golden label G (``positives``) and the native top-k union N (what the full-context model read):

    precision = |F n G| / |F|     recall = |F n G| / |G|     F1 = 2PR / (P + R)
    retrieval ratio = |F| / n_visible          native coverage = |F n N| / |N|

All are micro-averaged (sums over triggers, then the ratio). The threshold-free **ranking AUC** (mean over
triggers of P(score of a golden entry > score of a non-golden one), ties counted half) ranks by I_L for a
layer and by max_L I_L for the union. Two baselines fetch, per trigger, exactly as many
entries as the trained union (same retrieval ratio): **recency** (the |F| most recent visible entries) and
**chance** (|F| entries uniformly at random; its expected counts are used, E|F n G| = |F| |G| / n_visible).

The threshold decides how many entries the trained indexer fetches, and a weak indexer trained with focal loss
fetches few (its scores stay under 0.5), where recency is hard to beat: the most recent entries are nearly
always needed. So the table also compares the three at the golden set's own size, per trigger |F| = |G|
(**top-|G|** rows; the indexer's top |G| by max_L I_L): there precision = recall = F1 (R-precision).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from sentence_transformers.base.evaluation import BaseEvaluator

from lsa_runtime.errors import FmIndexError
from lsa_runtime.memory_indexer import MemoryIndexer

METRICS = ("precision", "recall", "f1", "retrieval_ratio", "native_coverage", "auc")


def ranking_auc(scores: torch.Tensor, gold: torch.Tensor) -> float | None:
    """Mann-Whitney AUC of ``scores`` for the boolean labels ``gold`` (average ranks for ties); None if one class
    is empty."""
    n_pos = int(gold.sum())
    n_neg = gold.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = torch.unique(scores.double(), return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = ((ends - counts + 1 + ends) / 2)[inverse]  # 1-based average rank of each entry
    return float((ranks[gold].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass
class Counts:
    """Sums over triggers of |F|, |F n G|, |G|, n_visible, |N|, |F n N| (floats: chance uses expectations)."""

    fetched: float = 0.0
    hits: float = 0.0
    positives: float = 0.0
    visible: float = 0.0
    native: float = 0.0
    native_hits: float = 0.0
    triggers: int = 0
    auc_sum: float = 0.0
    auc_triggers: int = 0

    def add_auc(self, auc: float | None) -> None:
        if auc is not None:
            self.auc_sum += auc
            self.auc_triggers += 1

    def add(self, fetched, hits, positives, visible, native, native_hits) -> None:
        self.fetched += float(fetched)
        self.hits += float(hits)
        self.positives += float(positives)
        self.visible += float(visible)
        self.native += float(native)
        self.native_hits += float(native_hits)
        self.triggers += 1

    def metrics(self) -> dict[str, float | None]:
        p = self.hits / self.fetched if self.fetched else 0.0
        r = self.hits / self.positives if self.positives else 0.0
        return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
                "retrieval_ratio": self.fetched / self.visible if self.visible else 0.0,
                "native_coverage": self.native_hits / self.native if self.native else 0.0,
                "auc": self.auc_sum / self.auc_triggers if self.auc_triggers else None}  # None: not ranked


@dataclass
class EvalReport:
    """Per-method counts: ``layer {L}``, ``union``, ``recency (same ratio)``, ``chance (same ratio)``, and
    ``union top-|G|``, ``recency top-|G|``, ``chance top-|G|``."""

    counts: dict[str, Counts] = field(default_factory=dict)
    documents: int = 0

    def table(self) -> list[tuple[str, dict[str, float]]]:
        return [(name, c.metrics()) for name, c in self.counts.items()]

    def flat(self) -> dict[str, float]:
        """Loggable scalars, e.g. ``union_f1``, ``layer2_recall``, ``recency_native_coverage``."""
        out = {}
        for name, c in self.counts.items():
            key = name.replace(" (same ratio)", "").replace(" top-|G|", "_at_golden").replace(" ", "")
            for metric, value in c.metrics().items():
                if value is not None:
                    out[f"{key}_{metric}"] = value
        out["triggers"] = float(self.counts["union"].triggers) if "union" in self.counts else 0.0
        return out


DOCUMENT_CHOICES = ("auto", "heldout", "all")


def choose_documents(choice: str, state: dict | None, shards) -> tuple[list, bool]:
    """The documents ``fm-index eval`` scores: ``heldout`` (the training run's held-out documents), ``all``, or
    ``auto`` (held-out when ``shards`` are the labels the run was trained on, else all). Returns (documents,
    whether they are the held-out ones)."""
    if choice not in DOCUMENT_CHOICES:
        raise FmIndexError(f"--documents must be auto, heldout or all, got '{choice}'")
    heldout = (state or {}).get("eval_documents")
    if choice == "heldout" and not heldout:
        raise FmIndexError("the indexer does not record held-out documents; use --documents all")
    trained_on_these = bool(heldout) and (state or {}).get("labels_config_hash") == shards.config_hash and \
        set(heldout) <= set(shards.documents)
    use_heldout = choice == "heldout" or (choice == "auto" and trained_on_these)
    return (sorted(heldout) if use_heldout else shards.documents), use_heldout


def _as_index(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.long).reshape(-1)


@dataclass
class TriggerScores:
    """One held-out trigger: each memory layer's scores sigmoid(I_L[t0, s]) over the ``n_visible`` entries, the
    golden label G and the native top-k union N (boolean masks)."""

    n_visible: int
    probs: dict[int, torch.Tensor]  # layer -> [n_visible]
    gold: torch.Tensor
    native: torch.Tensor


def trigger_scores(indexer: MemoryIndexer, shards, documents, chunk_size: int = 8192, progress=None):
    """Yield :class:`TriggerScores` for every trigger of ``documents`` (doc indices of ``shards``)."""
    layers = list(indexer.config.layers)
    device = next(indexer.parameters()).device
    was_training = indexer.training
    indexer.eval()
    try:
        for doc in documents:
            data = shards.rows([doc]).with_format("torch")[:]  # one document: all columns at once
            by_position: dict[int, dict[int, int]] = {}
            for i, (pos, layer) in enumerate(zip(data["position"].tolist(), data["layer"].tolist())):
                by_position.setdefault(int(pos), {})[int(layer)] = i
            positions = sorted(by_position)
            probs_by_layer = {}
            for L in layers:
                idx = torch.tensor([by_position[p][L] for p in positions], dtype=torch.long)
                nv = data["n_visible"][idx].long().to(device)
                keys = shards.keys(doc, L)[: int(nv.max())].to(device)
                with torch.no_grad():
                    probs_by_layer[L] = indexer.score(L, data["hidden"][idx].float().to(device),
                                                      data["position"][idx].long().to(device), keys,
                                                      chunk_size).cpu()
            for j, pos in enumerate(positions):
                i = by_position[pos][layers[0]]
                nv = int(data["n_visible"][i])
                gold = torch.zeros(nv, dtype=torch.bool)
                gold[_as_index(data["positives"][i])] = True
                native = torch.zeros(nv, dtype=torch.bool)
                native[_as_index(data["native_topk_union"][i])] = True
                yield TriggerScores(nv, {L: probs_by_layer[L][j, :nv] for L in layers}, gold, native)
            if progress is not None:
                progress(1)
    finally:
        indexer.train(was_training)


@torch.no_grad()
def evaluate_indexer(indexer: MemoryIndexer, shards, documents, threshold: float | None = None,
                     chunk_size: int = 8192, progress=None) -> EvalReport:
    """Score every trigger of ``documents`` (doc indices of ``shards``) with ``indexer``; see the module doc."""
    threshold = indexer.config.threshold if threshold is None else float(threshold)
    layers = list(indexer.config.layers)
    report = EvalReport(counts={**{f"layer {L}": Counts() for L in layers}, "union": Counts(),
                                "recency (same ratio)": Counts(), "chance (same ratio)": Counts(),
                                "union top-|G|": Counts(), "recency top-|G|": Counts(), "chance top-|G|": Counts()})

    def count_document(n):
        report.documents += n
        if progress is not None:
            progress(n)

    for trigger in trigger_scores(indexer, shards, documents, chunk_size, progress=count_document):
        nv, gold, native = trigger.n_visible, trigger.gold, trigger.native
        union = torch.zeros(nv, dtype=torch.bool)
        best = torch.zeros(nv)
        for L in layers:
            probs = trigger.probs[L]
            f = probs >= threshold
            union |= f
            best = torch.maximum(best, probs)
            report.counts[f"layer {L}"].add_auc(ranking_auc(probs, gold))
            report.counts[f"layer {L}"].add(f.sum(), (f & gold).sum(), gold.sum(), nv, native.sum(),
                                            (f & native).sum())
        k = int(union.sum())
        report.counts["union"].add(k, (union & gold).sum(), gold.sum(), nv, native.sum(), (union & native).sum())
        report.counts["union"].add_auc(ranking_auc(best, gold))
        report.counts["recency (same ratio)"].add_auc(ranking_auc(torch.arange(nv), gold))
        report.counts["chance (same ratio)"].add_auc(None if gold.all() or not gold.any() else 0.5)
        recent = torch.zeros(nv, dtype=torch.bool)
        if k:
            recent[nv - k:] = True
        report.counts["recency (same ratio)"].add(k, (recent & gold).sum(), gold.sum(), nv, native.sum(),
                                                  (recent & native).sum())
        share = k / nv if nv else 0.0
        report.counts["chance (same ratio)"].add(k, share * float(gold.sum()), gold.sum(), nv, native.sum(),
                                                 share * float(native.sum()))
        g = int(gold.sum())  # the same comparison at |F| = |G|
        top = torch.zeros(nv, dtype=torch.bool)
        if g:
            top[torch.topk(best, g, sorted=False).indices] = True
        report.counts["union top-|G|"].add(g, (top & gold).sum(), g, nv, native.sum(), (top & native).sum())
        recent = torch.zeros(nv, dtype=torch.bool)
        if g:
            recent[nv - g:] = True
        report.counts["recency top-|G|"].add(g, (recent & gold).sum(), g, nv, native.sum(),
                                             (recent & native).sum())
        share = g / nv if nv else 0.0
        report.counts["chance top-|G|"].add(g, share * g, g, nv, native.sum(), share * float(native.sum()))
    return report


class MemoryIndexerEvaluator(BaseEvaluator):
    """sentence-transformers evaluator: :func:`evaluate_indexer` on the held-out documents during training.

    Logged as ``eval_union_f1``, ``eval_layer10_recall``, ... ; primary metric ``union_f1``.
    """

    def __init__(self, shards, documents, threshold: float | None = None, chunk_size: int = 8192):
        super().__init__()
        self.shards, self.documents = shards, list(documents)
        self.threshold, self.chunk_size = threshold, chunk_size
        self.primary_metric = "union_f1"
        self.last_report: EvalReport | None = None

    def __call__(self, model, output_path: str | None = None, epoch: int = -1, steps: int = -1) -> dict[str, float]:
        from .dual_encoder import query_tower

        report = evaluate_indexer(query_tower(model).indexer, self.shards, self.documents, self.threshold,
                                  self.chunk_size)
        self.last_report = report
        return report.flat()
