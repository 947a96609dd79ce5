"""Trigger policies: which compressed entries a trigger makes resident on the device, and the one map from a
Session mode to its policy (:func:`make_policy`).

Every tau decode steps (and when prefill ends) a :class:`~.session.Session` fires a *trigger*: it hands the
policy a :class:`TriggerState` and makes the returned entries the resident set
(:class:`~.residency.ResidentSet`: entries already resident are kept, the others fetched from the cold pool, the
rest released). Between triggers, entries born during decoding stay resident; the native Lightning Indexer of
every CSA layer picks its top-k among resident entries only.

Policies (``SessionConfig.mode`` names in brackets):

* :class:`MemoryIndexerPolicy` [``lsa``] -- FlashMemory: entries whose memory-indexer score
  I[t0, s] >= threshold at any memory layer (OR); a budget keeps the highest-scoring ones;
* :class:`AllEntriesPolicy` [``all``] -- every visible entry (lossless; equals full decoding);
* :class:`RecentPolicy` [``recent``] -- the ``budget`` most recent entries;
* :class:`RandomPolicy` [``random``] -- ``budget`` entries drawn uniformly (seeded);
* :class:`OraclePolicy` [``oracle``] -- exactly the entries the full model's native top-k uses (any CSA layer)
  in the window the trigger serves, replayed from a full-decoding run (:func:`record_native_picks`);
* :class:`GivenEntriesPolicy` -- entries from a function of the trigger state (replayed sets, experiments).

Modes ``full`` (the stock cache) and ``hisparse`` (per-step fetches, :mod:`~.hisparse`) have no triggers, hence
no policy. A new policy is a subclass with ``name``, optionally ``memory_layers`` (layers whose h_t0 and K^IComp
of all entries it needs on the device) and ``select``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .config import (TRAINED_DISTANCE, SessionConfig, SessionError, check_budget, check_count, check_distance_cap,
                     check_ensemble, check_neighbours, check_page_ties, check_pages, check_threshold)


@dataclass
class TriggerState:
    """What a policy may look at when a trigger fires at position t0 (the last token the backbone processed).

    ``hidden[L]``: h_t0, the attention input of memory layer L at t0 ([hidden_size], device).
    ``index_keys[L]``: K^IComp of all ``n_visible`` entries at memory layer L ([n_visible, index_head_dim], device).
    ``resident``: the current resident entry indices (sorted int64; on the host, on the device for a static row).
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

    @abstractmethod
    def select(self, state: TriggerState) -> torch.Tensor: ...

    def max_selected(self) -> int | None:
        """An upper bound on the entries one :meth:`select` returns (None: none below n_visible). The static-shape
        step sizes its resident slots by it."""
        return getattr(self, "budget", None) if type(self).select in _BUDGETED_SELECTS else None

    def describe(self) -> str:
        return self.name


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
    ``budget`` keeps the entries picked by the most queries of the window (each query's picks are one union over the
    CSA layers, so a layer count does not weigh in), ties to the more recent.
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


