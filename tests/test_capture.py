"""The captured indexer logits equal an independent recomputation of I[t,s] from the model's weights."""

import torch
from transformers.models.deepseek_v4.modeling_deepseek_v4 import apply_rotary_pos_emb

from lsa_runtime.backbone import csa_layers
from lsa_runtime.capture import ChunkInfo, IndexerCapture, IndexerObserver, collect_logits


class Recorder(IndexerObserver):
    def __init__(self):
        self.hidden, self.logits, self.picks = {}, {}, {}

    def on_hidden(self, layer, chunk: ChunkInfo, hidden):
        self.hidden.setdefault(layer, []).append(hidden.clone())

    def on_logits(self, layer, chunk, logits):
        self.logits.setdefault(layer, []).append((chunk.start, logits.clone()))

    def on_topk(self, layer, chunk, picks):
        self.picks.setdefault(layer, []).append(picks.clone())


def test_logits_equal_the_formula(tiny_model, sample_ids):
    """I[t,s] = sum_h w_h(t) H^-1/2 * relu(q_h(t) . K_s) dh^-1/2, q = RoPE_t(W_IUQ RMSNorm(W_DQ x_t))."""
    model = tiny_model
    cfg = model.config
    ids = sample_ids[:300]
    csa = csa_layers(cfg)
    capture = IndexerCapture(model, memory_layers=csa, chunk_size=128)
    rec = Recorder()
    cache = capture.prefill(ids, rec)
    n = ids.numel()
    for layer in csa:
        attn = model.model.layers[layer].self_attn
        indexer = attn.compressor.indexer
        x = torch.cat(rec.hidden[layer])  # [N, d] attention inputs
        keys = capture.indexer_keys(cache, layer).float()  # [T, dh]
        assert keys.shape == (n // 4, cfg.index_head_dim)
        with torch.no_grad():
            latent = attn.q_a_norm(attn.q_a_proj(x.unsqueeze(0)))
            q = indexer.q_b_proj(latent).view(1, n, cfg.index_n_heads, cfg.index_head_dim).transpose(1, 2)
            cos, sin = indexer.rotary_emb(x.unsqueeze(0), torch.arange(n).unsqueeze(0), layer_type="compress")
            q = apply_rotary_pos_emb(q, cos, sin).transpose(1, 2)[0].double()  # [N, H, dh]
            w = indexer.scorer.weights_proj(x).double() * cfg.index_n_heads ** -0.5  # [N, H]
        expect = (torch.relu(torch.einsum("nhd,td->nht", q, keys.double())) * cfg.index_head_dim ** -0.5
                  * w.unsqueeze(-1)).sum(1)  # [N, T]
        for start, logits in rec.logits[layer]:
            t_len = logits.shape[1]
            got = logits.double()
            ref = expect[start : start + logits.shape[0], :t_len]
            assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
        picks = torch.cat(rec.picks[layer])
        assert picks.shape == (n, min(cfg.index_topk, n // 4)) or picks.shape[0] == n


def test_native_topk_is_the_top_of_the_captured_logits(tiny_model, sample_ids):
    ids = sample_ids[:200]
    rec = Recorder()
    IndexerCapture(tiny_model, chunk_size=200).prefill(ids, rec)
    layer = csa_layers(tiny_model.config)[0]
    (_, logits), picks = rec.logits[layer][0], rec.picks[layer][0]
    for t in (60, 120, 199):
        nv = (t + 1) // 4
        top = set(logits[t, :nv].topk(min(16, nv)).indices.tolist())
        assert set(p for p in picks[t].tolist() if p >= 0) == top


def test_chunked_capture_matches_single_shot(tiny_model, sample_ids):
    ids = sample_ids[:256]
    one = collect_logits(tiny_model, ids, chunk_size=256)
    many = collect_logits(tiny_model, ids, chunk_size=48)
    for layer in one:
        finite = torch.isfinite(one[layer])
        assert torch.equal(finite, torch.isfinite(many[layer]))
        torch.testing.assert_close(one[layer][finite], many[layer][finite], rtol=1e-4, atol=1e-5)


def test_chunks_shrink_with_context_to_bound_memory(tiny_model):
    capture = IndexerCapture(tiny_model, chunk_size=512, max_score_bytes=8 << 20)
    heads = max(tiny_model.config.index_n_heads, tiny_model.config.num_attention_heads)
    window = tiny_model.config.sliding_window
    previous = 512
    for start in (0, 4096, 65536, 1 << 20):
        length = capture.chunk_length(start)
        assert 16 <= length <= previous
        assert length == 16 or length * heads * ((start + length) // 4 + window) * 4 <= capture.max_score_bytes
        previous = length
    assert capture.chunk_length(0) == 512 and capture.chunk_length(1 << 20) == 16


def test_generate_is_transformers_greedy_decoding_with_every_position_observed_once(tiny_model, sample_ids):
    """IndexerCapture.generate: the tokens of transformers' own greedy generate; the observer sees the prompt in
    chunks and then each generated token as a one-token chunk, the last one included; the decode steps' captured
    logits equal a teacher-forced prefill of prompt + continuation."""
    prompt = sample_ids[:90]

    class Chunks(Recorder):
        def __init__(self):
            super().__init__()
            self.chunks = []

        def on_chunk_start(self, chunk):
            self.chunks.append((chunk.start, chunk.length))

    rec = Chunks()
    _, generated = IndexerCapture(tiny_model, memory_layers=(2,), chunk_size=32).generate(prompt, 12, rec)
    hf = tiny_model.generate(prompt.unsqueeze(0), max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert generated == hf[0, 90:].tolist()
    assert rec.chunks == [(0, 32), (32, 32), (64, 26)] + [(90 + i, 1) for i in range(12)]
    full = torch.cat([prompt, torch.tensor(generated)])
    ref = Recorder()
    IndexerCapture(tiny_model, memory_layers=(2,), chunk_size=32).prefill(full, ref)
    layer = csa_layers(tiny_model.config)[0]
    decode = {start: x for start, x in rec.logits[layer] if start >= 90}
    assert sorted(decode) == list(range(90, 102))
    by_row = {}
    for start, x in ref.logits[layer]:
        for r in range(x.shape[0]):
            by_row[start + r] = x[r]
    for position, x in decode.items():
        t_len = x.shape[1]
        torch.testing.assert_close(x[0], by_row[position][:t_len], rtol=1e-4, atol=1e-5)
