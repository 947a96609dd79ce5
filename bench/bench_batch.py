"""Batched decoding at DeepSeek-V4-Flash dimensions: aggregate tokens/s vs batch size, full vs LSA, and how many
sequences a fixed KV budget holds.

    python bench/bench_batch.py [--contexts 131072,524288] [--batches 1,4,16] [--budget-gib 40] [--json out.json]

The backbone is ``bench/flash_model.py`` (V4-Flash attention and KV layout, shrunk MoE, random bf16). Each of the
B sequences gets its own cache filled synthetically as in ``bench_decode.py`` (sliding windows, context/4 CSA and
context/128 HCA entries, position counters at the context length), then decode steps run through
``lsa_runtime.batching.forward_rows`` (one backbone forward per step for all B; B = 1 is the plain forward), what a
``Session`` given a list of prompts runs. Modes:

* ``all``: the best exact full decoder we have (issue 18's baseline): LSA's cache and kernels with every entry
  resident, the native top-k over all of them;
* ``lsa``: a resident set of ``--resident`` entries per sequence (random memory indexer: the set is the highest
  scores, the budget cap), chosen by each sequence's own trigger every tau steps.

Triggers run per sequence, staggered (sequence r at steps where (step + r * tau / B) % tau == 0, as sequences that
joined at different times) and are timed apart from the forward (host clock, synchronised). Reported per context,
mode and B: median forward ms per step, median trigger ms, the trigger's share of decode time at tau, aggregate
tokens/s with triggers at tau, device KV per sequence (``measure_cache``), and how many such sequences
``--budget-gib`` of KV holds. The backbone's stateless modules replay as CUDA graphs (a Session's GPU default), one
set per batch size. ``--small``: a 12-layer small-width model, for a CPU smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_decode import OperatorCounter, fill_lsa_layer, fill_stock_layer, small_config  # noqa: E402
from bench.flash_model import flash_config  # noqa: E402
from lsa_runtime.backbone import cache_kwarg, csa_layers, default_memory_layers  # noqa: E402
from lsa_runtime.batching import forward_rows, install_row_attention  # noqa: E402
from lsa_runtime.cold_pool import ColdPool  # noqa: E402
from lsa_runtime.decode_graphs import install_decode_graphs  # noqa: E402
from lsa_runtime.lsa_cache import PooledCSACache, build_lsa_cache, install_lsa_compressors  # noqa: E402
from lsa_runtime.memory_indexer import MemoryIndexer, MemoryIndexerConfig  # noqa: E402
from lsa_runtime.residency import ResidentSet  # noqa: E402
from lsa_runtime.stats import measure_cache  # noqa: E402


class Sequence:
    """One synthetic sequence at ``context`` tokens: its cache, resident set and memory-layer hidden states."""

    def __init__(self, config, context, mode, layers, resident, tau, device, dtype, seed):
        gen = torch.Generator(device=device).manual_seed(seed)
        widths = {"compressor": config.head_dim, "indexer": config.index_head_dim}
        self.pool = ColdPool(csa_layers(config), widths, dtype, initial_entries=context // 4 + 64)
        self.residency = ResidentSet(csa_layers(config), widths, self.pool, device, dtype)
        # lsa keeps the memory layers' K^IComp of every entry on the device for its towers; "all" needs none
        self.cache = build_lsa_cache(config, self.pool, self.residency, layers if mode == "lsa" else [])
        for idx, kind in enumerate(config.layer_types):
            layer = self.cache.layers[idx]
            if isinstance(layer, PooledCSACache):
                fill_lsa_layer(layer, context, config, gen, device, dtype)
            fill_stock_layer(layer, kind, context, config, gen, device, dtype)
        self.position = context
        self.mode, self.layers, self.resident, self.headroom = mode, layers, resident, tau // 4 + 2
        self.hidden = {L: torch.randn(config.hidden_size, generator=gen, device=device).to(dtype) for L in layers}
        self.csa = [self.cache.layers[i] for i in csa_layers(config)]

    def trigger(self, indexer) -> None:
        n = self.csa[0].n_entries
        if self.mode == "all":
            ids = torch.arange(n)
        else:  # the Session's lsa scoring: the memory layers' towers over every entry's K^IComp, then the cap
            keys = {L: self.cache.layers[L].all_index_keys.view() for L in self.layers}
            logits = indexer.trigger_logits(self.hidden, self.position - 1, keys, n)
            best = torch.stack([logits[L] for L in self.layers]).max(0).values
            ids = best.topk(min(self.resident, n)).indices.sort().values.cpu()
        self.residency.change_to(ids, self.headroom)


def synchronize(device) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_batch(model, indexer, config, context, mode, batch, args, device, dtype) -> dict:
    layers = default_memory_layers(config)
    seqs = [Sequence(config, context, mode, layers, args.resident, args.tau, device, dtype, seed=context + 7 * r)
            for r in range(batch)]
    for seq in seqs:
        seq.trigger(indexer)
    per_sequence = sum(measure_cache(seqs[0].cache, config)[0].values())
    graphs = install_decode_graphs(model) if device == "cuda" else None
    kw = cache_kwarg()
    step_ms, trigger_ms = [], []
    offsets = [r * args.tau // batch for r in range(batch)]
    with torch.no_grad():
        for i in range(args.steps):
            for r, seq in enumerate(seqs):  # staggered triggers (not in the first step: warm-up)
                if i and (i + offsets[r]) % args.tau == 0:
                    synchronize(device)
                    start = time.perf_counter()
                    seq.trigger(indexer)
                    synchronize(device)
                    trigger_ms.append((time.perf_counter() - start) * 1e3)
            synchronize(device)
            start = time.perf_counter()
            if batch == 1:
                seq = seqs[0]
                model(input_ids=torch.tensor([[5]], device=device), use_cache=True, logits_to_keep=1,
                      position_ids=torch.tensor([[seq.position]], device=device), **{kw: seq.cache})
            else:
                forward_rows(model, [s.cache for s in seqs], [5] * batch, [s.position for s in seqs],
                             torch.device(device))
            synchronize(device)
            step_ms.append((time.perf_counter() - start) * 1e3)
            for seq in seqs:
                seq.position += 1
    if graphs is not None:
        graphs.remove()
    timed = sorted(step_ms[2:])  # the first steps capture graphs
    median = timed[len(timed) // 2]
    trig = sorted(trigger_ms)[len(trigger_ms) // 2] if trigger_ms else 0.0  # median: one slow first call aside
    trigger_per_step = trig * batch / args.tau  # every sequence triggers once per tau steps
    budget = args.budget_gib * 2**30
    row = {"context": context, "mode": mode, "batch": batch, "median_step_ms": median, "steps": len(step_ms),
           "trigger_ms_median": trig, "triggers_timed": len(trigger_ms),
           "trigger_share": trigger_per_step / (median + trigger_per_step),
           "tokens_per_s": batch * 1e3 / (median + trigger_per_step),
           "kv_bytes_per_sequence": per_sequence, "sequences_in_budget": int(budget // per_sequence),
           "host_pool_bytes_per_sequence": seqs[0].pool.nbytes, "step_ms": step_ms, "trigger_ms": trigger_ms}
    del seqs
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def count_ops(model, config, batches, device) -> None:
    """Operators (non-view aten calls) one batched decode step dispatches, by the module that issues them, for each
    batch size (V4-Flash's 43-layer layout at small widths, on the CPU): what grows with B and what does not."""
    from transformers import DynamicCache

    counter = OperatorCounter(model)
    print("operators per batched decode step (43 layers, small widths), by the module that dispatches them:")
    for batch in batches:
        caches = [DynamicCache(config=config) for _ in range(batch)]
        with torch.no_grad():
            for r, cache in enumerate(caches):  # different lengths: 64, 65, ... tokens
                model(input_ids=torch.randint(3, 500, (1, 64 + r), device=device), use_cache=True,
                      **{cache_kwarg(): cache})
            with counter.counting():
                forward_rows(model, caches, [5] * batch, [64 + r for r in range(batch)], torch.device(device)) \
                    if batch > 1 else model(input_ids=torch.tensor([[5]], device=device), use_cache=True,
                                            position_ids=torch.tensor([[64]], device=device),
                                            **{cache_kwarg(): caches[0]})
        print(f"  B = {batch:3d}: {counter.line()}")
    counter.remove()


def write_json(path: str, rows: list[dict], args, device: str) -> None:
    """The rows so far with the run's environment (torch, device, date, options), rewritten after every row."""
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "date": time.strftime("%Y-%m-%d"), "args": vars(args),
           "host_cpus": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads()}
    Path(path).write_text(json.dumps({"environment": env, "rows": rows}, indent=1))


