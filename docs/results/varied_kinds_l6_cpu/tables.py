"""The table of docs/RESULTS.md section 7e: section 7d's commands re-run on the current default `reference` (L6,
2026-12-02), set beside 7d's figures (the previous default) on the same prompts.

    python docs/results/varied_kinds_l6_cpu/tables.py > docs/results/varied_kinds_l6_cpu/tables.md

Reads `fm-index evaluate` outputs (runs.jsonl.gz kept here and in ../varied_kinds_cpu) and checks, by prompt digest,
that both models decoded the same prompts. Per task and length: full's and lsa's accuracy (RULER's string match, %),
lsa's CSA-KV ratio (device / full CSA attention KV bytes, the paper's footprint), entries selected per trigger,
recent at lsa's budget; then pooled rows over the seen and the held-out tasks (prompt-weighted).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("tables_7d", HERE.parent / "varied_kinds_cpu" / "tables.py")
T7D = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(T7D)

NEW = {"varied": HERE / "eval_varied", "ruler": HERE / "eval_ruler"}  # L6: full, lsa, recent
OLD = {"varied": T7D.SOURCES["varied21"][0], "ruler": T7D.SOURCES["ruler21"][0], "ruler_full": T7D.SOURCES["ruler20"][0]}
# 7d's grouping: the seen kinds in the corpus's own formats; held out: the held-out format/haystack/question, the
# held-out kind, and RULER's wording and noise haystack (every RULER row)
SEEN = {"varied_seen", "varied_multikey", "varied_multivalue", "varied_vt"}


def main() -> None:
    new = {k: T7D.read(p) for k, p in NEW.items()}
    old = {k: T7D.read(p) for k, p in OLD.items()}
    pooled = {"seen": {}, "held-out": {}}
    print("| task | what is new to the indexer | length | n | full | lsa | CSA-KV | selected | recent at its budget | "
          "full (prev.) | lsa (prev.) | CSA-KV (prev.) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for part, tasks in (("varied", T7D.VARIED), ("ruler", T7D.RULER)):
        for task in tasks:
            for length in (2048, 4096):
                lsa = T7D.cells(new[part], task, length, "lsa")
                if not lsa:
                    continue
                full, recent = T7D.cells(new[part], task, length, "full"), T7D.cells(new[part], task, length, "recent")
                old_lsa = T7D.cells(old[part], task, length, "lsa")
                old_full = T7D.cells(old[part if part == "varied" else "ruler_full"], task, length, "full")
                for a, b in ((lsa, old_lsa), (lsa, full), (lsa, old_full)):  # the same prompts, in the same order
                    assert [r["prompt_sha"] for r in a] == [r["prompt_sha"] for r in b], (task, length)
                acc = lambda rs: T7D.mean(100 * r["score"] for r in rs)
                ratio = lambda rs: T7D.mean(r["stats"]["csa_kv_ratio"] for r in rs)
                sel = lambda rs: T7D.mean(T7D.mean(r["stats"]["selected_per_trigger"]) or 0 for r in rs)
                entries = lsa[0]["stats"]["csa_entries"]
                print(f"| {task} | {T7D.SEEN_KIND[task]} | {length:,} | {len(lsa)} | {T7D.fmt(acc(full))} | "
                      f"{T7D.fmt(acc(lsa))} | {T7D.fmt(ratio(lsa), '.3f')} | {T7D.fmt(sel(lsa), '.0f')} / {entries} | "
                      f"{T7D.fmt(acc(recent))} | {T7D.fmt(acc(old_full))} | {T7D.fmt(acc(old_lsa))} | "
                      f"{T7D.fmt(ratio(old_lsa), '.3f')} |")
                if task == "context_independent":
                    continue
                group = pooled["seen" if task in SEEN else "held-out"]
                for name, rs in (("full", full), ("lsa", lsa), ("full_prev", old_full), ("lsa_prev", old_lsa)):
                    group.setdefault(name, []).extend(100 * r["score"] for r in rs)
    print()
    print("| pooled (needle and vt tasks) | prompts | full | lsa | lsa - full | full (prev.) | lsa (prev.) | lsa - full (prev.) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in ("seen", "held-out"):
        g = {k: T7D.mean(v) for k, v in pooled[name].items()}
        print(f"| {name} | {len(pooled[name]['lsa'])} | {g['full']:.1f} | {g['lsa']:.1f} | {g['lsa'] - g['full']:+.1f} | "
              f"{g['full_prev']:.1f} | {g['lsa_prev']:.1f} | {g['lsa_prev'] - g['full_prev']:+.1f} |")


if __name__ == "__main__":
    main()
