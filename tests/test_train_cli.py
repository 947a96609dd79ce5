"""`fm-index train / eval / export` through the CLI: the happy path and every bad input (one line, exit 2,
nothing half-written)."""

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from indexer_train.shards import LabelShards
from indexer_train.threshold import THRESHOLD_MARGIN
from lsa_runtime.memory_indexer import MemoryIndexer
from tests.shard_fixtures import set_manifest, write_synthetic_shards

TRAIN = ["--rank", "16", "--epochs", "2", "--batch-size", "8", "--lr", "3e-2", "--eval-fraction", "0.34"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_user_error(result, pattern: str):
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert pattern.lower() in lines[0].lower(), lines[0]


@pytest.fixture(scope="module")
def labels(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("cli") / "labels", n_docs=6, tokens=256, seed=11)


@pytest.fixture(scope="module")
def finished_run(labels, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_run") / "run"
    result = invoke("train", "--labels", labels, "--out", out, *TRAIN)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_train_eval_export_happy_path(labels, finished_run, tmp_path):
    out, train_output = finished_run
    assert "held-out documents (2)" in train_output and "recency" in train_output and "chance" in train_output
    result = invoke("eval", "--indexer", out, "--labels", labels)
    assert result.exit_code == 0, result.output
    assert "held-out documents (2)" in result.output and "union" in result.output
    result = invoke("eval", "--indexer", out, "--labels", labels, "--documents", "all")
    assert result.exit_code == 0 and "all documents (6)" in result.output
    result = invoke("export", "--train-dir", out, "--out", tmp_path / "export")
    assert result.exit_code == 0, result.output
    cfg = json.loads((tmp_path / "export" / "lsa_config.json").read_text())
    assert cfg["layers"] == [2, 4] and cfg["rank"] == 16 and cfg["index_n_heads"] == 8 and cfg["tau"] == 16
    # the documents' last trigger (256 tokens, triggers every 16 up to 256 - 16), what --distance-cap trained uses
    assert cfg["trained_distance"] == 240 and "trained at distances up to 240 tokens" in result.output
    assert cfg["backbone_config_hash"] == LabelShards(labels).config_hash
    assert set(cfg["metrics"]["heldout"]) >= {"union_f1", "union_recall", "union_native_coverage"}
    MemoryIndexer.from_export(tmp_path / "export", expected_config_hash=cfg["backbone_config_hash"])
    # eval of the export prints the same table as eval of the run (held-out documents recorded in the export)
    of_export = invoke("eval", "--indexer", tmp_path / "export", "--labels", labels)
    of_run = invoke("eval", "--indexer", out, "--labels", labels)
    assert of_export.exit_code == 0 and "held-out documents (2)" in of_export.output
    assert table_lines(of_export.output) == table_lines(of_run.output) and len(table_lines(of_run.output)) == 8


def table_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("│ ") and "│" in line[2:]
            and any(name in line for name in ("layer", "union", "recency", "chance"))]


def test_bad_layers(labels, tmp_path):
    assert_user_error(invoke("train", "--labels", labels, "--out", tmp_path / "o", "--layers", "2,6", *TRAIN),
                      "layer(s) [6] missing from the label shards")
    assert not (tmp_path / "o").exists()


def test_layer_missing_from_keys_files(labels, tmp_path):
    bad = shutil.copytree(labels, tmp_path / "labels")
    set_manifest(bad, params__layers=[2, 4, 6])  # the manifest claims a layer the shards do not hold
    assert_user_error(invoke("train", "--labels", bad, "--out", tmp_path / "o", "--layers", "6", *TRAIN),
                      "missing from keys file")
    assert not (tmp_path / "o").exists()


def test_other_backbone(labels, tmp_path):
    assert_user_error(invoke("train", "--labels", labels, "--out", tmp_path / "o", "--model", "tiny", *TRAIN),
                      "built for another backbone")
    assert not (tmp_path / "o").exists()


def test_eval_on_labels_of_another_backbone(labels, finished_run, tmp_path):
    other = write_synthetic_shards(tmp_path / "other", n_docs=2, tokens=128, config_hash="otherbackbone000")
    assert_user_error(invoke("eval", "--indexer", finished_run[0], "--labels", other), "another backbone")


def test_empty_splits(tmp_path):
    one = write_synthetic_shards(tmp_path / "one", n_docs=1, tokens=128)
    assert_user_error(invoke("train", "--labels", one, "--out", tmp_path / "o", *TRAIN), "eval split is empty")
    two = write_synthetic_shards(tmp_path / "two", n_docs=2, tokens=128)
    assert_user_error(invoke("train", "--labels", two, "--out", tmp_path / "o", "--rank", "16", "--eval-fraction",
                             "0.9"), "train split is empty")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("damage", ["manifest", "rows", "keys", "unfinished"])
def test_corrupt_shards(labels, tmp_path, damage):
    bad = Path(shutil.copytree(labels, tmp_path / "labels"))
    if damage == "manifest":
        (bad / "manifest.json").write_text("{not json")
        pattern = "corrupt manifest"
    elif damage == "rows":
        (bad / "rows" / "00000003.arrow").write_bytes(b"\x00garbage")
        pattern = "corrupt rows file"
    elif damage == "keys":
        data = (bad / "keys" / "00000001.arrow").read_bytes()
        (bad / "keys" / "00000001.arrow").write_bytes(data[: len(data) // 2])  # truncated
        pattern = "corrupt or missing keys file"
    else:
        set_manifest(bad, complete=False)
        pattern = "unfinished"
    assert_user_error(invoke("train", "--labels", bad, "--out", tmp_path / "o", *TRAIN), pattern)
    assert not (tmp_path / "o").exists()


def test_export_of_unfinished_run_and_existing_outputs(labels, finished_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_state.json").write_text(json.dumps({"complete": False}))
    assert_user_error(invoke("export", "--train-dir", run, "--out", tmp_path / "export"), "unfinished")
    assert not (tmp_path / "export").exists()
    assert_user_error(invoke("export", "--train-dir", tmp_path / "nothing", "--out", tmp_path / "export"),
                      "does not exist")
    # an occupied --out is refused, for train and export alike
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    assert_user_error(invoke("export", "--train-dir", finished_run[0], "--out", tmp_path / "busy"), "not empty")
    assert_user_error(invoke("train", "--labels", labels, "--out", tmp_path / "busy", *TRAIN), "not empty")
    assert_user_error(invoke("train", "--labels", labels, "--out", tmp_path / "busy", "--resume", *TRAIN),
                      "no interrupted")
    assert_user_error(invoke("train", "--labels", labels, "--out", tmp_path / "busy" / "file", *TRAIN),
                      "exists and is not a directory")
    # the old name of --train-dir still works, with a note
    old = invoke("export", "--model", finished_run[0], "--out", tmp_path / "old")
    assert old.exit_code == 0 and "now `export --train-dir`" in old.output and (tmp_path / "old").is_dir()


def test_resume_of_a_finished_run(labels, finished_run):
    """Same options: nothing to do, the stored table is printed (exit 0). Another option: refused, naming it."""
    state = (finished_run[0] / "train_state.json").read_text()
    again = invoke("train", "--labels", labels, "--out", finished_run[0], "--resume", *TRAIN)
    assert again.exit_code == 0 and "nothing to train" in again.output and "held-out documents (2)" in again.output
    assert (finished_run[0] / "train_state.json").read_text() == state
    other = [*TRAIN]
    other[other.index("--lr") + 1] = "1e-2"
    assert_user_error(invoke("train", "--labels", labels, "--out", finished_run[0], "--resume", *other),
                      "was trained with --lr 0.03, this run asks for 0.01")


@pytest.mark.parametrize("option, value, message", [("--eval-fraction", "0", "--eval-fraction must be in (0, 1), got 0.0"),
                                                    ("--lr", "-1", "--lr must be > 0, got -1.0"),
                                                    ("--threshold", "1", "--threshold must be in (0, 1), got 1.0")])
def test_option_ranges_are_named(labels, tmp_path, option, value, message):
    args = [*TRAIN]
    if option in args:
        args[args.index(option) + 1] = value
    else:
        args += [option, value]
    assert_user_error(invoke("train", "--labels", labels, "--out", tmp_path / "o", *args), message)
    assert not (tmp_path / "o").exists()


def test_heads_option_sets_the_towers_query_heads(labels, tmp_path):
    result = invoke("train", "--labels", labels, "--out", tmp_path / "run", *TRAIN, "--heads", "16")
    assert result.exit_code == 0, result.output
    assert invoke("export", "--train-dir", tmp_path / "run", "--out", tmp_path / "export").exit_code == 0
    cfg = json.loads((tmp_path / "export" / "lsa_config.json").read_text())
    assert cfg["index_n_heads"] == 16 and cfg["index_head_dim"] == 8  # the keys' geometry is the backbone's
    indexer = MemoryIndexer.from_export(tmp_path / "export")
    assert indexer.layer(2).W_IUQ.weight.shape == (16 * 8, 16) and indexer.layer(2).W_w.weight.shape[0] == 16


def test_export_stores_the_fetch_top_floor(finished_run, tmp_path):
    assert invoke("export", "--train-dir", finished_run[0], "--out", tmp_path / "e", "--fetch-top", "3").exit_code == 0
    assert MemoryIndexer.from_export(tmp_path / "e").config.fetch_top == 3
    assert json.loads((tmp_path / "e" / "lsa_config.json").read_text())["fetch_top"] == 3
    assert_user_error(invoke("export", "--train-dir", finished_run[0], "--out", tmp_path / "bad", "--fetch-top",
                             "-1"), "fetch_top must be >= 0")
    assert not (tmp_path / "bad").exists()


def test_export_stores_neighbours_only_when_asked(finished_run, tmp_path):
    """--fetch-neighbours 1 is written into lsa_config.json; without it the file has no such key (as exports made
    before the option, which load with neighbours off); a negative count is refused before anything is written."""
    assert invoke("export", "--train-dir", finished_run[0], "--out", tmp_path / "e1", "--fetch-neighbours",
                  "1").exit_code == 0
    assert json.loads((tmp_path / "e1" / "lsa_config.json").read_text())["fetch_neighbours"] == 1
    assert MemoryIndexer.from_export(tmp_path / "e1").config.fetch_neighbours == 1
    assert invoke("export", "--train-dir", finished_run[0], "--out", tmp_path / "e0").exit_code == 0
    assert "fetch_neighbours" not in json.loads((tmp_path / "e0" / "lsa_config.json").read_text())
    assert MemoryIndexer.from_export(tmp_path / "e0").config.fetch_neighbours == 0
    assert_user_error(invoke("export", "--train-dir", finished_run[0], "--out", tmp_path / "bad",
                             "--fetch-neighbours", "-1"), "fetch_neighbours must be >= 0")
    assert not (tmp_path / "bad").exists()
    assert_user_error(invoke("export", "--train-dir", finished_run[0], "--out", tmp_path / "joint.pt", "--format",
                             "flashmemory", "--fetch-neighbours", "1"), "--fetch-neighbours has no place")


def test_flashmemory_format_needs_the_releases_key_geometry(labels, finished_run, tmp_path):
    """The release's retriever scores 128-dim index keys; these synthetic labels have 8-dim keys: refused, nothing
    written. (The format itself round-trips in tests/test_release_format.py.)"""
    assert_user_error(invoke("export", "--train-dir", finished_run[0], "--out", tmp_path / "joint.pt", "--format",
                             "flashmemory"), "scores 128-dim index keys")
    assert not (tmp_path / "joint.pt").exists()
    assert_user_error(invoke("export", "--train-dir", finished_run[0], "--out", tmp_path / "x", "--format", "onnx"),
                      "--format must be fm-index or flashmemory")
    assert_user_error(invoke("export", "--train-dir", finished_run[0], "--out", tmp_path / "joint.pt", "--format",
                             "flashmemory", "--keep-recent", "8"), "--keep-recent has no place in the authors' checkpoint")
    (tmp_path / "joint.pt").write_bytes(b"")
    assert_user_error(invoke("eval", "--indexer", tmp_path / "joint.pt", "--labels", labels), "give --model")


def test_generated_labels_with_another_first_trigger_are_not_mixed():
    """Generated labels from before the trigger fix (first trigger at the first generated token) and after it (at
    the prompt's last token, where a Session scores) train different indexers: evaluation refuses to mix them."""
    from indexer_train.trainer import check_same_definition, label_definition
    from lsa_runtime.errors import FmIndexError

    base = {"softmax_over": "topk", "source": "generate", "nucleus": 0.6, "min_votes": 3, "tau": 64}
    old = {"params": dict(base)}  # written before generate_trigger existed
    new = {"params": {**base, "generate_trigger": "last_prompt_token"}}
    assert label_definition(old)["generate_trigger"] == "first_generated_token"
    check_same_definition(label_definition(new), new, "the indexer")
    with pytest.raises(FmIndexError, match="first trigger at the first_generated_token"):
        check_same_definition(label_definition(old), new, "the indexer")
    document = {"params": {**base, "source": "document"}}
    assert label_definition(document)["generate_trigger"] is None


def test_export_target_recall_stores_the_threshold_that_reaches_it(labels, finished_run, tmp_path):
    """Oracle: every held-out trigger scored by the export's own towers through the runtime's fetch rule
    (``MemoryIndexer.score`` per layer, max over layers, >= threshold), recall and retrieval ratio counted here."""
    import torch

    from indexer_train.evaluator import _as_index

    run = finished_run[0]
    result = invoke("export", "--train-dir", run, "--out", tmp_path / "r75", "--target-recall", "0.75")
    assert result.exit_code == 0, result.output
    cfg = json.loads((tmp_path / "r75" / "lsa_config.json").read_text())
    choice = cfg["metrics"]["threshold_choice"]
    assert cfg["threshold"] == choice["threshold"] and choice["target_recall"] == 0.75
    indexer = MemoryIndexer.from_export(tmp_path / "r75")
    shards = LabelShards(labels)
    state = json.loads((Path(run) / "train_state.json").read_text())
    hits = golden = fetched = visible = 0
    gold_scores = []
    with torch.no_grad():
        for doc in state["eval_documents"]:
            rows = shards.rows([doc]).with_format("torch")[:]
            for pos in sorted(set(rows["position"].tolist())):
                at = [i for i, p in enumerate(rows["position"].tolist()) if p == pos]
                nv = int(rows["n_visible"][at[0]])
                best = torch.zeros(nv)
                for i in at:
                    L = int(rows["layer"][i])
                    keys = shards.keys(doc, L)[:nv]
                    probs = indexer.score(L, rows["hidden"][i:i + 1].float(), rows["position"][i:i + 1].long(), keys)
                    best = torch.maximum(best, probs[0, :nv])
                gold = torch.zeros(nv, dtype=torch.bool)
                gold[_as_index(rows["positives"][at[0]])] = True
                fetch = best >= cfg["threshold"]
                hits += int((fetch & gold).sum())
                golden += int(gold.sum())
                fetched += int(fetch.sum())
                visible += nv
                gold_scores += best[gold].tolist()
    assert golden == choice["golden"] and hits / golden >= 0.75
    assert abs(hits / golden - choice["recall"]) < 1e-9 and abs(fetched / visible - choice["retrieval_ratio"]) < 1e-9
    # the highest such threshold up to its rounding margin: the golden scores clearly above it miss the target
    above = [s for s in gold_scores if s * (1 - 2 * THRESHOLD_MARGIN) > cfg["threshold"]]
    assert len(above) / golden < 0.75


@pytest.mark.parametrize("value, message", [("0", "--target-recall must be a share in (0, 1]"),
                                            ("1.5", "--target-recall must be a share in (0, 1]")])
def test_export_target_recall_bad_values(finished_run, tmp_path, value, message):
    assert_user_error(invoke("export", "--train-dir", finished_run[0], "--out", tmp_path / "x", "--target-recall",
                             value), message)
    assert not (tmp_path / "x").exists()


def test_export_target_recall_needs_the_runs_labels(labels, finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run[0], run)
    state = json.loads((run / "train_state.json").read_text())
    state["labels"] = str(tmp_path / "gone")
    (run / "train_state.json").write_text(json.dumps(state))
    assert_user_error(invoke("export", "--train-dir", run, "--out", tmp_path / "x", "--target-recall", "0.8"),
                      "is gone")
    assert not (tmp_path / "x").exists()
    assert_user_error(invoke("export", "--train-dir", run, "--out", tmp_path / "y", "--format", "flashmemory",
                             "--target-recall", "0.8"), "--target-recall has no place")
