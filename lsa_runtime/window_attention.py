"""Exact DeepSeek-V4 attention without the dense score matrix, for training and evaluating at 16K-64K tokens.

transformers' eager DeepSeek-V4 attention scores every query against every raw token and every compressed entry
([B, heads, S, S + T] in fp32) and then masks all but the sliding window (the last ``w`` raw tokens) and the
compressed entries the block bias leaves open (CSA: the indexer's top-k; HCA: the causally visible ones). This
module computes the same softmax over exactly those keys, plus the per-head sink:

* raw tokens: queries in blocks of ``w`` against the ``2w`` raw keys that cover their windows;
* compressed entries: read from the block bias (0 = attended, -inf = not). When each query attends at most a
  quarter of the entries (CSA top-k at long lengths) they are gathered per query; otherwise (HCA, or a dense
  warm-up top-k) the bias is added to a dense [B, heads, S, T] score block, T = S / rate.

Memory and work grow as S x (2w + k + T_hca) instead of S x (S + T). On a CPU the queries go in blocks (whole
windows) whose temporaries fit ``CPU_CHUNK_BYTES``. The result equals the eager path to fp32 round-off
(``tests/test_reference_model.py`` checks logits, gradients and chunked prefill, with and without the blocks).

Where it runs: the bundled model's training and needle evaluations (``reference/``: there first, as
``reference/attention.py`` until 2026-12-04), and ``fm-index evaluate --attention window``
(:class:`fm_eval.runner.EvalConfig`), where it makes long prefills ~2x faster on a CPU (BENCHMARKS.md, "Prefill");
transformers' eager attention stays the reference and the default.

Use: ``use_window_attention(model)`` registers the attention function and its mask function under ``NAME`` and
switches the model's config to it; ``use_eager_attention(model)`` switches back. The mask function returns an
empty [B, 1, S, 0] mask: the stock attention then appends the compressor's block bias to it, so this function
receives exactly that bias (CSA / HCA layers) or zeros (sliding layers, or a compressor layer with no entry yet),
and never the dense sliding-window mask. Padding masks are not supported (the reference programs never pad).

The returned attention weights are not the eager [B, heads, S, S + T] probabilities: when gradients are enabled
(training, where the Lightning-Indexer distillation reads them) or the attention module has the attribute
``KEEP_MASS`` set true (``train_indexer.py``'s teacher, which runs without autograd) they are the probability mass on
each compressed entry summed over heads, [B, 1, S, T] fp32, detached; otherwise None. ``distillation.py`` reads
either form.

Lightning Indexer: transformers' indexer scores every query against every compressed entry before its top-k,
I[t, s] = sum_h w[t, h] ReLU(q[t, h] . K[s]) as [B, S, index heads, T] fp32 blocks (several of them live at once,
and saved for the backward pass), which is what made a 64K sequence run out of memory (16 heads x 64K x 16K x 4
bytes = 64 GiB per block). ``use_window_attention`` also switches every CSA layer's indexer to
:class:`ChunkedIndexer` (the same module, its class swapped, so weights and hooks stay): the same picks, computed
in query chunks of at most ``CHUNK_BYTES`` per score block without gradient (the top-k is not differentiable), and,
when gradients are enabled, I[t, s] with gradient at the picks only ([B, S, k], computed by :class:`PickScorer`,
whose forward hook the distillation reads). The open entries of the block bias are also read in query chunks here.
The scores are computed by :func:`index_scores` (one GEMM, two passes; transformers' scorer stays the reference it
is tested against). ``CHUNK_BYTES`` sets the chunk length from the sizes of each call (nothing to tune), and
``CPU_CHUNK_BYTES`` caps it on a CPU; tests lower them to force chunking.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
    DeepseekV4Indexer,
    DeepseekV4IndexerScorer,
    apply_rotary_pos_emb,
)

NAME = "fm_window_sparse"
ATTENTIONS = ("eager", "window")  # what set_attention takes: transformers' dense path, or this module
# Bytes of one query chunk's fp32 score block ([B, chunk, index heads, T] in the indexer, [B, chunk, T] for the
# block bias); the chunk length follows from the call's sizes. A few such blocks are alive at once.
CHUNK_BYTES = 1 << 30
# On a CPU a smaller block is faster: a block above glibc's mmap threshold (32 MiB) is new pages, faulted in on every
# call, and a smaller one stays in cache between its GEMM and the passes after it (the indexer's 4,096 queries x 16
# heads x 4,096 entries and their top-64: 0.33 s in blocks of 16 MiB, 0.54-1.57 s in 512 MiB; docs/BENCHMARKS.md).
CPU_CHUNK_BYTES = 16 << 20
# An attention module with this attribute set true returns its compressed-entry mass even without autograd.
KEEP_MASS = "fm_keep_compressed_mass"


def query_chunk(seq: int, bytes_per_query: int, device: torch.device | None = None) -> int:
    """Queries per chunk: as many as keep ``bytes_per_query`` x chunk within ``CHUNK_BYTES`` (1 to ``seq``), and
    within ``CPU_CHUNK_BYTES`` on a CPU ``device``."""
    limit = CHUNK_BYTES
    if device is not None and torch.device(device).type == "cpu":
        limit = min(limit, CPU_CHUNK_BYTES)
    return max(1, min(seq, limit // max(1, bytes_per_query)))


def empty_mask(batch_size: int, q_length: int, kv_length: int, attention_mask=None, device="cpu", **kwargs):
    """Mask function for ``NAME``: an empty [B, 1, q, 0] bf16 mask (the sliding window is applied in
    :func:`window_sparse_attention`); refuses padding masks."""
    if attention_mask is not None and attention_mask.ndim == 2 and not bool(attention_mask.all()):
        raise ValueError(f"attention '{NAME}' does not support padded batches (attention_mask has zeros)")
    return torch.zeros(batch_size, 1, q_length, 0, dtype=torch.bfloat16, device=device)


def _dense_fallback(module, query, key, attention_mask, scaling):
    """Single-query case where every key is visible (a decode step whose compressor returned no bias)."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import eager_attention_forward

    out, _ = eager_attention_forward(module, query, key, key, attention_mask.to(torch.float32), scaling)
    return out, None


