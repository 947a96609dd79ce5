"""DeepSeek-V4 CSA cache layer and compressor that keep the compressed history in the cold pool.

The stock ``DeepseekV4CSACache`` keeps every compressed entry of a CSA layer on the device (C^Comp and
K^IComp, DeepSeek-V4 paper section 2.3.1) and the stock ``DeepseekV4CSACompressor`` lets the Lightning
Indexer pick its top-k over all of them. Lookahead Sparse Attention changes only *where entries live* and
*which entries the indexer may pick*:

* :class:`LSACSACache` (a ``DeepseekV4CSACache``) sends every emitted entry to the :class:`~.cold_pool.ColdPool`
  and hands the compressor / indexer a *candidate* view instead of the whole history:

  - decoding: the resident set (entries the last trigger selected, plus entries born since), whose C^Comp and
    K^IComp rows live on the device. The native indexer scores only these rows, so its top-k is restricted
    to resident entries;
  - prefill (``score_all``): every entry, as in the stock model. K^IComp of all entries is on the device during
    prefill (the native top-k needs it to be exact); C^Comp is not: only the rows picked by the chunk's
    queries are gathered from the pool;
  - per-step (HiSparse) decoding (``score_all`` too): every entry is scored at every step; the picks' C^Comp
    comes from an :class:`EntryBuffer`, a fixed device buffer with least-recently-used eviction.

  Memory-indexer layers also keep K^IComp of *all* entries on the device (the memory indexer scores them).
* :class:`LSACSACompressor` (a ``DeepseekV4CSACompressor``) runs the stock compression + indexer unchanged and
  then replaces the candidate rows and the ``[B, 1, S, R]`` block bias by the picked rows only, so the
  attention runs over window + picks (``DeepseekV4Attention`` needs no change: it concatenates whatever the
  compressor returns). Its override falls back to the stock forward for any other cache.

The indexer's scorer needs no subclass: it multiplies whatever K^IComp rows the cache layer returns.
Batch size 1 only (a Session decodes one sequence).

Traps handled here (see the DeepSeek-V4 note): subclassing a cache layer class auto-registers it for every
``DynamicCache``; ``_layer_type = None`` prevents that, and :func:`build_lsa_cache` inserts the layers itself.
"""

from __future__ import annotations

import torch
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4CSACache, DeepseekV4CSACompressor

from .backbone import CSA, csa_layers
from .cold_pool import ColdPool, GrowingRows


