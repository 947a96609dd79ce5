"""``Session``: DeepSeek-V4 decoding with Lookahead Sparse Attention and a CPU cold pool (or plain, as baseline).

One explicit loop over explicit state (the gpt-fast way): the backbone's cache (sliding windows, HCA entries,
and for LSA the resident CSA entries), the :class:`~.cold_pool.ColdPool` holding every CSA entry, the
resident-set policy, the trigger counter. Per ``generate`` call:

1. prefill the prompt in chunks with the model's own semantics (the native top-k sees every entry); CSA
   entries go to the cold pool;
2. the first trigger fires when prefill ends: the policy (FlashMemory's memory indexer for ``mode="lsa"``)
   selects the resident set from h_t0 of its layers; only entries not yet resident are copied in;
3. decode; every tau steps another trigger. Between triggers, entries born during decoding stay resident; in
   every CSA layer the native Lightning Indexer picks its top-k among resident entries only. With
   ``prefetch_steps=d`` each later trigger fires d steps before the window boundary and is prepared on a helper
   thread while decoding goes on; the new set is swapped in at the boundary (:mod:`~.prefetch`).

``mode="full"`` runs the same loop with the stock ``DynamicCache`` (plain DeepSeek-V4: the baseline).
See docs/DESIGN.md, "Session", for the contracts and the accounting.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .backbone import (CSA, HCA, cache_kwarg, config_hash, csa_layers, csa_rate, default_model_name,
                       load_backbone, validate_memory_layers)
from .capture import prefill_chunk_length
from .cold_pool import ColdPool
from .decode_graphs import install_decode_graphs
from .errors import FmIndexError
from .lsa_cache import LSACSACache, build_lsa_cache, install_lsa_compressors, set_resident_all
from .prefetch import ResidentPrefetcher
from .resident_policy import (AllEntriesPolicy, HiSparsePolicy, MemoryIndexerPolicy, RandomPolicy, RecentPolicy,
                              ResidentPolicy, TriggerState, check_budget, memory_indexer_layers)

MODES = ("lsa", "full", "all", "recent", "random", "hisparse")
EXPORT_FORMAT = "fm-index-lsa/1"


class SessionError(FmIndexError):
    """A Session option or input the user can fix (mode, tau, threshold, prompt, indexer export)."""


class DeviceMemoryError(FmIndexError):
    """The device ran out of memory; the message says what to shrink."""


# ---- results --------------------------------------------------------------------------------------------


@dataclass
class StreamToken:
    """One generated token: its id and the text it adds (empty without a tokenizer)."""

    token_id: int
    text: str


@dataclass
class Generation:
    """What ``Session.generate`` returns; ``str(generation)`` is the generated text."""

    token_ids: list[int]
    text: str
    prompt_tokens: int
    finish_reason: str  # "length" (max_new_tokens), "eos", or "max_position" (model's maximum context)
    stats: "SessionStats"

    def __str__(self) -> str:
        return self.text


KINDS = ("window", "pending", "hca", "csa_kv", "csa_index_keys", "memory_index_keys")
KIND_LABELS = {
    "window": "sliding-window KV (all layers)",
    "pending": "open compression windows",
    "hca": "HCA compressed KV",
    "csa_kv": "CSA compressed KV (resident)",
    "csa_index_keys": "CSA indexer keys (resident)",
    "memory_index_keys": "indexer keys of all entries (memory layers)",
}


@dataclass
class SessionStats:
    """Device KV footprint and trigger/fetch counters of the current (last) decoding state.

    ``device_bytes[kind]``: real bytes of the tensors held on the device (allocated storage, shared storage
    counted once). ``full_bytes[kind]``: what full decoding holds for the same tokens (every CSA entry's KV
    and indexer keys on the device). ``footprint_ratio`` = sum(device_bytes) / sum(full_bytes).
    """

    mode: str
    policy: str
    context_tokens: int = 0
    csa_entries: int = 0
    resident_entries: int = 0
    device_bytes: dict[str, int] = field(default_factory=dict)
    full_bytes: dict[str, int] = field(default_factory=dict)
    triggers: int = 0
    entries_fetched: int = 0
    fetch_bytes_to_device: int = 0
    prefill_bytes_to_device: int = 0
    trigger_seconds: float = 0.0
    prefetch_seconds: float = 0.0
    prefetch_wait_seconds: float = 0.0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    cold_pool_bytes: int = 0

    @property
    def device_total(self) -> int:
        return sum(self.device_bytes.values())

    @property
    def full_total(self) -> int:
        return sum(self.full_bytes.values())

    @property
    def footprint_ratio(self) -> float:
        return self.device_total / self.full_total if self.full_total else 1.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items()}
        out.update(device_total=self.device_total, full_total=self.full_total,
                   footprint_ratio=self.footprint_ratio,
                   decode_tokens_per_second=self.decode_tokens_per_second,
                   prefill_tokens_per_second=self.prefill_tokens_per_second)
        return out

    def table(self):
        """A rich ``Table`` of the footprint by kind and the counters."""
        from rich.table import Table

        table = Table(title=f"KV footprint: {self.policy}")
        table.add_column("device state")
        table.add_column("held", justify="right")
        table.add_column("full decoding", justify="right")
        for kind in KINDS:
            table.add_row(KIND_LABELS[kind], _human(self.device_bytes.get(kind, 0)),
                          _human(self.full_bytes.get(kind, 0)))
        table.add_row("[bold]total[/]", f"[bold]{_human(self.device_total)}[/]", _human(self.full_total))
        table.add_row("[bold]footprint ratio[/]", f"[bold]{self.footprint_ratio:.3f}[/]", "1.000")
        table.add_section()
        for label, value in [
            ("context tokens / CSA entries per layer", f"{self.context_tokens:,} / {self.csa_entries:,}"),
            ("resident CSA entries", f"{self.resident_entries:,}"),
            ("triggers", f"{self.triggers:,}"),
            ("entries fetched (host->device)", f"{self.entries_fetched:,}"),
            ("bytes moved by triggers / by prefill", f"{_human(self.fetch_bytes_to_device)} / "
                                                    f"{_human(self.prefill_bytes_to_device)}"),
            ("time in trigger + fetch (decode thread)", f"{self.trigger_seconds * 1000:,.1f} ms"),
            ("prefetch: helper thread / decode thread waited", f"{self.prefetch_seconds * 1000:,.1f} ms / "
                                                               f"{self.prefetch_wait_seconds * 1000:,.1f} ms"),
            ("prefill", f"{self.prefill_tokens:,} tok, {self.prefill_tokens_per_second:,.0f} tok/s"),
            ("decode", f"{self.decode_tokens:,} tok, {self.decode_tokens_per_second:,.1f} tok/s"),
            ("cold pool (host)", _human(self.cold_pool_bytes)),
        ]:
            table.add_row(label, value, "")
        return table


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


# ---- the session ----------------------------------------------------------------------------------------


class Session:
    """Decode with a DeepSeek-V4 backbone, full or with Lookahead Sparse Attention.

    Example::

        from lsa_runtime import Session
        s = Session.from_pretrained("tiny", mode="recent", budget=64, tau=16)
        out = s.generate("The cold pool", max_new_tokens=32)
        print(out.text, s.stats.footprint_ratio)

    Modes: ``lsa`` (FlashMemory: needs ``indexer``, an ``fm-index export`` directory or a ``MemoryIndexer``;
    ``max_resident`` caps the set), ``full`` (plain DeepSeek-V4, the baseline), ``all`` (every entry
    resident: lossless), ``recent`` / ``random`` (``budget`` entries per trigger), ``hisparse`` (per-step
    native top-k, ``budget`` buffer entries per CSA layer). ``policy=`` takes any
    :class:`~.resident_policy.ResidentPolicy` instead of a mode (e.g. ``OraclePolicy``, see
    :func:`record_native_picks`). ``tau`` and ``threshold`` default to the export's values (else 64 and 0.5).
    ``prefetch_steps=d`` (0 <= d < tau; default 0, synchronous): each trigger after the first fires d steps before
    the window boundary and is prepared on a helper thread while decoding continues (:mod:`~.prefetch`); the
    new set takes effect at the boundary, as without prefetch, but is chosen from the state d steps earlier.
    ``decode_graphs`` (default: on where the model is on a CUDA device): the backbone's stateless modules (the
    mHC hyper-connections, the MoE blocks when their experts implementation allows it) replay CUDA graphs in
    one-token decode steps (:mod:`~.decode_graphs`; bit-identical outputs, far fewer kernel launches);
    installed once per model and kept. False leaves the model eager.
    """

    def __init__(self, model, tokenizer=None, *, mode: str = "lsa", indexer=None, tau: int | None = None,
                 threshold: float | None = None, max_resident: int | None = None, budget: int | None = None,
                 policy: ResidentPolicy | None = None, chunk_size: int = 512, seed: int = 0,
                 max_score_bytes: int = 1 << 30, memory_keys: str = "device", prefetch_steps: int = 0,
                 decode_graphs: bool | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.decoder = model.model if hasattr(model, "model") else model
        self.csa_layers = csa_layers(self.config)
        self.rate = csa_rate(self.config)
        export = None
        if policy is None:
            if mode not in MODES:
                raise SessionError(f"unknown mode '{mode}' (use one of {', '.join(MODES)})")
            if mode == "lsa":
                if indexer is None:
                    raise SessionError("mode 'lsa' needs an exported memory indexer: pass indexer=DIR "
                                       "(the output of `fm-index export`), or use mode='full'")
                memory_indexer, export = load_memory_indexer(indexer, model)
                threshold = export.get("threshold", 0.5) if threshold is None else threshold
                cap = _one_cap(max_resident, budget)
                policy = MemoryIndexerPolicy(memory_indexer, threshold=_check_threshold(threshold), max_resident=cap)
            elif mode == "all":
                policy = AllEntriesPolicy()
            elif mode in ("recent", "random", "hisparse"):
                cap = _one_cap(max_resident, budget)
                if cap is None:
                    raise SessionError(f"mode '{mode}' needs budget=N (resident entries per "
                                       f"{'CSA layer' if mode == 'hisparse' else 'trigger'})")
                policy = {"recent": lambda: RecentPolicy(cap), "random": lambda: RandomPolicy(cap, seed=seed),
                          "hisparse": lambda: HiSparsePolicy(cap)}[mode]()
        else:
            if not isinstance(policy, ResidentPolicy):
                raise SessionError(f"policy must be a ResidentPolicy, got {type(policy).__name__}")
            mode = policy.name
        if threshold is not None:
            _check_threshold(threshold)
        if memory_keys not in ("device", "pool"):
            raise SessionError(f"memory_keys must be 'device' or 'pool', got {memory_keys!r}")
        self.memory_keys = memory_keys
        self.mode = mode
        self.policy = policy
        if policy is not None and policy.memory_layers:
            validate_memory_layers(self.config, policy.memory_layers)
        if policy is not None and policy.per_step_buffer is not None and \
                policy.per_step_buffer < self.config.index_topk:
            raise SessionError(f"the per-step buffer ({policy.per_step_buffer} entries) must hold one step's "
                               f"top-k ({self.config.index_topk} entries)")
        default_tau = (export or {}).get("tau", 64)
        self.tau = _check_tau(default_tau if tau is None else tau)
        if not isinstance(prefetch_steps, int) or not 0 <= prefetch_steps < self.tau:
            raise SessionError(f"prefetch_steps must be an integer in 0..tau-1 = 0..{self.tau - 1} (decode steps "
                               f"before the window boundary at which the next set is prepared), got {prefetch_steps!r}")
        self.prefetch_steps = prefetch_steps
        self._prefetcher = ResidentPrefetcher() if prefetch_steps else None
        if int(chunk_size) < 1:
            raise SessionError(f"chunk_size must be >= 1 token, got {chunk_size}")
        self.chunk_size = int(chunk_size)
        self.max_score_bytes = int(max_score_bytes)
        self.max_positions = int(getattr(self.config, "max_position_embeddings", 0) or 0)
        if self.policy is not None:
            install_lsa_compressors(model)
        on_cuda = next(model.parameters()).device.type == "cuda"
        self.decode_graphs = install_decode_graphs(model) if (on_cuda if decode_graphs is None else decode_graphs) \
            else None
        self._cache_kw = cache_kwarg()
        self._reset_state()

    # ---- construction ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model: str | Path | None = None, indexer=None, mode: str = "lsa", tau: int | None = None,
                        threshold: float | None = None, device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None, **options) -> "Session":
        """Load a backbone (bundled name or DeepSeek-V4 checkpoint directory; default: the bundled default,
        ``reference``) and build a Session on it."""
        if mode not in MODES:
            raise SessionError(f"unknown mode '{mode}' (use one of {', '.join(MODES)})")
        if mode == "lsa" and indexer is None and options.get("policy") is None:
            raise SessionError("mode 'lsa' needs an exported memory indexer: pass indexer=DIR "
                               "(the output of `fm-index export`), or use mode='full'")
        if tau is not None:
            _check_tau(tau)
        if threshold is not None:
            _check_threshold(threshold)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if model is None:
            model = default_model_name()
        try:
            backbone, tokenizer = load_backbone(model, device=device, dtype=dtype)
        except _oom_errors() as exc:
            raise DeviceMemoryError(f"out of memory loading the backbone on {device}: {_first_line(exc)}") from None
        return cls(backbone, tokenizer, mode=mode, indexer=indexer, tau=tau, threshold=threshold, **options)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- state ----------------------------------------------------------------------------------------

    def _reset_state(self) -> None:
        self._cache = None
        self._pool: ColdPool | None = None
        self._position = 0
        self._pending: int | None = None  # last sampled token, not yet run through the backbone
        self.finish_reason: str | None = None  # of the last generate/stream: "length", "eos", "max_position"
        self._context: list[int] = []  # tokens run through the backbone
        self._since_trigger = 0
        self._prefetch_resident: torch.Tensor | None = None  # resident ids when the in-flight prefetch started
        self._hidden: dict[int, torch.Tensor] = {}
        self._stats = SessionStats(mode=self.mode, policy=self.policy.describe() if self.policy else "full")

    def reset(self) -> None:
        """Forget the conversation: the next ``generate`` starts from an empty context (it does anyway unless
        ``keep_context=True``)."""
        self._reset_state()

    def _new_cache(self):
        from transformers import DynamicCache

        if self.policy is None:
            return DynamicCache(config=self.config)
        widths = {"compressor": self.config.head_dim, "indexer": self.config.index_head_dim}
        self._pool = ColdPool(self.csa_layers, widths, dtype=self._kv_dtype())
        # memory_keys="pool": the memory layers' K^IComp of every entry stays in the cold pool after prefill and
        # each trigger streams it to the device (ColdPool.stream_prefix) instead of holding it resident
        keys_resident = self.policy.memory_layers if self.memory_keys == "device" else ()
        return build_lsa_cache(self.config, self._pool, keys_resident, buffer_entries=self.policy.per_step_buffer)

    def _kv_dtype(self) -> torch.dtype:
        return self.decoder.layers[self.csa_layers[0]].self_attn.compressor.kv_proj.weight.dtype

    # ---- generation -----------------------------------------------------------------------------------

    def generate(self, prompt: str | Sequence[int] | torch.Tensor, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop_at_eos: bool = True, keep_context: bool = False) -> Generation:
        """Generate up to ``max_new_tokens`` tokens after ``prompt`` (text, or token ids).

        ``temperature`` 0 is greedy decoding; otherwise sampling with optional ``top_k``/``top_p`` (``seed``
        makes it repeatable). Each call starts from a clean state unless ``keep_context=True``, which appends
        ``prompt`` to the previous call's prompt and output (a conversation).
        """
        tokens: list[int] = []
        finish = {"reason": "length", "prompt_tokens": 0}
        for piece in self._run(prompt, max_new_tokens, temperature, top_p, top_k, seed, stop_at_eos,
                               keep_context, finish):
            tokens.append(piece.token_id)
        stats = self.stats
        snapshot = replace(stats, device_bytes=dict(stats.device_bytes), full_bytes=dict(stats.full_bytes))
        return Generation(token_ids=tokens, text=self._decode(tokens), prompt_tokens=finish["prompt_tokens"],
                          finish_reason=finish["reason"], stats=snapshot)

    def stream(self, prompt: str | Sequence[int] | torch.Tensor, max_new_tokens: int = 128,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
               stop_at_eos: bool = True, keep_context: bool = False) -> Iterator[StreamToken]:
        """Like :meth:`generate`, but yields each token (id and text piece) as soon as it is sampled.
        Bad input is reported here, before the first token."""
        return self._run(prompt, max_new_tokens, temperature, top_p, top_k, seed, stop_at_eos, keep_context,
                         {"reason": "length", "prompt_tokens": 0})

    def _run(self, prompt, max_new_tokens, temperature, top_p, top_k, seed, stop_at_eos, keep_context, finish):
        """Validate everything now (eagerly), then return the token generator."""
        if int(max_new_tokens) < 0:
            raise SessionError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise SessionError(f"temperature must be >= 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise SessionError(f"top_p must be in (0, 1], got {top_p}")
        if keep_context and self._cache is None:
            raise SessionError("keep_context=True needs a previous generate() call on this Session")
        ids = self._encode(prompt, add_special_tokens=not keep_context)
        if keep_context and self._pending is not None:
            ids = [self._pending] + ids  # the previous call's last token was never run through the model
        total = (self._position if keep_context else 0) + len(ids)
        if self.max_positions and total > self.max_positions:
            raise SessionError(f"prompt is {total:,} tokens (with the context), longer than the model's maximum "
                               f"of {self.max_positions:,} (max_position_embeddings)")
        if not keep_context:
            self._reset_state()
        self._pending = None
        finish["prompt_tokens"] = len(ids)
        generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        eos = _eos_ids(self.config, self.tokenizer) if stop_at_eos else set()
        return self._tokens(ids, int(max_new_tokens), float(temperature), top_p, int(top_k), generator, eos, finish)

    def _tokens(self, ids, max_new_tokens, temperature, top_p, top_k, generator, eos, finish):
        handles = self._register_hidden_hooks()
        try:
            yield from self._loop(ids, max_new_tokens, temperature, top_p, top_k, generator, eos, finish)
        except _oom_errors() as exc:
            self._cache = None  # the state is incomplete; the next call starts fresh
            raise DeviceMemoryError(
                f"out of memory at {self._position:,} tokens ({_first_line(exc)}); try a smaller chunk_size, "
                f"a smaller max_resident/budget, or a lower-precision dtype") from None
        except RuntimeError as exc:
            if "can't allocate memory" not in str(exc) and "out of memory" not in str(exc):
                raise
            self._cache = None
            raise DeviceMemoryError(f"out of host memory at {self._position:,} tokens ({_first_line(exc)}); "
                                    "try a smaller chunk_size or a shorter prompt") from None
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def _loop(self, ids, max_new_tokens, temperature, top_p, top_k, generator, eos, finish):
        stats = self._stats
        self.finish_reason = "length"
        if self._cache is None:
            self._cache = self._new_cache()
        # ---- prefill -----------------------------------------------------------------------------------
        start = time.perf_counter()
        pool_before = self._pool.bytes_to_device if self._pool else 0
        for layer in self._lsa_layers():
            layer.begin_prefill()
        logits = None
        ids_tensor = torch.tensor(ids, dtype=torch.long)
        done = 0
        while done < len(ids):
            n = self._chunk_length(self._position)
            logits = self._forward(ids_tensor[done : done + n])
            done += n
        for layer in self._lsa_layers():
            layer.end_prefill()
        if self._pool:
            stats.prefill_bytes_to_device += self._pool.bytes_to_device - pool_before
        self._context.extend(ids)
        self._synchronize()
        stats.prefill_tokens += len(ids)
        stats.prefill_seconds += time.perf_counter() - start
        triggers = self.policy is not None and self.policy.per_step_buffer is None
        if triggers:
            self._trigger()
        # ---- decode ------------------------------------------------------------------------------------
        start = time.perf_counter()
        produced: list[int] = []
        text_so_far = ""
        try:
            for step in range(max_new_tokens):
                token = _sample(logits, temperature, top_p, top_k, generator)
                produced.append(token)
                stats.decode_tokens += 1
                text = self._decode(produced)
                piece, text_so_far = text[len(text_so_far):], text
                last = step == max_new_tokens - 1 or token in eos or \
                    (self.max_positions and self._position >= self.max_positions)
                if last:
                    self._pending = token
                    finish["reason"] = "eos" if token in eos else (
                        "length" if step == max_new_tokens - 1 else "max_position")
                    self.finish_reason = finish["reason"]
                    yield StreamToken(token, piece)
                    break
                yield StreamToken(token, piece)
                self._context.append(token)
                logits = self._forward(torch.tensor([token]))
                self._since_trigger += 1
                if triggers and self.prefetch_steps and self._since_trigger == self.tau - self.prefetch_steps:
                    self._start_prefetch()
                if triggers and self._since_trigger >= self.tau:
                    if self._prefetcher is not None and self._prefetcher.pending:
                        self._swap_prefetched()
                    else:
                        self._trigger()
        finally:
            if self._prefetcher is not None:
                self._prefetcher.close()  # drop a set for a window that will not be decoded; no idle thread left
            self._synchronize()
            stats.decode_seconds += time.perf_counter() - start

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Run ``ids`` (1-D) at the next positions; returns the last position's logits ``[vocab]``."""
        device = self.device
        n = ids.numel()
        positions = torch.arange(self._position, self._position + n, device=device).unsqueeze(0)
        out = self.model(input_ids=ids.to(device).unsqueeze(0), position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self._cache_kw: self._cache})
        self._position += n
        return out.logits[0, -1]

    def _chunk_length(self, start: int) -> int:
        return prefill_chunk_length(self.config, start, self.chunk_size, self.max_score_bytes)

    # ---- triggers -----------------------------------------------------------------------------------------

    def _lsa_layers(self) -> list[LSACSACache]:
        if self._cache is None:
            return []
        return [layer for layer in self._cache.layers if isinstance(layer, LSACSACache)]

    def _register_hidden_hooks(self):
        """Keep h_t (attention input, after input_layernorm) of the last position at each memory layer."""
        handles = []
        if self.policy is None:
            return handles
        for idx in self.policy.memory_layers:
            def keep_last(module, args, kwargs, idx=idx):
                hidden = args[0] if args else kwargs["hidden_states"]
                self._hidden[idx] = hidden[0, -1].detach().clone()  # not a view: frees the chunk

            handles.append(self.decoder.layers[idx].self_attn.register_forward_pre_hook(keep_last, with_kwargs=True))
        return handles

    def _trigger_state(self) -> tuple[list[LSACSACache], TriggerState]:
        """What a trigger at the last processed token looks at (views and references, no copies; memory keys
        kept in the pool are streamed later, by :meth:`_select`)."""
        layers = self._lsa_layers()
        n_visible = max((layer.n_entries for layer in layers), default=0)
        index_keys = {layer.layer_idx: layer.all_index_keys.view() for layer in layers
                      if layer.layer_idx in self.policy.memory_layers and layer.all_index_keys is not None}
        state = TriggerState(
            position=self._position - 1, n_visible=n_visible, trigger_index=self._stats.triggers,
            resident=layers[0].resident_ids if layers else torch.zeros(0, dtype=torch.long),
            hidden=dict(self._hidden), index_keys=index_keys,
        )
        return layers, state

    def _select(self, state: TriggerState) -> torch.Tensor:
        """The policy's entries for ``state`` (sorted unique host int64), checked against ``n_visible``."""
        for layer in self.policy.memory_layers:
            if layer not in state.index_keys:  # memory_keys="pool": streamed for this trigger, freed after it
                state.index_keys[layer] = self._pool.stream_prefix(layer, "indexer", state.n_visible, self.device)
        ids = torch.as_tensor(self.policy.select(state), dtype=torch.long).reshape(-1).cpu()
        ids = torch.unique(ids)  # sorted
        if ids.numel() and (int(ids[0]) < 0 or int(ids[-1]) >= state.n_visible):
            bad = int(ids[0]) if int(ids[0]) < 0 else int(ids[-1])
            raise SessionError(f"policy '{self.policy.name}' selected entry {bad}, outside the {state.n_visible} "
                               "visible entries")
        return ids

    def _headroom(self) -> int:
        return self.tau // self.rate + 2  # entries born before the next trigger

    def _trigger(self) -> None:
        """Select the resident set from the state at the last processed token and make every CSA layer hold it."""
        start = time.perf_counter()
        stats = self._stats
        pool_before = self._pool.bytes_to_device if self._pool else 0
        layers, state = self._trigger_state()
        ids = self._select(state)
        set_resident_all(layers, ids, self._headroom())  # one plan for all layers: they hold the same entries
        stats.fetch_bytes_to_device += (self._pool.bytes_to_device if self._pool else 0) - pool_before
        stats.entries_fetched += int((~torch.isin(ids, state.resident)).sum())
        stats.triggers += 1
        self._since_trigger = 0
        self._synchronize()
        stats.trigger_seconds += time.perf_counter() - start

    def _start_prefetch(self) -> None:
        """Fire the next window's trigger now, on the helper thread; decoding goes on with the current set."""
        start = time.perf_counter()
        layers, state = self._trigger_state()
        state.lead = self.prefetch_steps
        self._prefetch_resident = state.resident
        # entries born in the prefetch_steps before the boundary join the set at the swap: room for them too
        headroom = self._headroom() + self.prefetch_steps // self.rate + 1
        self._prefetcher.start(layers, lambda: self._select(state), headroom, self.device)
        self._stats.trigger_seconds += time.perf_counter() - start

    def _swap_prefetched(self) -> None:
        """At the window boundary: make the prepared set resident (waiting for the helper if it is not done)."""
        start = time.perf_counter()
        stats = self._stats
        swap = self._prefetcher.finish(self._lsa_layers())
        stats.fetch_bytes_to_device += swap.bytes_to_device
        stats.entries_fetched += int((~torch.isin(swap.ids, self._prefetch_resident)).sum())
        stats.prefetch_seconds += swap.prefetch_seconds
        stats.prefetch_wait_seconds += swap.wait_seconds
        stats.triggers += 1
        self._since_trigger = 0
        stats.trigger_seconds += time.perf_counter() - start

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- introspection ----------------------------------------------------------------------------------

    def resident_entries(self) -> dict[int, torch.Tensor]:
        """Resident entry indices per CSA layer (LSA modes; empty for full)."""
        return {layer.layer_idx: layer.resident_ids for layer in self._lsa_layers()}

    def last_picks(self) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
        """Per CSA layer, the native top-k picks of the last forward and the candidates it chose among (entry
        indices; candidates None = every entry)."""
        return {layer.layer_idx: (layer.last_picks, layer.last_candidates) for layer in self._lsa_layers()}

    @property
    def context_ids(self) -> list[int]:
        """Token ids of the current context (prompts and generated tokens)."""
        return self._context + ([self._pending] if self._pending is not None else [])

    @property
    def stats(self) -> SessionStats:
        """Footprint of the current decoding state and the counters of the last ``generate`` (see SessionStats)."""
        stats = self._stats
        stats.context_tokens = self._position
        if self._cache is None:
            stats.device_bytes, stats.full_bytes = {}, {}
            return stats
        device_bytes, full_bytes, entries, resident = measure_cache(self._cache, self.config)
        stats.device_bytes, stats.full_bytes = device_bytes, full_bytes
        stats.csa_entries, stats.resident_entries = entries, resident
        buffers = [layer.buffer for layer in self._lsa_layers() if layer.buffer is not None]
        if buffers:  # per-step mode: fetches are buffer misses, counted per layer
            stats.entries_fetched = sum(buffer.misses for buffer in buffers)
            stats.fetch_bytes_to_device = sum(buffer.bytes_fetched for buffer in buffers)
        stats.cold_pool_bytes = self._pool.nbytes if self._pool else 0
        return stats

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
        vocab = self.config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or t < 0 or t >= vocab]
        if bad:
            raise SessionError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        return ids

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None or not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)


