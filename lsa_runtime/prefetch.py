"""Prefetch: build the next window's resident set on a helper thread while the current window decodes.

A synchronous trigger (``Session(prefetch_steps=0)``, the default) stops decoding at each window boundary t0
(every tau steps): the policy scores the entries (FlashMemory: the memory indexer on h_t0), the host plans the
change of the resident set (:class:`~.lsa_cache.ResidentPlan`), and every CSA layer assembles its new rows
(kept rows copied on the device, the others fetched from the cold pool). In an eager decode step most of that
is host work on the critical path (docs/BENCHMARKS.md, "Trigger steps within decoding").

With ``prefetch_steps = d`` (1 <= d < tau) the trigger for the next window fires d steps before the boundary,
with the state of that step (h_{t0-d}, the entries visible then). :class:`ResidentPrefetcher` runs the
selection, the plan and the row assembly on a helper thread (on a GPU: on its own CUDA stream) while the
decode thread keeps decoding with the current set; at the boundary :meth:`ResidentPrefetcher.finish` swaps the
new rows in, appending the entries born during those d steps (resident anyway until the next trigger). The
decode thread's work is then a snapshot at the start (views, one CUDA event) and the swap at the boundary; it
waits for the helper only if the helper has not finished, and reports how long (``wait_seconds``).

What changes for the model: the window [t0, t0 + tau) is served by the set chosen from the state d steps
earlier (a lookahead of tau + d tokens instead of tau). What does not: the swap happens at the same step
whatever the helper's speed, so decoding is deterministic. The pieces running on both threads are made safe
here and in :class:`~.cold_pool.ColdPool` (its lock): the helper reads only rows that existed at the snapshot
(the decode thread appends past them) and waits for all of its device work before it lets go of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .cold_pool import GrowingRows
from .lsa_cache import LSACSACache, build_resident_all


@dataclass
class PreparedSet:
    """A resident set built by the helper thread, ready to swap in."""

    ids: torch.Tensor  # the selected entries, sorted unique host int64
    rows: list[dict[str, GrowingRows] | None]  # per layer (None: the layer held nothing yet)
    born_from: list[int]  # per layer, resident entries at the snapshot
    fetched: int  # entries fetched from the pool, summed over layers
    bytes_to_device: int  # bytes the selection and the fetch moved to the device (pool counter)
    seconds: float  # helper-thread time


@dataclass
class SwapResult:
    ids: torch.Tensor
    fetched: int
    bytes_to_device: int
    prefetch_seconds: float  # time the helper thread spent
    wait_seconds: float  # time the decode thread waited for the helper at the swap


class ResidentPrefetcher:
    """One prefetch at a time: :meth:`start` (decode thread), :meth:`finish` (decode thread, at the boundary).

    ``select`` (given to :meth:`start`) runs on the helper thread and returns the entry ids; on a GPU it runs
    on the helper's stream, after everything the decode thread queued before :meth:`start`.
    """

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._future: Future | None = None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    @property
    def pending(self) -> bool:
        return self._future is not None

    def start(self, layers: list[LSACSACache], select: Callable[[], torch.Tensor], headroom: int,
              device: torch.device) -> None:
        """Snapshot every layer's resident set and hand the selection + row assembly to the helper thread."""
        if self._future is not None:
            raise RuntimeError("a prefetch is already in flight")
        device = torch.device(device)
        snapshots = [layer.resident_snapshot() for layer in layers]
        ready = None
        if device.type == "cuda":  # h_t, index keys and resident rows are written by work queued so far
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(device))
            if device not in self._streams:
                self._streams[device] = torch.cuda.Stream(device)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fm-index-prefetch")
        self._future = self._executor.submit(self._prepare, layers, snapshots, select, headroom, device, ready)

    def _prepare(self, layers, snapshots, select, headroom, device, ready) -> PreparedSet:
        start = time.perf_counter()
        stream = self._streams.get(device)
        with torch.no_grad(), (torch.cuda.stream(stream) if stream is not None else nullcontext()):
            if stream is not None:
                stream.wait_event(ready)
            try:
                pool = layers[0].pool if layers else None
                before = pool.bytes_to_device if pool is not None else 0
                ids = torch.unique(torch.as_tensor(select(), dtype=torch.long).reshape(-1).cpu())  # sorted
                born_from = [int(old_ids.numel()) for old_ids, _ in snapshots]
                rows, fetched = build_resident_all(layers, ids, headroom, snapshots)
                moved = (pool.bytes_to_device if pool is not None else 0) - before
            finally:
                if stream is not None:  # all reads of the snapshot done before its views are let go (errors too)
                    done = torch.cuda.Event()
                    done.record(stream)
                    done.synchronize()
        return PreparedSet(ids, rows, born_from, fetched, moved, time.perf_counter() - start)

    def finish(self, layers: list[LSACSACache]) -> SwapResult:
        """Wait for the helper (if needed) and swap the prepared rows into ``layers``. Re-raises its error."""
        if self._future is None:
            raise RuntimeError("no prefetch in flight")
        start = time.perf_counter()
        future, self._future = self._future, None
        prepared: PreparedSet = future.result()
        waited = time.perf_counter() - start
        for layer, rows, born_from in zip(layers, prepared.rows, prepared.born_from):
            if rows is not None:
                layer.install_resident(prepared.ids, rows, born_from)
        return SwapResult(prepared.ids, prepared.fetched, prepared.bytes_to_device, prepared.seconds, waited)

    def cancel(self) -> None:
        """Drop an in-flight prefetch (waits for the helper to finish with the rows it reads; errors ignored)."""
        if self._future is None:
            return
        future, self._future = self._future, None
        try:
            future.result()
        except Exception:  # noqa: BLE001 - the prefetch is dropped; its error has no one to go to
            pass

    def close(self) -> None:
        self.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

