"""The Lightning Indexer's top-k at decode shapes: which exact method is fastest on this device.

    python bench/bench_topk.py [--lengths 13125,131078] [--batches 1,16,64] [--k 512] [--reps 200]

Run 17 (docs/BENCHMARKS.md) found ``scores.topk(512)`` at ~70 us a call on the H200 whether the row holds 13,125
or 131,078 candidates: 1.5 ms of a 16.5 ms batch-1 step over the 21 CSA layers. The picks feed a gather, so their
order does not matter. Methods, each giving the same set of indices (ties aside; checked here against
``torch.topk`` on every shape before timing):

- ``topk``: ``torch.topk(k)`` (sorted, what the static step ran until run 20);
- ``topk_unsorted``: ``torch.topk(k, sorted=False)`` (what it runs since);
- ``sort``: ``torch.sort(descending=True)`` then the first k;
- ``two_stage``: the row cut into S segments, the top-k of each (S slices in parallel), then the top-k of the
  S * k candidates (exact: every global top-k entry is in its own segment's top-k).

Prints a table of median microseconds per call (CUDA events around ``--reps`` calls, after a warm-up) per method,
length and batch size; on a CPU the same with the host clock (a smoke test, not the target).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def two_stage(scores: torch.Tensor, k: int, segments: int) -> torch.Tensor:
    """Exact top-k indices of each row of ``scores`` [B, n] in two rounds (see the module doc)."""
    batch, n = scores.shape
    width = -(-n // segments)
    if width < k:
        return scores.topk(k, dim=-1, sorted=False).indices
    padded = torch.nn.functional.pad(scores, (0, width * segments - n), value=float("-inf"))
    local = padded.view(batch, segments, width).topk(k, dim=-1, sorted=False)
    offsets = (torch.arange(segments, device=scores.device) * width)[None, :, None]
    candidates = (local.indices + offsets).view(batch, -1)
    best = local.values.view(batch, -1).topk(k, dim=-1, sorted=False).indices
    return candidates.gather(1, best)


METHODS = {
    "topk": lambda s, k: s.topk(k, dim=-1).indices,
    "topk_unsorted": lambda s, k: s.topk(k, dim=-1, sorted=False).indices,
    "sort": lambda s, k: s.sort(dim=-1, descending=True).indices[:, :k],
    "two_stage_8": lambda s, k: two_stage(s, k, 8),
    "two_stage_32": lambda s, k: two_stage(s, k, 32),
}


def same_sets(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.sort(dim=-1).values, b.sort(dim=-1).values)


def time_us(fn, reps: int, device: str) -> float:
    for _ in range(5):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) * 1e3)
        return statistics.median(times)
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        fn()
        times.append((time.perf_counter() - began) * 1e6)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="13125,131078", help="candidates per row (LSA's slots, full's entries)")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
        batches = [int(x) for x in args.batches.split(",")]
    except ValueError:
        ap.error("--lengths and --batches are comma-separated integers")
    if args.k < 1 or min(lengths) < args.k or min(batches) < 1 or args.reps < 1:
        ap.error("need 1 <= k <= every length, batches >= 1, reps >= 1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    print(f"{'length':>8} {'B':>3} " + " ".join(f"{m:>14}" for m in METHODS) + "   (median us a call, " +
          ("CUDA events)" if device == "cuda" else "host clock, CPU)"), flush=True)
    for n in lengths:
        for batch in batches:
            scores = torch.randn(batch, n, device=device, generator=gen)  # distinct values: no ties
            want = scores.topk(args.k, dim=-1).indices
            row = {"length": n, "batch": batch, "k": args.k, "device": device}
            for name, method in METHODS.items():
                if not same_sets(method(scores, args.k), want):
                    raise SystemExit(f"{name} gave another set than torch.topk at length {n}, B = {batch}")
                row[name] = time_us(lambda method=method: method(scores, args.k), args.reps, device)
            rows.append(row)
            print(f"{n:>8,} {batch:>3} " + " ".join(f"{row[m]:>14.1f}" for m in METHODS), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "torch": torch.__version__}, indent=1) + "\n")


if __name__ == "__main__":
    main()
