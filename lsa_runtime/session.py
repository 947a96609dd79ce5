"""``Session``: DeepSeek-V4 decoding with Lookahead Sparse Attention and a CPU cold pool (or plain, as baseline).

One explicit loop (the gpt-fast way) over explicit state, :class:`DecodeState`: the backbone's cache (sliding
windows, HCA entries and, for the cold-pool modes, CSA cache layers that keep every entry in the
:class:`~.cold_pool.ColdPool`), the :class:`~.residency.ResidentSet` (which entries are on the device), the
trigger counter and the loop's clock. Per ``generate`` call:

1. prefill the prompt in chunks with the model's own semantics (the native top-k sees every entry);
2. the first trigger fires when prefill ends: the policy (FlashMemory's memory indexer for ``mode="lsa"``) selects
   the entries from h_t0 of its layers, and the resident set becomes them (only entries not yet resident are
   copied in);
3. decode; every tau steps another trigger. Between triggers, entries born during decoding stay resident; in
   every CSA layer the native Lightning Indexer picks its top-k among resident entries only. With
   ``prefetch_steps=d`` each later trigger fires d steps before the window boundary and is prepared on a helper
   thread while decoding goes on (the static step: on a side stream while the next step runs); the new set is
   swapped in at the boundary (:mod:`~.prefetch`).

A decode step reads: :meth:`Session._forward` -> transformers' model -> :class:`~.lsa_cache.LSACSACompressor` ->
:class:`~.lsa_cache.LSACSACache` (candidates = the resident rows) -> :class:`~.residency.ResidentSet`. A trigger:
:meth:`Session._trigger` -> the policy -> :meth:`~.residency.ResidentSet.change_to`.

``mode="full"`` runs the same loop with the stock ``DynamicCache`` (plain DeepSeek-V4: the baseline);
``mode="hisparse"`` with per-step fetches into a device buffer and no triggers (:mod:`~.hisparse`).
See docs/DESIGN.md, "Session", for the contracts and the accounting.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .backbone import (
    cache_kwarg,
    csa_layers,
    csa_rate,
    default_model_name,
    load_backbone,
    validate_memory_layers,
)
from .batching import forward_rows, install_row_attention
from .capture import prefill_chunk_length
from .compiled_step import compile_static_step
from .cold_pool import ColdPool
from .config import STATIC_TRIGGER_MODES, SamplingParams, SessionConfig, SessionError
from .decode_graphs import install_decode_graphs
from .detokenize import IncrementalText
from .errors import FmIndexError, first_line
from .hisparse import HiSparseCSACache, build_hisparse_cache
from .lsa_cache import build_lsa_cache, install_lsa_compressors, pooled_layers
from .memory_indexer import load_memory_indexer
from .placement import execution_device, offloaded_modules
from .policies import ResidentPolicy, TriggerState, make_policy
from .prefetch import ResidentPrefetcher, StreamPrefetcher
from .residency import ResidentSet
from .static_runner import StaticRunner
from .stats import SessionStats, measure_cache

__all__ = ["Session", "SessionConfig", "SamplingParams", "SessionError", "DeviceMemoryError", "Generation",
           "StreamToken", "DecodeState"]


class DeviceMemoryError(FmIndexError):
    """The device ran out of memory; the message says what to shrink."""


@dataclass
class StreamToken:
    """One generated token: its id and the text it adds (empty without a tokenizer)."""

    token_id: int
    text: str
    sequence: int = 0  # which prompt of a list it continues (0 for a single prompt)


@dataclass
class Generation:
    """What ``Session.generate`` returns; ``str(generation)`` is the generated text."""

    token_ids: list[int]
    text: str
    prompt_tokens: int
    finish_reason: str  # "length" (max_new_tokens), "eos", "max_position" (model's maximum context), "stopped"
    stats: SessionStats

    def __str__(self) -> str:
        return self.text


@dataclass
class LoopClock:
    """Times and token counts of the decode loop (its own measurements; written only by the loop)."""

    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    trigger_seconds: float = 0.0  # decode-thread time in triggers (selection + change; prefetch: start + swap)
    prefetch_seconds: float = 0.0  # the prefetch jobs' time (helper thread; static step: decode thread, overlapped)
    prefetch_wait_seconds: float = 0.0  # decode thread waiting for a job at swaps (or running one not yet run)


def capacity_bucket(tokens: int) -> int:
    """``tokens`` rounded up to a multiple of a quarter of the power of two below it (at least 4,096): four
    buckets per doubling, so at most 25% more slots, and few distinct shapes for compiled graphs."""
    step = max(4096, (1 << (max(int(tokens), 1).bit_length() - 1)) // 4)
    return -(-int(tokens) // step) * step


@dataclass
class DecodeState:
    """One conversation's decoding state. ``pool`` and ``residency`` exist in the cold-pool modes only."""

    cache: object
    pool: ColdPool | None = None
    residency: ResidentSet | None = None
    position: int = 0  # tokens run through the backbone
    pending: int | None = None  # the last sampled token, not yet run through the backbone
    context: list[int] = field(default_factory=list)  # the tokens run through the backbone
    since_trigger: int = 0
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # h_t of the last position at memory layers
    clock: LoopClock = field(default_factory=LoopClock)
    policy: ResidentPolicy | None = None  # who selects this conversation's resident sets (trigger modes)
    # prefetch_steps > 0: its helper while it decodes (the static step's: on the decode thread, a side stream)
    prefetcher: ResidentPrefetcher | StreamPrefetcher | None = None


@dataclass
class _Job:
    """One prompt of a generate/stream call while it decodes: its state, sampling and what it has produced."""

    index: int  # the prompt's place in the call (StreamToken.sequence)
    ids: list[int]
    state: DecodeState | None
    max_new_tokens: int
    sampling: SamplingParams
    policy: ResidentPolicy | None = None
    logits: torch.Tensor | None = None  # [vocab], the next token's
    pick: "_RowArgmax | None" = None  # instead, greedy in a static step: its row's argmax
    generator: torch.Generator | None = None
    eos: set = field(default_factory=set)
    produced: list[int] = field(default_factory=list)
    text: str = ""  # the pieces streamed so far
    detok: IncrementalText | None = None  # decodes them a token at a time (None: no tokenizer)
    finish_reason: str | None = None
    started: float | None = None  # perf_counter when decoding began (after prefill and the first trigger)
    row: int | None = None  # its row of the static runner (static_decode), while it decodes there


