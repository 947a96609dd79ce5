"""The authors' release formats: their retriever checkpoint as a MemoryIndexer (read and written), checked against
an independent numpy implementation of their scorer (YaRN RoPE on the last 64 query dims in interleaved pairs,
their weight scaling), and round trips; a checkpoint that is not theirs, or that would run code, is refused."""

import math
import pickle

import numpy as np
import pytest
import torch

from lsa_runtime.memory_indexer import ExportError, MemoryIndexer
from lsa_runtime.release_format import load_release_checkpoint, release_config, release_state_dict


def small_backbone():
    """A DeepSeek-V4 config with the release's key geometry (128-dim index keys, 64 rope dims of a 512 head)."""
    from transformers import DeepseekV4Config

    types = ["sliding_attention", "sliding_attention"] + ["compressed_sparse_attention",
                                                          "heavily_compressed_attention"] * 3
    return DeepseekV4Config(num_hidden_layers=8, layer_types=types, mlp_layer_types=["moe"] * 8, hidden_size=48,
                            head_dim=512, num_attention_heads=2, q_lora_rank=16, index_n_heads=4,
                            index_head_dim=128, index_topk=8, vocab_size=64)


def numpy_release_scores(weights: dict, index: int, hidden: np.ndarray, position: int, keys: np.ndarray):
    """The release's LightningIndexerTrainable forward, from its description: fp32 throughout."""
    wq_a, q_norm = weights[f"retrievers.l{index}.wq_a.weight"], weights[f"retrievers.l{index}.q_norm_weight"]
    wq_b, w_proj = weights[f"retrievers.l{index}.wq_b.weight"], weights[f"retrievers.l{index}.weights_proj.weight"]
    x = hidden.astype(np.float64)
    lat = wq_a @ x
    lat = lat / np.sqrt(np.mean(lat ** 2) + 1e-6) * q_norm
    heads = wq_b.shape[0] // 128
    q = (wq_b @ lat).reshape(heads, 128)
    # YaRN: base 160000, factor 16, original 65536, beta_fast 32, beta_slow 1 -> low 15, high 25, no mscale
    dim, base, factor = 64, 160000.0, 16.0
    freqs = 1.0 / base ** (np.arange(0, dim, 2) / dim)

    def corr(rot):
        return dim * math.log(65536 / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = math.floor(corr(32)), math.ceil(corr(1))
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
    freqs = freqs * (1 - ramp) + freqs / factor * ramp
    # their RoPE table holds fp32 angles (torch.outer of fp32 positions and frequencies): far past 65,536
    # positions an fp32 angle is off by up to half an ulp of the position times the frequency, so do the same
    angle = (np.float32(position) * freqs.astype(np.float32)).astype(np.float64)
    rope = q[:, 64:].reshape(heads, 32, 2)
    re, im = rope[..., 0], rope[..., 1]
    q[:, 64:] = np.stack([re * np.cos(angle) - im * np.sin(angle), re * np.sin(angle) + im * np.cos(angle)],
                         -1).reshape(heads, 64)
    w = (w_proj @ x) * 128 ** -0.5 * heads ** -0.5
    logits = (np.maximum(keys.astype(np.float64) @ q.T, 0) * w).sum(-1)
    return 1 / (1 + np.exp(-logits))


@pytest.fixture(scope="module")
def release_file(tmp_path_factory):
    """A joint checkpoint written as their trainer does (torch.save of the state dict, freqs_cis included)."""
    gen = torch.Generator().manual_seed(0)
    state = {}
    for index in (1, 2):  # CSA indices: model layers 4 and 6 of small_backbone
        state[f"retrievers.l{index}.wq_a.weight"] = torch.randn(32, 48, generator=gen) * 0.2
        state[f"retrievers.l{index}.q_norm_weight"] = 1 + 0.1 * torch.randn(32, generator=gen)
        state[f"retrievers.l{index}.wq_b.weight"] = torch.randn(8 * 128, 32, generator=gen) * 0.2
        state[f"retrievers.l{index}.weights_proj.weight"] = torch.randn(8, 48, generator=gen)
        state[f"retrievers.l{index}.freqs_cis"] = torch.ones(16, 32, dtype=torch.complex64)
    path = tmp_path_factory.mktemp("release") / "joint.pt"
    torch.save(state, path)
    return path, state


def test_a_release_checkpoint_scores_as_their_scorer(release_file):
    path, state = release_file
    config = small_backbone()
    indexer = load_release_checkpoint(path, config)
    assert indexer.config.layers == (4, 6) and indexer.config.csa_indices == (1, 2)
    assert indexer.config.rank == 32 and indexer.config.index_n_heads == 8 and indexer.config.keep_recent == 32
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(50, 128, generator=gen)
    numpy_weights = {k: v.double().numpy() for k, v in state.items() if "freqs" not in k}
    for index, layer in ((1, 4), (2, 6)):
        hidden = torch.randn(48, generator=gen)
        for position in (3, 5_000, 70_000, 400_000):  # inside and far past the original 65,536 positions
            with torch.no_grad():
                got = indexer.score(layer, hidden.unsqueeze(0), [position], keys)[0].double().numpy()
            want = numpy_release_scores(numpy_weights, index, hidden.numpy(), position, keys.numpy())
            if position < 10_000:
                np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
            else:  # fp32 frequencies and angles (theirs and ours, the YaRN blend rounded in another order): one
                # ulp of a frequency is ~4e-3 rad at 70,000 and ~0.02 rad at 400,000 positions; a wrong YaRN
                # parameter moves the logits by whole units there
                logit = lambda p: np.log(p) - np.log1p(-p)  # noqa: E731
                np.testing.assert_allclose(logit(got), logit(want), atol=0.05)


def test_our_indexer_round_trips_through_the_release_format(release_file, tmp_path):
    config = small_backbone()
    ours = MemoryIndexer(release_config(config, [1, 2], rank=32, heads=8))
    torch.manual_seed(3)
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.1)
    torch.save(release_state_dict(ours), tmp_path / "ours.pt")
    back = load_release_checkpoint(tmp_path / "ours.pt", config)
    hidden, keys = torch.randn(3, 48), torch.randn(40, 128)
    for layer in (4, 6):
        assert torch.equal(back.score(layer, hidden, [5, 900, 70_000], keys),
                           ours.score(layer, hidden, [5, 900, 70_000], keys))


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch.load warns about the raw pickle it then refuses
def test_what_is_not_a_release_checkpoint_is_refused(release_file, tmp_path):
    config = small_backbone()
    _, state = release_file
    torch.save({**state, "retrievers.l1.bias": torch.zeros(3)}, tmp_path / "extra.pt")
    with pytest.raises(ExportError, match="unexpected key 'retrievers.l1.bias'"):
        load_release_checkpoint(tmp_path / "extra.pt", config)
    torch.save({k: v for k, v in state.items() if "l2.wq_b" not in k}, tmp_path / "missing.pt")
    with pytest.raises(ExportError, match="retrievers.l2 lacks wq_b.weight"):
        load_release_checkpoint(tmp_path / "missing.pt", config)
    torch.save({k.replace("l2.", "l9."): v for k, v in state.items()}, tmp_path / "index.pt")
    with pytest.raises(ExportError, match="CSA index 9 does not exist"):
        load_release_checkpoint(tmp_path / "index.pt", config)

    class Exploit:
        def __reduce__(self):
            return (print, ("this must never run",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"retrievers.l1.wq_a.weight": Exploit()}))
    with pytest.raises(ExportError, match="cannot read .* as a tensors-only checkpoint") as refused:
        load_release_checkpoint(tmp_path / "evil.pt", config)
    assert "weights_only" not in str(refused.value)  # torch's own text advises the unsafe reader
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ExportError, match="cannot read"):
        load_release_checkpoint(tmp_path / "text.pt", config)
    torch.save({"retrievers.l2.freqs_cis": torch.zeros(4)}, tmp_path / "rope_only.pt")
    with pytest.raises(ExportError, match="holds no retriever weights"):
        load_release_checkpoint(tmp_path / "rope_only.pt", config)
    torch.save({**state, "retrievers.l2.wq_a.weight": torch.zeros(8)}, tmp_path / "vector.pt")
    with pytest.raises(ExportError, match="retrievers.l2.wq_a.weight is not a matrix"):
        load_release_checkpoint(tmp_path / "vector.pt", config)