# ---- helpers ----------------------------------------------------------------------------------------------


def measure_cache(cache, config) -> tuple[dict[str, int], dict[str, int], int, int]:
    """Real device bytes by kind of ``cache`` (stock or LSA), and what full decoding holds for the same tokens.

    Returns ``(device_bytes, full_bytes, csa_entries_per_layer, resident_entries)``. Storage shared between
    tensors (K = V in DeepSeek-V4, views of one buffer) is counted once.
    """
    seen: set[int] = set()

    def size(tensors) -> int:
        total = 0
        for t in tensors:
            if t is None or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() in seen or storage.nbytes() == 0:
                continue
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return total

    device = dict.fromkeys(KINDS, 0)
    full = dict.fromkeys(KINDS, 0)
    entries = resident = 0
    for idx, layer in enumerate(cache.layers):
        window = size([getattr(layer, "keys", None), getattr(layer, "values", None)])
        device["window"] += window
        full["window"] += window
        if not hasattr(layer, "compressed_kv"):
            continue
        pending = [t for states in (layer.buffer_kv, layer.buffer_gate, getattr(layer, "overlap_kv", {}),
                                    getattr(layer, "overlap_gate", {})) for t in states.values()]
        pending_bytes = size(pending)
        device["pending"] += pending_bytes
        full["pending"] += pending_bytes
        if config.layer_types[idx] == HCA:
            hca = size([layer.compressed_kv["compressor"]])
            device["hca"] += hca
            full["hca"] += hca
            continue
        if config.layer_types[idx] != CSA:
            continue
        n = layer.entry_count["compressor"]
        entries = max(entries, n)
        if isinstance(layer, LSACSACache):
            held = layer.device_tensors()
            device["csa_kv"] += size(held["resident_kv"])
            device["csa_index_keys"] += size(held["resident_index_keys"])
            device["memory_index_keys"] += size(held["memory_index_keys"])
            resident = max(resident, layer.resident_count)
            itemsize = torch.empty((), dtype=layer.dtype).element_size() if layer.dtype else 0
            full["csa_kv"] += n * config.head_dim * itemsize
            full["csa_index_keys"] += n * config.index_head_dim * itemsize
        else:
            kv, keys = layer.compressed_kv["compressor"], layer.compressed_kv["indexer"]
            device["csa_kv"] += size([kv])
            device["csa_index_keys"] += size([keys])
            full["csa_kv"] += kv.numel() * kv.element_size() if kv is not None else 0
            full["csa_index_keys"] += keys.numel() * keys.element_size() if keys is not None else 0
            resident = max(resident, n)
    return device, full, entries, resident


