"""An LSA variant against the table's full and LSA on the same prompts (e.g. page recall: table_long_h200/run.sh's
PAGE_SIZE / MAX_PAGES, evaluated into a directory of its own because one evaluation holds one lsa run per prompt).

    python docs/results/table_long_h200/variant.py VARIANT_DIR BASE_DIR [BASE_DIR ...] [--name NAME] [--full-only]
        [--equal-prompts] [--versus DIR ... --versus-name NAME] [--tasks T1,T2]

VARIANT_DIR's lsa runs are paired with BASE_DIRs' full and lsa runs of the same task, length and sample (the prompt
digests must agree: fm_eval.intervals.paired_differences checks them); the table gives, per length, the variant's
accuracy with its interval, its paired difference from full and from LSA (95% intervals by the stratified bootstrap
over prompts, as tables.py), the CSA-KV and total footprint ratios of the variant and of LSA, and the entries
resident per trigger (the selected set: pages whole); then accuracy per task and length for full, LSA and the variant.
With --full-only the variant is paired with the base's full runs alone, for cells where the base has no plain LSA
runs (e.g. variable tracking at 128K); every LSA column then reads "-". With --versus DIR (repeatable) and
--versus-name NAME the LSA side is the DIRs' lsa runs instead of the base's (another variant, e.g. page recall with the
release's tie rule against ours: ``variant.py TIES_DIR BASE_DIR --versus PAGES_DIR --versus-name "release ties"``),
named NAME in the tables. With --tasks only the variant's runs of those tasks count (seen and held-out formats of one
evaluation reported apart, as issue 20 asks).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tables import _num, load_runs  # noqa: E402

from fm_eval.intervals import format_interval, paired_summary  # noqa: E402
from fm_eval.report import summarize  # noqa: E402


def _resident(runs: list[dict]) -> float | None:
    picks = [n for r in runs for n in (r.get("selected_per_trigger") or [])]
    return sum(picks) / len(picks) if picks else None


def print_variant(variant: list[dict], base: list[dict], name: str, with_lsa: bool = True,
                  equal_prompts: bool = False, versus: list[dict] | None = None, other: str = "LSA",
                  tasks: set[str] | None = None) -> None:
    by = {(r["mode"], r["task"], r["length"], r["index"]): r for r in base}
    if versus is not None:  # the LSA side from another directory's lsa runs, in place of the base's
        by = {k: r for k, r in by.items() if k[0] != "lsa"}
        by.update({("lsa", r["task"], r["length"], r["index"]): r for r in versus if r["mode"] == "lsa"})
    variant = [r for r in variant if r["mode"] == "lsa" and (tasks is None or r["task"] in tasks)]
    # only the prompts the base decoded in every mode it is compared with: the comparison is paired or not made
    against = ("full", "lsa") if with_lsa else ("full",)
    variant = [r for r in variant if all((m, r["task"], r["length"], r["index"]) in by for m in against)]
    differ = 0
    if equal_prompts:
        same = [r for r in variant
                if all(by[(m, r["task"], r["length"], r["index"])]["prompt_sha"] == r["prompt_sha"] for m in against)]
        differ, variant = len(variant) - len(same), same
    lengths = sorted({r["length"] for r in variant})
    tasks = sorted({r["task"] for r in variant})
    rows = {row["length"]: row for row in summarize(variant)["modes"]}
    print(f"| length | n | {name} accuracy % | 95% interval | minus full | 95% interval | minus {other} | 95% interval "
          f"| CSA-KV ratio ({name} / {other}) | total KV ratio ({name} / {other}) | entries resident per trigger "
          f"({name} / {other}) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for length in lengths:
        runs = [r for r in variant if r["length"] == length]
        keys = [(r["task"], length, r["index"]) for r in runs]
        full = [by[("full", *k)] for k in keys]
        lsa = [by[("lsa", *k)] for k in keys] if with_lsa else []
        lsa_row = next((row for row in summarize(lsa)["modes"] if row["length"] == length), {}) if lsa else {}
        vs_lsa = paired_summary(runs, lsa) if lsa else {}
        vs_full, row = paired_summary(runs, full), rows[length]
        print(f"| {length:,} | {row['n']} | {row['accuracy']:.1f} | {format_interval(row['accuracy_interval'])} "
              f"| {_num(vs_full['difference'], '+.1f')} | {format_interval(vs_full['interval'])} "
              f"| {_num(vs_lsa.get('difference'), '+.1f')} | {format_interval(vs_lsa.get('interval'))} "
              f"| {_num(row['csa_kv_ratio'], '.3f')} / {_num(lsa_row.get('csa_kv_ratio'), '.3f')} "
              f"| {_num(row['footprint_ratio'], '.3f')} / {_num(lsa_row.get('footprint_ratio'), '.3f')} "
              f"| {_num(_resident(runs))} / {_num(_resident(lsa))} |")
    print()
    print(f"| task | length | full | {'lsa' if versus is None else other} | {name} |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for length in lengths:
        for task in tasks:
            runs = [r for r in variant if r["length"] == length and r["task"] == task]
            if not runs:
                continue
            keys = [(task, length, r["index"]) for r in runs]
            cells = [100.0 * sum(r["score"] for r in rs) / len(rs) if rs else None
                     for rs in ([by[("full", *k)] for k in keys], [by[("lsa", *k)] for k in keys] if with_lsa else [],
                                runs)]
            print(f"| {task} | {length:,} | " + " | ".join(_num(c) for c in cells) + " |")
    if equal_prompts:
        print()
        print(f"{differ} prompt(s) left out: their digests differ from the base's")


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="An LSA variant's evaluation against the table's full and LSA, "
                                                 "paired by prompt.")
    parser.add_argument("variant", type=Path, metavar="VARIANT_DIR", help="the variant's evaluate directory")
    parser.add_argument("base", nargs="+", type=Path, metavar="BASE_DIR",
                        help="the table's evaluate directories (full and lsa runs of the same prompts)")
    parser.add_argument("--name", default="variant", help="the variant's name in the table's header")
    parser.add_argument("--full-only", action="store_true",
                        help="pair with the base's full runs alone (cells the base has no plain lsa runs for)")
    parser.add_argument("--versus", type=Path, metavar="DIR", action="append", help="take the LSA side from DIR's "
                        "lsa runs (another variant's evaluation; repeat for several) instead of the base's")
    parser.add_argument("--versus-name", default=None, help="the --versus side's name in the tables (default: the "
                        "first DIR's name)")
    parser.add_argument("--equal-prompts", action="store_true",
                        help="leave out the prompts whose digests differ from the base's (and count them)")
    parser.add_argument("--tasks", default=None, help="comma-separated: count only the variant's runs of these tasks "
                        "(e.g. varied_seen, to report seen and held-out formats apart)")
    args = parser.parse_args(argv)
    if args.versus and args.full_only:
        parser.error("--versus names the LSA side: it cannot go with --full-only")
    variant, _ = load_runs([args.variant])
    base, _ = load_runs(args.base)
    versus = load_runs(args.versus)[0] if args.versus else None
    other = (args.versus_name or args.versus[0].name) if versus is not None else "LSA"
    tasks = {t.strip() for t in args.tasks.split(",") if t.strip()} if args.tasks else None
    if tasks is not None and not tasks & {r["task"] for r in variant}:
        parser.error(f"--tasks {args.tasks}: none of these tasks is in {args.variant}")
    print_variant(variant, base, args.name, with_lsa=not args.full_only, equal_prompts=args.equal_prompts,
                  versus=versus, other=other, tasks=tasks)


if __name__ == "__main__":
    main()
