"""On the bundled trained backbone: a memory indexer trained on the `reference` model's labels (the release's
definition at nucleus 0.6, the pipeline's settings; about 1-2 minutes on CPU) ranks the entries better than
recency and beats chance at the same retrieval ratio.

The random `tiny` backbone cannot show this (its labels carry no signal; see README). The figures asserted are
the held-out table of `fm-index train`, computed by the evaluator against the golden labels.
"""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample" / "corpus.jsonl"


@pytest.fixture(scope="module")
def trained_on_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference_indexer")
    runner = CliRunner()
    result = runner.invoke(app, ["build-labels", "--model", "reference", "--corpus", str(SAMPLE), "--out",
                                 str(root / "labels"), "--nucleus", "0.6", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["train", "--labels", str(root / "labels"), "--out", str(root / "train"), "--rank",
                                 "256", "--epochs", "6", "--eval-fraction", "0.25", "--model", "reference"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((root / "labels" / "manifest.json").read_text())
    return manifest, json.loads((root / "train" / "train_state.json").read_text())["metrics"]


def test_reference_labels_are_selective(trained_on_reference):
    """The release's definition (top-k softmax) at the method's nucleus 0.6: golden is a minority of what is
    visible (the visible-softmax definition marked 96% of it at 0.6 on this model)."""
    manifest, _ = trained_on_reference
    counts = manifest["counts"]
    assert manifest["params"]["softmax_over"] == "topk"
    assert manifest["params"]["layers"] == [2, 4, 6]  # the model's own choice (data/reference/fm_index.json)
    assert 0.03 < counts["positives_mean"] / counts["visible_mean"] < 0.5


def test_trained_indexer_ranks_better_than_recency_and_beats_chance(trained_on_reference):
    _, m = trained_on_reference
    # at the indexer's own threshold (0.5): the baselines fetch exactly as many entries per trigger
    assert m["union_retrieval_ratio"] == pytest.approx(m["recency_retrieval_ratio"])
    assert 0.05 < m["union_retrieval_ratio"] < 0.8
    assert m["union_f1"] > m["chance_f1"] + 0.1
    # on this small model the golden sets are mostly recent entries: the indexer matches recency's F1 at the same
    # ratio and ranks the entries better (threshold-free AUC)
    assert m["union_f1"] > m["recency_f1"] - 0.02 and m["union_at_golden_f1"] > m["recency_at_golden_f1"] - 0.02
    assert m["union_auc"] > m["recency_auc"] + 0.05 and m["union_auc"] > 0.7