def main() -> None:
    from transformers import DeepseekV4ForCausalLM

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="131072,524288")
    ap.add_argument("--batches", default="1,4,16", help="batch sizes (sequences decoding together)")
    ap.add_argument("--modes", default="all,lsa")
    ap.add_argument("--resident", type=int, default=4096, help="lsa: resident entries per sequence")
    ap.add_argument("--tau", type=int, default=64)
    ap.add_argument("--steps", type=int, default=None,
                    help="decode steps per run (default tau + 8: every sequence triggers once, staggered)")
    ap.add_argument("--budget-gib", type=float, default=40.0, help="the KV budget sequences are counted against")
    ap.add_argument("--small", action="store_true", help="small dimensions for a CPU smoke test")
    ap.add_argument("--max-seconds", type=float, default=None, help="stop starting new runs after this long")
    ap.add_argument("--json", default=None)
    ap.add_argument("--count-ops", action="store_true",
                    help="count the operators one batched step dispatches per batch size, by module, in V4-Flash's "
                         "43-layer layout at small widths, and exit (runs on a CPU)")
    args = ap.parse_args()
    args.steps = args.steps if args.steps is not None else args.tau + 8
    device = "cuda" if torch.cuda.is_available() and not args.count_ops else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = small_config(43) if args.count_ops else small_config() if args.small else flash_config()
    torch.manual_seed(0)
    with torch.device(device):
        model = DeepseekV4ForCausalLM(config)
    model = model.to(dtype).eval()
    install_lsa_compressors(model)
    install_row_attention(model)
    if args.count_ops:
        count_ops(model, config, [int(b) for b in args.batches.split(",")], device)
        return
    mcfg = MemoryIndexerConfig.from_backbone_config(config, default_memory_layers(config),
                                                    rank=128 if args.small else 2048, tau=args.tau)
    indexer = MemoryIndexer(mcfg).to(device=device, dtype=dtype)  # towers as one CUDA graph on a GPU, as a Session
    rows, began = [], time.perf_counter()
    print(f"{'context':>9} {'mode':4} {'B':>3} {'step ms':>9} {'trigger ms':>10} {'trig share':>10} {'tok/s':>9} "
          f"{'KV/seq MiB':>11} {'seqs in ' + format(args.budget_gib, 'g') + ' GiB':>14}", flush=True)
    for context in (int(c) for c in args.contexts.split(",")):
        for mode in args.modes.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                if args.max_seconds and time.perf_counter() - began > args.max_seconds:
                    print(f"stopped at {args.max_seconds:g} s (--max-seconds)", flush=True)
                    break
                row = run_batch(model, indexer, config, context, mode, batch, args, device, dtype)
                rows.append(row)
                print(f"{context:>9,} {mode:4} {batch:>3} {row['median_step_ms']:9.2f} "
                      f"{row['trigger_ms_median']:10.2f} "
                      f"{100 * row['trigger_share']:9.1f}% {row['tokens_per_s']:9.1f} "
                      f"{row['kv_bytes_per_sequence'] / 2**20:11.1f} {row['sequences_in_budget']:14,}", flush=True)
                if args.json:
                    write_json(args.json, rows, args, device)


if __name__ == "__main__":
    main()