class LSACSACache(DeepseekV4CSACache):
    """CSA cache layer whose compressed entries live in the cold pool; the device holds the resident set.

    State on the device: the sliding window and the open-window / overlap state (inherited, unchanged), the
    resident entries' C^Comp and K^IComp rows and their entry indices, and (memory-indexer layers, or any
    layer during prefill) K^IComp of all entries.
    """

    _layer_type = None  # never auto-register: a stock DynamicCache must keep building stock layers

    def __init__(self, config, layer_idx: int, pool: ColdPool, keep_all_index_keys: bool,
                 buffer_entries: int | None = None):
        super().__init__(config)
        self.layer_idx = layer_idx
        self.pool = pool
        # per-step (HiSparse) mode: the native top-k scores every entry at every step; C^Comp of the picks is
        # served from a fixed device buffer of ``buffer_entries`` rows, misses fetched from the pool
        self.buffer_entries = buffer_entries
        self.buffer: EntryBuffer | None = None
        self.keep_all_index_keys = keep_all_index_keys or buffer_entries is not None
        self.in_prefill = True  # prefill semantics until the first trigger
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None
        self.widths = {"compressor": config.head_dim, "indexer": config.index_head_dim}
        self.resident_ids = torch.zeros(0, dtype=torch.long)  # sorted entry indices, host
        self.resident: dict[str, GrowingRows] | None = None
        self.all_index_keys: GrowingRows | None = None
        # diagnostics of the last forward (see last_picks / last_candidates); kept on the device, read lazily
        self._last_chosen: torch.Tensor | None = None
        self._last_candidates: torch.Tensor | None = None

    # ---- storage ------------------------------------------------------------------------------------

    def _init_storage(self, entries: torch.Tensor) -> None:
        self.device, self.dtype = entries.device, entries.dtype
        self.resident = {name: GrowingRows(w, self.dtype, self.device) for name, w in self.widths.items()}
        if self.score_all or self.keep_all_index_keys:
            self.all_index_keys = GrowingRows(self.widths["indexer"], self.dtype, self.device)

    @property
    def n_entries(self) -> int:
        return self.entry_count["compressor"]

    @property
    def score_all(self) -> bool:
        """Candidates = every entry: during prefill, and at every step in per-step (HiSparse) mode."""
        return self.in_prefill or self.buffer_entries is not None

    @property
    def resident_count(self) -> int:
        """CSA entries whose C^Comp is on the device (resident set, or the per-step buffer's occupancy)."""
        if self.buffer is not None:
            return self.buffer.occupancy
        return int(self.resident_ids.numel())

    def update_compressor_states(self, name: str, compressed: torch.Tensor) -> torch.Tensor:
        """Store freshly emitted entries ``[1, n, width]`` in the pool; return the candidate rows ``[1, R, width]``.

        Overrides the stock method, which concatenates onto a device tensor of all entries and returns it.
        """
        if compressed.shape[0] != 1:
            raise ValueError("LSA decoding supports batch size 1")
        if self.resident is None:
            self._init_storage(compressed)
        new = compressed[0]  # [n, width]
        n = new.shape[0]
        first = self.entry_count[name]
        if n:
            self.pool.append(self.layer_idx, name, new)
            if name == "indexer" and self.all_index_keys is not None:
                self.all_index_keys.append(new)
            if not self.score_all:  # entries born during decoding stay resident until the next trigger
                self.resident[name].append(new)
                if name == "compressor":
                    born = torch.arange(first, first + n, dtype=torch.long)
                    self.resident_ids = torch.cat([self.resident_ids, born])
        self.entry_count[name] += n
        if self.score_all:
            if name == "indexer":
                return self.all_index_keys.view().unsqueeze(0)  # [1, T, d]
            # C^Comp stays in the pool: a zero-cost [1, T, D] stand-in; LSACSACompressor gathers the picked rows.
            return new.new_zeros(()).expand(1, self.entry_count[name], new.shape[-1])
        return self.resident[name].view().unsqueeze(0)  # [1, R, width]

    def picked_rows(self, candidates: torch.Tensor) -> torch.Tensor:
        """C^Comp rows of ``candidates`` (indices into the current candidate view) on the device: ``[n, D]``."""
        if self.in_prefill:
            return self.pool.gather(self.layer_idx, "compressor", candidates, self.device)
        if self.buffer is not None:
            return self.buffer.rows(candidates.cpu())
        return self.resident["compressor"].view().index_select(0, candidates)

    def record_picks(self, chosen: torch.Tensor) -> None:
        """Remember the last forward's picks (candidate positions) without a device->host sync."""
        self._last_chosen = chosen
        self._last_candidates = None if self.score_all else self.resident_ids

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

    # ---- phases -------------------------------------------------------------------------------------

    def begin_prefill(self) -> None:
        """Candidates = every entry (stock semantics). K^IComp of all entries must be on the device."""
        self.in_prefill = True
        if self.resident is not None:
            self.resident = {name: GrowingRows(w, self.dtype, self.device) for name, w in self.widths.items()}
            self.resident_ids = torch.zeros(0, dtype=torch.long)
            if self.all_index_keys is None:  # released after the last prefill: restage from the pool
                self.all_index_keys = GrowingRows(self.widths["indexer"], self.dtype, self.device,
                                                  capacity=self.n_entries)
                self.all_index_keys.append(self.pool.host_rows(self.layer_idx, "indexer").to(self.device))
                self.pool.bytes_to_device += self.all_index_keys.nbytes

    def end_prefill(self) -> None:
        """Switch to decoding: candidates = resident set (empty until :meth:`set_resident`), or every entry
        with the picks' C^Comp served by the per-step buffer."""
        self.in_prefill = False
        if not self.keep_all_index_keys:
            self.all_index_keys = None
        if self.buffer_entries is not None and self.buffer is None and self.dtype is not None:
            self.buffer = EntryBuffer(self.buffer_entries, self.widths["compressor"], self.dtype, self.device,
                                      self.pool, self.layer_idx)

    def set_resident(self, ids: torch.Tensor, headroom: int, plan: "ResidentPlan | None" = None) -> tuple[int, int]:
        """Make ``ids`` (sorted unique entry indices) the resident set: keep rows already resident, fetch the
        others from the pool, release the rest. Room for ``headroom`` entries born before the next trigger.
        ``plan``: :class:`ResidentPlan` of this change, when the caller shares one across layers.

        Returns ``(entries fetched, bytes fetched)`` for this layer.
        """
        if self.resident is None:  # no entry emitted yet: nothing to hold
            return 0, 0
        if plan is None or not plan.applies_to(self.resident_ids):
            plan = ResidentPlan(self.resident_ids, ids)
        before = self.pool.bytes_to_device
        self.resident = self.build_resident(plan, headroom)
        self.resident_ids = plan.ids
        return int(plan.fetch_ids.numel()), self.pool.bytes_to_device - before

    def resident_snapshot(self) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """(resident entry ids, their rows by name): what :meth:`build_resident` needs to plan from the current
        set later, on another thread. The row views stay valid while held: later appends write past them, and
        a growth moves the rows to a new tensor without freeing these."""
        if self.resident is None:
            return self.resident_ids, None
        return self.resident_ids, {name: rows.view() for name, rows in self.resident.items()}

    def build_resident(self, plan: "ResidentPlan", headroom: int,
                       rows: dict[str, torch.Tensor] | None = None) -> dict[str, GrowingRows]:
        """New resident rows for ``plan.ids`` without changing this layer: rows kept from ``rows`` (the current
        resident rows, or a :meth:`resident_snapshot`'s) and rows fetched from the pool, on the current stream,
        with room for ``headroom`` more."""
        rows = rows if rows is not None else {name: r.view() for name, r in self.resident.items()}
        keep_to, keep_from, fetch_to, fetch_ids_dev = plan.on(self.device)
        resident = {}
        for name, width in self.widths.items():
            new = GrowingRows(width, self.dtype, self.device, capacity=plan.ids.numel() + headroom)
            new.length = plan.ids.numel()
            data = new.view()
            if keep_to is not None:
                data[keep_to] = rows[name][keep_from]
            if fetch_to is not None:
                data[fetch_to] = self.pool.gather(self.layer_idx, name, plan.fetch_ids, self.device, fetch_ids_dev)
            resident[name] = new
        return resident

    def install_resident(self, ids: torch.Tensor, rows: dict[str, GrowingRows], born_from: int) -> int:
        """Swap in resident rows built off the decode path (:mod:`~.prefetch`) for the entries ``ids``.

        ``born_from``: how many resident entries the layer held when the rows were planned; the ones resident
        since (entries born during decoding meanwhile, all newer than ``ids``) are appended to the new rows.
        Returns how many were appended.
        """
        if self.device is not None and self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            for name in self.widths:  # built on a side stream, used (and later freed) on this one
                rows[name].data.record_stream(stream)
        born_ids = self.resident_ids[born_from:]
        if born_ids.numel():
            for name in self.widths:
                rows[name].append(self.resident[name].view()[born_from:])
        self.resident = rows
        self.resident_ids = torch.cat([ids, born_ids])
        return int(born_ids.numel())

    # ---- accounting ---------------------------------------------------------------------------------

    def device_tensors(self) -> dict[str, list[torch.Tensor]]:
        """Tensors this layer holds on the device, by kind (see :class:`~.session.SessionStats`)."""
        kinds = {"resident_kv": [], "resident_index_keys": [], "memory_index_keys": []}
        if self.resident is not None:
            kinds["resident_kv"].append(self.resident["compressor"].data)
            kinds["resident_index_keys"].append(self.resident["indexer"].data)
        if self.buffer is not None:
            kinds["resident_kv"].append(self.buffer.data)
        if self.all_index_keys is not None:
            kinds["memory_index_keys"].append(self.all_index_keys.data)
        return kinds


