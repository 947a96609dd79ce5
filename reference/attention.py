"""Exact DeepSeek-V4 attention without the dense score matrix, for training and evaluating at 16K-64K tokens.

transformers' eager DeepSeek-V4 attention scores every query against every raw token and every compressed entry
([B, heads, S, S + T] in fp32) and then masks all but the sliding window (the last ``w`` raw tokens) and the
compressed entries the block bias leaves open (CSA: the indexer's top-k; HCA: the causally visible ones). This
module computes the same softmax over exactly those keys, plus the per-head sink:

* raw tokens: queries in blocks of ``w`` against the ``2w`` raw keys that cover their windows;
* compressed entries: read from the block bias (0 = attended, -inf = not). When each query attends at most a
  quarter of the entries (CSA top-k at long lengths) they are gathered per query; otherwise (HCA, or a dense
  warm-up top-k) the bias is added to a dense [B, heads, S, T] score block, T = S / rate.

Memory and work grow as S x (2w + k + T_hca) instead of S x (S + T). The result equals the eager path to fp32
round-off (``tests/test_reference_model.py`` checks logits, gradients and chunked prefill).

Use: ``use_window_attention(model)`` registers the attention function and its mask function under ``NAME`` and
switches the model's config to it; ``use_eager_attention(model)`` switches back. The mask function returns an
empty [B, 1, S, 0] mask: the stock attention then appends the compressor's block bias to it, so this function
receives exactly that bias (CSA / HCA layers) or zeros (sliding layers, or a compressor layer with no entry yet),
and never the dense sliding-window mask. Padding masks are not supported (the reference programs never pad).

The returned attention weights are not the eager [B, heads, S, S + T] probabilities: when gradients are enabled
(training, where the Lightning-Indexer distillation reads them) they are the probability mass on each compressed
entry summed over heads, [B, 1, S, T] fp32, detached; otherwise None. ``distillation.py`` reads either form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "fm_window_sparse"


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
        cbias = bias[..., -n_comp:]
        open_ = torch.isfinite(cbias)  # [B, S, T]
        n_sel = int(open_.sum(-1).max()) if seq else 0
        if n_sel and 4 * n_sel < n_comp:
            top = torch.topk(cbias.float(), n_sel, dim=-1)
            idx, sel_open = top.indices, torch.isfinite(top.values)  # [B, S, k]
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
    p_w = probs[..., :2 * window].to(kv.dtype).view(batch, heads, n_blocks, window, 2 * window)
    out = torch.matmul(p_w, blocks.transpose(-1, -2).unsqueeze(1)).view(batch, heads, padded, dim)
    mass = None
    if n_sel:
        p_c = probs[..., 2 * window:2 * window + n_sel]
        if gathered is not None:
            gathered_p = F.pad(gathered, (0, 0, 0, 0, 0, padded - seq))  # rows of the padded queries
            out = out + torch.einsum("bhsk,bskd->bhsd", p_c.to(kv.dtype), gathered_p)
        else:
            out = out + torch.matmul(p_c.to(kv.dtype), comp.unsqueeze(1))
        if torch.is_grad_enabled():
            with torch.no_grad():
                summed = p_c[:, :, :seq].sum(1)  # [B, S, k or T]
                if gathered is not None:
                    dense = summed.new_zeros(batch, seq, n_comp + 1)
                    dense.scatter_(-1, torch.where(sel_open, idx, n_comp), summed)
                    summed = dense[..., :n_comp]
                mass = summed.unsqueeze(1)
    elif n_comp and torch.is_grad_enabled():
        mass = query.new_zeros(batch, 1, seq, n_comp, dtype=torch.float32)
    out = out[:, :, :seq].to(query.dtype)
    return out.transpose(1, 2).contiguous(), mass


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, window_sparse_attention)
    AttentionMaskInterface.register(NAME, empty_mask)


def use_window_attention(model) -> None:
    """Switch ``model`` (a DeepseekV4ForCausalLM) to :func:`window_sparse_attention`."""
    register()
    model.config._attn_implementation = NAME


def use_eager_attention(model) -> None:
    model.config._attn_implementation = "eager"


def set_attention(model, name: str) -> None:
    """``name``: ``window`` (this module) or ``eager`` (transformers' dense path)."""
    if name == "window":
        use_window_attention(model)
    elif name == "eager":
        use_eager_attention(model)
    else:
        raise ValueError(f"unknown attention '{name}': window or eager")
