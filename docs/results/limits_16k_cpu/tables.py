"""Section 11's limitations table: per task and mode, what LSA keeps where the method is expected to be weak (dense
memory: common / frequent words; no useful context: context-independent prompts), from the evaluation's runs.jsonl.

    python docs/results/limits_16k_cpu/tables.py docs/results/limits_16k_cpu > docs/results/limits_16k_cpu/tables.md

Per task and mode: n, accuracy (RULER's string match, %), the CSA-KV and total KV ratios (device / full, means over
the prompts), and the compressed entries resident per trigger against the visible ones (means).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        raise SystemExit("usage: tables.py EVAL_DIR (an fm-index evaluate directory with runs.jsonl)")
    runs = [json.loads(line) for line in (Path(args[0]) / "runs.jsonl").read_text().splitlines() if line]
    cells = defaultdict(list)
    for r in runs:
        cells[(r["task"], r["length"], r["mode"])].append(r)
    mean = lambda rs, key: sum(r["stats"][key] for r in rs) / len(rs)  # noqa: E731
    print("| task | length | mode | n | accuracy % | CSA-KV ratio | total KV ratio | resident entries / visible |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for (task, length, mode), rs in sorted(cells.items()):
        accuracy = 100 * sum(r["score"] for r in rs) / len(rs)
        print(f"| {task} | {length:,} | {mode} | {len(rs)} | {accuracy:.1f} | {mean(rs, 'csa_kv_ratio'):.3f} "
              f"| {mean(rs, 'footprint_ratio'):.3f} | {mean(rs, 'resident_entries'):,.1f} / "
              f"{mean(rs, 'csa_entries'):,.1f} |")


if __name__ == "__main__":
    main()
