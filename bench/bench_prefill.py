"""Where a Session's prefill spends its time, by operator and input shape (torch.profiler).

    python bench/bench_prefill.py --model reference --indexer EXPORT --lengths 65536 --chunk-size 4096 \
        [--modes full,lsa] [--attention eager,window] [--fetch-top 64] [--top 25] [--device cuda] [--json OUT.json]

Long-context evaluations (`fm-index evaluate` at 32K-128K on the bundled models) spend most of a run in prefill:
at 128K on the H200 a prompt took 16-22 s alone, where the 15M-parameter backbone's weights account for well under
a second. This bench prefills one random-token prompt per length and mode in a Session, as the evaluation does
(the same SessionConfig fields: mode, chunk size, the export's tau / threshold / floor), once to warm up and once
under the profiler, and prints per mode and length: the Session's prefill seconds and tokens/s, then the
operators with the most self time (device time on a GPU, CPU time on the CPU) with their input shapes, calls and
share of the total. Decoding is one token (the prefill's first, printed: eager and window should agree), so
nothing else is measured.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections import defaultdict

import torch

from lsa_runtime.backbone import load_backbone
from lsa_runtime.config import SessionConfig
from lsa_runtime.policies import make_policy
from lsa_runtime.session import Session
from lsa_runtime.window_attention import ATTENTIONS, set_attention


def _profile_prefill(model, tokenizer, config: SessionConfig, ids: list[int], indexer, device: str) -> tuple:
    """(stats of the profiled prefill, its first token, {(op, shapes): [self seconds, calls]}, the profile's total
    self seconds)."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.startswith("cuda")

    def once():  # as fm-index evaluate builds a run's Session (fm_eval.runner: make_policy, then the Session)
        session = Session(model, tokenizer, config, policy=make_policy(config, indexer, {}))
        generation = session.generate(ids, max_new_tokens=1, temperature=0.0, stop_at_eos=False)
        if on_gpu:
            torch.cuda.synchronize()
        return session.stats, generation.token_ids[0]

    once()  # warm-up: kernel selection, allocator growth, the pool's first pinned buffers
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities, record_shapes=True) as prof:
        stats, token = once()
    ops: dict[tuple, list] = defaultdict(lambda: [0.0, 0])
    for event in prof.key_averages(group_by_input_shape=True):
        seconds = (event.self_device_time_total if on_gpu else event.self_cpu_time_total) / 1e6
        if seconds <= 0:
            continue
        key = (event.key, str(event.input_shapes))
        ops[key][0] += seconds
        ops[key][1] += event.count
    return stats, token, ops, sum(v[0] for v in ops.values())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="reference")
    ap.add_argument("--indexer", default=None, help="memory-indexer export (fm-index export); mode lsa needs it")
    ap.add_argument("--lengths", default="8192", help="comma-separated prompt lengths in tokens")
    ap.add_argument("--modes", default="full", help="comma-separated Session modes (full, lsa, ...)")
    ap.add_argument("--chunk-size", type=int, default=4096, help="prefill chunk in tokens (evaluate's --chunk-size)")
    ap.add_argument("--fetch-top", type=int, default=None, help="the export's floor (evaluate's --fetch-top)")
    ap.add_argument("--attention", default="eager", help="comma-separated: eager (transformers'), window "
                    "(lsa_runtime.window_attention; fm-index evaluate --attention)")
    ap.add_argument("--top", type=int, default=25, help="operators shown per mode and length")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None, help="also write every operator's time here")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if "lsa" in modes and not args.indexer:
        raise SystemExit("mode lsa needs --indexer (an fm-index export)")
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x]
    except ValueError:
        raise SystemExit(f"--lengths must be comma-separated integers, got {args.lengths!r}") from None
    attentions = [a for a in args.attention.split(",") if a]
    if not attentions or not set(attentions) <= set(ATTENTIONS):
        raise SystemExit(f"--attention takes eager and/or window, got {args.attention!r}")
    model, tokenizer = load_backbone(args.model, device=args.device)
    indexer = None
    if args.indexer:
        from lsa_runtime.memory_indexer import load_memory_indexer

        indexer = load_memory_indexer(args.indexer, model)
    vocab = model.config.vocab_size
    on_gpu = args.device.startswith("cuda")
    machine = torch.cuda.get_device_name() if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"{time.strftime('%Y-%m-%d')} {args.model} on {args.device} ({machine}), torch {torch.__version__}, "
          f"chunk {args.chunk_size}")
    blob = []
    for length, attention, mode in itertools.product(lengths, attentions, modes):
        set_attention(model, attention)
        ids = torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(length)).tolist()
        config = SessionConfig(mode=mode, chunk_size=args.chunk_size,
                               tau=indexer.config.tau if indexer is not None else 64,
                               threshold=indexer.config.threshold if indexer is not None else 0.5,
                               fetch_top=args.fetch_top if mode == "lsa" else None)
        stats, token, ops, total = _profile_prefill(model, tokenizer, config, ids, indexer if mode == "lsa" else None,
                                             args.device)
        print(f"\n### {mode}, {length:,} tokens, {attention} attention: prefill {stats.prefill_seconds:.2f} s "
              f"({stats.prefill_tokens_per_second:,.0f} tok/s); profiled self time {total:.2f} s; first token {token}")
        print("| op | input shapes | calls | self s | share |")
        print("| --- | --- | ---: | ---: | ---: |")
        ranked = sorted(ops.items(), key=lambda kv: -kv[1][0])
        for (name, shapes), (seconds, calls) in ranked[:args.top]:
            print(f"| {name[:60]} | {shapes[:70]} | {calls} | {seconds:.3f} | {100 * seconds / total:.1f}% |")
        blob.append({"mode": mode, "length": length, "attention": attention, "first_token": token,
                     "prefill_seconds": stats.prefill_seconds,
                     "profiled_seconds": total,
                     "ops": [{"op": n, "shapes": s, "calls": c, "seconds": t} for (n, s), (t, c) in ranked]})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "device": args.device, "chunk_size": args.chunk_size, "runs": blob}, f)


if __name__ == "__main__":
    main()
