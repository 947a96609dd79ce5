"""Label building at DeepSeek-V4-Flash dimensions: nucleus + vote + window union vs the indexer's own pass.

For one prefill chunk of S queries at context length N (T = N / 4 compressed entries), every CSA layer's
Lightning Indexer runs its scorer (transformers' ``DeepseekV4IndexerScorer``, 64 heads x 128, fp32 output)
and the label builder consumes its logits (visible softmax -> nucleus p -> vote over the 21 CSA layers ->
union over the tau tokens of each trigger). This script times both per layer on the same logits, after a
correctness check of the device nucleus against the CPU brute-force definition on a few rows, and prints
the per-1K-token cost and the ratio (goal: labels <= 1.5x the indexer pass).

Logits come from the random-weight scorer with its head weights scaled by --sharpness: 1 gives the flat
scores of an untrained indexer (the slow case for a nucleus: most of T is needed to reach p), larger values
the peaked scores of a trained one.

    python bench/bench_labels.py [--context 131072] [--chunk 1024] [--sharpness 1,4,30]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from indexer_train.labels import WindowLabeler, nucleus_mask, visible_softmax

try:
    from bench.timing import median_ms
except ImportError:  # run as a script: bench/ is on sys.path
    from timing import median_ms


def oracle_row(probs_row, p):
    order = sorted(range(len(probs_row)), key=lambda s: (-probs_row[s], s))
    mass = 0.0
    out = set()
    for s in order:
        if probs_row[s] <= 0:
            break
        out.add(s)
        mass += float(probs_row[s])
        if mass >= p:
            break
    return out


def main():
    from transformers import DeepseekV4Config
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4IndexerScorer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--csa-layers", type=int, default=21)
    ap.add_argument("--sharpness", default="1,4,30")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = DeepseekV4Config()  # V4-Flash defaults: hidden 4096, index 64 x 128
    S, T = args.chunk, args.context // 4
    H, D = cfg.index_n_heads, cfg.index_head_dim
    scorer = DeepseekV4IndexerScorer(cfg).to(device=device, dtype=torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, S, H, D, device=device, dtype=torch.bfloat16, generator=gen)
    keys = torch.randn(1, T, D, device=device, dtype=torch.bfloat16, generator=gen)
    hidden = torch.randn(1, S, cfg.hidden_size, device=device, dtype=torch.bfloat16, generator=gen)
    positions = torch.arange(args.context - S, args.context, device=device)
    n_visible = (positions + 1) // 4
    rows = []
    for sharp in [float(x) for x in args.sharpness.split(",")]:
        with torch.no_grad():
            scorer.weights_proj.weight.normal_(0, cfg.initializer_range * sharp, generator=gen)
            logits = scorer(q, keys, hidden)[0]  # [S, T] fp32
        probs = visible_softmax(logits, n_visible)
        mask = nucleus_mask(probs, 0.6)
        for r in (0, S // 2, S - 1):  # brute-force check of the device nucleus on a few rows
            got = set(torch.nonzero(mask[r]).flatten().tolist())
            assert got == oracle_row(probs[r].double().cpu().tolist(), 0.6), f"nucleus mismatch row {r}"
        nucleus_size = mask.sum(-1).float().mean().item()

        def indexer_pass():  # the backbone's own scorer, every CSA layer, one chunk
            with torch.no_grad():
                for _ in range(args.csa_layers):
                    scorer(q, keys, hidden)

        def label_pass():  # nucleus at every CSA layer, then vote and window union for the chunk
            labeler = WindowLabeler(n_tokens=args.context, tau=64, rate=4)
            labeler.start_chunk(args.context - S, S)
            for _ in range(args.csa_layers):
                labeler.add_logits(logits)
            labeler.end_chunk()

        t_indexer = median_ms(indexer_pass, reps=3)
        t_label = median_ms(label_pass, reps=3)
        rows.append({"sharpness": sharp, "nucleus_mean": nucleus_size,
                     "indexer_ms_per_1k_tokens": t_indexer * 1024 / S, "labels_ms_per_1k_tokens": t_label * 1024 / S,
                     "ratio": t_label / t_indexer})
    dev = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"labels vs indexer pass: context {args.context:,} (T={T:,} entries), chunk {S}, "
          f"{args.csa_layers} CSA layers, {dev}")
    print(f"{'sharpness':>9s} {'nucleus':>8s} {'indexer ms/1K tok':>18s} {'labels ms/1K tok':>17s} {'ratio':>6s}")
    for r in rows:
        print(f"{r['sharpness']:9.0f} {r['nucleus_mean']:8.0f} {r['indexer_ms_per_1k_tokens']:18.1f} "
              f"{r['labels_ms_per_1k_tokens']:17.1f} {r['ratio']:6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "device": dev, "context": args.context,
                       "chunk": S, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