def record_native_picks(session: "Session", prompt, max_new_tokens: int, **generate_options):
    """Decode with ``session`` (a ``mode="full"`` Session) and record, for every decode query position t, the
    entries the native top-k picked at any CSA layer. Returns ``(Generation, {t: int64 entry indices})``: the
    input of :class:`~.resident_policy.OraclePolicy`."""
    if session.policy is not None:
        raise SessionError("record_native_picks needs a mode='full' Session (the stock model's own picks)")
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


def load_memory_indexer(indexer, model):
    """Load and check an ``fm-index export`` directory (or accept a MemoryIndexer object) for ``model``.

    Returns ``(memory_indexer, lsa_config dict)``. Refuses an export made for another backbone (config hash),
    a layer that is not CSA, or a geometry that does not match the backbone.
    """
    device = next(model.parameters()).device
    if not isinstance(indexer, (str, Path)):
        if not hasattr(indexer, "config") or not hasattr(indexer, "score"):
            raise SessionError("indexer must be an export directory or a MemoryIndexer")
        validate_memory_layers(model.config, memory_indexer_layers(indexer))
        want = getattr(indexer.config, "backbone_config_hash", "")
        if want and want != config_hash(model.config):
            raise SessionError(f"the memory indexer was built for another backbone (config hash {want}, this "
                               f"model has {config_hash(model.config)})")
        return indexer.to(device).eval(), {"tau": indexer.config.tau, "threshold": indexer.config.threshold}
    path = Path(indexer).expanduser()
    config_file = path / "lsa_config.json"
    if not path.is_dir():
        raise SessionError(f"indexer export {path} is not a directory")
    if not config_file.is_file():
        raise SessionError(f"{path} is not an fm-index export: no lsa_config.json (run `fm-index export`)")
    try:
        lsa_config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SessionError(f"cannot read {config_file}: {_first_line(exc)}") from None
    if lsa_config.get("format") != EXPORT_FORMAT:
        raise SessionError(f"{config_file} has format {lsa_config.get('format')!r}, expected {EXPORT_FORMAT!r}")
    want, have = lsa_config.get("backbone_config_hash"), config_hash(model.config)
    if want != have:
        raise SessionError(f"indexer {path} was exported for another backbone (config hash {want}, this model "
                           f"has {have})")
    try:
        validate_memory_layers(model.config, lsa_config.get("layers") or [])
    except FmIndexError as exc:
        raise SessionError(f"{config_file}: {exc}") from None
    for key, value in (("index_n_heads", model.config.index_n_heads), ("index_head_dim", model.config.index_head_dim),
                       ("hidden_size", model.config.hidden_size)):
        if key in lsa_config and int(lsa_config[key]) != int(value):
            raise SessionError(f"{config_file}: {key} is {lsa_config[key]}, the backbone has {value}")
    from .memory_indexer import MemoryIndexer

    memory_indexer = MemoryIndexer.from_export(path, expected_config_hash=have, device=device)
    return memory_indexer, lsa_config


