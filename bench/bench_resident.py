"""Host cost of a trigger's resident-set change on all 21 CSA layers: per-layer copies vs batched launches.

    python bench/bench_resident.py [--entries 131072] [--resident 4096] [--width 8] [--reps 7]

Every CSA layer holds the same resident entries (one ``residency.ResidentSet``), so the set arithmetic (which
entries are kept, where they sit, which are fetched) and its host->device index copies happen once per trigger.
The row moves are then either done per layer (``ResidentSet(batched=False)``: a few copies per layer and row
kind) or, on a GPU, batched into two multi-layer gather launches per row kind (the default there). Rows are
``--width`` wide (default 8) so that the row copies, which a GPU does in microseconds, do not hide the host work
this measures. Each repetition changes ~10% of the set (the rest is kept) and is checked equal between the paths
and against the pool's rows. Median wall time over ``--reps``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.flash_model import flash_config  # noqa: E402
from lsa_runtime.backbone import csa_layers  # noqa: E402
from lsa_runtime.cold_pool import ColdPool  # noqa: E402
from lsa_runtime.residency import ResidentSet  # noqa: E402


def filled_set(config, entries: int, width: int, device: str, batched: bool) -> ResidentSet:
    torch.manual_seed(0)
    widths = {"compressor": width, "indexer": width}
    pool = ColdPool(csa_layers(config), widths, torch.bfloat16, initial_entries=entries)
    for layer in csa_layers(config):
        for name in widths:
            pool.append(layer, name, torch.randn(entries, width, device=device).to(torch.bfloat16))
    return ResidentSet(csa_layers(config), widths, pool, device, torch.bfloat16, batched=batched)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=131072)
    ap.add_argument("--resident", type=int, default=4096)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = flash_config()
    sets = {"per-layer copies": filled_set(config, args.entries, args.width, device, batched=False),
            "batched launches": filled_set(config, args.entries, args.width, device, batched=True)}
    if not sets["batched launches"].pool.gather_layers_available(device):
        del sets["batched launches"]  # needs the zero-copy gather (a GPU, or the Triton interpreter)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randperm(args.entries, generator=gen)[: args.resident].sort().values
    times = {name: [] for name in sets}
    for rep in range(args.reps + 1):
        keep = ids[torch.randperm(ids.numel(), generator=gen)[: int(0.9 * ids.numel())]]
        ids = torch.cat([keep, torch.randperm(args.entries, generator=gen)[: args.resident - keep.numel()]]).unique()
        for name, residency in sets.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            residency.change_to(ids, 18)
            if device == "cuda":
                torch.cuda.synchronize()
            if rep:  # the first repetition warms up
                times[name].append((time.perf_counter() - start) * 1e3)
        first = next(iter(sets.values()))
        for layer in first.layers:
            for row_kind in ("compressor", "indexer"):
                want = first.pool.host_rows(layer, row_kind)[first.ids].to(device)
                assert all(torch.equal(r.rows(layer, row_kind), want) for r in sets.values())
    print(f"{len(first.layers)} CSA layers, {args.entries:,} entries, {ids.numel():,} resident, rows {args.width} "
          f"wide, {device}")
    print("| path | median ms | min ms |\n| --- | ---: | ---: |")
    for name, ts in times.items():
        print(f"| {name} | {sorted(ts)[len(ts) // 2]:.1f} | {min(ts):.1f} |")


if __name__ == "__main__":
    main()
