"""95% intervals for an evaluation's accuracies: a stratified percentile bootstrap over prompts.

An accuracy of ``fm-index evaluate`` is the mean over tasks of each task's mean score (scores in [0, 1]; RULER's
string match gives fractions for multi-answer tasks). The bootstrap keeps that structure: each task's prompts are
drawn with replacement, n of n, and the statistic is recomputed; the interval is the 2.5th and 97.5th percentiles
of those recomputations. A mode against full pairs the same prompts (task, length, index; both runs must have
decoded the same prompt text, by its digest) and resamples the pairs, so the interval of the difference holds the
prompts' shared difficulty fixed: it is what "LSA within 1 point of full" is read against. The seed is fixed and
the values enter in a canonical order (tasks by name, prompts by length and index), so the same runs give the same
interval in whatever order they were decoded or stored.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

LEVEL = 0.95
RESAMPLES = 10_000


def stratified_interval(groups: list[list[float]], resamples: int = RESAMPLES, level: float = LEVEL,
                        seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval, in points (x 100), of the mean over ``groups`` of each group's mean; each
    group (a task's per-prompt values) is resampled on its own. None without values."""
    groups = [np.asarray(g, dtype=np.float64) for g in groups if len(g)]
    if not groups:
        return None
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    for values in groups:
        total += values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    lo, hi = np.quantile(total / len(groups), [(1 - level) / 2, (1 + level) / 2])
    return 100.0 * float(lo), 100.0 * float(hi)


def prompt_order(run: dict) -> tuple:
    """The canonical order of runs in a bootstrap: by task, then length, then prompt index (the resampling draws
    depend on the order of the values, never on the order the runs were decoded or written)."""
    return run["task"], run["length"], run["index"]


def paired_differences(runs: list[dict], baseline: list[dict]) -> dict[str, list[float]]:
    """Per task, score(run) - score(baseline's run of the same prompt), for every prompt both have decoded.
    A pair whose prompt digests differ raises ValueError: the two modes did not read the same prompt."""
    base = {(r["task"], r["length"], r["index"]): r for r in baseline}
    out: dict[str, list[float]] = defaultdict(list)
    for r in sorted(runs, key=prompt_order):
        b = base.get((r["task"], r["length"], r["index"]))
        if b is None:
            continue
        if b.get("prompt_sha") != r.get("prompt_sha"):
            raise ValueError(f"{r['mode']} and {b['mode']} decoded different prompts for {r['task']} at "
                             f"{r['length']} tokens, sample {r['index']}: prompt digests differ")
        out[r["task"]].append(r["score"] - b["score"])
    return dict(out)


def paired_summary(runs: list[dict], baseline: list[dict]) -> dict:
    """``runs`` against ``baseline`` on the prompts both decoded: pairs, the mean over tasks of the mean paired
    difference in points (None without pairs), and its interval."""
    diffs = paired_differences(runs, baseline)
    pairs = sum(len(d) for d in diffs.values())
    difference = 100.0 * sum(sum(d) / len(d) for d in diffs.values()) / len(diffs) if pairs else None
    return {"pairs": pairs, "difference": difference, "interval": stratified_interval(list(diffs.values()))}


def format_interval(interval, missing: str = "-") -> str:
    """"[lo, hi]" in points to one decimal, as every report prints it."""
    return missing if interval is None else f"[{interval[0]:.1f}, {interval[1]:.1f}]"
