"""The bundled ``reference`` DeepSeek-V4 and its training code (data/reference, reference/)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "data" / "reference"
CSA, HCA, SLIDING = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"


@pytest.fixture(scope="module")
def reference():
    from lsa_runtime.backbone import load_backbone

    return load_backbone("reference")


def test_reference_loads_as_deepseek_v4_and_is_default_only_when_it_says_so(reference):
    from transformers import DeepseekV4ForCausalLM

    from lsa_runtime.backbone import csa_layers, default_model_name

    model, tokenizer = reference
    meta = json.loads((REFERENCE / "fm_index.json").read_text())
    # Not the default until it meets its retrieval targets (model card); then fm_index.json says default: true.
    assert default_model_name() == ("reference" if meta.get("default") else "tiny")
    assert isinstance(model, DeepseekV4ForCausalLM)
    config = model.config
    kinds = config.layer_types
    assert kinds[:2] == [SLIDING, SLIDING]
    assert all(kinds[i] == (CSA if i % 2 == 0 else HCA) for i in range(2, len(kinds)))
    assert csa_layers(config) == [2, 4, 6, 8, 10]
    assert config.index_n_heads >= 16 and config.n_routed_experts <= 8 and config.sliding_window == 128
    assert sum(p.numel() for p in model.parameters()) <= 20_000_000
    # Stored in bf16: every float32 weight is exactly a bf16 value.
    assert all(torch.equal(p, p.to(torch.bfloat16).float()) for p in model.parameters())
    text = "def add(a, b):\n    return a + b\n"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert len(tokenizer) == config.vocab_size


def _card_section(card: str, heading: str) -> str:
    """The card's text from the heading that starts with ``heading`` to the next heading."""
    start = card.index("\n### " + heading)
    end = min(i for i in (card.find("\n### ", start + 1), card.find("\n## ", start + 1)) if i > 0)
    return card[start:end]


def _accuracy_cells(evaluation: dict) -> dict:
    """{(task, length): accuracy} of an evaluate_needles result's rows (as reference.compare_evals reads them)."""
    return {(c["task"], int(c["length"])): c["accuracy"] for c in evaluation.values()}


def test_card_states_the_measured_numbers():
    """fm_index.json, training_results.json and the card agree on the default's lineage (the previous default's run 1
    and curriculum, the long-context pieces L3-L6, then L6's indexers trained alone: L6i), on the previous default's
    4K/8K needles, and on the current default's 4K-64K needles and indexer agreement (L6's beside them); the headline
    figures are recomputed from the stored rows."""
    from reference.compare_evals import verdict

    meta = json.loads((REFERENCE / "fm_index.json").read_text())
    results = json.loads((REFERENCE / "training_results.json").read_text())
    card = (REFERENCE / "README.md").read_text()
    total, run1, pieces = results["total"], results["run1"], results["curriculum"]["pieces"]
    previous, long_context = results["previous_default"], results["long_context"]
    # the previous default: run 1 + three curriculum pieces
    assert previous["steps"] == run1["steps"] + sum(p["steps"] for p in pieces) == 3407
    assert previous["tokens"] == run1["tokens"] + sum(p["tokens"] for p in pieces)
    assert f"{previous['steps']:,}" in card and f"{previous['tokens'] / 1e6:.1f}M tokens" in card
    # the lineage since: L3 -> L4 -> L5 -> L6, and the total that fm_index.json's step counts
    lineage = [p for attempt in long_context["attempts"] for p in attempt["pieces"]]
    assert [p["piece"] for p in lineage] == ["L3", "L4", "L5", "L6"]
    assert long_context["steps"] == sum(p["steps"] for p in lineage)
    assert long_context["tokens"] == sum(p["tokens"] for p in lineage)
    # then the indexers alone (runs 3-5, backbone frozen): their steps and tokens are those of run 5's own log
    indexers = results["indexers"]
    log = json.loads((REPO / "docs/results/indexer_piece_h200/run5/ckpt/state.json").read_text())["log"]
    assert [x["step"] for x in log] == list(range(1, 140)) and indexers["steps"] == 139
    assert [(x["first_step"], x["last_step"]) for x in indexers["lineage"]] == [(1, 59), (60, 100), (101, 139)]
    assert indexers["tokens"] == sum(x["seq_len"] for x in log) == sum(x["tokens"] for x in indexers["lineage"])
    assert meta["trained"] is True and meta["default"] is True and meta["step"] == total["steps"]
    assert total["steps"] == previous["steps"] + long_context["steps"] + indexers["steps"] == 4207
    assert total["tokens"] == previous["tokens"] + long_context["tokens"] + indexers["tokens"]
    minutes = run1["train_minutes"] + sum(p["train_minutes"] for p in pieces + lineage) + indexers["train_minutes"]
    assert total["train_minutes"] == round(minutes, 1)
    assert all(f"{p['piece']} ({p['steps']})" in card for p in lineage)  # the lineage sentence of the card
    assert "the indexers alone (" + " + ".join(str(x["steps"]) for x in indexers["lineage"]) + ")" in card
    assert all(f"{p['steps']}" in meta["steps_note"] for p in lineage + indexers["lineage"])
    assert "3,407" in meta["steps_note"]
    assert (f"{total['steps']:,} optimizer steps,\n{total['tokens'] / 1e6:.1f}M tokens, "
            f"{total['train_minutes']:.1f} minutes") in card
    for phase in ("dense_last_100_steps", "sparse_last_100_steps"):
        for key in ("lm", "answer_ce", "kl"):
            assert f"{run1['loss_summary'][phase][key]:.3f}" in card
    for piece in pieces:  # every curriculum stage's row: length, losses, exact match
        for stage in piece["stages"]:
            last = stage["last_100_steps"]
            last_step = piece["steps"] if stage is piece["stages"][-1] else stage["last_step"]
            row = f"| {piece['piece']} | {stage['first_step']:,}-{last_step:,} | {stage['seq_len']:,} |"
            assert row in card, row
            for value in (f"{last['lm']:.3f}", f"{last['answer_ce']:.3f}", f"{100 * last['answer_acc']:.1f}%"):
                assert value in card
    # the previous default's 4K/8K table (eager attention)
    rows = dict(re.findall(r"^\| (\w+@\d+) \| [^|]+ \| ([\d.]+)%", card, flags=re.M))
    needles = previous["needles_gpu"]["results"]["topk64"]
    assert needles and set(needles) == set(rows)
    for name, row in needles.items():
        assert float(rows[name]) == pytest.approx(100 * row["accuracy"], abs=0.05)
    single = [row["accuracy"] for name, row in needles.items() if name.startswith("single_number") and "@4096" in name]
    assert single and min(single) >= 0.9  # the target, which made it the default backbone on 2026-11-29
    # the current default's 4K-64K table: one cell per task and length, and the mean over the tasks
    current = results["needles_gpu_long"]["results"]["topk64"]
    assert results["needles_gpu_long"]["model"] == "L6i" == indexers["model"]
    l6 = _evaluations_by_piece(results)["L6"]
    lengths = (4096, 8192, 16384, 32768, 65536)
    section = _card_section(card, "Needles, the default")
    table = {task: cells.split(" | ") for task, cells in
             re.findall(r"^\| ([a-z_]+) \| [\d.]+% \| ([\d. |]+) \|$", section, flags=re.M)}
    assert set(table) == {k.split("@")[0] for k in current} and len(current) == 7 * len(lengths)
    for task, cells in table.items():
        for length, cell in zip(lengths, cells, strict=True):
            row = current[f"{task}@{length}"]
            assert float(cell) == pytest.approx(100 * row["accuracy"], abs=0.05)
            assert len(row["hits"]) == row["n"] and row["accuracy"] == pytest.approx(row["hits"].count("1") / row["n"])
    own = _accuracy_cells(current)
    means = [cand for _, tasks, _, cand in verdict(own, own)[0]]
    assert "| mean over the 7 tasks | | " + " | ".join(f"{100 * m:.1f}" for m in means) + " |" in section
    # the opening: single needles per length, means against L6's
    acc = lambda task, n: f"{100 * current[f'{task}@{n}']['accuracy']:g}%"
    assert (f"{acc('single_number_code', 4096)} (code haystack) / {acc('single_number_noise', 4096)} (noise haystack) "
            f"at 4,096 tokens") in card
    for n in (8192, 16384, 32768, 65536):
        assert f"{acc('single_number_code', n)} / {acc('single_number_noise', n)} at {n:,}" in card
    rows_l6, adopt = verdict(own, _accuracy_cells(l6))
    assert adopt and [n for n, *_ in rows_l6] == list(lengths)
    four, last = rows_l6[:4], rows_l6[4]
    assert (" / ".join(f"{100 * c:.1f}%" for *_, c in four) + " at 4K / 8K /\n16K / 32K "
            f"({100 * last[3]:.1f}% at 64K), where L6 had " + " / ".join(f"{100 * r:.1f}%" for _, _, r, _ in four)
            + f" ({100 * last[2]:.1f}%)") in card
    l6_means = [r for _, _, r, _ in rows_l6]
    assert "| L6, mean over the 7 tasks | | " + " | ".join(f"{100 * m:.1f}" for m in l6_means) + " |" in section
    # the target (>= 90% on single, multi-value and multi-query needles at 32K and 64K) is not met, and the
    # card says so: single needles reach it at 32K, the multi-needle tasks are far off
    for n in (32768, 65536):
        assert min(current[f"{t}@{n}"]["accuracy"] for t in ("multivalue_number_code", "multiquery_number_code")) < 0.9
    assert all(current[f"single_number_{h}@32768"]["accuracy"] == 1.0 for h in ("code", "noise"))
    assert "**the issue's target (>= 90% on the needle tasks at 32K and 64K) is not met**" in card
    # indexer agreement: the current default's row per CSA layer, L6's beside it
    now, before = results["indexer_cpu"]["results"], indexers["indexer_cpu_before"]["results"]
    share = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    for layer, row in now["layers"].items():
        old = before["layers"][layer]
        assert (f"| {layer} | {share(row['indexer_topk_share'])} | {share(row['oracle_topk_share'])} | "
                f"{share(row['recency_topk_share'])} | {row['kl']:.3f} | {share(old['indexer_topk_share'])} / "
                f"{share(old['oracle_topk_share'])} / {share(old['recency_topk_share'])} / {old['kl']:.3f} |") in card
    assert now["lm_loss"] == before["lm_loss"] and f"{now['lm_loss']:.3f} nats per token, L6's too" in card
    assert f"previous default {previous['indexer_cpu']['results']['lm_loss']:.3f}" in card


