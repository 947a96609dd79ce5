"""Decode-step latency and resident KV bytes at DeepSeek-V4-Flash dimensions: full vs LSA vs per-step fetch.

    python bench/bench_decode.py [--contexts 32768,131072,524288] [--resident 4096] [--tau 64] [--json out.json]

The backbone is ``bench/flash_model.py`` (V4-Flash attention and KV layout, shrunk MoE, random bf16). Its
cache is filled synthetically, not by prefilling 512K tokens: every layer's sliding window (127 tokens), and
per CSA/HCA layer random compressed entries of the right shapes (context/4 resp. context/128), with the
position counters set to the context length. Then single-token decode steps run through the real model:

* ``full``: the stock ``DynamicCache`` (every CSA entry and indexer key on the device);
* ``lsa``: ``LSACSACache`` layers (``lsa_runtime/lsa_cache.py``) over a filled cold pool and one
  ``ResidentSet``; a trigger every tau steps scores all entries with the three memory indexers (random weights:
  scores are not meaningful, so the resident set is the ``--resident`` highest-scoring entries, the budget cap)
  and fetches the new ones; the native top-k scans only resident entries;
* ``lsa-perlayer``: ``lsa`` with the rows of each CSA layer moved by its own copies (``ResidentSet(batched=False)``,
  the path without the multi-layer gather), for comparison;
* ``lsa-prefetch``: ``lsa``, but each trigger after the first starts ``--prefetch-steps`` steps before the
  window boundary on a helper thread (``lsa_runtime/prefetch.py``, what ``Session(prefetch_steps=d)`` runs) and
  is installed at the boundary;
* ``all``: the best exact full decoder we have, the baseline of every speed comparison (issue 18): ``lsa``'s cache
  and kernels with every entry resident (full semantics: the native top-k over all entries, attention over the
  gathered picks), a trigger every tau steps that keeps them all; ``full`` is transformers' stock path, dense over
  every compressed entry;
* ``hisparse``: the lossless per-step scheme (``lsa_runtime/hisparse.py``), native top-k over all entries every
  step, picks served by a device buffer of ``--resident`` rows with misses fetched from the pool;
* any mode ``+graphs`` (``full+graphs``, ``lsa+graphs``): the same with the backbone's stateless modules (mHC
  hyper-connections, MoE blocks) replayed as CUDA graphs (``lsa_runtime/decode_graphs.py``, what a Session
  does by default on a GPU); attention and the cache stay eager.

Reported per context and mode: median step time over plain steps (no trigger work in them), mean over all
steps (triggers included), resident device KV bytes and their ratio to what full decoding holds for the same
tokens (both from ``lsa_runtime.stats.measure_cache``). For the trigger modes, per trigger after the first:
the steps it touches (``lsa``: the trigger step; ``lsa-prefetch``: the start step, the steps the helper runs
beside, the swap step), their slowest step against the median plain step of the same kind (``trigger_stall``:
the goal is <= 5%) and their extra time summed (``trigger_extra_ms``); medians over triggers. "Kind": every 4th
step emits a compressed entry in each CSA layer and costs more, so steps that emit are compared with plain
steps that emit. Every step's device ms, host ms, label and emission flag go to the JSON as well.
``--small`` shrinks the model for a CPU smoke test; ``--count-ops`` counts the operators a decode step
dispatches, by module, in the Flash layout at small widths (CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.flash_model import FLASH_LAYER_TYPES, flash_config  # noqa: E402
from lsa_runtime.backbone import CSA, HCA, cache_kwarg, csa_layers, default_memory_layers  # noqa: E402
from lsa_runtime.cold_pool import ColdPool  # noqa: E402
from lsa_runtime.decode_graphs import install_decode_graphs  # noqa: E402
from lsa_runtime.hisparse import build_hisparse_cache  # noqa: E402
from lsa_runtime.lsa_cache import PooledCSACache, build_lsa_cache, install_lsa_compressors  # noqa: E402
from lsa_runtime.memory_indexer import MemoryIndexer, MemoryIndexerConfig  # noqa: E402
from lsa_runtime.prefetch import ResidentPrefetcher  # noqa: E402
from lsa_runtime.residency import ResidentSet  # noqa: E402
from lsa_runtime.stats import measure_cache  # noqa: E402


def small_config(n: int = 12):
    """Small dimensions (a CPU smoke test), the first ``n`` layers of V4-Flash's layout (43: all of it)."""
    from transformers import DeepseekV4Config

    return DeepseekV4Config(num_hidden_layers=n, layer_types=FLASH_LAYER_TYPES[:n], hidden_size=256, head_dim=128,
                            num_attention_heads=4, q_lora_rank=64, o_groups=2, o_lora_rank=64, index_n_heads=16,
                            index_head_dim=64, index_topk=64, n_routed_experts=2, num_local_experts=2,
                            num_experts_per_tok=1, moe_intermediate_size=64, intermediate_size=64, vocab_size=512)


