"""The table that opens docs/RESULTS.md (issue 20 section 4): LSA against full and the controls at long range, from
`fm-index evaluate`'s results.json (table_long_h200/run.sh), and the issue's goals judged from it.

    python docs/results/table_long_h200/tables.py EVAL_DIR [EVAL_DIR ...] [--plots DIR [--variant LABEL=DIR ...]]
        [--tasks A,B] > .../tables.md

Every run of the given evaluation directories is read (an unfinished one's runs.jsonl, or runs.jsonl.gz as stored
under docs/results/, where it has no results.json; one task and length lives in one directory, except runs decoded
again with the same prompt and answer, read once: an evaluation of hisparse repeats the lsa runs that set its
budget); the summaries are recomputed from the runs (fm_eval.report.summarize: 95% intervals by a bootstrap over
prompts, task by task; each mode against full on the same prompts). A control against LSA pairs the same prompts
too. Goals (the issue's, on the tasks the directories hold): LSA within 1 point of full at every length (the issue
names 32K and 64K, and 2K-4K for the short end); LSA's CSA-KV ratio <= 15% at 32K and <= 10% at 64K; recent and
random at LSA's budget clearly below LSA (the interval of their paired difference below 0); then the headroom: the
oracle against LSA, paired; and hisparse (exact native top-k at every step, its buffer at LSA's budget) against
LSA. ``--plots DIR`` also draws the issue's two plots over all the directories' runs together
(fm_eval.report.write_plots: accuracy vs CSA-KV footprint per mode; footprint vs context length), and with
``--variant LABEL=DIR`` a variant's lsa runs (page recall) as a series of their own.
"""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from pathlib import Path

from fm_eval import MODES
from fm_eval.intervals import format_interval, paired_summary
from fm_eval.report import summarize

CSA_KV_GOAL = {32768: 0.15, 65536: 0.10}  # LSA's CSA-KV ratio at most this, per length
WITHIN = 1.0  # points: LSA at most this far below full


def load_runs(dirs: list[Path]) -> tuple[list[dict], list[dict]]:
    runs, configs, seen = [], [], {}
    for d in dirs:
        if (d / "results.json").is_file():
            results = json.loads((d / "results.json").read_text())
        else:  # the runs.jsonl alone (e.g. an evaluation cut by its time limit): complete when it holds every run
            config = json.loads((d / "config.json").read_text())["config"]
            plain = d / "runs.jsonl"
            with (open(plain) if plain.is_file() else gzip.open(d / "runs.jsonl.gz", "rt")) as f:
                records = [json.loads(line) for line in f if line.strip()]
            wanted = {(t, n, i, m) for t in config["tasks"] for n in config["lengths"] for i in range(config["samples"])
                      for m in config["modes"]}
            done = {(r["task"], r["length"], r["index"], r["mode"]) for r in records}
            results = {"complete": wanted <= done, "config": config, "runs": records}
        configs.append({"dir": str(d), "complete": results.get("complete", True), **results["config"]})
        repeated = 0
        for r in results["runs"]:
            key = (r["task"], r["length"], r["index"], r["mode"])
            if key in seen:
                # The same prompt decoded again (e.g. the lsa runs an evaluation of hisparse needs for its budget):
                # read once when it answered the same; two different answers for one run cannot both be the table's.
                first = seen[key]
                if (first.get("prompt_sha"), first["prediction"]) != (r.get("prompt_sha"), r["prediction"]):
                    raise SystemExit(f"{d}: {key} is in two of the directories with different prompts or answers")
                repeated += 1
                continue
            seen[key] = r
            runs.append(r)
        configs[-1]["repeated"] = repeated
    return runs, configs


def _num(value, spec=".1f") -> str:
    return "-" if value is None else format(value, spec)


