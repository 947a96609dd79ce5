"""The options of a decoding :class:`~.session.Session` and of its sampling, as frozen dataclasses validated once.

``SessionConfig`` says how a Session keeps the KV state (the mode, FlashMemory's trigger period tau and fetch
threshold, the resident budget, where the memory layers' keys live, prefetch, CUDA graphs); ``SamplingParams``
says how a token is drawn from the logits. Every field is checked in ``__post_init__`` with a message that names
the option, so nothing downstream re-validates; :meth:`SessionConfig.resolved` fills tau and the threshold from a
memory-indexer export.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .errors import FmIndexError

# Session modes: how the CSA entries are kept (see policies.make_policy and docs/DESIGN.md, "Session").
MODES = ("lsa", "full", "all", "recent", "random", "oracle", "hisparse")
BUDGETED_MODES = ("recent", "random", "hisparse")  # modes that need a budget
STATIC_TRIGGER_MODES = ("lsa", "recent", "random", "oracle")  # static by default on one GPU with a budget
DEFAULT_TAU = 64
DEFAULT_THRESHOLD = 0.5
MEMORY_KEYS = ("device", "pool")
POOL_STORAGE = ("model", "fp8")  # the cold pool's host rows (cold_pool.POOL_STORAGE)


class SessionError(FmIndexError):
    """A Session option or input the user can fix (mode, tau, threshold, prompt, indexer export). Messages name
    the option as ``SessionConfig`` does and, in brackets, as ``fm-index generate`` does."""


def check_tau(tau) -> int:
    """tau: decode steps between triggers, an integer >= 1."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or int(tau) != tau or int(tau) < 1:
        raise SessionError(f"tau (--tau) must be an integer >= 1 (decode steps between triggers), got {tau}")
    return int(tau)


def check_threshold(threshold) -> float:
    """The memory-indexer score I[t, s] an entry needs to be fetched, in (0, 1)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < float(threshold) < 1.0:
        raise SessionError(f"threshold (--threshold) must be in (0, 1), got {threshold}")
    return float(threshold)


def check_count(value, what: str) -> int:
    """A number of entries >= 0 (the recency tail, the sink)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or int(value) < 0:
        raise SessionError(f"{what} (--{what.replace('_', '-')}) must be >= 0 entries, got {value}")
    return int(value)


# distance_cap's value for "the longest distance the memory indexer was trained at", read from its export
# (MemoryIndexerConfig.trained_distance) when the policy is made
TRAINED_DISTANCE = "trained"


def check_distance_cap(value) -> int | str | None:
    """The memory indexer's distance cap: None or 0 (off), a positive number of tokens, or ``"trained"`` (the
    export's ``trained_distance``). A string of digits (the command line's) counts as its number."""
    if value is None or value == TRAINED_DISTANCE:
        return value
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or int(value) < 0:
        raise SessionError(f"distance_cap (--distance-cap) must be a number of tokens >= 1 (0: off) or "
                           f"'{TRAINED_DISTANCE}' (the export's training distance), got {value!r}")
    return int(value) or None


def check_pages(page_size, max_pages) -> tuple[int, int]:
    """Page recall's (page_size, max_pages): both > 0 (on) or both 0 (off)."""
    page_size, max_pages = check_count(page_size, "page_size"), check_count(max_pages, "max_pages")
    if bool(page_size) != bool(max_pages):
        raise SessionError(f"page recall needs both page_size (--page-size) and max_pages (--max-pages) > 0, or "
                           f"neither; got {page_size} and {max_pages}")
    return page_size, max_pages


def check_neighbours(fetch_neighbours, page_size: int = 0) -> int:
    """The entries on either side of each selected entry that come with it (0: off); not with page recall."""
    fetch_neighbours = check_count(fetch_neighbours, "fetch_neighbours")
    if fetch_neighbours and page_size:
        raise SessionError("fetch_neighbours (--fetch-neighbours) widens single entries; page recall (page_size) "
                           "already brings whole pages: use one or the other")
    return fetch_neighbours


PAGE_TIES = ("recent", "score")  # page recall: equal counts go to the newer page (the release) or the best-scored


def check_page_ties(page_ties) -> str:
    """Page recall's tie rule between pages of equal count: ``recent`` (the release's) or ``score``."""
    if page_ties not in PAGE_TIES:
        raise SessionError(f"page_ties (--page-ties) must be 'recent' or 'score', got {page_ties!r}")
    return page_ties