def window_sparse_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention of ``DeepseekV4Attention`` (``query`` [B, H, S, D]; ``key`` is ``value``: [B, 1, N_raw + T, D],
    raw tokens then compressed entries); returns (output [B, S, H, D], compressed mass or None)."""
    if attention_mask is None:
        raise ValueError(f"attention '{NAME}' needs its mask function: call use_window_attention(model)")
    batch, heads, seq, dim = query.shape
    kv = key[:, 0]  # one shared key/value head: [B, N, D]
    n_total = kv.shape[1]
    window = module.sliding_window
    bias = attention_mask[:, 0]  # [B, S, M]
    if module.compressor is None:
        n_comp = 0  # a sliding layer: the stock code padded the empty mask with zeros
    elif bias.shape[-1] < n_total:
        n_comp = bias.shape[-1]  # exactly the compressor's block bias
    elif seq == 1:
        return _dense_fallback(module, query, key, attention_mask, scaling)
    else:
        n_comp = 0  # the compressor has emitted no entry yet
    n_raw = n_total - n_comp
    offset = n_raw - seq  # raw keys before the first query (a cache's window); query i is raw key i + offset
    if offset < 0:
        raise ValueError(f"attention '{NAME}': {n_raw} raw keys for {seq} queries")
    raw, comp = kv[:, :n_raw], kv[:, n_raw:]
    cbias = bias[..., -n_comp:] if n_comp else None
    # On a CPU, blocks of queries (a multiple of the window) whose temporaries stay within CPU_CHUNK_BYTES: the
    # gathered picks alone are [B, S, k, D] (128 MiB for 4,096 queries at k = 64, D = 128 in fp32), new pages on
    # every call (see CPU_CHUNK_BYTES). Each query's softmax is its own, so the blocks are independent.
    indexer = getattr(module.compressor, "indexer", None)
    n_open = min(n_comp, indexer.index_topk) if indexer is not None else n_comp  # entries a query scores (HCA: all)
    per_query = 4 * batch * (3 * heads * (2 * window + n_open + 1) + n_open * dim)  # fp32 scores, logits, probs, picks
    step = seq if query.device.type != "cpu" else max(window, CPU_CHUNK_BYTES // per_query // window * window)
    if step >= seq:
        return _window_sparse_block(module, query, raw, comp, cbias, scaling)
    outs, masses = [], []
    for a in range(0, seq, step):
        b = min(seq, a + step)
        first = max(0, offset + a - window)  # the raw keys queries a .. b-1 can see
        out, mass = _window_sparse_block(module, query[:, :, a:b], raw[:, first:offset + b], comp,
                                         None if cbias is None else cbias[:, a:b], scaling)
        outs.append(out)
        masses.append(mass)
    mass = None if masses[0] is None else torch.cat(masses, dim=2)
    return torch.cat(outs, dim=1), mass


def _window_sparse_block(module, query, raw, comp, cbias, scaling):
    """:func:`window_sparse_attention` for queries that are the last ``S`` of the raw keys ``raw`` [B, N_raw, D]
    (``comp`` [B, T, D] the compressed entries, ``cbias`` [B, S, T] their block bias, or None when there are
    none): returns (output [B, S, H, D], compressed mass or None)."""
    batch, heads, seq, dim = query.shape
    window = module.sliding_window
    n_raw, n_comp = raw.shape[1], (0 if cbias is None else cbias.shape[-1])
    offset = n_raw - seq

    # Raw tokens: block b holds queries b*w .. b*w+w-1; its 2w key slots c are raw keys offset + b*w - w + c,
    # and query a of the block sees slots a+1 .. a+w (its own token and the w-1 before it).
    n_blocks = -(-seq // window)
    padded = n_blocks * window
    raw_p = F.pad(raw, (0, 0, window, padded - seq))
    blocks = raw_p[:, offset:].unfold(1, 2 * window, window)  # [B, nb, D, 2w]
    q_p = F.pad(query, (0, 0, 0, padded - seq)).view(batch, heads, n_blocks, window, dim)
    scores_w = torch.matmul(q_p, blocks.unsqueeze(1)).float() * scaling  # [B, H, nb, w, 2w]
    a = torch.arange(window, device=query.device).view(1, window, 1)
    c = torch.arange(2 * window, device=query.device).view(1, 1, 2 * window)
    b = torch.arange(n_blocks, device=query.device).view(n_blocks, 1, 1)
    visible = (c - a >= 1) & (c - a <= window) & (offset + b * window - window + c >= 0)  # [nb, w, 2w]
    scores_w = scores_w.masked_fill(~visible, float("-inf")).view(batch, heads, padded, 2 * window)

    # Compressed entries.
    gathered, idx, n_sel = None, None, 0
    if n_comp:
        # The open entries per query, read in query chunks: no [B, S, T] copy of the bias (bool or fp32).
        step = query_chunk(seq, batch * n_comp * 4, query.device)
        starts = range(0, seq, step)
        counts = [torch.isfinite(cbias[:, t:t + step]).sum(-1).max() for t in starts]
        n_sel = int(torch.stack(counts).max()) if counts else 0
        if n_sel and 4 * n_sel < n_comp:
            idx = torch.empty(batch, seq, n_sel, dtype=torch.long, device=query.device)
            sel_open = torch.empty(batch, seq, n_sel, dtype=torch.bool, device=query.device)
            for t in starts:
                top = torch.topk(cbias[:, t:t + step].float(), n_sel, dim=-1)
                idx[:, t:t + step], sel_open[:, t:t + step] = top.indices, torch.isfinite(top.values)  # [B, c, k]
            gathered = comp[torch.arange(batch, device=comp.device).view(batch, 1, 1), idx]  # [B, S, k, D]
            scores_c = torch.einsum("bhsd,bskd->bhsk", query, gathered).float() * scaling
            scores_c = scores_c.masked_fill(~sel_open.unsqueeze(1), float("-inf"))
        elif n_sel:
            n_sel = n_comp
            scores_c = torch.matmul(query, comp.transpose(1, 2).unsqueeze(1)).float() * scaling
            scores_c = scores_c + cbias.float().unsqueeze(1)
        if n_sel:
            scores_c = F.pad(scores_c, (0, 0, 0, padded - seq), value=float("-inf"))
    parts = [scores_w] + ([scores_c] if n_sel else [])
    sinks = module.sinks.float().view(1, heads, 1, 1).expand(batch, heads, padded, 1)
    logits = torch.cat(parts + [sinks], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = F.softmax(logits, dim=-1)
    p_w = probs[..., :2 * window].to(raw.dtype).view(batch, heads, n_blocks, window, 2 * window)
    out = torch.matmul(p_w, blocks.transpose(-1, -2).unsqueeze(1)).view(batch, heads, padded, dim)[:, :, :seq]
    mass, want_mass = None, torch.is_grad_enabled() or getattr(module, KEEP_MASS, False)
    if n_sel:
        p_c = probs[:, :, :seq, 2 * window:2 * window + n_sel]  # the padded query rows dropped
        if gathered is not None:
            out = out + torch.einsum("bhsk,bskd->bhsd", p_c.to(raw.dtype), gathered)
        else:
            out = out + torch.matmul(p_c.to(raw.dtype), comp.unsqueeze(1))
        if want_mass:
            with torch.no_grad():
                summed = p_c.sum(1)  # [B, S, k or T]
                if gathered is not None:  # top-k indices are distinct, and closed picks carry probability 0
                    summed = summed.new_zeros(batch, seq, n_comp).scatter_(-1, idx, summed)
                mass = summed.unsqueeze(1)
    elif n_comp and want_mass:
        mass = query.new_zeros(batch, 1, seq, n_comp, dtype=torch.float32)
    out = out.to(query.dtype)
    return out.transpose(1, 2).contiguous(), mass


def index_scores(scorer: DeepseekV4IndexerScorer, q: torch.Tensor, keys: torch.Tensor,
                 hidden_states: torch.Tensor, block: torch.Tensor | None = None) -> torch.Tensor:
    """I[t, s] = sum_h w[t, h] ReLU(q[t, h] . K[s]) for every entry, [B, S, T] fp32: transformers' scorer
    (``DeepseekV4IndexerScorer.forward``: ``q`` [B, S, H, D], ``keys`` [B, T, D]) with the same products
    (ReLU(q . K) x softmax_scale, times w[t, h] x weights_scaling) and the head sum done as one batched
    [1, H] x [H, T] product per query, the ReLU and the scale in place: two passes over the [B, S, H, T] block
    instead of transformers' seven, and one such block alive instead of three (docs/BENCHMARKS.md, "Prefill").
    Only the order of the fp32 sums may differ from transformers' (equal picks, tested against it).
    ``block``: fp32 storage of at least B x S x H x T elements for the per-head scores, reused by a caller that
    scores query chunk after query chunk (a CPU faults in fresh pages for every new large tensor)."""
    batch, seq, heads, dim = q.shape
    n_entries = keys.shape[1]
    out = None if block is None else block[:batch * seq * heads * n_entries].view(batch, seq * heads, n_entries)
    # q[t, h] . K[s] as one [S x H, D] x [D, T] GEMM per row; transformers' broadcast matmul runs S small
    # [H, D] x [D, T] GEMMs (4.8x slower on a CPU at S = 4,096, T = 3,072, measured alone)
    scores = torch.matmul(q.float().reshape(batch, seq * heads, dim), keys.float().transpose(-1, -2), out=out)
    scores = scores.view(batch, seq, heads, n_entries).relu_().mul_(scorer.softmax_scale)
    weights = scorer.weights_proj(hidden_states).float() * scorer.weights_scaling  # w[t, h]: [B, S, H]
    return torch.matmul(weights.unsqueeze(-2), scores).squeeze(-2)


class PickScorer(DeepseekV4IndexerScorer):
    """transformers' indexer scorer (same weights); given ``picks`` [B, S, k] (-1 = none) it returns
    I[t, s] = sum_h w[t, h] ReLU(q[t, h] . K[s]) only at each query's picked entries: [B, S, k], column j for
    ``picks[..., j]`` (any value where the pick is -1). Memory S x k x (index_head_dim + heads) instead of
    S x heads x T; this is the form, with gradient, that the distillation reads through this module's hook."""

    def forward(self, q: torch.Tensor, compressed_kv: torch.Tensor, hidden_states: torch.Tensor,
                picks: torch.Tensor | None = None) -> torch.Tensor:
        if picks is None:
            return super().forward(q, compressed_kv, hidden_states)  # [B, S, T], every entry
        batch = q.shape[0]
        rows = torch.arange(batch, device=q.device).view(batch, 1, 1)
        keys = compressed_kv[rows, picks.clamp_min(0)].float()  # K[s] of the picks: [B, S, k, D]
        scores = torch.matmul(q.float(), keys.transpose(-1, -2))  # q[t, h] . K[s]: [B, S, H, k]
        scores = F.relu(scores) * self.softmax_scale
        weights = self.weights_proj(hidden_states).float() * self.weights_scaling  # w[t, h]: [B, S, H]
        return (scores * weights.unsqueeze(-1)).sum(dim=2)


