"""Aggregate decode tokens/s vs batch size, one line per (run, context, mode), from `bench_batch.py --json` and
`bench_static.py --json` files.

    python bench/plot_batch.py [--out docs/bench_results/batch_h200/tokens_per_s.png] [RUN.json:LABEL ...]

Without arguments it plots the H200 runs of issue 18: the first and the second batched version (per-sequence
caches, `bench_batch.py`) and the static-shape step, compiled, one CUDA graph (`bench_static.py`, run 3: full
semantics; run 4: full at B = 11 and LSA's resident mode with 13,125 slots, triggers counted; run 8: 128K, full at
B = 47 and LSA with 3,277 slots at B = 47 / 128, synchronous triggers counted). A `bench_static.py` row is mode
"full" or, with `--resident`, "lsa" (its tokens/s with the triggers counted when `--triggers` ran). It also prints
the plotted points as a table, so the figure can be checked against the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT / "docs" / "bench_results" / "batch_h200"
STATIC = ROOT / "docs" / "bench_results" / "static_h200" / "run3"
DEFAULT_RUNS = [f"{RAW / 'batch_128k.json'}:v1", f"{RAW / 'batch_512k.json'}:v1",
                f"{RAW / 'batch3_128k.json'}:v2", f"{RAW / 'batch3_512k.json'}:v2"] + \
               [f"{STATIC / name}:static" for name in ("static_512k.json", "static_512k_b11.json", "static_512k_b16.json",
                                                       "static_128k.json")]
RUN4 = ROOT / "docs" / "bench_results" / "static_h200" / "run4"
DEFAULT_RUNS += [f"{RUN4 / name}:static run 4" for name in ("full_b11.json", "resident_13125.json")]
RUN8 = ROOT / "docs" / "bench_results" / "static_h200" / "run8"  # 128K: full at B = 47, LSA 3,277 slots, sync triggers
DEFAULT_RUNS += [f"{RUN8 / name}:static run 8" for name in ("full_128k_b47.json", "resident_128k_3277.json")]
STYLES = {"v1": ":", "v2": "--", "static": "-", "static run 4": "-.", "static run 8": (0, (5, 1, 1, 1))}


def series(runs: list[tuple[Path, str]]) -> dict[tuple[str, int, str], list[tuple[int, float]]]:
    """{(label, context, mode): [(batch, tokens/s), ...] sorted by batch}."""
    out: dict[tuple[str, int, str], list[tuple[int, float]]] = {}
    for path, label in runs:
        for row in json.loads(path.read_text())["rows"]:
            if "mode" in row:  # bench_batch.py
                mode, tokens = row["mode"], row["tokens_per_s"]
            else:  # bench_static.py: full semantics, or LSA's resident mode
                mode = "lsa" if row.get("resident_slots") else "full"
                tokens = row.get("tokens_per_s_with_triggers", row["tokens_per_s"])
            out.setdefault((label, row["context"], mode), []).append((row["batch"], tokens))
    return {k: sorted(v) for k, v in out.items()}


def parse_run(arg: str) -> tuple[Path, str]:
    path, _, label = arg.rpartition(":") if ":" in arg else (arg, "", Path(arg).stem)
    return Path(path), label


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", default=DEFAULT_RUNS, help="bench_batch.py JSON files, each as PATH:LABEL")
    ap.add_argument("--out", default=str(RAW / "tokens_per_s.png"))
    args = ap.parse_args()
    runs = [parse_run(a) for a in args.runs]
    missing = [str(p) for p, _ in runs if not p.is_file()]
    if missing:
        print(f"error: no such file: {missing[0]}", file=sys.stderr)
        sys.exit(2)
    data = series(runs)
    print(f"{'run':>4} {'context':>8} {'mode':>4} {'B':>3} {'tok/s':>7}")
    for (label, context, mode), pts in data.items():
        for b, tps in pts:
            print(f"{label:>4} {context:>8,} {mode:>4} {b:>3} {tps:7.1f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    contexts = sorted({c for _, c, _ in data})
    for ax, context in zip(axes, contexts):
        for (label, c, mode), pts in data.items():
            if c != context:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if mode == "lsa" else "s",
                    linestyle=STYLES.get(label, "-"), label=f"{mode} ({label})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (sequences decoded together)")
        ax.set_title(f"{context // 1024}K tokens per sequence")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("aggregate decode tokens/s")
    fig.suptitle("Batched decoding on one H200, Flash-shaped model (all, full = exact full decoders)", fontsize=10)
    fig.tight_layout()
    out = Path(args.out)
    tmp = out.with_name(f"{out.stem}.{os.getpid()}.tmp{out.suffix}")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
