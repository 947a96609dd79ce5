"""The tables of docs/RESULTS.md section 7 from `fm-index evaluate` outputs (runs.jsonl), one per indexer.

    python docs/results/varied_corpus_cpu/tables.py NAME=EVAL_DIR [NAME=EVAL_DIR ...] > tables.md

(here: varied=docs/results/varied_corpus_cpu/eval_varied pipeline=docs/results/varied_corpus_cpu/eval_pipeline)

Every evaluation must hold the same prompts (same tasks, lengths, samples, seed: checked by prompt digest). Per
task and length: accuracy of full (once: the same prompts) and, per indexer, of lsa and of recent / oracle at that
lsa's budget; lsa's CSA-KV ratio (device / full CSA attention KV bytes), entries selected per trigger (of the CSA
entries), entries fetched host -> device per prompt, and how often lsa's text equals full's. Pooled rows: seen
(varied_seen) and held-out (the four varied_new_* tasks; niah_single_1, RULER's noise haystack, apart), with
Wilson 95% intervals on the accuracy.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

SEEN = ("varied_seen",)
HELD_OUT = ("varied_new_format", "varied_new_haystack", "varied_new_question", "varied_new_all")
EXTRA = ("niah_single_1",)  # RULER's repeated noise sentences: a haystack and needle none of the corpus holds


def read(path: Path) -> dict[tuple, dict]:
    """An evaluation's runs by (task, length, index, mode): runs.jsonl, or runs.jsonl.gz as kept in docs/results."""
    import gzip

    plain = path / "runs.jsonl"
    text = plain.read_text() if plain.exists() else gzip.decompress((path / "runs.jsonl.gz").read_bytes()).decode()
    runs = {}
    for line in text.splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        runs[(r["task"], r["length"], r["index"], r["mode"])] = r
    return runs


def wilson(k: float, n: int) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    z, p = 1.96, k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100 * (centre - half), 100 * (centre + half)


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def f(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def group(runs, tasks, length, mode):
    return [r for (t, n, _, m), r in sorted(runs.items()) if t in tasks and n == length and m == mode]


def main(argv: list[str]) -> None:
    evals = {}
    for arg in argv:
        name, _, path = arg.partition("=")
        evals[name] = read(Path(path))
    names = list(evals)
    first = evals[names[0]]
    for name in names[1:]:  # the same prompts
        for key, r in evals[name].items():
            other = first.get(key[:3] + ("full",)) or next((v for k, v in first.items() if k[:3] == key[:3]), None)
            if other is not None and other["prompt_sha"] != r["prompt_sha"]:
                raise SystemExit(f"{name}: prompt {key[:3]} differs from {names[0]}'s")
    full = {}
    for runs in evals.values():
        for key, r in runs.items():
            if key[3] == "full":
                full[key[:3]] = r
    tasks = [t for t in SEEN + HELD_OUT + EXTRA if any(k[0] == t for k in full)]
    lengths = sorted({k[1] for k in full})
    rows = [(t, (t,)) for t in tasks] + [("**seen (pooled)**", SEEN), ("**held-out (pooled)**", HELD_OUT)]

    print("Accuracy % (n prompts per cell); recent and oracle at the lsa run's budget (its mean selected entries "
          "per trigger); 95% Wilson interval on the pooled rows.\n")
    header = "| task | length | n | full | " + " | ".join(
        f"lsa {n} | recent {n} | oracle {n}" for n in names) + " |"
    print(header)
    print("| --- | ---: | ---: | ---: | " + " | ".join("---: | ---: | ---:" for _ in names) + " |")
    for length in lengths:
        for label, group_tasks in rows:
            fulls = [r for k, r in sorted(full.items()) if k[0] in group_tasks and k[1] == length]
            n = len(fulls)
            cells = [f"{100 * mean(r['score'] for r in fulls):.1f}" if n else "-"]
            for name in names:
                for mode in ("lsa", "recent", "oracle"):
                    g = group(evals[name], group_tasks, length, mode)
                    if not g:
                        cells.append("-")
                        continue
                    acc = 100 * mean(r["score"] for r in g)
                    text = f"{acc:.1f}"
                    if label.startswith("**"):
                        lo, hi = wilson(sum(r["score"] for r in g), len(g))
                        text += f" [{lo:.0f}-{hi:.0f}]"
                    if len(g) != n:
                        text += f" (n={len(g)})"
                    cells.append(text)
            if label.startswith("**") and n:
                lo, hi = wilson(sum(r["score"] for r in fulls), n)
                cells[0] += f" [{lo:.0f}-{hi:.0f}]"
            print(f"| {label} | {length:,} | {n} | " + " | ".join(cells) + " |")

    print("\nCost of lsa per prompt (means): CSA-KV ratio (the paper's footprint), total KV ratio, entries selected "
          "at the trigger / CSA entries, entries fetched host -> device, and the share of prompts where lsa's "
          "text equals full's.\n")
    print("| task | length | indexer | CSA-KV ratio | total KV ratio | selected / entries | fetched | lsa text = full |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for length in lengths:
        for label, group_tasks in rows:
            for name in names:
                g = group(evals[name], group_tasks, length, "lsa")
                if not g:
                    continue
                same = [r["prediction"] == full[(r["task"], r["length"], r["index"])]["prediction"]
                        for r in g if (r["task"], r["length"], r["index"]) in full]
                print(f"| {label} | {length:,} | {name} | {f(mean(r['stats'].get('csa_kv_ratio') for r in g), '.3f')} | "
                      f"{f(mean(r['stats'].get('footprint_ratio') for r in g), '.3f')} | "
                      f"{f(mean(r.get('selected_mean') for r in g), '.0f')} / "
                      f"{f(mean(r['stats'].get('csa_entries') for r in g), '.0f')} | "
                      f"{f(mean(r['stats'].get('entries_fetched') for r in g), '.0f')} | "
                      f"{100 * mean(same):.0f}% |" if same else "| - |")


if __name__ == "__main__":
    main(sys.argv[1:])