class ChunkedIndexer(DeepseekV4Indexer):
    """transformers' Lightning Indexer with the same picks and no [S, T]-sized tensor.

    The compressed index keys K[s] and the queries q[t, h] are computed as transformers does (the cache handled
    the same way, for chunked prefill and decoding); the scores I[t, s] and their top-k run in query chunks
    without gradient (at most ``CHUNK_BYTES`` per [B, chunk, heads, T] block); with gradients enabled the scorer is
    then called once more with the picks (:class:`PickScorer`), so a hook on it sees I[t, s] at the picks with
    gradient (the distillation's only use of the scores). Returns the picks [B, S, k], -1 = not causally visible."""

    def forward(self, hidden_states: torch.Tensor, q_residual: torch.Tensor, position_ids: torch.Tensor,
                cache=None, layer_idx: int | None = None) -> torch.LongTensor:
        batch, seq_len, _ = hidden_states.shape
        keys = self._compressed_keys(hidden_states, cache, layer_idx)  # [B, T, D]
        cos_q, sin_q = self.rotary_emb(hidden_states, position_ids=position_ids, layer_type=self.rope_layer_type)
        q = self.q_b_proj(q_residual).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
        q = apply_rotary_pos_emb(q, cos_q, sin_q).transpose(1, 2)  # [B, S, H, D]
        picks = self._top_k(q, keys, hidden_states, position_ids)
        if torch.is_grad_enabled():
            self.scorer(q, keys, hidden_states, picks=picks)  # for the hooks only: I[t, s] at the picks
        return picks

    def _compressed_keys(self, hidden_states: torch.Tensor, cache, layer_idx: int | None) -> torch.Tensor:
        """K[s]: transformers' DeepseekV4Indexer.forward up to its scorer (overlapping Ca / Cb windows of
        ``compress_rate`` tokens, softmax-gated, RMS-normed, RoPE at the window's position; cache states kept)."""
        batch = hidden_states.shape[0]
        cache_layer = cache.layers[layer_idx] if cache is not None else None
        kv = self.kv_proj(hidden_states)
        gate = self.gate_proj(hidden_states)
        if cache_layer is None:
            usable = (kv.shape[1] // self.compress_rate) * self.compress_rate
            chunk_kv, chunk_gate, first_window_position = kv[:, :usable], gate[:, :usable], 0
        else:
            chunk_kv, chunk_gate, first_window_position = cache_layer.store_compression_weights("indexer", kv, gate)
        if chunk_kv.shape[1] > 0:
            n_windows = chunk_kv.shape[1] // self.compress_rate
            ratio = self.compress_rate
            chunk_kv = chunk_kv.view(batch, n_windows, ratio, -1)
            chunk_gate = chunk_gate.view(batch, n_windows, ratio, -1) + self.position_bias
            new_kv = chunk_kv.new_zeros((batch, n_windows, 2 * ratio, self.head_dim))
            new_gate = chunk_gate.new_full((batch, n_windows, 2 * ratio, self.head_dim), float("-inf"))
            new_kv[:, :, ratio:] = chunk_kv[..., self.head_dim:]
            new_gate[:, :, ratio:] = chunk_gate[..., self.head_dim:]
            if n_windows > 1:
                new_kv[:, 1:, :ratio] = chunk_kv[:, :-1, :, :self.head_dim]
                new_gate[:, 1:, :ratio] = chunk_gate[:, :-1, :, :self.head_dim]
            if cache_layer is not None:
                prior_kv, prior_gate = cache_layer.update_overlap_state("indexer", chunk_kv, chunk_gate, self.head_dim)
                if prior_kv is not None:
                    new_kv[:, 0, :ratio] = prior_kv.to(new_kv.dtype)
                    new_gate[:, 0, :ratio] = prior_gate.to(new_gate.dtype)
            compressed = self.kv_norm(
                (new_kv * new_gate.softmax(dim=2, dtype=torch.float32).to(new_kv.dtype)).sum(dim=2))
            positions = torch.arange(n_windows, device=compressed.device)
            positions = (positions * self.compress_rate + first_window_position).unsqueeze(0).expand(batch, -1)
            cos, sin = self.rotary_emb(compressed, position_ids=positions, layer_type=self.rope_layer_type)
            compressed = apply_rotary_pos_emb(compressed.unsqueeze(1), cos, sin).squeeze(1)
        else:
            compressed = chunk_kv.new_zeros((batch, 0, self.head_dim))
        return compressed if cache_layer is None else cache_layer.update_compressor_states("indexer", compressed)

    @torch.no_grad()
    def _top_k(self, q: torch.Tensor, keys: torch.Tensor, hidden_states: torch.Tensor,
               position_ids: torch.Tensor) -> torch.LongTensor:
        """transformers' selection per query chunk: I[t, s] over every entry (:func:`index_scores`), -inf where
        s >= (t + 1) // m (not yet compressed), top ``index_topk``; picks past that limit become -1."""
        batch, seq_len = q.shape[:2]
        n_entries = keys.shape[1]
        top_k = min(self.index_topk, n_entries)
        picks = torch.full((batch, seq_len, top_k), -1, dtype=torch.long, device=q.device)
        if top_k == 0:
            return picks
        limit = ((position_ids + 1) // self.compress_rate).unsqueeze(-1)  # [B or 1, S, 1]
        entries = torch.arange(n_entries, device=q.device)
        step = query_chunk(seq_len, batch * self.num_heads * n_entries * 4, q.device)
        block = q.new_empty(batch * step * self.num_heads * n_entries, dtype=torch.float32)  # reused per chunk
        for t in range(0, seq_len, step):
            scores = index_scores(self.scorer, q[:, t:t + step], keys, hidden_states[:, t:t + step], block)
            lim = limit[:, t:t + step]
            top = scores.masked_fill_(entries >= lim, float("-inf")).topk(top_k, dim=-1).indices
            picks[:, t:t + step] = torch.where(top >= lim, -1, top)
        return picks


def set_chunked_indexers(model, chunked: bool) -> None:
    """Swap the class of every Lightning Indexer (and its scorer) between transformers' and the chunked one; the
    modules themselves, their weights and any hooks on them stay."""
    for module in model.modules():
        if isinstance(module, DeepseekV4Indexer):
            module.__class__ = ChunkedIndexer if chunked else DeepseekV4Indexer
            module.scorer.__class__ = PickScorer if chunked else DeepseekV4IndexerScorer


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, window_sparse_attention)
    AttentionMaskInterface.register(NAME, empty_mask)


def use_window_attention(model) -> None:
    """Switch ``model`` (a DeepseekV4ForCausalLM) to :func:`window_sparse_attention` and its indexers to
    :class:`ChunkedIndexer`."""
    register()
    model.config._attn_implementation = NAME
    set_chunked_indexers(model, chunked=True)


def use_eager_attention(model) -> None:
    """transformers' own attention and indexers (the numerical reference)."""
    model.config._attn_implementation = "eager"
    set_chunked_indexers(model, chunked=False)


def set_attention(model, name: str) -> None:
    """``name``: ``window`` (this module) or ``eager`` (transformers' dense path)."""
    if name == "window":
        use_window_attention(model)
    elif name == "eager":
        use_eager_attention(model)
    else:
        raise ValueError(f"unknown attention '{name}': window or eager")