def fill_stock_layer(layer, kind: str, context: int, config, gen, device, dtype):
    """Sliding window + (for CSA/HCA) compressed entries of a stock cache layer, as after ``context`` tokens."""
    window = config.sliding_window - 1
    kv = torch.randn(1, 1, window, config.head_dim, generator=gen, device=device).to(dtype)
    layer.update(kv, kv)
    layer.cumulative_length = context
    if kind in (CSA, HCA) and not isinstance(layer, PooledCSACache):
        n = context // config.compress_rates[kind]
        layer.compressed_kv["compressor"] = torch.randn(1, n, config.head_dim, generator=gen, device=device).to(dtype)
        layer.entry_count["compressor"] = n
        if kind == CSA:
            layer.compressed_kv["indexer"] = torch.randn(1, n, config.index_head_dim, generator=gen,
                                                         device=device).to(dtype)
            layer.entry_count["indexer"] = n


def fill_lsa_layer(layer: PooledCSACache, context: int, config, gen, device, dtype):
    """A cold-pool CSA layer after ``context`` tokens: all entries in the pool, decoding state, nothing resident."""
    n = context // config.compress_rates[CSA]
    for name, width in layer.widths.items():
        rows = torch.randn(1, n, width, generator=gen, device=device).to(dtype)
        layer.update_compressor_states(name, rows)  # prefill semantics: pool + all index keys where kept
    layer.end_prefill()


def step_times(model, cache, context, steps, before_step=None):
    """Time ``steps`` single-token decode steps (CUDA events on a GPU). ``before_step(i, position)`` runs inside
    step i's timing (trigger work) and returns a label for the step (None: a plain step).

    Returns (device ms, labels, host ms to issue the step, whether the step emitted a CSA entry). Every 4th
    step emits one in each CSA layer (compression, pool append), which costs more: a fair baseline compares
    emitting steps with emitting steps."""
    kw = cache_kwarg()
    device = next(model.parameters()).device
    times, labels, host, emitted = [], [], [], []
    csa = cache.layers[csa_layers(model.config)[0]]
    token = torch.tensor([[5]], device=device)
    for i in range(steps):
        start = time.perf_counter()
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        labels.append(before_step(i, context + i) if before_step is not None else None)
        entries = csa.entry_count["compressor"]
        with torch.no_grad():
            model(input_ids=token, position_ids=torch.tensor([[context + i]], device=device), use_cache=True,
                  **{kw: cache})
        emitted.append(csa.entry_count["compressor"] > entries)
        host.append((time.perf_counter() - start) * 1e3)  # the host's time to issue the step
        if device.type == "cuda":
            end.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            times.append((time.perf_counter() - start) * 1e3)
    return times, labels, host, emitted


def trigger_windows(labels, tau: int, prefetch_steps: int) -> list[list[int]]:
    """The steps each trigger after the first touches: its own step (synchronous), or start .. swap (prefetch)."""
    windows = []
    for i, label in enumerate(labels):
        if label == "trigger" and i > 0:
            windows.append([i])
        elif label == "swap":
            windows.append(list(range(i - prefetch_steps, i + 1)))
    return windows


def write_json(args, rows, device) -> None:
    """After every row: a run cut by a time limit keeps what it measured (temp file, then rename)."""
    if not args.json:
        return
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name()
                   if device == "cuda" else "cpu", "resident": args.resident, "tau": args.tau, "steps": args.steps,
                   "memory_keys": args.memory_keys, "bytes_only": args.bytes_only, "rows": rows}, f, indent=2)
    Path(tmp).replace(args.json)


