"""One decode step for B sequences at once, each with its own cache (continuous batching's forward).

The sequences of a batch sit at different positions and own different decoding state: sliding windows, the
compressors' partial windows (an entry is emitted every ``compress_rate`` tokens of *that* sequence), the cold
pool, the resident set. transformers' cache keeps one position counter for the whole batch, so sequences of
different lengths cannot share one cache. The split here: every stateless computation of the decoder (embedding,
mHC hyper-connections, norms, MoE, the head, and inside attention the projections, RoPE, the attention itself and
the output projection) runs once on the ``[B, 1]`` batch; only what reads or writes a sequence's state (its window
update and its compressor with the Lightning Indexer) runs once per sequence with that sequence's cache
(:class:`RowDispatchAttention`). Each sequence thus sees exactly the keys and mask it would see decoding alone;
what may differ is rounding (a ``[B, d]`` product may pick another kernel than ``[1, d]``; padded keys add exact
zeros), which is why tests compare greedy tokens and logits within a tolerance.

``forward_rows`` is used by :class:`~.session.Session` whenever more than one sequence is decoding, and by
``bench/bench_batch.py``.
"""

from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backbone import cache_kwarg


@dataclass
class RowCaches:
    """The per-sequence caches and attention masks of one batched decode step, in batch-row order.

    Passed to the model as its cache: :class:`RowDispatchAttention` hands each row its own; nothing else in the
    decoder reads the cache."""

    caches: list
    masks: list


def _attention_class():
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as v4

    class RowDispatchAttention(v4.DeepseekV4Attention):
        """DeepSeek-V4 attention for a batch of sequences with a cache each (:class:`RowCaches`); with any other
        cache it is the stock forward.

        The stock forward's steps, in its order: the projections, norms and RoPE of q and of the shared K=V run on
        the ``[B, 1]`` batch (one kernel each for all sequences); the sliding-window update and the compressor
        (CSA: compression, Lightning Indexer and its top-k; HCA: compression) run per sequence with its cache, as
        those are its state; the window and compressed keys of the sequences, padded to the longest with -inf in
        the mask, go through the model's attention function (sinks included) at once; the RoPE undo and the grouped
        output projection run batched again. Each sequence sees the keys and mask it sees alone; padding adds
        exact zeros to its sums."""

        def forward(self, hidden_states, **kwargs):
            name = "cache" if "cache" in kwargs else "past_key_values"
            rows = kwargs.get(name)
            if not isinstance(rows, RowCaches):
                return super().forward(hidden_states, **kwargs)
            embeddings, position_ids = kwargs["position_embeddings"], kwargs["position_ids"]
            cos, sin = embeddings[self.rope_layer_type] if isinstance(embeddings, dict) else embeddings
            input_shape = hidden_states.shape[:-1]  # [B, 1]
            hidden_shape = (*input_shape, -1, self.head_dim)
            q_residual = self.q_a_norm(self.q_a_proj(hidden_states))
            q = self.q_b_norm(self.q_b_proj(q_residual).view(*hidden_shape).transpose(1, 2))
            q = v4.apply_rotary_pos_emb(q, cos, sin)  # [B, H, 1, D]
            kv = self.kv_norm(self.kv_proj(hidden_states)).view(*hidden_shape).transpose(1, 2)
            kv = v4.apply_rotary_pos_emb(kv, cos, sin)  # [B, 1, 1, D]

            keys, masks = [], []
            for r, (cache, mask) in enumerate(zip(rows.caches, rows.masks)):
                row_kv = cache.update(kv[r:r + 1], kv[r:r + 1], self.layer_idx)[0]  # this sequence's window
                block_bias = None
                if self.compressor is not None:
                    compressed, block_bias = self.compressor(hidden_states[r:r + 1], q_residual[r:r + 1],
                                                             position_ids[r:r + 1], cache, self.layer_idx)
                    row_kv = torch.cat([row_kv, compressed], dim=2)
                if isinstance(mask, torch.Tensor):
                    mask = mask.to(hidden_states.device)
                    if row_kv.shape[2] > mask.shape[-1]:  # as the stock forward extends it
                        mask = torch.cat([mask, block_bias.to(mask.dtype)], dim=-1) if block_bias is not None \
                            else F.pad(mask, (0, row_kv.shape[2] - mask.shape[-1]), value=0.0)
                keys.append(row_kv)
                masks.append(mask)
            length = max(k.shape[2] for k in keys)
            dtype = next((m.dtype for m in masks if isinstance(m, torch.Tensor)), hidden_states.dtype)
            key_states = kv.new_zeros(len(keys), 1, length, self.head_dim)  # [B, 1, L, D]
            mask = torch.full((len(keys), 1, 1, length), float("-inf"), dtype=dtype, device=kv.device)
            for r, (row_kv, row_mask) in enumerate(zip(keys, masks)):
                n = row_kv.shape[2]
                key_states[r, :, :n] = row_kv[0]
                # a sequence without a tensor mask sees all its keys (the stock forward then adds no bias either)
                mask[r, :, :, :n] = row_mask[0, :, -1:, -n:] if isinstance(row_mask, torch.Tensor) else 0.0

            interface = v4.eager_attention_forward if self.config._attn_implementation == "eager" else \
                v4.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, v4.eager_attention_forward)
            out, _ = interface(self, q, key_states, key_states, mask, dropout=0.0, scaling=self.scaling,
                               sliding_window=self.sliding_window, s_aux=self.sinks)
            out = v4.apply_rotary_pos_emb(out.transpose(1, 2), cos, -sin).transpose(1, 2)
            grouped = self.o_a_proj(out.reshape(*input_shape, self.config.o_groups, -1)).flatten(2)
            return self.o_b_proj(grouped), None  # [B, 1, hidden]

    return RowDispatchAttention


