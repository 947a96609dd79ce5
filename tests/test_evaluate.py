"""The evaluation runner on the tiny model: decoding, scoring, budgets, oracle/hisparse, outputs, resume, CLI."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fm_eval.runner import (EvalConfig, Evaluation, EvaluationError, Reporter, evaluate, parse_lengths, parse_modes,
                            parse_prompts)
from fm_eval.tasks import generate_sample, score_prediction
from lsa_runtime.config import SessionError

TASK, LENGTH, SAMPLES, NEW, TAU = "niah_single_2", 256, 2, 4, 2
KEEP_RECENT = 8



@pytest.fixture(scope="module")
def export_dir(backbone, tmp_path_factory):
    """The ablation start point as an export: memory score = sigmoid(native indexer logit) at layers 2, 4, 6."""
    from lsa_runtime.backbone import default_memory_layers
    from lsa_runtime.memory_indexer import MemoryIndexer, MemoryIndexerConfig

    config = backbone[0].config
    mi_config = MemoryIndexerConfig.from_backbone_config(config, default_memory_layers(config),
                                                         rank=config.q_lora_rank, tau=TAU)
    mi_config = replace(mi_config, keep_recent=KEEP_RECENT)  # the 256-token prompts hold 64 entries
    return MemoryIndexer.init_from_native(backbone[0], mi_config).save_export(tmp_path_factory.mktemp("x") / "export")


@pytest.fixture(scope="module")
def all_modes(backbone, export_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "all"
    config = EvalConfig(model="tiny", modes=("full", "lsa", "hisparse", "recent", "oracle"),
                        tasks=(TASK,), lengths=(LENGTH,), samples=SAMPLES, indexer=str(export_dir),
                        max_new_tokens=NEW, tau=TAU)
    return out, evaluate(config, out, backbone=backbone)


def _sample(index, task=TASK, length=LENGTH, samples=SAMPLES):
    return generate_sample(task, _sample.tokenizer, length, seed=0, index=index, num_samples=samples)


@pytest.fixture(autouse=True)
def _tokenizer(backbone):
    _sample.tokenizer = backbone[1]


def _runs(results, mode):
    return sorted((r for r in results["runs"] if r["mode"] == mode), key=lambda r: r["index"])


def test_full_mode_matches_transformers_greedy_generate(all_modes, backbone):
    model, tokenizer = backbone
    _, results = all_modes
    for run in _runs(results, "full")[:1]:
        ids = tokenizer(_sample(run["index"]).prompt, return_tensors="pt")["input_ids"]
        reference = model.generate(ids, max_new_tokens=NEW, do_sample=False)[0, ids.shape[1]:]
        assert run["prediction"] == tokenizer.decode(reference, skip_special_tokens=True)
        assert run["stats"]["footprint_ratio"] == 1.0
        assert run["prompt_tokens"] == ids.shape[1]


def test_every_run_is_scored_against_its_sample(all_modes):
    _, results = all_modes
    assert len(results["runs"]) == 5 * SAMPLES
    for run in results["runs"]:
        sample = _sample(run["index"])
        assert run["answers"] == sample.answers and run["depth"] == sample.depth
        assert run["score"] == score_prediction(sample, run["prediction"])
        assert run["new_tokens"] <= NEW
        timing = run["timing"]  # the worker's time besides prefill and decode: the prompt, the whole run
        assert timing["batch"] == 1 and timing["prompt_seconds"] > 0
        assert timing["run_seconds"] >= run["stats"]["prefill_seconds"] + run["stats"]["decode_seconds"]
    for cell in results["summary"]["cells"]:
        scores = [r["score"] for r in _runs(results, cell["mode"])]
        assert cell["accuracy"] == pytest.approx(100 * sum(scores) / len(scores))


def test_lsa_selection_equals_the_native_logits_and_sets_the_budget(all_modes, backbone):
    """With init_from_native, sigmoid^-1 of the memory score is the native logit: the first trigger selects every
    visible entry with native logit >= 0 at any memory layer, plus the export's recency tail (checked with an
    independent capture)."""
    from lsa_runtime.backbone import default_memory_layers
    from lsa_runtime.capture import collect_logits

    model, tokenizer = backbone
    _, results = all_modes
    lsa = _runs(results, "lsa")
    for run in lsa[:1]:
        ids = torch.tensor(tokenizer(_sample(run["index"]).prompt)["input_ids"])
        logits = collect_logits(model, ids, chunk_size=64)
        n_visible = ids.numel() // 4
        layers = default_memory_layers(model.config)  # the export's layers
        best = torch.stack([logits[layer][-1, :n_visible] for layer in layers]).amax(0)
        tail = torch.arange(n_visible) >= n_visible - KEEP_RECENT  # the export's recency tail
        assert run["selected_per_trigger"][0] == int(((best >= 0) | tail).sum()) > int(tail.sum())
    budget = max(1, round(sum(r["selected_mean"] for r in lsa) / len(lsa)))
    for mode in ("recent", "oracle"):
        for run in _runs(results, mode):
            assert run["budget"] == budget
            assert max(run["selected_per_trigger"]) <= budget
    for run in _runs(results, "recent"):
        n_visible = run["prompt_tokens"] // 4
        assert run["selected_per_trigger"][0] == min(budget, n_visible)


def test_hisparse_is_lossless_with_the_shared_budget_as_buffer(all_modes):
    _, results = all_modes
    for full, his in zip(_runs(results, "full"), _runs(results, "hisparse")):
        assert his["prediction"] == full["prediction"]
        assert his["buffer_entries"] == max(his["budget"], 16)  # at least one step's top-k (16 in tiny)
        assert his["stats"]["triggers"] == 0 and his["selected_per_trigger"] is None
        assert his["stats"]["entries_fetched"] > 0


def test_outputs_table_plots_and_json(all_modes):
    out, results = all_modes
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["runs"] == results["runs"] and on_disk["format"] == "fm-index-evaluate/1"
    assert on_disk["complete"] is True
    lines = (out / "runs.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["mode"] for x in lines) == sorted(r["mode"] for r in results["runs"])
    table = (out / "results.md").read_text()
    assert "| task | length | full | lsa | hisparse | recent | oracle |" in table
    assert f"| {TASK} | {LENGTH} |" in table and "| **average** |" in table
    for mode in ("full", "lsa", "hisparse", "recent", "oracle"):
        assert f"| {mode} | {LENGTH} |" in table
    for name in ("accuracy_vs_footprint.png", "footprint_vs_length.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp*"))


def test_oracle_with_room_for_every_pick_decodes_like_full(backbone, tmp_path):
    """The oracle holds exactly what the full model's native top-k reads next: with a budget above that union
    its tokens are the full model's."""
    config = EvalConfig(model="tiny", modes=("full", "oracle"), tasks=("vt",), lengths=(256,), samples=1,
                        max_new_tokens=6, tau=TAU, budget=10_000)
    results = evaluate(config, tmp_path / "o", backbone=backbone)
    (full,), (oracle,) = _runs(results, "full"), _runs(results, "oracle")
    assert oracle["prediction"] == full["prediction"] and oracle["stats"]["triggers"] >= 2
    assert oracle["stats"]["footprint_ratio"] <= 1.0