class ResidentPlan:
    """How the resident set changes from ``old`` to ``ids`` (both sorted unique host int64): which new rows are
    kept (and where they sit in the old rows) and which are fetched. Every CSA layer of a Session holds the
    same resident entries, so one plan serves all of them (:func:`set_resident_all`); its index tensors are
    moved to a device once."""

    def __init__(self, old: torch.Tensor, ids: torch.Tensor):
        self.old = old
        self.ids = ids.to("cpu", torch.long).clone()
        keep_mask = torch.isin(self.ids, old)
        self.fetch_ids = self.ids[~keep_mask]
        self.keep_from = torch.searchsorted(old, self.ids[keep_mask])  # positions of kept entries in the old rows
        self.keep_to = torch.nonzero(keep_mask).reshape(-1)
        self.fetch_to = torch.nonzero(~keep_mask).reshape(-1)
        self._on: dict[torch.device, tuple] = {}

    def applies_to(self, old: torch.Tensor) -> bool:
        return old is self.old or torch.equal(old, self.old)

    def on(self, device: torch.device) -> tuple:
        """(keep_to, keep_from, fetch_to, fetch_ids) on ``device``; None where nothing is kept / fetched."""
        device = torch.device(device)
        if device not in self._on:
            keep = (self.keep_to.to(device), self.keep_from.to(device)) if self.keep_to.numel() else (None, None)
            fetch = (self.fetch_to.to(device), self.fetch_ids.to(device)) if self.fetch_to.numel() else (None, None)
            self._on[device] = keep + fetch
        return self._on[device]