def test_the_default_holds_run5s_indexers():
    """L6i as exported: every Lightning Indexer parameter of data/reference is run 5's checkpoint value rounded to
    bf16 (the 30 tensors the indexers' training changed), and the default's own fm_index.json step counts them."""
    from safetensors.torch import load_file
    from transformers import DeepseekV4ForCausalLM

    ckpt = REPO / "docs/results/indexer_piece_h200/run5/ckpt"
    trained = load_file(ckpt / "indexer.safetensors")
    model = DeepseekV4ForCausalLM.from_pretrained(REFERENCE, dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    indexer = {n for n in params if ".compressor.indexer." in n}
    assert set(trained) == indexer and len(trained) == 30
    for name, value in trained.items():
        assert value.dtype == torch.float32 and torch.equal(params[name], value.to(torch.bfloat16)), name
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 139 and state["init"] == "data/reference"


def test_indexer_kl_matches_a_brute_force_oracle():
    from reference.distillation import indexer_kl

    gen = torch.Generator().manual_seed(0)
    B, H, S, T = 2, 3, 24, 6
    logits = torch.randn(B, S, T, generator=gen)
    weights = torch.rand(B, H, S, S + T, generator=gen)
    entries = torch.arange(T).expand(B, S, T)
    visible = ((torch.arange(S) + 1) // 4)[None, :, None]
    picks = torch.where(entries < visible, entries, -1)
    picks[:, :, 0] = torch.where(picks[:, :, 0] >= 0, -1, picks[:, :, 0])  # entry 0 never picked: a sparse set
    total, rows = 0.0, 0
    for b in range(B):
        for t in range(S):
            chosen = [s for s in picks[b, t].tolist() if s >= 0]
            if not chosen:
                continue
            p = weights[b, :, t, S + torch.tensor(chosen)].sum(0)
            p = p / p.sum()
            q = torch.softmax(logits[b, t, chosen], -1)
            total += float((p * (p.log() - q.log())).sum())
            rows += 1
    assert float(indexer_kl(logits, picks, weights)) == pytest.approx(total / rows, rel=1e-5)


def test_indexer_learns_only_from_the_distillation_loss():
    from reference.distillation import IndexerDistillation
    from reference.model_config import csa_layer_indices, toy_config
    from reference.train import new_model

    config = toy_config(256)
    model = new_model(config, 0)
    distill = IndexerDistillation(model, csa_layer_indices(config))
    ids = torch.randint(3, 256, (1, 96), generator=torch.Generator().manual_seed(1))
    grads = {}
    for kl_weight in (0.0, 1.0):
        model.zero_grad()
        lm = model(input_ids=ids, use_cache=False).logits.float().logsumexp(-1).mean()
        kl, per_layer = distill.pop_loss()
        assert set(per_layer) == {2} and float(kl.detach()) > 0
        (lm + kl_weight * kl).backward()
        attn = model.model.layers[2].self_attn
        grads[kl_weight] = (attn.q_a_proj.weight.grad.clone(), attn.compressor.indexer.q_b_proj.weight.grad)
    # The main attention's gradient is the same with or without the KL (indexer inputs are detached) ...
    assert torch.equal(grads[0.0][0], grads[1.0][0])
    # ... and the indexer gets a gradient only from the KL (the native top-k is not differentiable).
    assert grads[0.0][1] is None or not grads[0.0][1].any()
    assert grads[1.0][1].abs().sum() > 0


def test_training_step_runs_saves_and_resumes(tmp_path):
    from transformers import AutoTokenizer

    from reference import train

    tokenizer = AutoTokenizer.from_pretrained(REFERENCE)
    text = (REPO / "lsa_runtime" / "backbone.py").read_text() * 3
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.uint16)
    corpus = tmp_path / "corpus.npz"
    np.savez(corpus, train=ids, eval=ids)
    ckpt = tmp_path / "ckpt"
    common = ["--toy", "--ckpt", str(ckpt), "--corpus", str(corpus), "--tokenizer", str(REFERENCE), "--steps", "3",
              "--dense-steps", "1", "--dense-seq-len", "512", "--seq-len", "512", "--batch-tokens", "1024",
              "--micro-tokens", "512", "--warmup", "1", "--decay-steps", "1", "--log-every", "1"]
    train.main(common + ["--stop-at", "2"])
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 2 and (ckpt / "optimizer.pt").is_file()
    assert [row["topk"] for row in state["log"]] == [128, 4]  # dense warm-up (every entry), then sparse top-k
    assert all(np.isfinite(row["lm"]) and row["kl"] > 0 for row in state["log"])
    before = train.load_checkpoint(ckpt)[0].state_dict()
    # The resumed piece: activation checkpointing and a mixture with the multi-query task.
    train.main(common + ["--resume", "--checkpointing", "--mix", "niah_multiquery=1,niah_single=1"])
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 3 and len(state["log"]) == 3
    assert state["args"]["checkpointing"] and state["args"]["attention"] == "window"
    assert state["config"]["max_position_embeddings"] == 262144 and np.isfinite(state["log"][-1]["lm"])
    after = train.load_checkpoint(ckpt)[0].state_dict()
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])