class _RowArgmax:
    """The greedy tokens of every row of one static step: an argmax over its logits ``[rows, vocab]`` (the first
    maximum, as ``SamplingParams.sample``'s), read to the host once, at the first row's sampling."""

    def __init__(self, logits: torch.Tensor):
        self._device = logits.argmax(-1)
        self._host: list[int] | None = None

    def token(self, row: int) -> int:
        if self._host is None:
            self._host = self._device.tolist()
        return self._host[row]


def _is_batch(prompt) -> bool:
    """A list/tuple of prompts (texts or token-id sequences), as opposed to one prompt given as token ids."""
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and not isinstance(prompt[0], int) \
        and not (isinstance(prompt[0], torch.Tensor) and prompt[0].dim() == 0)


def static_by_default(config: SessionConfig) -> bool:
    """Whether a Session on one GPU (weights in float dtypes, nothing offloaded) takes the static-shape step when
    ``static_decode`` is None: where it was tested there (SessionConfig): mode full, and the trigger modes with a
    budget (it bounds the resident slots a row holds; without one a row keeps a slot for every entry), the cold
    pool in the model's dtype and the memory keys on the device. Weights kept in FP8/FP4 (a release checkpoint on a
    GPU with its kernels) keep the stock path: not tested there."""
    return config.mode == "full" or (config.mode in STATIC_TRIGGER_MODES and config.budget is not None
                                     and config.pool_storage == "model" and config.memory_keys == "device")


