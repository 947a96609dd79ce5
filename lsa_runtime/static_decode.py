"""Static-shape batched decode: one token for each of B sequences, every per-sequence state in fixed-size stores.

:mod:`.batching` runs each sequence's window update and compressor once per row, because transformers keeps that
state in per-sequence ``DynamicCache`` layers that grow by concatenation: a step's kernel count grows with B and
its shapes change as entries are emitted. Here one :class:`StaticDecodeState` owns, per layer, batch-wide stores of
fixed capacity (docs/DESIGN.md, "Static-shape decode"):

- the sliding window as a ring ``[B, W, D]`` (position p lives in slot ``p % W``);
- per compression series (HCA compressor; CSA compressor and its Lightning Indexer) a :class:`CompressedStore`:
  the open window's projected tokens ``[B, m, F]``, for CSA the previous window's Ca half (the overlap)
  ``[B, m, D]``, and the emitted entries ``[B, cap, D]`` with per-row lengths: C^Comp for the compressors,
  K^IComp for the indexer.

A step writes with ``index_put_`` at per-row offsets and ``torch.where`` under per-row emission masks, scores the
Lightning Indexer I[t,s] over all ``cap`` slots with -inf beyond each row's length, takes a fixed top-k (picks
beyond the length masked) and attends over window + picks (CSA) or window + all entries (HCA) with the sinks,
reading the one shared K=V head once (:func:`_shared_kv_attention`). There is no loop over rows, no host
synchronisation and no data-dependent shape in the step: the same operators on the same shapes run every step,
whichever rows emit, so the step (:func:`static_step`, which reads only the state's buffers) is captured as one
CUDA graph per batch size (tested on the H200, fp32 and bf16). That holds for the whole model step when the MoE
experts run transformers' ``grouped_mm`` (bf16) or ``batched_mm`` (:func:`use_capturable_experts`); the ``eager``
experts loop calls ``nonzero``. Rows join and leave host-side: a finished row is stepped and ignored until
:meth:`StaticDecodeState.load_row` puts the next sequence in it, in place. :mod:`.compiled_step` compiles the
layers for fewer kernels.

Milestone 1 (full semantics): every emitted entry is an indexer candidate, as transformers decodes; the stock
eager model decoding each sequence alone with a ``DynamicCache`` is the reference (tests/test_static_decode.py).
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch

from .backbone import CSA, HCA, cache_kwarg
from .fused_inputs import project_inputs


def _v4():
    from transformers.models.deepseek_v4 import modeling_deepseek_v4

    return modeling_deepseek_v4


@dataclass(frozen=True)
class StaticGeometry:
    """The shapes of a :class:`StaticDecodeState`, fixed for its life."""

    batch: int  # B rows (sequences)
    capacity: int  # tokens per row: positions 0 .. capacity - 1
    window: int  # W sliding-window keys per row
    head_dim: int  # D of the shared K=V and of C^Comp
    index_head_dim: int  # D_I of K^IComp
    csa_rate: int  # m
    hca_rate: int  # m'
    layer_types: tuple[str, ...]
    # LSA's resident mode: entry slots per CSA layer and row (the resident set and the entries born before the next
    # trigger; :mod:`.static_residency` fills them). None: full semantics, a slot for every entry the row can emit
    resident: int | None = None

    @classmethod
    def from_config(cls, config, batch: int, capacity: int, resident: int | None = None) -> StaticGeometry:
        rates = config.compress_rates
        if resident is not None and (isinstance(resident, bool) or not isinstance(resident, int) or resident < 1):
            raise ValueError(f"resident must be a number of entry slots >= 1, got {resident!r}")
        return cls(batch=batch, capacity=capacity, window=config.sliding_window, head_dim=config.head_dim,
                   index_head_dim=config.index_head_dim, csa_rate=rates[CSA], hca_rate=rates[HCA],
                   layer_types=tuple(config.layer_types), resident=resident)

    def entries(self, rate: int) -> int:
        """Entry slots per row for a series of compression rate ``rate``: positions < capacity emit at most
        ``capacity // rate`` entries (one when a token at position ``p`` has ``(p + 1) % rate == 0``)."""
        return max(1, self.capacity // rate)

    def csa_slots(self) -> int:
        """Entry slots per CSA layer and row: the resident capacity in LSA's resident mode, else every entry."""
        return self.resident if self.resident is not None else self.entries(self.csa_rate)


class CompressedStore:
    """One compression series for B rows at fixed shapes (stock state: ``DeepseekV4HCACache`` /
    ``DeepseekV4CSACache`` entry ``name``).

    ``buffer_kv`` / ``buffer_gate`` ``[B, m, F]``: the projected C and Z (paper eqs. 9-10 / 20-21) of the open
    window's tokens, token at position p in slot ``p % m`` (windows start at multiples of m, as stock's
    ``entry_count * m``); F = 2D for CSA (Ca | Cb), D for HCA. ``overlap_kv`` / ``overlap_gate`` ``[B, m, D]`` (CSA
    only): the previous window's Ca half, its gate with the position bias added (as stock keeps it), gate -inf
    before the first window closed (softmax weight 0). ``entries`` ``[B, cap, D]``: the emitted C^Comp (or K^IComp),
    RoPE'd at their window's first position; ``lengths`` ``[B]``: how many are valid per row."""

    def __init__(self, batch: int, rate: int, dim: int, capacity: int, overlap: bool, dtype, device):
        width = 2 * dim if overlap else dim
        self.rate, self.dim, self.overlap = rate, dim, overlap
        self.buffer_kv = torch.zeros(batch, rate, width, dtype=dtype, device=device)
        self.buffer_gate = torch.zeros(batch, rate, width, dtype=dtype, device=device)
        self.overlap_kv = torch.zeros(batch, rate, dim, dtype=dtype, device=device) if overlap else None
        self.overlap_gate = torch.full((batch, rate, dim), float("-inf"), dtype=torch.float32, device=device) \
            if overlap else None
        self.entries = torch.zeros(batch, capacity, dim, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("buffer_kv", "buffer_gate", "overlap_kv", "overlap_gate", "entries", "lengths")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def reset_row(self, row: int) -> None:
        for name, tensor in self.tensors().items():
            tensor[row] = float("-inf") if name == "overlap_gate" else 0

    def load_row(self, row: int, layer, name: str, length: int, rows: torch.Tensor | None = None) -> None:
        """Copy entry ``name`` of a prefilled batch-1 stock cache layer (``length`` tokens seen) into ``row``.
        ``rows`` ``[n, D]``: the entries to hold instead of the layer's own (LSA's resident rows of a cold-pool
        layer, which keeps its entries in the pool)."""
        count = layer.entry_count[name]
        if count != length // self.rate:
            raise ValueError(f"{name}: {count} entries for {length} tokens at rate {self.rate}; the static state "
                             "needs a cache prefilled from position 0")
        held = layer.compressed_kv[name][0] if rows is None else rows
        if held.shape[0] > self.entries.shape[1]:
            raise ValueError(f"{name}: {held.shape[0]} entries exceed the capacity of {self.entries.shape[1]}")
        if held.shape[0]:
            self.entries[row, :held.shape[0]] = held
        self.lengths[row] = held.shape[0]
        open_kv = layer.buffer_kv[name]
        if open_kv is not None and open_kv.shape[1]:  # tokens length - length % m .. length - 1: slots 0 ..
            self.buffer_kv[row, :open_kv.shape[1]] = open_kv[0]
            self.buffer_gate[row, :open_kv.shape[1]] = layer.buffer_gate[name][0]
        if self.overlap and layer.overlap_kv[name] is not None:
            self.overlap_kv[row] = layer.overlap_kv[name][0]
            self.overlap_gate[row] = layer.overlap_gate[name][0]

    def store_row(self, row: int, layer, name: str, length: int, pooled: int | None = None) -> None:
        """The inverse of :meth:`load_row`: write ``row`` (``length`` tokens seen) into entry ``name`` of a batch-1
        stock cache layer, as the stock model would hold it after decoding those tokens itself. ``pooled``: a
        cold-pool layer's entry count (its entries are in the pool; the slots held only the resident ones)."""
        if pooled is None:
            count = int(self.lengths[row])
            layer.compressed_kv[name] = self.entries[row, :count][None].clone()
        else:
            count = pooled
        layer.entry_count[name] = count
        open_tokens = length % self.rate  # the open window's tokens, slots 0 ..
        layer.buffer_kv[name] = self.buffer_kv[row, :open_tokens][None].clone()
        layer.buffer_gate[name] = self.buffer_gate[row, :open_tokens][None].clone()
        if self.overlap:  # stock keeps no overlap until its first window closed
            closed = count > 0
            layer.overlap_kv[name] = self.overlap_kv[row][None].clone() if closed else None
            gate = self.overlap_gate[row][None].to(self.buffer_gate.dtype, copy=True)  # a copy even in fp32
            layer.overlap_gate[name] = gate if closed else None

    def visible(self) -> torch.Tensor:
        """``[B, cap]``: which entry slots hold an emitted entry."""
        return torch.arange(self.entries.shape[1], device=self.lengths.device) < self.lengths[:, None]

    def step(self, module, hidden_states: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor,
             projected: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Add the token at ``positions[r]`` of every row to its open window; rows whose token closes the window
        (``(p + 1) % m == 0``) append one entry (paper eqs. 11-12 / 22-23), the others keep their entries.
        ``module``: the stock compressor or indexer that owns kv_proj, gate_proj, position_bias, kv_norm, rotary_emb
        (its arithmetic is stock's, on one window per row). ``projected``: its kv_proj and gate_proj outputs already
        computed (:mod:`.fused_inputs`), else they run here."""
        v4, m, d = _v4(), self.rate, self.dim
        batch = hidden_states.shape[0]
        slot = positions % m
        if projected is None:
            projected = module.kv_proj(hidden_states), module.gate_proj(hidden_states)
        kv, gate = projected
        self.buffer_kv[rows, slot] = kv[:, 0]
        self.buffer_gate[rows, slot] = gate[:, 0]
        emit = slot == m - 1  # [B]
        gate = self.buffer_gate + module.position_bias  # [B, m, F]
        if self.overlap:  # entry w = softmax-pooled [Ca of window w-1 | Cb of window w] over 2m slots
            window_kv = torch.cat([self.overlap_kv, self.buffer_kv[..., d:]], dim=1)
            window_gate = torch.cat([self.overlap_gate.to(gate.dtype), gate[..., d:]], dim=1)
        else:
            window_kv, window_gate = self.buffer_kv, gate
        # computed for every row (fixed shapes); kept only where the window closed
        pooled = (window_kv * window_gate.softmax(dim=1, dtype=torch.float32).to(window_kv.dtype)).sum(dim=1)
        entry = module.kv_norm(pooled)  # [B, D]
        start = (positions + 1 - m)[:, None]  # the window's first position: the entry's RoPE position
        cos, sin = module.rotary_emb(entry, position_ids=start, layer_type=module.rope_layer_type)
        entry = v4.apply_rotary_pos_emb(entry.view(batch, 1, 1, d), cos, sin).view(batch, d)
        at = self.lengths.clamp(max=self.entries.shape[1] - 1)  # the next free slot (decode_step checks room)
        self.entries[rows, at] = torch.where(emit[:, None], entry, self.entries[rows, at])
        self.lengths.add_(emit.long())
        if self.overlap:  # the closed window's Ca (gate biased) is the next entry's first half
            closed = emit[:, None, None]
            self.overlap_kv.copy_(torch.where(closed, self.buffer_kv[..., :d], self.overlap_kv))
            self.overlap_gate.copy_(torch.where(closed, gate[..., :d].float(), self.overlap_gate))


@dataclass
class StaticLayer:
    """One decoder layer's stores: the window ring, and C^Comp (CSA, HCA) and K^IComp (CSA) series; at a memory
    layer also ``hidden``, where each step writes h_t (its attention block's input at the last position) for a
    trigger to read. A step writes it itself, in the code that compiles and is captured: a forward hook on the
    block did not run inside a compiled layer (torch 2.13: compile_static_step's layers never called it)."""

    window: torch.Tensor  # [B, W, D]
    compressor: CompressedStore | None = None
    indexer: CompressedStore | None = None
    hidden: torch.Tensor | None = None  # [B, hidden_size]


class StaticDecodeState:
    """Every per-sequence decoding state of B rows, in tensors allocated once (shapes and storage never change).

    Build with :meth:`from_caches` (rows prefilled by the stock model, one batch-1 ``DynamicCache`` each, of any
    lengths) or construct empty and :meth:`load_row`. ``tokens`` / ``positions`` ``[B]`` are the step's input
    buffers (:func:`decode_step` copies into them)."""

    def __init__(self, config, batch: int, capacity: int, dtype=torch.float32, device="cpu",
                 resident: int | None = None):
        g = self.geometry = StaticGeometry.from_config(config, batch, capacity, resident)
        self.layers: list[StaticLayer] = []
        for kind in g.layer_types:
            layer = StaticLayer(torch.zeros(batch, g.window, g.head_dim, dtype=dtype, device=device))
            if kind == CSA:
                cap = g.csa_slots()
                layer.compressor = CompressedStore(batch, g.csa_rate, g.head_dim, cap, True, dtype, device)
                layer.indexer = CompressedStore(batch, g.csa_rate, g.index_head_dim, cap, True, dtype, device)
            elif kind == HCA:
                cap = g.entries(g.hca_rate)
                layer.compressor = CompressedStore(batch, g.hca_rate, g.head_dim, cap, False, dtype, device)
            self.layers.append(layer)
        self.rows = torch.arange(batch, device=device)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)

    @classmethod
    def from_caches(cls, config, caches: list, capacity: int, dtype=torch.float32, device="cpu"):
        state = cls(config, len(caches), capacity, dtype, device)
        for row, cache in enumerate(caches):
            state.load_row(row, cache)
        return state

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every state tensor by name (``layers.{i}.window``, ``layers.{i}.compressor.entries``, ...)."""
        out = {"rows": self.rows, "tokens": self.tokens, "positions": self.positions}
        for i, layer in enumerate(self.layers):
            out[f"layers.{i}.window"] = layer.window
            for part in ("compressor", "indexer"):
                store = getattr(layer, part)
                if store is not None:
                    out.update({f"layers.{i}.{part}.{n}": t for n, t in store.tensors().items()})
        return out

    def load_row(self, row: int, cache, resident: dict[int, dict[str, torch.Tensor]] | None = None) -> int:
        """Replace ``row`` by a sequence prefilled with the stock model (a batch-1 ``DynamicCache``); returns its
        next position (tokens seen). Host-side, outside the step. ``resident`` (LSA's resident mode): per CSA layer
        the rows its slots hold, ``{layer: {"compressor": [n, D], "indexer": [n, D_I]}}`` (the cache's CSA layers
        keep their entries in the cold pool; :class:`~.static_residency.StaticResidentRows` passes them)."""
        if (resident is None) != (self.geometry.resident is None):
            raise ValueError("a state in LSA's resident mode loads rows with their resident entries, a full one "
                             "without")
        length = cache.layers[0].cumulative_length
        if length >= self.geometry.capacity:
            raise ValueError(f"row {row}: {length} tokens leave no room in a capacity of {self.geometry.capacity}")
        window = self.geometry.window
        for index, (layer, stock) in enumerate(zip(self.layers, cache.layers, strict=True)):
            if stock.cumulative_length != length or stock.keys.shape[0] != 1:
                raise ValueError("load_row takes one sequence's cache (batch 1), every layer at the same length")
            layer.window[row] = 0
            keys = stock.keys[0, 0]  # the last min(length, W - 1) tokens, oldest first
            layer.window[row, torch.arange(length - keys.shape[0], length) % window] = keys.to(layer.window.dtype)
            for name in ("compressor", "indexer"):
                store = getattr(layer, name)
                if store is not None:
                    store.reset_row(row)
                    rows = resident[index][name] if resident is not None and layer.indexer is not None else None
                    store.load_row(row, stock, name, length, rows)
        return length

    def store_row(self, row: int, cache, length: int, pooled: int | None = None) -> None:
        """Write ``row`` (``length`` tokens seen) back into a batch-1 stock ``DynamicCache`` (the one :meth:`load_row`
        read, or any of the model's layout): afterwards it holds what the stock model's own cache would after
        decoding the same tokens, so the stock model can continue from it and its bytes can be measured.
        Host-side, outside the step. In LSA's resident mode ``pooled`` is the CSA layers' entry count (their entries
        are in the cold pool; :meth:`StaticResidentRows.leave <.static_residency.StaticResidentRows.leave>` hands the
        resident rows back to the sequence's ``ResidentSet``)."""
        if (self.geometry.resident is None) != (pooled is None):
            raise ValueError("store_row: a state in LSA's resident mode writes back with the pooled entry count "
                             "(StaticResidentRows.leave), a full one without")
        window = self.geometry.window
        kept = min(length, window - 1)  # stock keeps the last W - 1 tokens' K=V
        slots = torch.arange(length - kept, length, device=self.rows.device) % window
        for layer, stock in zip(self.layers, cache.layers, strict=True):
            stock.keys = layer.window[row, slots][None, None].clone()
            stock.values = stock.keys
            stock.cumulative_length = length
            for name in ("compressor", "indexer"):
                store = getattr(layer, name)
                if store is not None:
                    store.store_row(row, stock, name, length, pooled if layer.indexer is not None else None)


# bf16 x bf16 -> fp32 batched GEMM (CUDA); absent from older torch builds
_BMM_TO_FP32 = hasattr(torch.ops.aten.bmm, "dtype")


def _index_scores(scorer, q, keys, hidden_states, head_weights: torch.Tensor | None = None) -> torch.Tensor:
    """I[t,s] = sum_h w_{t,h} ReLU(q_{t,h} . K^IComp_s) for one decode query per row (``q`` ``[B, 1, H_I, D_I]``,
    ``keys`` ``[B, cap, D_I]``): transformers' ``DeepseekV4IndexerScorer`` formula, returned as ``[B, cap]``.

    The stock scorer converts every key to fp32 and runs an fp32 GEMM (at 512K and B = 16 on the H200: 8.7 ms of
    conversion and 18.2 ms of SIMT GEMM per step, docs/BENCHMARKS.md). With half-precision keys on CUDA the
    products run instead as one tensor-core GEMM with fp32 output: a product of two bf16 values is exact in fp32
    either way, only the order of the fp32 sums differs. Elsewhere (CPU, fp32) the stock scorer runs."""
    if keys.device.type != "cuda" or keys.dtype not in (torch.bfloat16, torch.float16) or not _BMM_TO_FP32:
        return scorer(q, keys, hidden_states)[:, 0]
    logits = torch.bmm(q[:, 0], keys.transpose(1, 2), out_dtype=torch.float32)  # [B, H_I, cap]
    logits = torch.relu(logits) * scorer.softmax_scale
    if head_weights is None:
        head_weights = scorer.weights_proj(hidden_states)
    # contiguous: a fused projection hands w_h(t) as a strided slice of one GEMV's output, with which the compiled
    # head-weighted sum ran 5.7x slower (docs/BENCHMARKS.md, run 20)
    weights = (head_weights.float() * scorer.weights_scaling).contiguous()  # [B, 1, H_I]
    return (logits * weights[:, 0, :, None]).sum(dim=1)


def _lightning_indexer(indexer, keys: CompressedStore, hidden_states, q_residual, positions, head_weights=None):
    """Top-k of I[t,s] = sum_h w_{t,h} ReLU(q_{t,h} . K^IComp_s) (paper eqs. 13-17) over all ``cap`` slots of every
    row, -inf beyond the row's length; fixed k = min(index_topk, cap). Returns picks ``[B, k]`` and which picks are
    real entries ``[B, k]`` (a row with fewer than k entries gets masked picks, as stock takes min(k, n)).
    ``head_weights``: w_h(t) already projected (:mod:`.fused_inputs`; used where the scoring is ours, the GPU's)."""
    v4, batch = _v4(), hidden_states.shape[0]
    cos, sin = indexer.rotary_emb(hidden_states, position_ids=positions[:, None], layer_type=indexer.rope_layer_type)
    q = indexer.q_b_proj(q_residual).view(batch, 1, -1, indexer.head_dim).transpose(1, 2)
    q = v4.apply_rotary_pos_emb(q, cos, sin).transpose(1, 2)  # [B, 1, H_I, D_I]
    scores = _index_scores(indexer.scorer, q, keys.entries, hidden_states, head_weights)  # I[t, s]: [B, cap]
    scores = scores.masked_fill(~keys.visible(), float("-inf"))
    # unsorted: the picks only feed a gather, a test against the row's length and a softmax-weighted sum over the
    # gathered keys, so their order is irrelevant downstream; unsorted selection is cheaper (no sort of the k picks)
    # and selects the same set (torch sorts the selection afterwards, if asked)
    picks = scores.topk(min(indexer.index_topk, scores.shape[-1]), dim=-1, sorted=False).indices
    return picks, picks < keys.lengths[:, None]


def _shared_kv_attention(q, keys, valid, scaling: float, sinks) -> torch.Tensor:
    """One decode query per row against its single shared K=V head, with DeepSeek-V4's attention sinks:
    ``q`` ``[B, H, 1, D]``, ``keys`` ``[B, L, D]``, ``valid`` ``[B, L]``; returns ``[B, 1, H, D]``.

    transformers' eager attention (the reference) repeats the one KV head for all H heads (``repeat_kv``: at 512K an
    HCA layer's 4,224 keys become a 277 MB copy per row) and runs H GEMVs; here the H heads are the rows of one
    matmul per sequence over the keys read once. Same formula: logits * scaling, -inf where not valid, the sink
    logit appended per head, max-subtracted softmax in the logits' dtype, the sink's probability dropped."""
    batch, heads = q.shape[:2]
    logits = torch.matmul(q[:, :, 0], keys.transpose(1, 2)) * scaling  # [B, H, L]
    logits = logits.masked_fill(~valid[:, None], float("-inf"))
    logits = torch.cat([logits, sinks.reshape(1, heads, 1).expand(batch, -1, -1)], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = torch.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1].to(keys.dtype)
    return torch.matmul(probs, keys)[:, None]  # [B, 1, H, D]


class _StaticDecodeAttention:
    """Mixed into the model's attention class by :func:`install_static_attention`: with a
    :class:`StaticDecodeState` as the cache, the static step below; with any other cache the class it was mixed
    into (stock, or :mod:`.batching`'s)."""

    def forward(self, hidden_states, **kwargs):
        state = kwargs.get("cache", kwargs.get("past_key_values"))
        if not isinstance(state, StaticDecodeState):
            return super().forward(hidden_states, **kwargs)
        embeddings = kwargs["position_embeddings"]
        cos, sin = embeddings[self.rope_layer_type] if isinstance(embeddings, dict) else embeddings
        # compiled_step passes the layer's stores in (a compiled layer must not index by its layer number)
        layer = kwargs.get("static_layer") or state.layers[self.layer_idx]
        return attention_body(self, hidden_states, cos, sin, state.positions, state.rows, layer), None


def attention_body(attention, hidden_states, cos, sin, positions, rows, layer: StaticLayer) -> torch.Tensor:
    """One attention block's static step on its own layer's stores: the output ``[B, 1, hidden]``.

    A function of the block, its own stores and the step's tensors (no layer number), so that a compiled decoder
    layer serves every layer of its kind (:mod:`.compiled_step`)."""
    v4, self = _v4(), attention
    batch = hidden_states.shape[0]  # hidden_states: [B, 1, hidden]
    if layer.hidden is not None:  # a memory layer: h_t for the next trigger (StaticRunner.hidden)
        layer.hidden.copy_(hidden_states[:, -1])
    # every projection of the block's input from one GEMV where the block is fused (.fused_inputs), else each alone
    x = project_inputs(self, hidden_states) or {}
    # q and the shared K=V: the stock projections, norms and RoPE on the [B, 1] batch
    q_residual = self.q_a_norm(x["q_a_proj"] if "q_a_proj" in x else self.q_a_proj(hidden_states))
    q = self.q_b_norm(self.q_b_proj(q_residual).view(batch, 1, -1, self.head_dim).transpose(1, 2))
    q = v4.apply_rotary_pos_emb(q, cos, sin)  # [B, H, 1, D]
    kv = self.kv_norm(x["kv_proj"] if "kv_proj" in x else self.kv_proj(hidden_states)).view(batch, 1, 1, self.head_dim)
    kv = v4.apply_rotary_pos_emb(kv, cos, sin)[:, 0, 0]  # [B, D]

    window = layer.window.shape[1]
    layer.window[rows, positions % window] = kv  # the ring now holds positions p - W + 1 .. p
    keys = [layer.window]
    valid = [torch.arange(window, device=kv.device) <= positions[:, None]]  # slots written so far
    if self.compressor is not None:
        layer.compressor.step(self.compressor, hidden_states, positions, rows,
                              _pair(x, "compressor.kv_proj", "compressor.gate_proj"))  # C^Comp
        if layer.indexer is not None:  # CSA: the indexer's K^IComp, then its top-k picks of C^Comp
            layer.indexer.step(self.compressor.indexer, hidden_states, positions, rows,
                               _pair(x, "compressor.indexer.kv_proj", "compressor.indexer.gate_proj"))
            picks, picked = _lightning_indexer(self.compressor.indexer, layer.indexer, hidden_states,
                                               q_residual, positions, x.get("compressor.indexer.scorer.weights_proj"))
            keys.append(layer.compressor.entries.gather(1, picks[..., None].expand(-1, -1, self.head_dim)))
            valid.append(picked)
        else:  # HCA: every emitted entry
            keys.append(layer.compressor.entries)
            valid.append(layer.compressor.visible())
    keys = torch.cat(keys, dim=1)  # [B, L, D], L fixed: W + k (CSA), W + cap (HCA), W
    out = _shared_kv_attention(q, keys, torch.cat(valid, dim=1), self.scaling, self.sinks)  # [B, 1, H, D]
    # K=V carries RoPE on its rope slice: undo it at the query position, then the grouped output projection
    out = v4.apply_rotary_pos_emb(out.transpose(1, 2), cos, -sin).transpose(1, 2)
    grouped = self.o_a_proj(out.reshape(batch, 1, self.config.o_groups, -1)).flatten(2)
    return self.o_b_proj(grouped)


def _pair(projected: dict, kv: str, gate: str):
    return (projected[kv], projected[gate]) if kv in projected and gate in projected else None


@functools.cache
def _static_class(base: type) -> type:
    return type(f"Static{base.__name__}", (_StaticDecodeAttention, base), {})


def install_static_attention(model) -> None:
    """Mix :class:`_StaticDecodeAttention` into every attention block of ``model`` (a subclass swap; idempotent;
    other caches keep the behaviour of the class it had)."""
    decoder = model.model if hasattr(model, "model") else model
    for layer in decoder.layers:
        attention = layer.self_attn
        if not isinstance(attention, _StaticDecodeAttention):
            attention.__class__ = _static_class(type(attention))
            if hasattr(attention, "_old_forward"):  # accelerate's hook calls the forward bound at load time
                attention._old_forward = types.MethodType(attention.__class__.forward, attention)


def use_capturable_experts(model) -> bool:
    """Before capturing the step on a GPU: transformers' ``grouped_mm`` experts outside bf16 copy from pageable host
    memory (torch 2.11, H200: "Cannot copy between CPU and CUDA tensors during CUDA graph capture"), and under
    ``torch.compile`` they fall back to a loop over ``offs.tolist()`` (a sync). Such a model is switched to
    ``batched_mm`` (same arithmetic, sync-free); returns whether it was switched."""
    if model.dtype == torch.bfloat16 or getattr(model.config, "_experts_implementation", None) != "grouped_mm":
        return False
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("batched_mm")
    else:
        model.config._experts_implementation = "batched_mm"
    return True


def static_step(model, state: StaticDecodeState) -> torch.Tensor:
    """The step body: one token per row from ``state.tokens`` at ``state.positions``, logits ``[B, vocab]``.
    Reads and writes only the state's tensors (the CUDA-graph-capturable part)."""
    out = model(input_ids=state.tokens[:, None], position_ids=state.positions[:, None],
                attention_mask={"sliding_attention": None},  # taken as prebuilt: no stock mask for our cache
                use_cache=True, logits_to_keep=1, **{cache_kwarg(): state})
    return out.logits[:, -1]


def decode_step(model, state: StaticDecodeState, tokens, positions) -> torch.Tensor:
    """Decode ``tokens[r]`` at ``positions[r]`` for every row r at once; returns the logits ``[B, vocab]``.

    Host-side prologue (installs the attention mix-in, checks positions held on the host fit the capacity,
    copies both into the state's input buffers), then :func:`static_step`. Positions must continue each row
    (``positions[r]`` = tokens the row has seen); device-resident positions are not checked (no host sync)."""
    install_static_attention(model)
    positions = torch.as_tensor(positions, dtype=torch.long)
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if positions.device.type == "cpu" and positions.numel() and int(positions.max()) >= state.geometry.capacity:
        raise ValueError(f"position {int(positions.max())} is beyond the capacity of {state.geometry.capacity} tokens")
    state.tokens.copy_(tokens)
    state.positions.copy_(positions)
    with torch.no_grad():
        return static_step(model, state)
