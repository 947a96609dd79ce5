"""DeepSeek-V4 CSA cache layers and compressor that keep the compressed history in the cold pool.

The stock ``DeepseekV4CSACache`` keeps every compressed entry of a CSA layer on the device (C^Comp and K^IComp,
DeepSeek-V4 paper section 2.3.1) and the stock ``DeepseekV4CSACompressor`` lets the Lightning Indexer pick its
top-k among all of them. Lookahead Sparse Attention changes only *where entries live* and *which entries the
indexer may pick* (its *candidates*):

* :class:`PooledCSACache` (a ``DeepseekV4CSACache``): every emitted entry goes to the
  :class:`~.cold_pool.ColdPool`. During prefill the candidates are every entry, as in the stock model: K^IComp of
  all entries is on the device (the exact native top-k needs it); C^Comp is not, only the rows the chunk's queries
  picked are gathered from the pool. Memory-indexer layers keep K^IComp of all entries on the device after
  prefill too (the memory indexer scores them at each trigger).
* :class:`LSACSACache`: while decoding, the candidates are the resident set, read from the
  :class:`~.residency.ResidentSet` that every CSA layer shares; entries the layer emits while decoding join it.
  (The per-step alternative, HiSparse, is :class:`~.hisparse.HiSparseCSACache`.)
* :class:`LSACSACompressor` (a ``DeepseekV4CSACompressor``) runs the stock compression + indexer unchanged over
  the candidates, then hands the attention only the picked rows and their block-bias columns, so attention runs
  over window + picks (``DeepseekV4Attention`` needs no change: it concatenates whatever the compressor returns).
  With any other cache it is the stock forward.

The restriction of the native top-k to the resident set is therefore one line: in decoding,
:meth:`LSACSACache.update_compressor_states` returns the resident rows, and the unchanged indexer scores those.
Batch size 1 (a Session decodes one sequence).

Trap handled here (see the DeepSeek-V4 note): subclassing a cache layer class auto-registers it for every
``DynamicCache``; ``_layer_type = None`` prevents that, and :func:`build_lsa_cache` inserts the layers itself.
"""

from __future__ import annotations

import types

import torch
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4CSACache, DeepseekV4CSACompressor

from .backbone import CSA, csa_layers
from .cold_pool import ColdPool, GrowingRows
from .residency import ResidentSet