def set_resident_all(layers, ids: torch.Tensor, headroom: int, batched: bool | None = None) -> tuple[int, int]:
    """:meth:`LSACSACache.set_resident` on every layer with one shared :class:`ResidentPlan` (layers whose
    resident set differs get their own), batched across layers where possible (:func:`build_resident_all`,
    ``batched``). Returns (entries fetched, bytes fetched) summed over the layers."""
    ids = torch.unique(ids.to("cpu", torch.long))
    pool = layers[0].pool if layers else None
    before = pool.bytes_to_device if pool is not None else 0
    rows, fetched = build_resident_all(layers, ids, headroom, batched=batched)
    for layer, new in zip(layers, rows):
        if new is not None:
            layer.resident, layer.resident_ids = new, ids
    return fetched, (pool.bytes_to_device if pool is not None else 0) - before


def build_resident_all(layers, ids: torch.Tensor, headroom: int, snapshots=None,
                       batched: bool | None = None) -> tuple[list, int]:
    """New resident rows of every layer for the sorted unique entries ``ids``, without changing the layers.

    ``snapshots``: the layers' :meth:`~LSACSACache.resident_snapshot` (default: taken now). Returns (per layer a
    ``{name: GrowingRows}`` or None where the layer holds nothing yet, entries fetched summed over layers).

    Batched (default where the pool's zero-copy gather runs, i.e. on a GPU): when every layer holds the same
    entries, the rows of all layers go into one ``[layers, n + headroom, width]`` store per row kind, filled by
    two launches of a multi-layer gather (kept rows from the old device rows, fetched rows from the pinned
    pool): four launches per trigger instead of ~4 per layer, so the host work no longer grows with the number
    of CSA layers. Otherwise one plan per distinct old set and :meth:`LSACSACache.build_resident` per layer.
    """
    from .kernels.pool_gather import gather_rows_layers

    snapshots = snapshots if snapshots is not None else [layer.resident_snapshot() for layer in layers]
    held = [i for i, (_, old_rows) in enumerate(snapshots) if old_rows is not None]
    rows: list = [None] * len(layers)
    if not held:
        return rows, 0
    first_ids = snapshots[held[0]][0]
    plan = ResidentPlan(first_ids, ids)
    same = all(plan.applies_to(snapshots[i][0]) for i in held)
    layer0 = layers[held[0]]
    if batched is None:
        batched = layer0.pool.gather_layers_available(layer0.device)
    if not (batched and same):
        fetched = 0
        for i in held:
            if not plan.applies_to(snapshots[i][0]):
                plan = ResidentPlan(snapshots[i][0], ids)
            rows[i] = layers[i].build_resident(plan, headroom, snapshots[i][1])
            fetched += int(plan.fetch_ids.numel())
        return rows, fetched
    keep_to, keep_from, fetch_to, fetch_ids_dev = plan.on(layer0.device)
    n = plan.ids.numel()
    for name, width in layer0.widths.items():
        store = torch.empty((len(held), n + headroom, width), dtype=layer0.dtype, device=layer0.device)
        if keep_to is not None:  # device -> device, from the rows the layers hold now
            gather_rows_layers([snapshots[i][1][name] for i in held], keep_from, keep_to, store)
        if fetch_to is not None:  # pinned pool -> device, zero-copy
            layer0.pool.gather_layers([layers[i].layer_idx for i in held], name, plan.fetch_ids, fetch_ids_dev,
                                      fetch_to, store)
        for j, i in enumerate(held):
            if rows[i] is None:
                rows[i] = {}
            rows[i][name] = GrowingRows.over(store[j], n)
    return rows, len(held) * int(plan.fetch_ids.numel())