def test_oracle_with_prefetch_decodes_like_full(backbone, tmp_path):
    """--prefetch-steps: each trigger after the first is prepared ahead on a helper thread; the oracle, told
    which window its set serves, stays lossless. The option is part of the resume fingerprint (0: absent)."""
    config = EvalConfig(model="tiny", modes=("full", "oracle"), tasks=("vt",), lengths=(256,), samples=1,
                        max_new_tokens=12, tau=4, budget=10_000, prefetch_steps=2)
    results = evaluate(config, tmp_path / "p", backbone=backbone)
    (full,), (oracle,) = _runs(results, "full"), _runs(results, "oracle")
    assert oracle["prediction"] == full["prediction"] and oracle["stats"]["triggers"] >= 3
    assert oracle["stats"]["prefetch_seconds"] > 0
    assert config.fingerprint()["prefetch_steps"] == 2
    assert "prefetch_steps" not in EvalConfig(model="tiny").fingerprint()


def test_page_recall_is_part_of_the_resume_fingerprint_only_when_on():
    on = EvalConfig(model="tiny", page_size=8, max_pages=40).check().fingerprint()
    assert (on["page_size"], on["max_pages"]) == (8, 40)
    assert "page_size" not in EvalConfig(model="tiny").check().fingerprint()  # evaluations from before it resume
    with pytest.raises(SessionError, match="page recall needs both"):
        EvalConfig(model="tiny", page_size=8).check()
    by_score = EvalConfig(model="tiny", page_size=8, max_pages=40, page_ties="score").check().fingerprint()
    assert by_score["page_ties"] == "score" and "page_ties" not in on  # the release's rule: absent, as before
    with pytest.raises(SessionError, match="page_ties"):
        EvalConfig(model="tiny", page_size=8, max_pages=40, page_ties="newest").check()


