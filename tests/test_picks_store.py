"""The full runs' native picks kept beside an evaluation: a resumed oracle run replays them (no full decode again)
and decodes what it decoded before; picks of another prompt, or a damaged file, are decoded again."""

import json

import pytest
import torch

import fm_eval.runner as runner
from fm_eval.picks_store import load_picks, picks_path, save_picks
from fm_eval.runner import EvalConfig, evaluate

TASK = "niah_single_2"


def test_round_trip_and_refusals(tmp_path):
    picks = {7: torch.tensor([0, 3, 9]), 5: torch.tensor([], dtype=torch.long), 6: torch.tensor([2**31 - 1])}
    path = save_picks(picks_path(tmp_path, TASK, 256, 1), picks, "abc")
    assert path == tmp_path / "picks" / f"{TASK}@256#1.safetensors"
    back = load_picks(path, "abc")
    assert sorted(back) == [5, 6, 7]
    for t, entries in picks.items():
        assert back[t].dtype == torch.int64 and back[t].tolist() == entries.tolist()
    assert load_picks(path, "abd") is None  # another prompt's picks
    assert load_picks(tmp_path / "none.safetensors", "abc") is None
    path.write_bytes(path.read_bytes()[:40])  # cut short
    assert load_picks(path, "abc") is None
    assert load_picks(save_picks(path, {}, "e"), "e") == {}
    with pytest.raises(ValueError):
        save_picks(path, {1: torch.tensor([-1])}, "e")


def test_resumed_oracle_replays_the_stored_picks(backbone, tmp_path, monkeypatch):
    out = tmp_path / "e"
    config = EvalConfig(model="tiny", modes=("full", "oracle"), tasks=(TASK,), lengths=(256,), samples=2,
                        max_new_tokens=6, tau=2, budget=12)
    first = evaluate(config, out, backbone=backbone)
    oracle = {r["index"]: r for r in first["runs"] if r["mode"] == "oracle"}
    assert sorted(p.name for p in (out / "picks").iterdir()) == [f"{TASK}@256#0.safetensors",
                                                                  f"{TASK}@256#1.safetensors"]
    calls = []
    real = runner.record_native_picks

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "record_native_picks", counting)
    lines = (out / "runs.jsonl").read_text().splitlines()
    keep = [line for line in lines if json.loads(line)["mode"] != "oracle"]
    (out / "runs.jsonl").write_text("\n".join(keep) + "\n")  # both oracle runs cut
    resumed = evaluate(config, out, resume=True, backbone=backbone)
    assert calls == []  # replayed from picks/, no full decode
    again = {r["index"]: r for r in resumed["runs"] if r["mode"] == "oracle"}
    for i in (0, 1):
        assert again[i]["prediction"] == oracle[i]["prediction"]
        assert again[i]["selected_per_trigger"] == oracle[i]["selected_per_trigger"]

    # picks that belong to another prompt are not used: prompt 1's file replaced by prompt 0's
    picks_path(out, TASK, 256, 0).replace(picks_path(out, TASK, 256, 1))
    keep = [line for line in (out / "runs.jsonl").read_text().splitlines()
            if (json.loads(line)["mode"], json.loads(line)["index"]) != ("oracle", 1)]
    (out / "runs.jsonl").write_text("\n".join(keep) + "\n")
    resumed = evaluate(config, out, resume=True, backbone=backbone)
    assert calls == [1]  # prompt 1 decoded in full again
    again = {r["index"]: r for r in resumed["runs"] if r["mode"] == "oracle"}
    assert again[1]["prediction"] == oracle[1]["prediction"]
    assert again[1]["selected_per_trigger"] == oracle[1]["selected_per_trigger"]
