"""Training the memory indexer end to end on synthetic shards with a planted structure (tests/shard_fixtures.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from indexer_train.evaluator import evaluate_indexer
from indexer_train.export import export_indexer
from indexer_train.shards import LabelShards
from indexer_train.trainer import TrainOptions, last_checkpoint, train_memory_indexer
from lsa_runtime.memory_indexer import MemoryIndexer
from tests.shard_fixtures import write_synthetic_shards

REPO = Path(__file__).resolve().parent.parent


def tiny_options(**kw) -> TrainOptions:
    base = dict(rank=16, loss="bce", epochs=6, batch_size=8, lr=3e-2, eval_fraction=0.25, seed=0)
    base.update(kw)
    return TrainOptions(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    labels = write_synthetic_shards(root / "labels", n_docs=8, tokens=384)
    summary = train_memory_indexer(labels, root / "run", tiny_options())
    return labels, root / "run", summary


def test_learns_the_planted_structure_better_than_baselines(trained):
    _, run, summary = trained
    assert summary["complete"]
    table = dict(summary["report"].table())
    union, recency, chance = table["union"], table["recency (same ratio)"], table["chance (same ratio)"]
    assert union["retrieval_ratio"] == pytest.approx(recency["retrieval_ratio"]) == pytest.approx(
        chance["retrieval_ratio"])
    assert 0.05 < union["retrieval_ratio"] < 0.9
    assert union["f1"] > recency["f1"] + 0.05 and union["f1"] > chance["f1"] + 0.05
    assert union["native_coverage"] > chance["native_coverage"] + 0.05
    assert union["auc"] > 0.7 and chance["auc"] == 0.5 and abs(recency["auc"] - 0.5) < 0.1
    # at the golden set's own size (|F| = |G| per trigger): precision = recall (R-precision)
    top, recent_top, chance_top = table["union top-|G|"], table["recency top-|G|"], table["chance top-|G|"]
    for row in (top, recent_top, chance_top):
        assert row["precision"] == pytest.approx(row["recall"]) == pytest.approx(row["f1"])
    assert top["retrieval_ratio"] == pytest.approx(recent_top["retrieval_ratio"])
    assert top["f1"] > recent_top["f1"] + 0.05 and top["f1"] > chance_top["f1"] + 0.05
    state = json.loads((run / "train_state.json").read_text())
    assert state["complete"] and state["metrics"]["union_f1"] == pytest.approx(union["f1"])
    # logged during training: the held-out metrics of each epoch (the Trainer's log history)
    evals = [entry for entry in state["eval_history"] if "eval_union_f1" in entry]
    assert [e["epoch"] for e in evals] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert evals[-1]["eval_union_f1"] == pytest.approx(union["f1"])


def test_split_is_by_document(trained):
    labels, run, _ = trained
    state = json.loads((run / "train_state.json").read_text())
    train_docs, eval_docs = set(state["train_documents"]), set(state["eval_documents"])
    assert train_docs.isdisjoint(eval_docs) and train_docs | eval_docs == set(range(8)) and len(eval_docs) == 2


def test_save_load_export_runtime_give_identical_scores(trained, tmp_path):
    from sentence_transformers import SentenceTransformer

    labels, run, summary = trained
    st = SentenceTransformer(str(run / "model"), trust_remote_code=True, device="cpu")
    tower_indexer = st[0].sub_modules["query"][0].indexer
    export = export_indexer(run, tmp_path / "export")
    runtime = MemoryIndexer.from_export(export, expected_config_hash="synthetic0000001")
    shards = LabelShards(labels)
    rows = shards.rows([0]).with_format("torch")[:]
    for L in (2, 4):
        sel = rows["layer"] == L
        keys = shards.keys(0, L).float()
        a = tower_indexer.score(L, rows["hidden"][sel].float(), rows["position"][sel], keys)
        b = runtime.score(L, rows["hidden"][sel].float(), rows["position"][sel], keys)
        assert torch.equal(a, b)
        assert 0.0 < float((b >= 0.5).float().mean()) < 1.0
    cfg = json.loads((export / "lsa_config.json").read_text())
    assert cfg["metrics"]["heldout"]["union_f1"] == pytest.approx(dict(summary["report"].table())["union"]["f1"])
    # the runtime indexer reproduces the training run's held-out table
    again = evaluate_indexer(runtime, shards, json.loads((run / "train_state.json").read_text())["eval_documents"])
    for (name, got), (name0, want) in zip(again.table(), summary["report"].table()):
        assert name == name0 and got == pytest.approx(want)


def test_the_export_records_the_longest_training_distance(trained, tmp_path):
    """``trained_distance``: the last trigger position of the training documents (the fixture's documents of 384
    tokens trigger at TAU, 2 TAU, ..., 384 - TAU), in the trained model and its export; distance_cap "trained" is
    it."""
    from lsa_runtime.config import SessionConfig
    from lsa_runtime.policies import make_policy
    from tests.shard_fixtures import TAU

    _, run, _ = trained
    export = export_indexer(run, tmp_path / "export")
    assert json.loads((export / "lsa_config.json").read_text())["trained_distance"] == 384 - TAU == 368
    indexer = MemoryIndexer.from_export(export)
    assert make_policy(SessionConfig(mode="lsa", distance_cap="trained").resolved(), indexer).distance_cap == 368


def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    labels = write_synthetic_shards(tmp_path / "labels", n_docs=4, tokens=256, seed=3)
    opts = dict(epochs=2, batch_size=4, eval_fraction=0.25)
    full = train_memory_indexer(labels, tmp_path / "full", tiny_options(**opts))
    partial = train_memory_indexer(labels, tmp_path / "cut", tiny_options(stop_after_steps=3, **opts))
    assert not partial["complete"] and partial["steps"] == 3 and full["steps"] > 3
    assert not (tmp_path / "cut" / "model").exists()
    with pytest.raises(Exception, match="unfinished"):
        export_indexer(tmp_path / "cut", tmp_path / "export")
    assert not (tmp_path / "export").exists()
    resumed = train_memory_indexer(labels, tmp_path / "cut", tiny_options(**opts), resume=True)
    assert resumed["complete"] and resumed["steps"] == full["steps"]
    a = load_file(str(next((tmp_path / "full" / "model").rglob("model.safetensors"))))
    b = load_file(str(next((tmp_path / "cut" / "model").rglob("model.safetensors"))))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # and the run did move away from its initialisation (seeded) state
    torch.manual_seed(0)
    init = MemoryIndexer(MemoryIndexer.from_export(export_indexer(tmp_path / "full", tmp_path / "e2")).config)
    assert not torch.equal(init.state_dict()["layers.2.W_DQ.weight"], a["layers.2.W_DQ.weight"])


@pytest.mark.slow
def test_two_process_gloo_ddp_trains(tmp_path):
    labels = write_synthetic_shards(tmp_path / "labels", n_docs=6, tokens=256, seed=5)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           str(REPO / "cli.py"), "train", "--labels", str(labels), "--out", str(tmp_path / "run"), "--rank", "16",
           "--epochs", "2", "--batch-size", "4", "--lr", "3e-2", "--loss", "bce", "--eval-fraction", "0.34"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((tmp_path / "run" / "train_state.json").read_text())
    assert state["complete"] and 0.0 <= state["metrics"]["union_f1"] <= 1.0
    history = json.loads(last_checkpoint(tmp_path / "run").joinpath("trainer_state.json").read_text())
    # 4 training documents x 15 triggers / 4 per batch = 15 batches of whole triggers (all layers), dealt to
    # 2 processes (DDP drops the odd one out) -> 7 steps per epoch
    assert history["global_step"] == 14 and state["steps"] == 14
    weights = load_file(str(next((tmp_path / "run" / "model").rglob("model.safetensors"))))
    assert all(torch.isfinite(t).all() for t in weights.values())
