"""fm-index import-dump: the authors' doc_*.pkl label dumps become our label shards. A dump is built here from the
documented layout, out of the tiny backbone's own capture; the imported rows must equal our own labels of the same
tokens (build-labels' top-k definition, windows from the first dumped token), the keys must come back from FP8 and
the Hadamard basis, and a pickle that would run code is refused with nothing written."""

import pickle

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from indexer_train.build_labels import LabelParams, label_document
from indexer_train.corpus import Document
from indexer_train.labels import topk_nucleus_mask
from indexer_train.release_dump import dequantize_keys, hadamard, quantize_keys, read_dump
from indexer_train.shards import LabelShards
from lsa_runtime.backbone import csa_index, csa_layers
from lsa_runtime.capture import IndexerCapture, IndexerObserver

runner = CliRunner()
N, P, TAU, LAYERS = 200, 72, 16, (4, 8)


class Recorder(IndexerObserver):
    def __init__(self):
        self.logits, self.picks, self.hidden = {}, {}, {}

    def on_logits(self, layer, chunk, logits):
        self._pending = logits

    def on_topk(self, layer, chunk, picks):
        for row in range(picks.shape[0]):
            t = chunk.start + row
            self.logits.setdefault(layer, {})[t] = self._pending[row]
            self.picks.setdefault(layer, {})[t] = picks[row]

    def on_hidden(self, layer, chunk, hidden):
        for row in range(hidden.shape[0]):
            self.hidden.setdefault(layer, {})[chunk.start + row] = hidden[row]


