"""The resident set of LSA decoding: which compressed entries are on the device, one set for every CSA layer.

FlashMemory keeps on the device only the entries the last trigger selected, plus the entries born since. The
memory indexer's OR over its layers gives one set, and the native top-k of every CSA layer picks inside it, so
the set is shared by all CSA layers. :class:`ResidentSet` is its one owner:

* ``ids``: the resident entry indices, held once (host int64, ascending): the last trigger's selection, then the
  entries born since;
* per CSA layer and row kind (C^Comp ``"compressor"``, K^IComp ``"indexer"``), the rows of those entries on the
  device: row i of every layer is entry ``ids[i]``;
* a trigger's change of the set (:meth:`change_to`): a :class:`ResidentPlan` says which rows stay and which come
  from the cold pool, the new rows are assembled and installed; with prefetch the same in two halves,
  :meth:`snapshot` + :meth:`prepare` on a helper thread, :meth:`install` at the window boundary;
* the record of every change (:attr:`changes`): the entries selected and the entries fetched.

The cache layers (:class:`~.lsa_cache.LSACSACache`) read their rows here (:meth:`rows`) and hand over the entries
their layer emits while decoding (:meth:`append_born`); nothing else writes. The bytes a change moves are counted
by the :class:`~.cold_pool.ColdPool`, under the purpose ``"fetch"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cold_pool import ColdPool, GrowingRows

NAMES = ("compressor", "indexer")


class ResidentPlan:
    """How the resident set changes from ``old`` to ``ids`` (both ascending unique int64): which new rows are
    kept (and where they sit in the old rows) and which are fetched. It is computed where ``ids`` lie (the static
    rows keep their ids on the device, so a trigger does no host work on them); its index tensors are moved to a
    device once (:meth:`on`), then serve every layer."""

    def __init__(self, old: torch.Tensor, ids: torch.Tensor):
        self.ids = ids.to(torch.long).clone()
        old = old.to(self.ids.device, torch.long)
        # both ascending: an id is kept where the old ids hold it at its sorted position (one binary search each)
        at = torch.searchsorted(old, self.ids)
        keep_mask = old[at.clamp(max=old.numel() - 1)] == self.ids if old.numel() else \
            torch.zeros_like(self.ids, dtype=torch.bool)
        self.fetch_ids = self.ids[~keep_mask]
        self.keep_from = at[keep_mask]  # positions of kept entries in the old rows
        self.keep_to = torch.nonzero(keep_mask).reshape(-1)
        self.fetch_to = torch.nonzero(~keep_mask).reshape(-1)
        self._on: dict[torch.device, tuple] = {}

    def on(self, device: torch.device) -> tuple:
        """(keep_to, keep_from, fetch_to, fetch_ids) on ``device``; None where nothing is kept / fetched."""
        device = torch.device(device)
        if device not in self._on:
            keep = (self.keep_to.to(device), self.keep_from.to(device)) if self.keep_to.numel() else (None, None)
            fetch = (self.fetch_to.to(device), self.fetch_ids.to(device)) if self.fetch_to.numel() else (None, None)
            self._on[device] = keep + fetch
        return self._on[device]


@dataclass(frozen=True)
class ResidentChange:
    """One change of the resident set (a trigger): entries selected, and how many of them were fetched (the
    others were resident already)."""

    selected: int
    fetched: int


@dataclass(frozen=True)
class Snapshot:
    """The resident set at one moment, for planning a change later on another thread: the ids and views of every
    layer's rows. The views stay valid while held: later appends write past them, and a growth moves the rows
    to a new tensor without freeing these."""

    ids: torch.Tensor
    rows: dict[int, dict[str, torch.Tensor]]


@dataclass
class PreparedSet:
    """New rows for a selection, built from a :class:`Snapshot` (by :meth:`ResidentSet.prepare`), to install."""

    ids: torch.Tensor  # the selected entries, ascending host int64
    rows: dict[int, dict[str, GrowingRows]]  # per layer and row kind
    born_from: int  # resident entries at the snapshot: those after it were born meanwhile
    fetched: int  # entries fetched from the pool


class ResidentSet:
    """The entries on the device and their rows in every CSA layer (see the module docstring).

    ``device``: where the rows live, one device for every layer or ``{layer: device}`` (a model spread over
    devices: each layer's rows beside the layer). ``batched`` (None: wherever the pool's zero-copy multi-layer
    gather runs, i.e. on a GPU): a change writes the rows of all layers on one device into one
    ``[layers, n + headroom, width]`` store per row kind with two launches (kept rows from the old rows, fetched
    rows from the pinned pool), so a trigger's host work does not grow with the number of CSA layers; otherwise
    each layer's rows are assembled by their own copies.
    """

    def __init__(self, layers, widths: dict[str, int], pool: ColdPool,
                 device: torch.device | str | dict[int, torch.device | str], dtype: torch.dtype,
                 batched: bool | None = None):
        self.layers = [int(x) for x in layers]
        self.widths = {name: int(widths[name]) for name in NAMES}
        self.pool = pool
        self.devices = {L: torch.device(device[L] if isinstance(device, dict) else device) for L in self.layers}
        self.dtype = dtype
        self.batched = batched
        self.changes: list[ResidentChange] = []
        self.clear()

    def clear(self) -> None:
        """No entry resident (a new prefill starts: prefill reads every entry, not the resident set)."""
        self._ids = torch.zeros(0, dtype=torch.long)
        self._rows = {layer: {name: GrowingRows(width, self.dtype, self.devices[layer])
                              for name, width in self.widths.items()} for layer in self.layers}
        self._born_upto = 0  # entries with index < this are either selected or not resident; later ones are born

    # ---- reading ----------------------------------------------------------------------------------------

    @property
    def ids(self) -> torch.Tensor:
        """Resident entry indices (host int64, ascending): row i of every layer holds entry ``ids[i]``."""
        return self._ids

    @property
    def count(self) -> int:
        return int(self._ids.numel())

    def rows(self, layer: int, name: str) -> torch.Tensor:
        """Layer ``layer``'s resident rows of kind ``name``: ``[count, width]`` on the device (a view, valid until the
        set changes or grows)."""
        return self._rows[layer][name].view()

    def device_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        """The device tensors holding ``layer``'s rows, by kind (allocated capacity included; a store shared by
        several layers gives each a view of the same storage, which ``measure_cache`` counts once)."""
        return {name: rows.data for name, rows in self._rows[layer].items()}

    def snapshot(self) -> Snapshot:
        return Snapshot(self._ids, {layer: {name: rows.view() for name, rows in by_name.items()}
                                    for layer, by_name in self._rows.items()})

    # ---- writing -----------------------------------------------------------------------------------------

    def append_born(self, layer: int, name: str, rows: torch.Tensor, first: int) -> None:
        """Entries ``first .. first + n - 1`` emitted by ``layer`` while decoding: resident until the next change.
        Every CSA layer emits the same entries; the ids grow once, at the first layer that emits them."""
        self._rows[layer][name].append(rows)
        upto = first + rows.shape[0]
        if name == "compressor" and upto > self._born_upto:
            self._ids = torch.cat([self._ids, torch.arange(max(first, self._born_upto), upto)])
            self._born_upto = upto

    def change_to(self, ids: torch.Tensor, headroom: int) -> ResidentChange:
        """Make ``ids`` (entry indices, any order) the resident set now: rows already resident are kept, the others
        fetched from the cold pool, the rest released. ``headroom``: room for entries born before the next change."""
        ids = torch.unique(torch.as_tensor(ids, dtype=torch.long).cpu())
        rows, plan = self._assemble(self.snapshot(), ids, headroom)
        self._rows, self._ids = rows, plan.ids
        self._born_upto = self.pool.count(self.layers[0]) if self.layers else 0
        return self._record(plan.ids.numel(), plan.fetch_ids.numel())

    def prepare(self, snapshot: Snapshot, ids: torch.Tensor, headroom: int) -> PreparedSet:
        """New rows for ``ids`` planned from ``snapshot``, without changing this set (safe on a helper thread:
        reads only the snapshot's rows and the pool). Install them with :meth:`install`."""
        ids = torch.unique(torch.as_tensor(ids, dtype=torch.long).cpu())
        rows, plan = self._assemble(snapshot, ids, headroom)
        return PreparedSet(plan.ids, rows, int(snapshot.ids.numel()), int(plan.fetch_ids.numel()))

    def install(self, prepared: PreparedSet) -> ResidentChange:
        """Swap in rows made by :meth:`prepare`; the entries born since its snapshot (resident anyway until the next
        change, all newer than the selection) are appended to them."""
        for layer, by_name in prepared.rows.items():  # built on a side stream, used (and later freed) on this one
            if self.devices[layer].type == "cuda":
                stream = torch.cuda.current_stream(self.devices[layer])
                for rows in by_name.values():
                    rows.data.record_stream(stream)
        born = self._ids[prepared.born_from:]
        if born.numel():
            for layer, by_name in prepared.rows.items():
                for name, rows in by_name.items():
                    rows.append(self._rows[layer][name].view()[prepared.born_from:])
        self._rows, self._ids = prepared.rows, torch.cat([prepared.ids, born])
        return self._record(prepared.ids.numel(), prepared.fetched)

    def _record(self, selected: int, fetched: int) -> ResidentChange:
        change = ResidentChange(int(selected), int(fetched))
        self.changes.append(change)
        return change

    # ---- a static-shape row holding the set (static_residency.py) ----------------------------------------------

    def hand_over(self) -> None:
        """The rows now live in a static row's slots, which change the set itself: release them here (the record
        of changes stays, and :meth:`record` extends it)."""
        changes = self.changes
        self.clear()
        self.changes = changes

    def record(self, change: ResidentChange) -> None:
        """A change made elsewhere (a static row's in-place install), counted as this set's."""
        self.changes.append(change)

    def restore(self, ids: torch.Tensor, rows: dict[int, dict[str, torch.Tensor]]) -> None:
        """The set handed back by a static row: entries ``ids`` (ascending host int64) and every layer's rows of
        them, ``[slots, width]`` with row i = entry ``ids[i]`` for i < n (the rest: the row's free slots, kept as
        capacity, so the footprint counts what the row held), owned from now on."""
        self._ids = torch.as_tensor(ids, dtype=torch.long).cpu().clone()
        self._rows = {layer: {name: GrowingRows.over(rows[layer][name], int(self._ids.numel())) for name in NAMES}
                      for layer in self.layers}
        self._born_upto = self.pool.count(self.layers[0]) if self.layers else 0

    # ---- assembly ----------------------------------------------------------------------------------------

    def _assemble(self, snapshot: Snapshot, ids: torch.Tensor, headroom: int):
        """(new rows per layer and kind for ``ids``, the plan): kept rows copied from the snapshot's rows, the
        others gathered from the pool, on the current stream."""
        plan = ResidentPlan(snapshot.ids, ids)
        rows = {}
        for device, layers in self._by_device().items():
            batched = self.batched if self.batched is not None else self.pool.gather_layers_available(device)
            if batched:
                rows.update(self._assemble_batched(snapshot, plan, headroom, device, layers))
            else:
                rows.update(self._assemble_per_layer(snapshot, plan, headroom, device, layers))
        return rows, plan

    def _by_device(self) -> dict[torch.device, list[int]]:
        groups: dict[torch.device, list[int]] = {}
        for layer in self.layers:
            groups.setdefault(self.devices[layer], []).append(layer)
        return groups

    def _assemble_per_layer(self, snapshot: Snapshot, plan: ResidentPlan, headroom: int, device: torch.device,
                            layers: list[int]):
        keep_to, keep_from, fetch_to, fetch_ids_dev = plan.on(device)
        n = plan.ids.numel()
        rows = {}
        for layer in layers:
            rows[layer] = {}
            for name, width in self.widths.items():
                new = GrowingRows(width, self.dtype, device, capacity=n + headroom)
                new.length = n
                data = new.view()
                if keep_to is not None:
                    data[keep_to] = snapshot.rows[layer][name][keep_from]
                if fetch_to is not None:
                    data[fetch_to] = self.pool.gather(layer, name, plan.fetch_ids, device, fetch_ids_dev)
                rows[layer][name] = new
        return rows

    def _assemble_batched(self, snapshot: Snapshot, plan: ResidentPlan, headroom: int, device: torch.device,
                          layers: list[int]):
        from .kernels.pool_gather import gather_rows_layers

        keep_to, keep_from, fetch_to, fetch_ids_dev = plan.on(device)
        n = plan.ids.numel()
        rows = {layer: {} for layer in layers}
        for name, width in self.widths.items():
            store = torch.empty((len(layers), n + headroom, width), dtype=self.dtype, device=device)
            if keep_to is not None:  # device -> device, from the rows the layers hold now
                gather_rows_layers([snapshot.rows[layer][name] for layer in layers], keep_from, keep_to, store)
            if fetch_to is not None:  # pinned pool -> device, zero-copy
                self.pool.gather_layers(layers, name, plan.fetch_ids, fetch_ids_dev, fetch_to, store)
            for j, layer in enumerate(layers):
                rows[layer][name] = GrowingRows.over(store[j], n)
        return rows