def test_fetch_neighbours_decodes_wider_sets_and_is_part_of_the_fingerprint_only_when_given(backbone, export_dir,
                                                                                           tmp_path):
    """With --fetch-neighbours 1 each trigger keeps at least the entries it kept without, and more where a selected
    entry had an unselected neighbour; the option enters the resume fingerprint only when given (absent: the
    export's, as before exports could hold it)."""
    sets = {}
    for w in (0, 1):
        config = EvalConfig(model="tiny", modes=("lsa",), tasks=(TASK,), lengths=(LENGTH,), samples=SAMPLES,
                            max_new_tokens=NEW, indexer=str(export_dir), tau=TAU, fetch_neighbours=w, threshold=0.6)
        results = evaluate(config, tmp_path / f"w{w}", backbone=backbone)
        sets[w] = [n for r in _runs(results, "lsa") for n in r["selected_per_trigger"]]
        fingerprint = json.loads((tmp_path / f"w{w}/config.json").read_text())["fingerprint"]
        assert fingerprint["fetch_neighbours"] == w
    assert "fetch_neighbours" not in EvalConfig(model="tiny").check().fingerprint()
    # an export written with neighbours (fm-index export --fetch-neighbours 1) decodes as --fetch-neighbours 1
    exported = tmp_path / "export_nb1"
    exported.mkdir()
    for f in Path(export_dir).iterdir():
        (exported / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((exported / "lsa_config.json").read_text())
    (exported / "lsa_config.json").write_text(json.dumps({**cfg, "fetch_neighbours": 1}))
    config = EvalConfig(model="tiny", modes=("lsa",), tasks=(TASK,), lengths=(LENGTH,), samples=SAMPLES,
                        max_new_tokens=NEW, indexer=str(exported), tau=TAU, threshold=0.6)
    results = evaluate(config, tmp_path / "from_export", backbone=backbone)
    assert [n for r in _runs(results, "lsa") for n in r["selected_per_trigger"]] == sets[1]
    assert len(sets[0]) == len(sets[1]) and all(a <= b for a, b in zip(sets[0], sets[1])) and sets[1] != sets[0]
    with pytest.raises(SessionError, match="fetch_neighbours"):
        EvalConfig(model="tiny", page_size=8, max_pages=40, fetch_neighbours=1).check()


def test_distance_cap_is_part_of_the_resume_fingerprint_only_when_given():
    assert EvalConfig(model="tiny", distance_cap=65536).check().fingerprint()["distance_cap"] == 65536
    assert "distance_cap" not in EvalConfig(model="tiny", distance_cap=0).check().fingerprint()
    assert "distance_cap" not in EvalConfig(model="tiny").fingerprint()  # evaluations from before it resume
    with pytest.raises(SessionError, match="distance_cap"):
        EvalConfig(model="tiny", distance_cap=-1).check()


def test_fetch_top_is_part_of_the_resume_fingerprint_only_when_given():
    assert EvalConfig(model="tiny", fetch_top=32).check().fingerprint()["fetch_top"] == 32
    assert "fetch_top" not in EvalConfig(model="tiny").fingerprint()  # evaluations from before it resume
    with pytest.raises(SessionError, match="fetch_top"):
        EvalConfig(model="tiny", fetch_top=-1).check()


def test_resume_skips_finished_runs_and_redoes_a_cut_one(backbone, tmp_path, monkeypatch):
    out = tmp_path / "r"
    config = EvalConfig(model="tiny", modes=("full", "random"), tasks=(TASK,), lengths=(256,), samples=1,
                        max_new_tokens=1, budget=4)
    first = evaluate(config, out, backbone=backbone)
    with pytest.raises(EvaluationError, match="--resume"):
        evaluate(config, out, backbone=backbone)
    with pytest.raises(EvaluationError, match="seed"):
        evaluate(EvalConfig(**{**config.__dict__, "seed": 1}), out, resume=True, backbone=backbone)

    def no_loading(self):
        raise AssertionError("a complete evaluation must not load the model again")

    with monkeypatch.context() as patch:
        patch.setattr(Evaluation, "_load", no_loading)
        again = evaluate(config, out, resume=True)
    assert again["runs"] == first["runs"]

    lines = (out / "runs.jsonl").read_text().splitlines()
    (out / "runs.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # interrupted mid-line

    class Counting(Reporter):
        decoded = 0
        started = None

        def start(self, total_runs, done=0):  # the progress bar starts at the finished runs: no burst of them
            Counting.started = (total_runs, done)

        def run_done(self, record):
            Counting.decoded += 1

    resumed = evaluate(config, out, resume=True, reporter=Counting(), backbone=backbone)
    assert Counting.decoded == 1 and Counting.started == (2, 1)
    strip = lambda runs: [{k: v for k, v in r.items() if k not in ("stats", "timing")} for r in runs]  # noqa: E731
    assert strip(resumed["runs"]) == strip(first["runs"])

    lines = (out / "runs.jsonl").read_text().splitlines()
    tampered = json.loads(lines[0])
    tampered["prompt_sha"] = "0" * 16
    (out / "runs.jsonl").write_text("\n".join([json.dumps(tampered)] + lines[1:-1]) + "\n")
    with pytest.raises(EvaluationError, match="differs"):
        evaluate(config, out, resume=True, backbone=backbone)


def test_resume_builds_only_the_prompts_with_runs_left(backbone, tmp_path, monkeypatch):
    """Three prompts, the last one's run cut: the resumed evaluation builds that prompt alone (at 128K a prompt takes
    ~10 s to build) and decodes the same record as the first evaluation."""
    import fm_eval.runner as runner

    out = tmp_path / "r"
    config = EvalConfig(model="tiny", modes=("full",), tasks=(TASK,), lengths=(256,), samples=3, max_new_tokens=1)
    first = evaluate(config, out, backbone=backbone)
    lines = (out / "runs.jsonl").read_text().splitlines()
    cut = json.loads(lines[-1])["index"]
    (out / "runs.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    built = []

    def counting(task, tokenizer, length, **kwargs):
        built.append(kwargs["index"])
        return generate_sample(task, tokenizer, length, **kwargs)

    monkeypatch.setattr(runner, "generate_sample", counting)
    resumed = evaluate(config, out, resume=True, backbone=backbone)
    assert built == [cut]
    strip = lambda runs: [{k: v for k, v in r.items() if k not in ("stats", "timing")} for r in runs]  # noqa: E731
    assert strip(resumed["runs"]) == strip(first["runs"])


def test_prompts_decode_a_subset_and_complete_the_evaluation_in_pieces(backbone, tmp_path):
    """--prompts 2, then --resume --prompts 0-1 on two workers: the same runs, record for record, as one evaluation
    of all three prompts (a subset is not part of the resume fingerprint: the prompts are the same)."""
    config = EvalConfig(model="tiny", modes=("full",), tasks=(TASK,), lengths=(256,), samples=3, max_new_tokens=NEW)
    whole = evaluate(config, tmp_path / "whole", backbone=backbone)
    out = tmp_path / "pieces"
    last = evaluate(replace(config, prompts="2").check(), out, backbone=backbone)
    assert [r["index"] for r in last["runs"]] == [2]
    pieces = evaluate(replace(config, prompts="0-1").check(), out, resume=True, workers=2)
    strip = lambda runs: [{k: v for k, v in r.items() if k not in ("stats", "timing")} for r in runs]  # noqa: E731
    assert strip(pieces["runs"]) == strip(whole["runs"]) and len(whole["runs"]) == 3


def test_option_errors_are_user_errors(export_dir):
    assert parse_modes("oracle,full,lsa") == ("full", "lsa", "oracle")
    assert parse_prompts("9,0,3,7-9", 10) == (0, 3, 7, 8, 9)
    assert parse_lengths("4k,2048,2k") == (2048, 4096)
    for bad, match in [(dict(modes="full,fast"), "unknown mode"), (dict(modes="lsa"), "--indexer"),
                       (dict(modes="recent"), "budget"), (dict(lengths="1k,abc"), "--lengths"),
                       (dict(lengths="32"), "too short"), (dict(samples=0), "--samples"),
                       (dict(tasks="niah"), "unknown task"), (dict(prefetch_steps=-1), "--prefetch-steps"),
                       (dict(prefetch_steps=4, tau=4), "--prefetch-steps"),
                       (dict(samples=3, prompts="1,3"), "0 to 2"), (dict(prompts="2-1"), "backwards"),
                       (dict(prompts="a"), "--prompts"), (dict(prompts=","), "no prompt")]:
        with pytest.raises(EvaluationError if match != "unknown task" else Exception, match=match):
            EvalConfig(model="tiny", **bad).check()
    EvalConfig(model="tiny", modes="lsa,recent", indexer=str(export_dir)).check()


def test_cli_evaluate(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["evaluate", "--model", "tiny", "--modes", "full", "--tasks", TASK,
                                      "--lengths", "256", "--samples", "1", "--max-new-tokens", "1",
                                      "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["runs"][0]["mode"] == "full"
    score = 100 * results["runs"][0]["score"]  # one prompt: its 95% interval is its own score
    assert results["summary"]["modes"][0]["accuracy_interval"] == [score, score]
    assert f"| full | 256 | {score:.1f} | [{score:.1f}, {score:.1f}] | - | - | - |" in (out / "results.md").read_text()
    bad = CliRunner().invoke(app, ["evaluate", "--model", "tiny", "--modes", "recent", "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2
    assert "error:" in bad.output and "budget" in bad.output
    for flag, value in (("--fetch-top", "-3"), ("--chunk-size", "0"), ("--distance-cap", "-1"),
                        ("--fetch-neighbours", "-1")):
        bad = CliRunner().invoke(app, ["evaluate", "--model", "tiny", "--modes", "full", flag, value,
                                       "--out", str(tmp_path / "b")])
        assert bad.exit_code == 2 and flag in bad.output and not (tmp_path / "b").exists(), bad.output
    assert not Path(tmp_path / "b").exists()
    for args, message in ((["--dtype", "float64"], "--dtype float64 is not supported"),
                          (["--device", "gpu0"], "--device gpu0 is not a device"),
                          (["--batch", "0"], "--batch must be an integer >= 1, got 0"),
                          (["--workers", "0"], "--workers must be an integer >= 1, got 0"),
                          (["--static-compile", "--stock-decode"], "it cannot go with --stock-decode")):
        bad = CliRunner().invoke(app, ["evaluate", "--model", "tiny", "--modes", "full", "--out", str(tmp_path / "b"),
                                       *args])
        assert bad.exit_code == 2 and message in bad.output, bad.output
        assert not Path(tmp_path / "b").exists()


def test_bad_indexer_is_refused_before_anything_is_written(tmp_path):
    """With --workers 2 too: the parent checks the indexer, so no worker starts and --out is not created."""
    from typer.testing import CliRunner

    from cli import app

    out = tmp_path / "w"
    bad = CliRunner().invoke(app, ["evaluate", "--model", "tiny", "--modes", "full,lsa", "--indexer",
                                   str(tmp_path / "missing"), "--tasks", TASK, "--lengths", "256,512",
                                   "--workers", "2", "--out", str(out), "--device", "cpu"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output, bad.output
    assert len([line for line in bad.output.splitlines() if line.strip()]) == 1, bad.output
    assert not out.exists()


def test_distance_cap_trained_runs_as_the_exports_distance_and_is_refused_without_one(backbone, export_dir,
                                                                                     tmp_path):
    """--distance-cap trained decodes as the export's trained_distance given as a number (the same records), and an
    export that records none is refused in one line before anything is written."""
    import shutil

    from typer.testing import CliRunner

    from cli import app

    out = tmp_path / "w"
    bad = CliRunner().invoke(app, ["evaluate", "--model", "tiny", "--modes", "lsa", "--indexer", str(export_dir),
                                   "--distance-cap", "trained", "--tasks", TASK, "--lengths", "256", "--samples", "1",
                                   "--out", str(out), "--device", "cpu"])
    assert bad.exit_code == 2 and "records no training distance" in bad.output, bad.output
    assert len([line for line in bad.output.splitlines() if line.strip()]) == 1 and not out.exists()

    indexer = tmp_path / "export"
    shutil.copytree(export_dir, indexer)
    lsa_config = json.loads((indexer / "lsa_config.json").read_text())
    (indexer / "lsa_config.json").write_text(json.dumps({**lsa_config, "trained_distance": 96}))
    records = {}
    for cap in ("trained", 96):
        config = EvalConfig(model="tiny", modes=("lsa",), tasks=(TASK,), lengths=(LENGTH,), samples=SAMPLES,
                            max_new_tokens=NEW, indexer=str(indexer), tau=TAU, distance_cap=cap)
        results = evaluate(config, tmp_path / f"cap_{cap}", backbone=backbone)
        records[cap] = [(r["prediction"], r["selected_per_trigger"]) for r in _runs(results, "lsa")]
    off = EvalConfig(model="tiny", modes=("lsa",), tasks=(TASK,), lengths=(LENGTH,), samples=SAMPLES,
                     max_new_tokens=NEW, indexer=str(indexer), tau=TAU)
    plain = [(r["prediction"], r["selected_per_trigger"]) for r in _runs(evaluate(off, tmp_path / "off",
                                                                                  backbone=backbone), "lsa")]
    assert records["trained"] == records[96] != plain  # the cap acts at 256 tokens, and "trained" is 96
    assert json.loads((tmp_path / "cap_trained/config.json").read_text())["fingerprint"]["distance_cap"] == "trained"


def test_resume_refuses_an_indexer_whose_files_changed(backbone, export_dir, tmp_path):
    import shutil

    indexer = tmp_path / "export"
    shutil.copytree(export_dir, indexer)
    out = tmp_path / "e"
    config = EvalConfig(model="tiny", modes=("lsa",), tasks=(TASK,), lengths=(256,), samples=1, max_new_tokens=1,
                        indexer=str(indexer), tau=TAU)
    evaluate(config, out, backbone=backbone)
    assert evaluate(config, out, resume=True, backbone=backbone)["complete"]  # unchanged: resumes
    lsa_config = json.loads((indexer / "lsa_config.json").read_text())
    (indexer / "lsa_config.json").write_text(json.dumps({**lsa_config, "threshold": 0.25}))  # re-exported
    with pytest.raises(EvaluationError, match="the --indexer files changed"):
        evaluate(config, out, resume=True, backbone=backbone)


def test_a_second_writer_is_refused(backbone, tmp_path):
    """While one evaluation writes --out, another one there is refused, naming the first (its PID)."""
    from lsa_runtime.errors import FmIndexError
    from lsa_runtime.outputs import OutputLock

    out = tmp_path / "e"
    config = EvalConfig(model="tiny", modes=("full",), tasks=(TASK,), lengths=(256,), samples=1, max_new_tokens=1)
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import time\nfrom lsa_runtime.outputs import OutputLock\n"
                               f"lock = OutputLock({str(out)!r}, 'evaluate').__enter__()\nprint('locked', flush=True)\n"
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FmIndexError, match=f"PID {holder.pid}, evaluate"):
            evaluate(config, out, backbone=backbone)
        assert not (out / "config.json").exists()
    finally:
        holder.kill()
        holder.wait()
    with OutputLock(out, "test"):  # the lock went with the killed holder
        pass
    assert evaluate(config, out, backbone=backbone)["complete"]


def test_workers_decode_the_same_runs_as_one_process(backbone, export_dir, tmp_path):
    """--workers 2: two spawned processes share the cells; every run's prediction and score equal the
    single-process evaluation's, and the merged runs.jsonl holds each run once."""
    config = EvalConfig(model="tiny", modes=("full", "lsa", "recent"), tasks=(TASK, "vt"), lengths=(256, 320),
                        samples=1, indexer=str(export_dir), max_new_tokens=NEW, tau=TAU)
    one = evaluate(config, tmp_path / "one", backbone=backbone)
    two = evaluate(config, tmp_path / "two", workers=2)

    def by_key(results):
        return {(r["task"], r["length"], r["index"], r["mode"]): (r["prediction"], r["score"], r["selected_mean"])
                for r in results["runs"]}

    assert len(one["runs"]) == 2 * 2 * 3 and by_key(two) == by_key(one)
    lines = (tmp_path / "two" / "runs.jsonl").read_text().splitlines()
    assert len(lines) == len(one["runs"]) and two["complete"] is True
    with pytest.raises(EvaluationError, match="workers"):
        evaluate(config, tmp_path / "bad", workers=0)


def test_workers_split_a_cell_and_keep_the_cells_budget(backbone, export_dir, tmp_path):
    """One cell, 3 workers: its 4 prompts are split between them (full and lsa first, then the budgeted modes).
    Every run equals the one-process evaluation's, the budget of recent and the oracle included: lsa's mean over
    the whole cell, not over a worker's share (the cell's lsa runs select different counts, checked)."""
    config = EvalConfig(model="tiny", modes=("full", "lsa", "recent", "oracle"), tasks=(TASK,), lengths=(320,),
                        samples=4, indexer=str(export_dir), max_new_tokens=NEW, tau=TAU)
    one = evaluate(config, tmp_path / "one", backbone=backbone)
    three = evaluate(config, tmp_path / "three", workers=3)

    def by_key(results):
        return {(r["task"], r["length"], r["index"], r["mode"]): (r["prediction"], r["score"], r["selected_mean"],
                                                                   r["budget"]) for r in results["runs"]}

    assert len(one["runs"]) == 4 * 4 and by_key(three) == by_key(one) and three["complete"] is True
    assert len({r["selected_mean"] for r in one["runs"] if r["mode"] == "lsa"}) > 1
    lines = (tmp_path / "three" / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 16


def test_batched_evaluation_records_what_one_at_a_time_does(all_modes, backbone, export_dir, tmp_path):
    """--batch 3 over 4 samples (a batch of 3, then 1) in every mode, random included: the same predictions,
    scores, selections and footprints per run as the one-at-a-time evaluation of the same config."""
    config = EvalConfig(model="tiny", modes=("full", "lsa", "hisparse", "recent", "random", "oracle"),
                        tasks=(TASK,), lengths=(LENGTH,), samples=4, indexer=str(export_dir),
                        max_new_tokens=NEW, tau=TAU)
    one = evaluate(config, tmp_path / "one", backbone=backbone)
    batched = evaluate(config, tmp_path / "batched", backbone=backbone, batch=3)
    keep = ("prediction", "score", "selected_per_trigger", "budget", "new_tokens", "finish_reason")
    stats = ("footprint_ratio", "csa_kv_ratio", "device_bytes", "resident_entries", "entries_fetched", "triggers",
             "fetch_bytes_to_device")
    key = lambda r: (r["mode"], r["index"])  # noqa: E731
    runs_one, runs_batched = sorted(one["runs"], key=key), sorted(batched["runs"], key=key)
    assert len(runs_one) == len(runs_batched) == 24
    for a, b in zip(runs_one, runs_batched):
        assert key(a) == key(b)
        assert {k: a[k] for k in keep} == {k: b[k] for k in keep}
        assert {k: a["stats"][k] for k in stats} == {k: b["stats"][k] for k in stats}
    for mode in config.modes:  # a group's runs share one wall time: a batch of 3 (indices 0-2), then 1; full runs
        timing = [r["timing"] for r in runs_batched if r["mode"] == mode]  # one at a time: the oracle's picks
        assert [t["batch"] for t in timing] == ([1] * 4 if mode == "full" else [3, 3, 3, 1])
        assert len({t["run_seconds"] for t in timing[:3]}) == (3 if mode == "full" else 1)
    with pytest.raises(EvaluationError, match="--batch must be"):
        Evaluation(config, tmp_path / "bad", backbone=backbone, batch=0)


@pytest.mark.slow
def test_static_compile_evaluation_records_what_the_default_path_does(backbone, tmp_path):
    """--static-compile: full and recent (LSA's resident mode) through the compiled static step, two prompts at a
    time, give the default path's predictions, scores and CSA-KV ratios. Slow: inductor compiles the layer kinds
    (about 2 min with a cold cache on 2 cores)."""
    from lsa_runtime.compiled_step import uncompile_static_step

    config = EvalConfig(model="tiny", modes=("full", "recent"), tasks=(TASK,), lengths=(LENGTH,), samples=3,
                        max_new_tokens=NEW, tau=TAU, budget=24)
    key = lambda r: (r["mode"], r["index"])  # noqa: E731
    plain = evaluate(config, tmp_path / "plain", backbone=backbone)
    try:
        compiled = evaluate(config, tmp_path / "compiled", backbone=backbone, batch=2, static_compile=True)
    finally:
        uncompile_static_step(backbone[0])
    runs_plain, runs_compiled = sorted(plain["runs"], key=key), sorted(compiled["runs"], key=key)
    assert len(runs_plain) == len(runs_compiled) == 6
    for a, b in zip(runs_plain, runs_compiled):
        assert key(a) == key(b)
        assert (a["prediction"], a["score"], a["stats"]["csa_kv_ratio"]) == \
               (b["prediction"], b["score"], b["stats"]["csa_kv_ratio"])
    with pytest.raises(EvaluationError, match="cannot go with --stock-decode"):
        Evaluation(config, tmp_path / "bad", backbone=backbone, static_decode=False, static_compile=True)


def test_static_decode_evaluation_records_what_the_default_path_does(backbone, export_dir, tmp_path, monkeypatch):
    """--static-decode: the runs through the static-shape step (batched 2 at a time; recent and oracle in LSA's
    resident mode) give the default path's predictions, scores and CSA-KV ratios; the oracle's full runs, which
    record native picks, keep the default path, and the evaluation is unchanged too."""
    from lsa_runtime.static_runner import StaticRunner

    steps = []
    step = StaticRunner.step
    monkeypatch.setattr(StaticRunner, "step", lambda self, tokens: steps.append(len(tokens)) or step(self, tokens))
    key = lambda r: (r["mode"], r["index"])  # noqa: E731
    for modes, static_steps in ((("full", "recent"), True), (("full", "oracle"), True)):
        config = EvalConfig(model="tiny", modes=modes, tasks=(TASK,), lengths=(LENGTH,), samples=3,
                            max_new_tokens=NEW, tau=TAU, budget=24)
        name = "-".join(modes)
        plain = evaluate(config, tmp_path / f"plain-{name}", backbone=backbone)
        assert not steps
        static = evaluate(config, tmp_path / f"static-{name}", backbone=backbone, batch=2, static_decode=True)
        assert bool(steps) == static_steps and (not steps or max(steps) == 2), (modes, steps)
        steps.clear()
        runs_plain, runs_static = sorted(plain["runs"], key=key), sorted(static["runs"], key=key)
        assert len(runs_plain) == len(runs_static) == 6
        for a, b in zip(runs_plain, runs_static):
            assert key(a) == key(b)
            assert (a["prediction"], a["score"], a["finish_reason"]) == \
                   (b["prediction"], b["score"], b["finish_reason"])
            if a["mode"] == "oracle":  # the static row keeps budget + tau/4 + 2 slots, the oracle may select fewer
                assert a["stats"]["csa_kv_ratio"] <= b["stats"]["csa_kv_ratio"]
            else:
                assert a["stats"]["csa_kv_ratio"] == b["stats"]["csa_kv_ratio"]


def test_a_worker_ends_when_its_evaluate_process_is_killed():
    """exit_with_parent: a process started like an evaluation worker stops within seconds of its parent's SIGKILL
    (no finally of the parent runs), instead of decoding on into the output directory."""
    import os
    import signal
    import subprocess
    import sys
    import time

    child_code = ("import os, sys, time; from fm_eval.runner import exit_with_parent; "
                  "exit_with_parent(os.getppid(), interval=0.1); print(os.getpid(), flush=True); time.sleep(60)")
    parent_code = (f"import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', {child_code!r}], "
                   "stdout=sys.stdout); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parent.parent)
    child = int(parent.stdout.readline())
    time.sleep(0.5)
    os.kill(child, 0)  # alive while its parent is
    parent.send_signal(signal.SIGKILL)
    parent.wait()

    def ended() -> bool:  # gone, or a zombie nobody reaped yet (a container's init may not)
        try:
            return Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
        except (FileNotFoundError, ProcessLookupError):
            return True

    deadline = time.time() + 10
    while time.time() < deadline and not ended():
        time.sleep(0.1)
    if not ended():
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the worker outlived its parent")


def test_window_attention_evaluation_records_what_eager_does(backbone, export_dir, tmp_path):
    """--attention window (lsa_runtime.window_attention: the same attention without the dense score matrix) in
    every mode that decodes through the stock attention or the static step: the same predictions, selections and
    footprints as transformers' eager attention, the default; the option is part of the resume fingerprint only when
    it is not eager, and it refuses --batch > 1 and unknown names before anything is written."""
    from lsa_runtime.window_attention import NAME

    model = backbone[0]
    config = EvalConfig(model="tiny", modes=("full", "lsa", "hisparse", "recent", "oracle"), tasks=(TASK,),
                        lengths=(1024,), samples=2, indexer=str(export_dir), max_new_tokens=NEW, tau=TAU)
    eager = evaluate(config, tmp_path / "eager", backbone=backbone)
    try:
        window = evaluate(replace(config, attention="window"), tmp_path / "window", backbone=backbone)
        assert model.config._attn_implementation == NAME
    finally:
        evaluate(replace(config, modes=("full",), samples=1), tmp_path / "back", backbone=backbone)
    assert model.config._attn_implementation == "eager"  # an evaluation sets its own attention every time
    keep = ("prediction", "score", "selected_per_trigger", "budget", "new_tokens", "prompt_sha")
    stats = ("footprint_ratio", "csa_kv_ratio", "resident_entries", "entries_fetched", "triggers")
    key = lambda r: (r["mode"], r["index"])  # noqa: E731
    a, b = sorted(eager["runs"], key=key), sorted(window["runs"], key=key)
    assert len(a) == len(b) == 10 and [key(r) for r in a] == [key(r) for r in b]
    for x, y in zip(a, b):
        assert {k: x[k] for k in keep} == {k: y[k] for k in keep}, key(x)
        assert {k: x["stats"][k] for k in stats} == {k: y["stats"][k] for k in stats}, key(x)
    assert "attention" not in config.check().fingerprint()
    assert replace(config, attention="window").check().fingerprint()["attention"] == "window"
    with pytest.raises(EvaluationError, match="--attention must be one of eager, window"):
        replace(config, attention="flash").check()
    with pytest.raises(EvaluationError, match="leave --batch at 1"):
        Evaluation(replace(config, attention="window"), tmp_path / "batched", backbone=backbone, batch=2)
    assert not (tmp_path / "batched").exists()


@pytest.mark.gpu
def test_window_attention_on_the_gpu_records_what_eager_does(tmp_path):
    """The same check on a GPU, fp32 (the default there is the checkpoint's dtype, whose round-off could flip a
    greedy token between two exact forms of one attention): full runs take the static step there by default, so
    this covers the window prefill feeding the static decode too."""
    import torch

    from lsa_runtime.backbone import load_backbone
    from lsa_runtime.memory_indexer import MemoryIndexer, MemoryIndexerConfig

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from lsa_runtime.backbone import default_memory_layers

    backbone = load_backbone("tiny", device="cuda", dtype=torch.float32)
    config = backbone[0].config
    mi_config = replace(MemoryIndexerConfig.from_backbone_config(config, default_memory_layers(config),
                                                                 rank=config.q_lora_rank, tau=TAU),
                        keep_recent=KEEP_RECENT)
    export = MemoryIndexer.init_from_native(backbone[0], mi_config).save_export(tmp_path / "export")
    base = EvalConfig(model="tiny", modes=("full", "lsa", "recent"), tasks=(TASK,), lengths=(1024,), samples=2,
                      indexer=str(export), max_new_tokens=NEW, tau=TAU, device="cuda", dtype="float32")
    eager = evaluate(base, tmp_path / "eager", backbone=backbone)
    window = evaluate(replace(base, attention="window"), tmp_path / "window", backbone=backbone)
    key = lambda r: (r["mode"], r["index"])  # noqa: E731
    pick = lambda r: (r["prediction"], r["selected_per_trigger"], r["stats"]["resident_entries"])  # noqa: E731
    assert [pick(r) for r in sorted(eager["runs"], key=key)] == [pick(r) for r in sorted(window["runs"], key=key)]


def test_worker_out_of_memory_exits_with_its_code_and_the_parent_names_it(monkeypatch, tmp_path, capsys):
    """A worker whose decode runs out of memory prints the error and exits with OUT_OF_MEMORY_EXIT (any other error
    propagates as before); the parent's one line says the workers share that memory when there are several."""
    from fm_eval import runner
    from lsa_runtime.session import DeviceMemoryError

    def out_of_memory(self, *args):
        raise DeviceMemoryError("out of memory at 8,192 tokens (CUDA out of memory)")

    monkeypatch.setattr(runner, "exit_with_parent", lambda pid: None)
    monkeypatch.setattr(runner.Evaluation, "_load", lambda self: None)
    monkeypatch.setattr(runner.Evaluation, "_run_cell", out_of_memory)
    config = EvalConfig(model="tiny", modes=("full",), tasks=(TASK,), lengths=(256,), samples=1)
    with pytest.raises(SystemExit) as exit_info:
        runner._worker_main(config, str(tmp_path), [(TASK, 256, None, None)], 1)
    assert exit_info.value.code == runner.OUT_OF_MEMORY_EXIT == 3
    assert "DeviceMemoryError: out of memory at 8,192 tokens" in capsys.readouterr().err
    monkeypatch.setattr(runner.Evaluation, "_run_cell", lambda self, *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        runner._worker_main(config, str(tmp_path), [(TASK, 256, None, None)], 1)

    assert runner.worker_failure([("fm-index-eval-1", 1), ("fm-index-eval-2", 3)], 8) == (
        "evaluation worker fm-index-eval-2 ran out of memory (its error is printed above); finished runs are kept; "
        "8 workers share that memory: --resume with fewer --workers continues")
    assert runner.worker_failure([("fm-index-eval-0", 3)], 1) == (
        "evaluation worker fm-index-eval-0 ran out of memory (its error is printed above); finished runs are kept: "
        "--resume continues once the setting the error names is smaller")
    assert runner.worker_failure([("fm-index-eval-1", 1)], 2) == (
        "evaluation worker fm-index-eval-1 failed (exit code 1, its error is printed above); finished runs are kept: "
        "--resume continues")