class PooledCSACache(DeepseekV4CSACache):
    """A CSA cache layer whose compressed entries live in the cold pool (prefill semantics; subclasses decode).

    State on the device: the sliding window and the open-window / overlap state (inherited, unchanged) and,
    during prefill or where ``keep_all_index_keys``, K^IComp of every entry.
    """

    _layer_type = None  # never auto-register: a stock DynamicCache must keep building stock layers

    def __init__(self, config, layer_idx: int, pool: ColdPool, keep_all_index_keys: bool):
        super().__init__(config)
        self.layer_idx = layer_idx
        self.pool = pool
        self.keep_all_index_keys = keep_all_index_keys
        self.in_prefill = True  # prefill semantics until end_prefill
        self.storing = False  # whether the entries' device and dtype are known (set by the first emitted entries)
        self.device: torch.device | None = None  # also set by the stock layer from the window's keys
        self.dtype: torch.dtype | None = None
        self.widths = {"compressor": config.head_dim, "indexer": config.index_head_dim}
        self.all_index_keys: GrowingRows | None = None
        # the last forward's picks (candidate positions) and the entries they index; kept as they are, read lazily
        self._last_chosen: torch.Tensor | None = None
        self._last_candidates: torch.Tensor | None = None

    @property
    def n_entries(self) -> int:
        return self.entry_count["compressor"]

    def update_compressor_states(self, name: str, compressed: torch.Tensor) -> torch.Tensor:
        """Store freshly emitted entries ``[1, n, width]`` in the pool; return the candidate rows ``[1, R, width]``.

        Overrides the stock method, which concatenates onto a device tensor of all entries and returns it.
        """
        if compressed.shape[0] != 1:
            raise ValueError("LSA decoding supports batch size 1")
        if not self.storing:
            self.storing, self.device, self.dtype = True, compressed.device, compressed.dtype
            if self.keep_all_index_keys or self.in_prefill:
                self.all_index_keys = GrowingRows(self.widths["indexer"], self.dtype, self.device)
        new = compressed[0]  # [n, width]
        first = self.entry_count[name]
        if new.shape[0]:
            self.pool.append(self.layer_idx, name, new)
            if name == "indexer" and self.all_index_keys is not None:
                self.all_index_keys.append(new)
            if not self.in_prefill:
                self.decoded(name, new, first)
        self.entry_count[name] += new.shape[0]
        if self.in_prefill:
            return self.every_entry(name, new)
        return self.decode_candidates(name, new)

    def every_entry(self, name: str, new: torch.Tensor) -> torch.Tensor:
        """Candidates = every entry: all K^IComp rows, and for C^Comp a zero-cost ``[1, T, D]`` stand-in (it stays
        in the pool; :class:`LSACSACompressor` gathers only the picked rows)."""
        if name == "indexer":
            return self.all_index_keys.view().unsqueeze(0)  # [1, T, d]
        return new.new_zeros(()).expand(1, self.entry_count[name], new.shape[-1])

    def decoded(self, name: str, new: torch.Tensor, first: int) -> None:
        """Entries ``first ..`` emitted while decoding (already in the pool). Subclasses keep them where needed."""

    def decode_candidates(self, name: str, new: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def chosen_candidates(self, top_k: torch.Tensor) -> torch.Tensor:
        """The union of the forward's picks ``top_k`` [1, S, k] (candidate positions, -1 where invalid), ascending."""
        return torch.unique(top_k[top_k >= 0])

    def picked_rows(self, candidates: torch.Tensor) -> torch.Tensor:
        """C^Comp rows of ``candidates`` (positions in the candidate view): ``[n, D]`` on the device. In prefill the
        candidates are every entry, gathered from the pool."""
        return self.pool.gather(self.layer_idx, "compressor", candidates, self.device, purpose="prefill")

    def candidate_ids(self) -> torch.Tensor | None:
        """Entry indices of the candidate rows (None: every entry, in order)."""
        return None

    def record_picks(self, chosen: torch.Tensor) -> None:
        """Remember the last forward's picks (candidate positions) and the candidates they index, without a
        device->host sync."""
        self._last_chosen, self._last_candidates = chosen, self.candidate_ids()

    @property
    def last_picks(self) -> torch.Tensor | None:
        """Entry indices the native top-k picked in the last forward (union over its queries)."""
        if self._last_chosen is None:
            return None
        chosen = self._last_chosen.cpu()
        return chosen if self._last_candidates is None else self._last_candidates[chosen]

    @property
    def last_candidates(self) -> torch.Tensor | None:
        """Entry indices the last forward's top-k chose among (None: every entry, i.e. prefill)."""
        return self._last_candidates

    def begin_prefill(self) -> None:
        """Candidates = every entry (stock semantics): K^IComp of all entries must be on the device."""
        self.in_prefill = True
        if self.all_index_keys is None and self.storing:  # released after the last prefill: restage
            keys = self.pool.stream_prefix(self.layer_idx, "indexer", self.n_entries, self.device, purpose="prefill")
            self.all_index_keys = GrowingRows.over(keys, self.n_entries)

    def end_prefill(self) -> None:
        """Switch to decoding; layers that do not keep every entry's K^IComp release it."""
        self.in_prefill = False
        if not self.keep_all_index_keys:
            self.all_index_keys = None

    def device_tensors(self) -> dict[str, list[torch.Tensor]]:
        """Tensors this layer holds on the device beyond the stock state, by kind (see :mod:`~.stats`)."""
        kinds = {"resident_kv": [], "resident_index_keys": [], "memory_index_keys": []}
        if self.all_index_keys is not None:
            kinds["memory_index_keys"].append(self.all_index_keys.data)
        return kinds

    @property
    def resident_count(self) -> int:
        """CSA entries whose C^Comp is on the device."""
        return 0


class LSACSACache(PooledCSACache):
    """CSA cache layer of trigger-based LSA decoding: the candidates are the shared resident set's rows."""

    def __init__(self, config, layer_idx: int, pool: ColdPool, residency: ResidentSet, keep_all_index_keys: bool):
        super().__init__(config, layer_idx, pool, keep_all_index_keys)
        self.residency = residency

    def decoded(self, name: str, new: torch.Tensor, first: int) -> None:
        self.residency.append_born(self.layer_idx, name, new, first)  # resident until the next trigger

    def decode_candidates(self, name: str, new: torch.Tensor) -> torch.Tensor:
        return self.residency.rows(self.layer_idx, name).unsqueeze(0)  # [1, R, width]: the native top-k's choice

    def chosen_candidates(self, top_k: torch.Tensor) -> torch.Tensor:
        if top_k.shape[1] == 1 and not self.in_prefill:
            # one decode query: every resident entry is visible to it, so no pick is invalid
            return top_k.reshape(-1).sort().values
        return super().chosen_candidates(top_k)

    def picked_rows(self, candidates: torch.Tensor) -> torch.Tensor:
        if self.in_prefill:
            return super().picked_rows(candidates)
        return self.residency.rows(self.layer_idx, "compressor").index_select(0, candidates)

    def candidate_ids(self) -> torch.Tensor | None:
        return None if self.in_prefill else self.residency.ids

    def device_tensors(self) -> dict[str, list[torch.Tensor]]:
        kinds = super().device_tensors()
        held = self.residency.device_tensors(self.layer_idx)
        kinds["resident_kv"].append(held["compressor"])
        kinds["resident_index_keys"].append(held["indexer"])
        return kinds

    @property
    def resident_count(self) -> int:
        return self.residency.count


class LSACSACompressor(DeepseekV4CSACompressor):
    """CSA compressor that returns only the rows the native top-k picked (window + picks attention).

    The stock forward (compression, overlap windows, Lightning Indexer top-k, block bias) runs unchanged over
    the candidate rows the :class:`PooledCSACache` layer provides; this override then keeps the union of the
    picks of the forward's queries: their C^Comp rows (from the resident set, the per-step buffer or the cold
    pool) and the matching columns of the block bias. With a stock cache it is the stock forward.
    """

    def forward(self, hidden_states, q_residual, position_ids, cache, layer_idx):  # positional in 5.17 and 5.24
        cache_layer = cache.layers[layer_idx] if cache is not None else None
        if not isinstance(cache_layer, PooledCSACache):
            return super().forward(hidden_states, q_residual, position_ids, cache, layer_idx)
        picks: list[torch.Tensor] = []
        handle = self.indexer.register_forward_hook(lambda module, args, output: picks.append(output))
        try:
            _, block_bias = super().forward(hidden_states, q_residual, position_ids, cache, layer_idx)
        finally:
            handle.remove()
        chosen = cache_layer.chosen_candidates(picks[0])  # [n] candidate positions, ascending
        cache_layer.record_picks(chosen)
        rows = cache_layer.picked_rows(chosen)  # [n, D]
        bias = block_bias.index_select(-1, chosen.to(block_bias.device))  # [1, 1, S, n]
        return rows.unsqueeze(0).unsqueeze(0), bias


def install_lsa_compressors(model) -> None:
    """Swap every CSA layer's compressor to :class:`LSACSACompressor` (same module, same weights).

    Idempotent; behaviour with a stock cache is unchanged, so the model stays usable by everything else.
    """
    decoder = model.model if hasattr(model, "model") else model
    for idx in csa_layers(model.config):
        compressor = decoder.layers[idx].self_attn.compressor
        if type(compressor) is DeepseekV4CSACompressor:
            compressor.__class__ = LSACSACompressor
            if hasattr(compressor, "_old_forward"):  # accelerate's hook (offload) calls the forward bound before
                compressor._old_forward = types.MethodType(LSACSACompressor.forward, compressor)


def build_lsa_cache(config, pool: ColdPool, residency: ResidentSet, memory_layers) -> "object":
    """A ``DynamicCache`` for ``config`` whose CSA layers are :class:`LSACSACache` over ``residency`` (HCA and
    sliding layers stay stock). ``memory_layers``: layers that keep K^IComp of every entry on the device."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    memory_layers = set(memory_layers)
    for idx, layer_type in enumerate(config.layer_types):
        if layer_type == CSA:
            cache.layers[idx] = LSACSACache(config, idx, pool, residency, keep_all_index_keys=idx in memory_layers)
    return cache


def pooled_layers(cache) -> list[PooledCSACache]:
    """The cold-pool CSA layers of ``cache`` (none in a stock cache)."""
    return [layer for layer in cache.layers if isinstance(layer, PooledCSACache)] if cache is not None else []
