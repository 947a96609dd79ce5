"""What the oracle keeps that LSA does not (RESULTS section 11): from an evaluation's stored native picks.

    python docs/results/table_long_h200/oracle_sets.py EVAL_DIR [EVAL_DIR ...] --out SETS.jsonl.gz   # from picks/
    python docs/results/table_long_h200/oracle_sets.py --sets SETS.jsonl.gz                          # the table again

The oracle at LSA's budget B (the cell's mean of LSA's selected entries per trigger, as the oracle run records it)
keeps the B entries that full decoding's native top-k picked for the most queries of
the window after the trigger (lsa_runtime.policies.OraclePolicy, the same rule recomputed here from
``picks/<task>@<length>#<i>.safetensors``, fm_eval.picks_store). LSA's resident set at the same B is the recency
tail (the newest ``keep_recent`` entries, 256 for the table's export) plus what the memory indexer scores. Per
prompt this writes: the entries visible at the trigger, the union of full's picks over the window, the oracle's
set with each entry's pick count; and, where this interpreter generates the very same prompt as the device did
(the prompt digest in runs.jsonl; the noise haystacks of niah_single_1 and vt), the needle's entries (the compressed
entries holding a character of an answer, reference.needle_fetch.needle_entries). The table: per task and length,
the oracle's entries inside the last ``--tail`` entries (what LSA keeps by recency) and older, and how many of the
needle's entries the oracle keeps.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository's reference/ (not installed)


def oracle_set(picks: dict, first: int, tau: int, n_visible: int, budget: int):
    """OraclePolicy.select's rule, kept separate so the stored sets do not depend on the runtime's code path."""
    import torch

    window = [picks[t] for t in range(first, first + tau) if t in picks]
    if not window:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 0
    flat = torch.cat(window)
    flat = flat[(flat >= 0) & (flat < n_visible)]
    counts = torch.bincount(flat, minlength=n_visible)
    ranked = counts.double() + torch.arange(n_visible, dtype=torch.double) / (2.0 * max(n_visible, 1))
    top = ranked.topk(min(budget, int((counts >= 1).sum()))).indices.sort().values
    return top, counts[top], int((counts >= 1).sum())


def build(dirs: list[Path], tau: int) -> list[dict]:
    from fm_eval.picks_store import load_picks, picks_path
    from fm_eval.runner import prompt_digest
    from fm_eval.tasks import generate_samples
    from lsa_runtime.backbone import csa_rate, load_backbone
    from reference.needle_fetch import needle_entries

    model, tokenizer = load_backbone("reference", device="cpu", dtype="float32")
    rate = csa_rate(model.config)
    rows = []
    for d in dirs:
        config = json.loads((d / "config.json").read_text())["config"]
        runs = [json.loads(line) for line in (d / "runs.jsonl").read_text().splitlines() if line]
        by = {(r["task"], r["length"], r["index"], r["mode"]): r for r in runs}
        for task in config["tasks"]:
            for length in config["lengths"]:
                samples = None
                for i in range(config["samples"]):
                    full, oracle = by.get((task, length, i, "full")), by.get((task, length, i, "oracle"))
                    if full is None or oracle is None or not oracle.get("budget"):
                        continue
                    picks = load_picks(picks_path(d, task, length, i), full["prompt_sha"])
                    if picks is None:
                        continue
                    visible = full["prompt_tokens"] // rate  # entries complete at the trigger t0 = P - 1
                    budget = int(oracle["budget"])  # the cell's: LSA's mean selected entries per trigger
                    top, counts, union = oracle_set(picks, full["prompt_tokens"], tau, visible, budget)
                    row = {"task": task, "length": length, "index": i, "prompt_sha": full["prompt_sha"],
                           "visible": visible, "budget": budget, "union": union, "oracle": top.tolist(),
                           "counts": counts.tolist(), "needle": None,
                           "scores": {m: by[(task, length, i, m)]["score"] for m in ("full", "lsa", "oracle")
                                      if (task, length, i, m) in by}}
                    if samples is None:
                        samples = generate_samples(task, tokenizer, length, config["samples"], seed=config["seed"],
                                                   haystack_packages=config["haystack_packages"])
                    if prompt_digest(samples[i]) == full["prompt_sha"]:
                        ids = tokenizer(samples[i].prompt, add_special_tokens=True)["input_ids"]
                        row["needle"] = [s for s in needle_entries(tokenizer, samples[i], ids, rate) if s < visible]
                    rows.append(row)
    return rows


def print_table(rows: list[dict], tail: int) -> None:
    groups = defaultdict(list)
    for r in rows:
        groups[(r["length"], r["task"])].append(r)
    print(f"| length | task | prompts | visible | full's picks over the window (union) | oracle set (budget) | "
          f"oracle in the last {tail} | oracle older | prompts with the needle here | needle entries kept by "
          f"the oracle |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (length, task), rs in sorted(groups.items()):
        n = len(rs)
        in_tail = sum(sum(s >= r["visible"] - tail for s in r["oracle"]) for r in rs) / n
        size = sum(len(r["oracle"]) for r in rs) / n
        needles = [r for r in rs if r["needle"]]
        kept = sum(len(set(r["needle"]) & set(r["oracle"])) for r in needles)
        total = sum(len(r["needle"]) for r in needles)
        print(f"| {length:,} | {task} | {n} | {sum(r['visible'] for r in rs) / n:,.0f} "
              f"| {sum(r['union'] for r in rs) / n:,.1f} | {size:.1f} ({sum(r['budget'] for r in rs) / n:.1f}) "
              f"| {in_tail:.1f} | {size - in_tail:.1f} | {len(needles)} "
              f"| {f'{kept} of {total}' if needles else '-'} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The oracle's resident sets from evaluations' stored native picks.")
    parser.add_argument("dirs", nargs="*", type=Path, metavar="EVAL_DIR",
                        help="fm-index evaluate directories with picks/ (full and lsa runs in runs.jsonl)")
    parser.add_argument("--out", type=Path, help="write the per-prompt sets here (JSON lines, gzipped)")
    parser.add_argument("--sets", type=Path, help="read the per-prompt sets from here instead of EVAL_DIRs")
    parser.add_argument("--tau", type=int, default=64, help="the trigger's window (the export's tau)")
    parser.add_argument("--tail", type=int, default=256, help="LSA's recency tail in entries (the export's)")
    args = parser.parse_args(argv)
    if bool(args.dirs) == bool(args.sets):
        parser.error("give EVAL_DIRs (with --out) or --sets, not both")
    if args.sets:
        with gzip.open(args.sets, "rt") as f:
            rows = [json.loads(line) for line in f]
    else:
        if args.out and not args.out.parent.is_dir():
            parser.error(f"--out {args.out}: no directory {args.out.parent}")
        for d in args.dirs:
            if not (d / "picks").is_dir():
                parser.error(f"{d} has no picks/ (an evaluation that ran the oracle since commit 043548d)")
        rows = build(args.dirs, args.tau)
        if args.out:  # written whole, then renamed: no half-written file under the final name
            tmp = args.out.with_name(args.out.name + ".tmp")
            with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
                f.write("".join(json.dumps(row) + "\n" for row in rows).encode())
            tmp.replace(args.out)
    print_table(rows, args.tail)


if __name__ == "__main__":
    main()
