"""LSA's resident mode of the static-shape step: which entries each row's CSA slots hold, and the trigger's change
of them, in place.

A :class:`~.static_decode.StaticDecodeState` built with ``resident=R`` gives every CSA layer R entry slots per row
instead of one per entry: the step's Lightning Indexer picks its top-k among the slots a row has filled, and the
entries a row's CSA layers emit while decoding are appended after them, exactly what
:class:`~.lsa_cache.LSACSACache` hands the stock indexer (the resident set, then the entries born since the last
trigger). The step itself does not change, so it stays one CUDA graph per batch size; everything that changes
the set runs host-side between steps, here:

* :meth:`StaticResidentRows.join`: a sequence prefilled on the LSA path (its cold pool, its ``ResidentSet`` after
  the first trigger) takes a row: window, open windows and HCA entries as :meth:`StaticDecodeState.load_row`
  copies them, the resident rows of every CSA layer into the first slots;
* :meth:`StaticResidentRows.flush`: the entries born since the last flush (slots ``filled .. length``) go to the
  row's cold pool and its ids (the pool is where the next trigger's selection is fetched from) and, where the
  memory layers keep every entry's K^IComp on the device (``memory_keys="device"``), to those keys;
* :meth:`StaticResidentRows.install`: a trigger's selection (ascending entry ids) becomes the row's resident set
  in place: rows already in a slot are kept, the others gathered from the pool, written into slots ``0 .. n - 1``
  of every CSA layer, the row's length set to n. Other rows are not touched, so rows trigger independently.

* with prefetch (a trigger d steps before the boundary, its job on a side stream while a step runs:
  :class:`~.prefetch.StreamPrefetcher`): :meth:`StaticResidentRows.prepare`
  assembles the new rows from a snapshot (slots below the snapshot's fill do not change until the next install:
  the step appends past them) and the pool, and :meth:`StaticResidentRows.install_prepared` writes them in at the
  boundary, the entries born since the snapshot moved after them;
* :meth:`StaticResidentRows.leave`: the row handed back to its sequence's cache and ``ResidentSet``.

This class owns the ids of every row (slot i of every CSA layer holds entry ``ids[row][i]``), kept on the state's
device so that a trigger's unique, plan and gathers run there and the host reads only counts (CPU ops on a
selection's ~13K ids cost more than the device's whole share of a trigger: docs/BENCHMARKS.md); the state owns the
slots; the sequence's ``ResidentSet`` keeps the record of its changes (the Session records what :meth:`install`
returns).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cold_pool import ColdPool
from .residency import NAMES, ResidentChange, ResidentPlan
from .static_decode import StaticDecodeState


@dataclass
class PreparedRows:
    """A row's next resident set built ahead (:meth:`StaticResidentRows.prepare`): the selected entries (ascending),
    their rows per kind (all CSA layers stacked), the row's fill at the snapshot (later slots: born since) and the
    fetch count."""

    ids: torch.Tensor
    rows: dict[str, torch.Tensor]  # {kind: [CSA layers, n, width]}
    born_from: int
    fetched: int


class StaticResidentRows:
    """The resident sets of the rows of ``state`` (built with ``resident=R``) over their own cold pools;
    ``csa_layers``: the model's CSA layer indices (the pools' and resident sets' layers); ``positions``: the host's
    count of tokens seen per row, owned and advanced by the caller that steps the rows (:class:`StaticRunner
    <.static_runner.StaticRunner>`), read here to count the entries born without reading the device."""

    def __init__(self, state: StaticDecodeState, csa_layers, positions: list[int]):
        if state.geometry.resident is None:
            raise ValueError("StaticResidentRows needs a StaticDecodeState built with resident=<slots>")
        if len(positions) != state.geometry.batch:
            raise ValueError(f"positions: {len(positions)} rows, the state has {state.geometry.batch}")
        self.state = state
        self.layers = [int(x) for x in csa_layers]
        rows = state.geometry.batch
        self.device = state.rows.device
        self.positions = positions
        self.ids: list[torch.Tensor] = [torch.zeros(0, dtype=torch.long, device=self.device) for _ in range(rows)]
        self.pools: list[ColdPool | None] = [None] * rows
        self.filled = [0] * rows  # slots whose entries are in the row's pool and ids (later slots: born since)
        # (slots held, tokens seen) when the row's slots were last written: the step appends one entry per closed
        # window of m tokens after that, so the row's length is a host count (CompressedStore.step)
        self.marks = [(0, 0)] * rows

    @property
    def slots(self) -> int:
        return self.state.geometry.resident

    def _store(self, layer: int, name: str):
        return getattr(self.state.layers[layer], name)

    def join(self, row: int, cache, residency, pool: ColdPool) -> int:
        """Put a sequence prefilled on the LSA path in ``row``: ``cache`` its ``DynamicCache`` (cold-pool CSA layers),
        ``residency`` its ``ResidentSet`` (the first trigger's set), ``pool`` its cold pool, which the row keeps
        using. Returns the row's next position (tokens seen)."""
        if residency.count > self.slots:
            raise ValueError(f"row {row}: {residency.count} resident entries exceed the {self.slots} slots")
        resident = {layer: {name: residency.rows(layer, name) for name in NAMES} for layer in self.layers}
        length = self.state.load_row(row, cache, resident=resident)
        self.ids[row] = residency.ids.to(self.device, copy=True)
        self.pools[row], self.filled[row] = pool, residency.count
        self.marks[row] = (residency.count, length)
        return length

    def length(self, row: int) -> int:
        """Slots ``row`` holds after the steps stepped so far (``positions[row]`` tokens seen): those it held at its
        last write plus one per window of m tokens closed since, counted on the host (the device's count, which the
        queued steps may not have reached, is never read)."""
        slots, seen = self.marks[row]
        m = self.state.geometry.csa_rate
        return slots + self.positions[row] // m - seen // m

    def flush(self, row: int, index_keys: dict | None = None) -> int:
        """Append the entries ``row``'s CSA layers emitted since the last flush to its cold pool and its ids;
        returns how many. ``index_keys``: ``{layer: GrowingRows}`` of every entry's K^IComp kept on the device
        (the memory layers' keys of ``memory_keys="device"``), which get the born keys too."""
        first, upto = self.filled[row], self.length(row)
        if upto <= first:
            return 0
        pool = self.pools[row]
        born_from = pool.count(self.layers[0])  # the entry index of the first one born
        pool.append_many([(layer, name, self._store(layer, name).entries[row, first:upto])
                          for layer in self.layers for name in NAMES])
        for layer in self.layers:
            if index_keys and index_keys.get(layer) is not None:
                index_keys[layer].append(self._store(layer, "indexer").entries[row, first:upto])
        born = torch.arange(born_from, born_from + upto - first, device=self.device)
        self.ids[row] = torch.cat([self.ids[row], born])
        self.filled[row] = upto
        return upto - first

    def install(self, row: int, ids, headroom: int, index_keys: dict | None = None) -> ResidentChange:
        """Make ``ids`` (entry indices) ``row``'s resident set now, in place (the born entries flushed first, with
        ``index_keys`` as :meth:`flush` takes them); ``headroom``: slots to leave for the entries born before the
        next change (the step cannot refuse an append: a full row would overwrite its last slot)."""
        self.flush(row, index_keys)
        ids = self._unique(ids)
        pool = self.pools[row]
        if ids.numel():
            first, last = torch.stack((ids[0], ids[-1])).tolist()  # one read of the device
            if first < 0 or last >= pool.count(self.layers[0]):
                raise ValueError(f"row {row}: ids outside the {pool.count(self.layers[0])} entries of its pool")
        if ids.numel() + headroom > self.slots:
            raise ValueError(f"row {row}: {ids.numel()} entries + {headroom} for those born before the next "
                             f"trigger exceed the {self.slots} slots")
        plan = ResidentPlan(self.ids[row], ids)
        self._write(row, self._assemble(row, plan))
        self.ids[row], self.filled[row] = plan.ids, int(plan.ids.numel())
        self.marks[row] = (self.filled[row], self.positions[row])
        return ResidentChange(int(plan.ids.numel()), int(plan.fetch_ids.numel()))

    def prepare(self, row: int, ids, snapshot_ids: torch.Tensor, snapshot_filled: int) -> PreparedRows:
        """New rows for ``ids`` against the row as it was at a snapshot (its ids ``snapshot_ids``, all flushed: slot
        i < ``snapshot_filled`` holds entry ``snapshot_ids[i]``), without changing the row: safe on another stream
        while the step runs (it writes only slots at or past the row's length)."""
        plan = ResidentPlan(snapshot_ids, self._unique(ids))
        return PreparedRows(plan.ids, self._assemble(row, plan), int(snapshot_filled), int(plan.fetch_ids.numel()))

    def install_prepared(self, row: int, prepared: PreparedRows, headroom: int,
                         index_keys: dict | None = None) -> ResidentChange:
        """Write rows made by :meth:`prepare` into ``row`` now; the entries born since its snapshot (flushed here, with
        ``index_keys`` as :meth:`flush` takes them) follow them, as in :meth:`ResidentSet.install
        <.residency.ResidentSet.install>`."""
        self.flush(row, index_keys)
        born_ids = self.ids[row][prepared.born_from:]
        n, born = int(prepared.ids.numel()), int(born_ids.numel())
        if n + born + headroom > self.slots:
            raise ValueError(f"row {row}: {n} entries, {born} born since the snapshot and {headroom} for those born "
                             f"before the next trigger exceed the {self.slots} slots")
        # the born rows are read before the new rows overwrite the slots they sit in: one stack per kind
        since = slice(prepared.born_from, prepared.born_from + born)
        moved = {name: torch.stack([self._store(layer, name).entries[row, since] for layer in self.layers])
                 for name in NAMES} if born else None
        self._write(row, prepared.rows, moved)
        if prepared.ids.device.type == "cuda":  # built on another stream (the prefetch's): freed only after the copy
            stream = torch.cuda.current_stream(prepared.ids.device)
            for tensor in (prepared.ids, *prepared.rows.values()):
                tensor.record_stream(stream)
        self.ids[row], self.filled[row] = torch.cat([prepared.ids, born_ids]), n + born
        self.marks[row] = (n + born, self.positions[row])
        return ResidentChange(n, prepared.fetched)

    def _unique(self, ids) -> torch.Tensor:
        """``ids`` (entry indices, any order, any device) ascending and unique, on the rows' device."""
        return torch.unique(torch.as_tensor(ids, dtype=torch.long).reshape(-1).to(self.device))

    def _assemble(self, row: int, plan: ResidentPlan) -> dict[str, torch.Tensor]:
        """The rows of ``plan.ids`` in every CSA layer, ``{kind: [layers, n, width]}``: kept rows copied from the
        row's slots, the others gathered from its pool. Where the pool's multi-layer zero-copy gather runs (a GPU
        with Triton) one launch per kind does each part for all layers; otherwise one copy per layer and kind."""
        from .kernels.pool_gather import gather_rows_layers

        pool, n = self.pools[row], int(plan.ids.numel())
        device = self.state.rows.device
        keep_to, keep_from, fetch_to, fetch_ids = plan.on(device)
        batched = pool.gather_layers_available(device)
        out = {}
        for name in NAMES:
            stores = [self._store(layer, name).entries for layer in self.layers]
            rows = stores[0].new_empty((len(stores), n, stores[0].shape[-1]))
            if batched:
                if keep_to is not None:  # device -> device, from the slots the row holds now
                    gather_rows_layers([store[row] for store in stores], keep_from, keep_to, rows)
                if fetch_to is not None:  # pinned pool -> device, zero-copy
                    pool.gather_layers(self.layers, name, plan.fetch_ids, fetch_ids, fetch_to, rows)
            else:
                for j, (layer, store) in enumerate(zip(self.layers, stores)):
                    if keep_to is not None:
                        rows[j, keep_to] = store[row, keep_from]
                    if fetch_to is not None:
                        rows[j, fetch_to] = pool.gather(layer, name, plan.fetch_ids, device, fetch_ids)
            out[name] = rows
        return out

    def _write(self, row: int, rows: dict[str, torch.Tensor], born: dict[str, torch.Tensor] | None = None) -> None:
        """Slots ``0 .. n - 1`` of ``row`` in every CSA layer from ``rows`` (``{kind: [layers, n, width]}``), then
        ``born`` (the same layout) after them, the row's length set: one multi-tensor copy per kind and part."""
        n = rows[NAMES[0]].shape[1]
        b = born[NAMES[0]].shape[1] if born is not None else 0
        for name in NAMES:
            stores = [self._store(layer, name) for layer in self.layers]
            if n:
                torch._foreach_copy_([store.entries[row, :n] for store in stores], list(rows[name].unbind(0)))
            if b:
                torch._foreach_copy_([store.entries[row, n:n + b] for store in stores], list(born[name].unbind(0)))
            length = torch.full((), n + b, dtype=torch.long, device=stores[0].lengths.device)
            torch._foreach_copy_([store.lengths[row] for store in stores], [length] * len(stores))

    def leave(self, row: int, cache, residency, length: int, index_keys: dict | None = None) -> None:
        """Hand ``row`` back to its sequence (``length`` tokens seen): born entries flushed, window, open windows
        and HCA entries written into ``cache`` (:meth:`StaticDecodeState.store_row`), the resident rows and ids
        into ``residency``; the stock-path LSA model can continue from them and stats read them."""
        self.flush(row, index_keys)
        self.state.store_row(row, cache, length, pooled=self.pools[row].count(self.layers[0]))
        residency.restore(self.ids[row].cpu(), {layer: {name: self._store(layer, name).entries[row].clone()
                                                  for name in NAMES} for layer in self.layers})
        self.pools[row] = None