def _sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator) -> int:
    if temperature == 0.0:
        return int(torch.argmax(logits))
    scores = logits.float().cpu() / temperature
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(scores, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative - ordered.softmax(-1) >= top_p  # keep the prefix that reaches top_p
        scores[order[drop]] = float("-inf")
    return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))


def _eos_ids(config, tokenizer) -> set[int]:
    eos = getattr(config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def _one_cap(max_resident, budget):
    max_resident = check_budget(max_resident, "max_resident")
    budget = check_budget(budget)
    if max_resident is not None and budget is not None and max_resident != budget:
        raise SessionError(f"max_resident ({max_resident}) and budget ({budget}) disagree: give one")
    return max_resident if max_resident is not None else budget


def _check_tau(tau) -> int:
    if isinstance(tau, bool) or int(tau) != tau or int(tau) < 1:
        raise SessionError(f"tau must be an integer >= 1 (decode steps between triggers), got {tau}")
    return int(tau)


def _check_threshold(threshold) -> float:
    if not 0.0 < float(threshold) < 1.0:
        raise SessionError(f"threshold must be in (0, 1), got {threshold}")
    return float(threshold)


def _oom_errors() -> tuple[type[BaseException], ...]:
    return (torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError") else (torch.cuda.OutOfMemoryError,)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