def test_length_curriculum_stages():
    from types import SimpleNamespace

    from reference.model_config import reference_config
    from reference.train import phase_at

    config = reference_config()
    args = SimpleNamespace(stages="256:2:all,1024:3:all,4096:0:64", dense_steps=10**9, dense_seq_len=2048,
                           seq_len=4096)
    got = [phase_at(step, args, config) for step in range(7)]
    assert got == [(256, 64), (256, 64), (1024, 256), (1024, 256), (1024, 256), (4096, 64), (4096, 64)]
    args.stages = "1024:2:all,16384/4096:0:64"  # a last stage that cycles through two lengths
    got = [phase_at(step, args, config) for step in range(6)]
    assert got == [(1024, 256), (1024, 256), (16384, 64), (4096, 64), (16384, 64), (4096, 64)]
    args.stages = None
    args.dense_steps = 1
    assert [phase_at(step, args, config) for step in range(2)] == [(2048, 512), (4096, 64)]


def test_multikey_training_sequences_vary_their_key_count():
    """``--multikey-keys 2-6``: multi-key sequences hold 2..6 needles with distinct keys, the asked one among them,
    and the answer mask covers exactly its value; a stage too short for the drawn count holds fewer keys."""
    import re

    from transformers import AutoTokenizer

    from reference.train import BatchSampler, parse_keys

    tokenizer = AutoTokenizer.from_pretrained(REFERENCE)
    text = (REPO / "lsa_runtime" / "backbone.py").read_text() * 3
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    assert parse_keys("4") == (4, 4) and parse_keys("2-6") == (2, 6)
    sampler = BatchSampler(tokenizer, ids, 0.0, 3, (("niah_multikey", 1.0),), parse_keys("2-6"))
    counts = set()
    for length in (1024, 192):
        for j in range(30):
            seq, answer, task = sampler.sequence(0, j, length)
            assert task == "niah_multikey" and len(seq) == length
            decoded = tokenizer.decode(seq)
            needles = re.findall(r"magic (?:number|uuid)s for (\S+) is: (\S+)\.\n", decoded)
            asked = re.findall(r"magic (?:number|uuid) for (\S+) mentioned", decoded)[0]
            keys = [k for k, _ in needles]
            assert len(set(keys)) == len(keys) and asked in keys
            value = dict(needles)[asked]
            targets = seq[1:][answer]
            assert tokenizer.decode(targets).strip() == value
            counts.add((length, len(keys)))
    assert {n for length, n in counts if length == 1024} >= {2, 3, 4, 5, 6}
    assert {n for length, n in counts if length == 192} <= {2, 3, 4}  # at most four 7-digit needles fit


def _toy_model(seed: int = 0, vocab: int = 256):
    """The toy config with its sinks and compressor position biases perturbed, so those paths carry weight."""
    from reference.model_config import toy_config
    from reference.train import new_model

    model = new_model(toy_config(vocab), seed)
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks") or name.endswith("position_bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            if name == "lm_head.weight":
                p.mul_(20.0)  # sharper next-token distributions: argmax comparisons are not decided by round-off
    return model


def _loss_and_grads(model, distill, ids):
    """LM loss + distillation KL of one forward/backward; returns (loss, per-layer KL, {param: grad})."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    lm = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    kl, per_layer = distill.pop_loss()
    loss = lm + kl
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), per_layer, grads


def _assert_grads_close(a: dict, b: dict, rtol: float):
    """Per tensor, relative to its largest entry (floored at 1e-3 of the largest gradient anywhere: some
    gradients are round-off, e.g. the router of hash-routed layers)."""
    assert set(a) == set(b)
    top = max(float(g.abs().max()) for g in a.values())
    for name in a:
        scale = max(float(a[name].abs().max()), 1e-3 * top)
        assert float((a[name] - b[name]).abs().max()) <= rtol * scale, name


def _spy_query_blocks(monkeypatch) -> list:
    """Make window_sparse_attention take its queries one window at a time (CPU_CHUNK_BYTES at its floor) and
    record each block's query count."""
    from lsa_runtime import window_attention as attention

    monkeypatch.setattr(attention, "CPU_CHUNK_BYTES", 1)
    sizes, block = [], attention._window_sparse_block

    def spy(module, query, *args):
        sizes.append(query.shape[2])
        return block(module, query, *args)

    monkeypatch.setattr(attention, "_window_sparse_block", spy)
    return sizes


@pytest.mark.parametrize("blocks", [False, True])  # True: the CPU's query blocks, one window each
@pytest.mark.parametrize("topk", [4, 1000])  # 4: CSA picks gathered per query; 1000: every entry (dense block)
def test_window_attention_equals_eager_in_logits_and_gradients(monkeypatch, topk, blocks):
    """attention.py computes transformers' eager DeepSeek-V4 attention (sliding window + compressed entries +
    sinks) without the dense score matrix: same logits, same distillation loss, same gradients (fp32), also when
    it takes the queries in blocks."""
    from lsa_runtime.window_attention import set_attention
    from reference.distillation import IndexerDistillation
    from reference.model_config import csa_layer_indices

    sizes = _spy_query_blocks(monkeypatch) if blocks else []
    model = _toy_model()
    distill = IndexerDistillation(model, csa_layer_indices(model.config))
    distill.set_topk(model, topk)
    ids = torch.randint(3, 256, (2, 141), generator=torch.Generator().manual_seed(1))  # not a multiple of 16
    out = {}
    for name in ("eager", "window"):
        set_attention(model, name)
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
        distill.pop_loss()
        out[name] = (logits, *_loss_and_grads(model, distill, ids))
    (le, loss_e, kl_e, g_e), (lw, loss_w, kl_w, g_w) = out["eager"], out["window"]
    assert float((le - lw).abs().max()) < 1e-5 * float(le.abs().max())
    assert loss_w == pytest.approx(loss_e, rel=1e-5)
    assert set(kl_e) == {2} and kl_w[2] == pytest.approx(kl_e[2], rel=1e-4, abs=1e-7)
    _assert_grads_close(g_e, g_w, 1e-4)
    window = model.config.sliding_window
    assert not blocks or (sizes and max(sizes) == window and 141 % window in sizes)  # one window a block


@pytest.mark.parametrize("attention", ["window", "eager"])
def test_activation_checkpointing_keeps_distillation_loss_and_gradients(attention):
    """With every decoder layer checkpointed, the backward replays the layers and the distillation hooks fire
    again: the loss is still collected once per forward, and loss and gradients equal those without."""
    from lsa_runtime.window_attention import set_attention
    from reference.distillation import IndexerDistillation
    from reference.model_config import csa_layer_indices
    from reference.train import enable_checkpointing

    model = _toy_model(seed=3).train()
    set_attention(model, attention)
    distill = IndexerDistillation(model, csa_layer_indices(model.config))
    ids = torch.randint(3, 256, (2, 160), generator=torch.Generator().manual_seed(2))
    plain = _loss_and_grads(model, distill, ids)
    enable_checkpointing(model)
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    replayed = _loss_and_grads(model, distill, ids)
    assert distill.pop_loss() == (None, {})  # the replay during backward collected nothing
    assert replayed[0] == pytest.approx(plain[0], rel=1e-5)
    assert replayed[1] == pytest.approx(plain[1], rel=1e-5)
    _assert_grads_close(plain[2], replayed[2], 1e-5)


