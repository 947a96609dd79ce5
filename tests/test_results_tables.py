"""docs/RESULTS.md sections 7e-7i: their tables are what the tables.py beside their raw evaluate outputs computes
(7e's reads section 7d's outputs for the previous default's columns; 7f's and 7g's read 7e's)."""

import contextlib
import importlib.util
import io
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _section(text: str, heading: str) -> str:
    """From ``heading`` to the next section heading."""
    start = text.index(heading)
    return text[start:min([i for i in (text.find("\n### ", start + 1), text.find("\n## ", start + 1)) if i > 0],
                          default=len(text))]


def _results_section(heading: str) -> tuple[str, str, str]:
    """RESULTS.md's section ``heading``, the opening (before section 1) and the section with its bullets' line breaks
    joined (a quoted phrase found wherever the wrap falls)."""
    text = (REPO / "docs/RESULTS.md").read_text()
    section = _section(text, heading)
    return section, text[:text.index("## 1. Commands")], section.replace("\n  ", " ")


def _script(name: str, path: Path):
    """A result script (docs/results/.../*.py) loaded as a module."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _printed(main, *args) -> str:
    """What ``main(*args)`` prints."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(*args)
    return out.getvalue()


def _long_tables(monkeypatch, stored: str, *args: str) -> str:
    """docs/results/table_long_h200/tables.py's output on ``args`` (paths from the repository root, as the stored
    tables name them), checked byte for byte against its stored copy ``stored``."""
    module = _script("tables_long", REPO / "docs/results/table_long_h200/tables.py")
    monkeypatch.chdir(REPO)
    out = _printed(module.main, list(args))
    assert (REPO / stored).read_text() == out
    return out


def _variant_tables(monkeypatch, *cases: tuple[str, list[str]]) -> list[str]:
    """docs/results/table_long_h200/variant.py's output for each (stored, args) case (paths from the repository
    root, as the stored tables name them), checked byte for byte against its stored copy ``stored``; the outputs."""
    module = _script("variant_tables", REPO / "docs/results/table_long_h200/variant.py")
    monkeypatch.chdir(REPO)
    outs = []
    for stored, args in cases:
        outs.append(_printed(module.main, list(args)))
        assert outs[-1] == (REPO / stored).read_text(), stored
    return outs


def _stored_runs(path, key: tuple[str, ...], **where) -> dict:
    """The runs of a stored runs.jsonl or runs.jsonl.gz (``path`` from the repository root) whose fields equal
    ``where``, keyed by the tuple of their ``key`` fields."""
    import gzip
    import json

    path = REPO / path
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt") as f:
        return {tuple(r[k] for k in key): r for r in map(json.loads, f) if all(r[k] == v for k, v in where.items())}


def _cells(out: str, prefix: str) -> list[str]:
    """The cells of the one line of ``out`` that starts with ``prefix``."""
    (line,) = [x for x in out.splitlines() if x.startswith(prefix)]
    return [c.strip() for c in line.strip("|").split("|")]


def _above_below(a: dict, b: dict) -> tuple[int, int]:
    """How many of ``a``'s prompts score above and below the same prompt in ``b`` (runs keyed by prompt)."""
    return sum(a[k]["score"] > b[k]["score"] for k in a), sum(a[k]["score"] < b[k]["score"] for k in a)


def _neighbours_rows_quoted(outs: dict, section: str, rows) -> None:
    """Sections 11t/11u: each (label, variant table, line prefix, versus-pages table or None) as the section's row
    (label, length, n, accuracy, minus full, minus LSA, minus page recall, the footprints and entries of the variant);
    an empty label continues the row above."""
    for label, stem, prefix, pages in rows:
        c = _cells(outs[f"{stem}_variant.md"], prefix)
        vs_pages = "-" if pages is None else " ".join(_cells(outs[f"{pages}.md"], prefix)[6:8])
        row = (f"| {label} | {c[0]} | {c[1]} | {c[2]} | {c[4]} {c[5]} | {c[6]} {c[7]} | {vs_pages} "
               f"| {c[8].split(' / ')[0]} | {c[9].split(' / ')[0]} | {c[10].split(' / ')[0]} |")
        assert (row if label else row.replace("|  |", "| |", 1)) in section, row


def _rows_quoted(out: str, section: str, prefixes: tuple[str, ...], count: int) -> list[str]:
    """The ``count`` lines of ``out`` that start with one of ``prefixes``, each found verbatim in ``section``."""
    rows = [line for line in out.splitlines() if line.startswith(prefixes)]
    assert len(rows) == count
    for line in rows:
        assert line in section, line
    return rows


def _ties_row(label: str, score: dict, release: dict, full: dict) -> str:
    """A page-ties table row (sections 11n, 11o) from runs keyed by prompt: n, full / release ties / score ties
    accuracy, score minus release and minus full with their intervals, texts equal to the release's; the three sides
    must hold the same prompts."""
    from fm_eval.intervals import format_interval, paired_summary
    from fm_eval.report import summarize

    keys = sorted(score)
    assert sorted(release) == keys and all(k in full for k in keys)
    assert all(score[k]["prompt_sha"] == release[k]["prompt_sha"] == full[k]["prompt_sha"] for k in keys)
    s, rl, fl = ([d[k] for k in keys] for d in (score, release, full))
    vr, vf = paired_summary(s, rl), paired_summary(s, fl)
    acc = [f"{summarize(x)['modes'][0]['accuracy']:.1f}" for x in (fl, rl, s)]
    same = sum(score[k]["prediction"] == release[k]["prediction"] for k in keys)
    return (f"| {label} | {len(keys)} | {' | '.join(acc)} | {vr['difference']:+.1f} | "
            f"{format_interval(vr['interval'])} | {vf['difference']:+.1f} | {format_interval(vf['interval'])} "
            f"| {same} |")


@pytest.mark.parametrize("heading,folder,rows", [
    ("### 7e.", "varied_kinds_l6_cpu", 2 + 16 + 2 + 2),  # per task and length; pooled
    ("### 7f.", "recall_targets_l6_cpu", 2 + 16 + 2 + 2 + 2 + 3),  # ...; variable tracking with longer tails
    ("### 7g.", "retrigger_l6_cpu", 2 + 3 + 2 + 16 + 2 + 2),  # vt with more triggers; trained at tau 16; pooled
    ("### 7h.", "data_scaling_l6_cpu", 2 + 16 + 2 + 2),  # per task and length; pooled
    ("### 7i.", "label_votes_l6_cpu", 3 * (2 + 16 + 2 + 2)),  # 7h's tables for each of three exports
])
def test_section_tables_are_the_raw_outputs(heading, folder, rows):
    module = _script(f"tables_{folder}", REPO / "docs/results" / folder / "tables.py")
    out = _printed(module.main)  # asserts the same prompt digests across the compared runs
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    section = _section((REPO / "docs/RESULTS.md").read_text(), heading)
    assert len(lines) == rows
    for line in lines:
        assert line in section, line
    assert (REPO / "docs/results" / folder / "tables.md").read_text() == out


def test_readme_pipeline_figures_are_the_raw_outputs():
    """README's `fm-index pipeline` section on the default: its decoding table is the stored evaluation's average rows
    and CSA-KV ratios, its label and memory-indexer figures those of the stored manifest and run output."""
    import json
    import re

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### `fm-index pipeline`"):readme.index("## Using the real DeepSeek-V4-Flash")]
    raw = REPO / "docs/results/pipeline_l6i_cpu"
    assert "`docs/results/pipeline_l6i_cpu/`" in section
    evaluation = (raw / "evaluation.md").read_text()
    average = dict(re.findall(r"^\| \*\*average\*\* \| ([\d,]+) \| (.+) \|$", evaluation, flags=re.M))
    ratio = {(m, n): r for m, n, r in re.findall(r"^\| (\w+) \| ([\d,]+) \| [\d.]+ \| ([\d.]+) \|", evaluation,
                                                  flags=re.M)}
    for i, mode in enumerate(("full", "lsa", "recent")):
        acc = [average[n].split(" | ")[i].strip("*") for n in ("1,024", "2,048")]
        label = "recent (same budget)" if mode == "recent" else mode
        row = f"| {label} | {acc[0]}% | {acc[1]}% | {ratio[(mode, '1,024')]} / {ratio[(mode, '2,048')]} |"
        assert row in section, row
    manifest = json.loads((raw / "labels_manifest.json").read_text())
    assert manifest["backbone"]["index_keys_sha256"]  # made on the weights that carry a key digest (L6i)
    stdout = (raw / "pipeline_stdout.txt").read_text()
    golden = re.search(r"after the vote \(golden\) +│ +([\d.]+)", stdout).group(1)
    visible = re.search(r"visible entries per trigger +│ +([\d.]+)", stdout).group(1)
    assert f"Labels: {golden}\ngolden of {visible} visible entries" in section
    f1 = {name: re.search(rf"│ {name} +│ +[\d.]+ │ +[\d.]+ │ ([\d.]+) │ +([\d.]+) │ +[\d.]+ │ +([\d.]+) │",
                          stdout).groups() for name in ("union", "recency", "chance")}
    assert (f"union F1 {f1['union'][0]} against recency's {f1['recency'][0]} and chance's {f1['chance'][0]} at the "
            f"same retrieval ratio\n({f1['union'][1]}), ranking AUC {f1['union'][2]} / {f1['recency'][2]} / 0.5") \
        in section


