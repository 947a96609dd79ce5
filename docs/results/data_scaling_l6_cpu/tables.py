"""The tables of docs/RESULTS.md section 7h: three times the training prompts (432 instead of 7e's 144; the same
four kinds, seen split and method defaults, a new seed), on 7e's prompts.

    python docs/results/data_scaling_l6_cpu/tables.py > docs/results/data_scaling_l6_cpu/tables.md

Reads `fm-index evaluate` outputs: 7e's (full, and lsa at its 144-prompt indexer, in ../varied_kinds_l6_cpu) and this
section's (lsa and recent with the 432-prompt indexer, kept here), and checks, by prompt digest, that every run
decoded 7e's prompts (7g's check and accuracy / footprint helpers). Per task and length: accuracy (RULER's string match, %), the CSA-KV ratio (device / full CSA
attention KV bytes, the paper's footprint) and the entries selected per trigger; then pooled rows over the seen and
the held-out tasks (prompt-weighted, 7d's grouping).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("tables_7g", HERE.parent / "retrigger_l6_cpu" / "tables.py")
T7G = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(T7G)
T7E, T7D = T7G.T7E, T7G.T7D
acc, ratio, same_prompts = T7G.acc, T7G.ratio, T7G.same_prompts  # 7g's: accuracy %, CSA-KV, digest check

NEW = {"varied": HERE / "eval_varied", "ruler": HERE / "eval_ruler"}  # the 432-prompt indexer: lsa, recent


def selected(runs) -> float | None:
    return T7D.mean(n for r in runs for n in (r["selected_per_trigger"] or []))


def main() -> None:
    print_tables(NEW, "432 prompts")


def print_tables(new_dirs: dict, label: str) -> None:
    """7e's full and lsa beside lsa and recent of another indexer (``new_dirs``: its varied and RULER outputs; its
    columns headed ``lsa, <label>``), per task and length, then pooled: 7h's tables, reused by later sections."""
    base = {part: T7D.read(path) for part, path in T7E.NEW.items()}
    new = {part: T7D.read(path) for part, path in new_dirs.items()}
    pooled = {group: {} for group in ("seen", "held-out")}
    print(f"| task | length | n | full | lsa, 144 prompts (7e) | CSA-KV | selected | lsa, {label} | CSA-KV | "
          "selected | recent at its budget |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for part, tasks in (("varied", T7D.VARIED), ("ruler", T7D.RULER)):
        for task in tasks:
            for length in (2048, 4096):
                full = T7D.cells(base[part], task, length, "full")
                if not full:
                    continue
                old = T7D.cells(base[part], task, length, "lsa")
                lsa = T7D.cells(new[part], task, length, "lsa")
                recent = T7D.cells(new[part], task, length, "recent")
                for runs in (old, lsa, recent):
                    same_prompts(runs, full, (task, length))
                if task != "context_independent":
                    group = pooled["seen" if task in T7E.SEEN else "held-out"]
                    for key, runs in (("full", full), ("old", old), ("new", lsa), ("recent", recent)):
                        group.setdefault(key, []).extend(100 * r["score"] for r in runs)
                        group.setdefault(f"kv {key}", []).extend(r["stats"]["csa_kv_ratio"] for r in runs)
                print(f"| {task} | {length:,} | {len(full)} | {T7D.fmt(acc(full))} | {T7D.fmt(acc(old))} | "
                      f"{T7D.fmt(ratio(old), '.3f')} | {T7D.fmt(selected(old), '.0f')} | {T7D.fmt(acc(lsa))} | "
                      f"{T7D.fmt(ratio(lsa), '.3f')} | {T7D.fmt(selected(lsa), '.0f')} | {T7D.fmt(acc(recent))} |")
    print()
    print("| pooled (needle and vt tasks) | prompts | full | lsa, 144 prompts (7e) | lsa - full | CSA-KV | "
          f"lsa, {label} | lsa - full | CSA-KV | recent at its budget |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, group in pooled.items():
        full = T7D.mean(group["full"])
        parts = []
        for key in ("old", "new"):
            lsa = T7D.mean(group[key])
            parts.append(f"{lsa:.1f} | {lsa - full:+.1f} | {T7D.mean(group[f'kv {key}']):.3f}")
        print(f"| {name} | {len(group['full'])} | {full:.1f} | " + " | ".join(parts)
              + f" | {T7D.mean(group['recent']):.1f} |")


if __name__ == "__main__":
    main()