class EntryBuffer:
    """A fixed device buffer of ``capacity`` C^Comp rows for per-step (HiSparse-style) decoding.

    ``rows(ids)`` serves the rows of entries ``ids`` (the native top-k of one step): hits are read in place,
    misses are fetched from the cold pool into the least recently used slots (free slots first).
    """

    def __init__(self, capacity: int, width: int, dtype: torch.dtype, device, pool: ColdPool, layer: int):
        self.capacity = int(capacity)
        self.data = torch.empty((self.capacity, width), dtype=dtype, device=device)
        self.pool, self.layer, self.device = pool, layer, device
        self.entry_in_slot = torch.full((self.capacity,), -1, dtype=torch.long)
        self.last_used = torch.full((self.capacity,), -1, dtype=torch.long)
        self.slot_of: dict[int, int] = {}
        self.clock = 0
        self.misses = 0
        self.bytes_fetched = 0

    @property
    def occupancy(self) -> int:
        return len(self.slot_of)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """C^Comp rows of entries ``ids`` (host int64, unique) on the device: ``[len(ids), D]``."""
        ids = ids.reshape(-1)
        if ids.numel() > self.capacity:
            raise ValueError(f"{ids.numel()} picks do not fit a buffer of {self.capacity} entries")
        self.clock += 1
        slots = torch.tensor([self.slot_of.get(int(e), -1) for e in ids], dtype=torch.long)
        hit = slots >= 0
        self.last_used[slots[hit]] = self.clock
        if not bool(hit.all()):
            missing = ids[~hit]
            # the least recently used slots; this step's hits carry the newest clock, so they are never chosen
            victims = torch.argsort(self.last_used, stable=True)[: missing.numel()]
            for old in self.entry_in_slot[victims].tolist():
                if old >= 0:
                    del self.slot_of[old]
            before = self.pool.bytes_to_device
            self.data[victims.to(self.device)] = self.pool.gather(self.layer, "compressor", missing, self.device)
            self.bytes_fetched += self.pool.bytes_to_device - before
            self.misses += missing.numel()
            self.entry_in_slot[victims] = missing
            self.last_used[victims] = self.clock
            self.slot_of.update(zip(missing.tolist(), victims.tolist()))
            slots[~hit] = victims
        return self.data.index_select(0, slots.to(self.device))


class LSACSACompressor(DeepseekV4CSACompressor):
    """CSA compressor that returns only the rows the native top-k picked (window + picks attention).

    The stock forward (compression, overlap windows, Lightning Indexer top-k, block bias) runs unchanged over
    the candidate rows that :class:`LSACSACache` provides; this override then keeps the union of the picks
    of the forward's queries: C^Comp rows gathered from the resident set (decoding) or the cold pool
    (prefill), and the matching columns of the block bias. With a stock cache it is the stock forward.
    """

    def forward(self, hidden_states, q_residual, position_ids, cache, layer_idx):  # positional in 5.17 and 5.24
        cache_layer = cache.layers[layer_idx] if cache is not None else None
        if not isinstance(cache_layer, LSACSACache):
            return super().forward(hidden_states, q_residual, position_ids, cache, layer_idx)
        picks: list[torch.Tensor] = []
        handle = self.indexer.register_forward_hook(lambda module, args, output: picks.append(output))
        try:
            _, block_bias = super().forward(hidden_states, q_residual, position_ids, cache, layer_idx)
        finally:
            handle.remove()
        top_k = picks[0]  # [1, S, k] candidate positions, -1 where invalid
        if top_k.shape[1] == 1 and not cache_layer.score_all:
            # decoding: every resident entry is visible to the query, so no pick is invalid
            chosen = top_k.reshape(-1).sort().values
        else:
            chosen = torch.unique(top_k[top_k >= 0])  # sorted
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


def build_lsa_cache(config, pool: ColdPool, memory_layers, buffer_entries: int | None = None) -> "object":
    """A ``DynamicCache`` for ``config`` whose CSA layers are :class:`LSACSACache` (HCA/sliding stay stock).

    ``buffer_entries``: per-step (HiSparse) mode with a device buffer of that many entries per CSA layer.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    memory_layers = set(memory_layers)
    for idx, layer_type in enumerate(config.layer_types):
        if layer_type == CSA:
            cache.layers[idx] = LSACSACache(config, idx, pool, keep_all_index_keys=idx in memory_layers,
                                            buffer_entries=buffer_entries)
    return cache
