"""KV footprint and tokens/s of full vs LSA decoding (and the control modes) on one prompt.

    python bench/bench_session.py --model tiny --indexer runs/demo/export [--prompt-tokens 3072]
        [--new-tokens 64] [--tau 64] [--budget 128] [--threads 1]

Each mode decodes the same random-token prompt greedily (best decode/prefill rate of two runs after a
warm-up: the CPU is shared). Prints a markdown table: footprint ratio (device KV bytes / full decoding's),
resident entries, triggers, entries fetched, trigger time, prefill and decode tokens/s, and how many of the
new tokens equal full decoding's.
"""

from __future__ import annotations

import argparse
import time

import torch

from lsa_runtime.backbone import load_backbone
from lsa_runtime.session import Session


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--indexer", default=None, help="memory-indexer export (fm-index export); lsa modes need it")
    ap.add_argument("--prompt-tokens", type=int, default=3072)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--tau", type=int, default=64)
    ap.add_argument("--budget", "--max-resident", type=int, default=128,
                    help="resident entries per trigger (lsa cap, recent) and hisparse buffer entries per layer")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_backbone(args.model, device=args.device)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0))
    runs = [("full", dict(mode="full"))]
    if args.indexer:
        runs += [("lsa (threshold 0.5)", dict(mode="lsa", indexer=args.indexer)),
                 (f"lsa, budget {args.budget}", dict(mode="lsa", indexer=args.indexer, budget=args.budget))]
    runs += [(f"recent, budget {args.budget}", dict(mode="recent", budget=args.budget)),
             ("all (lossless)", dict(mode="all")),
             (f"hisparse, buffer {args.budget} (lossless)", dict(mode="hisparse", budget=args.budget))]
    print(f"{time.strftime('%Y-%m-%d')} {args.model} on {args.device} ({args.threads} threads): prompt "
          f"{args.prompt_tokens} tokens, {args.new_tokens} new tokens, tau {args.tau}")
    print("| mode | footprint ratio | device KiB | full KiB | resident / entries | triggers | fetched | "
          "trigger ms | prefill tok/s | decode tok/s | tokens equal to full |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    reference = None
    for name, kwargs in runs:
        session = Session(model, tok, tau=args.tau, **kwargs)
        session.generate(ids[:64], max_new_tokens=4)  # warm-up
        best_dec = best_pre = 0.0
        for _ in range(2):
            out = session.generate(ids, max_new_tokens=args.new_tokens)
            st = session.stats
            best_dec, best_pre = max(best_dec, st.decode_tokens_per_second), max(best_pre,
                                                                                 st.prefill_tokens_per_second)
        reference = reference or out.token_ids
        same = sum(a == b for a, b in zip(out.token_ids, reference))
        print(f"| {name} | {st.footprint_ratio:.3f} | {st.device_total / 1024:.0f} | {st.full_total / 1024:.0f} | "
              f"{st.resident_entries} / {st.csa_entries} | {st.triggers} | {st.entries_fetched} | "
              f"{st.trigger_seconds * 1000:.1f} | {best_pre:.0f} | {best_dec:.1f} | {same}/{len(reference)} |",
              flush=True)


if __name__ == "__main__":
    main()
