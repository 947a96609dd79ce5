"""Prefetch: prepare the next window's resident set on a helper thread while the current window decodes.

A synchronous trigger (``SessionConfig.prefetch_steps = 0``, the default) stops decoding at each window boundary
t0 (every tau steps): the policy scores the entries (FlashMemory: the memory indexer on h_t0) and the
:class:`~.residency.ResidentSet` plans and assembles the new rows. In an eager decode step most of that is host
work on the critical path.

With ``prefetch_steps = d`` (1 <= d < tau) the trigger for the next window fires d steps before the boundary,
with the state of that step (h_{t0-d}, the entries visible then). The Session takes a snapshot of the resident
set and hands :class:`ResidentPrefetcher` a job, the selection plus :meth:`~.residency.ResidentSet.prepare`; the
job runs on a helper thread (on a GPU: on its own CUDA stream, ordered after the decode work queued before the
start) while the decode thread keeps decoding with the current set. At the boundary :meth:`finish` hands back the
prepared set, which the Session installs (:meth:`~.residency.ResidentSet.install` appends the entries born during
those d steps). The decode thread waits only if the helper is not done, and the wait is measured.

What changes for the model: the window [t0, t0 + tau) is served by the set chosen from the state d steps
earlier (a lookahead of tau + d tokens instead of tau). What does not: the swap happens at the same step
whatever the helper's speed, so decoding is deterministic. Thread safety: the job reads only rows that existed
at the snapshot (the decode thread appends past them) and the cold pool (its lock), and the helper waits for all
of its device work before it reports done, so the snapshot's rows are not let go while read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Finished:
    """A finished job: its result, the helper thread's time on it, and how long :meth:`finish` waited for it."""

    result: Any
    helper_seconds: float
    wait_seconds: float


class ResidentPrefetcher:
    """One job at a time: :meth:`start` (decode thread) hands it to the helper, :meth:`finish` (decode thread, at
    the window boundary) returns its result, re-raising its error."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._future: Future | None = None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    @property
    def pending(self) -> bool:
        return self._future is not None

    def start(self, job: Callable[[], Any], device: torch.device | str) -> None:
        """Run ``job()`` on the helper thread; on a GPU on the helper's stream, after everything queued so far."""
        if self._future is not None:
            raise RuntimeError("a prefetch is already in flight")
        device = torch.device(device)
        ready = None
        if device.type == "cuda":  # h_t, index keys and resident rows are written by work queued so far
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(device))
            if device not in self._streams:
                self._streams[device] = torch.cuda.Stream(device)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fm-index-prefetch")
        self._future = self._executor.submit(self._run, job, device, ready)

    def _run(self, job, device, ready) -> tuple[Any, float]:
        start = time.perf_counter()
        stream = self._streams.get(device)
        with torch.no_grad(), (torch.cuda.stream(stream) if stream is not None else nullcontext()):
            if stream is not None:
                stream.wait_event(ready)
            try:
                result = job()
            finally:
                if stream is not None:  # every read of the snapshot done before it is let go (errors too)
                    done = torch.cuda.Event()
                    done.record(stream)
                    done.synchronize()
        return result, time.perf_counter() - start

    def finish(self) -> Finished:
        """Wait for the job (if needed) and return it. Re-raises its error."""
        if self._future is None:
            raise RuntimeError("no prefetch in flight")
        start = time.perf_counter()
        future, self._future = self._future, None
        result, helper_seconds = future.result()
        return Finished(result, helper_seconds, time.perf_counter() - start)

    def cancel(self) -> None:
        """Drop an in-flight job (waits for the helper to finish with the rows it reads; errors ignored)."""
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
