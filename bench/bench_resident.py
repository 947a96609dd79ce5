"""Host cost of a trigger's resident-set change on all 21 CSA layers: per-layer plans, one shared plan, batched.

    python bench/bench_resident.py [--entries 131072] [--resident 4096] [--width 8] [--reps 7]

Every CSA layer of a Session holds the same resident entries, so the set arithmetic (which entries are
kept, where they sit, which are fetched) and its host->device index copies can be done once per trigger
(``lsa_cache.set_resident_all``) instead of once per layer (``LSACSACache.set_resident`` in a loop); on a GPU
the row moves of all layers can also be batched into two multi-layer gather launches per row kind
(``lsa_cache.build_resident_all``, the default there; "batched" below). Rows are
``--width`` wide (default 8) so that the row copies, which a GPU does in microseconds, do not hide the host
work this measures. Each repetition changes ~10% of the set (the rest is kept) and is checked equal between
the paths. Median wall time over ``--reps``.
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
from lsa_runtime.lsa_cache import LSACSACache, build_lsa_cache, set_resident_all  # noqa: E402


def filled_layers(config, entries: int, width: int, device: str):
    torch.manual_seed(0)
    pool = ColdPool(csa_layers(config), {"compressor": width, "indexer": width}, torch.bfloat16,
                    initial_entries=entries)
    cache = build_lsa_cache(config, pool, [])
    layers = [layer for layer in cache.layers if isinstance(layer, LSACSACache)]
    for layer in layers:
        layer.widths = {"compressor": width, "indexer": width}
        for name in layer.widths:
            layer.update_compressor_states(name, torch.randn(1, entries, width, device=device).to(torch.bfloat16))
        layer.end_prefill()
    return layers


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=131072)
    ap.add_argument("--resident", type=int, default=4096)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = flash_config()
    per_layer, shared, batched = (filled_layers(config, args.entries, args.width, device) for _ in range(3))
    gen = torch.Generator().manual_seed(1)
    ids = torch.randperm(args.entries, generator=gen)[: args.resident].sort().values
    times = {"per-layer plans": [], "one shared plan": [], "one shared plan, batched launches": []}
    for rep in range(args.reps + 1):
        keep = ids[torch.randperm(ids.numel(), generator=gen)[: int(0.9 * ids.numel())]]
        ids = torch.cat([keep, torch.randperm(args.entries, generator=gen)[: args.resident - keep.numel()]])
        ids = ids.unique()
        for name, run in (("per-layer plans", lambda: [la.set_resident(ids, 18) for la in per_layer]),
                          ("one shared plan", lambda: set_resident_all(shared, ids, 18, batched=False)),
                          ("one shared plan, batched launches",
                           lambda: set_resident_all(batched, ids, 18, batched=True))):
            if name.endswith("batched launches") and not batched[0].pool.gather_layers_available(device):
                continue  # needs the zero-copy gather (a GPU, or the Triton interpreter)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if device == "cuda":
                torch.cuda.synchronize()
            if rep:  # the first repetition warms up
                times[name].append((time.perf_counter() - start) * 1e3)
        for la, lb, lc in zip(per_layer, shared, batched):
            for name in ("compressor", "indexer"):
                assert torch.equal(la.resident[name].view(), lb.resident[name].view())
                if times["one shared plan, batched launches"]:
                    assert torch.equal(la.resident[name].view(), lc.resident[name].view())
    print(f"{len(per_layer)} CSA layers, {args.entries:,} entries, {ids.numel():,} resident, rows {args.width} wide, "
          f"{device}")
    print("| path | median ms | min ms |\n| --- | ---: | ---: |")
    for name, ts in times.items():
        if not ts:
            continue
        print(f"| {name} | {sorted(ts)[len(ts) // 2]:.1f} | {min(ts):.1f} |")


if __name__ == "__main__":
    main()
