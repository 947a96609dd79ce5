"""build-labels end to end on the tiny model: oracle equality, chunk-size invariance, resume, shards, bad input."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch
from typer.testing import CliRunner

from cli import app
from indexer_train.build_labels import LabelParams, build_labels, label_document, merge_shards
from indexer_train.corpus import Document
from indexer_train.shards import LabelShards
from lsa_runtime.backbone import load_config
from lsa_runtime.capture import IndexerCapture, IndexerObserver
from lsa_runtime.errors import FmIndexError
from tests.test_labels import oracle_document

runner = CliRunner()


class FullRecorder(IndexerObserver):
    """Everything of a short document, held whole (the oracle's input)."""

    def __init__(self, n, t_total):
        self.n, self.t_total = n, t_total
        self.logits, self.picks, self.hidden = {}, {}, {}

    def on_logits(self, layer, chunk, logits):
        full = self.logits.setdefault(layer, np.full((self.n, self.t_total), -np.inf, np.float32))
        full[chunk.start : chunk.start + chunk.length, : logits.shape[1]] = logits.numpy()

    def on_topk(self, layer, chunk, picks):
        self.picks.setdefault(layer, []).extend(picks.numpy())  # one row per token, as wide as the model made it

    def on_hidden(self, layer, chunk, hidden):
        self.hidden.setdefault(layer, []).append(hidden.clone())


@pytest.mark.parametrize("softmax_over", ["topk", "visible"])
@pytest.mark.parametrize("tau,p,votes,chunk", [(16, 0.6, 3, 64), (32, 0.3, 2, 50), (16, 0.9, 5, 128)])
def test_document_labels_equal_bruteforce_oracle(tiny_model, sample_ids, tau, p, votes, chunk, softmax_over):
    ids = sample_ids[:200].tolist()
    rate = 4
    n, t_total = len(ids), len(ids) // rate
    layers = (2, 4)
    params = LabelParams(layers=layers, tau=tau, nucleus=p, min_votes=votes, chunk_size=chunk,
                         softmax_over=softmax_over)
    rows, keys, stats = label_document(tiny_model, Document(0, "d", None, ids), ids, params)

    rec = FullRecorder(n, t_total)
    cache = IndexerCapture(tiny_model, memory_layers=layers, chunk_size=chunk).prefill(torch.tensor(ids), rec)
    expect = oracle_document(rec.logits, rec.picks, n, tau, rate, p, votes, softmax_over)

    assert stats["triggers"] == len(expect) and len(rows) == len(expect) * len(layers)
    for row in rows:
        pos, top, n_c = expect[row.position]
        assert row.positives.tolist() == pos
        assert row.native_topk_union.tolist() == top
        assert row.n_candidates == n_c
        assert row.n_visible == (row.position + 1) // 4
        hidden = torch.cat(rec.hidden[row.layer])[row.position].to(torch.float16)
        assert torch.equal(row.hidden, hidden)
    for layer in layers:
        torch.testing.assert_close(keys[layer], cache.layers[layer].compressed_kv["indexer"][0].half())
    assert any(len(v[0]) for v in expect.values())


def test_labels_are_chunk_size_invariant(tiny_model, sample_ids):
    """Chunking changes the logits by float rounding only (~1e-7), so labels agree up to rare near-ties."""
    ids = sample_ids[:512].tolist()
    params = dict(layers=(2, 4, 6), tau=32, nucleus=0.6, min_votes=3)
    a, _, _ = label_document(tiny_model, Document(0, "d", None, ids), ids, LabelParams(chunk_size=512, **params))
    b, _, _ = label_document(tiny_model, Document(0, "d", None, ids), ids, LabelParams(chunk_size=96, **params))
    assert [r.position for r in a] == [r.position for r in b]
    inter = sum(len(set(x.positives.tolist()) & set(y.positives.tolist())) for x, y in zip(a, b))
    union = sum(len(set(x.positives.tolist()) | set(y.positives.tolist())) for x, y in zip(a, b))
    assert union > 0 and inter / union >= 0.99
    same_topk = sum(torch.equal(x.native_topk_union, y.native_topk_union) for x, y in zip(a, b))
    assert same_topk >= 0.95 * len(a)


def _files(directory):
    out = {}
    for sub in ("rows", "keys"):
        for path in sorted((directory / sub).glob("*.arrow")):
            opener = pa.ipc.open_stream if sub == "rows" else pa.ipc.open_file
            out[f"{sub}/{path.name}"] = opener(pa.memory_map(str(path))).read_all()
    for path in sorted((directory / "done").glob("*.json")):
        out[f"done/{path.name}"] = json.loads(path.read_text())
    return out


def _assert_same_dataset(a, b):
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        if name.startswith("done/"):
            assert fa[name] == fb[name], name
        else:
            assert fa[name].equals(fb[name]), name


PARAMS = LabelParams(layers=(2, 4, 6), tau=16, nucleus=0.6, min_votes=3, chunk_size=64)


def test_one_shot_run_reads_back(small_corpus, tmp_path):
    out = tmp_path / "one"
    summary = build_labels("tiny", small_corpus, out, PARAMS)
    assert summary["documents"] == 4 and summary["skipped"] == 1  # the 20-token document
    shards = LabelShards(out)
    rows = shards.rows()
    # triggers at k*16 with a full window: 150 -> 8, 97 -> 5, 130 -> 7, 64 -> 3 (t0 = 16, 32, 48)
    assert len(rows) == (8 + 5 + 7 + 3) * 3
    assert sorted(set(rows["layer"])) == [2, 4, 6]
    row = rows[0]
    keys = shards.keys(row["doc_index"], row["layer"])
    assert keys.dtype == torch.float16 and keys.shape == (150 // 4, 32)
    assert all(p < row["n_visible"] for p in row["positives"])
    assert shards.manifest["complete"] and shards.manifest["counts"]["triggers"] == 23


def test_resume_after_interruption_equals_one_shot(small_corpus, tmp_path):
    from indexer_train.build_labels import Reporter

    one = tmp_path / "one"
    build_labels("tiny", small_corpus, one, PARAMS)

    class Crash(Reporter):
        def __init__(self):
            self.finished = 0

        def document_done(self, doc, skipped):
            self.finished += 1
            if self.finished == 2:
                raise KeyboardInterrupt

    two = tmp_path / "two"
    with pytest.raises(KeyboardInterrupt):
        build_labels("tiny", small_corpus, two, PARAMS, reporter=Crash())
    assert not json.loads((two / "manifest.json").read_text())["complete"]
    with pytest.raises(Exception, match="unfinished"):
        LabelShards(two)
    assert runner.invoke(app, ["build-labels", "--model", "tiny", "--corpus", str(small_corpus), "--out", str(two),
                               "--layers", "2,4,6", "--tau", "16", "--chunk-size", "64"]).exit_code == 2
    build_labels("tiny", small_corpus, two, PARAMS, resume=True)
    _assert_same_dataset(one, two)
    assert LabelShards(two).manifest["counts"] == LabelShards(one).manifest["counts"] | {
        "tokens_per_second": LabelShards(two).manifest["counts"]["tokens_per_second"]}


def test_two_shards_merge_into_the_one_shot_dataset(small_corpus, tmp_path):
    one = tmp_path / "one"
    build_labels("tiny", small_corpus, one, PARAMS)
    merged = tmp_path / "merged"
    build_labels("tiny", small_corpus, merged, PARAMS, shard=(1, 2))
    with pytest.raises(Exception, match="shards present"):
        merge_shards(merged)
    result = runner.invoke(app, ["build-labels", "--model", "tiny", "--corpus", str(small_corpus), "--out",
                                 str(merged), "--layers", "2,4,6", "--tau", "16", "--chunk-size", "64",
                                 "--shard", "0/2"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["merge-labels", "--out", str(merged)])
    assert result.exit_code == 0, result.output
    _assert_same_dataset(one, merged)
    assert LabelShards(merged).manifest["counts"]["triggers"] == LabelShards(one).manifest["counts"]["triggers"]


def _cli(*args):
    return runner.invoke(app, ["build-labels", "--model", "tiny", *args])


def test_bad_inputs_exit_2_and_leave_nothing(tmp_path, small_corpus):
    out = tmp_path / "out"
    cases = {
        "corpus not found": ["--corpus", str(tmp_path / "missing.jsonl")],
    }
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": \n')
    cases["line 2: invalid JSON"] = ["--corpus", str(bad)]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cases["is empty"] = ["--corpus", str(empty)]
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"id": "a"}\n')
    cases["neither 'text' nor 'input_ids'"] = ["--corpus", str(nofield)]
    cases["not CSA"] = ["--corpus", str(small_corpus), "--layers", "3"]
    cases["does not exist"] = ["--corpus", str(small_corpus), "--layers", "40"]
    cases["--tau must be"] = ["--corpus", str(small_corpus), "--tau", "0"]
    cases["--dtype float64 is not supported"] = ["--corpus", str(small_corpus), "--dtype", "float64"]
    cases["--device gpu0 is not a device"] = ["--corpus", str(small_corpus), "--device", "gpu0"]
    if not torch.cuda.is_available():
        cases["this machine has no CUDA device"] = ["--corpus", str(small_corpus), "--device", "cuda"]
    for message, args in cases.items():
        result = _cli(*args, "--out", str(out))
        assert result.exit_code == 2, (message, result.output)
        assert message in " ".join(result.output.split()), (message, result.output)
        assert not out.exists(), message

    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    result = runner.invoke(app, ["build-labels", "--model", str(llama), "--corpus", str(small_corpus),
                                 "--out", str(out)])
    assert result.exit_code == 2 and "not DeepSeek-V4" in result.output and not out.exists()

    # --resume against an output made with other parameters
    args = ["--corpus", str(small_corpus), "--out", str(out), "--layers", "2,4,6", "--tau", "16",
            "--chunk-size", "64"]
    assert _cli(*args).exit_code == 0
    before = _files(out)
    result = _cli(*args[:-4], "--tau", "32", "--chunk-size", "64", "--resume")
    assert result.exit_code == 2 and "was built with --tau 16, this run asks for --tau 32" in result.output
    assert sorted(_files(out)) == sorted(before)
    shutil.rmtree(out)

    # --out naming a file: refused, the file untouched
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    result = _cli("--corpus", str(small_corpus), "--out", str(a_file))
    assert result.exit_code == 2 and "exists and is not a directory" in result.output
    assert a_file.read_text() == "keep me"


def test_resume_with_another_corpus_is_refused(small_corpus, tmp_path):
    out = tmp_path / "out"
    build_labels("tiny", small_corpus, out, PARAMS)
    lines = small_corpus.read_text().splitlines()
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("\n".join(lines[:3]) + "\n")
    with pytest.raises(Exception, match="another corpus .*5 documents, this corpus has 3"):
        build_labels("tiny", fewer, out, PARAMS, resume=True)
    changed = tmp_path / "changed.jsonl"  # as many documents, one token changed
    record = json.loads(lines[0])
    record["input_ids"][5] += 1
    changed.write_text("\n".join([json.dumps(record)] + lines[1:]) + "\n")
    with pytest.raises(Exception, match="another corpus .*other ids or contents"):
        build_labels("tiny", changed, out, PARAMS, resume=True)
    same_elsewhere = tmp_path / "copy.jsonl"  # the same documents at another path resume fine
    same_elsewhere.write_text(small_corpus.read_text())
    assert build_labels("tiny", same_elsewhere, out, PARAMS, resume=True)["documents"] == 4


def test_a_run_that_labels_nothing_fails_and_stays_incomplete(small_corpus, tmp_path):
    out = tmp_path / "out"
    result = _cli("--corpus", str(small_corpus), "--out", str(out), "--layers", "2,4,6", "--tau", "16",
                  "--max-tokens", "20")
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "no document was labelled: all 5 are shorter than 2 * tau = 32 tokens" in message
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    with pytest.raises(Exception, match="unfinished"):
        LabelShards(out)


def test_a_second_writer_is_refused_with_the_holders_pid(small_corpus, tmp_path):
    """A process holding the output's lock (as a running build-labels does): the CLI refuses to write there,
    naming that process; another shard of the same directory is a different writer and may run."""
    import subprocess
    import sys

    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom lsa_runtime.outputs import OutputLock\n"
         f"lock = OutputLock({str(out)!r}, 'build-labels').__enter__()\nprint('locked', flush=True)\n"
         "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = _cli("--corpus", str(small_corpus), "--out", str(out), "--layers", "2,4,6", "--tau", "16")
        assert result.exit_code == 2, result.output
        assert f"being written by another fm-index process (PID {holder.pid}, build-labels)" in \
            " ".join(result.output.split())
        assert sorted(p.name for p in out.iterdir()) == [".fm-index.lock"]  # nothing else written
        shard = _cli("--corpus", str(small_corpus), "--out", str(out), "--layers", "2,4,6", "--tau", "16",
                     "--chunk-size", "64", "--shard", "1/2")
        assert shard.exit_code == 0, shard.output
    finally:
        holder.kill()
        holder.wait()
    assert _cli("--corpus", str(small_corpus), "--out", str(out), "--layers", "2,4,6", "--tau", "16",
                "--chunk-size", "64", "--shard", "0/2").exit_code == 0  # the lock went with the killed holder


@pytest.mark.slow
def test_kill_9_then_resume_equals_one_shot(small_corpus, tmp_path):
    """A build-labels process killed with SIGKILL mid-run: --resume finishes it, the same dataset as one shot."""
    import signal
    import subprocess
    import sys
    import time

    corpus = tmp_path / "corpus.jsonl"  # 40 documents: the first finishes long before the last
    docs = [json.loads(line) for line in small_corpus.read_text().splitlines()]
    corpus.write_text("".join(json.dumps({**d, "id": f"{d['id']}-{k}"}) + "\n" for k in range(8) for d in docs))
    one = tmp_path / "one"
    build_labels("tiny", corpus, one, PARAMS)
    two = tmp_path / "two"
    args = ["--model", "tiny", "--corpus", str(corpus), "--out", str(two), "--layers", "2,4,6", "--tau", "16",
            "--chunk-size", "64", "--device", "cpu"]
    proc = subprocess.Popen([sys.executable, "-m", "cli", "build-labels", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((two / "done").glob("*.json")):
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not json.loads((two / "manifest.json").read_text())["complete"]
    result = _cli(*args[2:], "--resume")
    assert result.exit_code == 0, result.output
    _assert_same_dataset(one, two)


@pytest.mark.parametrize("trigger, first, positions", [
    (None, 69, [69, 85]),  # the default: the prompt's last token (windows 69..84, 85..100; 101.. does not fit)
    ("first_generated_token", 70, [70, 86]),  # windows 70..85 and 86..101 fit, 102.. does not
])
def test_generate_source_labels_the_backbones_own_continuation(tiny_model, sample_ids, trigger, first, positions):
    """--source generate: the continuation is transformers' greedy one, triggers start at the prompt's last token
    (where a Session fires its first trigger; or at the first generated token), and the rows equal the brute-force
    oracle over prompt + continuation, with h_t0 the attention input at the trigger."""
    from indexer_train.build_labels import label_generated

    prompt = sample_ids[:70].tolist()
    params = LabelParams(layers=(2, 4), tau=16, nucleus=0.6, min_votes=3, chunk_size=64, source="generate",
                         new_tokens=40, generate_trigger=trigger)
    assert params.generate_trigger == (trigger or "last_prompt_token")
    rows, _, stats = label_generated(tiny_model, Document(0, "d", None, prompt), prompt, params)
    hf = tiny_model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, min_new_tokens=40)
    full = hf[0].tolist()
    assert stats["prompt_tokens"] == 70 and stats["generated_tokens"] == 40 and stats["tokens"] == len(full) == 110
    assert sorted({r.position for r in rows}) == positions
    rec = FullRecorder(len(full), len(full) // 4)
    IndexerCapture(tiny_model, memory_layers=(2, 4), chunk_size=64).prefill(torch.tensor(full), rec)
    expect = oracle_document(rec.logits, rec.picks, len(full), 16, 4, 0.6, 3, "topk", first=first)
    hidden = {}
    hooks = [tiny_model.model.layers[L].self_attn.register_forward_pre_hook(
        lambda m, a, k, L=L: hidden.__setitem__(L, (a[0] if a else k["hidden_states"])[0].detach().clone()),
        with_kwargs=True) for L in (2, 4)]
    with torch.no_grad():
        tiny_model(input_ids=torch.tensor([full]))
    for hook in hooks:
        hook.remove()
    for row in rows:
        assert row.positives.tolist() == expect[row.position][0]
        assert row.native_topk_union.tolist() == expect[row.position][1]
        torch.testing.assert_close(row.hidden.float(), hidden[row.layer][row.position], rtol=1e-2, atol=1e-2)


def test_generate_trigger_is_checked_and_guards_resume(small_corpus, tmp_path):
    """Generate labels made before the option (triggers at the first generated token) are not resumed as the
    new default; the option is refused where it means nothing."""
    from indexer_train.build_labels import resume_mismatch

    with pytest.raises(FmIndexError, match="generate trigger"):
        LabelParams(layers=(2, 4), source="generate", new_tokens=64, generate_trigger="middle").check(
            load_config("tiny"))
    with pytest.raises(FmIndexError, match="generate trigger is for --source generate"):
        LabelParams(layers=(2, 4), generate_trigger="last_prompt_token").check(load_config("tiny"))
    new = {"backbone": {"config_hash": "h"}, "shard": {}, "corpus": {},
           "params": {**LabelParams(layers=(2, 4), source="generate", new_tokens=64).__dict__, "layers": [2, 4]}}
    old = {**new, "params": {k: v for k, v in new["params"].items() if k != "generate_trigger"}}
    assert "the generate trigger first_generated_token" in resume_mismatch(old, new, tmp_path)
    assert resume_mismatch(new, new, tmp_path) is None


def test_training_and_evaluation_refuse_labels_of_another_definition(small_corpus, tmp_path):
    """An indexer trained on top-k-softmax labels is not evaluated on visible-softmax labels (and back)."""
    topk, visible = tmp_path / "topk", tmp_path / "visible"
    build_labels("tiny", small_corpus, topk, PARAMS)
    build_labels("tiny", small_corpus, visible, LabelParams(**{**PARAMS.__dict__, "softmax_over": "visible"}))
    assert LabelShards(topk).manifest["params"]["softmax_over"] == "topk"
    result = runner.invoke(app, ["train", "--labels", str(topk), "--out", str(tmp_path / "run"), "--rank", "16",
                                 "--epochs", "1", "--eval-fraction", "0.34"])
    assert result.exit_code == 0, result.output
    bad = runner.invoke(app, ["eval", "--indexer", str(tmp_path / "run"), "--labels", str(visible)])
    assert bad.exit_code == 2 and "trained on labels built with --softmax-over topk; these labels use " \
                                  "--softmax-over visible" in " ".join(bad.output.split()), bad.output
    good = runner.invoke(app, ["eval", "--indexer", str(tmp_path / "run"), "--labels", str(topk)])
    assert good.exit_code == 0, good.output
    other_p = tmp_path / "p03"
    build_labels("tiny", small_corpus, other_p, LabelParams(**{**PARAMS.__dict__, "nucleus": 0.3}))
    bad = runner.invoke(app, ["eval", "--indexer", str(tmp_path / "run"), "--labels", str(other_p)])
    assert bad.exit_code == 2 and f"--nucleus {PARAMS.nucleus}; these labels use --nucleus 0.3" \
        in " ".join(bad.output.split()), bad.output
