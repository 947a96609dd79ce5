"""The tables of docs/RESULTS.md section 7g: triggers during the answer (tau 16 and 8 instead of 64), first with
section 7e's indexer (trained on one trigger per prompt, at its end), then with an indexer trained on labels at
tau = 16 (four triggers per prompt: its end and every 16 answer tokens), exported at recall targets 0.8 and 0.97,
on 7e's prompts.

    python docs/results/retrigger_l6_cpu/tables.py > docs/results/retrigger_l6_cpu/tables.md

Reads `fm-index evaluate` outputs: 7e's (full, and lsa / recent at tau 64, in ../varied_kinds_l6_cpu) and this
section's (kept here), and checks, by prompt digest, that every run decoded 7e's prompts. Per task and length:
accuracy (RULER's string match, %), the CSA-KV ratio (device / full CSA attention KV bytes, the paper's footprint)
and the entries selected by the first trigger (at the prompt's end) and by the later ones (inside the answer), mean
over the prompts; then pooled rows over the seen and the held-out tasks (prompt-weighted, 7d's grouping).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("tables_7e", HERE.parent / "varied_kinds_l6_cpu" / "tables.py")
T7E = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(T7E)
T7D = T7E.T7D

RETRIGGER = {16: {"varied": HERE / "eval_varied_vt_tau16", "ruler": HERE / "eval_vt_tau16"},
             8: {"varied": HERE / "eval_varied_vt_tau8", "ruler": HERE / "eval_vt_tau8"}}  # 7e's indexer, lsa
TRAINED16 = {"varied": HERE / "eval_varied_t16", "ruler": HERE / "eval_ruler_t16"}  # tau-16 indexer: lsa, recent
TRAINED16_R97 = {"varied": HERE / "eval_varied_t16_r97", "ruler": HERE / "eval_ruler_t16_r97"}  # exported at 0.97
VT_CELLS = (("varied", "varied_vt", 2048), ("ruler", "vt", 2048), ("ruler", "vt", 4096))


def acc(runs) -> float | None:
    return T7D.mean(100 * r["score"] for r in runs)


def ratio(runs) -> float | None:
    return T7D.mean(r["stats"]["csa_kv_ratio"] for r in runs)


def selected(runs) -> str:
    """Entries selected by the first trigger / by the later ones (mean over prompts and triggers)."""
    first = T7D.mean(r["selected_per_trigger"][0] for r in runs if r["selected_per_trigger"])
    later = [n for r in runs for n in (r["selected_per_trigger"] or [])[1:]]
    return f"{T7D.fmt(first, '.0f')} / {T7D.fmt(T7D.mean(later), '.0f')}"


def same_prompts(runs, full, where) -> None:
    assert [r["prompt_sha"] for r in runs] == [r["prompt_sha"] for r in full], where


def main() -> None:
    base = {part: T7D.read(path) for part, path in T7E.NEW.items()}
    retrigger = {tau: {part: T7D.read(path) for part, path in parts.items()} for tau, parts in RETRIGGER.items()}
    print("| task | length | n | full | lsa, tau 64 | CSA-KV | selected first / later | "
          + " | ".join(f"lsa, tau {tau} | CSA-KV | selected first / later" for tau in retrigger) + " |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |" + " ---: | ---: | ---: |" * len(retrigger))
    for part, task, length in VT_CELLS:
        full = T7D.cells(base[part], task, length, "full")
        cells = []
        for runs in [T7D.cells(base[part], task, length, "lsa")] + [T7D.cells(r[part], task, length, "lsa")
                                                                   for r in retrigger.values()]:
            same_prompts(runs, full, (task, length))
            cells.append(f"{T7D.fmt(acc(runs))} | {T7D.fmt(ratio(runs), '.3f')} | {selected(runs)}")
        print(f"| {task} | {length:,} | {len(full)} | {T7D.fmt(acc(full))} | " + " | ".join(cells) + " |")
    print()
    trained = {part: T7D.read(path) for part, path in TRAINED16.items()}
    trained97 = {part: T7D.read(path) for part, path in TRAINED16_R97.items()}
    pooled = {group: {} for group in ("seen", "held-out")}
    print("| task | length | n | full | lsa, tau 64 (7e) | CSA-KV | lsa, tau 16 (trained at 16) | CSA-KV | "
          "selected first / later | recent at its budget | lsa, tau 16, recall 0.97 | CSA-KV |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for part, tasks in (("varied", T7D.VARIED), ("ruler", T7D.RULER)):
        for task in tasks:
            for length in (2048, 4096):
                full = T7D.cells(base[part], task, length, "full")
                if not full:
                    continue
                old = T7D.cells(base[part], task, length, "lsa")
                new = T7D.cells(trained[part], task, length, "lsa")
                recent = T7D.cells(trained[part], task, length, "recent")
                new97 = T7D.cells(trained97[part], task, length, "lsa")
                for runs in (old, new, recent, new97):
                    same_prompts(runs, full, (task, length))
                if task != "context_independent":
                    group = pooled["seen" if task in T7E.SEEN else "held-out"]
                    for key, runs in (("full", full), ("old", old), ("new", new), ("new97", new97)):
                        group.setdefault(key, []).extend(100 * r["score"] for r in runs)
                        group.setdefault(f"kv {key}", []).extend(r["stats"]["csa_kv_ratio"] for r in runs)
                print(f"| {task} | {length:,} | {len(full)} | {T7D.fmt(acc(full))} | {T7D.fmt(acc(old))} | "
                      f"{T7D.fmt(ratio(old), '.3f')} | {T7D.fmt(acc(new))} | {T7D.fmt(ratio(new), '.3f')} | "
                      f"{selected(new)} | {T7D.fmt(acc(recent))} | {T7D.fmt(acc(new97))} | "
                      f"{T7D.fmt(ratio(new97), '.3f')} |")
    print()
    print("| pooled (needle and vt tasks) | prompts | full | lsa, tau 64 (7e) | lsa - full | CSA-KV | "
          "lsa, tau 16 (trained at 16) | lsa - full | CSA-KV | lsa, tau 16, recall 0.97 | lsa - full | CSA-KV |")
    print("| --- | ---: | ---: |" + " ---: | ---: | ---: |" * 3)
    for name, group in pooled.items():
        full = T7D.mean(group["full"])
        parts = []
        for key in ("old", "new", "new97"):
            lsa = T7D.mean(group[key])
            parts.append(f"{lsa:.1f} | {lsa - full:+.1f} | {T7D.mean(group[f'kv {key}']):.3f}")
        print(f"| {name} | {len(group['full'])} | {full:.1f} | " + " | ".join(parts) + " |")


if __name__ == "__main__":
    main()
