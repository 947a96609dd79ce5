"""The table of docs/RESULTS.md section 7f: section 7e's indexer (L6, the four-kind corpus) exported with higher
recall targets, decoded on 7e's prompts; what the gap to full costs in footprint; and the oracle (the full run's
own native picks) at the budget lsa used.

    python docs/results/recall_targets_l6_cpu/tables.py > docs/results/recall_targets_l6_cpu/tables.md

Reads `fm-index evaluate` outputs: 7e's (full, and lsa / recent at the recall target 0.8, in
../varied_kinds_l6_cpu) and this section's (lsa / recent at the targets 0.9 and 0.97; lsa / oracle at 0.8, kept
here), and checks, by prompt digest, that every run decoded the same prompts and that the re-run lsa at 0.8 gave
7e's predictions. Per task and length: full's accuracy, then per target lsa's accuracy, its CSA-KV ratio (device /
full CSA attention KV bytes, the paper's footprint) and recent's accuracy at lsa's budget, then the oracle's
accuracy and CSA-KV at the 0.8 budget; then pooled rows over the seen and the held-out tasks (prompt-weighted, 7d's
grouping); last, variable tracking with longer recency tails (``--keep-recent`` 64 and 128 at the 0.8 export).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("tables_7e", HERE.parent / "varied_kinds_l6_cpu" / "tables.py")
T7E = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(T7E)
T7D = T7E.T7D

TARGETS = {  # recall target: evaluate outputs per part
    "0.8": {"varied": T7E.NEW["varied"], "ruler": T7E.NEW["ruler"]},
    "0.9": {"varied": HERE / "eval_varied_r9", "ruler": HERE / "eval_ruler_r9"},
    "0.97": {"varied": HERE / "eval_varied_r97", "ruler": HERE / "eval_ruler_r97"},
}
ORACLE = {"varied": HERE / "eval_varied_oracle", "ruler": HERE / "eval_ruler_oracle"}  # lsa + oracle at 0.8
TAILS = {64: HERE / "eval_vt_tail64", 128: HERE / "eval_vt_tail128"}  # lsa on vt / varied_vt, longer recency tails


def main() -> None:
    runs = {target: {part: T7D.read(path) for part, path in parts.items()} for target, parts in TARGETS.items()}
    oracle_runs = {part: T7D.read(path) for part, path in ORACLE.items()}
    pooled = {group: {} for group in ("seen", "held-out")}
    header = " | ".join(f"lsa @{t} | CSA-KV @{t} | recent @{t}" for t in TARGETS)
    print(f"| task | length | n | full | {header} | oracle @0.8 | CSA-KV oracle |")
    print("| --- | ---: | ---: | ---: |" + " ---: | ---: | ---: |" * len(TARGETS) + " ---: | ---: |")
    acc = lambda rs: T7D.mean(100 * r["score"] for r in rs)  # noqa: E731
    ratio = lambda rs: T7D.mean(r["stats"]["csa_kv_ratio"] for r in rs)  # noqa: E731
    for part, tasks in (("varied", T7D.VARIED), ("ruler", T7D.RULER)):
        for task in tasks:
            for length in (2048, 4096):
                full = T7D.cells(runs["0.8"][part], task, length, "full")
                if not full:
                    continue
                cells = []
                group = pooled["seen" if task in T7E.SEEN else "held-out"]
                if task != "context_independent":
                    group.setdefault("full", []).extend(100 * r["score"] for r in full)
                for target in TARGETS:
                    lsa = T7D.cells(runs[target][part], task, length, "lsa")
                    recent = T7D.cells(runs[target][part], task, length, "recent")
                    for other in (lsa, recent):  # the same prompts, in the same order
                        assert [r["prompt_sha"] for r in other] == [r["prompt_sha"] for r in full], (task, length)
                    cells.append(f"{T7D.fmt(acc(lsa))} | {T7D.fmt(ratio(lsa), '.3f')} | {T7D.fmt(acc(recent))}")
                    if task != "context_independent":
                        group.setdefault(f"lsa {target}", []).extend(100 * r["score"] for r in lsa)
                        group.setdefault(f"kv {target}", []).extend(r["stats"]["csa_kv_ratio"] for r in lsa)
                oracle = T7D.cells(oracle_runs[part], task, length, "oracle")
                rerun = T7D.cells(oracle_runs[part], task, length, "lsa")
                assert [r["prompt_sha"] for r in oracle] == [r["prompt_sha"] for r in full], (task, length)
                assert [r["prediction"] for r in rerun] == [r["prediction"] for r in
                                                            T7D.cells(runs["0.8"][part], task, length, "lsa")]
                cells.append(f"{T7D.fmt(acc(oracle))} | {T7D.fmt(ratio(oracle), '.3f')}")
                if task != "context_independent":
                    group.setdefault("oracle", []).extend(100 * r["score"] for r in oracle)
                    group.setdefault("kv oracle", []).extend(r["stats"]["csa_kv_ratio"] for r in oracle)
                print(f"| {task} | {length:,} | {len(full)} | {T7D.fmt(acc(full))} | " + " | ".join(cells) + " |")
    print()
    print("| pooled (needle and vt tasks) | prompts | full | "
          + " | ".join(f"lsa @{t} | lsa - full | CSA-KV @{t}" for t in TARGETS) + " | oracle @0.8 | CSA-KV oracle |")
    print("| --- | ---: | ---: |" + " ---: | ---: | ---: |" * len(TARGETS) + " ---: | ---: |")
    for name, group in pooled.items():
        full = T7D.mean(group["full"])
        parts = []
        for target in TARGETS:
            lsa = T7D.mean(group[f"lsa {target}"])
            parts.append(f"{lsa:.1f} | {lsa - full:+.1f} | {T7D.mean(group[f'kv {target}']):.3f}")
        parts.append(f"{T7D.mean(group['oracle']):.1f} | {T7D.mean(group['kv oracle']):.3f}")
        print(f"| {name} | {len(group['full'])} | {full:.1f} | " + " | ".join(parts) + " |")
    print()
    tails = {k: T7D.read(path) for k, path in TAILS.items()}
    print("| task | length | n | full | lsa, tail 32 | CSA-KV | " + " | ".join(f"lsa, tail {k} | CSA-KV" for k in tails)
          + " |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |" + " ---: | ---: |" * len(tails))
    for part, task, length in (("varied", "varied_vt", 2048), ("ruler", "vt", 2048), ("ruler", "vt", 4096)):
        full = T7D.cells(runs["0.8"][part], task, length, "full")
        cells = []
        for lsa in [T7D.cells(runs["0.8"][part], task, length, "lsa")] + [T7D.cells(t, task, length, "lsa")
                                                                         for t in tails.values()]:
            assert [r["prompt_sha"] for r in lsa] == [r["prompt_sha"] for r in full], (task, length)
            cells.append(f"{T7D.fmt(acc(lsa))} | {T7D.fmt(ratio(lsa), '.3f')}")
        print(f"| {task} | {length:,} | {len(full)} | {T7D.fmt(acc(full))} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
