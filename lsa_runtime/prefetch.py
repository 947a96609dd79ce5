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

The static step (:mod:`~.static_runner`) takes :class:`StreamPrefetcher` instead: the same start / finish, the job
run on the decode thread on a side stream right after the next step is queued (no helper thread; the host work of a
prefetch overlaps a step on the device; docs/BENCHMARKS.md has the comparison).
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


class StreamPrefetcher:
    """The static step's prefetch: the job runs on the decode thread, on a GPU on a side stream, deferred to the
    next decode step. :meth:`start` takes the job and the point of the device work queued so far (the job's inputs:
    h_t, the flushed entries); the Session calls :meth:`launch` right after it has queued the next step, so the
    job's host work, and its waits for its own device reads (a selection's size, a plan's counts), run while that
    step runs on the device instead of after it, and no helper thread contends for the interpreter;
    :meth:`finish` (at the window boundary) runs the job if it was not launched and orders the current stream after
    its device work, without waiting on the host. ``Finished.wait_seconds`` is the time :meth:`finish` spent (the
    whole job when it had to run it), ``helper_seconds`` the job's own host time.

    Memory across streams: ``reads`` (tensors the job reads that the decode stream allocated; host tensors among them
    are skipped) are kept from reuse until the side stream is past them; what the job returns is the installer's to keep
    (:meth:`StaticResidentRows.install_prepared <.static_residency.StaticResidentRows.install_prepared>`)."""

    def __init__(self) -> None:
        self._job: Callable[[], Any] | None = None
        self._reads: tuple[torch.Tensor, ...] = ()
        self._ready: torch.cuda.Event | None = None
        self._device: torch.device | None = None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._ran: tuple[Any, BaseException | None, float, torch.cuda.Event | None] | None = None

    @property
    def pending(self) -> bool:
        return self._job is not None or self._ran is not None

    def start(self, job: Callable[[], Any], device: torch.device | str, reads=()) -> None:
        """Take ``job`` to run at :meth:`launch` (on a GPU: on the side stream, after the work queued so far)."""
        if self.pending:
            raise RuntimeError("a prefetch is already in flight")
        self._device = torch.device(device)
        self._ready = None
        if self._device.type == "cuda":
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(self._device))
            if self._device not in self._streams:
                self._streams[self._device] = torch.cuda.Stream(self._device)
        self._job, self._reads = job, tuple(reads)

    def launch(self) -> None:
        """Run the job taken by :meth:`start`, if any and not yet run; its error is kept for :meth:`finish`."""
        if self._job is None:
            return
        job, reads, self._job, self._reads = self._job, self._reads, None, ()
        stream = self._streams.get(self._device)
        began = time.perf_counter()
        result, error, done = None, None, None
        with torch.no_grad(), (torch.cuda.stream(stream) if stream is not None else nullcontext()):
            if stream is not None:
                stream.wait_event(self._ready)
                for tensor in reads:
                    if tensor.is_cuda:  # host tensors need no guard
                        tensor.record_stream(stream)
            try:
                result = job()
            except Exception as exc:  # noqa: BLE001 - re-raised by finish, on the boundary, as the thread's is
                error = exc
            if stream is not None:
                done = torch.cuda.Event()
                done.record(stream)
        self._ran = (result, error, time.perf_counter() - began, done)

    def finish(self) -> Finished:
        """The job's result (run now if it was not launched), the current stream ordered after its device work.
        Re-raises its error."""
        if not self.pending:
            raise RuntimeError("no prefetch in flight")
        began = time.perf_counter()
        self.launch()
        (result, error, seconds, done), self._ran = self._ran, None
        if done is not None:
            torch.cuda.current_stream(self._device).wait_event(done)
        if error is not None:
            raise error
        return Finished(result, seconds, time.perf_counter() - began)

    def cancel(self) -> None:
        """Drop the job: not run, it is let go; run, the current stream waits for its device work (it reads the
        row's slots, which the next sequence in the row will overwrite). Its error is dropped."""
        self._job, self._reads = None, ()
        if self._ran is not None:
            done, self._ran = self._ran[3], None
            if done is not None:
                torch.cuda.current_stream(self._device).wait_event(done)

    def close(self) -> None:
        self.cancel()
