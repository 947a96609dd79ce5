"""The memory indexer's math (lsa_runtime.memory_indexer) against independent computations."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from lsa_runtime.errors import FmIndexError
from lsa_runtime.memory_indexer import ExportError, MemoryIndexer, MemoryIndexerConfig, sigmoid_inverse

ROPE = {"rope_type": "default", "rope_theta": 160000.0, "partial_rotary_factor": 0.25}


def small_config(**kw) -> MemoryIndexerConfig:
    base = dict(layers=(2, 4), rank=12, hidden_size=10, index_n_heads=3, index_head_dim=8, rope_dim=4, rope=ROPE,
                rope_head_dim_base=16, max_position_embeddings=4096, compress_rate=4, rms_norm_eps=1e-6,
                backbone_config_hash="abc123")
    base.update(kw)
    return MemoryIndexerConfig(**base)


def random_indexer(seed=0, **kw) -> MemoryIndexer:
    torch.manual_seed(seed)
    indexer = MemoryIndexer(small_config(**kw))
    with torch.no_grad():
        for layer in indexer.layers.values():
            layer.latent_norm.weight.uniform_(0.5, 1.5)  # exercise the learned RMSNorm weight
    return indexer


def direct_scores(indexer: MemoryIndexer, layer: int, hidden, positions, keys) -> np.ndarray:
    """numpy float64, written from the formula in docs/DESIGN.md ("Memory indexer math")."""
    cfg = indexer.config
    mod = indexer.layer(layer)
    W_DQ, g = mod.W_DQ.weight.detach().double().numpy(), mod.latent_norm.weight.detach().double().numpy()
    W_IUQ, W_w = mod.W_IUQ.weight.detach().double().numpy(), mod.W_w.weight.detach().double().numpy()
    h, k = hidden.double().numpy(), keys.double().numpy()
    H, dh, rd = cfg.index_n_heads, cfg.index_head_dim, cfg.rope_dim
    c = h @ W_DQ.T
    c = c / np.sqrt((c ** 2).mean(-1, keepdims=True) + cfg.rms_norm_eps) * g
    q = (c @ W_IUQ.T).reshape(len(h), H, dh)
    # interleaved RoPE on the trailing rd channels: pair (2i, 2i+1) rotated by t * theta^(-2i/rd)
    inv_freq = 1.0 / (cfg.rope["rope_theta"] ** (np.arange(0, rd, 2) / rd))
    angle = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]  # [R, rd/2]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    rope = q[..., dh - rd:]
    x1, x2 = rope[..., 0::2], rope[..., 1::2]
    rotated = np.empty_like(rope)
    rotated[..., 0::2] = x1 * cos - x2 * sin
    rotated[..., 1::2] = x2 * cos + x1 * sin
    q = np.concatenate([q[..., : dh - rd], rotated], axis=-1)
    w = (h @ W_w.T) / np.sqrt(H)
    s = np.maximum(np.einsum("rhd,td->rht", q, k), 0.0)
    logits = np.einsum("rht,rh->rt", s, w) / np.sqrt(dh)
    return 1.0 / (1.0 + np.exp(-logits))


def test_gated_score_equals_direct_formula():
    indexer = random_indexer()
    gen = torch.Generator().manual_seed(1)
    hidden, keys = torch.randn(5, 10, generator=gen) * 3, torch.randn(37, 8, generator=gen)
    positions = torch.tensor([0, 7, 64, 1000, 4000])
    for layer in (2, 4):
        got = indexer.score(layer, hidden, positions, keys).detach().double().numpy()
        np.testing.assert_allclose(got, direct_scores(indexer, layer, hidden, positions, keys), rtol=1e-5, atol=1e-6)
    # the two layers are independent indexers
    assert not torch.allclose(indexer.score(2, hidden, positions, keys), indexer.score(4, hidden, positions, keys))


def test_chunked_scoring_equals_unchunked_forward_and_backward():
    indexer = random_indexer(3)
    gen = torch.Generator().manual_seed(2)
    hidden, keys = torch.randn(4, 10, generator=gen), torch.randn(301, 8, generator=gen)
    positions = torch.tensor([100, 200, 300, 1203])
    grads = []
    outs = []
    for chunk in (7, 64, 100_000):
        indexer.zero_grad()
        logits = indexer.logits(2, hidden, positions, keys, chunk_size=chunk)
        (logits * torch.linspace(-1, 1, logits.numel()).reshape(logits.shape)).sum().backward()
        outs.append(logits.detach())
        grads.append([p.grad.clone() for p in indexer.layer(2).parameters()])
    for other, g in zip(outs[1:], grads[1:]):
        torch.testing.assert_close(other, outs[0], rtol=1e-5, atol=1e-6)
        for a, b in zip(g, grads[0]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fetch_is_the_or_union_of_layers_over_visible_entries():
    indexer = random_indexer(5)
    gen = torch.Generator().manual_seed(4)
    keys = {2: torch.randn(50, 8, generator=gen), 4: torch.randn(50, 8, generator=gen)}
    hidden = {2: torch.randn(10, generator=gen) * 4, 4: torch.randn(10, generator=gen) * 4}
    position, n_visible = 163, 41
    got = indexer.fetch(hidden, position, keys, n_visible=n_visible)
    expected = set()
    for L in (2, 4):
        p = direct_scores(indexer, L, hidden[L].reshape(1, -1), [position], keys[L][:n_visible])[0]
        expected |= set(np.nonzero(p >= 0.5)[0].tolist())
    assert got.dtype == torch.long and got.tolist() == sorted(expected)
    assert 0 < len(expected) < n_visible  # the case is not trivial
    # default n_visible = (t + 1) // m
    assert indexer.fetch(hidden, position, keys).tolist() == \
        indexer.fetch(hidden, position, keys, n_visible=(position + 1) // 4).tolist()
    assert indexer.fetch(hidden, position, keys, threshold=0.999999).numel() <= len(expected)


def test_batched_trigger_towers_equal_per_layer_towers_bit_for_bit():
    """trigger_queries (RMSNorm/RoPE/scaling once over all layers' rows) == each layer's own query(), exactly,
    and trigger_logits == logits() per layer; three layers, bf16 weights as in serving, and float32."""
    for dtype in (torch.float32, torch.bfloat16):
        indexer = random_indexer(7, layers=(2, 4, 6)).to(dtype)
        gen = torch.Generator().manual_seed(8)
        hidden = {L: (torch.randn(10, generator=gen) * 3).to(dtype) for L in (2, 4, 6)}
        keys = {L: torch.randn(40, 8, generator=gen).to(dtype) for L in (2, 4, 6)}
        position = 517
        q, w = indexer.trigger_queries(hidden, position)
        logits = indexer.trigger_logits(hidden, position, keys, n_visible=33)
        assert list(logits) == [2, 4, 6]
        for i, L in enumerate((2, 4, 6)):
            q1, w1 = indexer.layer(L).query(hidden[L].reshape(1, -1), torch.tensor([position]))
            assert torch.equal(q[i], q1[0]) and torch.equal(w[i], w1[0]), (dtype, L)
            want = indexer.logits(L, hidden[L].reshape(1, -1), [position], keys[L][:33])[0]
            assert torch.equal(logits[L], want), (dtype, L)
        if dtype == torch.float32:  # and the formula itself
            for L in (2, 4, 6):
                p = direct_scores(indexer, L, hidden[L].reshape(1, -1), [position], keys[L][:33])[0]
                np.testing.assert_allclose(torch.sigmoid(logits[L]).double().numpy(), p, rtol=1e-5, atol=1e-6)


def test_export_round_trip_and_bad_exports(tmp_path):
    indexer = random_indexer(7)
    out = indexer.save_export(tmp_path / "export", metrics={"union_f1": 0.5})
    cfg = json.loads((out / "lsa_config.json").read_text())
    assert cfg["format"] == "fm-index-lsa/1" and cfg["layers"] == [2, 4] and cfg["rank"] == 12
    assert cfg["threshold"] == 0.5 and cfg["metrics"] == {"union_f1": 0.5} and cfg["backbone_config_hash"] == "abc123"
    from safetensors.torch import load_file

    names = set(load_file(str(out / "model.safetensors")))
    assert names == {f"layers.{L}.{w}.weight" for L in (2, 4) for w in ("W_DQ", "latent_norm", "W_IUQ", "W_w")}
    loaded = MemoryIndexer.from_export(out, expected_config_hash="abc123")
    gen = torch.Generator().manual_seed(8)
    hidden, keys, pos = torch.randn(3, 10, generator=gen), torch.randn(20, 8, generator=gen), torch.tensor([5, 80, 90])
    for L in (2, 4):
        assert torch.equal(loaded.score(L, hidden, pos, keys), indexer.score(L, hidden, pos, keys))
    with pytest.raises(ExportError, match="another|not this backbone"):
        MemoryIndexer.from_export(out, expected_config_hash="fff")
    # an export from before the fetch_top floor (no such key) loads with it off, the release's rule
    assert cfg["fetch_top"] == 0
    older = tmp_path / "older"
    older.mkdir()
    (older / "lsa_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "fetch_top"}))
    (older / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    assert MemoryIndexer.from_export(older).config.fetch_top == 0
    with pytest.raises(ExportError, match="not empty"):
        indexer.save_export(out)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "lsa_config.json").write_text((out / "lsa_config.json").read_text())
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ExportError, match="corrupt"):
        MemoryIndexer.from_export(tmp_path / "broken")
    with pytest.raises(ExportError, match="not a memory-indexer export"):
        MemoryIndexer.from_export(tmp_path)


def test_runtime_module_stays_light():
    code = ("import sys, lsa_runtime.memory_indexer; "
            "bad = [m for m in ('sentence_transformers', 'datasets', 'indexer_train') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_init_from_native_equals_native_scorer_logits(tiny_model):
    """sigmoid^-1 of the memory score == the native scorer's raw logits, captured by a forward hook."""
    from lsa_runtime.backbone import config_hash, default_memory_layers

    config = tiny_model.config
    layers = default_memory_layers(config)
    mcfg = MemoryIndexerConfig.from_backbone_config(config, layers, rank=config.q_lora_rank)
    assert mcfg.backbone_config_hash == config_hash(config)
    indexer = MemoryIndexer.init_from_native(tiny_model, mcfg)
    captured, handles = {}, []
    for L in layers:
        attn = tiny_model.model.layers[L].self_attn
        handles.append(attn.register_forward_pre_hook(
            lambda m, a, k, L=L: captured.__setitem__(("h", L), (a[0] if a else k["hidden_states"]).detach()),
            with_kwargs=True))
        handles.append(attn.compressor.indexer.scorer.register_forward_hook(
            lambda m, a, o, L=L: captured.__setitem__(("scorer", L), (a[1].detach(), o.detach()))))
    ids = torch.randint(3, config.vocab_size, (1, 80), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            tiny_model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    for L in layers:
        hidden = captured[("h", L)][0]  # [S, d]
        keys, native = captured[("scorer", L)]  # [1, T, dh], [1, S, T]
        positions = torch.arange(hidden.shape[0])
        logits = indexer.logits(L, hidden, positions, keys[0], chunk_size=5)
        torch.testing.assert_close(logits, native[0].float(), rtol=1e-4, atol=1e-4)
        # and through the sigmoid: logit(score) is the same number
        probs = indexer.score(L, hidden[60:62], positions[60:62], keys[0])
        torch.testing.assert_close(sigmoid_inverse(probs).float(), native[0, 60:62].float(), rtol=1e-3, atol=1e-3)
        assert native[0].abs().max() > 1.0  # non-trivial scores


def test_native_init_of_a_wider_tower_copies_the_native_weights_into_its_leading_heads_and_rank(tiny_model):
    """The release's init: 128 heads / rank 2048 from the native 64 / 1024; here 2x the tiny backbone's."""
    from lsa_runtime.backbone import default_memory_layers
    from lsa_runtime.memory_indexer import check_fits

    config = tiny_model.config
    H, r = 2 * config.index_n_heads, 2 * config.q_lora_rank
    base = MemoryIndexerConfig.from_backbone_config(config, default_memory_layers(config), rank=r)
    wide = MemoryIndexerConfig(**{**base.__dict__, "index_n_heads": H})
    torch.manual_seed(0)
    indexer = MemoryIndexer.init_from_native(tiny_model, wide)
    check_fits(wide, config)  # more query heads than the backbone's indexer: allowed
    for L in wide.layers:
        mine, attn = indexer.layer(L), tiny_model.model.layers[L].self_attn
        q_rank, hd = config.q_lora_rank, config.index_n_heads * config.index_head_dim
        assert torch.equal(mine.W_DQ.weight[:q_rank], attn.q_a_proj.weight)
        assert torch.equal(mine.latent_norm.weight[:q_rank], attn.q_a_norm.weight)
        assert torch.equal(mine.latent_norm.weight[q_rank:], torch.ones(r - q_rank))
        assert torch.equal(mine.W_IUQ.weight[:hd, :q_rank], attn.compressor.indexer.q_b_proj.weight)
        assert torch.equal(mine.W_w.weight[: config.index_n_heads], attn.compressor.indexer.scorer.weights_proj.weight)
        assert mine.W_IUQ.weight[hd:].abs().sum() > 0 and mine.W_w.weight[config.index_n_heads:].abs().sum() > 0
    narrow = MemoryIndexerConfig(**{**base.__dict__, "rank": config.q_lora_rank - 1})
    with pytest.raises(FmIndexError, match="smaller than the backbone's"):
        MemoryIndexer.init_from_native(tiny_model, narrow)


def test_native_init_from_the_bundled_files_equals_copying_from_the_loaded_model():
    """The bundled reference stores DeepSeek's tensor names ("model.layers.2.attn.wq_a.weight"): read from the files
    alone they give the towers init_from_native copies out of the loaded model."""
    from lsa_runtime.backbone import load_backbone
    from lsa_runtime.memory_indexer import MemoryIndexer, MemoryIndexerConfig

    model, _ = load_backbone("reference", dtype="float32")
    config = MemoryIndexerConfig.from_backbone_config(model.config, (2, 4, 6), rank=model.config.q_lora_rank)
    a = MemoryIndexer.init_from_checkpoint("reference", config).state_dict()
    b = MemoryIndexer.init_from_native(model, config).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_distance_cap_scores_far_entries_as_if_at_the_cap():
    """Oracle: entry s (RoPE'd at its first token 4s) farther than D from the trigger t is scored by the query rotated
    at 4s + D (relative distance D, written out in numpy); nearer entries by the query at t, bit for bit as without a
    cap."""
    indexer = random_indexer(7)
    gen = torch.Generator().manual_seed(8)
    n, t, cap = 3000, 12003, 3000  # far: 4s < t - D, i.e. s < 2251 (ceil of 9003 / 4)
    keys = {2: torch.randn(n, 8, generator=gen), 4: torch.randn(n, 8, generator=gen)}
    hidden = {2: torch.randn(10, generator=gen) * 4, 4: torch.randn(10, generator=gen) * 4}
    plain = indexer.trigger_logits(hidden, t, keys, n)
    capped = indexer.trigger_logits(hidden, t, keys, n, distance_cap=cap)
    far = 2251
    assert 4 * (far - 1) < t - cap <= 4 * far
    for L in (2, 4):
        torch.testing.assert_close(capped[L][far:], plain[L][far:], rtol=0, atol=0)
        got = torch.sigmoid(capped[L][:far]).double().numpy()
        want = np.array([direct_scores(indexer, L, hidden[L].reshape(1, -1), [4 * s + cap], keys[L][s : s + 1])[0, 0]
                         for s in range(0, far, 50)])
        np.testing.assert_allclose(got[::50], want, rtol=2e-4, atol=1e-6)
        assert not torch.allclose(capped[L][:far], plain[L][:far])  # the cap changed the far entries
    # off (None, 0) or a cap beyond the context: the plain logits
    for off in (None, 0, t + 1):
        again = indexer.trigger_logits(hidden, t, keys, n, distance_cap=off)
        assert all(torch.equal(again[L], plain[L]) for L in (2, 4))


def test_trained_distance_is_written_only_when_known_and_read_back():
    """An export from before the field (no ``trained_distance``) reads as 0, unknown, and a config with 0 writes
    exactly the keys it wrote before; a known distance round-trips; a negative one is refused."""
    from dataclasses import replace

    from lsa_runtime.errors import FmIndexError
    from lsa_runtime.memory_indexer import MemoryIndexerConfig

    config = random_indexer(3).config
    blob = config.to_json()
    assert "trained_distance" not in blob and MemoryIndexerConfig.from_json(blob).trained_distance == 0
    known = replace(config, trained_distance=65472)
    assert known.to_json() == {**blob, "trained_distance": 65472}
    assert MemoryIndexerConfig.from_json(known.to_json()).trained_distance == 65472
    for bad in (-1, 2.5, True):
        with pytest.raises(FmIndexError, match="trained_distance"):
            replace(config, trained_distance=bad)
