"""The report of an ``fm-index evaluate`` run: summaries per cell and per mode, the markdown table and the plots.

Pure functions of the runs' records (``runs.jsonl``): :func:`summarize` averages every (mode, task, length) cell
and every (mode, length) over tasks; :func:`markdown_report` writes ``results.md``; :func:`write_plots` draws
accuracy vs KV footprint and footprint vs context length.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path

from lsa_runtime.outputs import temp_path

from . import MODES
from .intervals import LEVEL, format_interval, paired_summary, prompt_order, stratified_interval
from .tasks import TASKS


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _rate(runs, tokens_key: str, seconds_key: str) -> float | None:
    tokens = sum(r["stats"].get(tokens_key) or 0 for r in runs)
    seconds = sum(r["stats"].get(seconds_key) or 0 for r in runs)
    return tokens / seconds if seconds > 0 else None


def _csa_kv_ratio(stats: dict) -> float | None:
    """The paper's footprint from a run's stats (runs recorded before the ratio existed carry the bytes)."""
    if "csa_kv_ratio" in stats:
        return stats["csa_kv_ratio"]
    device, full = stats.get("device_bytes", {}), stats.get("full_bytes", {})
    return device.get("csa_kv", 0) / full["csa_kv"] if full.get("csa_kv") else None


def _group_summary(runs: list[dict]) -> dict:
    return {
        "n": len(runs),
        "accuracy": 100.0 * _mean(r["score"] for r in runs),
        "footprint_ratio": _mean(r["stats"].get("footprint_ratio") for r in runs),
        "csa_kv_ratio": _mean(_csa_kv_ratio(r["stats"]) for r in runs),
        "device_bytes": _mean(r["stats"].get("device_total") for r in runs),
        "full_bytes": _mean(r["stats"].get("full_total") for r in runs),
        "csa_entries": _mean(r["stats"].get("csa_entries") for r in runs),
        "selected_entries": _mean(r.get("selected_mean") if r.get("selected_mean") is not None
                                  else r.get("buffer_entries") for r in runs),
        "budget": _mean(r.get("budget") for r in runs),
        "triggers": _mean(r["stats"].get("triggers") for r in runs),
        "entries_fetched": _mean(r["stats"].get("entries_fetched") for r in runs),
        "bytes_moved": _mean(r["stats"].get("fetch_bytes_to_device") for r in runs),
        "prefill_bytes_moved": _mean(r["stats"].get("prefill_bytes_to_device") for r in runs),
        "trigger_seconds": _mean(r["stats"].get("trigger_seconds") for r in runs),
        "decode_tokens_per_second": _rate(runs, "decode_tokens", "decode_seconds"),
        "prefill_tokens_per_second": _rate(runs, "prefill_tokens", "prefill_seconds"),
    }


def _by_task(runs: list[dict]) -> list[list[float]]:
    tasks: dict[str, list[float]] = defaultdict(list)
    for r in sorted(runs, key=prompt_order):
        tasks[r["task"]].append(r["score"])
    return list(tasks.values())


def _mode_rank(mode: str) -> tuple:
    """Modes in MODES order; a variant's label (e.g. "lsa + pages", results tables relabel a variant's runs) after
    them, by name."""
    return (MODES.index(mode), "") if mode in MODES else (len(MODES), mode)


def summarize(runs: list[dict]) -> dict:
    """Per (mode, task, length) cell and per (mode, length) over tasks (accuracy = mean of task accuracies), each
    with its 95% interval (:mod:`.intervals`); every mode but full also against full on the same prompts."""
    cells: dict[tuple, list] = defaultdict(list)
    for r in runs:
        cells[(r["mode"], r["task"], r["length"])].append(r)
    by_cell = [{"mode": m, "task": t, "length": n, **_group_summary(rs),
                "accuracy_interval": stratified_interval([[r["score"] for r in sorted(rs, key=prompt_order)]])}
               for (m, t, n), rs in sorted(cells.items(), key=lambda kv: (
                   _mode_rank(kv[0][0]), kv[0][2], list(TASKS).index(kv[0][1]) if kv[0][1] in TASKS else 99))]
    by_mode_length = []
    groups: dict[tuple, list] = defaultdict(list)
    for r in runs:
        groups[(r["mode"], r["length"])].append(r)
    for (mode, length), rs in sorted(groups.items(), key=lambda kv: (_mode_rank(kv[0][0]), kv[0][1])):
        row = {"mode": mode, "length": length, **_group_summary(rs)}
        row["accuracy"] = _mean(c["accuracy"] for c in by_cell if c["mode"] == mode and c["length"] == length)
        row["accuracy_interval"] = stratified_interval(_by_task(rs))
        full = groups.get(("full", length))
        if mode != "full" and full:
            row["vs_full"] = paired_summary(rs, full)
        by_mode_length.append(row)
    return {"cells": by_cell, "modes": by_mode_length}


def _fmt(value, spec: str = ".1f", missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def markdown_report(results: dict) -> str:
    cfg, summary = results["config"], results["summary"]
    modes = [m for m in MODES if m in cfg["modes"]]
    cells = {(c["mode"], c["task"], c["length"]): c for c in summary["cells"]}
    per_mode = {(c["mode"], c["length"]): c for c in summary["modes"]}
    env = results["environment"]
    lines = [
        f"# fm-index evaluate: {cfg['model']}",
        "",
        ("" if results.get("complete", True) else "**Partial: the evaluation is still running or was "
                                                   "interrupted (`--resume` continues it).**\n\n") +
        f"{results['created']} on {env['device_name']} (torch {env['torch']}, transformers {env['transformers']}). "
        f"{cfg['samples']} samples per task and length, seed {cfg['seed']}, greedy decoding, RULER string match "
        f"(fraction of the answers found in the prediction). Lengths are prompt tokens. Haystack code: "
        f"{', '.join(cfg['haystack_packages'])}.",
        "",
        "## Accuracy (%) per task and length",
        "",
        "| task | length | " + " | ".join(modes) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in modes) + " |",
    ]
    for length in cfg["lengths"]:
        for task in cfg["tasks"]:
            row = [_fmt(cells.get((m, task, length), {}).get("accuracy")) for m in modes]
            lines.append(f"| {task} | {length:,} | " + " | ".join(row) + " |")
        row = [_fmt(per_mode.get((m, length), {}).get("accuracy")) for m in modes]
        lines.append(f"| **average** | {length:,} | " + " | ".join(f"**{v}**" for v in row) + " |")
    level = f"{100 * LEVEL:.0f}%"
    lines += [
        "",
        f"## Intervals ({level}) and the difference to full on the same prompts",
        "",
        "Percentile bootstrap over prompts, each task resampled on its own (`fm_eval/intervals.py`); the "
        "difference to full pairs each prompt's two runs. Points (accuracy %).",
        "",
        f"| mode | length | accuracy % | {level} interval | minus full | {level} interval | pairs |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode in modes:
        for length in cfg["lengths"]:
            c = per_mode.get((mode, length))
            if c is None:
                continue
            vs = c.get("vs_full") or {}
            diff = vs.get("difference")
            lines.append(f"| {mode} | {length:,} | {_fmt(c['accuracy'])} | "
                         f"{format_interval(c.get('accuracy_interval'))} | {_fmt(diff, '+.1f')} | "
                         f"{format_interval(vs.get('interval'))} | {vs.get('pairs', '-')} |")
    lines += [
        "",
        "## Cost per mode and length",
        "",
        "Two footprints, device bytes / full decoding's at the end of generation (mean over samples): the "
        "**CSA-KV ratio** counts the CSA attention KV only (the paper's metric, its 13.5%); the **total KV ratio** "
        "counts every kind of KV state on the device (sliding windows, HCA entries, index keys, memory-indexer "
        "keys). Selected: entries a trigger made resident (lsa's mean is the budget of recent/random/oracle). "
        "Bytes moved: host->device bytes fetched after prefill per sample (by triggers; hisparse: at every "
        "decode step, into its buffer of max(budget, top-k) entries per CSA layer).",
        "",
        "| mode | length | accuracy % | CSA-KV ratio | total KV ratio | device KV MiB | CSA entries | selected | "
        "budget | triggers | entries fetched | bytes moved MiB | decode tok/s | prefill tok/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    mib = 1024 * 1024
    for mode in modes:
        for length in cfg["lengths"]:
            c = per_mode.get((mode, length))
            if c is None:
                continue
            lines.append(
                f"| {mode} | {length:,} | {_fmt(c['accuracy'])} | {_fmt(c['csa_kv_ratio'], '.3f')} | "
                f"{_fmt(c['footprint_ratio'], '.3f')} | "
                f"{_fmt(c['device_bytes'] / mib if c['device_bytes'] is not None else None, '.2f')} | "
                f"{_fmt(c['csa_entries'], '.0f')} | {_fmt(c['selected_entries'], '.1f')} | "
                f"{_fmt(c['budget'], '.0f')} | {_fmt(c['triggers'], '.1f')} | {_fmt(c['entries_fetched'], '.1f')} | "
                f"{_fmt(c['bytes_moved'] / mib if c['bytes_moved'] is not None else None, '.3f')} | "
                f"{_fmt(c['decode_tokens_per_second'], '.1f')} | {_fmt(c['prefill_tokens_per_second'], '.0f')} |")
    lines += ["", "Plots: `accuracy_vs_footprint.png`, `footprint_vs_length.png`. Every run: `results.json`.", ""]
    return "\n".join(lines)


def write_plots(results: dict, out: Path) -> list[Path]:
    """Accuracy vs the CSA-KV ratio (the paper's footprint; one point per mode and length) and the CSA-KV ratio
    vs context length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["summary"]["modes"]
    modes = sorted({r["mode"] for r in rows}, key=_mode_rank)  # MODES, then variants' labels (e.g. "lsa + pages")
    # distinct markers and dashes: controls at one budget often coincide in footprint
    # one color per mode, so a mode's total-KV line (dotted) matches its CSA-KV line
    style = {m: dict(marker=mk, linestyle=ls, color=f"C{k}")
             for k, (m, mk, ls) in enumerate(zip(MODES, "os^vDx", ("-", "--", "-.", ":", "-", "--")))}
    extra = [m for m in modes if m not in MODES]
    style.update({m: dict(marker="P*hX"[k % 4], linestyle="-", color=f"C{len(MODES) + k}")
                  for k, m in enumerate(extra)})
    paths = []
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for mode in modes:
        pts = [(r["csa_kv_ratio"], r["accuracy"], r["length"]) for r in rows
               if r["mode"] == mode and r.get("csa_kv_ratio") is not None]
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=mode, **style[mode])
        for x, y, length in pts:
            ax.annotate(f"{length // 1024}K" if length >= 1024 else str(length), (x, y), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("CSA-KV ratio (device / full; the paper's footprint)")
    ax.set_ylabel("accuracy, mean over tasks (%)")
    ax.set_ylim(-3, 103)
    ax.set_title("Accuracy vs CSA-KV footprint")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "accuracy_vs_footprint.png"))
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for mode in modes:
        for key, dash in (("csa_kv_ratio", None), ("footprint_ratio", ":")):
            pts = sorted((r["length"], r[key]) for r in rows if r["mode"] == mode and r.get(key) is not None)
            if pts:
                kwargs = dict(style[mode], linestyle=dash) if dash else style[mode]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=mode if dash is None else f"{mode} (total)",
                        alpha=1.0 if dash is None else 0.5, **kwargs)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (prompt tokens)")
    ax.set_ylabel("footprint (device / full): CSA-KV solid, total KV dotted")
    ax.set_title("KV footprint vs context length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    paths.append(_save(fig, out / "footprint_vs_length.png"))
    plt.close("all")
    return paths


def _save(fig, path: Path) -> Path:
    tmp = temp_path(path)
    fig.tight_layout()
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    return path
