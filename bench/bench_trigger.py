"""Trigger cost at DeepSeek-V4-Flash dimensions: memory-indexer scoring of every entry, and the fetch.

    python bench/bench_trigger.py [--context 524288] [--fetch-fraction 0.05] [--json out.json]

1. Scoring: the three memory indexers (rank 2048, 64 heads x 128, hidden 4096) score all context/4 entries
   from one hidden state each, then the OR over layers at threshold 0.5 (goal: <= 1 ms at 512K).
2. Fetch: the selected entries of all 21 CSA layers (C^Comp rows of 512 bf16 and K^IComp rows of 128 bf16)
   from the pinned cold pool to the device, three ways on the same ids, checked equal:
   the staged path (CPU index_select into pinned staging, then one copy: ``ColdPool.gather``), the zero-copy
   device-side gather (``lsa_runtime/kernels/pool_gather.py``), and, as the ceiling, one contiguous pinned
   copy of the same number of bytes (goal: >= 44 GB/s, 80% of the measured 55.2 GB/s).
The pool is filled synthetically (random rows of the right shapes) rather than by prefilling 512K tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from lsa_runtime.backbone import default_memory_layers
from lsa_runtime.cold_pool import ColdPool
from lsa_runtime.kernels.pool_gather import gather_rows, zero_copy_available
from lsa_runtime.memory_indexer import MemoryIndexer, MemoryIndexerConfig

try:
    from bench.flash_model import flash_config
    from bench.timing import median_ms
except ImportError:  # run as a script: bench/ is on sys.path
    from flash_model import flash_config
    from timing import median_ms


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=524288)
    ap.add_argument("--fetch-fraction", type=float, default=0.05)
    ap.add_argument("--csa-layers", type=int, default=21)
    ap.add_argument("--rank", type=int, default=2048)
    ap.add_argument("--gather-programs", type=int, default=None, metavar="N",
                    help="most programs of one zero-copy gather (lsa_runtime/kernels/pool_gather.py PROGRAMS; 0: one "
                         "per block of 16 rows; default: the module's)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--score-only", action="store_true", help="measure the scoring, skip the fetch")
    ap.add_argument("--profile", action="store_true", help="print the operators of one scoring (torch.profiler)")
    args = ap.parse_args()
    if args.gather_programs is not None:
        if args.gather_programs < 0:
            print("error: --gather-programs must be >= 0", file=sys.stderr)
            sys.exit(2)
        from lsa_runtime.kernels import pool_gather

        pool_gather.PROGRAMS = args.gather_programs
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    cfg = flash_config()  # V4-Flash's layout (transformers' default config puts its CSA layers elsewhere)
    T = args.context // 4
    gen = torch.Generator(device=device).manual_seed(0)
    result = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "context": args.context, "entries": T}

    # 1. scoring all entries at the three memory layers, OR at 0.5
    layers = tuple(default_memory_layers(cfg))  # model layers 22, 26, 42 (CSA indices 10, 12, 20)
    result["memory_layers"] = list(layers)
    mcfg = MemoryIndexerConfig.from_backbone_config(cfg, layers, rank=args.rank)
    indexer = MemoryIndexer(mcfg).to(device)
    for module in indexer.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.data = module.weight.data.to(dtype)
    keys = {L: torch.randn(T, cfg.index_head_dim, device=device, dtype=dtype, generator=gen) for L in layers}
    hidden = {L: torch.randn(cfg.hidden_size, device=device, dtype=dtype, generator=gen) for L in layers}
    position = args.context - 1
    # the default path (the towers replayed as one CUDA graph on a GPU) and the eager one, alternated in one run
    indexer.cuda_graphs = False
    eager_fetch = indexer.fetch(hidden, position, keys, T)
    eager_q = indexer.trigger_queries(hidden, position)
    result["score_eager_ms"] = median_ms(lambda: indexer.fetch(hidden, position, keys, T), reps=21)
    result["query_eager_ms"] = median_ms(lambda: indexer.trigger_queries(hidden, position), reps=21)
    indexer.cuda_graphs = True
    t_score = median_ms(lambda: indexer.fetch(hidden, position, keys, T), reps=21)
    result["score_ms"] = t_score
    graph_q = indexer.trigger_queries(hidden, position)
    result["graph_equals_eager"] = bool(torch.equal(indexer.fetch(hidden, position, keys, T), eager_fetch)
                                        and all(torch.equal(a, b) for a, b in zip(graph_q, eager_q)))
    # where the time goes: the three query towers (MemoryIndexer.trigger_queries, what fetch and the Session's
    # lsa policy run) and the three scoring launches
    q, w = indexer.trigger_queries(hidden, position)
    qw = {L: (q[i : i + 1], w[i : i + 1]) for i, L in enumerate(layers)}
    result["query_ms"] = median_ms(lambda: indexer.trigger_queries(hidden, position), reps=21)
    result["kernel_ms"] = median_ms(lambda: [indexer.layer(L).logits_from_query(*qw[L], keys[L]) for L in layers],
                                    reps=21)
    # correctness in the same run: fused scores vs the chunked torch path on the same bf16 operands, and the
    # fetched set vs the set the torch scores give (entries within 1e-3 of the threshold's logit may differ)
    from lsa_runtime.kernels.gated_score import gated_logits_torch

    fused = {L: indexer.layer(L).logits_from_query(*qw[L], keys[L])[0] for L in layers}
    ref = {L: gated_logits_torch(qw[L][0].float(), qw[L][1], keys[L].float(), indexer.layer(L).softmax_scale)[0]
           for L in layers}
    result["score_rel_err"] = max(((fused[L] - ref[L]).norm() / ref[L].norm()).item() for L in layers)
    got = set(indexer.fetch(hidden, position, keys, T).tolist())
    want = torch.zeros(T, dtype=torch.bool, device=device)
    near = torch.zeros(T, dtype=torch.bool, device=device)
    for L in layers:
        want |= torch.sigmoid(ref[L]) >= 0.5
        near |= ref[L].abs() < 1e-3
    want_set = set(torch.nonzero(want).reshape(-1).tolist())
    differ = got ^ want_set
    result["fetched"] = len(got)
    result["fetch_set_differences"] = len(differ)
    result["fetch_set_differences_not_near_threshold"] = len(differ - set(torch.nonzero(near).reshape(-1).tolist()))

    # the same trigger with the memory keys kept in the pinned cold pool (Session(memory_keys="pool")): the three
    # layers' K^IComp of every entry streamed to the device (ColdPool.stream_prefix), then scored; checked equal
    key_pool = ColdPool(list(layers), {"compressor": cfg.head_dim, "indexer": cfg.index_head_dim}, dtype,
                        initial_entries=T)
    for L in layers:
        key_pool.append(L, "indexer", keys[L].cpu())

    def pool_keys_fetch():
        return indexer.fetch(hidden, position, {L: key_pool.stream_prefix(L, "indexer", T, device) for L in layers},
                             T)

    result["score_pool_keys_ms"] = median_ms(pool_keys_fetch, reps=11)
    result["pool_keys_equal"] = bool(torch.equal(pool_keys_fetch(), indexer.fetch(hidden, position, keys, T)))
    result["pool_keys_bytes"] = 3 * T * cfg.index_head_dim * 2
    result["pool_keys_pinned"] = bool(key_pool.pin)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(5):
                indexer.fetch(hidden, position, keys, T)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=45))
    if args.score_only:
        print(f"scoring 3 memory indexers + OR: {t_score:.3f} ms (query towers {result['query_ms']:.3f} ms, "
              f"scoring launches {result['kernel_ms']:.3f} ms); eager towers: {result['score_eager_ms']:.3f} ms "
              f"(towers {result['query_eager_ms']:.3f} ms); graph == eager: {result['graph_equals_eager']}")
        print(f"with the memory keys in the pool (streamed, {result['pool_keys_bytes'] / 1e6:.0f} MB): "
              f"{result['score_pool_keys_ms']:.3f} ms; same set: {result['pool_keys_equal']}")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=2)
        return

    # 2. fetch from the pinned pool
    pool_layers = list(range(args.csa_layers))
    pool = ColdPool(pool_layers, {"compressor": cfg.head_dim, "indexer": cfg.index_head_dim}, dtype,
                    initial_entries=T)
    for L in pool_layers:
        for name, width in pool.widths.items():
            pool.append(L, name, torch.randn(T, width, generator=torch.Generator().manual_seed(L)).to(dtype))
    n = int(T * args.fetch_fraction)
    ids = torch.randperm(T, generator=torch.Generator().manual_seed(1))[:n].sort().values
    ids_dev = ids.to(device)
    row_bytes = (cfg.head_dim + cfg.index_head_dim) * 2
    total = n * row_bytes * args.csa_layers

    def staged():
        pool.zero_copy = False  # the CPU-gather path (ColdPool's default on a GPU is the zero-copy one)
        for L in pool_layers:
            for name in pool.widths:
                pool.gather(L, name, ids, device)

    outs = {(L, name): torch.empty(n, w, dtype=dtype, device=device) for L in pool_layers
            for name, w in pool.widths.items()}

    def zero_copy():
        for L in pool_layers:
            for name in pool.widths:
                gather_rows(pool.host_rows(L, name), ids_dev, device, out=outs[(L, name)])

    contiguous = torch.empty(total // 2, dtype=dtype, pin_memory=device == "cuda")
    target = torch.empty_like(contiguous, device=device)

    def ceiling():
        target.copy_(contiguous, non_blocking=True)

    result["fetch"] = {"entries_per_layer": n, "bytes": total}
    result["fetch"]["staged_ms"] = median_ms(staged, reps=5)
    result["fetch"]["ceiling_ms"] = median_ms(ceiling, reps=5)
    if zero_copy_available(pool.host_rows(0, "compressor"), device):
        zero_copy()
        for L in (0, args.csa_layers - 1):  # same rows as the staged path, bit for bit
            for name in pool.widths:
                assert torch.equal(outs[(L, name)].cpu(), pool.gather(L, name, ids, "cpu")), (L, name)
        result["fetch"]["zero_copy_ms"] = median_ms(zero_copy, reps=5)
    for key in ("staged", "zero_copy", "ceiling"):
        ms = result["fetch"].get(f"{key}_ms")
        if ms:
            result["fetch"][f"{key}_GBps"] = total / ms / 1e6

    f = result["fetch"]
    print(f"trigger at {args.context:,} tokens ({T:,} entries), {result['device']}")
    print(f"scoring 3 memory indexers + OR: {t_score:.3f} ms (query towers {result['query_ms']:.3f} ms, scoring "
          f"launches {result['kernel_ms']:.3f} ms); fused vs torch rel. err {result['score_rel_err']:.1e}, "
          f"fetched {result['fetched']:,}, set differences {result['fetch_set_differences']} "
          f"({result['fetch_set_differences_not_near_threshold']} not near the threshold)")
    print(f"fetch {n:,} entries x {args.csa_layers} CSA layers = {total / 1e6:.1f} MB:")
    for key in ("staged", "zero_copy", "ceiling"):
        if f.get(f"{key}_ms"):
            print(f"  {key:10s} {f[key + '_ms']:8.2f} ms  {f[key + '_GBps']:6.1f} GB/s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
