"""Median wall time of a callable: CUDA events on a GPU (after a synchronising warm-up), perf_counter on CPU."""

from __future__ import annotations

import time

import torch


def median_ms(fn, reps: int = 5) -> float:
    """Run ``fn`` once to warm up, then ``reps`` times; the median in milliseconds."""
    cuda = torch.cuda.is_available()
    fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]