ENSEMBLES = ("max", "mean")  # how the memory layers' scores combine: OR of thresholds (max) or their mean


def check_ensemble(ensemble) -> str:
    if ensemble not in ENSEMBLES:
        raise SessionError(f"ensemble (--ensemble) must be max or mean, got {ensemble!r}")
    return ensemble


def check_budget(budget) -> int | None:
    """A number of resident entries (None: no cap)."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or int(budget) != budget or int(budget) < 1:
        raise SessionError(f"budget (--budget) must be >= 1 entries, got {budget}")
    return int(budget)


@dataclass(frozen=True)
class SessionConfig:
    """How a Session decodes. Fields (all validated here):

    * ``mode``: ``lsa`` (FlashMemory's memory indexer selects the resident set every tau steps; needs an indexer),
      ``full`` (plain DeepSeek-V4, every entry on the device: the baseline), ``all`` (every visible entry resident
      through the LSA path: lossless), ``recent`` / ``random`` (``budget`` entries per trigger), ``oracle`` (the
      entries full decoding's native top-k reads, replayed from a recorded full run), ``hisparse`` (no triggers:
      the native top-k over every entry at every step, the picks' KV served by a device buffer of ``budget``
      entries per CSA layer);
    * ``tau``: decode steps between triggers (None: the export's, else 64);
    * ``threshold``: the memory-indexer score an entry needs, in (0, 1) (None: the export's, else 0.5);
    * ``budget``: resident entries per trigger (lsa: a cap keeping the highest scores; recent/random/oracle: the
      set's size) or buffer entries per CSA layer (hisparse);
    * ``chunk_size``: prefill chunk in tokens (chunks shrink as the context grows, see ``max_score_bytes``);
    * ``max_score_bytes``: the most bytes a prefill chunk's score tensors may take; longer contexts get shorter
      chunks;
    * ``seed``: the random policy's seed (an integer);
    * ``memory_keys``: where the memory layers' K^IComp of every entry lives between triggers, ``device`` or
      ``pool`` (streamed to the device at each trigger);
    * ``prefetch_steps``: d in 0..tau-1; each trigger after the first is prepared d steps before its window on a
      helper thread (the static step: on a side CUDA stream of the decode thread while the next step runs; 0: at
      the window boundary, synchronously);
    * ``decode_graphs``: replay the backbone's stateless decode modules as CUDA graphs (None: where the model is
      on a CUDA device);
    * ``keep_recent`` / ``keep_first`` / ``ensemble`` (mode lsa; None: the export's): the recency tail (the newest
      entries, always resident), the sink (the first entries, always resident), and how the memory layers'
      scores combine (``max``: the OR rule; ``mean``), as the authors' release builds the resident set;
    * ``fetch_top`` (mode lsa; None: the export's, 0 unless it was exported with one): a floor under the
      threshold, each memory layer's ``fetch_top`` best-scored entries fetched whatever their score (the release
      has none: its threshold alone; docs/RESULTS.md, section 10, shows a needle scored below it at 32K);
    * ``fetch_neighbours`` (mode lsa; None: the export's, 0 = off as the release unless it was exported with one):
      each entry the threshold or the floor selects brings the ``fetch_neighbours`` entries on either side of it
      (ours; a needle's value without the entries beside it is misread, docs/RESULTS.md sections 11 and 11s);
      under a ``budget`` a neighbour ranks by the best score within its reach; not with page recall, which brings
      whole pages (page recall asked for here overrides an export's neighbours);
    * ``page_size`` / ``max_pages`` (mode lsa; 0 / 0: off, single entries): page recall as the release deploys it,
      the resident set is every entry of the ``max_pages`` pages of ``page_size`` entries that hold the recency tail
      or the sink or the most selected entries (:class:`~.policies.MemoryIndexerPolicy`); not with a ``budget`` in
      mode lsa; the other modes ignore it;
    * ``page_ties`` (with page recall): which of the pages with equal selected counts stay: ``recent`` (the newer,
      the release's top-K) or ``score`` (the one whose best entry has the higher memory score, then the newer;
      ours, docs/RESULTS.md section 11n);
    * ``distance_cap`` (mode lsa; None: off, as the release): entries farther than this many tokens from a trigger
      are scored by the memory indexer as if this far (the rotary part of q . k at a distance it was trained at;
      :class:`~.policies.MemoryIndexerPolicy`), for contexts longer than its training documents (docs/RESULTS.md,
      section 11g); set it to the training documents' length, or ``"trained"``: the longest distance the export's
      training labels hold (``trained_distance`` in its ``lsa_config.json``; exports written before it have none);
    * ``pool_storage``: how the cold pool holds entries on the host: ``model`` (the model's dtype, exact) or
      ``fp8`` (e4m3 with one power-of-two scale per 64 values, stored as fp32: 0.53x of bf16 host memory, fetched
      rows rounded to e4m3);
    * ``max_batch``: how many sequences decode together when ``generate``/``stream`` get a list of prompts; the
      others wait and join as sequences finish (continuous batching). Each keeps its own cache, cold pool,
      resident set, triggers and stats.
    * ``static_decode``: decode through the static-shape step (:mod:`~.static_runner`): fixed-capacity stores for
      ``max_batch`` rows, the whole step one CUDA graph on a GPU (layers eager). Same tokens as the stock path
      (mode full: fp32 on a CPU and the H200; bf16 up to near ties; tests/test_batching.py). In the trigger modes
      (lsa, recent, random, oracle, all) the CSA layers hold ``budget`` + tau/4 + 2 resident slots per row (every
      entry without a budget; + prefetch_steps/4 + 1 with prefetch), triggers run between steps (or on the
      decode thread's side stream with ``prefetch_steps``, while the next step runs, installed at the boundary);
      same tokens as the cold-pool path (CPU, tests/test_static_residency.py; the H200 too). None (the default): on
      where it pays off and was tested, one CUDA device, nothing offloaded, weights not kept in FP8/FP4, and mode
      ``full`` or a trigger mode (lsa, recent, random, oracle) with a ``budget`` (it bounds the slots a row holds;
      mode lsa without one would keep a slot for every entry, so it keeps the stock path), ``pool_storage="model"``
      and ``memory_keys="device"``;
      False: the stock per-sequence path (transformers' own decode, the numerical reference); True: also on a
      CPU (no graph) and in the other cases.
    * ``static_compile``: with the static step, its decoder layers compiled (:mod:`~.compiled_step`: one graph per
      layer kind; H200, 512K, batch 1: 16.3 ms a step against 54.5 ms with eager layers). Compiling costs 25-99 s
      on the H200 for each batch size and capacity, so a call's capacity is rounded up to a bucket that later calls
      reuse (four per doubling, at least 4,096 tokens: above 16K at most 25% more slots); worth it for long or
      repeated generations, not for one short call. Compiling is per model: every static step on it (any Session)
      runs compiled afterwards; other caches keep the eager layers.
    """

    mode: str = "lsa"
    tau: int | None = None
    threshold: float | None = None
    budget: int | None = None
    chunk_size: int = 512
    seed: int = 0
    max_score_bytes: int = 1 << 30
    memory_keys: str = "device"
    prefetch_steps: int = 0
    decode_graphs: bool | None = None
    keep_recent: int | None = None
    keep_first: int | None = None
    ensemble: str | None = None
    fetch_top: int | None = None
    fetch_neighbours: int | None = None
    page_size: int = 0
    max_pages: int = 0
    page_ties: str = "recent"
    distance_cap: int | str | None = None
    pool_storage: str = "model"
    max_batch: int = 8
    static_decode: bool | None = None
    static_compile: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise SessionError(f"unknown mode '{self.mode}' (use one of {', '.join(MODES)})")
        if self.tau is not None:
            object.__setattr__(self, "tau", check_tau(self.tau))
        if self.threshold is not None:
            object.__setattr__(self, "threshold", check_threshold(self.threshold))
        object.__setattr__(self, "budget", check_budget(self.budget))
        if self.mode in BUDGETED_MODES and self.budget is None:
            unit = "buffer entries per CSA layer" if self.mode == "hisparse" else "resident entries per trigger"
            raise SessionError(f"mode '{self.mode}' needs a budget: budget=N (--budget N), the {unit}")
        if isinstance(self.chunk_size, bool) or int(self.chunk_size) != self.chunk_size or int(self.chunk_size) < 1:
            raise SessionError(f"chunk_size (--chunk-size) must be >= 1 token, got {self.chunk_size}")
        object.__setattr__(self, "chunk_size", int(self.chunk_size))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise SessionError(f"seed (--seed) must be an integer, got {self.seed!r}")
        if isinstance(self.max_score_bytes, bool) or not isinstance(self.max_score_bytes, int) \
                or self.max_score_bytes < 1:
            raise SessionError(f"max_score_bytes must be a positive integer, got {self.max_score_bytes!r}")
        if self.decode_graphs not in (None, True, False):
            raise SessionError(f"decode_graphs must be True, False or None, got {self.decode_graphs!r}")
        for name in ("keep_recent", "keep_first", "fetch_top"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, check_count(getattr(self, name), name))
        if self.ensemble is not None:
            check_ensemble(self.ensemble)
        page_size, max_pages = check_pages(self.page_size, self.max_pages)
        object.__setattr__(self, "page_size", page_size)
        object.__setattr__(self, "max_pages", max_pages)
        check_page_ties(self.page_ties)
        object.__setattr__(self, "distance_cap", check_distance_cap(self.distance_cap))
        if self.fetch_neighbours is not None:
            object.__setattr__(self, "fetch_neighbours", check_neighbours(self.fetch_neighbours, page_size))
        if page_size and self.mode == "lsa" and self.budget is not None:
            raise SessionError("page recall (page_size, max_pages) bounds the set by whole pages: give it no budget")
        if self.pool_storage not in POOL_STORAGE:
            raise SessionError(f"pool_storage (--pool-storage) must be 'model' or 'fp8', got {self.pool_storage!r}")
        if self.memory_keys not in MEMORY_KEYS:
            raise SessionError(f"memory_keys (--memory-keys) must be 'device' or 'pool', got {self.memory_keys!r}")
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise SessionError(f"max_batch (--batch) must be an integer >= 1, got {self.max_batch!r}")
        if self.static_decode is not None and not isinstance(self.static_decode, bool):
            raise SessionError(f"static_decode must be True, False or None, got {self.static_decode!r}")
        if not isinstance(self.static_compile, bool):
            raise SessionError(f"static_compile must be True or False, got {self.static_compile!r}")
        if self.static_compile and self.static_decode is False:
            raise SessionError("static_compile compiles the static step: it needs static_decode (not False)")
        if self.static_decode and self.mode == "hisparse":
            raise SessionError("static_decode does not run mode 'hisparse' (its per-step fetch changes the candidates "
                               "every step); use mode full, lsa, recent, random, oracle or all")
        tau = self.tau if self.tau is not None else DEFAULT_TAU
        if isinstance(self.prefetch_steps, bool) or not isinstance(self.prefetch_steps, int) \
                or not 0 <= self.prefetch_steps < tau:
            raise SessionError(f"prefetch_steps (--prefetch-steps) must be an integer in 0..tau-1 = 0..{tau - 1} "
                               f"(decode steps before the window boundary at which the next set is prepared), got "
                               f"{self.prefetch_steps!r}")

    def resolved(self, tau: int | None = None, threshold: float | None = None) -> "SessionConfig":
        """This config with tau / threshold filled from an export's values (or the defaults) where not given."""
        return replace(self, tau=self.tau if self.tau is not None else (tau or DEFAULT_TAU),
                       threshold=self.threshold if self.threshold is not None else (threshold or DEFAULT_THRESHOLD))


@dataclass(frozen=True)
class SamplingParams:
    """How each token is drawn from the logits: ``temperature`` 0 is greedy; otherwise softmax sampling at that
    temperature, restricted to the ``top_k`` most likely tokens (0: all) and the smallest set reaching ``top_p``
    of the mass. ``seed`` makes sampling repeatable; ``stop_at_eos`` ends generation at an end-of-sequence token."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_at_eos: bool = True

    def __post_init__(self):
        if not float(self.temperature) >= 0:
            raise SessionError(f"temperature (--temperature) must be >= 0, got {self.temperature}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise SessionError(f"top_p (--top-p) must be in (0, 1], got {self.top_p}")
        if int(self.top_k) < 0:
            raise SessionError(f"top_k must be >= 0, got {self.top_k}")

    def generator(self) -> torch.Generator | None:
        return torch.Generator().manual_seed(int(self.seed)) if self.seed is not None else None

    def sample(self, logits: torch.Tensor, generator: torch.Generator | None) -> int:
        """One token id from ``logits`` [vocab]."""
        if self.temperature == 0.0:
            return int(torch.argmax(logits))
        scores = logits.float().cpu() / self.temperature
        if self.top_k > 0:
            kth = torch.topk(scores, min(self.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=True)
            probs = ordered.softmax(-1)
            drop = probs.cumsum(-1) - probs >= self.top_p  # keep the prefix that reaches top_p
            scores[order[drop]] = float("-inf")
        return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))