def profile_steps(model, cache, position, steps, title):
    """torch.profiler over ``steps`` non-trigger decode steps: the operators that take the most device and host
    time, to show what a step of this eager model is made of."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, record_shapes=True) as prof:
        step_times(model, cache, position, steps)
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    print(f"--- profile, {title}, {steps} steps, by {sort}", flush=True)
    print(prof.key_averages().table(sort_by=sort, row_limit=12, max_name_column_width=40), flush=True)
    print("--- the same by operator and input shapes (attribute time by shape, not by name)", flush=True)
    print(prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=12, max_name_column_width=30,
                                                              max_shapes_column_width=90), flush=True)
    print("--- by self cpu time", flush=True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40),
          flush=True)


class OperatorCounter:
    """Counts the operators (non-view aten calls) dispatched inside ``counting()``, by the module that issues them
    (mHC, attention, MoE, rest). Hooks stay on ``model`` until :meth:`remove`."""

    GROUPS = {"DeepseekV4HyperConnection": "mHC", "DeepseekV4HyperHead": "mHC", "DeepseekV4Attention": "attention",
              "RowDispatchAttention": "attention", "DeepseekV4SparseMoeBlock": "MoE"}

    def __init__(self, model):
        from torch.utils._python_dispatch import TorchDispatchMode

        self.stack, self.counts = [], Counter()
        stack, counts = self.stack, self.counts

        class Counting(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if "view" not in func.__name__ and not func.__name__.startswith("detach"):  # views launch nothing
                    counts[stack[-1] if stack else "rest"] += 1
                return func(*args, **(kwargs or {}))

        self._mode = Counting
        self.handles = []
        for module in model.modules():
            group = self.GROUPS.get(type(module).__name__)
            if group is not None:
                self.handles.append(module.register_forward_pre_hook(lambda m, a, g=group: stack.append(g)))
                self.handles.append(module.register_forward_hook(lambda m, a, o: stack.pop() and None))

    def counting(self):
        """A fresh count: clears the counts and returns the dispatch mode to run the step under."""
        self.counts.clear()
        return self._mode()

    def line(self) -> str:
        total = sum(self.counts.values())
        return f"{total:7d}  " + "  ".join(f"{k} {v} ({100 * v / total:.0f}%)" for k, v in
                                         sorted(self.counts.items(), key=lambda kv: -kv[1]))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def count_ops(model, device) -> None:
    """Operators (non-view aten calls) one decode step dispatches, by the module that issues them."""
    from transformers import DynamicCache

    counter = OperatorCounter(model)
    cache = DynamicCache(config=model.config)
    steps = []
    with torch.no_grad():
        model(input_ids=torch.randint(3, 500, (1, 64), device=device), use_cache=True, **{cache_kwarg(): cache})
        for i in range(4):  # the 4th step emits a CSA entry
            with counter.counting():
                model(input_ids=torch.tensor([[5]], device=device),
                      position_ids=torch.tensor([[64 + i]], device=device), use_cache=True, **{cache_kwarg(): cache})
            steps.append(counter.line())
    counter.remove()
    layers = model.config.num_hidden_layers
    print(f"operators per decode step, {layers} layers (by the module that dispatches them):")
    for i, step in enumerate(steps):
        print(f"  step {i}: {step[1:]}")


def main():
    from transformers import DeepseekV4ForCausalLM, DynamicCache

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="32768,131072,524288")
    ap.add_argument("--resident", type=int, default=4096, help="resident entries (lsa) / buffer rows (hisparse)")
    ap.add_argument("--tau", type=int, default=64)
    ap.add_argument("--steps", type=int, default=130,
                    help="decode steps per context and mode (66 = one trigger window plus one step)")
    ap.add_argument("--modes", default="full,lsa,hisparse",
                    help="full, lsa, lsa-perlayer, lsa-prefetch, hisparse (repeat a mode to sample it again); a mode "
                         "+graphs (e.g. lsa+graphs) replays the backbone's stateless modules as CUDA graphs "
                         "(lsa_runtime/decode_graphs.py)")
    ap.add_argument("--prefetch-steps", type=int, default=2,
                    help="lsa-prefetch: steps before the window boundary at which the next set is prepared")
    ap.add_argument("--small", action="store_true", help="small dimensions for a CPU smoke test")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", type=int, default=0,
                    help="after the timed steps of the largest context, profile this many more steps per mode and "
                         "print the top operators")
    ap.add_argument("--memory-keys", choices=["device", "pool"], default="device",
                    help="lsa: the memory layers' keys of every entry resident on the device, or kept in the pool "
                         "and streamed at each trigger (Session(memory_keys=...))")
    ap.add_argument("--count-ops", action="store_true",
                    help="count the operators one decode step dispatches, by module (mHC, attention, MoE, rest), "
                         "in V4-Flash's 43-layer layout at small widths, and exit (runs on a CPU)")
    ap.add_argument("--bytes-only", action="store_true",
                    help="no model and no decode steps: fill the caches (bf16), run one trigger, report resident "
                         "bytes (runs on a CPU at Flash dimensions)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" or args.bytes_only else torch.float32
    # operator counts depend on the layer layout, not the widths: all 43 Flash layers at small widths
    config = small_config(43) if args.count_ops else small_config() if args.small else flash_config()
    torch.manual_seed(0)
    model = None
    if not args.bytes_only:
        with torch.device(device):
            model = DeepseekV4ForCausalLM(config)
        model = model.to(dtype).eval()
        install_lsa_compressors(model)  # stock behaviour with a stock cache
    layers = default_memory_layers(config)
    mcfg = MemoryIndexerConfig.from_backbone_config(config, layers, rank=2048 if not args.small else 128,
                                                    tau=args.tau)
    indexer = MemoryIndexer(mcfg).to(device)
    for module in indexer.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.data = module.weight.data.to(dtype)
    rows = []
    if args.count_ops:
        count_ops(model, device)
        return
    for context in [int(x) for x in args.contexts.split(",")]:
        for mode_name in args.modes.split(","):
            mode = mode_name.removesuffix("+graphs")  # "+graphs": the backbone's stateless modules as CUDA graphs
            gen = torch.Generator(device=device).manual_seed(context)
            prefetcher = None
            if mode == "full":
                cache = DynamicCache(config=config)
            else:
                widths = {"compressor": config.head_dim, "indexer": config.index_head_dim}
                pool = ColdPool(csa_layers(config), widths, dtype, initial_entries=context // 4 + args.steps)
                if mode == "hisparse":
                    cache = build_hisparse_cache(config, pool, args.resident)
                else:
                    residency = ResidentSet(csa_layers(config), widths, pool, device, dtype,
                                            batched=False if mode == "lsa-perlayer" else None)
                    keys_resident = layers if args.memory_keys == "device" else []
                    cache = build_lsa_cache(config, pool, residency, keys_resident)
            for idx, kind in enumerate(config.layer_types):
                layer = cache.layers[idx]
                if isinstance(layer, PooledCSACache):
                    fill_lsa_layer(layer, context, config, gen, device, dtype)
                fill_stock_layer(layer, kind, context, config, gen, device, dtype)
            before_step = None
            if mode.startswith("lsa") or mode == "all":
                lsa_layers = [cache.layers[i] for i in csa_layers(config)]
                hidden = {L: torch.randn(config.hidden_size, generator=gen, device=device).to(dtype) for L in layers}
                headroom = args.tau // 4 + 2 + args.prefetch_steps // 4 + 1

                def selection(position, lsa_layers=lsa_layers, hidden=hidden, cache=cache, pool=pool, mode=mode):
                    """Snapshot now (decode thread); the returned function scores and selects (any thread)."""
                    n = lsa_layers[0].n_entries
                    keys = {L: cache.layers[L].all_index_keys.view() if cache.layers[L].all_index_keys is not None
                            else None for L in layers}

                    def select():
                        if mode == "all":
                            return torch.arange(n)
                        streamed = {L: k if k is not None else pool.stream_prefix(L, "indexer", n, device)
                                    for L, k in keys.items()}
                        # the Session's lsa scoring (MemoryIndexerPolicy): batched towers, one launch per layer
                        logits = indexer.trigger_logits(hidden, position, streamed, n)
                        best = torch.stack([logits[L] for L in layers]).max(0).values
                        return best.topk(min(args.resident, n)).indices.sort().values.cpu()

                    return select

                def trigger(position, residency=residency, selection=selection):
                    residency.change_to(selection(position)(), headroom)

                prefetcher = ResidentPrefetcher() if mode == "lsa-prefetch" else None
                swaps = []  # per prefetched trigger: helper-thread ms, ms the decode thread waited at the swap

                def before_step(i, position, trigger=trigger, prefetcher=prefetcher, residency=residency,
                                selection=selection, swaps=swaps):
                    if prefetcher is None or i == 0:  # synchronous (the first trigger always is)
                        if i % args.tau == 0:
                            trigger(position)
                            return "trigger"
                        return None
                    if i % args.tau == 0 and prefetcher.pending:
                        done = prefetcher.finish()
                        residency.install(done.result)
                        swaps.append((done.helper_seconds * 1e3, done.wait_seconds * 1e3))
                        return "swap"
                    if (i + args.prefetch_steps) % args.tau == 0:
                        select, snapshot = selection(position), residency.snapshot()
                        prefetcher.start(lambda: residency.prepare(snapshot, select(), headroom), device)
                        return "start"
                    return "helper" if prefetcher.pending else None
            if args.bytes_only:
                if before_step is not None:
                    before_step(0, context)
                held, full, _, _ = measure_cache(cache, config)
                row = {"context": context, "mode": mode, "memory_keys": args.memory_keys,
                       "resident_bytes": sum(held.values()), "ratio_to_full": sum(held.values()) / sum(full.values()),
                       "by_kind": held}
                rows.append(row)
                print(f"{context:>9,} {mode:12s} resident KV {row['resident_bytes'] / 2**20:9.1f} MiB  ratio "
                      f"{row['ratio_to_full']:.4f}  " + "  ".join(f"{k} {v / 2**20:.1f}" for k, v in held.items()),
                      flush=True)
                del cache
                write_json(args, rows, device)
                continue
            graphs = install_decode_graphs(model) if mode_name.endswith("+graphs") else None
            times, labels, host, emitted = step_times(model, cache, context, args.steps, before_step)
            if prefetcher is not None:
                prefetcher.close()
            if args.profile and context == max(int(x) for x in args.contexts.split(",")):
                profile_steps(model, cache, context + args.steps, args.profile, f"{context:,} {mode_name}")
            graph_info = None
            if graphs is not None:
                graph_info = {"modules": len(graphs.wrapped), "graphs": graphs.graphs, "replays": graphs.replays,
                              "skipped": graphs.skipped}
                graphs.remove()
            held, full, _, _ = measure_cache(cache, config)
            device_bytes, full_bytes = sum(held.values()), sum(full.values())
            windows = trigger_windows(labels, args.tau, args.prefetch_steps)
            touched = {i for window in windows for i in window}
            plain = [i for i in range(2, len(times)) if labels[i] is None and i not in touched]

            def median_of(values):
                values = sorted(values)
                return values[len(values) // 2] if values else float("nan")

            # baseline per kind of step: plain steps that emitted a CSA entry vs plain steps that did not
            base = {e: median_of(times[i] for i in plain if emitted[i] == e) for e in (False, True)}
            median = median_of(times[i] for i in plain)
            row = {"context": context, "mode": mode_name, "decode_graphs": graph_info, "median_step_ms": median,
                   "median_plain_ms_by_emission": {"no_entry": base[False], "entry": base[True]},
                   "mean_step_ms": sum(times[2:]) / len(times[2:]), "plain_steps": len(plain),
                   "trigger_windows_ms": [[times[i] for i in window] for window in windows],
                   "trigger_windows_emitted": [[emitted[i] for i in window] for window in windows],
                   "median_host_ms": median_of(host[i] for i in plain),
                   "step_ms": times, "step_host_ms": host, "step_emitted": emitted, "step_labels": labels,
                   "resident_bytes": device_bytes, "ratio_to_full": device_bytes / full_bytes}
            if mode == "lsa-prefetch":
                row["prefetch_steps"] = args.prefetch_steps
                row["helper_ms"] = [h for h, _ in swaps]
                row["swap_wait_ms"] = [w for _, w in swaps]
            trig = len(windows)
            if windows:  # per trigger: its slowest step vs the plain steps of its kind, and its summed extra time
                stalls = sorted(max(times[i] / base[emitted[i]] - 1 for i in window) for window in windows)
                extras = sorted(sum(times[i] - base[emitted[i]] for i in window) for window in windows)
                row["trigger_stall"] = stalls[len(stalls) // 2]
                row["trigger_extra_ms"] = extras[len(extras) // 2]
            rows.append(row)
            print(f"{context:>8,} {mode_name:12s} median step {row['median_step_ms']:8.2f} ms  mean (with triggers) "
                  f"{row['mean_step_ms']:8.2f} ms  resident KV {device_bytes / 2**20:9.1f} MiB  "
                  f"ratio {row['ratio_to_full']:.3f}" + (f"  trigger step +{100 * row['trigger_stall']:.1f}% "
                                                          f"extra {row['trigger_extra_ms']:.1f} ms (n={trig})"
                                                          if trig else ""), flush=True)
            del cache
            if device == "cuda":
                torch.cuda.empty_cache()
            write_json(args, rows, device)


if __name__ == "__main__":
    main()