class Session:
    """Decode with a DeepSeek-V4 backbone, full or with Lookahead Sparse Attention.

    Example::

        from lsa_runtime import Session
        s = Session.from_pretrained("tiny", mode="recent", budget=64, tau=16)
        out = s.generate("The cold pool", max_new_tokens=32)
        print(out.text, s.stats.footprint_ratio)
        s_full = s.with_config(mode="full")          # another mode on the same loaded backbone

    Options are a :class:`~.config.SessionConfig` (``config=``) or its fields as keywords (``mode``, ``tau``,
    ``threshold``, ``budget``, ``keep_recent``, ``keep_first``, ``ensemble``, ``fetch_top``, ``fetch_neighbours``,
    ``page_size``, ``max_pages``, ``chunk_size``, ``seed``, ``memory_keys``, ``prefetch_steps``, ``decode_graphs``,
    ``max_score_bytes``, ...; their meaning is documented there; the resident set's options left None take the
    export's). ``indexer``: an ``fm-index export`` directory, the authors' release checkpoint (a
    ``.pt`` file) or a ``MemoryIndexer`` (mode ``lsa``; its tau and threshold are the defaults). ``policy``: any
    :class:`~.policies.ResidentPolicy` instead of the mode's (e.g. an ``OraclePolicy`` fed by
    :func:`~.policies.record_native_picks`). ``decode_graphs`` installs the backbone's stateless decode modules as
    CUDA graphs once per model (:mod:`~.decode_graphs`; bit-identical outputs, far fewer kernel launches).
    """

    def __init__(self, model, tokenizer=None, config: SessionConfig | None = None, *, indexer=None,
                 policy: ResidentPolicy | None = None, **options):
        if config is None:
            config = SessionConfig(**options)
        elif options:
            raise SessionError(f"give the options either as config= or as keywords, not both ({', '.join(options)})")
        self.model = model
        self.tokenizer = tokenizer
        self.backbone_config = model.config
        self.decoder = model.model if hasattr(model, "model") else model
        self.csa_layers = csa_layers(self.backbone_config)
        self.rate = csa_rate(self.backbone_config)
        self.memory_indexer = load_memory_indexer(indexer, model) if indexer is not None else None
        export = self.memory_indexer.config if self.memory_indexer is not None else None
        self.config = config.resolved(tau=export.tau if export else None,
                                      threshold=export.threshold if export else None)
        if policy is not None and not isinstance(policy, ResidentPolicy):
            raise SessionError(f"policy must be a ResidentPolicy, got {type(policy).__name__}")
        # mode "oracle" replays the native picks of a full run of each prompt: its policy is made per call
        self.oracle = policy is None and self.config.mode == "oracle"
        self.policy = policy if policy is not None or self.oracle else make_policy(self.config, self.memory_indexer)
        self.mode = policy.name if policy is not None else self.config.mode
        if self.policy is not None and self.policy.memory_layers:
            validate_memory_layers(self.backbone_config, self.policy.memory_layers)
        self.hisparse = self.policy is None and self.config.mode == "hisparse"
        if self.hisparse and self.config.budget < self.backbone_config.index_topk:
            raise SessionError(f"the per-step buffer ({self.config.budget} entries) must hold one step's top-k "
                               f"({self.backbone_config.index_topk} entries)")
        self.max_positions = int(getattr(self.backbone_config, "max_position_embeddings", 0) or 0)
        if self.policy is not None or self.hisparse or self.oracle:
            install_lsa_compressors(model)
        # a backbone spread over devices (device_map): the state of a layer lives where the layer computes
        self.layer_devices = {i: execution_device(layer) for i, layer in enumerate(self.decoder.layers)}
        self.devices = sorted(set(self.layer_devices.values()) | {self.device}, key=str)
        offloaded = offloaded_modules(model)
        if self.config.decode_graphs and (len(self.devices) > 1 or offloaded):
            raise SessionError("decode_graphs needs the whole backbone resident on one device; this one "
                               + (f"spans {', '.join(map(str, self.devices))}" if len(self.devices) > 1 else
                                  f"streams offloaded weights from the host ({offloaded[0]} ...)"))
        one_gpu = self.device.type == "cuda" and len(self.devices) == 1 and not offloaded
        if self.config.static_decode and (len(self.devices) > 1 or offloaded):
            raise SessionError("static_decode needs the whole backbone resident on one device")
        self.static_decode = self.config.static_decode if self.config.static_decode is not None else \
            one_gpu and static_by_default(self.config) and all(
                p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in model.parameters())
        if self.config.static_compile and not self.static_decode:
            raise SessionError("static_compile compiles the static step, which this Session does not take "
                               "(static_decode: on one GPU by default in mode full and the budgeted trigger modes; "
                               "pass static_decode=True)")
        if self.config.static_compile:
            compile_static_step(model)  # the static step only: prefill keeps the eager layers
        # the static step is one graph of its own: the per-module graphs would only serve its warm-up steps
        wants_graphs = one_gpu and not self.static_decode if self.config.decode_graphs is None \
            else self.config.decode_graphs
        self.decode_graphs = install_decode_graphs(model) if wants_graphs else None
        self._cache_kw = cache_kwarg()
        self._policy_given = policy is not None
        self._state: DecodeState | None = None
        self._rows: list[DecodeState] = []  # the sequences of the forward running now, in batch-row order
        self._last_jobs: list[_Job] = []
        self._row_attention = False  # batching.install_row_attention ran on the model (at the first batched step)
        self._runner: StaticRunner | None = None  # static_decode: the rows of the call running now
        self.finish_reason: str | None = None  # of the last generate/stream: "length", "eos", "max_position"
        self.last_prompt_tokens = 0

    @classmethod
    def from_pretrained(cls, model: str | Path | None = None, indexer=None, *, device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None, config: SessionConfig | None = None,
                        device_map: str | dict | None = None, **options) -> "Session":
        """Load a backbone (bundled name or DeepSeek-V4 checkpoint directory; default: the bundled default,
        ``reference``) and build a Session on it. The options are checked before the backbone is loaded.

        ``device_map`` spreads the decoder layers over devices instead of putting the model on ``device``
        ("auto", "balanced", ``"0:0-21,1:22-42"``, ``"0:0-30,cpu:31-42"``, a dict of module -> device; see
        :func:`lsa_runtime.placement.parse_device_map`); each CSA layer's cold-pool fetches, resident set and
        memory keys then live on that layer's device."""
        if device is not None and device_map is not None:
            raise SessionError("give device= or device_map=, not both")
        if config is None:
            config = SessionConfig(**options)
        elif options:
            raise SessionError(f"give the options either as config= or as keywords, not both ({', '.join(options)})")
        if config.mode == "lsa" and indexer is None:
            make_policy(config.resolved())  # the one message for a missing indexer, before any weight is read
        device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        where = device if device_map is None else f"device map {device_map}"
        try:
            backbone, tokenizer = load_backbone(model or default_model_name(), device=device, dtype=dtype,
                                                device_map=device_map)
        except _oom_errors() as exc:
            raise DeviceMemoryError(f"out of memory loading the backbone on {where}: {first_line(exc)}") from None
        return cls(backbone, tokenizer, config, indexer=indexer)

    def with_config(self, config: SessionConfig | None = None, *, policy: ResidentPolicy | None = None,
                    **changes) -> "Session":
        """A new Session on the same loaded backbone, tokenizer and memory indexer, with ``config`` or this
        Session's config with ``changes`` (e.g. ``s.with_config(mode="recent", budget=64)``)."""
        config = config if config is not None else replace(self.config, **changes)
        return Session(self.model, self.tokenizer, config, indexer=self.memory_indexer, policy=policy)

    @property
    def device(self) -> torch.device:
        """Where the backbone takes its input (its embedding computes; the first GPU of a device map)."""
        return execution_device(self.decoder.embed_tokens)

    # ---- state ----------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the conversation: the next ``generate`` starts from an empty context (it does anyway unless
        ``keep_context=True``)."""
        self._state = None

    def _new_state(self, tokens: int = 0) -> DecodeState:
        """A clean decoding state; ``tokens``: how many the conversation is expected to hold, so that the cold pool
        is allocated (and pinned) once at its size instead of growing by doubling up to twice it."""
        from transformers import DynamicCache

        if self.policy is None and not self.hisparse and not self.oracle:
            return DecodeState(cache=DynamicCache(config=self.backbone_config))
        widths = {"compressor": self.backbone_config.head_dim, "indexer": self.backbone_config.index_head_dim}
        dtype = self.decoder.layers[self.csa_layers[0]].self_attn.compressor.kv_proj.weight.dtype
        pool = ColdPool(self.csa_layers, widths, dtype=dtype, initial_entries=tokens // self.rate + 1,
                        storage=self.config.pool_storage)
        if self.hisparse:
            return DecodeState(cache=build_hisparse_cache(self.backbone_config, pool, self.config.budget), pool=pool)
        residency = ResidentSet(self.csa_layers, widths, pool, {L: self.layer_devices[L] for L in self.csa_layers},
                                dtype)
        # memory_keys="pool": the memory layers' K^IComp of every entry stays in the cold pool after prefill and
        # each trigger streams it to the device (ColdPool.stream_prefix) instead of holding it resident
        memory_layers = self.policy.memory_layers if self.policy is not None else ()
        keys_resident = memory_layers if self.config.memory_keys == "device" else ()
        return DecodeState(cache=build_lsa_cache(self.backbone_config, pool, residency, keys_resident), pool=pool,
                           residency=residency)

    # ---- generation -----------------------------------------------------------------------------------

    def generate(self, prompt: str | Sequence[int] | torch.Tensor | list, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop_at_eos: bool = True, keep_context: bool = False,
                 sampling: SamplingParams | None = None, unconditional: bool = False,
                 policies: Sequence[ResidentPolicy] | None = None) -> Generation | list[Generation]:
        """Generate up to ``max_new_tokens`` tokens after ``prompt`` (text, or token ids).

        ``temperature`` 0 is greedy decoding; otherwise sampling with optional ``top_k``/``top_p`` (``seed``
        makes it repeatable); or pass them as one ``sampling=SamplingParams(...)``. Each call starts from a clean
        state unless ``keep_context=True``, which appends ``prompt`` to the previous call's prompt and output. An
        empty text prompt is refused unless ``unconditional=True``: then generation starts from the tokenizer's
        start token alone. Mode ``oracle`` first decodes the prompt in full mode to record the native picks it
        replays (exact for greedy decoding).

        A list of prompts (texts, or token-id lists) decodes them together, ``max_batch`` at a time, and returns
        one :class:`Generation` per prompt, in order (see :meth:`stream`).
        """
        if _is_batch(prompt):
            tokens: dict[int, list[int]] = {i: [] for i in range(len(prompt))}
            for piece in self.stream(prompt, max_new_tokens, temperature, top_p, top_k, seed, stop_at_eos,
                                     keep_context, sampling, unconditional, policies):
                tokens[piece.sequence].append(piece.token_id)
            return [Generation(token_ids=tokens[i], text=self._text(tokens[i]), prompt_tokens=len(job.ids),
                               finish_reason=job.finish_reason, stats=self._stats(job.state))
                    for i, job in enumerate(self._last_jobs)]
        tokens = [piece.token_id for piece in self.stream(
            prompt, max_new_tokens, temperature, top_p, top_k, seed, stop_at_eos, keep_context, sampling,
            unconditional, policies)]
        return Generation(token_ids=tokens, text=self._text(tokens), prompt_tokens=self.last_prompt_tokens,
                          finish_reason=self.finish_reason, stats=self.stats)

    def stream(self, prompt: str | Sequence[int] | torch.Tensor | list, max_new_tokens: int = 128,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
               stop_at_eos: bool = True, keep_context: bool = False,
               sampling: SamplingParams | None = None, unconditional: bool = False,
               policies: Sequence[ResidentPolicy] | None = None) -> Iterator[StreamToken]:
        """Like :meth:`generate`, but yields each token (id and text piece) as soon as it is sampled.
        Bad input is reported here, before the first token.

        Given a list of prompts, the sequences decode together (continuous batching): up to ``max_batch`` of them
        run one backbone forward per step (:mod:`~.batching`), each with its own cache, cold pool, resident set,
        triggers, sampling generator and stats; a finished sequence leaves the batch and the next waiting prompt is
        prefilled and joins. Tokens of all sequences are yielded interleaved; ``StreamToken.sequence`` says whose.
        Each sequence gets its own resident-set policy, made as for a fresh Session (``policies=``: one given per
        prompt instead; mode ``oracle`` records one full run per prompt first); greedy decoding gives each the
        tokens it gets decoding alone. ``keep_context`` is for single conversations only."""
        shortcuts = SamplingParams(temperature, top_p, top_k, seed, stop_at_eos)
        if sampling is not None and shortcuts != SamplingParams():
            raise SessionError("give sampling= or the temperature/top_p/top_k/seed/stop_at_eos keywords, not both")
        sampling = sampling if sampling is not None else shortcuts
        if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens or int(max_new_tokens) < 0:
            raise SessionError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens}")
        max_new_tokens = int(max_new_tokens)
        if _is_batch(prompt):
            return self._run(self._batch_jobs(list(prompt), max_new_tokens, sampling, keep_context, unconditional,
                                              policies), self.config.max_batch)
        if policies is not None:
            raise SessionError("policies= gives one policy per prompt of a list of prompts")
        ids = self._begin(prompt, keep_context, unconditional, max_new_tokens)
        if self.oracle:
            self.policy = self._oracle_policy(ids, max_new_tokens, sampling)
        self._state.policy = self.policy
        return self._run([_Job(0, ids, self._state, max_new_tokens, sampling)], 1)

    def _batch_jobs(self, prompts: list, max_new_tokens: int, sampling: SamplingParams, keep_context: bool,
                    unconditional: bool, policies) -> list["_Job"]:
        """One job per prompt of a list: ids checked, fresh state, its own policy (all before any decoding)."""
        if keep_context:
            raise SessionError("keep_context=True continues one conversation: give one prompt, not a list")
        if policies is not None and len(policies) != len(prompts):
            raise SessionError(f"policies= gives {len(policies)} policies for {len(prompts)} prompts")
        for policy in policies or ():
            if not isinstance(policy, ResidentPolicy):
                raise SessionError(f"policies= must hold ResidentPolicy objects, got {type(policy).__name__}")
        if policies is not None and self.policy is None and not self.oracle:
            raise SessionError(f"mode '{self.mode}' has no resident-set policy to replace (policies=)")
        jobs = []
        for i, prompt in enumerate(prompts):
            try:
                ids, _ = self._prompt_ids(prompt, False, unconditional, None)
            except SessionError as exc:
                raise SessionError(f"prompt {i}: {exc}") from None
            jobs.append(_Job(i, ids, None, max_new_tokens, sampling, policy=policies[i] if policies else None))
        for job in jobs:  # the states last: nothing allocated for a list with a bad prompt
            if job.policy is None and self.oracle:
                job.policy = self._oracle_policy(job.ids, max_new_tokens, sampling)
            elif job.policy is None and self.policy is not None:
                # a fresh policy per sequence (a seeded random one starts its draws anew), as a fresh Session
                job.policy = self.policy if self._policy_given else make_policy(self.config, self.memory_indexer)
            job.state = self._new_state(len(job.ids) + max_new_tokens)
            job.state.policy = job.policy
        self._state = None  # a list leaves no conversation to continue
        return jobs

    def _oracle_policy(self, ids: list[int], max_new_tokens: int, sampling: SamplingParams) -> ResidentPolicy:
        """The oracle of this prompt: the native top-k picks of a full-mode run of it, replayed per window."""
        from .policies import record_native_picks

        recorder = Session(self.model, self.tokenizer, replace(self.config, mode="full", budget=None,
                                                                        static_decode=False))
        _, picks = record_native_picks(recorder, ids, max_new_tokens, sampling=sampling)
        return make_policy(self.config, native_picks=picks)

    def _prompt_ids(self, prompt, keep_context: bool, unconditional: bool, state: DecodeState | None):
        """The token ids ``prompt`` adds (with the pending token of ``state``), checked against the model's maximum
        context; returns (ids, tokens in the context after them)."""
        if isinstance(prompt, str) and prompt == "":
            if not unconditional:
                raise SessionError("the prompt is empty: pass unconditional=True (--unconditional) to generate from "
                                   "the start token alone")
            ids = self._start_ids()
        else:
            ids = self._encode(prompt, add_special_tokens=not keep_context)
        if keep_context and state.pending is not None:
            ids = [state.pending] + ids  # the previous call's last token was never run through the model
        total = (state.position if keep_context else 0) + len(ids)
        if self.max_positions and total > self.max_positions:
            raise SessionError(f"prompt is {total:,} tokens (with the context), longer than the model's maximum "
                               f"of {self.max_positions:,} (max_position_embeddings)")
        return ids, total

    def _begin(self, prompt, keep_context: bool, unconditional: bool = False, max_new_tokens: int = 0) -> list[int]:
        """Check the prompt against the model and the state; start a new conversation unless ``keep_context``
        (its cold pool sized for the prompt and ``max_new_tokens``). Returns the token ids to prefill."""
        if keep_context and self._state is None:
            raise SessionError("keep_context=True needs a previous generate() call with one prompt on this Session")
        if keep_context and self.oracle:
            raise SessionError("mode 'oracle' replays one full run per prompt: keep_context is not available")
        ids, _ = self._prompt_ids(prompt, keep_context, unconditional, self._state)
        if not keep_context:
            self._state = self._new_state(len(ids) + max_new_tokens)
        self._state.pending = None
        self.last_prompt_tokens = len(ids)
        return ids

    @torch.no_grad()
    def _run(self, jobs: list["_Job"], max_batch: int) -> Iterator[StreamToken]:
        """The decode loop over ``jobs``: up to ``max_batch`` decode together; a finished one leaves, the next
        waiting one is prefilled and joins. One job is the single-conversation case (the plain forward)."""
        self._last_jobs = jobs
        if self.static_decode:  # room for the longest sequence of the call (positions before prefill too)
            capacity = max(job.state.position + len(job.ids) + job.max_new_tokens for job in jobs) + 1
            if self.config.static_compile:  # compiled graphs are per shape: few shapes over the Session's life
                capacity = capacity_bucket(capacity)
            policies = [job.state.policy for job in jobs if job.state.policy is not None]
            hidden = sorted({layer for policy in policies for layer in policy.memory_layers})
            self._runner = StaticRunner(self.model, min(max_batch, len(jobs)), capacity,
                                        graph=self.device.type == "cuda",
                                        resident=self._resident_slots(policies, capacity) if policies else None,
                                        hidden_layers=hidden)
        waiting, active = deque(jobs), []
        layers = sorted({layer for job in jobs if job.state.policy is not None
                         for layer in job.state.policy.memory_layers})
        handles = self._hidden_hooks(layers)
        job = None
        try:
            while waiting or active:
                while waiting and len(active) < max_batch:
                    job = waiting.popleft()
                    self._start_job(job)
                    if self._runner is not None and self._runner.resident is not None:
                        job.row = self._runner.join(job.state.cache, job.state.residency, job.state.pool)
                    elif self._runner is not None:
                        job.row = self._runner.join(job.state.cache)
                    active.append(job)  # before its first token: a consumer that stops there finishes it too
                    yield from self._emit(job)
                    if job.finish_reason is not None:
                        active.remove(job)
                        self._finish_job(job)
                if not active:
                    continue
                job = None
                self._step(active)
                for job in list(active):
                    yield from self._emit(job)
                    if job.finish_reason is not None:
                        active.remove(job)
                        self._finish_job(job)
        except _oom_errors() as exc:
            self._state = None  # the state is incomplete; the next call starts fresh
            at = f" at {job.state.position:,} tokens" if job is not None else ""
            raise DeviceMemoryError(
                f"out of memory{at} ({first_line(exc)}); try a smaller chunk_size, a smaller budget, a smaller "
                f"max_batch, or a lower-precision dtype") from None
        except RuntimeError as exc:
            if "can't allocate memory" not in str(exc) and "out of memory" not in str(exc):
                raise
            self._state = None
            at = f" at {job.state.position:,} tokens" if job is not None else ""
            raise DeviceMemoryError(f"out of host memory{at} ({first_line(exc)}); try a smaller chunk_size, a "
                                    "shorter prompt or a smaller max_batch") from None
        finally:
            for handle in handles:
                handle.remove()
            for job in active:  # a consumer that stopped early: close what the unfinished sequences hold
                self._finish_job(job)
            self._runner = None

    def _start_job(self, job: "_Job") -> None:
        """Prefill the job's prompt, fire its first trigger; its decoding clock starts."""
        job.logits = self._prefill(job.state, job.ids)
        if job.state.policy is not None:
            self._trigger(job.state)
        job.generator = job.sampling.generator()
        job.eos = self._eos_ids() if job.sampling.stop_at_eos else set()
        job.detok = IncrementalText(self.tokenizer) if self.tokenizer is not None else None
        if self.config.prefetch_steps and job.state.policy is not None:
            job.state.prefetcher = StreamPrefetcher() if self._runner is not None else ResidentPrefetcher()
        job.started = time.perf_counter()
        if job.max_new_tokens == 0:
            job.finish_reason = "length"

    def _emit(self, job: "_Job") -> Iterator[StreamToken]:
        """Sample the job's next token from its logits and yield it; decide whether the job is finished."""
        if job.finish_reason is not None:
            return
        state = job.state
        if job.pick is not None:
            token, job.pick = job.pick.token(job.row), None
        else:
            token = job.sampling.sample(job.logits, job.generator)
        job.produced.append(token)
        piece = job.detok.add(token) if job.detok is not None else ""
        reason = ("eos" if token in job.eos else "length" if len(job.produced) == job.max_new_tokens else
                  "max_position" if self.max_positions and state.position >= self.max_positions else None)
        if reason is not None:
            state.pending, job.finish_reason = token, reason
            whole = self._text(job.produced)  # once: the held-back tail, and the pieces joined are the text
            if whole.startswith(job.text + piece):
                piece = whole[len(job.text):]
        else:
            state.context.append(token)
        job.text += piece
        yield StreamToken(token, piece, job.index)

    def _step(self, active: list["_Job"]) -> None:
        """One decode step of every active job (their last sampled tokens), then each job's trigger bookkeeping."""
        if self._runner is not None:
            self._rows = []  # the step's h_t reach the runner's buffers, not the per-sequence hooks
            logits = self._runner.step({job.row: job.produced[-1] for job in active})
            for job in active:  # prefetches started after the last step run now, while this one runs on the device
                if job.state.prefetcher is not None:
                    job.state.prefetcher.launch()
            # greedy rows: one argmax over the buffer (queued now, before the next step overwrites it) and one read of
            # the device at the first sampling, instead of a clone, an argmax and a read per row
            picks = _RowArgmax(logits) if any(job.sampling.temperature == 0.0 for job in active) else None
            for job in active:
                job.state.position += 1
                if job.sampling.temperature == 0.0:
                    job.logits, job.pick = None, picks
                else:
                    job.logits = logits[job.row].clone()  # the runner's buffer is overwritten by the next step
        elif len(active) == 1:
            job = active[0]
            job.logits = self._forward(job.state, torch.tensor([job.produced[-1]]))
        else:
            if not self._row_attention:
                install_row_attention(self.model)
                self._row_attention = True
            states = [job.state for job in active]
            self._rows = states
            logits = forward_rows(self.model, [s.cache for s in states], [job.produced[-1] for job in active],
                                  [s.position for s in states], self.device)
            for job, row in zip(active, logits):
                job.state.position += 1
                job.logits = row
        for job in active:
            if job.state.policy is not None and self._runner is not None:
                self._after_static_step(job)
            elif job.state.policy is not None:
                self._after_decode_step(job.state)

    def _finish_job(self, job: "_Job") -> None:
        if job.state.prefetcher is not None:  # first: a static row's helper job reads the row's slots
            job.state.prefetcher.close()  # drop a set for a window that will not be decoded; no idle thread left
            job.state.prefetcher = None
        if job.row is not None:  # back into its own cache: stats and keep_context read it
            if self._runner.resident is not None:
                self._runner.leave(job.row, job.state.cache, job.state.residency, self._memory_keys(job.state))
            else:
                self._runner.leave(job.row, job.state.cache)
            job.row = None
        self._synchronize()
        if job.started is not None:
            job.state.clock.decode_tokens += len(job.produced)
            job.state.clock.decode_seconds += time.perf_counter() - job.started
            job.started = None
        if job.finish_reason is None:
            job.finish_reason = "stopped"  # the consumer of stream() stopped reading
        if len(self._last_jobs) == 1:
            self.finish_reason = job.finish_reason

    def _prefill(self, state: DecodeState, ids: list[int]) -> torch.Tensor:
        """Run ``ids`` in chunks with the model's own semantics (every entry a candidate); the last logits."""
        start = time.perf_counter()
        layers = pooled_layers(state.cache)
        if state.residency is not None:
            state.residency.clear()
        for layer in layers:
            layer.begin_prefill()
        ids_tensor = torch.tensor(ids, dtype=torch.long)
        logits, done = None, 0
        while done < len(ids):
            n = prefill_chunk_length(self.backbone_config, state.position, self.config.chunk_size,
                                     self.config.max_score_bytes)
            logits = self._forward(state, ids_tensor[done:done + n])
            done += n
        for layer in layers:
            layer.end_prefill()
        state.context.extend(ids)
        self._synchronize()
        state.clock.prefill_tokens += len(ids)
        state.clock.prefill_seconds += time.perf_counter() - start
        return logits

    def _forward(self, state: DecodeState, ids: torch.Tensor) -> torch.Tensor:
        """Run ``ids`` (1-D) of one sequence at its next positions; returns the last position's logits ``[vocab]``."""
        self._rows = [state]
        n = ids.numel()
        positions = torch.arange(state.position, state.position + n, device=self.device).unsqueeze(0)
        out = self.model(input_ids=ids.to(self.device).unsqueeze(0), position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self._cache_kw: state.cache})
        state.position += n
        return out.logits[0, -1]

    # ---- triggers -----------------------------------------------------------------------------------------

    def _after_decode_step(self, state: DecodeState) -> None:
        """Count the step; start a prefetch d steps before the window boundary; at the boundary, change the set."""
        state.since_trigger += 1
        tau, lead = self.config.tau, self.config.prefetch_steps
        if state.prefetcher is not None and state.since_trigger == tau - lead:
            self._start_prefetch(state)
        if state.since_trigger >= tau:
            if state.prefetcher is not None and state.prefetcher.pending:
                self._install_prefetched(state)
            else:
                self._trigger(state)

    def _trigger(self, state: DecodeState) -> None:
        """Select the resident set from the state at the last processed token and make it resident now."""
        start = time.perf_counter()
        state.residency.change_to(self._select(state, self._trigger_state(state)), self._headroom())
        state.since_trigger = 0
        self._synchronize()
        state.clock.trigger_seconds += time.perf_counter() - start

    def _after_static_step(self, job: "_Job") -> None:
        """Resident mode of the static step: count the step; at the window boundary the trigger runs on the job's
        row: born entries to its cold pool, the policy's selection installed in the row's slots in place."""
        state = job.state
        state.since_trigger += 1
        tau, lead = self.config.tau, self.config.prefetch_steps
        if state.prefetcher is not None and state.since_trigger == tau - lead:
            self._start_static_prefetch(job)
        if state.since_trigger < tau:
            return
        start = time.perf_counter()
        rows, keys = self._runner.resident, self._memory_keys(state)
        if state.prefetcher is not None and state.prefetcher.pending:
            # queued after the step, no host wait: the device copies run before the next step (trigger_seconds
            # counts the host's part)
            finished = state.prefetcher.finish()
            change = rows.install_prepared(job.row, finished.result, self._headroom(), keys)
            state.clock.prefetch_seconds += finished.helper_seconds
            state.clock.prefetch_wait_seconds += finished.wait_seconds
        else:
            change = rows.install(job.row, self._select(state, self._static_trigger_state(job, keys), rows.device),
                                  self._headroom(), keys)
            self._synchronize()
        state.residency.record(change)
        state.since_trigger = 0
        state.clock.trigger_seconds += time.perf_counter() - start

    def _static_trigger_state(self, job: "_Job", keys: dict, lead: int = 0) -> TriggerState:
        """What a trigger on the job's static row looks at: its born entries flushed first (to the pool and the
        memory layers' device ``keys``), h_t0 of the step just run from the runner's buffers."""
        state, rows = job.state, self._runner.resident
        rows.flush(job.row, keys)
        for layer in state.policy.memory_layers:
            state.hidden[layer] = self._runner.hidden[layer][job.row].clone()
        return TriggerState(position=state.position - 1, n_visible=state.pool.count(self.csa_layers[0]),
                            trigger_index=len(state.residency.changes), resident=rows.ids[job.row].clone(),
                            lead=lead, hidden=dict(state.hidden), index_keys={i: k.view() for i, k in keys.items()})

    def _start_static_prefetch(self, job: "_Job") -> None:
        """The next window's trigger for the job's static row from the state after this step (born entries flushed,
        h_t0 and the row's ids copied, all queued), run by the prefetcher while the next step runs (selection and
        rows built from the snapshot); the row goes on decoding with its current set until the boundary."""
        start = time.perf_counter()
        state, rows, row = job.state, self._runner.resident, job.row
        trigger_state = self._static_trigger_state(job, self._memory_keys(state), lead=self.config.prefetch_steps)
        snapshot, filled = trigger_state.resident, rows.filled[row]
        state.prefetcher.start(lambda: rows.prepare(row, self._select(state, trigger_state, rows.device), snapshot,
                                                    filled),
                               self.device,
                               reads=[snapshot, *trigger_state.hidden.values(), *trigger_state.index_keys.values()])
        state.clock.trigger_seconds += time.perf_counter() - start

    def _memory_keys(self, state: DecodeState) -> dict:
        """The memory layers' K^IComp of every entry kept on the device (``memory_keys="device"``), by layer."""
        layers = state.policy.memory_layers if state.policy is not None else ()
        return {layer.layer_idx: layer.all_index_keys for layer in pooled_layers(state.cache)
                if layer.layer_idx in layers and layer.all_index_keys is not None}

    def _resident_slots(self, policies, capacity: int) -> int:
        """CSA slots per row of a static call in the trigger modes: the largest selection a policy can make
        (:meth:`ResidentPolicy.max_selected`: its budget) and room for the entries born before the next trigger;
        every entry the call can emit where a policy has no bound."""
        bounds = [policy.max_selected() for policy in policies]
        # with prefetch, the entries born in the lead steps join the set at the swap: room for them too
        room = self._headroom() + (self.config.prefetch_steps // self.rate + 1 if self.config.prefetch_steps else 0)
        if any(bound is None for bound in bounds):
            return capacity // self.rate + room
        return max(bounds) + room

    def _start_prefetch(self, state: DecodeState) -> None:
        """Fire the next window's trigger now, on the helper thread; decoding goes on with the current set."""
        start = time.perf_counter()
        lead = self.config.prefetch_steps
        trigger_state = self._trigger_state(state, lead=lead)
        residency, snapshot = state.residency, state.residency.snapshot()
        # entries born in the lead steps before the boundary join the set at the swap: room for them too
        headroom = self._headroom() + lead // self.rate + 1
        state.prefetcher.start(lambda: residency.prepare(snapshot, self._select(state, trigger_state), headroom),
                               self.device)
        state.clock.trigger_seconds += time.perf_counter() - start

    def _install_prefetched(self, state: DecodeState) -> None:
        """At the window boundary: make the prepared set resident (waiting for the helper if it is not done)."""
        start = time.perf_counter()
        finished = state.prefetcher.finish()
        state.residency.install(finished.result)
        state.clock.prefetch_seconds += finished.helper_seconds
        state.clock.prefetch_wait_seconds += finished.wait_seconds
        state.since_trigger = 0
        state.clock.trigger_seconds += time.perf_counter() - start

    def _trigger_state(self, state: DecodeState, lead: int = 0) -> TriggerState:
        """What a trigger at the last processed token looks at (views and references, no copies; memory keys kept
        in the pool are streamed later, by :meth:`_select`)."""
        index_keys = {layer.layer_idx: layer.all_index_keys.view() for layer in pooled_layers(state.cache)
                      if layer.layer_idx in state.policy.memory_layers and layer.all_index_keys is not None}
        return TriggerState(position=state.position - 1, n_visible=state.pool.count(self.csa_layers[0]),
                            trigger_index=len(state.residency.changes), resident=state.residency.ids, lead=lead,
                            hidden=dict(state.hidden), index_keys=index_keys)

    def _select(self, state: DecodeState, trigger_state: TriggerState, device=None) -> torch.Tensor:
        """The policy's entries for ``trigger_state`` (int64, on the host or on ``device``: the static rows' ids live
        there), checked against n_visible; their order and repeats are left to the set they go to (``change_to``,
        ``install`` and ``prepare`` sort and de-duplicate them)."""
        policy = state.policy
        for layer in policy.memory_layers:
            if layer not in trigger_state.index_keys:  # memory_keys="pool": streamed for this trigger, freed after
                trigger_state.index_keys[layer] = state.pool.stream_prefix(layer, "indexer", trigger_state.n_visible,
                                                                           self.layer_devices[layer])
        ids = torch.as_tensor(policy.select(trigger_state), dtype=torch.long).reshape(-1)
        ids = ids.to(device) if device is not None else ids.cpu()
        low, high = torch.stack((ids.min(), ids.max())).tolist() if ids.numel() else (0, -1)  # one read of the device
        if low < 0 or high >= trigger_state.n_visible:
            bad = low if low < 0 else high
            raise SessionError(f"policy '{policy.name}' selected entry {bad}, outside the "
                               f"{trigger_state.n_visible} visible entries")
        return ids

    def _headroom(self) -> int:
        return self.config.tau // self.rate + 2  # entries born before the next trigger

    def _hidden_hooks(self, layers) -> list:
        """Keep h_t (attention input, after input_layernorm) of the last position at each memory layer in
        ``layers``, for each sequence of the forward (``self._rows``, in batch-row order)."""
        handles = []
        for idx in layers:
            def keep_last(module, args, kwargs, idx=idx):
                hidden = args[0] if args else kwargs["hidden_states"]
                for row, state in enumerate(self._rows):
                    state.hidden[idx] = hidden[row, -1].detach().clone()  # not a view: frees the chunk

            handles.append(self.decoder.layers[idx].self_attn.register_forward_pre_hook(keep_last, with_kwargs=True))
        return handles

    def _synchronize(self) -> None:
        for device in self.devices:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

    # ---- inspection ---------------------------------------------------------------------------------------

    @property
    def residency(self) -> ResidentSet | None:
        """The resident set of the current conversation (trigger modes; None otherwise): ``.ids``,
        ``.rows(layer, name)``, ``.changes``. Read it; the Session and the cache layers write it."""
        return self._state.residency if self._state is not None else None

    @property
    def cold_pool(self) -> ColdPool | None:
        """The cold pool of the current conversation (cold-pool modes; None otherwise)."""
        return self._state.pool if self._state is not None else None

    def last_picks(self) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
        """Per CSA layer, the native top-k picks of the last forward and the candidates it chose among (entry
        indices; candidates None = every entry)."""
        layers = pooled_layers(self._state.cache) if self._state is not None else []
        return {layer.layer_idx: (layer.last_picks, layer.last_candidates) for layer in layers}

    @property
    def context_ids(self) -> list[int]:
        """Token ids of the current context (prompts and generated tokens)."""
        if self._state is None:
            return []
        return self._state.context + ([self._state.pending] if self._state.pending is not None else [])

    def describe(self) -> str:
        """The resident-set rule in words (the stats table's title)."""
        if self.policy is not None:
            return self.policy.describe()
        if self.oracle:
            return "oracle (native top-k of full decoding" + (f", budget {self.config.budget})" if self.config.budget
                                                               else ")")
        return f"hisparse (buffer {self.config.budget} entries)" if self.hisparse else "full"

    @property
    def stats(self) -> SessionStats:
        """Footprint of the current decoding state and the counters of the conversation, read from their owners
        (the cache, the cold pool, the resident set, the per-step buffers, the loop's clock)."""
        return self._stats(self._state)

    def _stats(self, state: DecodeState | None) -> SessionStats:
        if state is None:
            return SessionStats(mode=self.mode, policy=self.describe())
        by_device: dict[str, int] = {}
        device_bytes, full_bytes, entries, resident = measure_cache(state.cache, self.backbone_config, by_device)
        changes = state.residency.changes if state.residency is not None else []
        misses = sum(layer.misses for layer in pooled_layers(state.cache) if isinstance(layer, HiSparseCSACache))
        pool, clock = state.pool, state.clock
        return SessionStats(
            mode=self.mode, policy=self.describe(), context_tokens=state.position, csa_entries=entries,
            resident_entries=resident, device_bytes=device_bytes, full_bytes=full_bytes,
            device_bytes_by_device=by_device, triggers=len(changes),
            selected_per_trigger=tuple(change.selected for change in changes),
            entries_fetched=sum(change.fetched for change in changes) + misses,
            fetch_bytes_to_device=pool.moved_bytes("fetch") if pool else 0,
            prefill_bytes_to_device=pool.moved_bytes("prefill") if pool else 0,
            trigger_seconds=clock.trigger_seconds, prefetch_seconds=clock.prefetch_seconds,
            prefetch_wait_seconds=clock.prefetch_wait_seconds, prefill_tokens=clock.prefill_tokens,
            prefill_seconds=clock.prefill_seconds, decode_tokens=clock.decode_tokens,
            decode_seconds=clock.decode_seconds, cold_pool_bytes=pool.nbytes if pool else 0)

    # ---- text -----------------------------------------------------------------------------------------------

    def _encode(self, prompt, add_special_tokens: bool) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise SessionError("this model has no tokenizer: pass the prompt as token ids")
            ids = self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
        else:
            ids = torch.as_tensor(prompt).reshape(-1).tolist() if not isinstance(prompt, list) else list(prompt)
        if not ids:
            raise SessionError("the prompt is empty")
        vocab = self.backbone_config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or t < 0 or t >= vocab]
        if bad:
            raise SessionError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        return ids

    def _start_ids(self) -> list[int]:
        """The start token alone (unconditional generation)."""
        bos = getattr(self.tokenizer, "bos_token_id", None) if self.tokenizer is not None else None
        bos = bos if bos is not None else getattr(self.backbone_config, "bos_token_id", None)
        if bos is None:
            raise SessionError("unconditional generation needs a start token, and this model defines none")
        return [int(bos)]

    def _text(self, ids: list[int]) -> str:
        if self.tokenizer is None or not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _eos_ids(self) -> set[int]:
        eos = getattr(self.backbone_config, "eos_token_id", None)
        if eos is None and self.tokenizer is not None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return set()
        return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def _oom_errors() -> tuple[type[BaseException], ...]:
    return (torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError") else (torch.cuda.OutOfMemoryError,)

