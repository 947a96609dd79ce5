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