_ROW_ATTENTION = None


def install_row_attention(model) -> None:
    """Make every attention block of ``model`` a :class:`RowDispatchAttention` (a subclass swap, as
    ``install_lsa_compressors`` does for the compressors; idempotent; unchanged behaviour for other caches)."""
    global _ROW_ATTENTION
    if _ROW_ATTENTION is None:
        _ROW_ATTENTION = _attention_class()
    decoder = model.model if hasattr(model, "model") else model
    for layer in decoder.layers:
        attention = layer.self_attn
        if type(attention) is not _ROW_ATTENTION:
            attention.__class__ = _ROW_ATTENTION
            if hasattr(attention, "_old_forward"):  # accelerate's hook (offload) calls the forward bound before
                attention._old_forward = types.MethodType(_ROW_ATTENTION.forward, attention)


@functools.cache
def _mask_cache_name() -> str:
    from transformers.masking_utils import create_sliding_window_causal_mask

    return "cache" if "cache" in inspect.signature(create_sliding_window_causal_mask).parameters else "past_key_values"


def row_mask(model, cache, position: int, device: torch.device, embeds: torch.Tensor | None = None):
    """The attention mask DeepseekV4Model.forward builds for one sequence decoding one token at ``position`` with
    ``cache`` (the same helper and arguments, so the row sees what it would see alone). ``embeds``: a ``[1, 1,
    hidden]`` tensor of the embeddings' dtype (only its shape, dtype and device are read)."""
    from transformers.masking_utils import create_sliding_window_causal_mask

    config = model.config
    if embeds is None:
        dtype = (model.model if hasattr(model, "model") else model).embed_tokens.weight.dtype
        embeds = torch.zeros(1, 1, config.hidden_size, dtype=dtype, device=device)
    positions = torch.tensor([[position]], device=device)
    return create_sliding_window_causal_mask(config=config, inputs_embeds=embeds, attention_mask=None,
                                             position_ids=positions, **{_mask_cache_name(): cache})


def forward_rows(model, caches: list, tokens: list[int], positions: list[int], device: torch.device) -> torch.Tensor:
    """Run one token per sequence (row r: ``tokens[r]`` at ``positions[r]`` with ``caches[r]``) through ``model``
    in one batched forward; returns the logits ``[B, vocab]``. :func:`install_row_attention` must have run."""
    dtype = (model.model if hasattr(model, "model") else model).embed_tokens.weight.dtype
    embeds = torch.zeros(1, 1, model.config.hidden_size, dtype=dtype, device=device)  # read for shape/dtype only
    masks = [row_mask(model, cache, position, device, embeds) for cache, position in zip(caches, positions)]
    ids = torch.tensor(tokens, dtype=torch.long, device=device).unsqueeze(1)  # [B, 1]
    position_ids = torch.tensor(positions, dtype=torch.long, device=device).unsqueeze(1)  # [B, 1]
    # a dict mask is taken as prebuilt by the model (no mask of its own for a cache it cannot read); each row's
    # real mask travels in RowCaches
    out = model(input_ids=ids, position_ids=position_ids, attention_mask={"sliding_attention": None}, use_cache=True,
                logits_to_keep=1, **{cache_kwarg(): RowCaches(list(caches), masks)})
    return out.logits[:, -1]
