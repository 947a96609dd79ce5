"""Adopt or not: a candidate's needle evaluation against the default model's, length by length.

    python -m reference.compare_evals CANDIDATE.json [--reference data/reference/training_results.json]
                                                     [--against default|L6|previous]

Both files are `evaluate_needles --out` results (``{"topk64": {"task@length": {"accuracy": ..., "n": ...}}}``);
for the default, the ``needles_gpu_long.results`` entry of ``training_results.json`` (same seeds and prompts): the
evaluation of the current default (L6 from 2026-12-02, L6i from 2026-12-03; the same key has always held the
default of the day, so older copies read the same way). ``--against L6`` compares against L6's evaluation (the
adopted attempt of ``long_context``), as the candidates of 2026-12-02/03 were judged; ``--against previous``
(or ``--previous-default``) against ``previous_default.needles_gpu_long``, the model L6 replaced.
The rule of issue 20's first part: the candidate replaces the default only if it is at least as good at every
length both were tested on, by the mean accuracy over the tasks both ran there. Prints the table and the verdict;
exits 0 for "adopt", 1 for "keep the reference" (the default model is named `reference`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


# Equal means are a tie, whatever the float rounding: accuracies are hit shares (k / n), stored as floats, so two
# equal means over other tasks' values can differ in the last bit, and sum() rounds differently from Python 3.12 on
# (a tie at 16K read "keep" on Python 3.11 and "adopt" on the GPU machine's 3.12). Real differences are >= 1 / (n *
# tasks), far above this.
TIE = 1e-9


def cells(blob: dict) -> dict[tuple[str, int], float]:
    """{(task, length): accuracy} of an evaluate_needles result, or of the long evaluation of a training_results.json
    (or of its ``previous_default`` entry, which has the same ``needles_gpu_long`` key)."""
    if "needles_gpu_long" in blob:
        blob = blob["needles_gpu_long"]["results"]
    (runs,) = blob.values()  # one top-k setting per file
    return {(cell["task"], int(cell["length"])): float(cell["accuracy"]) for cell in runs.values()}


def verdict(candidate: dict[tuple[str, int], float], reference: dict[tuple[str, int], float]):
    """Per length (both tested): (length, tasks, reference mean, candidate mean); and whether to adopt."""
    rows = []
    for length in sorted({n for _, n in candidate} & {n for _, n in reference}):
        tasks = sorted(t for t, n in candidate if n == length and (t, n) in reference)
        if not tasks:
            continue
        ref = math.fsum(reference[(t, length)] for t in tasks) / len(tasks)
        cand = math.fsum(candidate[(t, length)] for t in tasks) / len(tasks)
        rows.append((length, tasks, ref, cand))
    return rows, bool(rows) and all(cand >= ref - TIE for _, _, ref, cand in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("candidate")
    parser.add_argument("--reference", default=str(Path(__file__).resolve().parent.parent / "data" / "reference"
                                                   / "training_results.json"))
    parser.add_argument("--against", choices=("default", "L6", "previous"), default="default",
                        help="which stored evaluation: the current default's (needles_gpu_long), L6's (the default "
                             "of 2026-12-02/03), or previous_default's (the model L6 replaced)")
    parser.add_argument("--previous-default", action="store_true", help="the same as --against previous")
    args = parser.parse_args(argv)
    against = "previous" if args.previous_default else args.against
    candidate = cells(json.loads(Path(args.candidate).read_text()))
    blob = json.loads(Path(args.reference).read_text())
    if against == "previous":
        if "previous_default" not in blob:
            parser.error(f"{args.reference} has no previous_default entry")
        blob = blob["previous_default"]
    elif against == "L6":
        found = [a for a in blob.get("long_context", {}).get("attempts", []) if a["pieces"][-1]["piece"] == "L6"]
        if not found:
            parser.error(f"{args.reference} has no evaluation of L6 (long_context.attempts)")
        blob = {"topk64": found[0]["needles_full"]}
    reference = cells(blob)
    rows, adopt = verdict(candidate, reference)
    print(f"{'length':>7} {'tasks':>5} {'reference':>9} {'candidate':>9}")
    for length, tasks, ref, cand in rows:
        worse = "" if cand >= ref - TIE else "  <- worse"
        print(f"{length:>7,} {len(tasks):>5} {100 * ref:8.1f}% {100 * cand:8.1f}%{worse}")
    for (task, length), acc in sorted(candidate.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        ref = reference.get((task, length))
        print(f"  {task}@{length}: {100 * acc:.1f}%" + (f" (reference {100 * ref:.1f}%)" if ref is not None else ""))
    print("verdict: " + ("adopt (at least as good at every length)" if adopt else "keep the reference"))
    return 0 if adopt else 1


if __name__ == "__main__":
    sys.exit(main())