@pytest.fixture(scope="module")
def dump(tiny_model, sample_ids, tmp_path_factory):
    """A dump of tokens P..N-1 of one document, as the release's server writes it."""
    ids = sample_ids[:N]
    rec = Recorder()
    cache = IndexerCapture(tiny_model, memory_layers=LAYERS, chunk_size=64).prefill(ids, rec)
    config = tiny_model.config
    blob, pointers, entries, scores = {}, [0], [], []
    for t in range(P, N):  # per decode token: the release's per-token golden set, voted over all CSA layers
        counts = torch.zeros(N // 4, dtype=torch.int32)
        for layer in csa_layers(config):
            counts[: rec.logits[layer][t].numel()] += topk_nucleus_mask(
                rec.logits[layer][t].unsqueeze(0), rec.picks[layer][t].unsqueeze(0), 0.6)[0].int()
        golden = torch.nonzero(counts >= 3).flatten()
        entries.append(golden.int())
        scores.append(counts[golden])
        pointers.append(pointers[-1] + golden.numel())
    for layer in LAYERS:
        i = csa_index(config, layer)
        blob[f"hidden_layer_{i}"] = torch.stack([rec.hidden[layer][t] for t in range(P, N)]).to(torch.bfloat16)
        blob[f"positions_layer_{i}"] = torch.arange(P, N)
        blob[f"compk_layer_{i}"] = quantize_keys(cache.layers[layer].compressed_kv["indexer"][0].float())
    blob.update(label_indices=torch.cat(entries), label_scores=torch.cat(scores),
                label_pointers=torch.tensor(pointers, dtype=torch.int32))
    folder = tmp_path_factory.mktemp("dumps")
    with (folder / "doc_00003.pkl").open("wb") as f:
        pickle.dump(blob, f)
    keys = {L: cache.layers[L].compressed_kv["indexer"][0].float() for L in LAYERS}
    return folder, keys, ids


def test_imported_rows_equal_our_labels_of_the_same_tokens(tiny_model, dump, tmp_path):
    folder, keys, ids = dump
    result = runner.invoke(app, ["import-dump", str(folder), "--model", "tiny", "--out", str(tmp_path / "labels"),
                                 "--tau", str(TAU)])
    assert result.exit_code == 0, result.output
    shards = LabelShards(tmp_path / "labels")
    assert shards.manifest["memory_layers"] == {"layers": [4, 8], "csa_indices": [1, 3]}
    assert shards.manifest["params"]["softmax_over"] == "topk" and shards.manifest["params"]["source"] == "generate"
    params = LabelParams(layers=LAYERS, tau=TAU, nucleus=0.6, min_votes=3, chunk_size=64)
    ours, _, _ = label_document(tiny_model, Document(0, "d", None, ids.tolist()), ids.tolist(), params,
                                first_trigger=P)
    rows = shards.rows()
    assert len(rows) == len(ours) == 2 * ((N - P) // TAU)
    for mine, theirs in zip(ours, rows):
        assert (theirs["layer"], theirs["position"], theirs["n_visible"]) == (mine.layer, mine.position,
                                                                              mine.n_visible)
        assert theirs["positives"] == mine.positives.tolist()
        # h_t0 went through bf16 in the dump
        torch.testing.assert_close(torch.tensor(theirs["hidden"]), mine.hidden.float(), rtol=2 ** -7, atol=1e-3)
    for layer in LAYERS:  # keys: back from FP8 e4m3 (3 mantissa bits) and the Hadamard basis
        got, want = shards.keys(0, layer).float(), keys[layer]
        assert got.shape == want.shape
        error = (got - want).abs().amax(1) / want.abs().amax(1)
        assert float(error.max()) < 0.08


def test_fp8_keys_round_trip_and_the_rotation_is_its_own_inverse():
    h = hadamard(32).double()
    torch.testing.assert_close(h @ h, torch.eye(32, dtype=torch.float64))
    keys = torch.randn(50, 32) * torch.linspace(0.1, 10, 50).unsqueeze(1)
    back = dequantize_keys(quantize_keys(keys))
    assert float(((back - keys).abs().amax(1) / keys.abs().amax(1)).max()) < 0.08
    stored = quantize_keys(keys)[:, :32].contiguous().view(torch.float8_e4m3fn).float()
    assert not torch.allclose(stored, keys, rtol=0.2)  # the stored bytes are in the rotated basis


def test_a_malicious_pickle_is_refused_and_nothing_is_written(dump, tmp_path):
    folder, _, _ = dump
    evil_dir = tmp_path / "evil"
    evil_dir.mkdir()
    (evil_dir / "doc_00000.pkl").write_bytes((folder / "doc_00003.pkl").read_bytes())

    class Exploit:
        def __reduce__(self):
            import os

            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (evil_dir / "doc_00001.pkl").write_bytes(pickle.dumps({"label_pointers": Exploit()}))
    result = runner.invoke(app, ["import-dump", str(evil_dir), "--model", "tiny", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "refuses to load posix.system" in " ".join(result.output.split())
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()
    bad = runner.invoke(app, ["import-dump", str(tmp_path / "nothing"), "--model", "tiny", "--out",
                              str(tmp_path / "out")])
    assert bad.exit_code == 2 and "does not exist" in bad.output


def test_malformed_dumps_and_options_are_refused_before_writing(dump, tmp_path):
    """One line, exit 2, no output directory: a later dump lacking a layer's keys, a non-CSA layer, an empty item
    in --layers; and a corrupt manifest on --resume."""
    folder, _, _ = dump
    blob = read_dump(folder / "doc_00003.pkl")
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    (bad_dir / "doc_00000.pkl").write_bytes((folder / "doc_00003.pkl").read_bytes())
    with (bad_dir / "doc_00001.pkl").open("wb") as f:
        pickle.dump({k: v for k, v in blob.items() if not k.startswith("compk_layer_")}, f)
    out = tmp_path / "out"
    cases = [([str(bad_dir)], "lacks compk_layer_"), ([str(folder), "--layers", "3"], "layer 3 is not a CSA layer"),
             ([str(folder), "--layers", "csa:1,,3"], "--layers must be comma-separated integers")]
    for args, message in cases:
        result = runner.invoke(app, ["import-dump", *args, "--model", "tiny", "--out", str(out)])
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
        assert "Traceback" not in result.output and not out.exists()
    good = runner.invoke(app, ["import-dump", str(folder), "--model", "tiny", "--out", str(out), "--tau", str(TAU)])
    assert good.exit_code == 0, good.output
    (out / "manifest.json").write_text("{not json")
    again = runner.invoke(app, ["import-dump", str(folder), "--model", "tiny", "--out", str(out), "--tau", str(TAU),
                                "--resume"])
    assert again.exit_code == 2 and "corrupt" in again.output, again.output
