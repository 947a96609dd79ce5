"""Resident-set policies: which compressed entries a trigger makes resident on the device.

Every tau decode steps (and when prefill ends) a :class:`~.session.Session` fires a *trigger*: it hands the
policy a :class:`TriggerState` and makes the returned entries the resident set of every CSA layer (entries
already resident are kept, the others fetched from the cold pool, the rest released). Between triggers,
entries born during decoding stay resident; the native Lightning Indexer picks its top-k among resident
entries only.

Policies (``Session(mode=...)`` names in brackets):

* :class:`MemoryIndexerPolicy` [``lsa``] -- FlashMemory: entries whose memory-indexer score
  I[t0, s] >= threshold at any memory layer (OR); ``max_resident`` keeps the highest-scoring ones;
* :class:`AllEntriesPolicy` [``all``] -- every visible entry (lossless; equals full decoding);
* :class:`RecentPolicy` [``recent``] -- the ``budget`` most recent entries;
* :class:`RandomPolicy` [``random``] -- ``budget`` entries drawn uniformly (seeded);
* :class:`OraclePolicy` [``oracle``] -- exactly the entries the full model's native top-k uses (any CSA layer)
  in the window the trigger serves, replayed from a full-decoding run (:func:`~.session.record_native_picks`);
* :class:`GivenEntriesPolicy` -- entries from a function of the trigger state (replayed sets, experiments);
* :class:`HiSparsePolicy` [``hisparse``] -- no triggers: the native top-k scores every entry at every step
  (K^IComp of all entries on the device) and the picks' C^Comp comes from a fixed device buffer of
  ``budget`` entries per CSA layer, misses fetched from the pool (lossless).

A new policy is a subclass with ``name``, optionally ``memory_layers`` (layers whose h_t0 and K^IComp of all
entries it needs on the device) and ``select``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .errors import FmIndexError


@dataclass
class TriggerState:
    """What a policy may look at when a trigger fires at position t0 (the last token the backbone processed).

    ``hidden[L]``: h_t0, the attention input of memory layer L at t0 ([hidden_size], device).
    ``index_keys[L]``: K^IComp of all ``n_visible`` entries at memory layer L ([n_visible, index_head_dim], device).
    ``resident``: the current resident entry indices (sorted, host int64).
    ``lead``: decode steps between t0 and the window the set serves (0, or ``prefetch_steps`` when the trigger
    fires ahead of the boundary): the set is used for positions t0 + lead + 1 .. t0 + lead + tau.
    """

    position: int
    n_visible: int
    trigger_index: int
    resident: torch.Tensor
    lead: int = 0
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    index_keys: dict[int, torch.Tensor] = field(default_factory=dict)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # filled by policies that score (diagnostics)


class ResidentPolicy(ABC):
    """Chooses the resident set at each trigger: ``select(state) -> entry indices`` (any order; < n_visible)."""

    name: str = "policy"
    memory_layers: tuple[int, ...] = ()
    per_step_buffer: int | None = None  # set by per-step policies (HiSparse): no triggers, a device buffer

    @abstractmethod
    def select(self, state: TriggerState) -> torch.Tensor: ...

    def describe(self) -> str:
        return self.name


def check_budget(budget: int | None, what: str = "budget") -> int | None:
    if budget is None:
        return None
    if int(budget) < 1:
        raise FmIndexError(f"{what} must be >= 1 entries, got {budget}")
    return int(budget)


class AllEntriesPolicy(ResidentPolicy):
    """Every visible entry: the native top-k sees exactly what full decoding sees (a lossless reference)."""

    name = "all"

    def select(self, state: TriggerState) -> torch.Tensor:
        return torch.arange(state.n_visible)


class RecentPolicy(ResidentPolicy):
    """The ``budget`` most recent entries (a recency baseline: no retrieval at all)."""

    name = "recent"

    def __init__(self, budget: int):
        self.budget = check_budget(budget)

    def select(self, state: TriggerState) -> torch.Tensor:
        return torch.arange(max(0, state.n_visible - self.budget), state.n_visible)

    def describe(self) -> str:
        return f"recent (budget {self.budget})"


class RandomPolicy(ResidentPolicy):
    """``budget`` entries drawn uniformly without replacement (seeded, so runs repeat)."""

    name = "random"

    def __init__(self, budget: int, seed: int = 0):
        self.budget = check_budget(budget)
        self.generator = torch.Generator().manual_seed(int(seed))

    def select(self, state: TriggerState) -> torch.Tensor:
        if state.n_visible <= self.budget:
            return torch.arange(state.n_visible)
        return torch.randperm(state.n_visible, generator=self.generator)[: self.budget]

    def describe(self) -> str:
        return f"random (budget {self.budget})"


class GivenEntriesPolicy(ResidentPolicy):
    """Entries given by ``entries_for(state)`` (e.g. an oracle replaying what the full model will pick)."""

    name = "given"

    def __init__(self, entries_for: Callable[[TriggerState], torch.Tensor], budget: int | None = None,
                 name: str = "given"):
        self.entries_for = entries_for
        self.budget = check_budget(budget)
        self.name = name

    def select(self, state: TriggerState) -> torch.Tensor:
        ids = torch.as_tensor(self.entries_for(state), dtype=torch.long).reshape(-1)
        if self.budget is not None and ids.numel() > self.budget:
            ids = ids[: self.budget]  # the caller's order is its priority
        return ids


class OraclePolicy(ResidentPolicy):
    """The entries full decoding's native top-k will read: union over the queries t0+1 .. t0+tau that the trigger
    at t0 serves (shifted by ``state.lead`` when it fires ahead), and over all CSA layers, of the recorded picks
    (restricted to s < n_visible(t0); entries born later are resident anyway). Lossless by construction when
    decoding follows the recorded tokens (greedy).

    ``picks_by_position[t]``: int64 entry indices picked for the query at position t (all CSA layers).
    ``budget`` keeps the entries picked most often (by most layers and queries), ties to the more recent.
    """

    name = "oracle"

    def __init__(self, picks_by_position: dict[int, torch.Tensor], tau: int, budget: int | None = None):
        self.picks_by_position = picks_by_position
        self.tau = int(tau)
        self.budget = check_budget(budget)

    def select(self, state: TriggerState) -> torch.Tensor:
        first = state.position + state.lead + 1
        window = [self.picks_by_position[t] for t in range(first, first + self.tau) if t in self.picks_by_position]
        if not window:
            return torch.zeros(0, dtype=torch.long)
        picks = torch.cat(window)
        picks = picks[(picks >= 0) & (picks < state.n_visible)]
        if self.budget is None:
            return torch.unique(picks)
        counts = torch.bincount(picks, minlength=state.n_visible).double()
        # ties go to the more recent entry: a fraction < 1 that grows with the entry index
        counts += torch.arange(state.n_visible, dtype=torch.double) / (2.0 * max(state.n_visible, 1))
        top = counts.topk(min(self.budget, int((counts >= 1).sum()))).indices
        return top

    def describe(self) -> str:
        cap = f", budget {self.budget}" if self.budget else ""
        return f"oracle (native top-k of full decoding{cap})"


class HiSparsePolicy(ResidentPolicy):
    """Lossless per-step scheme: every step the native top-k runs over all entries; a fixed device buffer of
    ``budget`` C^Comp rows per CSA layer (least recently used eviction) serves the picks, misses are fetched.
    ``select`` is never called (there are no triggers)."""

    name = "hisparse"

    def __init__(self, budget: int):
        self.per_step_buffer = check_budget(budget)

    def select(self, state: TriggerState) -> torch.Tensor:  # pragma: no cover - no triggers in per-step mode
        raise RuntimeError("HiSparsePolicy has no triggers")

    def describe(self) -> str:
        return f"hisparse (buffer {self.per_step_buffer} entries)"


class MemoryIndexerPolicy(ResidentPolicy):
    """FlashMemory's selection: fetched(t0) = { s < n_visible : I_L[t0, s] >= threshold for some memory layer L }.

    I_L is the memory indexer's gated score (DESIGN.md, "Memory indexer math"): sigmoid of the native formula
    with its own W_DQ, W_IUQ and W_w applied to h_t0 of layer L, against layer L's frozen K^IComp.
    ``max_resident`` caps the set: the entries with the highest score (max over layers) are kept.
    """

    name = "lsa"

    def __init__(self, memory_indexer, threshold: float = 0.5, max_resident: int | None = None):
        if not 0.0 < float(threshold) < 1.0:
            raise FmIndexError(f"threshold must be in (0, 1), got {threshold}")
        self.memory_indexer = memory_indexer
        self.threshold = float(threshold)
        self.max_resident = check_budget(max_resident, "max_resident")
        self.memory_layers = memory_indexer_layers(memory_indexer)

    def select(self, state: TriggerState) -> torch.Tensor:
        best = None
        if state.n_visible > 0 and self.memory_layers:
            # all memory layers' towers in one batched pass, then one scoring launch per layer
            logits = self.memory_indexer.trigger_logits(state.hidden, state.position, state.index_keys,
                                                        state.n_visible)
            for layer in self.memory_layers:
                score = torch.sigmoid(logits[layer])
                state.scores[layer] = score
                best = score if best is None else torch.maximum(best, score)
        if best is None or best.numel() == 0:
            return torch.zeros(0, dtype=torch.long)
        chosen = torch.nonzero(best >= self.threshold).reshape(-1)
        if self.max_resident is not None and chosen.numel() > self.max_resident:
            top = best[chosen].topk(self.max_resident).indices
            chosen = chosen[top]
        return chosen.cpu()

    def describe(self) -> str:
        cap = f", max_resident {self.max_resident}" if self.max_resident else ""
        return f"lsa (threshold {self.threshold:g}, layers {list(self.memory_layers)}{cap})"


def memory_indexer_layers(memory_indexer) -> tuple[int, ...]:
    """The layers of a :class:`~.memory_indexer.MemoryIndexer` (its config's sorted layer list)."""
    return tuple(int(x) for x in memory_indexer.config.layers)
