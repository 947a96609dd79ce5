"""Section 11's limitations table: per task and mode, what LSA keeps where the method is expected to be weak (dense
memory: common / frequent words; no useful context: context-independent prompts), from the evaluation's runs.jsonl.

    python docs/results/limits_16k_cpu/tables.py docs/results/limits_16k_cpu > docs/results/limits_16k_cpu/tables.md

Per task and mode: n, accuracy (RULER's string match, %), the CSA-KV and total KV ratios (device / full, means over
the prompts; fm_eval.report.summarize's cells), and the compressed entries resident per trigger against the visible
ones (means).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

from fm_eval.report import summarize


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        raise SystemExit("usage: tables.py EVAL_DIR (an fm-index evaluate directory with runs.jsonl, or runs.jsonl.gz "
                         "as kept here)")
    plain = Path(args[0]) / "runs.jsonl"
    packed = plain.with_suffix(".jsonl.gz")
    text = plain.read_text() if plain.is_file() else gzip.decompress(packed.read_bytes()).decode()
    runs = [json.loads(line) for line in text.splitlines() if line]
    print("| task | length | mode | n | accuracy % | CSA-KV ratio | total KV ratio | resident entries / visible |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for c in sorted(summarize(runs)["cells"], key=lambda c: (c["task"], c["length"], c["mode"])):
        # resident entries are the one figure the report's cells do not average
        resident = [r["stats"]["resident_entries"] for r in runs
                    if (r["task"], r["length"], r["mode"]) == (c["task"], c["length"], c["mode"])]
        print(f"| {c['task']} | {c['length']:,} | {c['mode']} | {c['n']} | {c['accuracy']:.1f} "
              f"| {c['csa_kv_ratio']:.3f} | {c['footprint_ratio']:.3f} | {sum(resident) / len(resident):,.1f} / "
              f"{c['csa_entries']:,.1f} |")


if __name__ == "__main__":
    main()
