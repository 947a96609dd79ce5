"""The tables of docs/RESULTS.md section 7d: the indexer trained on four task kinds (corpus21) against section 7b's,
trained on single needles (corpus20), on the same prompts.

    python docs/results/varied_kinds_cpu/tables.py > docs/results/varied_kinds_cpu/tables.md

Reads `fm-index evaluate` outputs (runs.jsonl, or runs.jsonl.gz as kept here) and checks, by prompt digest, that
every compared run decoded the same prompt. Per task and length: full's accuracy; per indexer, lsa's accuracy, its
CSA-KV ratio (device / full CSA attention KV bytes, the paper's footprint) and entries selected per trigger; recent
at the new indexer's budget. Accuracy is RULER's string match (share of the answers found), in %.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
OLD = HERE.parent / "varied_corpus_cpu"
SOURCES = {  # name: (directory, modes read from it)
    "varied21": (HERE / "eval_varied21", ("full", "lsa", "recent")),
    "varied20": (HERE / "eval_varied20", ("lsa",)),
    "ruler21": (HERE / "eval_ruler21", ("lsa", "recent")),
    "ruler20": (OLD / "eval_r80_ruler", ("full", "lsa")),
}
VARIED = ("varied_seen", "varied_new_all", "varied_multikey", "varied_multivalue", "varied_vt", "varied_multiquery")
RULER = ("niah_single_2", "niah_multivalue", "niah_multiquery", "vt", "context_independent")
SEEN_KIND = {"varied_seen": "seen (single)", "varied_new_all": "held-out format, haystack, question (single)",
             "varied_multikey": "seen kind", "varied_multivalue": "seen kind", "varied_vt": "seen kind",
             "varied_multiquery": "**held-out kind**", "niah_single_2": "RULER wording (single)",
             "niah_multivalue": "RULER wording, seen kind", "niah_multiquery": "RULER wording, **held-out kind**",
             "vt": "RULER noise haystack (held out), seen kind", "context_independent": "no needle (limitation 1)"}


def read(path: Path) -> dict[tuple, dict]:
    plain = path / "runs.jsonl"
    text = plain.read_text() if plain.exists() else gzip.decompress((path / "runs.jsonl.gz").read_bytes()).decode()
    runs = {}
    for line in text.splitlines():
        r = json.loads(line)
        runs[(r["task"], r["length"], r["index"], r["mode"])] = r
    return runs


def cells(runs: dict, task: str, length: int, mode: str) -> list[dict]:
    return [r for (t, n, _, m), r in sorted(runs.items(), key=lambda kv: kv[0][2]) if (t, n, m) == (task, length, mode)]


def mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def main() -> None:
    data = {name: read(path) for name, (path, _) in SOURCES.items()}
    # the same prompt in every run compared
    for tasks, names in ((VARIED, ("varied21", "varied20")), (RULER, ("ruler21", "ruler20"))):
        for task in tasks:
            for length in (2048, 4096):
                digests = {name: [r["prompt_sha"] for m in SOURCES[name][1] for r in cells(data[name], task, length, m)]
                           for name in names}
                per_name = [sorted(set(d)) for d in digests.values() if d]
                assert all(p == per_name[0] for p in per_name), (task, length)
    print("| task | what is new to the indexer | length | n | full | lsa (kinds) | CSA-KV (kinds) | selected (kinds) | "
          "recent at its budget | lsa (single) | CSA-KV (single) | selected (single) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for tasks, new, old, full_from in ((VARIED, "varied21", "varied20", "varied21"), (RULER, "ruler21", "ruler20", "ruler20")):
        for task in tasks:
            for length in (2048, 4096):
                lsa = cells(data[new], task, length, "lsa")
                if not lsa:
                    continue
                full = cells(data[full_from], task, length, "full")
                recent = cells(data[new], task, length, "recent")
                old_lsa = cells(data[old], task, length, "lsa")

                def acc(rs):
                    return mean(100 * r["score"] for r in rs)

                def ratio(rs):
                    return mean(r["stats"]["csa_kv_ratio"] for r in rs)

                def sel(rs):
                    return mean(mean(r["stats"]["selected_per_trigger"]) or 0 for r in rs)

                entries = lsa[0]["stats"]["csa_entries"]
                print(f"| {task} | {SEEN_KIND[task]} | {length:,} | {len(lsa)} | {fmt(acc(full))} | {fmt(acc(lsa))} | "
                      f"{fmt(ratio(lsa), '.3f')} | {fmt(sel(lsa), '.0f')} / {entries} | {fmt(acc(recent))} | "
                      f"{fmt(acc(old_lsa))} | {fmt(ratio(old_lsa), '.3f')} | {fmt(sel(old_lsa), '.0f')} / {entries} |")


if __name__ == "__main__":
    main()