@pytest.mark.parametrize("blocks", [False, True])  # True: the window attention's CPU query blocks, one window each
def test_chunked_prefill_gives_the_one_pass_logits(monkeypatch, blocks):
    """evaluate_needles' chunked prefill through the DynamicCache (chunks of 48 tokens) reproduces the one-pass
    eager logits and argmax with either attention, and so does cached decoding (one token per step) after it."""
    from transformers import DynamicCache

    from lsa_runtime.window_attention import set_attention
    from reference.evaluate_needles import _cache_kwarg, chunk_length, chunked_logits

    sizes = _spy_query_blocks(monkeypatch) if blocks else []
    model = _toy_model(seed=5).eval()
    ids = torch.randint(3, 256, (1, 130), generator=torch.Generator().manual_seed(4))
    set_attention(model, "eager")
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits[0]
    scale = float(full.abs().max())
    for attention in ("window", "eager"):
        set_attention(model, attention)
        got = chunked_logits(model, ids[0].numpy(), 0, 130, 48, 2**30, torch.device("cpu"))
        assert float((got - full).abs().max()) < 1e-4 * scale, attention
        assert torch.equal(got.argmax(-1), full.argmax(-1))
    set_attention(model, "window")
    cache = DynamicCache(config=model.config)
    kwarg = _cache_kwarg(model)
    with torch.no_grad():
        steps = [model(input_ids=ids[:, :112], use_cache=True, **{kwarg: cache}).logits[0, -1]]
        steps += [model(input_ids=ids[:, t:t + 1], use_cache=True, **{kwarg: cache}).logits[0, -1]
                  for t in range(112, 130)]
    decoded = torch.stack(steps)
    assert float((decoded - full[111:]).abs().max()) < 1e-4 * scale
    assert not blocks or (16 in sizes and max(sizes) == 16)  # the cached chunks went in blocks too
    # The chunk rule: halved while chunk x heads x (entries + window) x 4 bytes exceeds the budget.
    config = model.config  # 16 indexer heads, CSA rate 4, window 16
    assert chunk_length(config, 0, 4096, 2**30) == 4096
    assert chunk_length(config, 60000, 4096, 2**30) == 1024
    assert 1024 * 16 * ((60000 + 1024) // 4 + 16) * 4 <= 2**30 < 2048 * 16 * ((60000 + 2048) // 4 + 16) * 4


def test_needle_distance_curriculum_bounds_where_the_needles_sit():
    """``--needle-distance START:END:STEPS``: the bound grows linearly from START to END tokens over STEPS steps
    counted from the run's first step, training sequences are built with the step's bound, and a bound puts every
    needle within that many haystack tokens of the question (its cut at or past n_hay - bound); without one the
    needles spread over the whole haystack."""
    from transformers import AutoTokenizer

    from reference.tasks import TaskBuilder
    from reference.train import BatchSampler, parse_distance

    tokenizer = AutoTokenizer.from_pretrained(REFERENCE)
    text = (REPO / "lsa_runtime" / "backbone.py").read_text() * 3
    hay = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    assert parse_distance("100:1000:10") == (100, 1000, 10) and parse_distance(None) is None
    with pytest.raises(SystemExit, match="need 0 < START <= END"):
        parse_distance("1000:100:10")
    sampler = BatchSampler(tokenizer, hay, 0.0, 5, (("niah_multivalue", 1.0),), needle_distance=(100, 1000, 10),
                           origin=40)
    assert [sampler.max_distance(s) for s in (40, 45, 50, 90)] == [100, 550, 1000, 1000]
    seen = []
    build = sampler.builder.build
    sampler.builder.build = lambda *a, **k: seen.append(k["max_distance"]) or build(*a, **k)
    sampler.sequence(45, 0, 2048)
    assert seen == [550]
    builder, rng = TaskBuilder(tokenizer, hay, tokenizer.bos_token_id), np.random.default_rng(0)
    for task in ("niah_single", "niah_multivalue", "vt"):
        for _ in range(8):  # depth = cut / n_hay, and the haystack holds more than 3,000 of the 4,096 tokens
            near = builder.build(rng, task, 4096, kind="number", max_distance=300)
            assert len(near.input_ids) == 4096 and min(near.depths) >= 1 - 300 / 3000
    spread = [d for _ in range(8) for d in builder.build(rng, "niah_multivalue", 4096, kind="number").depths]
    assert min(spread) < 0.5 < max(spread)


def test_multiquery_task_asks_every_key_and_answers_in_question_order():
    """niah_multiquery (RULER): 4 keys with one value each, all asked; the answer lists their values in the order
    the question names the keys, while the needles sit in the haystack in a shuffled order."""
    from transformers import AutoTokenizer

    from reference.tasks import TaskBuilder

    tokenizer = AutoTokenizer.from_pretrained(REFERENCE)
    text = (REPO / "lsa_runtime" / "backbone.py").read_text() * 3
    hay = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    builder = TaskBuilder(tokenizer, hay, tokenizer.bos_token_id)
    rng = np.random.default_rng(0)
    shuffled = 0
    for _ in range(12):
        s = builder.build(rng, "niah_multiquery", 600, kind="number", source="code")
        assert len(s.input_ids) == 600
        decoded = tokenizer.decode(s.input_ids)
        needles = re.findall(r"magic numbers for (\S+) is: (\d+)\.\n", decoded)
        asked = re.findall(r"What are all the special magic numbers for (.+) mentioned", decoded)[0]
        keys = re.split(r", (?:and )?", asked)
        assert len(needles) == 4 and sorted(keys) == sorted(k for k, _ in needles)
        value_of = dict(needles)
        answer = tokenizer.decode(s.input_ids[s.answer_start:s.answer_start + s.answer_len])
        assert answer == " " + ", ".join(value_of[k] for k in keys)
        shuffled += [k for k, _ in needles] != keys
    assert shuffled >= 6  # 23 of 24 orders differ from the question's


# The card's long-context evaluation sections and the models their "a -> b -> c" cells compare, after the
# previous default (the `reference` every candidate was judged against)
LONG_CONTEXT_TABLES = {"Long context: 4K-64K tokens": ["L2"], "Long context, second attempt": ["L3", "L4"],
                       "Long context, third attempt": ["L4", "L6"]}


def _long_context_attempts(results: dict) -> list[tuple[dict, str]]:
    """(attempt, row label) for every long-context attempt: L1 + L2 and L7 + L8 (from L6) outside the lineage, L3 + L4
    in it (not adopted on their own), L5 + L6 adopted."""
    out = [(a, "not adopted") for a in results["attempts_not_adopted"] if "pieces" in a]
    for attempt in results["long_context"]["attempts"]:
        out.append((attempt, "adopted" if attempt["verdict"] == "adopt" else "in the lineage"))
    return out


def _evaluations_by_piece(results: dict) -> dict[str, dict]:
    by_piece = {}
    for attempt, _ in _long_context_attempts(results):
        for e in attempt.get("evaluations", [{"piece": attempt["pieces"][-1]["piece"],
                                              "needles_full": attempt["needles_full"]}]):
            by_piece[e["piece"]] = e["needles_full"]
    return by_piece


def test_card_states_the_long_context_attempts():
    """The long-context pieces (L1 + L2 of 2026-12-01, not adopted; L3 + L4 of 2026-12-02, not adopted on their own;
    L5 + L6 from L4, adopted) and their 4K-64K evaluations: the card's rows and table cells agree with
    training_results.json, whose per-length summaries are recomputed here from the per-step logs. Each evaluation
    section's table has one cell part per model: the previous default, then the pieces it compares."""
    results = json.loads((REFERENCE / "training_results.json").read_text())
    card = (REFERENCE / "README.md").read_text()
    attempts = _long_context_attempts(results)
    assert [[p["piece"] for p in a["pieces"]] for a, _ in attempts] == [["L1", "L2"], ["L7", "L8"], ["L9", "L10"],
                                                                         ["L11", "L12"], ["L3", "L4"], ["L5", "L6"]]
    assert [a["verdict"] for a in results["long_context"]["attempts"]] == ["keep the reference", "adopt"]
    reference = results["previous_default"]["needles_gpu_long"]["results"]["topk64"]
    for attempt, label in attempts:
        pieces = attempt["pieces"]
        assert ("ADOPTED" if label == "adopted" else "NOT adopted") in attempt["what"]
        assert attempt["steps"] == sum(p["steps"] for p in pieces) == sum(len(p["log"]) for p in pieces)
        assert attempt["tokens"] == sum(p["tokens"] for p in pieces)
        for piece in pieces:
            log = piece["log"]
            assert [row["step"] for row in log] == list(range(1, piece["steps"] + 1))
            assert piece["tokens"] == sum(row["seq_len"] * (65536 // row["seq_len"]) for row in log)
            assert piece["train_minutes"] == log[-1]["minutes"]
            assert f"**{piece['piece']}** ({piece['steps']} steps, {piece['tokens'] / 1e6:.1f}M tokens" in card
            assert {entry["seq_len"] for entry in piece["lengths"]} == {row["seq_len"] for row in log}
            for entry in piece["lengths"]:
                rows = [row for row in log if row["seq_len"] == entry["seq_len"]]
                last = rows[-10:]
                assert entry["steps"] == len(rows) and entry["last_step"] == rows[-1]["step"]
                assert entry["first_step"] == rows[0]["step"] and entry["index_topk"] == rows[0]["topk"]
                assert entry["peak_gpu_memory_gb"] == max(row["mem_gb"] for row in rows)
                for key in ("lm", "answer_ce", "answer_acc", "kl", "tok_s"):
                    assert entry["last_10_steps"][key] == pytest.approx(sum(r[key] for r in last) / len(last),
                                                                        abs=1e-4 if key != "tok_s" else 0.5)
                m = entry["last_10_steps"]
                row = (f"| {piece['piece']} ({label}) | {entry['first_step']:,}-{entry['last_step']:,} | "
                       f"{entry['seq_len']:,} | {entry['index_topk']} | {m['lm']:.3f} | {m['answer_ce']:.3f} | "
                       f"{100 * m['answer_acc']:.1f}% | {m['kl']:.4f} | {m['tok_s']:,} | {entry['peak_gpu_memory_gb']} |")
                assert row in card, row
        evaluations = [e["needles_full"] for e in attempt.get("evaluations", [{"needles_full": attempt["needles_full"]}])]
        final = attempt["needles_full"]
        assert final == evaluations[-1] and attempt["needles"] == {k: v["accuracy"] for k, v in final.items()}
    by_piece = _evaluations_by_piece(results)
    assert list(by_piece) == ["L2", "L8", "L10", "L12", "L3", "L4", "L6"]
    lengths = (4096, 8192, 16384, 32768, 65536)
    for heading, models in LONG_CONTEXT_TABLES.items():
        section = _card_section(card, heading)
        table = {}
        for task, cells in re.findall(r"^\| ([a-z_]+) \| [\d.]+% \| (.+ -> .+) \|$", section, flags=re.M):
            table[task] = [cell.split(" -> ") for cell in cells.split(" | ")]
        evaluations = [by_piece[m] for m in models]
        assert set(table) == {k.split("@")[0] for e in evaluations for k in e}, heading
        for task, cells in table.items():
            assert len(cells) == len(lengths)
            for length, parts in zip(lengths, cells):
                assert len(parts) == 1 + len(models)
                ref, *cands = parts
                key = f"{task}@{length}"
                assert ref == "not run" if key not in reference else float(ref) == pytest.approx(
                    100 * reference[key]["accuracy"], abs=0.05)
                for cand, evaluation in zip(cands, evaluations):
                    if key not in evaluation:
                        assert cand == "not run"
                        continue
                    row = evaluation[key]
                    assert float(cand) == pytest.approx(100 * row["accuracy"], abs=0.05)
                    if key in reference:  # same seeds, same samples: the same n
                        assert reference[key]["n"] == row["n"]
                    assert len(row["hits"]) == row["n"] and row["accuracy"] == pytest.approx(
                        row["hits"].count("1") / row["n"])


@pytest.mark.parametrize("heading, pieces, init", [("Long context, fourth attempt", ["L7", "L8"], "the default L6"),
                                                  ("Long context, fifth attempt", ["L9", "L10"], "the default L6"),
                                                  ("Long context, sixth attempt", ["L11", "L12"], "L10's checkpoint")])
def test_card_states_the_attempt_judged_against_l6(heading, pieces, init):
    """The fourth to sixth attempts (L7 + L8 and L9 + L10 from the default L6, L11 + L12 from L10): the card's `L6 ->
    candidate` cells are the stored evaluations, and its mean table and verdict are reference.compare_evals' against
    the default (the device's verdict.txt, recomputed here from the stored evaluation): keep the reference."""
    from reference.compare_evals import verdict

    results = json.loads((REFERENCE / "training_results.json").read_text())
    card = (REFERENCE / "README.md").read_text()
    section = _card_section(card, heading)
    (attempt,) = [a for a in results["attempts_not_adopted"] if [p["piece"] for p in a.get("pieces", [])] == pieces]
    l6, l8 = _evaluations_by_piece(results)["L6"], attempt["needles_full"]
    assert attempt["verdict"] == "keep the reference" and "NOT adopted" in attempt["what"]
    assert attempt["pieces"][0]["init"].startswith(init)
    assert f"| length | L6 | {pieces[1]} |" in section
    lengths = (4096, 8192, 16384, 32768, 65536)
    table = dict(re.findall(r"^\| ([a-z_]+) \| [\d.]+% \| (.+ -> .+) \|$", section, flags=re.M))
    assert set(table) == {k.split("@")[0] for k in l8} and len(l8) == 7 * len(lengths)
    for task, cells in table.items():
        for length, cell in zip(lengths, cells.split(" | "), strict=True):
            a, b = (float(x) for x in cell.split(" -> "))
            key = f"{task}@{length}"
            assert (a, b) == (pytest.approx(100 * l6[key]["accuracy"], abs=0.05),
                              pytest.approx(100 * l8[key]["accuracy"], abs=0.05))
            assert l6[key]["n"] == l8[key]["n"]
    rows, adopt = verdict(_accuracy_cells(l8), _accuracy_cells(l6))
    assert not adopt
    for length, tasks, ref, cand in rows:
        assert len(tasks) == 7
        mark = f"{100 * cand:.1f}%" + (" (worse)" if cand < ref else "")
        assert f"| {length:,} | {100 * ref:.1f}% | {mark} |" in section
    assert attempt["verdicts"][pieces[1]].rstrip().endswith("verdict: keep the reference")


@pytest.mark.parametrize("heading", ["Long context, second attempt", "Long context, third attempt"])
def test_card_states_the_long_context_verdicts(heading):
    """The card's mean-over-tasks tables (L3 and L4; L4 and L6) equal reference.compare_evals on the stored
    evaluations against the previous default: L3 and L4 "keep the reference", L6 "adopt" (the adoption rule,
    recomputed, not read from the stored text), and the model that replaced the previous default is L6."""
    from reference.compare_evals import verdict

    results = json.loads((REFERENCE / "training_results.json").read_text())
    card = (REFERENCE / "README.md").read_text()
    section = _card_section(card, heading)
    reference = _accuracy_cells(results["previous_default"]["needles_gpu_long"]["results"]["topk64"])
    by_piece = _evaluations_by_piece(results)
    models = LONG_CONTEXT_TABLES[heading]
    per_piece = []
    for model in models:
        rows, adopt = verdict(_accuracy_cells(by_piece[model]), reference)
        assert adopt is (model == "L6")
        per_piece.append(rows)
    assert f"| length | reference | {models[0]} | {models[1]} |" in section
    for rows_a, rows_b in zip(*per_piece, strict=True):
        length, tasks, ref, a = rows_a
        assert rows_b[:3] == (length, tasks, ref)
        b = rows_b[3]
        mark = lambda x: f"{100 * x:.1f}%" + (" (worse)" if x < ref else "")
        label = f"{length:,}" + (f" ({len(tasks)} tasks)" if len(tasks) != 7 else "")
        assert f"| {label} | {100 * ref:.1f}% | {mark(a)} | {mark(b)} |" in section
    adopted = results["long_context"]["attempts"][-1]
    assert adopted["verdict"] == "adopt" and adopted["verdicts"]["L6"].rstrip().endswith("verdict: adopt (at least as "
                                                                                        "good at every length)")
    assert results["long_context"]["attempts"][-1]["pieces"][-1]["piece"] == "L6"  # the adopted attempt ends in L6


def test_card_states_the_chunked_prefill_check():
    """The CPU chunked-prefill check at 16K (on the previous default) reports the same hits as the GPU's one-pass run
    on those samples."""
    long = json.loads((REFERENCE / "training_results.json").read_text())["previous_default"]["needles_gpu_long"]
    card = (REFERENCE / "README.md").read_text()
    check = long["chunked_prefill_check_cpu"]["results"]
    for key, row in check.items():
        one_pass = long["results"]["topk64"][key]["hits"][:row["n"]]
        assert row["hits"] == one_pass and row["chunked_prefill"] == 4096
        assert f"{row['hits']} {row['task']}" in card


def _chunk_spy(monkeypatch, chunk_bytes: int) -> list:
    """Lower attention.CHUNK_BYTES and record every (queries, chunk length) that attention.py chooses."""
    from lsa_runtime import window_attention as attention

    monkeypatch.setattr(attention, "CHUNK_BYTES", chunk_bytes)
    seen, choose = [], attention.query_chunk

    def spy(seq, bytes_per_query, device=None):
        step = choose(seq, bytes_per_query, device)
        seen.append((seq, step))
        return step

    monkeypatch.setattr(attention, "query_chunk", spy)
    return seen


def test_index_scores_equal_transformers_scorer():
    """index_scores (ReLU and scale in place, the head sum as one [1, H] x [H, T] product per query) returns
    transformers' DeepseekV4IndexerScorer scores to fp32 round-off (head weights of both signs, bf16 inputs as the
    device runs them), and the same top-64 per query."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4IndexerScorer

    from lsa_runtime.window_attention import index_scores

    config = _toy_model(seed=4).config
    scorer = DeepseekV4IndexerScorer(config)
    gen = torch.Generator().manual_seed(8)
    torch.nn.init.normal_(scorer.weights_proj.weight, generator=gen)
    B, S, T, H, D = 2, 96, 700, config.index_n_heads, config.index_head_dim
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(B, S, H, D, generator=gen).to(dtype)
        keys = torch.randn(B, T, D, generator=gen).to(dtype)
        hidden = torch.randn(B, S, config.hidden_size, generator=gen).to(dtype)
        with torch.no_grad():
            ref = DeepseekV4IndexerScorer.forward(scorer.to(dtype), q, keys, hidden)
            got = index_scores(scorer, q, keys, hidden)
        assert got.dtype == ref.dtype == torch.float32 and got.shape == ref.shape == (B, S, T)
        assert (ref < 0).any() and (ref > 0).any()  # head weights of both signs reach the sum
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
        top = lambda x: x.topk(64, dim=-1).indices.sort(dim=-1).values  # noqa: E731
        assert torch.equal(top(got), top(ref))


@pytest.mark.parametrize("topk", [4, 1000])  # native sparse top-k; the dense warm-up (every entry)
def test_chunked_indexer_gives_transformers_picks_and_scores(monkeypatch, topk):
    """ChunkedIndexer (query chunks of 5 rows) picks exactly what transformers' Lightning Indexer picks, in one
    pass and in a chunked prefill through the DynamicCache, and PickScorer's I[t, s] at the picks equals
    transformers' scorer's [B, S, T] scores read at those picks (fp32)."""
    from transformers import DynamicCache
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Indexer

    from lsa_runtime.window_attention import ChunkedIndexer, set_chunked_indexers

    model = _toy_model(seed=4)
    config = model.config
    indexer = model.model.layers[2].self_attn.compressor.indexer
    indexer.index_topk = topk
    B, S, H = 2, 150, config.index_n_heads
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(B, S, config.hidden_size, generator=gen)
    q_res = torch.randn(B, S, config.q_lora_rank, generator=gen)
    positions = torch.arange(S).expand(B, S)
    T = S // 4
    seen = _chunk_spy(monkeypatch, 5 * B * H * T * 4)  # 5 queries per chunk in one pass

    def run(chunked: bool, cache_chunks=None):
        set_chunked_indexers(model, chunked)
        assert isinstance(indexer, ChunkedIndexer) == chunked and isinstance(indexer, DeepseekV4Indexer)
        scores = []
        hook = indexer.scorer.register_forward_hook(lambda m, a, k, o: scores.append((o, k.get("picks"))),
                                                    with_kwargs=True)
        try:
            if cache_chunks is None:
                return indexer(hidden, q_res, positions, None, 2), scores
            cache, picks = DynamicCache(config=config), []
            for a, b in cache_chunks:
                picks.append(indexer(hidden[:, a:b], q_res[:, a:b], positions[:, a:b], cache, 2))
            return picks, scores
        finally:
            hook.remove()

    with torch.no_grad():
        ref_picks, ref_scores = run(False)
        picks, at_picks = run(True)
    assert torch.equal(picks, ref_picks) and (picks >= 0).any() and (picks < 0).any()
    assert at_picks == []  # without gradients the scorer is not called for the picks
    assert any(step < seq for seq, step in seen)  # the scores really ran in chunks
    (full, _), = ref_scores
    with torch.enable_grad():
        picks_g, scores = run(True)
    (logits, given), = scores
    assert given is picks_g and torch.equal(picks_g, ref_picks) and logits.requires_grad
    valid = picks_g >= 0
    expected = full.gather(-1, picks_g.clamp_min(0))
    assert logits.shape == picks_g.shape
    assert torch.allclose(logits[valid], expected[valid], rtol=1e-5, atol=1e-6 * float(full.abs().max()))
    # Chunked prefill (45 + 60 + 45 tokens, the cache keeps the windows' tails and the overlap state).
    bounds = [(0, 45), (45, 105), (105, 150)]
    with torch.no_grad():
        ref_steps, _ = run(False, bounds)
        steps, _ = run(True, bounds)
    for ref, got in zip(ref_steps, steps):
        assert torch.equal(got, ref)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("topk", [4, 1000])  # native sparse top-k; the dense warm-up (every entry)
def test_chunked_indexer_keeps_loss_distillation_and_gradients(monkeypatch, checkpointing, topk):
    """One training forward/backward with the window attention: transformers' indexer (I[t, s] over every entry,
    [B, S, T] logits kept for the distillation) against ChunkedIndexer with query chunks of 8 rows (logits kept
    only at the picks) and the block bias read in chunks, with and without activation checkpointing: the same
    loss, the same per-layer distillation KL and the same gradients, to fp32 round-off."""
    from lsa_runtime.window_attention import set_attention, set_chunked_indexers
    from reference.distillation import IndexerDistillation
    from reference.model_config import csa_layer_indices
    from reference.train import enable_checkpointing

    model = _toy_model(seed=8).train()
    set_attention(model, "window")
    distill = IndexerDistillation(model, csa_layer_indices(model.config))
    distill.set_topk(model, topk)
    B, S = 2, 157
    T, H = S // 4, model.config.index_n_heads
    k = min(topk, T)
    ids = torch.randint(3, 256, (B, S), generator=torch.Generator().manual_seed(9))
    kept, pop = [], distill.pop_loss

    def pop_and_record():  # the sizes of what the hooks kept until pop_loss
        kept.append(max(t.numel() for entry in distill.losses.values() for t in entry if t is not None))
        return pop()

    monkeypatch.setattr(distill, "pop_loss", pop_and_record)
    set_chunked_indexers(model, False)
    reference = _loss_and_grads(model, distill, ids)
    seen = _chunk_spy(monkeypatch, 8 * B * H * T * 4)
    set_chunked_indexers(model, True)
    if checkpointing:
        enable_checkpointing(model)
    chunked = _loss_and_grads(model, distill, ids)
    assert kept == [B * S * T, B * S * k]  # transformers' [B, S, T] logits, then nothing larger than [B, S, k]
    assert any(step < seq for seq, step in seen)  # chunking really happened
    assert chunked[0] == pytest.approx(reference[0], rel=1e-5)
    assert set(chunked[1]) == {2} and chunked[1][2] == pytest.approx(reference[1][2], rel=1e-5, abs=1e-7)
    _assert_grads_close(reference[2], chunked[2], 1e-5)


def test_card_topk_probe_table_is_the_stored_rows():
    """The card's "Indexer or reading?" table: every cell is the accuracy recomputed from the stored per-prompt hits of
    training_results.json's diagnostics.topk_probe, whose top-64 column is the default's own evaluation's rows."""
    results = json.loads((REFERENCE / "training_results.json").read_text())
    probe = results["diagnostics"]["topk_probe"]["results"]
    card = (REFERENCE / "README.md").read_text()
    card = card[card.index("### Indexer or reading?"):]
    card = card[:card.index("\n### ")]
    default = _evaluations_by_piece(results)["L6"]  # the default when these ran
    for task in ("single_number_code", "single_number_noise", "multivalue_number_code"):
        cells = []
        for length in (32768, 65536):
            key = f"{task}@{length}"
            assert probe["topk64"][key] == default[key]
            for k in (64, 256, 1024, 4096, 16384):
                row = probe[f"topk{k}"][key]
                assert row["index_topk"] == k and len(row["hits"]) == row["n"] == (20 if length == 32768 else 10)
                cells.append(f"{100 * row['hits'].count('1') / row['n']:.1f}")
        line = next(x for x in card.splitlines() if x.startswith(f"| {task}") and x.count("|") == 12)
        assert [c.strip() for c in line.split("|")[2:-1]] == cells, line


def test_card_needle_rank_table_is_the_stored_ranks():
    """The card's needle-rank table: every rank is training_results.json's diagnostics.needle_rank, and its
    "answered" column is the stored per-prompt hits of the default's evaluation (top-64) and of the probe (every
    entry)."""
    results = json.loads((REFERENCE / "training_results.json").read_text())
    ranks = results["diagnostics"]["needle_rank"]["samples"]
    probe = results["diagnostics"]["topk_probe"]["results"]
    card = (REFERENCE / "README.md").read_text()
    card = card[card.index("### Indexer or reading?"):]
    card = card[:card.index("\n### ")]
    rows = [line for line in card.splitlines() if re.match(r"^\| (32|64)K #\d", line)]
    assert len(rows) == len(ranks) == 9
    yes = {"1": "yes", "0": "no"}
    for line in rows:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        length = 65536 if cells[0].startswith("64K") else 32768
        i = int(cells[0].split("#")[1])
        stored = ranks[f"{length}/{i}"]["ranks"]
        assert cells[2:] == [f"{stored[str(layer)]:,}" for layer in (2, 4, 6, 8, 10)], line
        key = f"single_number_code@{length}"
        assert cells[1] == f"{yes[probe['topk64'][key]['hits'][i]]} / {yes[probe['topk16384'][key]['hits'][i]]}"


def test_card_gpu_needle_rank_table_is_the_stored_ranks():
    """The card's per-layer rank summary: median (lower middle) rank and the counts within the top 64 / top 4,096,
    recomputed from training_results.json's diagnostics.needle_rank_gpu; and those GPU ranks equal the CPU ranks of
    diagnostics.needle_rank wherever both ranked a prompt, as the card says."""
    import statistics

    results = json.loads((REFERENCE / "training_results.json").read_text())
    gpu = results["diagnostics"]["needle_rank_gpu"]["tasks"]
    cpu = results["diagnostics"]["needle_rank"]["samples"]
    shared = [k for k in cpu if k in gpu["single_number_code"]]
    assert len(shared) == 9 and all(cpu[k]["ranks"] == gpu["single_number_code"][k]["ranks"] for k in shared)
    card = (REFERENCE / "README.md").read_text()
    card = card[card.index("### Indexer or reading?"):]
    card = card[:card.index("\n### ")]
    for task, haystack in (("single_number_code", "code"), ("single_number_noise", "noise")):
        for length in (32768, 65536):
            samples = [v for k, v in gpu[task].items() if k.startswith(f"{length}/")]
            assert len(samples) == 10
            cells = []
            for layer in ("2", "4", "6", "8", "10"):
                r = [s["ranks"][layer] for s in samples]
                cells.append(f"{statistics.median_low(r):,} ({sum(x <= 64 for x in r)} / {sum(x <= 4096 for x in r)})")
            line = next(x for x in card.splitlines() if x.startswith(f"| {haystack}, {length // 1024}K |"))
            assert [c.strip() for c in line.split("|")[2:-1]] == cells, line
    # "not the needle's distance": layer 6's ranks of the needles within 20,000 tokens of the question
    near = {length: sorted(s["ranks"]["6"] for t in gpu.values() for k, s in t.items()
                           if k.startswith(f"{length}/") and s["query"] - 4 * min(s["needle_entries"]) < 20_000)
            for length in (32768, 65536)}
    assert near[65536] == [568, 702, 6506, 6992] and "question 568-6,992" in card
    assert len(near[32768]) == 10 and near[32768][-2:] == [149, 7502] and "ten such needles 3-149" in card


def _assert_three_run_table(lines, default, first, second, lengths=(4096, 8192, 16384, 32768, 65536)) -> dict:
    """A card table of the three tasks per length, "default / first / second" accuracy cells and the paired prompts
    gained / lost by ``second`` against the default, recomputed from the stored per-prompt hits (same prompts);
    returns {length: (gained, lost)}."""
    acc = lambda row: f"{100 * row['hits'].count('1') / row['n']:.1f}"  # noqa: E731
    paired = {}
    for length in lengths:
        cells, gained, lost = [], 0, 0
        for task in ("single_number_code", "single_number_noise", "multivalue_number_code"):
            key = f"{task}@{length}"
            a, b, c = default[key], first[key], second[key]
            assert a["n"] == b["n"] == c["n"] == len(c["hits"])
            cells.append(f"{acc(a)} / {acc(b)} / {acc(c)}")
            gained += sum(x == "0" and y == "1" for x, y in zip(a["hits"], c["hits"]))
            lost += sum(x == "1" and y == "0" for x, y in zip(a["hits"], c["hits"]))
        paired[length] = (gained, lost)
        line = next(x for x in lines if x.startswith(f"| {length:,} (n = "))
        assert [c.strip() for c in line.split("|")[2:-1]] == cells + [f"{gained} / {lost}"], line
    return paired


def test_card_indexer_alone_tables_are_the_stored_rows():
    """The card's "Indexer alone at long range": every accuracy cell and the paired gains / losses recomputed from the
    stored per-prompt hits (the default's needles_gpu_long and diagnostics.indexer_alone's two runs, same prompts),
    and the training table from the stored per-layer means."""
    results = json.loads((REFERENCE / "training_results.json").read_text())
    default = _evaluations_by_piece(results)["L6"]  # the default when these ran
    runs = results["diagnostics"]["indexer_alone"]["runs"]
    assert (runs["run1"]["step"], runs["run2"]["step"]) == (65, 112)
    card = (REFERENCE / "README.md").read_text()
    card = card[card.index("### Indexer alone at long range"):]
    card = card[:card.index("\n### ")]
    lines = card.splitlines()
    _assert_three_run_table(lines, default, runs["run1"]["results"], runs["run2"]["results"])
    training = runs["run2"]["training"]
    for layer in ("2", "4", "6", "8", "10"):
        cells = []
        for length in ("65536", "32768"):
            first, last = training[length]["first"]["layers"][layer], training[length]["last"]["layers"][layer]
            cells += [f"{first['kl']:.4f} -> {last['kl']:.4f}", f"{first['mass_at_k']:.4f} / {first['best_at_k']:.4f}",
                      f"{last['mass_at_k']:.4f} / {last['best_at_k']:.4f}"]
        line = next(x for x in lines if x.startswith(f"| {layer} | "))
        assert [c.strip() for c in line.split("|")[2:-1]] == cells, line
    # the stored means are those of the raw training log that came back with the checkpoint
    log = json.loads((REPO / "docs/results/indexer_piece_h200/run2/ckpt/state.json").read_text())["log"]
    assert len(log) == 112
    for length in ("65536", "32768"):
        rows = [r for r in log if r["seq_len"] == int(length)]
        for part, picked in (("first", rows[:5]), ("last", rows[-5:])):
            stored = training[length][part]
            assert stored["steps"] == [r["step"] for r in picked]
            for layer in ("2", "4", "6", "8", "10"):
                for key in ("kl", "mass_at_k", "best_at_k"):
                    mean = sum(r["layers"][layer][key] for r in picked) / 5
                    assert stored["layers"][layer][key] == pytest.approx(mean, abs=6e-5)


def test_card_answer_weighted_and_judged_tables_are_the_stored_rows():
    """The card's answer-weighted table (runs 3-4) recomputed from the stored per-prompt hits against the default of
    the day's (L6; same prompts), the paired counts and McNemar p-values it quotes; its judged table and verdicts
    (runs 2-5) recomputed with reference.compare_evals from the stored whole evaluations, which equal the runs' own
    three-task evaluations where both ran; runs 5-6's table at 32K-64K; the stored rows of runs 4-6 are those of the
    raw files that came back."""
    from math import comb

    from reference.compare_evals import verdict

    results = json.loads((REFERENCE / "training_results.json").read_text())
    default = _evaluations_by_piece(results)["L6"]  # the default when these ran
    alone = results["diagnostics"]["indexer_alone"]
    runs, judged = alone["answer_weighted"]["runs"], alone["judged"]["runs"]
    assert (runs["run3"]["step"], runs["run4"]["step"]) == (59, 100)
    section = _card_section((REFERENCE / "README.md").read_text(), "Indexer alone at long range")
    lines = section[section.index("The answer's queries weighted up"):].splitlines()  # its table, after run 2's
    paired = _assert_three_run_table(lines, default, runs["run3"]["results"], runs["run4"]["results"])
    mcnemar = lambda g, n: 2 * sum(comb(g + n, i) for i in range(min(g, n) + 1)) / 2 ** (g + n)  # noqa: E731
    assert paired[32768] == (19, 0) and f"{mcnemar(*paired[32768]):.0e}" == "4e-06" and "p = 4e-6" in section
    assert paired[65536] == (10, 0) and round(mcnemar(*paired[65536]), 3) == 0.002 and "p = 0.002" in section
    short = [sum(paired[n][i] for n in (4096, 8192, 16384)) for i in (0, 1)]
    assert f"4K-16K: {short[0]} gained, {short[1]} lost" in section
    # judged: the whole evaluation, the verdict recomputed (runs 2, 3, 5 adopt; run 4 keep), and the card's mean table
    means = {}
    for run in ("run2", "run3", "run4", "run5"):
        whole = judged[run]["results"]["topk64"]
        assert set(whole) == set(default) and all(whole[k]["n"] == default[k]["n"] for k in default)
        rows, adopt = verdict(_accuracy_cells(whole), _accuracy_cells(default))
        assert adopt is (run != "run4")
        expected = "verdict: adopt (at least as good at every length)" if adopt else "verdict: keep the reference"
        assert judged[run]["verdict"].rstrip().endswith(expected)
        means[run] = rows
    for run in ("run3", "run4", "run5"):
        own = runs[run]["results"]
        assert all(judged[run]["results"]["topk64"][k]["hits"] == own[k]["hits"] for k in own)
    for row in zip(*means.values(), strict=True):
        assert all(r[:3] == row[0][:3] for r in row)
        assert f"| {row[0][0]:,} | {100 * row[0][2]:.1f}% | " + " | ".join(f"{100 * r[3]:.1f}%" for r in row) + " |" \
            in section
    # runs 5 and 6 at 32K-64K: the card's table, recomputed from the stored hits; run 6 is not judged
    assert (runs["run5"]["step"], runs["run6"]["step"]) == (139, 181) and "run6" not in judged
    lines = section[section.index("**Run 5, adopted"):].splitlines()
    _assert_three_run_table(lines, default, runs["run5"]["results"], runs["run6"]["results"], lengths=(32768, 65536))
    for run in ("run4", "run5", "run6"):  # the stored rows are those of the raw files that came back
        raw = {}
        for name in ("eval_long.json", "eval_short.json"):
            if (REPO / "docs/results/indexer_piece_h200" / run / name).is_file():
                raw.update(json.loads((REPO / "docs/results/indexer_piece_h200" / run / name).read_text())["topk64"])
        assert raw == runs[run]["results"]


def test_card_attention_rank_is_the_stored_sample():
    """The card's answer-query table: the attention's ranks and shares and the native indexer's ranks are
    training_results.json's diagnostics.attention_rank_cpu, whose native ranks equal the GPU ranks of those prompts."""
    results = json.loads((REFERENCE / "training_results.json").read_text())
    samples = results["diagnostics"]["attention_rank_cpu"]["samples"]
    gpu = results["diagnostics"]["needle_rank_gpu"]["tasks"]["single_number_code"]
    card = (REFERENCE / "README.md").read_text()
    card = card[card.index("### Indexer alone at long range"):]
    card = card[:card.index("\n### ")]
    layers = ("2", "4", "6", "8", "10")
    assert sorted(samples) == ["65536/0", "65536/1"]
    for key, sample in samples.items():
        assert sample["ranks"] == gpu[key]["ranks"]
        line = next(x for x in card.splitlines() if x.startswith(f"| 64K #{key.split('/')[1]} | "))
        assert [c.strip() for c in line.split("|")[2:-1]] == [
            " / ".join(f"{sample['attn_ranks'][k]:,}" for k in layers),
            " / ".join(f"{100 * sample['attn_share'][k]:.2g}%" for k in layers),
            " / ".join(f"{sample['ranks'][k]:,}" for k in layers)], line


def test_card_run4_needle_ranks_are_the_stored_sample():
    """The card's run-4 rank table: run 4's ranks as stored (the CPU run), the default's as diagnostics.needle_rank_gpu
    stored them for the same prompts, "answered" from both evaluations' per-prompt hits, and the needles' distances
    from the question the text quotes."""
    results = json.loads((REFERENCE / "training_results.json").read_text())
    aw = results["diagnostics"]["indexer_alone"]["answer_weighted"]
    samples = aw["needle_rank_cpu"]["samples"]
    gpu = results["diagnostics"]["needle_rank_gpu"]["tasks"]["single_number_code"]
    hits = (_evaluations_by_piece(results)["L6"]["single_number_code@65536"]["hits"],
            aw["runs"]["run4"]["results"]["single_number_code@65536"]["hits"])
    section = _card_section((REFERENCE / "README.md").read_text(), "Indexer alone at long range")
    layers = ("2", "4", "6", "8", "10")
    assert sorted(samples) == [f"65536/{i}" for i in range(4)]
    for key, sample in samples.items():
        i = int(key.split("/")[1])
        assert sample["needle_entries"] == gpu[key]["needle_entries"] and sample["query"] == gpu[key]["query"]
        table = section[section.index("**Where run 4 ranks the needle**"):].splitlines()
        line = next(x for x in table if x.startswith(f"| 64K #{i} | "))
        answered = " / ".join("yes" if h[i] == "1" else "no" for h in hits)
        assert [c.strip() for c in line.split("|")[2:-1]] == [
            answered, " / ".join(f"{gpu[key]['ranks'][k]:,}" for k in layers),
            " / ".join(f"{sample['ranks'][k]:,}" for k in layers)], line
    far = {key: round((s["query"] - 4 * min(s["needle_entries"])) / 1000) for key, s in samples.items()}
    assert far == {"65536/0": 11, "65536/1": 31, "65536/2": 60, "65536/3": 46}
    assert "~11K and ~31K" in section and "~60K and ~46K" in " ".join(section.split())