class MemoryIndexerPolicy(ResidentPolicy):
    """FlashMemory's selection, as the authors' release builds it:

        resident(t0) = { s < n_visible : E(I_L[t0, s] over memory layers L) >= threshold }
                       + the newest ``keep_recent`` entries (recency tail) + the first ``keep_first`` (sink)
                       [+ each memory layer's ``fetch_top`` best-scored entries: our floor, not the release's]
                       [+ the ``fetch_neighbours`` entries on either side of each selected one: ours]

    I_L is the memory indexer's gated score (DESIGN.md, "Memory indexer math"): sigmoid of the native formula
    with its own W_DQ, W_IUQ and W_w applied to h_t0 of layer L, against layer L's frozen K^IComp. E is the max
    over layers (``ensemble="max"``: the OR rule) or their mean. ``fetch_top`` (0: off, the release's rule) adds
    per layer the entries of its ``fetch_top`` highest scores (ties to the lower index) whatever their score: a
    fixed absolute threshold fetches almost nothing where the scores run low, as on prompts unlike the training
    documents (docs/RESULTS.md, section 10). ``budget`` caps the set: the tail and the sink stay, and of the
    other selected entries (floor included) those with the highest E fill the rest.

    Neighbours (``fetch_neighbours`` W > 0; ours, off by default): every selected entry s (threshold or floor; not the
    tail or the sink) brings s - W .. s + W, so a needle's value comes with the entries around it (its key phrase,
    its last digits), which the native top-k reads together and which a single fetched entry lacks
    (docs/RESULTS.md sections 11 and 11s); a finer form of what page recall's whole pages bring. Under a ``budget``
    each such entry ranks by the highest E of the selected entries within W of it.

    Page recall (``page_size`` P > 0 and ``max_pages`` K > 0; the release's deployment, ``SGLANG_PATHP_PAGE_RECALL``):
    the entries are cut into pages of P (page p holds p*P .. p*P + P - 1), a page's score is how many of its
    entries the rule above selects (threshold, and the floor when on), the pages holding the recency tail or the
    sink rank first, and the resident set is every entry of the K best pages (ties to the more recent page; pages
    that select nothing fill the rest, as the release's top-K does). ``page_ties="score"`` (ours) breaks a tie by
    the page's best E first, then recency: where most pages hold one selected entry, the release's rule keeps the
    newest of them and drops an old page whose one entry scored highest (a needle's, docs/RESULTS.md section 11k).
    Selected entries outside those pages stay in the cold pool. Whole pages bring the entries around each selected
    one (a needle's key phrase beside its value, docs/RESULTS.md section 11) and make fetches contiguous.

    Distance cap (``distance_cap`` D tokens; None: off, as the release): entries farther than D from the trigger are
    scored as if D away (:meth:`~.memory_indexer.MemoryIndexer.capped_keys`), for contexts longer than the tower's
    training documents, where the rotary part of q . k alone lifts far entries over the threshold (RESULTS 11g).
    ``"trained"``: D is the export's ``trained_distance``, the longest distance its training labels hold.
    """

    name = "lsa"

    def __init__(self, memory_indexer, threshold: float = 0.5, budget: int | None = None, keep_recent: int = 0,
                 keep_first: int = 0, ensemble: str = "max", fetch_top: int = 0, page_size: int = 0,
                 max_pages: int = 0, distance_cap: int | None = None, page_ties: str = "recent",
                 fetch_neighbours: int = 0):
        self.memory_indexer = memory_indexer
        self.threshold = check_threshold(threshold)
        self.budget = check_budget(budget)
        self.keep_recent, self.keep_first = check_count(keep_recent, "keep_recent"), check_count(keep_first,
                                                                                                "keep_first")
        self.ensemble = check_ensemble(ensemble)
        self.fetch_top = check_count(fetch_top, "fetch_top")
        self.page_size, self.max_pages = check_pages(page_size, max_pages)
        self.page_ties = check_page_ties(page_ties)
        self.fetch_neighbours = check_neighbours(fetch_neighbours, self.page_size)
        cap = check_distance_cap(distance_cap)
        self.distance_cap = trained_distance_cap(memory_indexer) if cap == TRAINED_DISTANCE else cap
        if self.page_size and self.budget is not None:
            raise SessionError("page recall (page_size, max_pages) bounds the set by whole pages: give it no budget")
        self.memory_layers = tuple(int(x) for x in memory_indexer.config.layers)

    def select(self, state: TriggerState) -> torch.Tensor:
        n = state.n_visible
        if n <= 0:
            return torch.zeros(0, dtype=torch.long)
        scores = None
        if self.memory_layers:
            # all memory layers' towers in one batched pass, then one scoring launch per layer
            cap = {"distance_cap": self.distance_cap} if self.distance_cap else {}  # off: the plain call, as before
            logits = self.memory_indexer.trigger_logits(state.hidden, state.position, state.index_keys, n, **cap)
            for layer in self.memory_layers:
                state.scores[layer] = torch.sigmoid(logits[layer])
            stacked = torch.stack([state.scores[layer] for layer in self.memory_layers])
            scores = stacked.amax(0) if self.ensemble == "max" else stacked.mean(0)
        selected = scores >= self.threshold if scores is not None else torch.zeros(n, dtype=torch.bool)
        if self.fetch_top and self.memory_layers:
            for layer in self.memory_layers:
                selected[top_entries(state.scores[layer], self.fetch_top).to(selected.device)] = True
        forced = torch.zeros(n, dtype=torch.bool, device=selected.device)
        forced[max(0, n - self.keep_recent):] = True
        forced[: min(self.keep_first, n)] = True
        if self.page_size:
            return self._pages(selected, forced, scores)
        if self.fetch_neighbours and scores is not None:
            selected, scores = self._widened(selected, scores)
        keep = selected | forced
        if self.budget is not None and int(keep.sum()) > self.budget:
            extra = torch.nonzero(selected & ~forced).reshape(-1)
            room = max(0, self.budget - int(forced.sum()))
            keep = forced.clone()
            keep[extra[scores[extra].topk(min(room, extra.numel())).indices]] = True
        return torch.nonzero(keep).reshape(-1).cpu()

    def _widened(self, selected: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The selection with every entry within ``fetch_neighbours`` of a selected one, and each entry's rank score:
        the highest E of the selected entries within its reach (a max over a window of 2W + 1)."""
        w = self.fetch_neighbours
        reach = torch.where(selected, scores.float(), torch.tensor(float("-inf"), device=scores.device))
        reach = torch.nn.functional.max_pool1d(reach[None, None], 2 * w + 1, stride=1, padding=w)[0, 0]
        return reach > float("-inf"), reach

    def _pages(self, selected: torch.Tensor, forced: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
        """Every entry of the ``max_pages`` pages that hold the tail or the sink or the most selected entries."""
        n, size = selected.numel(), self.page_size
        n_pages = -(-n // size)
        pad = n_pages * size - n
        counts = torch.nn.functional.pad(selected.float(), (0, pad)).reshape(n_pages, size).sum(1).double().cpu()
        held = torch.nn.functional.pad(forced.float(), (0, pad)).reshape(n_pages, size).amax(1).cpu() > 0
        # forced pages first (the bonus size + 1 outranks any count), then the count
        rank = counts + held.double() * (size + 1)
        # the ties, by stable sorts from the last key to the first: the newer page, under the score rule first the
        # page's best E
        order = torch.arange(n_pages - 1, -1, -1)
        if self.page_ties == "score" and scores is not None:
            best = torch.nn.functional.pad(scores.detach().float().cpu(), (0, pad), value=float("-inf"))
            order = order[torch.sort(best.reshape(n_pages, size).amax(1)[order], descending=True, stable=True).indices]
        pages = order[torch.sort(rank[order], descending=True, stable=True).indices][: min(self.max_pages, n_pages)]
        entries = (pages[:, None] * size + torch.arange(size)).reshape(-1)
        return torch.sort(entries[entries < n]).values

    def max_selected(self) -> int | None:
        # the budget caps the scored entries; the recency tail and the sink stay whatever the budget
        if self.page_size:
            return self.page_size * self.max_pages
        return None if self.budget is None else max(self.budget, self.keep_recent + self.keep_first)

    def describe(self) -> str:
        cap = f", budget {self.budget}" if self.budget else ""
        indices = self.memory_indexer.config.csa_indices
        csa = f" = CSA indices {', '.join(map(str, indices))}" if indices else ""
        tail = f", recency tail {self.keep_recent}" if self.keep_recent else ""
        sink = f", sink {self.keep_first}" if self.keep_first else ""
        rule = "" if self.ensemble == "max" else ", mean over layers"
        rule += f", top {self.fetch_top} per layer" if self.fetch_top else ""
        rule += f", {self.fetch_neighbours} neighbours each side" if self.fetch_neighbours else ""
        rule += f", {self.max_pages} pages of {self.page_size}" if self.page_size else ""
        rule += ", page ties by score" if self.page_size and self.page_ties == "score" else ""
        rule += f", distances capped at {self.distance_cap}" if self.distance_cap else ""
        return (f"lsa (threshold {self.threshold:g}{rule}, layers {', '.join(map(str, self.memory_layers))}{csa}"
                f"{tail}{sink}{cap})")


def trained_distance_cap(memory_indexer) -> int:
    """The distance cap ``"trained"`` stands for: the memory indexer's ``trained_distance`` (tokens), which
    ``fm-index train`` records and its export carries; an indexer without it is refused (no guess)."""
    distance = int(getattr(memory_indexer.config, "trained_distance", 0) or 0)
    if distance < 1:
        raise SessionError(f"distance_cap '{TRAINED_DISTANCE}' (--distance-cap {TRAINED_DISTANCE}): this memory "
                           "indexer records no training distance (trained before fm-index recorded it, or the authors' checkpoint); "
                           "give the length of its training documents in tokens instead, e.g. --distance-cap 65536")
    return distance


def top_entries(scores: torch.Tensor, m: int) -> torch.Tensor:
    """Indices of the ``m`` highest of ``scores`` [n] (all when n <= m), ties to the lower index."""
    return torch.argsort(-scores, stable=True)[:m]


# the built-in selections that never return more than their ``budget`` entries (a subclass overriding select is
# not assumed to)
_BUDGETED_SELECTS = (RecentPolicy.select, RandomPolicy.select, GivenEntriesPolicy.select, OraclePolicy.select)


def resolved_neighbours(config: SessionConfig, export) -> int:
    """Mode lsa's ``fetch_neighbours``: the config's, else the export's (``export``: its MemoryIndexerConfig), except
    under page recall asked for in the config, which brings whole pages instead."""
    if config.fetch_neighbours is not None:
        return config.fetch_neighbours
    return 0 if config.page_size else int(export.fetch_neighbours)


def make_policy(config: SessionConfig, memory_indexer=None, native_picks: dict | None = None) -> ResidentPolicy | None:
    """The trigger policy of ``config.mode`` (None for ``full`` and ``hisparse``: no triggers).

    ``memory_indexer``: a loaded :class:`~.memory_indexer.MemoryIndexer` (mode ``lsa``); ``native_picks``: the
    native top-k picks of a full run by query position (mode ``oracle``, from :func:`record_native_picks`).
    ``config`` must be resolved (tau and threshold set, :meth:`SessionConfig.resolved`).
    """
    mode, budget = config.mode, config.budget
    if mode in ("full", "hisparse"):
        return None
    if mode == "lsa":
        if memory_indexer is None:
            raise SessionError("mode 'lsa' needs an exported memory indexer: indexer=DIR (--indexer DIR), the output "
                               "of `fm-index export`; or use mode 'full'")
        export = memory_indexer.config
        return MemoryIndexerPolicy(
            memory_indexer, threshold=config.threshold, budget=budget,
            keep_recent=export.keep_recent if config.keep_recent is None else config.keep_recent,
            keep_first=export.keep_first if config.keep_first is None else config.keep_first,
            ensemble=export.ensemble if config.ensemble is None else config.ensemble,
            fetch_top=export.fetch_top if config.fetch_top is None else config.fetch_top,
            page_size=config.page_size, max_pages=config.max_pages, distance_cap=config.distance_cap,
            page_ties=config.page_ties, fetch_neighbours=resolved_neighbours(config, export))
    if mode == "all":
        return AllEntriesPolicy()
    if mode == "recent":
        return RecentPolicy(budget)
    if mode == "random":
        return RandomPolicy(budget, seed=config.seed)
    if native_picks is None:  # mode == "oracle"
        raise SessionError("mode 'oracle' needs the native top-k picks of a full run (record_native_picks)")
    return OraclePolicy(native_picks, tau=config.tau, budget=budget)


def record_native_picks(session, prompt, max_new_tokens: int, **generate_options):
    """Decode with ``session`` (a ``mode="full"`` Session) and record, for every decode query position t, the
    entries the native top-k picked at any CSA layer. Returns ``(Generation, {t: int64 entry indices})``: the
    input of :class:`OraclePolicy`."""
    if session.config.mode != "full" or session.policy is not None:
        raise SessionError("record_native_picks needs a mode='full' Session (the stock model's own picks)")
    if session.static_decode:  # the static step computes its picks itself; the stock indexer's hook sees none
        raise SessionError("record_native_picks needs static_decode=False (the stock decode path)")
    picks: dict[int, list[torch.Tensor]] = {}

    def on_picks(module, args, output):
        if output.shape[1] == 1:  # decode queries only; prefill queries are served by prefill itself
            position = int(args[2].reshape(-1)[-1])
            chosen = output.reshape(-1)
            picks.setdefault(position, []).append(chosen[chosen >= 0].cpu())

    handles = [session.decoder.layers[idx].self_attn.compressor.indexer.register_forward_hook(on_picks)
               for idx in session.csa_layers]
    try:
        out = session.generate(prompt, max_new_tokens=max_new_tokens, **generate_options)
    finally:
        for handle in handles:
            handle.remove()
    return out, {t: torch.unique(torch.cat(parts)) for t, parts in picks.items()}
