"""reference/train_indexer.py: the Lightning Indexer trained alone against the dense attention (backbone frozen)."""

import json

import numpy as np
import pytest
import torch


def _toy_model(seed: int = 0, n_layers: int = 6, vocab: int = 256):
    """The toy config with two CSA layers (2 and 4) and its sinks and compressor position biases perturbed."""
    from transformers import DeepseekV4Config

    from reference.model_config import flash_layout, toy_config
    from reference.train import new_model

    settings = toy_config(vocab).to_dict()
    settings.pop("mlp_layer_types", None)  # derived from the layer count
    settings.update(num_hidden_layers=n_layers, layer_types=flash_layout(n_layers))
    model = new_model(DeepseekV4Config(**settings), seed)
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks") or name.endswith("position_bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def _indexer_grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_dense_kl_equals_the_dense_warm_up_distillation(monkeypatch):
    """Oracle: distillation.py in its dense warm-up (index_topk covers every entry) with transformers' eager
    attention and indexer, one forward over the whole sequence: per-layer KL(p || softmax(I)) over every visible
    entry and its gradients in the indexers' parameters. train_indexer's teacher (window attention, chunked prefill
    through the cache in chunks of 40 tokens) and student (query chunks of 7 rows) give the same KL per layer, the
    same mean and the same gradients (fp32); its mass@k equals the teacher's mass on the top-k of transformers'
    own I[t, s], computed here by brute force."""
    from lsa_runtime import window_attention as attention
    from lsa_runtime.window_attention import set_attention
    from reference.distillation import IndexerDistillation
    from reference.model_config import csa_layer_indices
    from reference.evaluate_needles import set_topk
    from reference.train_indexer import EVERY_ENTRY, DenseTeacher, indexer_parameters, train_step

    model = _toy_model(seed=2)
    csa = csa_layer_indices(model.config)
    assert csa == [2, 4]
    S, k = 171, model.config.index_topk
    ids = torch.randint(3, 256, (1, S), generator=torch.Generator().manual_seed(3))

    # the oracle: one eager forward with the dense warm-up's distillation, I[t, s] over every entry kept
    set_attention(model, "eager")
    indexer_parameters(model, csa)
    distill = IndexerDistillation(model, csa)
    distill.set_topk(model, 10_000)
    scores = {}
    hooks = [model.model.layers[i].self_attn.compressor.indexer.scorer.register_forward_hook(
        lambda m, a, o, i=i: scores.__setitem__(i, o.detach()[0])) for i in csa]
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    kl, per_layer = distill.pop_loss()
    kl.backward()
    oracle_grads = _indexer_grads(model)
    distill.remove()
    assert set(oracle_grads) and all(".compressor.indexer." in n for n in oracle_grads)

    # train_indexer: window attention, chunked teacher prefill, chunked student
    set_attention(model, "window")
    monkeypatch.setattr(attention, "CHUNK_BYTES", 7 * model.config.index_n_heads * (S // 4) * 4)
    model.zero_grad(set_to_none=True)
    teacher = DenseTeacher(model, csa, mass_dtype=torch.float32)  # bf16 storage (the default) differs by ~0.4%
    set_topk(model, EVERY_ENTRY)
    captured = {}
    run = teacher.run
    monkeypatch.setattr(teacher, "run", lambda *a: captured.update(run(*a)) or captured)
    metrics = train_step(model, teacher, ids[0], 40, 2**30)
    teacher.remove()
    for i in csa:
        assert metrics["layers"][str(i)]["kl"] == pytest.approx(per_layer[i], rel=1e-4, abs=1e-6)
    assert metrics["kl"] == pytest.approx(float(kl.detach()), rel=1e-4)
    grads = _indexer_grads(model)
    assert set(grads) == set(oracle_grads)
    for name, g in oracle_grads.items():
        assert float((grads[name] - g).abs().max()) <= 1e-4 * float(g.abs().max()) + 1e-9, name

    # mass@k by brute force: the teacher's normalised mass on the top-k visible entries of transformers' I[t, s]
    for i in csa:
        target = captured[i][3].float()
        full = scores[i]  # [S, T]
        limit = (torch.arange(S) + 1) // 4
        visible = torch.arange(full.shape[1])[None] < limit[:, None]
        p = target * visible
        rows = p.sum(-1) > 0
        p = p[rows] / p[rows].sum(-1, keepdim=True)
        top = full[rows].masked_fill(~visible[rows], float("-inf")).topk(k, dim=-1).indices
        expected = float(p.gather(-1, top).sum(-1).mean())
        assert 0.0 < expected < 1.0
        assert metrics["layers"][str(i)]["mass_at_k"] == pytest.approx(expected, abs=2e-4)
        best = float(p.topk(k, dim=-1).values.sum(-1).mean())
        assert expected <= best + 1e-6 and metrics["layers"][str(i)]["best_at_k"] == pytest.approx(best, abs=2e-4)


def test_teacher_mass_is_the_eager_attention_mass():
    """DenseTeacher's p[t, s] (window attention, chunked prefill, no autograd) is transformers' eager attention's
    probability on each compressed entry summed over heads, read from the eager [B, H, S, S + T] weights."""
    from lsa_runtime.window_attention import set_attention
    from reference.model_config import csa_layer_indices
    from reference.evaluate_needles import set_topk
    from reference.train_indexer import EVERY_ENTRY, DenseTeacher

    model = _toy_model(seed=4)
    csa = csa_layer_indices(model.config)
    S = 133
    ids = torch.randint(3, 256, (1, S), generator=torch.Generator().manual_seed(5))
    set_topk(model, EVERY_ENTRY)
    set_attention(model, "eager")
    weights = {}
    hooks = [model.model.layers[i].self_attn.register_forward_hook(
        lambda m, a, o, i=i: weights.__setitem__(i, o[1].detach())) for i in csa]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    set_attention(model, "window")
    teacher = DenseTeacher(model, csa)
    got = teacher.run(ids[0], 32, 2**30)
    teacher.remove()
    T = S // 4
    for i in csa:
        expected = weights[i][0, :, :, -T:].float().sum(0)  # [S, T]
        x, q_res, pos, mass = got[i]
        assert x.shape == (S, model.config.hidden_size) and torch.equal(pos, torch.arange(S))
        assert mass.dtype == torch.bfloat16 and mass.shape == (S, T)
        assert float(expected.sum()) > 1.0  # the compressed entries carry mass
        assert torch.allclose(mass.float(), expected, rtol=1e-2, atol=1e-3)  # bf16 storage
    assert not any(getattr(model.model.layers[i].self_attn, "fm_keep_compressed_mass", False) for i in csa)


def test_training_changes_only_the_indexers_and_resumes_exactly(tmp_path):
    """Three steps straight equal two steps, a save and a resumed third step (weights and optimizer state), and
    every tensor outside the CSA indexers stays bit for bit the starting model's."""
    from transformers import AutoTokenizer

    from reference.build_corpus import REFERENCE_DIR
    from reference.model_config import toy_config
    from reference.train import load_checkpoint, new_model, save_checkpoint
    from reference.train_indexer import main

    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_DIR)
    tokens = np.random.default_rng(0).integers(3, len(tokenizer), 20_000)
    np.savez(tmp_path / "corpus.npz", train=tokens, eval=tokens[:2000])
    model = new_model(toy_config(len(tokenizer)), 0)
    init = tmp_path / "init"
    save_checkpoint(model, None, init, {"step": 7, "config": model.config.to_dict(), "args": {"seed": 0}, "log": []},
                    torch.float32, False)
    common = ["--init", str(init), "--corpus", str(tmp_path / "corpus.npz"), "--lengths", "256", "192",
              "--lr", "1e-2", "--chunk", "64", "--device", "cpu"]  # bit-exact resume: no GPU atomics
    main(common + ["--ckpt", str(tmp_path / "straight"), "--steps", "3"])
    main(common + ["--ckpt", str(tmp_path / "split"), "--steps", "2"])
    main(common + ["--ckpt", str(tmp_path / "split"), "--steps", "3", "--resume"])
    assert sorted(f.name for f in (tmp_path / "split").iterdir()) == ["indexer.safetensors", "optimizer.pt",
                                                                     "state.json"]
    main(common + ["--ckpt", str(tmp_path / "weighted"), "--steps", "1", "--answer-weight", "50"])
    assert json.loads((tmp_path / "weighted" / "state.json").read_text())["args"]["answer_weight"] == 50
    with pytest.raises(SystemExit) as bad:  # bad input: exit 2 before anything is written
        main(common + ["--ckpt", str(tmp_path / "nothing"), "--resume"])
    assert bad.value.code == 2 and not (tmp_path / "nothing").exists()
    straight, s_state = load_checkpoint(tmp_path / "straight")
    split, p_state = load_checkpoint(tmp_path / "split")
    assert s_state["step"] == p_state["step"] == 3
    assert [r["step"] for r in p_state["log"]] == [1, 2, 3]
    assert [r["seq_len"] for r in p_state["log"]] == [256, 192, 256]
    start = model.state_dict()
    changed = set()
    for name, tensor in straight.state_dict().items():
        assert torch.equal(tensor, split.state_dict()[name]), name
        if not torch.equal(tensor, start[name]):
            changed.add(name)
    assert changed and all(".self_attn.compressor.indexer." in n for n in changed)
    assert any("q_b_proj" in n for n in changed) and any("kv_proj" in n for n in changed)
    assert straight.config.index_topk == model.config.index_topk
    opt = [torch.load(tmp_path / d / "optimizer.pt", weights_only=True) for d in ("straight", "split")]
    for a, b in zip(opt[0]["state"].values(), opt[1]["state"].values()):
        assert all(torch.equal(a[key], b[key]) for key in a)
    state = json.loads((tmp_path / "split" / "state.json").read_text())
    assert state["trained"].startswith("Lightning Indexers") and state["init"] == str(init)
    # a changed backbone is refused, not silently combined with these indexers
    first = next(init.glob("weights-*.safetensors"))
    first.write_bytes(first.read_bytes()[:-1] + bytes([first.read_bytes()[-1] ^ 1]))
    with pytest.raises(SystemExit, match="changed since"):
        load_checkpoint(tmp_path / "split")


def test_weighted_dense_kl_equals_an_unchunked_weighted_mean(monkeypatch):
    """With per-query weights (the retrieving queries weighted up), dense_kl in query chunks of 5 rows gives
    sum_t w_t KL_t / sum_t w_t over the queries that see an entry, and its gradients: the same loss written out over
    every row at once from transformers' scorer, differentiated by autograd (fp32)."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4IndexerScorer

    from lsa_runtime import window_attention as attention
    from lsa_runtime.window_attention import set_attention
    from reference.model_config import csa_layer_indices
    from reference.evaluate_needles import set_topk
    from reference.train_indexer import EVERY_ENTRY, DenseTeacher, dense_kl, indexer_parameters, keys_and_queries

    model = _toy_model(seed=5)
    csa = csa_layer_indices(model.config)
    S, layer = 150, csa[0]
    ids = torch.randint(3, 256, (S,), generator=torch.Generator().manual_seed(6))
    set_attention(model, "window")
    indexer_parameters(model, csa)
    teacher = DenseTeacher(model, csa, mass_dtype=torch.float32)
    set_topk(model, EVERY_ENTRY)
    x, q_res, pos, target = teacher.run(ids, 64, 2**30)[layer]
    teacher.remove()
    indexer = model.model.layers[layer].self_attn.compressor.indexer
    weights = torch.ones(S)
    weights[torch.randperm(S, generator=torch.Generator().manual_seed(7))[:20]] = 9.0

    monkeypatch.setattr(attention, "CHUNK_BYTES", 5 * model.config.index_n_heads * (S // 4) * 4)
    model.zero_grad(set_to_none=True)
    kl, _, _ = dense_kl(indexer, x, q_res, pos, target, 4, weights=weights)
    chunked = {n: p.grad.clone() for n, p in indexer.named_parameters()}

    model.zero_grad(set_to_none=True)
    keys, q = keys_and_queries(indexer, x, q_res, pos)
    logits = DeepseekV4IndexerScorer.forward(indexer.scorer, q, keys, x[None])[0]  # [S, T]
    visible = torch.arange(logits.shape[1])[None] < ((pos + 1) // 4)[:, None]
    p = target[:, :logits.shape[1]] * visible
    rows = p.sum(-1) > 0
    p = p[rows] / p[rows].sum(-1, keepdim=True)
    log_q = torch.log_softmax(logits[rows].masked_fill(~visible[rows], float("-inf")), -1)
    per_row = (p * (p.clamp_min(1e-30).log() - log_q)).where(p > 0, torch.zeros_like(p)).sum(-1)
    expected = (per_row * weights[rows]).sum() / weights[rows].sum()
    expected.backward()
    assert kl == pytest.approx(float(expected.detach()), rel=1e-5)
    # the weights matter here
    assert float(per_row.detach().mean()) != pytest.approx(float(expected.detach()), rel=1e-3)
    for name, param in indexer.named_parameters():
        g = param.grad
        assert float((chunked[name] - g).abs().max()) <= 1e-4 * float(g.abs().max()) + 1e-9, name
