"""One decode step for B sequences at once, each with its own cache (continuous batching's forward).

The sequences of a batch sit at different positions and own different decoding state: sliding windows, the
compressors' partial windows (an entry is emitted every ``compress_rate`` tokens of *that* sequence), the cold
pool, the resident set. transformers' cache keeps one position counter for the whole batch, so sequences of
different lengths cannot share one cache. The split here: every stateless module of the decoder (embedding, mHC
hyper-connections, norms, MoE, the head) runs once on the ``[B, 1]`` batch, which is where a decode step reads its
weights; the attention block, the only part that reads or writes per-sequence state, runs its stock forward once
per sequence with that sequence's cache, position and mask (:class:`RowDispatchAttention`). Each sequence thus
sees exactly the attention it would see decoding alone; what may differ is the rounding of the batched matmuls
(a ``[B, d]`` product may pick another kernel than ``[1, d]``), which is why tests compare greedy tokens.

``forward_rows`` is used by :class:`~.session.Session` whenever more than one sequence is decoding, and by
``bench/bench_batch.py``.
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass

import torch

from .backbone import cache_kwarg


@dataclass
class RowCaches:
    """The per-sequence caches and attention masks of one batched decode step, in batch-row order.

    Passed to the model as its cache: :class:`RowDispatchAttention` hands each row its own; nothing else in the
    decoder reads the cache."""

    caches: list
    masks: list


def _attention_class():
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Attention

    class RowDispatchAttention(DeepseekV4Attention):
        """DeepSeek-V4 attention that, given :class:`RowCaches`, runs the stock forward once per batch row with that
        row's cache, position, RoPE and mask, and concatenates the outputs ``[B, 1, hidden]``; with any other cache
        it is the stock forward."""

        def forward(self, hidden_states, **kwargs):
            name = "cache" if "cache" in kwargs else "past_key_values"
            rows = kwargs.get(name)
            if not isinstance(rows, RowCaches):
                return super().forward(hidden_states, **kwargs)
            embeddings, position_ids = kwargs["position_embeddings"], kwargs["position_ids"]
            outputs = []
            for r, (cache, mask) in enumerate(zip(rows.caches, rows.masks)):
                row = dict(kwargs)
                row[name], row["attention_mask"], row["position_ids"] = cache, mask, position_ids[r:r + 1]
                row["position_embeddings"] = (
                    {kind: (cos[r:r + 1], sin[r:r + 1]) for kind, (cos, sin) in embeddings.items()}
                    if isinstance(embeddings, dict) else tuple(part[r:r + 1] for part in embeddings))
                outputs.append(super().forward(hidden_states[r:r + 1], **row)[0])
            return torch.cat(outputs, dim=0), None  # [B, 1, hidden]

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


def _mask_cache_name() -> str:
    from transformers.masking_utils import create_sliding_window_causal_mask

    return "cache" if "cache" in inspect.signature(create_sliding_window_causal_mask).parameters else "past_key_values"


def row_mask(model, cache, position: int, device: torch.device):
    """The attention mask DeepseekV4Model.forward builds for one sequence decoding one token at ``position`` with
    ``cache`` (the same helper and arguments, so the row sees what it would see alone)."""
    from transformers.masking_utils import create_sliding_window_causal_mask

    config = model.config
    dtype = (model.model if hasattr(model, "model") else model).embed_tokens.weight.dtype
    embeds = torch.zeros(1, 1, config.hidden_size, dtype=dtype, device=device)
    positions = torch.tensor([[position]], device=device)
    return create_sliding_window_causal_mask(config=config, inputs_embeds=embeds, attention_mask=None,
                                             position_ids=positions, **{_mask_cache_name(): cache})


def forward_rows(model, caches: list, tokens: list[int], positions: list[int], device: torch.device) -> torch.Tensor:
    """Run one token per sequence (row r: ``tokens[r]`` at ``positions[r]`` with ``caches[r]``) through ``model``
    in one batched forward; returns the logits ``[B, vocab]``. :func:`install_row_attention` must have run."""
    masks = [row_mask(model, cache, position, device) for cache, position in zip(caches, positions)]
    ids = torch.tensor(tokens, dtype=torch.long, device=device).unsqueeze(1)  # [B, 1]
    position_ids = torch.tensor(positions, dtype=torch.long, device=device).unsqueeze(1)  # [B, 1]
    # a dict mask is taken as prebuilt by the model (no mask of its own for a cache it cannot read); each row's
    # real mask travels in RowCaches
    out = model(input_ids=ids, position_ids=position_ids, attention_mask={"sliding_attention": None}, use_cache=True,
                logits_to_keep=1, **{cache_kwarg(): RowCaches(list(caches), masks)})
    return out.logits[:, -1]