def print_tables(runs: list[dict], configs: list[dict]) -> None:
    summary = summarize(runs)
    rows = {(r["mode"], r["length"]): r for r in summary["modes"]}
    modes = [m for m in MODES if any(r["mode"] == m for r in runs)]
    lengths = sorted({r["length"] for r in runs})
    tasks = sorted({r["task"] for r in runs})
    by = defaultdict(list)
    for r in runs:
        by[(r["mode"], r["length"])].append(r)
    print("Sources: " + "; ".join(f"{c['dir']} ({'complete' if c['complete'] else 'partial'}, seed {c['seed']}, "
                                  f"{c['samples']} samples"
                                  + (f"; {c['repeated']} runs equal to an earlier directory's, read once"
                                     if c.get("repeated") else "") + ")" for c in configs)
          + f". Tasks: {', '.join(tasks)}.")
    print()
    print("| length | mode | n | accuracy % | 95% interval | minus full | 95% interval | CSA-KV ratio | "
          "total KV ratio | entries fetched per trigger | MiB moved per prompt |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for length in lengths:
        for mode in modes:
            row = rows.get((mode, length))
            if row is None:
                continue
            vs = row.get("vs_full") or {}
            rs = by[(mode, length)]
            triggers = sum(r["stats"].get("triggers") or 0 for r in rs)
            fetched = sum(r["stats"].get("entries_fetched") or 0 for r in rs)
            moved = row["bytes_moved"]
            print(f"| {length:,} | {mode} | {row['n']} | {row['accuracy']:.1f} "
                  f"| {format_interval(row['accuracy_interval'])} | {_num(vs.get('difference'), '+.1f')} "
                  f"| {format_interval(vs.get('interval'))} "
                  f"| {_num(row['csa_kv_ratio'], '.3f')} | {_num(row['footprint_ratio'], '.3f')} "
                  f"| {_num(fetched / triggers if triggers else None)} "
                  f"| {_num(moved / 2**20 if moved is not None else None, '.2f')} |")
    print()
    print("| task | length | " + " | ".join(modes) + " |")
    print("| --- | ---: | " + " | ".join("---:" for _ in modes) + " |")
    cells = {(c["mode"], c["task"], c["length"]): c for c in summary["cells"]}
    for length in lengths:
        for task in tasks:
            accuracy = [_num(cells[(m, task, length)]["accuracy"]) if (m, task, length) in cells else "-"
                        for m in modes]
            print(f"| {task} | {length:,} | " + " | ".join(accuracy) + " |")
    if any(("lsa", length) in rows for length in lengths):  # the goals are LSA's: none without its runs
        print()
        print("Goals:")
    for length in lengths:
        lsa, full = rows.get(("lsa", length)), rows.get(("full", length))
        if lsa is None:
            continue
        if full is not None:  # a directory of LSA and the controls alone (a variant's budget) has no full to judge
            vs = lsa["vs_full"]
            met = vs["difference"] is not None and vs["difference"] >= -WITHIN
            print(f"- {length:,}: LSA {lsa['accuracy']:.1f} vs full {full['accuracy']:.1f}, "
                  f"{vs['difference']:+.1f} points {format_interval(vs['interval'])} over {vs['pairs']} pairs: within "
                  f"{WITHIN:g} point of full **{'met' if met else 'not met'}**")
        if length in CSA_KV_GOAL and lsa["csa_kv_ratio"] is not None:
            goal = CSA_KV_GOAL[length]
            print(f"- {length:,}: LSA's CSA-KV ratio {lsa['csa_kv_ratio']:.3f} (goal <= {goal:.2f}): "
                  f"**{'met' if lsa['csa_kv_ratio'] <= goal else 'not met'}**")
        for control in ("recent", "random"):
            if (control, length) not in by:
                continue
            vs = paired_summary(by[(control, length)], by[("lsa", length)])
            if not vs["pairs"]:
                continue
            print(f"- {length:,}: {control} at LSA's budget {vs['difference']:+.1f} points against LSA "
                  f"{format_interval(vs['interval'])} over {vs['pairs']} pairs: clearly below LSA "
                  f"**{'yes' if vs['interval'][1] < 0 else 'no'}**")
    against_lsa = (("oracle", "Headroom (not a goal): the oracle, full's own native picks capped at LSA's budget, "
                               "against LSA on the same prompts:"),
                   ("hisparse", "Hisparse (not a goal; exact native top-k at every step, misses fetched into a buffer "
                                "of LSA's budget) against LSA on the same prompts:"))
    for mode, title in against_lsa:  # not goals: each mode paired with LSA, length by length
        lines = [(length, paired_summary(by[(mode, length)], by[("lsa", length)])) for length in lengths
                 if (mode, length) in by and ("lsa", length) in by]
        if lines:
            print()
            print(title)
        for length, vs in lines:
            print(f"- {length:,}: {vs['difference']:+.1f} points {format_interval(vs['interval'])} over {vs['pairs']} "
                  f"pairs")


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="The long table and issue 20's goals from evaluate directories.")
    parser.add_argument("dirs", nargs="+", type=Path, metavar="EVAL_DIR",
                        help="an fm-index evaluate directory (results.json, or config.json and runs.jsonl)")
    parser.add_argument("--plots", type=Path, metavar="DIR", help="also draw the two plots into DIR")
    parser.add_argument("--tasks", help="comma-separated: only these tasks' runs (e.g. to compare with an "
                        "evaluation of fewer tasks)")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=DIR",
                        help="the plots also draw DIR's lsa runs as a mode of their own, LABEL (e.g. 'lsa + "
                        "pages=run3_pages/eval_64k_pages'; repeat for more directories); the tables do not")
    args = parser.parse_args(argv)
    dirs, plots = args.dirs, args.plots
    runs, configs = load_runs(dirs)
    keep = set(args.tasks.split(",")) if args.tasks else None
    if keep:
        runs = [r for r in runs if r["task"] in keep]
    print_tables(runs, configs)
    if plots is not None:
        from fm_eval.report import write_plots

        extra = []
        for spec in args.variant:
            label, sep, path = spec.partition("=")
            if not sep or not label or label in MODES:
                raise SystemExit(f"--variant {spec!r}: give LABEL=DIR with a label that is not a mode")
            extra += [{**r, "mode": label} for r in load_runs([Path(path)])[0]
                      if r["mode"] == "lsa" and (keep is None or r["task"] in keep)]
        plots.mkdir(parents=True, exist_ok=True)
        write_plots({"summary": summarize(runs + extra)}, plots)


if __name__ == "__main__":
    main()