def test_section9_l6i_label_figures_are_the_raw_outputs():
    """RESULTS section 9's labels built again on L6i: its table rows are the stored manifest's counts and the
    memory indexer's held-out rows those of the call's log (the run's own table, rounded as printed there)."""
    import json
    import re

    raw = REPO / "docs/results/labels_long_h200/run2_l6i"
    section = _section((REPO / "docs/RESULTS.md").read_text(), "## 9.")
    manifest = json.loads((raw / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["documents"] == 336 and manifest["params"]["nucleus"] == 0.6 and manifest["params"]["min_votes"] == 3
    assert manifest["backbone"]["index_keys_sha256"][:8] in section

    def share(key):  # "mean (percent of the visible entries)", as the table prints it
        digits = 2 if key == "positives_mean" else 1
        return f"{counts[key]:,.1f} ({100 * counts[key] / counts['visible_mean']:.{digits}f}%)"

    assert f"| {counts['visible_mean']:,.1f} |" in section
    for key in ("native_topk_mean", "candidates_mean"):
        assert re.search(rf"\| {re.escape(share(key))} \|$", section, flags=re.M), key
    assert f"**{share('positives_mean')}** |" in section
    log = (raw / "log_call2.txt").read_text()
    cell = r" +│ +([\d.]+)"
    labels = {"union": "memory indexer, union of layers 2, 4, 6 at threshold 0.5",
              "recency": "recency at the same ratio", "chance": "chance at the same ratio"}
    for name, label in labels.items():  # the first row of each name: threshold 0.5 / the same retrieval ratio
        p, r, f1, _, _, auc = re.search(rf"│ {name}{cell * 6} │", log).groups()
        auc = f"**{auc}**" if name == "union" else auc
        assert f"| {label} | {p} | {r} | {f1} | {auc} |" in section, name
    top = {"union": "memory indexer, its top-\\|G\\|", "recency": "recency, top-\\|G\\|",
           "chance": "chance, top-\\|G\\|"}
    for name, label in top.items():  # the rows "NAME top-|G|" (the name's row wraps onto "top-|G|")
        p, r, f1 = re.search(rf"│ {name}{cell * 3}.*\n│ top-\|G\|", log).groups()
        f1 = f"**{f1}**" if name == "union" else f1
        assert f"| {label} | {p} | {r} | {f1} | - |" in section, name


def test_section10_release_rule_rows_are_the_runs():
    """RESULTS section 10's first table: each row's n, accuracy, paired difference with its interval and footprint,
    recomputed from the stored runs of the cut evaluation (fm_eval.report.summarize, as tables.py does)."""
    import gzip
    import json

    from fm_eval.report import summarize

    raw = REPO / "docs/results/table_long_h200/run1_release_rule/runs.jsonl.gz"
    runs = [json.loads(line) for line in gzip.decompress(raw.read_bytes()).decode().splitlines() if line]
    section = _section((REPO / "docs/RESULTS.md").read_text(), "## 10.")
    rows = {(r["mode"], r["length"]): r for r in summarize(runs)["modes"]}
    assert set(rows) == {("full", 32768), ("lsa", 32768), ("full", 65536)}
    for (mode, length), r in rows.items():
        n = sum(1 for x in runs if x["mode"] == mode and x["length"] == length)
        acc = r["accuracy"]  # the mean over tasks of each task's mean (the report's)
        lo, hi = r["accuracy_interval"]
        label = "lsa (threshold 0.316)" if mode == "lsa" else mode
        cells = f"| {length:,} | {label} | {n} | {acc:.1f} | [{lo:.1f}, {hi:.1f}] |"
        assert cells in section, cells
        if mode == "lsa":
            d = r["vs_full"]
            assert f"| {d['difference']:.1f} | [{d['interval'][0]:.1f}, {d['interval'][1]:.1f}] |" in section


def test_long_table_is_the_raw_outputs(monkeypatch):
    """The table RESULTS.md opens with and section 11's per-task table: what tables.py computes from the stored
    runs of the three evaluations (byte for byte its stored tables.md); the reproduction claim of section 11: call 1's
    LSA answers equal the table's on all 80 prompts at 32K, full's on 77; the oracle's and LSA's paired difference at
    64K that the opening states."""

    raw = "docs/results/table_long_h200/run2_fetch_top64"
    module = _script("tables_long", REPO / "docs/results/table_long_h200/tables.py")
    monkeypatch.chdir(REPO)  # tables.md names the directories as given
    out = _printed(module.main, [f"{raw}/eval_16k", f"{raw}/eval_32k", f"{raw}/eval_64k"])
    assert (REPO / raw / "tables.md").read_text() == out
    text = (REPO / "docs/RESULTS.md").read_text()
    opening, section = _section(text, "## The long table"), _section(text, "## 11.")
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(lines) == 2 + 15 + 2 + 12  # modes x lengths that ran; tasks x lengths
    for line in lines[:17]:
        assert line in opening, line
    for line in lines[17:]:
        assert line in section, line
    assert "within 1 point of full **met**" in out and "within 1 point of full **not met**" in out
    assert "- 65,536: +15.4 points [8.3, 22.9] over 80 pairs" in out
    assert "**15.4 [8.3, 22.9] above LSA** on the same 80 prompts" in opening

    key = ("task", "length", "index", "mode")
    first, final = (_stored_runs(f"{raw}/{name}", key) for name in ("call1_32k_full_lsa_runs.jsonl.gz",
                                                                     "eval_32k/runs.jsonl.gz"))
    same = {m: sum(first[k]["prediction"] == final[k]["prediction"] for k in first if k[3] == m) for m in ("full", "lsa")}
    assert same == {"full": 77, "lsa": 80}


def test_short_end_table_is_the_raw_outputs(monkeypatch):
    """Section 11's 2K-4K table (the same export and floor, CPU): tables.py's output on the stored runs."""
    raw = "docs/results/short_end_top64_cpu"
    out = _long_tables(monkeypatch, f"{raw}/tables.md", raw)
    _rows_quoted(out, _section((REPO / "docs/RESULTS.md").read_text(), "## 11."), ("| 2,048 |", "| 4,096 |"), 6)


def test_limitations_table_is_the_raw_outputs():
    """Section 11's limitations table: its script's output on the stored runs, row for row in the section."""
    raw = REPO / "docs/results/limits_16k_cpu"
    module = _script("tables_limits", raw / "tables.py")
    out = _printed(module.main, [str(raw)])
    assert (raw / "tables.md").read_text() == out
    section = _section((REPO / "docs/RESULTS.md").read_text(), "## 11.")
    lines = out.splitlines()
    assert len(lines) == 2 + 6
    for line in lines:
        assert line in section, line
    # the release's rule alone (no floor) on the context-independent prompts
    out = _printed(module.main, [str(raw / "release_rule")])
    assert (raw / "release_rule/tables.md").read_text() == out
    (row,) = [line for line in out.splitlines() if line.startswith("| context_independent")]
    assert f"  {row}" in section


def test_oracle_sets_follow_the_runtime_oracle_and_their_stored_table():
    """docs/results/table_long_h200/oracle_sets.py recomputes the oracle's resident set from stored picks: the same
    set as lsa_runtime's OraclePolicy on random picks; its table on the stored sets is its stored oracle_sets.md,
    whose rows RESULTS section 11 quotes."""
    import torch

    from lsa_runtime.policies import OraclePolicy, TriggerState

    module = _script("oracle_sets", REPO / "docs/results/table_long_h200/oracle_sets.py")
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n_visible, tau, budget, t0 = 300, 16, int(torch.randint(1, 120, (1,), generator=g)), 1199
        picks = {t: torch.randint(0, n_visible + 8, (int(torch.randint(0, 40, (1,), generator=g)),), generator=g)
                 for t in range(t0 - 4, t0 + tau + 6) if torch.rand(1, generator=g) < 0.8}
        state = TriggerState(position=t0, n_visible=n_visible, trigger_index=0, resident=torch.zeros(0))
        expected = sorted(OraclePolicy(picks, tau, budget).select(state).tolist())
        got, counts, union = module.oracle_set(picks, t0 + 1, tau, n_visible, budget)
        assert got.tolist() == expected, trial
        window = torch.cat([picks[t] for t in range(t0 + 1, t0 + 1 + tau) if t in picks])
        assert union == len({int(s) for s in window if s < n_visible})
        assert counts.tolist() == [int((window == s).sum()) for s in got]
    raw = REPO / "docs/results/table_long_h200/run2_fetch_top64"
    out = _printed(module.main, ["--sets", str(raw / "oracle_sets.jsonl.gz")])
    assert (raw / "oracle_sets.md").read_text() == out
    section = _section((REPO / "docs/RESULTS.md").read_text(), "## 11.")
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(rows) == 2 + 8
    for line in rows:
        assert line in section, line


def test_needle_fetch_at_64k_claims_are_the_raw_outputs():
    """Section 11's account of LSA's 64K losses: what the stored needle_fetch runs and oracle sets give (the needle
    resident, LSA's overlap with the oracle's set, the chains' entries held)."""
    import gzip
    import json

    raw = REPO / "docs/results/needle_fetch_cpu"
    sets = {(r["task"], r["index"]): r for r in map(json.loads, gzip.open(
        REPO / "docs/results/table_long_h200/run2_fetch_top64/oracle_sets.jsonl.gz", "rt")) if r["length"] == 65536}

    def rows(name):
        return [json.loads(line) for line in (raw / name).read_text().splitlines() if line]

    single = {r["index"]: r for r in rows("single_64k_seed0_top64.jsonl")
              + rows("single_64k_seed0_top64_i0_fetch.jsonl")}
    assert sorted(single) == [0, 1, 4]
    for i, r in single.items():
        oracle = sets[("niah_single_1", i)]
        assert r["prompt_sha"] == oracle["prompt_sha"]  # the device's very prompt
        assert r["fetch"]["needle_resident"] and r["fetch"]["layers"]["4"]["needle_rank"] == 1
        assert 0.42 <= r["fetch"]["layers"]["4"]["needle_score"] <= 0.46
        assert oracle["scores"]["lsa"] == 0.0 and oracle["scores"]["oracle"] == 1.0
        assert 33 <= len(set(r["fetch"]["resident"]) & set(oracle["oracle"])) <= 36 and len(oracle["oracle"]) == 331
    assert [single[i]["fetch"]["text"].split(".")[0].strip() for i in (0, 1, 4)] == ["4906140", "4790655", "7574355"]
    assert set(range(869, 875)) <= set(sets[("niah_single_1", 1)]["oracle"])
    assert set(range(869, 875)) & set(single[1]["fetch"]["resident"]) == {872, 873}
    chains = {r["index"]: r for r in rows("vt_64k_seed0_top64_fetch.jsonl")}
    held = {i: (len(set(r["needle"]) & set(r["fetch"]["resident"])), len(r["needle"])) for i, r in chains.items()}
    assert held == {2: (10, 18), 3: (8, 15)}
    assert all(set(r["needle"]) <= set(sets[("vt", i)]["oracle"]) for i, r in chains.items())


def test_rebuilt_export_is_the_tables_and_in_git(tmp_path):
    """Section 11b: the export rebuilt in the nineteenth session has the table's weights byte for byte (the table's
    evaluations name their indexer by fm_eval's digest over the export's files; the table's lsa_config.json with the
    rebuilt weights gives that digest), its config differs from the table's only by the fetch_top key (0, the old
    default), and LSA with it at 64K answered all 80 prompts as the table's LSA did."""
    import gzip
    import json
    import shutil

    from fm_eval.runner import indexer_digest

    export = REPO / "docs/results/labels_long_h200/run4_l6i_rebuild/export"
    raw = REPO / "docs/results/table_long_h200"
    table_config = raw / "run2_fetch_top64/export_lsa_config.json"
    shutil.copy(export / "model.safetensors", tmp_path / "model.safetensors")
    shutil.copy(table_config, tmp_path / "lsa_config.json")
    table_digest = json.loads((raw / "run2_fetch_top64/eval_64k/config.json").read_text())["identity"]["indexer_sha256"]
    assert indexer_digest(tmp_path) == table_digest
    old, new = json.loads(table_config.read_text()), json.loads((export / "lsa_config.json").read_text())
    assert new.pop("fetch_top") == 0 and new == old
    recheck = json.loads((raw / "run3_pages/recheck_64k_lsa/config.json").read_text())["identity"]["indexer_sha256"]
    assert recheck == indexer_digest(export)

    def lsa(path):
        return {(r["task"], r["index"]): r for r in map(json.loads, gzip.open(path, "rt")) if r["mode"] == "lsa"}

    table = lsa(raw / "run2_fetch_top64/eval_64k/runs.jsonl.gz")
    again = lsa(raw / "run3_pages/recheck_64k_lsa/runs.jsonl.gz")
    assert len(again) == 80 and again.keys() == table.keys()
    assert all(again[k]["prediction"] == table[k]["prediction"] for k in again)
    assert all(again[k]["selected_per_trigger"] == table[k]["selected_per_trigger"] for k in again)
    labels = REPO / "docs/results/labels_long_h200"
    before, after = (json.loads((labels / d / "train_state.json").read_text())
                     for d in ("run3_l6i", "run4_l6i_rebuild"))
    for state in (before, after):
        for entry in state["eval_history"]:
            entry.pop("eval_runtime", None)
    assert before == after


def test_page_recall_tables_are_the_raw_outputs(monkeypatch):
    """Section 11b and the opening's page-recall rows: variant.py's output on the stored runs (byte for byte its
    stored variant_*.md), every row quoted in section 11b, the opening's figures among them."""
    module = _script("variant", REPO / "docs/results/table_long_h200/variant.py")
    monkeypatch.chdir(REPO)
    raw = "docs/results/table_long_h200"
    text = (REPO / "docs/RESULTS.md").read_text()
    section, opening = _section(text, "## 11b."), _section(text, "## The long table")
    for length in ("32k", "64k"):
        out = _printed(module.main, [f"{raw}/run3_pages/eval_{length}_pages",
                                     f"{raw}/run2_fetch_top64/eval_{length}", "--name", "pages"])
        assert (REPO / raw / f"run3_pages/variant_{length}.md").read_text() == out
        rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line
                and not line.startswith(("| length", "| task"))]
        assert len(rows) == 1 + 4
        for line in rows:
            assert line in section, line
        cells = [c.strip() for c in rows[0].strip("|").split("|")]
        assert f"| lsa + pages | 80 | {cells[2]} | {cells[3]} | {cells[4]} | {cells[5]} | {cells[6]} | {cells[7]} " \
               f"| {cells[8].split(' / ')[0]} | {cells[9].split(' / ')[0]} | {cells[10].split(' / ')[0]} |" in opening


def test_page_recall_at_16k_cpu_claims_are_the_raw_outputs(monkeypatch):
    """Section 11b's 16K bullet: variant.py on the stored CPU runs against the device's table (its stored
    variant_16k.md, its row in the section), and the figures the bullet states: pages and LSA on the CPU level
    (paired), pages above LSA on one chain and below on one, the CPU's LSA against the device's."""
    import json

    from fm_eval.intervals import format_interval, paired_summary

    module = _script("variant16", REPO / "docs/results/table_long_h200/variant.py")
    monkeypatch.chdir(REPO)
    raw = "docs/results/pages_16k_cpu"
    out = _printed(module.main, [f"{raw}/pages", "docs/results/table_long_h200/run2_fetch_top64/eval_16k",
                                 "--name", "pages"])
    assert (REPO / raw / "variant_16k.md").read_text() == out
    assert "| 16,384 | 40 | 88.0 | [84.0, 91.5] | -2.0 | [-4.5, 0.0] | -0.5 | [-2.0, 1.0] | 0.191 / 0.080 |" \
        in out

    pages, lsa = (_stored_runs(f"{raw}/{d}/runs.jsonl.gz", ("task", "index")) for d in ("pages", "lsa"))
    device = _stored_runs("docs/results/table_long_h200/run2_fetch_top64/eval_16k/runs.jsonl.gz", ("task", "index"),
                          mode="lsa")
    assert len(pages) == len(lsa) == 40 and all(r["mode"] == "lsa" for r in [*pages.values(), *lsa.values()])
    vs = paired_summary(list(pages.values()), list(lsa.values()))
    assert round(vs["difference"], 1) == 0.0 and format_interval(vs["interval"]) == "[-1.5, 1.5]"
    assert sum(100 * r["score"] for r in lsa.values()) / 40 == pytest.approx(88.0)
    assert sum(pages[k]["score"] > lsa[k]["score"] for k in pages) == 1
    assert sum(pages[k]["score"] < lsa[k]["score"] for k in pages) == 1
    assert sum(lsa[k]["prediction"] == device[k]["prediction"] for k in lsa) == 37
    assert sum(lsa[k]["score"] == device[k]["score"] for k in lsa) == 39
    config = json.loads((REPO / raw / "pages/config.json").read_text())["fingerprint"]
    assert (config["page_size"], config["max_pages"]) == (8, 96)
    assert "page_size" not in json.loads((REPO / raw / "lsa/config.json").read_text())["fingerprint"]


def test_held_out_formats_at_16k_table_is_the_raw_outputs(monkeypatch):
    """Section 11c: tables.py's output on the stored CPU runs of the seen and all-held-out varied prompts at 16K
    (byte for byte its stored tables.md), every row in the section; recency's hits and budget as the section says."""
    import gzip
    import json

    raw = "docs/results/varied_16k_cpu"
    out = _long_tables(monkeypatch, f"{raw}/tables.md", raw)
    section = _section((REPO / "docs/RESULTS.md").read_text(), "## 11c.")
    _rows_quoted(out, section, ("| 16,384 |", "| varied_"), 3 + 2)
    with gzip.open(REPO / raw / "runs.jsonl.gz", "rt") as f:
        runs = [json.loads(line) for line in f]
    recent = [r for r in runs if r["mode"] == "recent"]
    hits = {t: sum(r["score"] for r in recent if r["task"] == t) for t in ("varied_seen", "varied_new_all")}
    assert len(recent) == 40 and hits == {"varied_seen": 2, "varied_new_all": 2}
    assert "answers 10.0% on both (2 of 20 each; paired -90.0 [-97.5, -80.0] against LSA)" in section
    for task, budget in {"varied_seen": 350, "varied_new_all": 315}.items():  # LSA's mean resident count per task
        selected = [r["selected_mean"] for r in runs if r["mode"] == "lsa" and r["task"] == task]
        assert round(sum(selected) / len(selected)) == budget
        assert {r["budget"] for r in recent if r["task"] == task} == {budget}
    assert "350 entries on the seen prompts, 315 on the held-out ones" in section


def test_section11d_controls_seed1_and_128k_are_the_raw_outputs(monkeypatch):
    """Section 11d: tables.py on the stored runs (byte for byte its stored tables: the controls at page recall's
    budget, seed 1, the table's prompts on the same two tasks), its rows and goal lines in the section, the seed
    table's figures, the copied lsa runs equal to section 11b's, and the 128K runs as the section states them."""

    raw = "docs/results/table_long_h200/run4_controls_seed1"
    text = (REPO / "docs/RESULTS.md").read_text()
    section, opening = _section(text, "## 11d."), _section(text, "## The long table")
    out = _long_tables(monkeypatch, f"{raw}/controls_tables.md", f"{raw}/eval_32k_pages", f"{raw}/eval_64k_pages")
    _rows_quoted(out, section, ("| 32,768 |", "| 65,536 |"), 6)
    controls = _rows_quoted(out, section, ("- 32,768: recent", "- 32,768: random", "- 65,536: recent",
                                           "- 65,536: random"), 4)
    assert all("at LSA's budget" in line and "**yes**" in line for line in controls)
    for length, (recent, random) in {"32,768": ("-63.0", "-72.9"), "65,536": ("-55.6", "-59.1")}.items():
        assert f"- {length}: recent at LSA's budget {recent} points" in out
        assert f"- {length}: random at LSA's budget {random} points" in out
    assert "recent -63.0 / -55.6 and random -72.9 / -59.1 points" in opening

    def runs(path):
        return _stored_runs(path, ("task", "length", "index", "mode"))

    for length in ("32k", "64k"):  # the lsa runs (pages) copied in by FROM= are section 11b's, unchanged
        new = {k: r for k, r in runs(f"{raw}/eval_{length}_pages/runs.jsonl.gz").items() if k[3] == "lsa"}
        old = runs(f"docs/results/table_long_h200/run3_pages/eval_{length}_pages/runs.jsonl.gz")
        assert len(new) == 80 and {k: (r["prediction"], r["score"]) for k, r in new.items()} == \
            {k: (r["prediction"], r["score"]) for k, r in old.items()}

    seed1 = _long_tables(monkeypatch, f"{raw}/seed1_tables.md", f"{raw}/seed1_64k")
    seed0 = _long_tables(monkeypatch, f"{raw}/seed0_single_vt_tables.md",
                         "docs/results/table_long_h200/run2_fetch_top64/eval_64k", "--tasks", "niah_single_1,vt")

    def cells(table, mode):
        (line,) = [x for x in table.splitlines() if x.startswith(f"| 65,536 | {mode} |")]
        return [c.strip() for c in line.strip("|").split("|")]

    pages = runs("docs/results/table_long_h200/run3_pages/eval_64k_pages/runs.jsonl.gz")
    per_task = [[r["score"] for k, r in pages.items() if k[0] == task] for task in ("niah_single_1", "vt")]
    assert [len(scores) for scores in per_task] == [20, 20]
    pages_mean = 100 * sum(sum(scores) / 20 for scores in per_task) / 2
    for name, table, tail in (("the table's (seed 0)", seed0, f"{pages_mean:.1f} | {cells(seed0, 'oracle')[3]} |"),
                              ("others (seed 1)", seed1, "not run | not run |")):
        full, lsa = cells(table, "full"), cells(table, "lsa")
        row = f"| {name} | 40 | {full[3]} | {lsa[3]} | {lsa[5]} | {lsa[6]} | {lsa[7]} | {tail}"
        assert row in section, row
    assert "-11.0 [-19.5, -4.0]" in opening

    s1 = runs(f"{raw}/seed1_64k/runs.jsonl.gz")
    lost = {s1[k]["answers"][0]: s1[k]["prediction"] for k in s1 if k[0] == "niah_single_1" and k[3] == "lsa"
            and s1[k]["score"] < s1[(k[0], k[1], k[2], "full")]["score"]}
    assert len(lost) == 2 and lost["9058602"].startswith(" 905863.") and lost["2989999"].startswith(" 2980116.")
    vt = [(s1[("vt", 65536, i, "lsa")]["score"], s1[("vt", 65536, i, "full")]["score"]) for i in range(20)]
    assert sum(a < b for a, b in vt) == 8 and sum(a > b for a, b in vt) == 1

    partial = list(runs(f"{raw}/e128k_partial/runs.jsonl.gz").values())
    assert len(partial) == 5 and {r["mode"] for r in partial} == {"full"}
    single = [r for r in partial if r["task"] == "niah_single_1"]
    assert len(single) == 3 and sum(r["score"] for r in single) == 1
    assert sorted(r["score"] for r in partial if r["task"] == "vt") == [0.2, 0.4]
    assert all(16 < r["stats"]["prefill_seconds"] < 22 for r in partial)
    near = {r["answers"][0]: r["prediction"] for r in single if r["score"] == 0}
    assert near["5228897"].startswith(" 5228816") and near["6449153"].startswith(" 2850816")


def test_held_out_axes_at_16k_table_is_the_raw_outputs(monkeypatch):
    """Section 11c's second table (one held-out axis at a time): tables.py's output on the stored CPU runs (byte for
    byte its stored tables.md), every row in the section, and the one prompt full missed that LSA answered."""
    import gzip
    import json

    raw = "docs/results/varied_axes_16k_cpu"
    out = _long_tables(monkeypatch, f"{raw}/tables.md", raw)
    _rows_quoted(out, _section((REPO / "docs/RESULTS.md").read_text(), "## 11c."), ("| 16,384 |", "| varied_"), 2 + 3)
    with gzip.open(REPO / raw / "runs.jsonl.gz", "rt") as f:
        runs = {(r["task"], r["index"], r["mode"]): r["score"] for r in map(json.loads, f)}
    differ = [k[:2] for k in runs if k[2] == "lsa" and runs[k] != runs[(k[0], k[1], "full")]]
    assert len(runs) == 120 and len(differ) == 1 and differ[0][0] == "varied_new_haystack"
    assert runs[(*differ[0], "lsa")] == 1.0 and runs[(*differ[0], "full")] == 0.0


def test_long_tables_reads_a_repeated_run_once_and_refuses_a_different_one(tmp_path):
    """tables.py's load_runs: a run decoded again in a second directory (the same prompt, the same answer) is read
    once and counted; the same run with another answer in two directories stops it (one of them cannot be the
    table's)."""
    import json

    module = _script("tables_long", REPO / "docs/results/table_long_h200/tables.py")
    config = {"config": {"tasks": ["niah_single_1"], "lengths": [1024], "samples": 1, "modes": ["lsa"], "seed": 0}}
    run = {"task": "niah_single_1", "length": 1024, "index": 0, "mode": "lsa", "prompt_sha": "ab", "prediction": " 1",
           "answers": ["1"], "score": 1.0, "stats": {}}
    for name, prediction in (("a", " 1"), ("b", " 1"), ("c", " 2")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        (tmp_path / name / "runs.jsonl").write_text(json.dumps({**run, "prediction": prediction}) + "\n")
    runs, configs = module.load_runs([tmp_path / "a", tmp_path / "b"])
    assert len(runs) == 1 and [c["repeated"] for c in configs] == [0, 1]
    with pytest.raises(SystemExit, match="different prompts or answers"):
        module.load_runs([tmp_path / "a", tmp_path / "c"])


def test_section11e_pages_heldout_limits_hisparse_128k_are_the_raw_outputs(monkeypatch):
    """Section 11e: tables.py / variant.py on the stored runs (byte for byte their stored tables), every row the
    section and the opening quote, the compact tables' cells recomputed from those outputs or the runs, and the
    section's claims about the runs: hisparse's lsa runs equal the table's, its answers equal full's text on 70 of
    80; LSA's lost prompts at 32K are the near copies it names; the 128K runs as counted."""

    raw = "docs/results/table_long_h200/run5_heldout_limits"
    base = "docs/results/table_long_h200/run2_fetch_top64"
    text = (REPO / "docs/RESULTS.md").read_text()
    section, opening = _section(text, "## 11e."), _section(text, "## The long table")

    def runs(path):
        return _stored_runs(path, ("task", "length", "index", "mode"))

    row = _cells

    # page recall on seed 1, and seed 1's oracle
    variant = _script("variant_long", REPO / "docs/results/table_long_h200/variant.py")
    monkeypatch.chdir(REPO)
    pages = _printed(variant.main, [f"{raw}/seed1_64k_pages", f"{raw}/seed1_64k", "--name", "page recall"])
    assert (REPO / raw / "seed1_pages_tables.md").read_text() == pages
    _rows_quoted(pages, section, ("| 65,536 |",), 1)
    assert "| 65,536 | 40 | 68.5 | [57.5, 78.5] | -1.5 | [-7.5, 3.0] | +9.5 | [4.5, 16.0] |" in pages
    seed1 = _long_tables(monkeypatch, f"{raw}/seed1_tables.md", f"{raw}/seed1_64k")
    _rows_quoted(seed1, section, ("| 65,536 | oracle |",), 1)
    assert "- 65,536: +18.0 points [8.5, 28.5] over 40 pairs" in seed1 and "18.0 above LSA [8.5, 28.5]" in section
    flat = opening.replace("\n", " ")
    assert "page recall is 1.5 points under full [-7.5, 3.0] and 9.5 above LSA [4.5, 16.0]" in flat

    # held-out formats at 32K and 64K: the compact table's cells from tables.py's rows
    for name, task in (("seen", "varied_seen"), ("held out", "varied_new_all")):
        stored = "held_out" if task == "varied_new_all" else "seen"
        out = _long_tables(monkeypatch, f"{raw}/varied_{stored}_tables.md", f"{raw}/varied_32k", f"{raw}/varied_64k",
                           "--tasks", task)
        for length in ("32,768", "65,536"):
            full, lsa, recent = (row(out, f"| {length} | {m} |") for m in ("full", "lsa", "recent"))
            line = (f"| {name} | {length} | {full[3]} | {lsa[3]} | {lsa[5]} | {lsa[6]} | {recent[3]} | {lsa[7]} "
                    f"| {lsa[8]} |")
            assert line in section, line
    v = runs(f"{raw}/varied_32k/runs.jsonl.gz")
    lost = {v[k]["answers"][0]: v[k]["prediction"].split(".")[0].strip() for k in v
            if k[3] == "lsa" and v[k]["score"] < v[(*k[:3], "full")]["score"]}
    assert lost == {"6078732": "6078733", "1565002": "1565166", "7719179": "7719176"}
    for length, counts in (("32k", {"varied_seen": (0, 1), "varied_new_all": (0, 2)}),
                           ("64k", {"varied_seen": (1, 0), "varied_new_all": (2, 0)})):
        v = runs(f"{raw}/varied_{length}/runs.jsonl.gz")
        for task, (better, worse) in counts.items():  # LSA against full, prompt by prompt
            pairs = [(v[(task, k[1], k[2], "lsa")]["score"], v[(task, k[1], k[2], "full")]["score"]) for k in v
                     if k[0] == task and k[3] == "full"]
            assert (sum(a > b for a, b in pairs), sum(a < b for a, b in pairs)) == (better, worse), (length, task)
    assert "LSA answers 1 and 2\n  prompts more than full (seen / held out), none fewer" in section

    # the limitations at 32K: per-task footprints from the runs
    limits = _long_tables(monkeypatch, f"{raw}/limits_tables.md", f"{raw}/limits_32k")
    assert "- 32,768: LSA's CSA-KV ratio 0.682 (goal <= 0.15): **not met**" in limits
    lim = runs(f"{raw}/limits_32k/runs.jsonl.gz")
    for task in ("cwe", "fwe", "context_independent"):
        lsa = [r for k, r in lim.items() if k[0] == task and k[3] == "lsa"]
        full = [r for k, r in lim.items() if k[0] == task and k[3] == "full"]
        assert len(lsa) == len(full) == 20 and not any(r["score"] for r in lsa + full)
        csa = sum(r["stats"]["resident_entries"] / r["stats"]["csa_entries"] for r in lsa) / 20
        total = sum(r["stats"]["footprint_ratio"] for r in lsa) / 20
        resident = sum(r["stats"]["resident_entries"] for r in lsa) / 20
        line = f"| {task} | 32,768 | 0.0 | 0.0 | {csa:.3f} | {total:.3f} | {resident:,.1f} |"
        assert line in section, line

    # hisparse at 32K, joined with the table (the opening's table is this output)
    table = _long_tables(monkeypatch, f"{raw}/table_tables.md", f"{base}/eval_16k", f"{base}/eval_32k",
                         f"{raw}/hisparse_32k", f"{base}/eval_64k")
    _rows_quoted(table, opening, ("| 16,384 |", "| 32,768 |", "| 65,536 |"), 16)  # modes x lengths that ran
    _rows_quoted(table, section, ("| 32,768 | hisparse |", "| niah_multikey_1 | 32,768 |",
                                  "| niah_multivalue | 32,768 |", "| niah_single_1 | 32,768 |", "| vt | 32,768 |"), 5)
    assert "80 runs equal to an earlier directory's, read once" in table
    assert "- 32,768: -3.1 points [-7.6, 0.9] over 80 pairs" in table
    hs, table32 = runs(f"{raw}/hisparse_32k/runs.jsonl.gz"), runs(f"{base}/eval_32k/runs.jsonl.gz")
    keys = [k for k in hs if k[3] == "lsa"]
    assert len(keys) == 80 and all(hs[k]["prediction"] == table32[k]["prediction"] for k in keys)
    same = [hs[(*k[:3], "hisparse")]["prediction"] == table32[(*k[:3], "full")]["prediction"] for k in keys]
    assert sum(same) == 70

    # 128K continued
    e128 = _long_tables(monkeypatch, f"{raw}/e128k_partial_tables.md", f"{raw}/e128k_partial")
    _rows_quoted(e128, section, ("| 131,072 |",), 1)
    partial = runs(f"{raw}/e128k_partial/runs.jsonl.gz")
    single = [r for k, r in partial.items() if k[0] == "niah_single_1"]
    assert len(partial) == 23 and {k[3] for k in partial} == {"full"}
    assert len(single) == 12 and sum(r["score"] for r in single) == 4
    earlier = runs("docs/results/table_long_h200/run4_controls_seed1/e128k_partial/runs.jsonl.gz")
    assert all(partial[k]["prediction"] == r["prediction"] for k, r in earlier.items())


def test_section11f_held_out_pages_and_hisparse_16k_cpu_are_the_raw_outputs(monkeypatch):
    """Section 11f: tables.py / variant.py on the stored CPU runs (byte for byte their stored tables), the compact
    table's cells from those outputs, every hisparse row in the section, and the section's claims about the runs:
    the CPU's held-out LSA scores equal the device's (the same two wrong answers), full's runs equal across the two
    evaluations, page recall's texts, the strict first-number reading, hisparse's texts equal full's, the window
    attention's 16K lsa texts equal section 11b's eager ones."""
    import json
    import re

    raw, dev = "docs/results/varied_32k_cpu", "docs/results/table_long_h200"
    section = _section((REPO / "docs/RESULTS.md").read_text(), "## 11f.")

    def runs(path, task=None):
        return _stored_runs(path, ("mode", "task", "index"), **({"task": task} if task else {}))

    row = _cells

    # page recall on the held-out formats at 32K
    held = _long_tables(monkeypatch, f"{raw}/held_out_tables.md", f"{raw}/held_out")
    variant = _script("variant_11f", REPO / f"{dev}/variant.py")
    pages = _printed(variant.main, [f"{raw}/held_out_pages", f"{raw}/held_out", "--name", "lsa + pages"])
    assert (REPO / raw / "held_out_pages_variant.md").read_text() == pages
    full, lsa, p = row(held, "| 32,768 | full |"), row(held, "| 32,768 | lsa |"), row(pages, "| 32,768 | 20 |")
    line = (f"| held out | 32,768 | {full[3]} | {lsa[3]} | {lsa[5]} {lsa[6]} | {p[2]} | {p[4]} {p[5]} | {p[6]} {p[7]} "
            f"| {p[8]} | {p[9]} |")
    assert line == ("| held out | 32,768 | 100.0 | 90.0 | -10.0 [-25.0, 0.0] | 100.0 | +0.0 [0.0, 0.0] | +10.0 [0.0, "
                    "25.0] | 0.096 / 0.041 | 0.282 / 0.231 |") and line in section
    cpu, paged = runs(f"{raw}/held_out/runs.jsonl.gz"), runs(f"{raw}/held_out_pages/runs.jsonl.gz")
    device = runs(f"{dev}/run5_heldout_limits/varied_32k/runs.jsonl.gz", "varied_new_all")
    keys = [k for k in cpu if k[0] == "lsa"]
    assert len(keys) == 20 and all(cpu[k]["prompt_sha"] == device[k]["prompt_sha"] for k in keys)
    assert all(cpu[k]["score"] == device[k]["score"] for k in cpu)  # LSA's and full's scores, 40 of 40
    wrong = {cpu[k]["prediction"].split(".")[0].strip() for k in keys if cpu[k]["score"] < 1}
    assert wrong == {"6078733", "1565166"} == {device[k]["prediction"].split(".")[0].strip() for k in keys
                                                if device[k]["score"] < 1}
    differ = {m: sum(cpu[k]["prediction"] != device[k]["prediction"] for k in cpu if k[0] == m) for m in ("full", "lsa")}
    assert differ == {"full": 9, "lsa": 8}
    assert all(paged[k]["prediction"] == cpu[k]["prediction"] for k in paged if k[0] == "full")
    assert sum(paged[k]["prediction"] == cpu[("full", *k[1:])]["prediction"] for k in keys) == 8
    assert json.loads((REPO / raw / "held_out_pages/config.json").read_text())["fingerprint"]["page_size"] == 8

    def first_number_right(r):
        return re.search(r"\d+", r["prediction"]).group(0) == r["answers"][0]

    strict = {name: sorted(k[2] for k in keys if not first_number_right(d[(mode, *k[1:])]))
              for name, d, mode in (("full", cpu, "full"), ("lsa", cpu, "lsa"), ("pages", paged, "lsa"))}
    assert strict == {"full": [2, 8], "lsa": [2, 3], "pages": [2, 8]}
    flat = section.replace("\n  ", " ")
    assert "full, LSA and page recall each answer 18 of 20" in flat and "(60787326, 6078732, ...; 78251600 ...)" in flat

    # the seen formats at 32K: 15 of the device's prompts here, the same near copy lost, page recall level with full
    seen = _long_tables(monkeypatch, f"{raw}/seen_tables.md", f"{raw}/seen")
    seen_pages = _printed(variant.main, [f"{raw}/seen_pages", f"{raw}/seen", "--name", "lsa + pages"])
    assert (REPO / raw / "seen_pages_variant.md").read_text() == seen_pages
    full, lsa, p = row(seen, "| 32,768 | full |"), row(seen, "| 32,768 | lsa |"), row(seen_pages, "| 32,768 | 20 |")
    line = (f"| seen | 32,768 | {full[3]} | {lsa[3]} | {lsa[5]} {lsa[6]} | {p[2]} | {p[4]} {p[5]} | {p[6]} {p[7]} "
            f"| {p[8]} | {p[9]} |")
    assert line in section, line
    cpu_s, paged_s = runs(f"{raw}/seen/runs.jsonl.gz"), runs(f"{raw}/seen_pages/runs.jsonl.gz")
    device_s = runs(f"{dev}/run5_heldout_limits/varied_32k/runs.jsonl.gz", "varied_seen")
    shared = [k for k in cpu_s if cpu_s[k]["prompt_sha"] == device_s[k]["prompt_sha"]]
    assert len(shared) == 2 * 15 and all(cpu_s[k]["score"] == device_s[k]["score"] for k in shared)
    lost = [cpu_s[k]["prediction"].split(".")[0].strip() for k in cpu_s if k[0] == "lsa" and cpu_s[k]["score"] < 1]
    assert lost == ["7719176"]
    seen_keys = [k for k in cpu_s if k[0] == "lsa"]
    assert sum(paged_s[k]["prediction"] == cpu_s[("full", *k[1:])]["prediction"] for k in seen_keys) == 7
    strict = {name: sorted(k[2] for k in seen_keys if not first_number_right(d[(mode, *k[1:])]))
              for name, d, mode in (("full", cpu_s, "full"), ("lsa", cpu_s, "lsa"), ("pages", paged_s, "lsa"))}
    assert strict == {"full": [14], "lsa": [5, 14], "pages": [14]}

    # page recall on the held-out formats at 64K (CPU) against the device's full and LSA
    far = _printed(variant.main, ["docs/results/varied_64k_cpu/held_out_pages",
                                  f"{dev}/run5_heldout_limits/varied_64k", "--name", "lsa + pages (CPU)"])
    assert (REPO / "docs/results/varied_64k_cpu/held_out_pages_vs_device.md").read_text() == far
    p, acc = row(far, "| 65,536 | 20 |"), row(far, "| varied_new_all | 65,536 |")
    line = (f"| held out | 65,536 | {acc[2]} | {acc[3]} | {p[2]} | {p[4]} {p[5]} | {p[6]} {p[7]} | {p[8]} | {p[9]} |")
    assert line in section, line
    far_runs = runs("docs/results/varied_64k_cpu/held_out_pages/runs.jsonl.gz")
    device64 = runs(f"{dev}/run5_heldout_limits/varied_64k/runs.jsonl.gz", "varied_new_all")
    assert len(far_runs) == 20 and all(far_runs[k]["score"] == device64[k]["score"] for k in far_runs)

    # hisparse at 16K, and the window attention against section 11b's eager lsa runs
    hisparse = _long_tables(monkeypatch, "docs/results/hisparse_16k_cpu/tables.md", "docs/results/hisparse_16k_cpu")
    _rows_quoted(hisparse, section, ("| 16,384 |",), 3)
    h = runs("docs/results/hisparse_16k_cpu/runs.jsonl.gz")
    pairs = [k for k in h if k[0] == "full"]
    assert len(pairs) == 40 and all(h[("hisparse", *k[1:])]["prediction"] == h[k]["prediction"] for k in pairs)
    eager = runs("docs/results/pages_16k_cpu/lsa/runs.jsonl.gz")
    assert json.loads((REPO / "docs/results/hisparse_16k_cpu/config.json").read_text())["config"]["attention"] == "window"
    assert all(h[("lsa", *k[1:])]["prediction"] == eager[("lsa", *k[1:])]["prediction"] for k in pairs)
    table = runs(f"{dev}/run2_fetch_top64/eval_16k/runs.jsonl.gz")
    assert all(h[k]["prompt_sha"] == table[k]["prompt_sha"] == eager[("lsa", *k[1:])]["prompt_sha"] for k in pairs)
    same = {m: (sum(h[(m, *k[1:])]["score"] == table[(m, *k[1:])]["score"] for k in pairs),
                sum(h[(m, *k[1:])]["prediction"] == table[(m, *k[1:])]["prediction"] for k in pairs))
            for m in ("full", "lsa")}
    assert same == {"full": (40, 39), "lsa": (39, 37)}
    assert "full's scores equal on 40 of\n  40 (texts 39), LSA's on 39 of 40 (texts 37)" in section

    # LSA at 32K on seed 1's prompts, and the opening's quote of it
    seed1 = _long_tables(monkeypatch, "docs/results/seed1_32k_cpu/tables.md", "docs/results/seed1_32k_cpu")
    _rows_quoted(seed1, section, ("| 32,768 |",), 2)
    assert "- 32,768: LSA 84.5 vs full 85.0, -0.5 points [-2.5, 1.5] over 40 pairs: within 1 point of full **met**" in seed1
    opening = _section((REPO / "docs/RESULTS.md").read_text(), "## The long table").replace("\n  ", " ")
    assert "(seed 1, single needles and variable tracking, CPU; section 11f): -0.5 [-2.5, 1.5], met there too" in opening


def test_section11g_lsa_at_128k_cpu_is_the_raw_outputs(monkeypatch):
    """Section 11g: tables.py on the device's full runs and the CPU's full and LSA runs at 128K (byte for byte the
    stored table, its rows quoted), the pairs' prompts, the CPU's repeats of the device's full runs, LSA's footprint,
    and needle_fetch's account of where the entries over the threshold lie (by distance from the query)."""
    import json

    raw, dev = "docs/results/e128k_cpu", "docs/results/table_long_h200/run5_heldout_limits/e128k_partial"
    section = _section((REPO / "docs/RESULTS.md").read_text(), "## 11g.")
    out = _long_tables(monkeypatch, f"{raw}/tables.md", dev, f"{raw}/full", f"{raw}/lsa", "--tasks", "niah_single_1")
    full_row, lsa_row = _rows_quoted(out, section, ("| 131,072 |",), 2)
    full_acc, (diff, interval, ratio) = full_row.split(" | ")[3], [lsa_row.split(" | ")[k] for k in (5, 6, 7)]
    text = (REPO / "docs/RESULTS.md").read_text()
    opening = text[:text.index("## 1. Commands")]
    limits = _long_tables(monkeypatch, "docs/results/limits_64k_cpu/tables.md", "docs/results/limits_64k_cpu")
    (row,) = _rows_quoted(limits, section, ("| 65,536 | lsa |",), 1)
    assert row.split(" | ")[7] == "0.023" and "and 2.3% at 64K (full not run)" in opening
    assert "| 16K-64K | absent in footprint | 8.7% / 4.4% / 2.3% of the CSA KV;" in opening
    assert (f"| 128K | shown | LSA {100 * float(ratio):.1f}% of the CSA KV, {diff} {interval} (single needles); "
            f"full {float(full_acc):.0f}%; with our distance cap") in opening

    def runs(path):
        return _stored_runs(path, ("mode", "index"), task="niah_single_1")

    device, full, lsa = runs(f"{dev}/runs.jsonl.gz"), runs(f"{raw}/full/runs.jsonl.gz"), runs(f"{raw}/lsa/runs.jsonl.gz")
    assert sorted(i for _, i in device) == list(range(12)) and sorted(i for _, i in full) == list(range(12, 20))
    assert sorted(i for _, i in lsa) == list(range(20))
    assert all(lsa[("lsa", i)]["prompt_sha"] == device[("full", i)]["prompt_sha"] for i in range(12))
    assert all(r["stats"]["device_bytes_by_device"].keys() == {"cpu"} for r in [*full.values(), *lsa.values()])
    repeats = runs(f"{raw}/full_repeats.jsonl.gz")
    assert sorted(i for _, i in repeats) == [0, 1, 2, 3]
    assert all(r["score"] == device[k]["score"] and r["prediction"].split(",")[0].split(".")[0]
               == device[k]["prediction"].split(",")[0].split(".")[0] for k, r in repeats.items())
    assert sum(r["prediction"] == device[k]["prediction"] for k, r in repeats.items()) == 2
    ratios = [r["stats"]["csa_kv_ratio"] for r in lsa.values()]
    assert 0.281 <= min(ratios) and max(ratios) < 0.2925 and f"{sum(ratios) / 20:.3f}" == "0.286"

    fetched = REPO / "docs/results/needle_fetch_cpu"
    names = [f"single_128k_seed0_top64_i{i}_fetch.jsonl" for i in (2, 4, 12, 14)]
    rows = {(r["length"], r["index"]): r for name in (*names, "single_64k_seed0_top64_i2_i4_window_fetch.jsonl")
            for r in map(json.loads, (fetched / name).read_text().splitlines())}
    assert sorted(rows) == [(65536, 2), (65536, 4), (131072, 2), (131072, 4), (131072, 12), (131072, 14)]
    for (length, i), r in rows.items():
        layers = r["fetch"]["layers"].values()
        near = [sum(b["above"] for b in v["by_distance"] if b["from"] < 65536) for v in layers]
        far = [sum(b["above"] for b in v["by_distance"] if b["from"] >= 65536) for v in layers]
        if i in (2, 4):  # the text's ranges: prompts 2 and 4, at both lengths
            assert 4 <= min(near) and max(near) <= 10
            assert all(0.005 <= b["mean_score"] <= 0.053 for v in layers for b in v["by_distance"] if b["from"] < 65536)
        if length == 65536:
            assert far == [0, 0, 0] and r["fetch"]["layers"]["4"]["needle_rank"] <= 2
            assert 0.435 <= r["fetch"]["layers"]["4"]["needle_score"] <= 0.455
            continue
        assert r["prompt_sha"] == lsa[("lsa", i)]["prompt_sha"]
        t0 = r["fetch"]["t0"]
        distances = [t0 - 4 * s for s in r["fetch"]["resident"]]
        if i in (2, 4):
            assert 1288 <= min(far) and max(far) <= 4797
            assert all(0.14 <= b["mean_score"] <= 0.24 for v in layers for b in v["by_distance"] if b["from"] >= 65536)
            assert min(d for d in distances if d > 256 * 4) == 70819  # past the recency tail, nothing nearer than 70.8K
            assert sum(d >= 65536 for d in distances) == {2: 9189, 4: 9305}[i]
        held = len(set(r["needle"]) & set(r["fetch"]["resident"]))
        assert (held, len(r["needle"])) == ((0, 2) if i == 2 else (1, 2))  # 4, 12, 14: one of the value's entries
        if i in (12, 14):  # within the trained distance, answered by full, not by LSA
            assert t0 - 4 * r["needle"][0] == {12: 48307, 14: 34519}[i] and full[("full", i)]["score"] == 1.0
            layer4 = r["fetch"]["layers"]["4"]
            assert (round(layer4["needle_score"], 2), layer4["needle_rank"]) == {12: (0.37, 438), 14: (0.33, 1008)}[i]
            assert min(v["needle_rank"] for v in layers) > 64 and layer4["needle_score"] >= 0.316
            assert lsa[("lsa", i)]["prediction"].split(".")[0].strip() == {12: "10925332", 14: "7820686"}[i]
    ranks = {i: [v["needle_rank"] for v in rows[(131072, i)]["fetch"]["layers"].values()] for i in (2, 4)}
    assert min(ranks[2]) == 9337 and (min(ranks[4]), max(ranks[4])) == (786, 2641)
    assert not rows[(131072, 2)]["fetch"]["needle_resident"] and rows[(131072, 4)]["fetch"]["needle_resident"]
    eager = {r["index"]: r for r in map(json.loads, (fetched / "single_64k_seed0_top64.jsonl").read_text().splitlines())}
    window = rows[(65536, 4)]["fetch"]
    assert window["resident"] == eager[4]["fetch"]["resident"] and window["text"] == eager[4]["fetch"]["text"]
    assert all({k: v[k] for k in ("above_threshold", "needle_score", "needle_rank")} == eager[4]["fetch"]["layers"][layer]
               for layer, v in window["layers"].items())


def test_section11h_distance_cap_at_128k_is_the_raw_outputs(monkeypatch):
    """Section 11h: variant.py on the capped LSA runs against section 11g's full and LSA (byte for byte its stored
    table, its row quoted), the runs' configuration, footprint and answers as the section counts them, and
    needle_fetch's two records of the seed-1 prompt, without and with the cap."""
    import json

    raw, dev = "docs/results/e128k_cpu", "docs/results/table_long_h200/run5_heldout_limits/e128k_partial"
    text = (REPO / "docs/RESULTS.md").read_text()
    section, opening = _section(text, "## 11h."), text[:text.index("## 1. Commands")]
    variant = _script("variant_cap", REPO / "docs/results/table_long_h200/variant.py")
    monkeypatch.chdir(REPO)
    out = _printed(variant.main, [f"{raw}/lsa_cap", dev, f"{raw}/full", f"{raw}/lsa", "--name", "LSA, distance cap"])
    assert (REPO / raw / "variant_cap.md").read_text() == out
    (row,) = _rows_quoted(out, section, ("| 131,072 | 20 |",), 1)
    cells = _cells(out, "| 131,072 | 20 |")
    assert cells[2:8] == ["50.0", "[30.0, 70.0]", "-10.0", "[-30.0, 10.0]", "+30.0", "[10.0, 50.0]"]
    assert cells[8].startswith("0.011 /") and cells[8].endswith("/ 0.286")
    assert "with our distance cap (off by default) 1.1%, -10.0 [-30.0, 10.0];" in opening

    key = ("index",)
    cap = _stored_runs(f"{raw}/lsa_cap/runs.jsonl.gz", key, task="niah_single_1", mode="lsa")
    lsa = _stored_runs(f"{raw}/lsa/runs.jsonl.gz", key, task="niah_single_1", mode="lsa")
    full = {**_stored_runs(f"{dev}/runs.jsonl.gz", key, task="niah_single_1", mode="full"),
            **_stored_runs(f"{raw}/full/runs.jsonl.gz", key, task="niah_single_1", mode="full")}
    assert sorted(cap) == sorted(full) == sorted(lsa) == [(i,) for i in range(20)]
    config = json.loads((REPO / raw / "lsa_cap/config.json").read_text())
    assert config["fingerprint"]["distance_cap"] == 65536 and config["fingerprint"]["attention"] == "window"
    assert all("distances capped at 65536" in r["stats"]["policy"] for r in cap.values())
    ratios = [r["stats"]["csa_kv_ratio"] for r in cap.values()]
    selected = [r["stats"]["selected_per_trigger"] for r in cap.values()]
    assert 0.0104 <= min(ratios) and max(ratios) < 0.0109 and {len(s) for s in selected} == {1}
    assert (min(s[0] for s in selected), max(s[0] for s in selected)) == (323, 338)

    def back(i):  # tokens from the needle to the question's end
        return 131072 - cap[(i,)]["needles"][0]["token_offset"]

    near = [i for i in range(20) if back(i) < 65536]
    assert near == list(range(10, 20))
    for runs, (n_near, n_far) in ((cap, (9, 1)), (full, (10, 2)), (lsa, (4, 0))):
        right = {i for i in range(20) if runs[(i,)]["score"] == 1.0}
        assert (len(right & set(near)), len(right - set(near))) == (n_near, n_far)
    lost = {i for i in range(20) if full[(i,)]["score"] > cap[(i,)]["score"]}
    gained = {i for i in range(20) if full[(i,)]["score"] < cap[(i,)]["score"]}
    assert lost == {2, 4, 13} and gained == {1}
    assert {i: cap[(i,)]["prediction"].split(".")[0].strip() for i in lost} == \
        {2: "6586099", 4: "4697555", 13: "8941594"}
    assert {i: back(i) // 1000 for i in (1, 2, 4, 13)} == {1: 124, 2: 117, 4: 103, 13: 41}
    assert all(lsa[(i,)]["score"] == 0.0 and cap[(i,)]["score"] == 1.0 for i in (12, 14))

    fetched = REPO / "docs/results/needle_fetch_cpu"
    plain, capped = (json.loads((fetched / f"single_128k_seed1_top64_i0{tag}_fetch.jsonl").read_text())
                     for tag in ("", "_cap65536"))
    assert capped["distance_cap"] == 65536 and "distance_cap" not in plain
    assert plain["prompt_sha"] == capped["prompt_sha"] and (plain["seed"], plain["index"]) == (1, 0)
    far = {name: [sum(b["above"] for b in v["by_distance"] if b["from"] >= 65536) for v in r["fetch"]["layers"].values()]
           for name, r in (("plain", plain), ("capped", capped))}
    assert (min(far["plain"]), max(far["plain"])) == (1284, 4861) and max(far["capped"]) == 1
    assert (plain["fetch"]["selected"], capped["fetch"]["selected"]) == (9455, 332)
    layer4 = plain["fetch"]["layers"]["4"], capped["fetch"]["layers"]["4"]
    assert (layer4[0]["needle_rank"], layer4[0]["needle_score"]) == (32768, 0.0005)
    assert (layer4[1]["needle_rank"], layer4[1]["needle_score"]) == (1, 0.4289)
    assert not plain["fetch"]["needle_resident"] and capped["fetch"]["needle_resident"]
    assert capped["fetch"]["text"].strip().startswith(capped["answers"][0])
    assert not plain["fetch"]["text"].strip().startswith(plain["answers"][0])
    for layer in plain["fetch"]["layers"]:  # within the trained distance the cap changes no score
        bands = [[(b["from"], b["above"], b["mean_score"]) for b in r["fetch"]["layers"][layer]["by_distance"]
                  if b["from"] < 65536] for r in (plain, capped)]
        assert bands[0] == bands[1]
    # the lost prompts: both of the value's entries resident, the same near copies; with page recall prompt 2 repaired
    lost_fetch = {tag: {r["index"]: r for r in map(json.loads, (fetched / (
        f"single_128k_seed0_top64_i2_i4_i13_cap65536{tag}_fetch.jsonl")).read_text().splitlines())}
        for tag in ("", "_pages")}
    for tag, rows in lost_fetch.items():
        assert sorted(rows) == [2, 4, 13] and all(r["distance_cap"] == 65536 for r in rows.values())
        for i, r in rows.items():
            assert r["prompt_sha"] == cap[(i,)]["prompt_sha"]
            held = set(r["fetch"]["resident"])
            assert set(r["needle"]) <= held and min(r["needle"]) - 1 in held
            assert [r["fetch"]["layers"]["4"][k] for k in ("needle_rank", "needle_score")] == \
                {2: [1, 0.4818], 4: [1, 0.4486], 13: [11, 0.1272]}[i]
        texts = {i: r["fetch"]["text"].split(".")[0].split(",")[0].strip() for i, r in rows.items()}
        if tag:
            assert {r["fetch"]["selected"] for r in rows.values()} == {768}
            assert texts == {2: "65860955", 4: "4697558", 13: "8941594"}
        else:
            assert texts == {i: cap[(i,)]["prediction"].split(".")[0].strip() for i in rows}


def test_section11i_hisparse_at_64k_cpu_is_the_raw_outputs(monkeypatch):
    """Section 11i: tables.py on the CPU's hisparse and full runs at 64K (byte for byte the stored table, its rows
    quoted), the buffers the table's LSA budgets give, hisparse's texts equal full's, the prompts the device's, and
    the section's paired figures against the device's LSA and full (recomputed here from the stored runs)."""
    import json
    from statistics import mean

    from fm_eval.intervals import format_interval, paired_summary

    raw, dev = "docs/results/hisparse_64k_cpu", "docs/results/table_long_h200/run2_fetch_top64/eval_64k"
    text = (REPO / "docs/RESULTS.md").read_text()
    section = _section(text, "## 11i.")
    flat = section.replace("\n  ", " ")
    out = _long_tables(monkeypatch, f"{raw}/tables.md", f"{raw}/niah_single_1", f"{raw}/vt")
    _rows_quoted(out, section, ("| 65,536 |",), 2)
    assert _cells(out, "| 65,536 | hisparse |")[7:9] == ["0.020", "0.273"]

    key = ("mode", "task", "index")
    cpu = {**_stored_runs(f"{raw}/niah_single_1/runs.jsonl.gz", key),
           **_stored_runs(f"{raw}/vt/runs.jsonl.gz", key)}
    device = _stored_runs(f"{dev}/runs.jsonl.gz", key)
    pairs = [k for k in cpu if k[0] == "full"]
    assert len(pairs) == 40 and len(cpu) == 80
    hisparse = {k: cpu[("hisparse", *k[1:])] for k in pairs}
    assert all(hisparse[k]["prediction"] == cpu[k]["prediction"] for k in pairs)
    assert all(cpu[k]["prompt_sha"] == device[k]["prompt_sha"] for k in pairs)
    for task in ("niah_single_1", "vt"):  # the buffer: the table's LSA mean selected entries in that cell
        selected = [r["selected_mean"] for k, r in device.items() if k[:2] == ("lsa", task)]
        assert len(selected) == 20
        assert {h["budget"] for k, h in hisparse.items() if k[1] == task} == {round(mean(selected))}
    for task in ("niah_single_1", "vt"):
        config = json.loads((REPO / raw / task / "config.json").read_text())
        assert config["config"]["attention"] == "window" and config["config"]["tasks"] == [task]

    def paired(a, b):
        s = paired_summary(a, b)
        return f"{s['difference']:+.1f} {format_interval(s['interval'])}"

    h = [hisparse[k] for k in pairs]
    lsa, full = [device[("lsa", *k[1:])] for k in pairs], [device[k] for k in pairs]
    assert paired(h, lsa) == "+7.5 [0.5, 15.5]" and "hisparse +7.5 points [0.5, 15.5] above LSA" in flat
    assert paired(lsa, full) == "-7.0 [-15.0, -0.0]" and "-7.0 [-15.0, -0.0]" in flat
    assert round(mean(r["stats"]["footprint_ratio"] for r in lsa), 3) == 0.193
    same = (sum(cpu[k]["score"] == device[k]["score"] for k in pairs),
            sum(cpu[k]["prediction"] == device[k]["prediction"] for k in pairs))
    assert same == (39, 32) and "full's scores equal on 39 of 40 (texts 32)" in flat
    misses = {t: round(mean(r["stats"]["entries_fetched"] for k, r in hisparse.items() if k[1] == t))
              for t in ("niah_single_1", "vt")}
    assert misses == {"niah_single_1": 3757, "vt": 2690} and "(3,757 / 2,690 entry-layer misses" in flat


def test_section11j_variable_tracking_at_128k_with_the_cap_is_the_raw_outputs(monkeypatch):
    """Section 11j: variant.py --full-only on the capped LSA's variable-tracking runs against the device's full (byte
    for byte its stored table, its row quoted; without --full-only no pair, the base has no plain LSA there), the
    runs' configuration and footprint, and the section's counts of the pairs."""
    import json

    raw, dev = "docs/results/e128k_cpu", "docs/results/table_long_h200/run5_heldout_limits/e128k_partial"
    section, opening, flat = _results_section("## 11j.")
    variant = _script("variant_vt_cap", REPO / "docs/results/table_long_h200/variant.py")
    monkeypatch.chdir(REPO)
    args = [f"{raw}/vt_cap", dev, "--name", "LSA, distance cap"]
    out = _printed(variant.main, args + ["--full-only"])
    assert (REPO / raw / "variant_vt_cap.md").read_text() == out
    _rows_quoted(out, section, ("| 131,072 | 11 |",), 1)
    assert _cells(out, "| 131,072 | 11 |")[2:8] == ["38.2", "[25.5, 49.1]", "+14.5", "[-0.0, 29.1]", "-", "-"]
    assert "| vt | 131,072 | 23.6 | - | 38.2 |" in out
    assert "| 131,072 |" not in _printed(variant.main, args)  # paired with full and LSA: no plain LSA, no row
    assert "variable tracking (sections 11j, 11l) the capped LSA" in opening.replace("\n  ", " ")  # 11l: all 20

    key = ("index",)
    cap = _stored_runs(f"{raw}/vt_cap/runs.jsonl.gz", key, task="vt", mode="lsa")
    full = _stored_runs(f"{dev}/runs.jsonl.gz", key, task="vt", mode="full")
    assert sorted(cap) == sorted(full) == [(i,) for i in range(11)]
    assert all(cap[k]["prompt_sha"] == full[k]["prompt_sha"] for k in cap)
    config = json.loads((REPO / raw / "vt_cap/config.json").read_text())
    assert config["fingerprint"]["distance_cap"] == 65536 and config["fingerprint"]["attention"] == "window"
    assert all("distances capped at 65536" in r["stats"]["policy"] for r in cap.values())
    selected = [s for r in cap.values() for s in r["stats"]["selected_per_trigger"]]
    assert len(selected) == 11 and (min(selected), max(selected)) == (325, 334) and "(325-334 entries" in flat
    higher = sum(cap[k]["score"] > full[k]["score"] for k in cap)
    lower = sum(cap[k]["score"] < full[k]["score"] for k in cap)
    assert (higher, lower, 11 - higher - lower) == (7, 1, 3) and "higher on 7 prompts, lower on 1, equal on 3" in flat
    assert max(r["score"] for r in cap.values()) == 0.6 and max(r["score"] for r in full.values()) == 0.4


def test_section11k_seen_pages_at_64k_cpu_is_the_raw_outputs(monkeypatch):
    """Section 11k: tables.py and variant.py --equal-prompts on the CPU's page recall on the seen varied formats at 64K
    (byte for byte the stored tables, their rows quoted; without --equal-prompts the differing digests stop the
    pairing), the page setting, the prompts that differ from the device's and the section's counts."""
    import json

    import pytest

    raw, dev = "docs/results/varied_64k_cpu", "docs/results/table_long_h200/run5_heldout_limits/varied_64k"
    section, opening, flat = _results_section("## 11k.")
    assert "seen formats: pages -5.0 [-25.0, 15.0] (CPU), LSA +5.0, " in opening
    out = _long_tables(monkeypatch, f"{raw}/seen_pages_tables.md", f"{raw}/seen_pages", "--tasks", "varied_seen")
    _rows_quoted(out, section, ("| 65,536 |",), 2)
    assert _cells(out, "| 65,536 | lsa |")[2:7] == ["20", "65.0", "[45.0, 85.0]", "-5.0", "[-25.0, 15.0]"]
    variant = _script("variant_seen_pages", REPO / "docs/results/table_long_h200/variant.py")
    args = [f"{raw}/seen_pages", dev, "--name", "lsa + pages (CPU)"]
    paired = _printed(variant.main, args + ["--equal-prompts"])
    assert (REPO / raw / "seen_pages_vs_device.md").read_text() == paired
    _rows_quoted(paired, section, ("| 65,536 | 16 |",), 1)
    assert _cells(paired, "| 65,536 | 16 |")[2:8] == ["68.8", "[43.8, 87.5]", "+0.0", "[-25.0, 25.0]", "-6.2",
                                                       "[-25.0, 12.5]"]
    assert "4 prompt(s) left out" in paired
    with pytest.raises(ValueError, match="sample 7: prompt digests differ"):
        _printed(variant.main, args)

    key = ("mode", "index")
    cpu = _stored_runs(f"{raw}/seen_pages/runs.jsonl.gz", key, task="varied_seen")
    device = _stored_runs(f"{dev}/runs.jsonl.gz", key, task="varied_seen", length=65536)
    assert len(cpu) == 40
    differ = [i for i in range(20) if cpu[("full", i)]["prompt_sha"] != device[("full", i)]["prompt_sha"]]
    assert differ == [7, 10, 14, 17] and "(prompts 7, 10, 14, 17)" in flat
    config = json.loads((REPO / raw / "seen_pages/config.json").read_text())["fingerprint"]
    assert (config["page_size"], config["max_pages"], config["fetch_top"], config["attention"]) == (8, 96, 64, "window")
    assert {r["selected_mean"] for k, r in cpu.items() if k[0] == "lsa"} == {768.0}
    score = lambda runs, m, i: runs[(m, i)]["score"]  # noqa: E731
    lower = [i for i in range(20) if score(cpu, "lsa", i) < score(cpu, "full", i)]
    higher = [i for i in range(20) if score(cpu, "lsa", i) > score(cpu, "full", i)]
    assert (lower, higher) == ([1, 5, 10], [3, 8]) and "loses 3 prompts (1, 5, 10) and wins 2 (3 and 8" in flat
    equal = [i for i in range(20) if i not in differ]
    assert [i for i in equal if score(cpu, "lsa", i) < score(device, "lsa", i)] == [1, 5]
    assert [i for i in equal if score(cpu, "lsa", i) > score(device, "lsa", i)] == [3]
    same = (sum(score(cpu, "full", i) == score(device, "full", i) for i in equal),
            sum(cpu[("full", i)]["prediction"] == device[("full", i)]["prediction"] for i in equal))
    assert same == (16, 11) and "score on all 16 shared prompts (texts on 11)" in flat
    assert sum(cpu[("lsa", i)]["prediction"] == cpu[("full", i)]["prediction"] for i in range(20)) == 2

    # the diagnosis of prompts 1 and 5: LSA's set holds the needle, page recall's not; the pages by selections
    from collections import Counter

    fetch = {}
    for name in ("", "_pages"):
        path = REPO / f"docs/results/needle_fetch_cpu/varied_seen_64k_seed0_top64_i1_i5{name}_window_fetch.jsonl"
        fetch[name] = {r["index"]: r for r in map(json.loads, path.read_text().splitlines())}
    assert sorted(fetch[""]) == sorted(fetch["_pages"]) == [1, 5]
    assert all(fetch[""][i]["prompt_sha"] == cpu[("lsa", i)]["prompt_sha"] for i in (1, 5))
    assert [fetch[""][i]["fetch"]["needle_resident"] for i in (1, 5)] == [True, True]
    assert [fetch["_pages"][i]["fetch"]["needle_resident"] for i in (1, 5)] == [False, False]
    assert [fetch[""][i]["fetch"]["layers"]["4"]["needle_rank"] for i in (1, 5)] == [5, 1]
    shapes = []
    for i in (1, 5):
        f = fetch[""][i]["fetch"]
        tail = set(range(f["visible"] - 256, f["visible"]))
        outside = [e for e in f["resident"] if e not in tail]
        pages = Counter(e // 8 for e in outside)
        counts = list(pages.values())
        shapes.append((len(outside), len(pages), counts.count(1), len(counts) - counts.count(1),
                       max(pages[e // 8] for e in fetch[""][i]["needle"])))
    assert shapes == [(119, 104, 92, 12, 1), (114, 101, 92, 9, 1)]
    assert "LSA selects 119 / 114 entries spread over 104 / 101 pages of 8, 92 of them" in flat


def test_section11l_variable_tracking_at_128k_all_20_is_the_raw_outputs(monkeypatch):
    """Section 11l: variant.py --full-only on the capped LSA's 20 variable-tracking runs against full (the device's on
    prompts 0-10, the CPU's on 11-19; byte for byte its stored table, its row quoted), section 11j's runs carried over
    unchanged, and the section's counts and the one-machine pairing recomputed from the stored runs."""
    from fm_eval.intervals import format_interval, paired_summary

    raw, dev = "docs/results/e128k_cpu", "docs/results/table_long_h200/run5_heldout_limits/e128k_partial"
    section, opening, flat = _results_section("## 11l.")
    variant = _script("variant_vt_cap20", REPO / "docs/results/table_long_h200/variant.py")
    monkeypatch.chdir(REPO)
    out = _printed(variant.main, [f"{raw}/vt_cap20", dev, f"{raw}/vt_cap20", "--name", "LSA, distance cap",
                                  "--full-only"])
    assert (REPO / raw / "variant_vt_cap20.md").read_text() == out
    _rows_quoted(out, section, ("| 131,072 | 20 |",), 1)
    assert _cells(out, "| 131,072 | 20 |")[2:6] == ["37.0", "[30.0, 44.0]", "+9.0", "[-0.0, 18.0]"]
    assert "+9.0 [-0.0, 18.0] on 20 prompts" in opening.replace("\n  ", " ")

    key = ("mode", "index")
    runs = _stored_runs(f"{raw}/vt_cap20/runs.jsonl.gz", key, task="vt")
    before = _stored_runs(f"{raw}/vt_cap/runs.jsonl.gz", key, task="vt")
    device = _stored_runs(f"{dev}/runs.jsonl.gz", key, task="vt", mode="full")
    assert all(runs[k] == before[k] for k in before) and len(before) == 11
    assert sorted(k for k in runs if k[0] == "full") == [("full", i) for i in range(11, 20)]
    assert sorted(k for k in runs if k[0] == "lsa") == [("lsa", i) for i in range(20)]
    full = {i: (runs.get(("full", i)) or device[("full", i)]) for i in range(20)}
    cap = {i: runs[("lsa", i)] for i in range(20)}
    assert all(cap[i]["prompt_sha"] == full[i]["prompt_sha"] for i in range(20))

    def counts(indices):
        higher = sum(cap[i]["score"] > full[i]["score"] for i in indices)
        lower = sum(cap[i]["score"] < full[i]["score"] for i in indices)
        return higher, lower, len(indices) - higher - lower

    assert counts(range(20)) == (10, 3, 7) and "(higher on 10, lower on 3, equal on 7)" in flat
    assert counts(range(11, 20)) == (3, 2, 4) and "(higher on 3, lower on 2, equal on 4)" in flat
    here = paired_summary([cap[i] for i in range(11, 20)], [full[i] for i in range(11, 20)])
    assert f"{here['difference']:+.1f} {format_interval(here['interval'])}" == "+2.2 [-6.7, 11.1]"
    assert "35.6% against 33.3%, +2.2 [-6.7, 11.1]" in flat
    selected = [s for r in cap.values() for s in r["stats"]["selected_per_trigger"]]
    assert (min(selected), max(selected)) == (325, 334) and "(325-334 entries per trigger)" in flat


def test_section11m_variable_tracking_at_128k_without_the_cap_is_the_raw_outputs():
    """Section 11m: its table's rows recomputed from the stored runs (full and the capped LSA of vt_cap20, the uncapped
    LSA of vt_nocap, prompts 11-19, one machine), the pairings quoted, and the runs' configuration."""
    import json

    from fm_eval.intervals import format_interval, paired_summary
    from fm_eval.report import summarize

    raw = "docs/results/e128k_cpu"
    section, opening, flat = _results_section("## 11m.")
    key = ("index",)
    nocap = _stored_runs(f"{raw}/vt_nocap/runs.jsonl.gz", key, task="vt", mode="lsa")
    full = _stored_runs(f"{raw}/vt_cap20/runs.jsonl.gz", key, task="vt", mode="full")
    cap = {k: r for k, r in _stored_runs(f"{raw}/vt_cap20/runs.jsonl.gz", key, task="vt", mode="lsa").items()
           if k in full}
    assert sorted(nocap) == sorted(full) == sorted(cap) == [(i,) for i in range(11, 20)]
    assert all(nocap[k]["prompt_sha"] == full[k]["prompt_sha"] == cap[k]["prompt_sha"] for k in full)
    config = json.loads((REPO / raw / "vt_nocap/config.json").read_text())["fingerprint"]
    assert "distance_cap" not in config and (config["fetch_top"], config["attention"]) == (64, "window")
    keys = sorted(full)

    def row(name, runs, base=None):
        r = summarize([runs[k] for k in keys])["modes"][0]
        vs = paired_summary([runs[k] for k in keys], [base[k] for k in keys]) if base else None
        diff = f"{vs['difference']:+.1f} | {format_interval(vs['interval'])}" if vs else "- | -"
        resident = (f"{sum(runs[k]['selected_mean'] for k in keys) / len(keys):,.0f}" if base else "-")
        mib = r["bytes_moved"] / 2**20
        return (f"| {name} | {r['n']} | {r['accuracy']:.1f} | {format_interval(r['accuracy_interval'])} | {diff} "
                f"| {r['csa_kv_ratio']:.3f} | {r['footprint_ratio']:.3f} | {resident} | {mib:.2f} |")

    for line in (row("full", full), row("LSA", nocap, full), row("LSA, distance cap", cap, full)):
        assert line in section, line
    lift = paired_summary([cap[k] for k in keys], [nocap[k] for k in keys])
    assert f"{lift['difference']:+.1f} points {format_interval(lift['interval'])}" == "+15.6 points [6.7, 24.4]"
    assert "+15.6 points [6.7, 24.4] over LSA without it" in flat
    lower = sum(nocap[k]["score"] < full[k]["score"] for k in keys)
    higher = sum(nocap[k]["score"] > full[k]["score"] for k in keys)
    assert (lower, higher) == (5, 0) and "(lower on 5 prompts, higher on none)" in flat
    assert "variable tracking: LSA -13.3 [-22.2, -4.4] at 33.5% (9 prompts, CPU)" in opening


def test_section11n_page_ties_by_score_is_the_raw_outputs(monkeypatch):
    """Section 11n: its table's rows recomputed from the stored runs (our tie rule against the release's, same prompts,
    this CPU), the variant tables byte for byte, the runs' settings, and the per-prompt counts the text quotes."""
    import json

    section, opening, flat = _results_section("## 11n.")
    c64, c32, s1 = "docs/results/varied_64k_cpu", "docs/results/varied_32k_cpu", "docs/results/seed1_64k_cpu"
    dev = "docs/results/table_long_h200/run5_heldout_limits"
    key = ("task", "index")
    runs = lambda path, **where: _stored_runs(f"{path}/runs.jsonl.gz", key, **where)  # noqa: E731

    seen = runs(f"{c64}/seen_pages_ties"), runs(f"{c64}/seen_pages", mode="lsa"), runs(f"{c64}/seen_pages", mode="full")
    held = (runs(f"{c64}/held_out_pages_ties"), runs(f"{c64}/held_out_pages", mode="lsa"),
            runs(f"{dev}/varied_64k", mode="full", length=65536))
    short = (runs(f"{c32}/pages_ties"), {**runs(f"{c32}/seen_pages", mode="lsa"), **runs(f"{c32}/held_out_pages",
                                                                                            mode="lsa")},
             {**runs(f"{c32}/seen", mode="full"), **runs(f"{c32}/held_out", mode="full")})
    seed1 = runs(f"{s1}/pages_ties"), runs(f"{s1}/pages", mode="lsa"), runs(f"{dev}/seed1_64k", mode="full")
    for label, cell in (("seen formats, 64K (the cell the rule was read from)", seen),
                        ("held-out formats, 64K (full: the device's)", held),
                        ("seen and held-out formats, 32K", short),
                        ("single needles and variable tracking, seed 1, 64K (full: the device's)", seed1)):
        assert _ties_row(label, *cell) in section, label
    # the settings: our rule in the new directories only, the pages and floor of section 11b in all
    for d in (f"{c64}/seen_pages_ties", f"{c64}/held_out_pages_ties", f"{c32}/pages_ties", f"{s1}/pages_ties",
              f"{c64}/seen_pages", f"{c64}/held_out_pages", f"{c32}/seen_pages", f"{s1}/pages"):
        config = json.loads((REPO / d / "config.json").read_text())["fingerprint"]
        assert config.get("page_ties", "recent") == ("score" if d.endswith("_ties") else "recent"), d
        assert (config["page_size"], config["max_pages"], config["fetch_top"], config["attention"]) == \
            (8, 96, 64, "window"), d
    # the seen cell prompt by prompt: gains 1, 5 (section 11k's needles) and 6, no loss; full's answer on 6
    score, release, full = seen
    gains = [k[1] for k in sorted(score) if score[k]["score"] > release[k]["score"]]
    losses = [k[1] for k in sorted(score) if score[k]["score"] < release[k]["score"]]
    assert (gains, losses) == ([1, 5, 6], []) and "answers prompts 1 and 5" in flat and "and prompt 6," in flat
    assert full[("varied_seen", 6)]["prediction"].startswith(" 7528666") and \
        score[("varied_seen", 6)]["answers"] == ["7523266"] and "(full answered 7528666 for 7523266)" in flat
    assert {r["selected_mean"] for cell in (seen, held) for r in cell[0].values()} == {768.0}
    assert {r["selected_mean"] for r in short[0].values()} <= {767.0, 768.0}  # a partial last page at some triggers
    # seed 1: the needles unchanged, three chains moved by one value of five; the release's rule as on the device
    score, release, _ = seed1
    moved = {k: round(score[k]["score"] - release[k]["score"], 1) for k in score
             if score[k]["score"] != release[k]["score"]}
    assert moved == {("vt", 1): -0.2, ("vt", 12): 0.2, ("vt", 13): -0.2}
    assert "(one prompt up and two down by one of its five values each)" in flat
    device = runs(f"{dev}/seed1_64k_pages", mode="lsa")
    assert sum(release[k]["prediction"] == device[k]["prediction"] for k in release) == 32
    assert "(68.5% each, 32 of 40 texts equal;" in flat

    # the variant tables, byte for byte
    score_release = ["--name", "score ties", "--versus-name", "release ties"]
    _variant_tables(
        monkeypatch,
            (f"{c64}/seen_pages_ties_variant.md", [f"{c64}/seen_pages_ties", f"{c64}/seen_pages", "--versus",
                                                   f"{c64}/seen_pages", *score_release]),
            (f"{c64}/seen_pages_ties_vs_device.md", [f"{c64}/seen_pages_ties", f"{dev}/varied_64k", "--name",
                                                     "score ties (CPU)", "--equal-prompts"]),
            (f"{c64}/held_out_pages_ties_variant.md", [f"{c64}/held_out_pages_ties", f"{dev}/varied_64k", "--versus",
                                                       f"{c64}/held_out_pages", "--name", "score ties (CPU)",
                                                       "--versus-name", "release ties (CPU)", "--equal-prompts"]),
            (f"{c32}/pages_ties_variant.md", [f"{c32}/pages_ties", f"{c32}/seen", f"{c32}/held_out", "--versus",
                                              f"{c32}/seen_pages", "--versus", f"{c32}/held_out_pages",
                                              *score_release]),
            (f"{s1}/pages_ties_vs_device.md", [f"{s1}/pages_ties", f"{dev}/seed1_64k", "--versus",
                                               f"{dev}/seed1_64k_pages", "--name", "score ties (CPU)",
                                               "--versus-name", "release ties (device)", "--equal-prompts"]),
            (f"{s1}/pages_ties_variant.md", [f"{s1}/pages_ties", f"{dev}/seed1_64k", "--versus", f"{s1}/pages",
                                             *score_release]),
            (f"{s1}/pages_vs_device.md", [f"{s1}/pages", f"{dev}/seed1_64k", "--versus", f"{dev}/seed1_64k_pages",
                                          "--name", "release ties (CPU)", "--versus-name", "release ties (device)"]))
    paired = (REPO / f"{c64}/seen_pages_ties_vs_device.md").read_text()
    assert _cells(paired, "| 65,536 | 16 |")[2:8] == ["87.5", "[68.8, 100.0]", "+18.8", "[0.0, 37.5]", "+12.5",
                                                       "[0.0, 31.2]"]
    assert "87.5%, against the device's LSA 75.0% (+12.5 [0.0, 31.2]) and full 68.8%" in flat
    assert "pages with our tie rule +10.0 [-10.0, 30.0] (CPU), " in opening and "| 11e, 11f, 11k, 11n, 11t |" in opening
    assert ("(seed 1: -1.5 [-7.5, 3.0]; with our page tie rule, CPU: -2.0 [-8.0, 2.5], H100: -2.5 [-8.5, 2.0]) |"
            in opening)


def test_section11o_device_ties_and_128k_are_the_raw_outputs(monkeypatch):
    """Section 11o: the tie rule's rows on the device recomputed from the stored runs (our rule on the H100 against
    the release's on the H200, same prompts), the 128K rows by task, the stored tables byte for byte, the runs'
    settings, and the per-prompt counts the text quotes."""
    import json

    from fm_eval.intervals import format_interval, paired_summary
    from fm_eval.report import summarize

    section, opening, flat = _results_section("## 11o.")
    t = "docs/results/table_long_h200"
    new, dev = f"{t}/run6_h100", f"{t}/run5_heldout_limits"
    key = ("task", "index")
    runs = lambda path, **where: _stored_runs(f"{path}/runs.jsonl.gz", key, **where)  # noqa: E731
    accuracy = lambda rs: f"{summarize(rs)['modes'][0]['accuracy']:.1f}"  # noqa: E731

    table = runs(f"{new}/ties_64k"), runs(f"{t}/run3_pages/eval_64k_pages", mode="lsa"), \
        runs(f"{t}/run2_fetch_top64/eval_64k", mode="full")
    seed1 = runs(f"{new}/ties_seed1_64k"), runs(f"{dev}/seed1_64k_pages", mode="lsa"), runs(f"{dev}/seed1_64k",
                                                                                             mode="full")
    assert _ties_row("the table's prompts, 64K (four tasks)", *table) in section
    assert _ties_row("single needles and variable tracking, seed 1, 64K", *seed1) in section
    for d, ties in ((f"{new}/ties_64k", "score"), (f"{new}/ties_seed1_64k", "score"),
                    (f"{t}/run3_pages/eval_64k_pages", "recent"), (f"{dev}/seed1_64k_pages", "recent")):
        config = json.loads((REPO / d / "config.json").read_text())["fingerprint"]
        assert config.get("page_ties", "recent") == ties, d
        assert (config["page_size"], config["max_pages"], config["fetch_top"]) == (8, 96, 64), d
        assert config.get("attention", "eager") == "eager", d
    # per prompt: the table's gains all multi-value (six up, none down), vt three up and three down, needles equal
    score, release, _ = table
    moved = {k: round(score[k]["score"] - release[k]["score"], 2) for k in score
             if score[k]["score"] != release[k]["score"]}
    mv = [v for k, v in moved.items() if k[0] == "niah_multivalue"]
    vt = [v for k, v in moved.items() if k[0] == "vt"]
    assert len(mv) == 6 and all(v in (0.25, 0.5) for v in mv) and sorted(k[0] for k in moved) == \
        ["niah_multivalue"] * 6 + ["vt"] * 6
    assert sum(v > 0 for v in vt) == 3 and sum(v < 0 for v in vt) == 3 and all(abs(v) == 0.2 for v in vt)
    assert "six prompts up by one or two of their four values, none down" in flat
    score, release, _ = seed1
    moved = {k: round(score[k]["score"] - release[k]["score"], 1) for k in score
             if score[k]["score"] != release[k]["score"]}
    assert moved == {("vt", 1): -0.2, ("vt", 12): 0.2, ("vt", 16): -0.2, ("vt", 17): -0.2}
    assert "(one chain up, three down, by one value each)" in flat
    # the card's share: texts equal across machines under each rule, and the prompts each rule changed
    s1 = "docs/results/seed1_64k_cpu"
    cpu_score, cpu_release = runs(f"{s1}/pages_ties"), runs(f"{s1}/pages", mode="lsa")
    assert sum(score[k]["prediction"] == cpu_score[k]["prediction"] for k in score) == 37
    assert sum(release[k]["prediction"] == cpu_release[k]["prediction"] for k in release) == 32
    changed_dev = {k for k in score if score[k]["prediction"] != release[k]["prediction"]}
    changed_cpu = {k for k in cpu_score if cpu_score[k]["prediction"] != cpu_release[k]["prediction"]}
    assert (len(changed_dev), len(changed_cpu), len(changed_dev & changed_cpu)) == (11, 11, 7)
    assert "the rule changes 11 of the 40 texts on the device and 11 on the CPU, 7 of them the same prompts" in flat

    # the chip held equal: both rules on this CPU's own multi-value prompts (none of them the device's)
    mv = "docs/results/multivalue_64k_cpu"
    cpu_score, cpu_release = runs(f"{mv}/pages_ties"), runs(f"{mv}/pages")
    keys = sorted(cpu_score)
    assert sorted(cpu_release) == keys and len(keys) == 20 and {k[0] for k in keys} == {"niah_multivalue"}
    assert all(cpu_score[k]["prompt_sha"] == cpu_release[k]["prompt_sha"] != table[0][k]["prompt_sha"] for k in keys)
    v = paired_summary([cpu_score[k] for k in keys], [cpu_release[k] for k in keys])
    pair = [accuracy([d[k] for k in keys]) for d in (cpu_score, cpu_release)]
    assert f"our rule {pair[0]}% against {pair[1]}%, **{v['difference']:+.1f} {format_interval(v['interval'])}**" \
        in flat
    steps = [round(cpu_score[k]["score"] - cpu_release[k]["score"], 2) for k in keys]
    assert sorted(x for x in steps if x) == [-0.25] + [0.25] * 5
    assert sum(cpu_score[k]["prediction"] == cpu_release[k]["prediction"] for k in keys) == 8
    assert "(five prompts up by one value, one down; 8 of 20 texts equal)" in flat
    assert {r["selected_mean"] for d in (cpu_score, cpu_release) for r in d.values()} == {768.0}
    for d, ties in ((f"{mv}/pages_ties", "score"), (f"{mv}/pages", "recent")):
        config = json.loads((REPO / d / "config.json").read_text())["fingerprint"]
        assert (config.get("page_ties", "recent"), config["page_size"], config["max_pages"], config["fetch_top"],
                config["attention"]) == (ties, 8, 96, 64, "window"), d

    # 128K: the rows by task, from the stored runs; full's first 23 runs are section 11e's
    e = f"{new}/e128k_partial"
    lsa, full = runs(e, mode="lsa"), runs(e, mode="full")
    old = runs(f"{dev}/e128k_partial")
    assert (len(full), len(lsa), len(old)) == (40, 35, 23) and all(full[k] == old[k] for k in old)
    assert sorted(k[1] for k in full if k not in lsa) == [11, 13, 15, 17, 19]
    for label, pick in (("single needles", lambda k: k[0] == "niah_single_1"),
                        ("variable tracking, prompts 0-10", lambda k: k[0] == "vt" and k[1] <= 10),
                        ("variable tracking, all 15 with LSA", lambda k: k[0] == "vt")):
        keys = sorted(k for k in lsa if pick(k))
        ls, fl = [lsa[k] for k in keys], [full[k] for k in keys]
        v, m = paired_summary(ls, fl), summarize(ls)["modes"][0]
        lower, higher = (sum(cmp(lsa[k]["score"], full[k]["score"]) for k in keys)
                         for cmp in (lambda a, b: a < b, lambda a, b: a > b))
        assert (f"| {label} | {len(keys)} | {accuracy(fl)} | {accuracy(ls)} | {v['difference']:+.1f} | "
                f"{format_interval(v['interval'])} | {lower} / {higher} | {m['csa_kv_ratio']:.3f} | "
                f"{m['footprint_ratio']:.3f} |") in section, label
    # the single needles as this CPU's section 11g: every score equal, 17 texts
    cpu = runs("docs/results/e128k_cpu/lsa")
    keys = [k for k in lsa if k[0] == "niah_single_1"]
    assert all(cpu[k]["score"] == lsa[k]["score"] for k in keys)
    assert sum(cpu[k]["prediction"] == lsa[k]["prediction"] for k in keys) == 17 and "(17 texts equal)" in flat
    config = json.loads((REPO / e / "config.json").read_text())["fingerprint"]
    assert config["fetch_top"] == 64 and not {"distance_cap", "page_size", "attention"} & set(config)  # as exported

    # the stored tables, byte for byte
    names = ["--name", "score ties", "--versus-name", "release ties"]
    _variant_tables(monkeypatch,
                    (f"{new}/ties_64k_variant.md", [f"{new}/ties_64k", f"{t}/run2_fetch_top64/eval_64k", "--versus",
                                                    f"{t}/run3_pages/eval_64k_pages", *names]),
                    (f"{new}/ties_seed1_64k_variant.md", [f"{new}/ties_seed1_64k", f"{dev}/seed1_64k", "--versus",
                                                          f"{dev}/seed1_64k_pages", *names]))
    out = _long_tables(monkeypatch, f"{new}/e128k_tables.md", e)
    assert "pages +1.9 [-3.2, 7.0], with our page tie rule +4.1 [-1.1, 9.2] (H100; +2.2 [0.3, 4.2] over" in opening
    assert "prompts, on an H100, 14.5 [-23.6, -5.5] at 33.2%, section 11o)" in opening.replace("\n  ", " ")
    assert _cells(out, "| 131,072 | lsa |")[2:7] == ["35", "16.7", "[7.8, 26.7]", "-26.7", "[-38.0, -15.5]"]


def test_section11p_hisparse_on_code_haystacks_is_the_raw_outputs(monkeypatch):
    """Section 11p: tables.py's output on the stored runs byte for byte and quoted, hisparse's texts equal to full's
    on every prompt, LSA's counts, and the prompts none of the device's."""
    import json

    section, opening, flat = _results_section("## 11p.")
    d = "docs/results/hisparse_16k_code_cpu"
    out = _long_tables(monkeypatch, f"{d}/tables.md", d)
    _rows_quoted(out, section, ("| 16,384 |",), 3)
    key = ("task", "index")
    full, lsa, hisparse = (_stored_runs(f"{d}/runs.jsonl.gz", key, mode=m) for m in ("full", "lsa", "hisparse"))
    keys = sorted(full)
    assert len(keys) == 40 and sorted(lsa) == sorted(hisparse) == keys
    assert all(hisparse[k]["prediction"] == full[k]["prediction"] for k in keys) and "(40 of 40 texts equal;" in flat
    assert (sum(lsa[k]["score"] == full[k]["score"] for k in keys),
            sum(lsa[k]["prediction"] == full[k]["prediction"] for k in keys)) == (36, 20)
    assert "36 of 40 scores and 20 of 40 texts equal to full's" in flat
    device = _stored_runs("docs/results/table_long_h200/run2_fetch_top64/eval_16k/runs.jsonl.gz", key, mode="full")
    assert all(device[k]["prompt_sha"] != full[k]["prompt_sha"] for k in keys)
    config = json.loads((REPO / d / "config.json").read_text())["fingerprint"]
    assert (config["fetch_top"], config["attention"], config["chunk_size"]) == (64, "window", 4096)
    # 64K, prompts 0-4 of each task
    d = "docs/results/hisparse_64k_code_cpu"
    out = _long_tables(monkeypatch, f"{d}/tables.md", d)
    _rows_quoted(out, section, ("| 65,536 |",), 3)
    full, lsa, hisparse = (_stored_runs(f"{d}/runs.jsonl.gz", key, mode=m) for m in ("full", "lsa", "hisparse"))
    keys = sorted(full)
    assert keys == [(t, i) for t in ("niah_multikey_1", "niah_multivalue") for i in range(5)]
    assert sorted(lsa) == sorted(hisparse) == keys and all(hisparse[k]["prediction"] == full[k]["prediction"]
                                                           for k in keys)
    moved = {k: lsa[k]["score"] - full[k]["score"] for k in keys if lsa[k]["score"] != full[k]["score"]}
    assert moved == {("niah_multikey_1", 1): -1.0, ("niah_multikey_1", 3): 1.0, ("niah_multikey_1", 4): -1.0,
                     ("niah_multivalue", 2): -0.25}
    assert "(10 of 10 texts)" in flat and "(a 64K run takes 94-115 s here, two at a time)" in flat
    seconds = [r["timing"]["run_seconds"] for d in (full, lsa, hisparse) for r in d.values()]
    assert (round(min(seconds)), round(max(seconds))) == (94, 115)
    assert "40 of 40 texts at 16K (8.4% of the CSA KV, total 0.375 against LSA's 0.310) and 10 of 10 at 64K (2.2%," in \
        opening.replace("\n  ", " ")


def test_section11q_same_chip_ties_and_the_device_cap_are_the_raw_outputs(monkeypatch):
    """Section 11q: both page tie rules on the H100 (rows recomputed from the stored runs; the release's rule there
    gives the H200's texts), 128K complete and the distance cap on the device by task, the stored tables byte for
    byte, the runs' settings, and the agreements with this CPU's runs that the text quotes."""
    import json

    from fm_eval.intervals import format_interval, paired_summary
    from fm_eval.report import summarize

    section, opening, flat = _results_section("## 11q.")
    flat = flat.replace("\n", " ")  # the paragraphs' line breaks too
    t = "docs/results/table_long_h200"
    new, old, dev = f"{t}/run7_h100", f"{t}/run6_h100", f"{t}/run5_heldout_limits"
    key = ("task", "index")
    runs = lambda path, **where: _stored_runs(f"{path}/runs.jsonl.gz", key, **where)  # noqa: E731
    accuracy = lambda rs: f"{summarize(list(rs))['modes'][0]['accuracy']:.1f}"  # noqa: E731

    release, release_h200 = runs(f"{new}/ties_recent_64k"), runs(f"{t}/run3_pages/eval_64k_pages", mode="lsa")
    score = {k: r for k, r in runs(f"{old}/ties_64k").items() if k in release}
    full = runs(f"{t}/run2_fetch_top64/eval_64k", mode="full")
    assert _ties_row("the table's multi-value needles and variable tracking, 64K", score, release, full) in section
    release1, release1_h200 = runs(f"{new}/ties_recent_seed1_64k"), runs(f"{dev}/seed1_64k_pages", mode="lsa")
    score1, full1 = runs(f"{old}/ties_seed1_64k"), runs(f"{dev}/seed1_64k", mode="full")
    assert _ties_row("single needles and variable tracking, seed 1, 64K", score1, release1, full1) in section
    # the release's rule on the H100 gives the H200's texts on every prompt
    for h100, h200 in ((release, release_h200), (release1, release1_h200)):
        assert len(h100) == 40 and all(h100[k]["prediction"] == h200[k]["prediction"] for k in h100)
    assert "gives the H200's texts exactly, on all 40 of the table's prompts" in flat and "all 40 of seed 1's" in flat
    for d in (f"{new}/ties_recent_64k", f"{new}/ties_recent_seed1_64k"):
        config = json.loads((REPO / d / "config.json").read_text())["fingerprint"]
        assert config.get("page_ties", "recent") == "recent", d
        assert (config["page_size"], config["max_pages"], config["fetch_top"]) == (8, 96, 64), d

    # 128K: full, LSA as exported and LSA with the cap, by task and pooled
    full, lsa, cap = runs(f"{new}/e128k", mode="full"), runs(f"{new}/e128k", mode="lsa"), runs(f"{new}/e128k_cap")
    assert len(full) == len(lsa) == len(cap) == 40
    rows = {"single needles": "niah_single_1", "variable tracking": "vt"}
    for label, task in rows.items():
        f, a, c = ([d[k] for k in sorted(d) if k[0] == task] for d in (full, lsa, cap))
        vf, va = paired_summary(c, f), paired_summary(c, a)
        row = (f"| {label} | 20 | {accuracy(f)} | {accuracy(a)} | {accuracy(c)} | {vf['difference']:+.1f} | "
               f"{format_interval(vf['interval'])} | {va['difference']:+.1f} | {format_interval(va['interval'])} | | |")
        assert row in section, row
    vt = paired_summary([lsa[k] for k in sorted(lsa) if k[0] == "vt"], [full[k] for k in sorted(full) if k[0] == "vt"])
    assert f"LSA 14.0% against 28.0%, **{vt['difference']:+.1f} {format_interval(vt['interval'])}**" in flat
    config = json.loads((REPO / new / "e128k_cap/config.json").read_text())["fingerprint"]
    assert (config["distance_cap"], config["fetch_top"]) == (65536, 64) and "page_size" not in config
    # the device against this CPU's runs of the same prompts: equal scores (and texts) where both ran
    cpu_cap = {**runs("docs/results/e128k_cpu/lsa_cap", mode="lsa"), **runs("docs/results/e128k_cpu/vt_cap20",
                                                                            mode="lsa")}
    same = {task: [cap[k]["score"] == cpu_cap[k]["score"] for k in cap if k[0] == task] for task in rows.values()}
    texts = {task: sum(cap[k]["prediction"] == cpu_cap[k]["prediction"] for k in cap if k[0] == task)
             for task in rows.values()}
    assert (sum(same["niah_single_1"]), sum(same["vt"]), texts["niah_single_1"], texts["vt"]) == (20, 19, 16, 16)
    assert "the CPU's capped scores on 39 of the 40 prompts" in opening.replace("\n  ", " ")
    vt_cpu = runs("docs/results/e128k_cpu/vt_cap20", mode="full"), runs("docs/results/e128k_cpu/vt_nocap", mode="lsa")
    for device, cpu, equal_texts in ((full, vt_cpu[0], 7), (lsa, vt_cpu[1], 5)):
        ks = sorted(k for k in cpu if k[0] == "vt")
        assert [k[1] for k in ks] == list(range(11, 20)) and all(device[k]["score"] == cpu[k]["score"] for k in ks)
        assert sum(device[k]["prediction"] == cpu[k]["prediction"] for k in ks) == equal_texts
    assert "give the CPU's score on all 9 (texts 7 and 5 of 9)" in flat

    # the stored tables, byte for byte
    names = ["--name", "score ties", "--versus-name", "release ties"]
    *_, capped = _variant_tables(
        monkeypatch,
        (f"{new}/ties_64k_variant.md", [f"{old}/ties_64k", f"{t}/run2_fetch_top64/eval_64k", "--versus",
                                        f"{new}/ties_recent_64k", *names]),
        (f"{new}/ties_seed1_64k_variant.md", [f"{old}/ties_seed1_64k", f"{dev}/seed1_64k", "--versus",
                                              f"{new}/ties_recent_seed1_64k", *names]),
        (f"{new}/cap_variant.md", [f"{new}/e128k_cap", f"{new}/e128k", "--name", "LSA, distance cap"]))
    cap_row = _cells(capped, "| 131,072 |")
    assert f"| both tasks | 40 | 44.0 | 17.0 | {cap_row[2]} | {' | '.join(cap_row[4:10])} |" in section
    out = _long_tables(monkeypatch, f"{new}/e128k_tables.md", f"{new}/e128k")
    assert _cells(out, "| 131,072 | lsa |")[2:7] == ["40", "17.0", "[8.5, 26.5]", "-27.0", "[-38.0, -16.0]"]
    assert "**-27.0 [-38.0, -16.0]** over 40 pairs" in flat


def test_section11r_distance_cap_trained_on_the_demo_indexer_is_the_raw_outputs(monkeypatch):
    """Section 11r: the cap read from the demo export (its trained_distance, 4,032) against LSA without it, the stored
    tables byte for byte, the per-task figures and resident counts the text quotes, and the fetch diagnostic's band
    means."""
    import json

    from fm_eval.intervals import format_interval, paired_summary

    section, opening, flat = _results_section("## 11r.")
    flat = flat.replace("\n", " ")
    d = "docs/results/cap_trained_demo_cpu"
    assert json.loads((REPO / d / "export/lsa_config.json").read_text())["trained_distance"] == 4032
    cap_config = json.loads((REPO / d / "cap/config.json").read_text())
    assert cap_config["fingerprint"]["distance_cap"] == "trained"
    assert all(json.loads((REPO / d / e / "config.json").read_text())["identity"]["indexer_sha256"] ==
               cap_config["identity"]["indexer_sha256"] for e in ("base", "at4k"))  # one indexer throughout
    key = ("task", "length", "index")
    cap = _stored_runs(f"{d}/cap/runs.jsonl.gz", key, mode="lsa")
    lsa = _stored_runs(f"{d}/base/runs.jsonl.gz", key, mode="lsa")
    (out,) = _variant_tables(monkeypatch, (f"{d}/cap_variant.md", [f"{d}/cap", f"{d}/base", "--name",
                                                                    "LSA, distance cap trained"]))
    _rows_quoted(out, section, ("| 8,192 | 40 |", "| 16,384 | 40 |"), 2)
    _long_tables(monkeypatch, f"{d}/base_tables.md", f"{d}/base")
    at4k = _long_tables(monkeypatch, f"{d}/at4k_tables.md", f"{d}/at4k")
    assert _cells(at4k, "| vt | 4,096 |")[2:] == ["85.0", "24.0"]
    for length, label in ((8192, "at 8K"), (16384, "at 16K")):
        ks = sorted(k for k in cap if k[:2] == ("vt", length))
        s = paired_summary([cap[k] for k in ks], [lsa[k] for k in ks])
        quoted = f"{s['difference']:+.1f} {format_interval(s['interval'])}"
        assert f"-> 17.0% {label} ({quoted}" in flat, quoted
        resident = [round(sum(r[k]["selected_mean"] for k in ks) / len(ks)) for r in (cap, lsa)]
        assert f"{resident[0]} against {resident[1]} {label}" in flat
    ks = sorted(k for k in cap if k[:2] == ("vt", 8192))
    assert (sum(cap[k]["score"] > lsa[k]["score"] for k in ks), sum(cap[k]["score"] < lsa[k]["score"] for k in ks)) \
        == (3, 12) and "3 chains up, 12 down" in flat
    # the diagnostic: prompt 1's far band (beyond 4,096 tokens) per layer, and layer 2's count over the threshold
    fetch = [json.loads(line)["fetch"] for name in ("", "_cap4032")
             for line in (REPO / d / f"needle_fetch_vt8k_i0_i1{name}.jsonl").read_text().splitlines()]
    plain, capped = fetch[1], fetch[3]
    means = [f"{plain['layers'][L]['by_distance'][1]['mean_score']:.3f} -> "
             f"{capped['layers'][L]['by_distance'][1]['mean_score']:.3f}" for L in ("2", "4", "6")]
    assert f"{means[0]}, {means[1]}, {means[2]} in layers" in flat, means
    assert (capped["layers"]["2"]["by_distance"][1]["above"], plain["layers"]["2"]["by_distance"][1]["above"]) == \
        (103, 15) and all(f["needle_resident"] for f in fetch)
    assert "(-6.0 [-11.0, -1.0] at 8K over both tasks)" in opening.replace("\n  ", " ")


def test_section11s_neighbours_and_the_deeper_floor_are_the_raw_outputs(monkeypatch):
    """Section 11s: the stored variant tables byte for byte, its table's rows rebuilt from them, the runs' settings,
    and the per-prompt figures the text quotes."""
    import json

    section, opening, flat = _results_section("## 11s.")
    flat = flat.replace("\n", " ")
    r, dev = "docs/results/neighbours_cpu", "docs/results/table_long_h200/run5_heldout_limits"
    c32, pages64 = "docs/results/varied_32k_cpu", "docs/results/seed1_64k_cpu/pages"
    names = {"nb1": "lsa + neighbours 1", "top170": "lsa, floor 170"}
    cases = []
    for v, name in names.items():
        cases += [(f"{r}/seed1_64k_{v}_variant.md", [f"{r}/seed1_64k_{v}", f"{dev}/seed1_64k", "--name", name]),
                  (f"{r}/seed1_64k_{v}_vs_pages.md", [f"{r}/seed1_64k_{v}", f"{dev}/seed1_64k", "--versus", pages64,
                                                      "--name", name, "--versus-name", "pages (CPU)"])]
        for s in ("held_out", "seen"):
            cases += [(f"{r}/varied_32k_{v}_{s}_variant.md", [f"{r}/varied_32k_{v}", f"{c32}/{s}", "--name", name]),
                      (f"{r}/varied_32k_{v}_{s}_vs_pages.md", [f"{r}/varied_32k_{v}", f"{c32}/{s}", "--versus",
                                                               f"{c32}/{s}_pages", "--name", name,
                                                               "--versus-name", "pages"])]
    cases += [(f"{r}/seed1_64k_nb1_vs_floor170.md", [f"{r}/seed1_64k_nb1", f"{dev}/seed1_64k", "--versus",
                                                     f"{r}/seed1_64k_top170", "--name", names["nb1"],
                                                     "--versus-name", "floor 170"])]
    cases += [(f"{r}/varied_32k_nb1_{s}_vs_floor170.md", [f"{r}/varied_32k_nb1", f"{c32}/{s}", "--versus",
                                                          f"{r}/varied_32k_top170", "--name", names["nb1"],
                                                          "--versus-name", "floor 170"]) for s in ("held_out", "seen")]
    table = "docs/results/table_long_h200"
    cases += [(f"{r}/seed0_64k_nb1_variant.md", [f"{r}/seed0_64k_nb1", f"{table}/run2_fetch_top64/eval_64k", "--name",
                                                 names["nb1"]]),
              (f"{r}/seed0_64k_nb1_vs_pages.md", [f"{r}/seed0_64k_nb1", f"{table}/run2_fetch_top64/eval_64k",
                                                  "--versus", f"{table}/run3_pages/eval_64k_pages", "--name",
                                                  names["nb1"], "--versus-name", "pages (H200)"])]
    outs = dict(zip([stored for stored, _ in cases], _variant_tables(monkeypatch, *cases)))

    # the table's rows from the stored tables: accuracy, the three paired differences, the variant's footprints
    both, nb1_only = (("nb1", "LSA + neighbours 1"), ("top170", "LSA, floor 170")), (("nb1", "LSA + neighbours 1"),)
    rows = (("the table's prompts (seed 0), single needles and variable tracking, 64K", "seed0_64k_{v}",
             "| 65,536 | 40 |", nb1_only),
            ("seed 1, single needles and variable tracking, 64K", "seed1_64k_{v}", "| 65,536 | 40 |", both),
            ("held-out formats, 32K", "varied_32k_{v}_held_out", "| 32,768 | 20 |", both),
            ("seen formats, 32K", "varied_32k_{v}_seen", "| 32,768 | 20 |", both))
    for label, stem, prefix, variants in rows:
        for first, (v, mode) in enumerate(variants):
            lsa = _cells(outs[f"{r}/{stem.format(v=v)}_variant.md"], prefix)
            vs_pages = _cells(outs[f"{r}/{stem.format(v=v)}_vs_pages.md"], prefix)
            head = "| |" if first else f"| {label} |"
            row = (f"{head} {lsa[1]} | {mode} | {lsa[2]} | {lsa[4]} {lsa[5]} | {lsa[6]} {lsa[7]} "
                   f"| {vs_pages[6]} {vs_pages[7]} | {lsa[8].split(' / ')[0]} | {lsa[9].split(' / ')[0]} "
                   f"| {lsa[10].split(' / ')[0]} |")
            assert row in section, row
    # the settings: the table's export and floor; the variants' options only where named
    sha = json.loads((REPO / f"{dev}/seed1_64k/config.json").read_text())["identity"]["indexer_sha256"]
    for d, top, w in (("seed0_64k_nb1", 64, 1), ("seed1_64k_nb1", 64, 1), ("varied_32k_nb1", 64, 1),
                      ("seed1_64k_top170", 170, 0),
                      ("varied_32k_top170", 170, 0)):
        config = json.loads((REPO / r / d / "config.json").read_text())
        fingerprint = config["fingerprint"]
        assert (fingerprint["fetch_top"], fingerprint.get("fetch_neighbours", 0), fingerprint["attention"],
                fingerprint["chunk_size"], "page_size" in fingerprint) == (top, w, "window", 4096, False), d
        assert config["identity"]["indexer_sha256"] == sha, d
    # seed 1 prompt by prompt
    key = ("task", "index")
    nb1 = _stored_runs(f"{r}/seed1_64k_nb1/runs.jsonl.gz", key, mode="lsa")
    lsa = _stored_runs(f"{dev}/seed1_64k/runs.jsonl.gz", key, mode="lsa", length=65536)
    full = _stored_runs(f"{dev}/seed1_64k/runs.jsonl.gz", key, mode="full", length=65536)
    pages = _stored_runs(f"{pages64}/runs.jsonl.gz", key, mode="lsa")
    gained = [k[1] for k in sorted(nb1) if k[0] == "niah_single_1" and nb1[k]["score"] > lsa[k]["score"]]
    assert gained == [3, 4] and [pages[("niah_single_1", i)]["score"] for i in gained] == [1.0, 0.0]
    assert "neighbours answer prompts 3 and 4, which LSA missed (page recall answers 3, not 4)" in flat
    assert _above_below(nb1, lsa) == (14, 2) and _above_below(nb1, full) == (6, 2)
    assert {round(lsa[k]["score"] - nb1[k]["score"], 1) for k in nb1 if nb1[k]["score"] < lsa[k]["score"]} == {0.2}
    assert "above LSA on 14 prompts and below on 2 (two chains by one name of five); above full on 6, below on 2" \
        in flat
    # the two 32K prompts LSA and the deeper floor lose to the last digits, answered with neighbours
    for s, task, i, said, answer in (("held_out", "varied_new_all", 3, "1565166", "1565002"),
                                     ("seen", "varied_seen", 5, "7719176", "7719179")):
        base = _stored_runs(f"{c32}/{s}/runs.jsonl.gz", key, mode="lsa")[(task, i)]
        floor = _stored_runs(f"{r}/varied_32k_top170/runs.jsonl.gz", key)[(task, i)]
        wide = _stored_runs(f"{r}/varied_32k_nb1/runs.jsonl.gz", key)[(task, i)]
        assert base["prediction"].startswith(f" {said}") and floor["prediction"].startswith(f" {said}")
        assert base["answers"] == [answer] and wide["score"] == 1.0
        assert f"{said} for {answer}" in flat
    # the comparison paragraph's figures: LSA's and page recall's from the stored tables
    lsa64 = _cells(outs[f"{r}/seed1_64k_nb1_variant.md"], "| 65,536 | 40 |")
    pg64 = _cells(outs[f"{r}/seed1_64k_nb1_vs_pages.md"], "| 65,536 | 40 |")
    assert (lsa64[8].split(" / ")[1], lsa64[10].split(" / ")[1], pg64[8].split(" / ")[1],
            pg64[10].split(" / ")[1]) == ("0.021", "325.9", "0.048", "767.6")
    assert "LSA 59.0% at 0.021 of the CSA KV (325.9 entries), page recall 68.5% at 0.048 (767.6 entries)" in flat
    # the table's prompts: the single needles gained, the per-task figures, and the opening's rows
    t64 = f"{table}/run2_fetch_top64/eval_64k/runs.jsonl.gz"
    nb0 = _stored_runs(f"{r}/seed0_64k_nb1/runs.jsonl.gz", key)
    lsa0, full0 = _stored_runs(t64, key, mode="lsa", length=65536), _stored_runs(t64, key, mode="full", length=65536)
    assert [k[1] for k in sorted(nb0) if k[0] == "niah_single_1" and nb0[k]["score"] > lsa0[k]["score"]] == [1, 4]
    assert all(nb0[k]["score"] == full0[k]["score"] for k in nb0 if k[0] == "niah_single_1")
    per_task = _cells(outs[f"{r}/seed0_64k_nb1_variant.md"], "| vt | 65,536 |")
    assert per_task[2:] == ["61.0", "57.0", "67.0"] and "67.0% against full's 61.0% and LSA's 57.0%" in flat
    assert "neighbours answer prompts 1 and 4" in flat
    assert all(nb0[k]["prompt_sha"] == full0[k]["prompt_sha"] for k in nb0) and len(nb0) == 40  # the device's prompts
    assert all(nb1[k]["prompt_sha"] == full[k]["prompt_sha"] for k in nb1) and len(nb1) == 40
    oracle0 = _stored_runs(t64, key, mode="oracle", length=65536)
    mean = lambda runs: f"{100 * sum(runs[k]['score'] for k in nb0) / len(nb0):.1f}%"  # noqa: E731
    assert f"LSA {mean(lsa0)} (326.4 entries), page recall 75.5%" in flat and f"the oracle {mean(oracle0)};" in flat
    assert ("| | 32K | **not met** by LSA alone; met with page recall and with neighbours (ours, CPU) | LSA -10.0 "
            "[-25.0, 0.0]; pages +0.0; neighbours +0.0 (100% / 100%, 5.4% of the CSA KV) | 11e, 11f, 11s |") in opening
    assert "neighbours +3.0 [-1.0, 7.0] (seed 1: +1.5 [-2.0, 4.5]) at 2.6% of the CSA KV," in opening


def test_section11t_neighbours_at_the_short_end_varied_64k_and_the_code_tasks_are_the_raw_outputs(monkeypatch):
    """Section 11t: the stored variant tables byte for byte (``--tasks`` splitting one evaluation's seen and held-out
    formats), its table's rows rebuilt from them, the runs' settings, and the per-prompt figures the text quotes."""
    import json

    section, opening, flat = _results_section("## 11t.")
    flat = flat.replace("\n", " ")
    r, name = "docs/results/neighbours_cpu", "lsa + neighbours 1"
    dev, p64, short = ("docs/results/table_long_h200/run5_heldout_limits/varied_64k", "docs/results/varied_64k_cpu",
                       "docs/results/short_end_top64_cpu")
    tasks = {"seen": "varied_seen", "held_out": "varied_new_all"}
    cases = [(f"{r}/short_end_nb1_variant.md", [f"{r}/short_end_nb1", short, "--name", name]),
             (f"{r}/code_32k_nb1_variant.md", [f"{r}/code_32k_nb1", f"{r}/code_32k", "--name", name]),
             (f"{r}/code_64k_nb1_variant.md", [f"{r}/code_64k_nb1", f"{r}/code_64k", "--name", name])]
    for s, task in tasks.items():
        common = ["--name", name, "--equal-prompts", "--tasks", task]
        cases += [(f"{r}/varied_64k_nb1_{s}_variant.md", [f"{r}/varied_64k_nb1", dev, *common]),
                  (f"{r}/varied_64k_nb1_{s}_vs_pages.md", [f"{r}/varied_64k_nb1", dev, "--versus", f"{p64}/{s}_pages",
                                                           "--versus-name", "pages (CPU)", *common])]
    outs = dict(zip([stored for stored, _ in cases], _variant_tables(monkeypatch, *cases)))

    # the section's rows from the stored tables
    rows = (("the short end: needles, multi-value, variable tracking, multi-key", "short_end_nb1", "| 2,048 |", None),
            ("", "short_end_nb1", "| 4,096 |", None),
            ("held-out formats", "varied_64k_nb1_held_out", "| 65,536 |", "varied_64k_nb1_held_out_vs_pages"),
            ("seen formats", "varied_64k_nb1_seen", "| 65,536 |", "varied_64k_nb1_seen_vs_pages"),
            ("code-haystack tasks: multi-value, multi-key", "code_32k_nb1", "| 32,768 |", None),
            ("", "code_64k_nb1", "| 65,536 |", None))
    _neighbours_rows_quoted(outs, section, [(label, f"{r}/{stem}", prefix, pages and f"{r}/{pages}")
                                            for label, stem, prefix, pages in rows])
    # --tasks by hand: each table counts its own task's prompts whose digests equal the device's (16 seen, 20 held out)
    key = ("task", "index")
    nb1 = _stored_runs(f"{r}/varied_64k_nb1/runs.jsonl.gz", key)
    full = _stored_runs(f"{dev}/runs.jsonl.gz", key, mode="full")
    for s, task in tasks.items():
        same = sum(k[0] == task and nb1[k]["prompt_sha"] == full[k]["prompt_sha"] for k in nb1)
        assert _cells(outs[f"{r}/varied_64k_nb1_{s}_variant.md"], "| 65,536 |")[1] == str(same)
        assert same == {"seen": 16, "held_out": 20}[s]
    # the settings: the table's export and floor, width 1; the short end eager at chunk 512 as its base, else window
    sha = json.loads((REPO / f"{dev}/config.json").read_text())["identity"]["indexer_sha256"]
    for d, attention, chunk in (("short_end_nb1", None, 512), ("varied_64k_nb1", "window", 4096),
                                ("code_32k", "window", 4096), ("code_32k_nb1", "window", 4096),
                                ("code_64k", "window", 4096), ("code_64k_nb1", "window", 4096)):
        config = json.loads((REPO / r / d / "config.json").read_text())
        fp = config["fingerprint"]
        assert (fp["fetch_top"], fp.get("fetch_neighbours", 0), fp.get("attention"), fp["chunk_size"]) == \
            (64, 0 if d in ("code_32k", "code_64k") else 1, attention, chunk), d
        assert config["identity"]["indexer_sha256"] == sha, d
    # the short end: the chain repaired, the texts equal to full's
    key3 = ("task", "length", "index")
    wide = _stored_runs(f"{r}/short_end_nb1/runs.jsonl.gz", key3)
    sfull, slsa = (_stored_runs(f"{short}/runs.jsonl.gz", key3, mode=m) for m in ("full", "lsa"))
    assert [k for k in wide if len({wide[k]["score"], sfull[k]["score"], slsa[k]["score"]}) > 1] == [("vt", 2048, 3)]
    assert (sfull[("vt", 2048, 3)]["score"], slsa[("vt", 2048, 3)]["score"]) == (0.8, 0.6)
    same = [sum(x[k]["prediction"] == sfull[k]["prediction"] for k in wide) for x in (wide, slsa)]
    assert same == [140, 137] and "on 140 of the 160 prompts (LSA's on 137)" in flat
    # the seen formats at 64K: prompts 3 and 6 gained, none of LSA's lost
    lsa = _stored_runs(f"{dev}/runs.jsonl.gz", key, mode="lsa")
    pages = _stored_runs(f"{p64}/seen_pages/runs.jsonl.gz", key)
    seen = [k for k in nb1 if k[0] == "varied_seen" and nb1[k]["prompt_sha"] == full[k]["prompt_sha"]]
    assert sorted(k[1] for k in seen if nb1[k]["score"] > lsa[k]["score"]) == [3, 6]
    assert [pages[("varied_seen", i)]["score"] for i in (3, 6)] == [1.0, 0.0]
    assert not [k for k in seen if nb1[k]["score"] < lsa[k]["score"]]
    # the code-haystack tasks: above and below full and LSA, and the leading digits LSA kept
    code = _stored_runs(f"{r}/code_32k_nb1/runs.jsonl.gz", key)
    cfull, clsa = (_stored_runs(f"{r}/code_32k/runs.jsonl.gz", key, mode=m) for m in ("full", "lsa"))
    assert _above_below(code, cfull) == (9, 0) and _above_below(code, clsa) == (7, 2)
    assert sorted(k for k in code if code[k]["score"] < clsa[k]["score"]) == [("niah_multikey_1", 1),
                                                                              ("niah_multivalue", 12)]
    for i, said, answer in ((0, "8172241", "8172253"), (2, "6645867", "6645354"), (11, "7578685", "7573096"),
                            (16, "108883780", "1088838")):
        k = ("niah_multivalue", i)
        assert f" {said}," in clsa[k]["prediction"], k
        assert answer in clsa[k]["answers"] and answer in code[k]["prediction"] and code[k]["score"] > clsa[k]["score"]
        assert f"{said} for {answer}" in flat
    # the opening's goals rows: the short end, the varied formats at 64K and the code-haystack tasks at 64K
    diff = {stem: " ".join(_cells(outs[f"{r}/{stem}_variant.md"], prefix)[4:6]) for stem, prefix in
            (("short_end_nb1", "| 2,048 |"), ("code_64k_nb1", "| 65,536 |"), ("varied_64k_nb1_seen", "| 65,536 |"))}
    four = " ".join(_cells(outs[f"{r}/short_end_nb1_variant.md"], "| 4,096 |")[4:6])
    assert f"with neighbours (CPU) {diff['short_end_nb1']}, {four} | 11, 11t |" in opening
    assert f"code-haystack tasks {diff['code_64k_nb1']} (all modes CPU)" in opening
    assert f"neighbours {diff['varied_64k_nb1_seen']} (CPU) | 11e, 11f, 11k, 11n, 11t |" in opening
    held = _cells(outs[f"{r}/varied_64k_nb1_held_out_variant.md"], "| 65,536 |")
    assert held[4:6] == ["+10.0", "[0.0, 25.0]"] and "LSA +10.0 [0.0, 25.0]; pages the same; neighbours the same" \
        in opening
    # at 64K (8 prompts per task): the counts and the two repairs quoted
    code = _stored_runs(f"{r}/code_64k_nb1/runs.jsonl.gz", key)
    cfull, clsa = (_stored_runs(f"{r}/code_64k/runs.jsonl.gz", key, mode=m) for m in ("full", "lsa"))
    assert _above_below(code, cfull) == (6, 0) and _above_below(code, clsa) == (6, 1)
    assert [k for k in code if code[k]["score"] < clsa[k]["score"]] == [("niah_multivalue", 2)]
    for k, said, answer in ((("niah_multikey_1", 2), "8470885", "8470888"),
                            (("niah_multivalue", 4), "8990270", "8993870")):
        assert f" {said}," in clsa[k]["prediction"] and answer in clsa[k]["answers"] and answer in code[k]["prediction"]
        assert code[k]["score"] > clsa[k]["score"] and f"{said} for {answer}" in flat


def test_section11u_neighbours_in_bf16_on_the_device_code_seed1_and_multiquery_are_the_raw_outputs(monkeypatch):
    """Section 11u: the stored variant tables byte for byte, the section's rows rebuilt from them, the runs' settings,
    and every count and figure the text quotes recomputed from the stored runs."""
    import json
    from statistics import mean

    section, opening, flat = _results_section("## 11u.")
    flat = flat.replace("\n", " ")
    t, r, name = "docs/results/table_long_h200", "docs/results/neighbours_cpu", "lsa + neighbours 1"
    d8 = f"{t}/run8_neighbours"
    cases = []
    for L in ("64k", "32k"):
        base = [f"{d8}/nb1_{L}", f"{t}/run2_fetch_top64/eval_{L}", "--name", name]
        cases += [(f"{d8}/nb1_{L}_variant.md", base),
                  (f"{d8}/nb1_{L}_vs_pages.md", [*base, "--versus", f"{t}/run3_pages/eval_{L}_pages",
                                                 "--versus-name", "pages"])]
    cases += [(f"{r}/{s}_nb1_variant.md", [f"{r}/{s}_nb1", f"{r}/{s}", "--name", name])
              for s in ("code_64k_s1", "mq_32k", "mq_64k")]
    outs = dict(zip([stored for stored, _ in cases], _variant_tables(monkeypatch, *cases)))

    rows = (("the table's four tasks (bf16, device)", f"{d8}/nb1_32k", "| 32,768 |", f"{d8}/nb1_32k_vs_pages"),
            ("", f"{d8}/nb1_64k", "| 65,536 |", f"{d8}/nb1_64k_vs_pages"),
            ("code-haystack tasks, seed 1 (CPU)", f"{r}/code_64k_s1_nb1", "| 65,536 |", None),
            ("multi-query needles (CPU)", f"{r}/mq_32k_nb1", "| 32,768 |", None),
            ("", f"{r}/mq_64k_nb1", "| 65,536 |", None))
    _neighbours_rows_quoted(outs, section, rows)

    # the settings: the table's export and floor, width 1; the device's eager attention, the CPU's window
    sha = json.loads((REPO / f"{t}/run5_heldout_limits/varied_64k/config.json").read_text())["identity"]
    cpu = [(f"{r}/{s}{x}", int(bool(x)), "window") for s in ("code_64k_s1", "mq_32k", "mq_64k") for x in ("", "_nb1")]
    for d, nb, attention in [(f"{d8}/nb1_{L}", 1, None) for L in ("64k", "32k")] + cpu:
        config = json.loads((REPO / d / "config.json").read_text())
        fp = config["fingerprint"]
        assert (fp["fetch_top"], fp.get("fetch_neighbours", 0), fp.get("attention"), fp["chunk_size"]) == \
            (64, nb, attention, 4096), d
        assert config["identity"]["indexer_sha256"] == sha["indexer_sha256"], d
    assert json.loads((REPO / f"{r}/code_64k_s1/config.json").read_text())["fingerprint"]["seed"] == 1

    # the device: every digest the table's, full's and LSA's accuracy, counts above and below, equal texts
    key = ("task", "index")
    for L, counts, texts in (("64k", ((19, 6), (25, 4)), (13, 7)), ("32k", ((12, 5), (8, 4)), (34, 29))):
        nb = _stored_runs(f"{d8}/nb1_{L}/runs.jsonl.gz", key)
        full, lsa = (_stored_runs(f"{t}/run2_fetch_top64/eval_{L}/runs.jsonl.gz", key, mode=m) for m in ("full", "lsa"))
        assert len(nb) == 80 and all(nb[k]["prompt_sha"] == full[k]["prompt_sha"] == lsa[k]["prompt_sha"] for k in nb)
        assert (_above_below(nb, full), _above_below(nb, lsa)) == counts, L
        assert tuple(sum(x[k]["prediction"] == full[k]["prediction"] for k in nb) for x in (nb, lsa)) == texts, L
        if L == "64k":
            assert [f"{100 * mean(x[k]['score'] for k in nb):.1f}" for x in (full, lsa)] == ["57.4", "53.9"]
            assert "against full's 57.4% and LSA's 53.9%" in flat
            assert [k for k in nb if nb[k]["score"] < full[k]["score"] and k[0] != "vt"] == [("niah_multikey_1", 15)]
    assert "Above full on 19 prompts and below on 6" in flat and "above LSA on 25, below on 4" in flat
    assert "on 13 of 80 prompts at 64K (LSA's on 7) and 34 at 32K (LSA's 29)" in flat

    # the code-haystack tasks, seed 1: LSA's two listed multi-key answers; both prompt sets together
    nb = _stored_runs(f"{r}/code_64k_s1_nb1/runs.jsonl.gz", key)
    full, lsa = (_stored_runs(f"{r}/code_64k_s1/runs.jsonl.gz", key, mode=m) for m in ("full", "lsa"))
    assert _above_below(nb, full) == (5, 0) and _above_below(nb, lsa) == (3, 2)
    assert sorted(k for k in nb if nb[k]["score"] < lsa[k]["score"]) == [("niah_multikey_1", 0), ("niah_multikey_1", 2)]
    for i in (0, 2):
        k = ("niah_multikey_1", i)
        assert nb[k]["prediction"].split()[0] == full[k]["prediction"].split()[0] != lsa[k]["answers"][0] + "."
        assert nb[k]["score"] == full[k]["score"] == 0 and lsa[k]["score"] == 1
        assert lsa[k]["prediction"].count(",") >= 3 and lsa[k]["answers"][0] in lsa[k]["prediction"]
    nb0 = _stored_runs(f"{r}/code_64k_nb1/runs.jsonl.gz", key)
    full0, lsa0 = (_stored_runs(f"{r}/code_64k/runs.jsonl.gz", key, mode=m) for m in ("full", "lsa"))
    pooled = [tuple(a + b for a, b in zip(_above_below(nb, x), _above_below(nb0, y))) for x, y in
              ((full, full0), (lsa, lsa0))]
    assert pooled == [(11, 0), (9, 3)] and f"p = {2 * 0.5 ** 11:.3f}" in flat
    assert "above full on 11 and below on none (exact sign test p = 0.001), above LSA on 9 and below on 3" in flat

    # multi-query: full answers all four on no prompt; LSA's interval from the evaluation's own table
    for L, lsa_row, counts in (("32k", "| lsa | 32,768 | 32.5 | [23.8, 42.5] | +6.2 | [-2.5, 16.2] | 20 |", (6, 1)),
                               ("64k", "| lsa | 65,536 | 15.6 | [3.1, 28.1] | +0.0 | [-15.6, 15.6] | 8 |", (4, 0))):
        assert lsa_row in (REPO / f"{r}/mq_{L}/results.md").read_text()
        full = _stored_runs(f"{r}/mq_{L}/runs.jsonl.gz", key, mode="full")
        nb = _stored_runs(f"{r}/mq_{L}_nb1/runs.jsonl.gz", key)
        assert not [k for k in full if full[k]["score"] == 1.0] and _above_below(nb, full) == counts
        assert f"{100 * mean(v['score'] for v in full.values()):.1f}" == {"32k": "26.2", "64k": "15.6"}[L]
    assert "LSA 32.5% (+6.2 [-2.5, 16.2]) and 15.6% (+0.0 [-15.6, 15.6])" in flat
    assert "above full on 6 and 4 prompts and below on 1 and 0" in flat

    # the opening: the 32K and 64K goal rows and the multi-query line
    d64 = " ".join(_cells(outs[f"{d8}/nb1_64k_variant.md"], "| 65,536 |")[4:6])
    d32 = " ".join(_cells(outs[f"{d8}/nb1_32k_variant.md"], "| 32,768 |")[4:6])
    assert f"neighbours on the device (bf16, H100) **{d64}** at 3.0% of the CSA KV" in opening
    assert f"neighbours (bf16, device) {d32} | 11, 11f, 11u |" in opening
    assert "RULER's share of them: 26.2% / 15.6%, 11u" in opening
