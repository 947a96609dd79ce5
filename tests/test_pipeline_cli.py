"""`fm-index pipeline`: the main job, end to end (slow) and its refusal to overwrite a run."""

import json

import pytest
from typer.testing import CliRunner

from cli import app

runner = CliRunner()


def test_refuses_an_existing_run_without_resume(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "labels").mkdir()
    result = runner.invoke(app, ["pipeline", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "already holds a pipeline run" in result.output


@pytest.mark.slow
def test_pipeline_end_to_end(tmp_path, small_corpus):
    out = tmp_path / "run"
    result = runner.invoke(app, ["pipeline", "--out", str(out), "--model", "tiny", "--corpus", str(small_corpus),
                                 "--tau", "16", "--epochs", "1", "--rank", "32", "--lengths", "512",
                                 "--tasks", "niah_single_1", "--samples", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "labels" / "manifest.json").read_text())["complete"]
    assert (out / "export" / "lsa_config.json").is_file() and (out / "export" / "model.safetensors").is_file()
    results = json.loads((out / "evaluation" / "results.json").read_text())
    assert {run["mode"] for run in results["runs"]} == {"full", "lsa", "recent"}


def _pipeline(out, small_corpus, *extra):
    return runner.invoke(app, ["pipeline", "--out", str(out), "--model", "tiny", "--corpus", str(small_corpus),
                               "--tau", "16", "--epochs", "1", "--rank", "32", "--lengths", "512",
                               "--tasks", "niah_single_1", "--samples", "1", "--device", "cpu", *extra])


def test_resume_skips_finished_steps_and_redoes_missing_ones(tmp_path, small_corpus):
    """pipeline --resume after every step finished: each step is checked and skipped (nothing retrained); with a
    step's output removed, that step runs again; finished steps with other options and a run without --resume
    are refused."""
    import shutil

    out = tmp_path / "run"
    first = _pipeline(out, small_corpus)
    assert first.exit_code == 0, first.output
    # the backbone's indexer keys travel from the labels to the export (lsa_runtime/key_digest.py)
    import torch

    from lsa_runtime.backbone import load_backbone
    from lsa_runtime.key_digest import index_keys_digest

    manifest = json.loads((out / "labels" / "manifest.json").read_text())
    digest = index_keys_digest(load_backbone("tiny", dtype=torch.float32)[0], manifest["memory_layers"]["layers"])
    assert len(digest) == 64 and manifest["backbone"]["index_keys_sha256"] == digest
    assert json.loads((out / "export" / "lsa_config.json").read_text())["backbone_keys_sha256"] == digest
    state = (out / "train" / "train_state.json").read_text()
    results = json.loads((out / "evaluation" / "results.json").read_text())["runs"]
    assert _pipeline(out, small_corpus).exit_code == 2  # no --resume: refused
    again = _pipeline(out, small_corpus, "--resume")
    assert again.exit_code == 0, again.output
    assert "nothing to train" in again.output and "next: fm-index export" not in again.output
    assert (out / "train" / "train_state.json").read_text() == state
    strip = lambda runs: [{k: v for k, v in r.items() if k not in ("stats", "timing")} for r in runs]  # noqa: E731
    assert strip(json.loads((out / "evaluation" / "results.json").read_text())["runs"]) == strip(results)
    shutil.rmtree(out / "export")
    shutil.rmtree(out / "evaluation")
    redo = _pipeline(out, small_corpus, "--resume")
    assert redo.exit_code == 0, redo.output
    assert (out / "export" / "lsa_config.json").is_file()
    assert strip(json.loads((out / "evaluation" / "results.json").read_text())["runs"]) == strip(results)
    changed = _pipeline(out, small_corpus, "--resume", "--nucleus", "0.5")  # finished labels, other options
    assert changed.exit_code == 2 and "--nucleus 0.6, this run asks for --nucleus 0.5" in " ".join(
        changed.output.split())
    changed = _pipeline(out, small_corpus, "--resume", "--keep-recent", "5")  # finished export, other tail
    assert changed.exit_code == 2 and "exported with --keep-recent 32, this run asks for 5" in " ".join(
        changed.output.split())
    # training interrupted before it wrote its state leaves only its lock file: --resume starts training anew
    for step in ("train", "export", "evaluation"):
        shutil.rmtree(out / step)
    (out / "train").mkdir()
    (out / "train" / ".fm-index.lock").write_text('{"pid": 1, "command": "train"}\n')
    again = _pipeline(out, small_corpus, "--resume")
    assert again.exit_code == 0, again.output
    assert json.loads((out / "train" / "train_state.json").read_text())["complete"]
