"""Chunked prefill of a DeepSeek-V4 backbone with read-only hooks on its Lightning Indexers.

What the label builder (and tests) need from the frozen backbone, captured without editing transformers:

* per CSA layer, the raw indexer logits ``I[t, s] = sum_h w_h(t) * relu(q_h(t) . k_s)`` (DeepSeek-V4 paper,
  section 2.3.1, eqs. 13-17) of every token over every compressed entry emitted so far, before the causal
  mask (entry s is visible to query t iff ``s < (t + 1) // m``): a forward hook on
  ``layers[i].self_attn.compressor.indexer.scorer``;
* per CSA layer, the native top-k picks (``-1`` marks an invalid pick): a forward hook on ``...indexer``;
* the attention input h_t (after ``input_layernorm``) at the memory-indexer layers: a forward pre-hook on
  ``layers[L].self_attn``;
* at the end, every CSA layer's compressed indexer keys ``K^IComp`` (after RoPE) from the stock cache.

The document is fed in chunks with the stock ``DynamicCache``, so memory stays bounded at any length: the
scorer (and the eager attention) materialise fp32 ``[S, H, T]`` tensors per chunk of S queries over T
entries, so the chunk shrinks as T grows to keep ``S * H * T * 4`` under ``max_score_bytes`` (default
1 GiB; never below 16 tokens).

Hook callbacks receive tensors that are only valid during the call: consume them (reduce them to what you
keep) inside the callback so that no ``[S, T]`` tensor is held for a whole document.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .backbone import cache_kwarg, csa_layers, csa_rate
from .placement import execution_device


@dataclass
class ChunkInfo:
    """The chunk being prefilled: absolute positions ``start .. start + length - 1``."""

    start: int
    length: int

    @property
    def positions(self) -> torch.Tensor:
        return torch.arange(self.start, self.start + self.length)


class IndexerObserver:
    """Receives what :class:`IndexerCapture` sees; override the callbacks you need (all optional)."""

    def on_chunk_start(self, chunk: ChunkInfo) -> None: ...

    def on_logits(self, layer: int, chunk: ChunkInfo, logits: torch.Tensor) -> None:
        """``logits``: [S, T] fp32 raw I[t, s] of the chunk's S queries over the T entries emitted so far."""

    def on_topk(self, layer: int, chunk: ChunkInfo, picks: torch.Tensor) -> None:
        """``picks``: [S, k] int64 native top-k entry indices, ``-1`` where invalid."""

    def on_hidden(self, layer: int, chunk: ChunkInfo, hidden: torch.Tensor) -> None:
        """``hidden``: [S, d] attention input h_t at memory-indexer layer ``layer``."""

    def on_chunk_end(self, chunk: ChunkInfo) -> None: ...


def prefill_chunk_length(config, start: int, chunk_size: int, max_score_bytes: int) -> int:
    """Prefill chunk at ``start``: ``chunk_size``, halved (not below 16) while the fp32 [S, H, T] scores of the
    scorer and the eager attention (H = the larger head count, T = entries + window) exceed the byte budget."""
    heads = max(config.index_n_heads, config.num_attention_heads)
    rate = csa_rate(config)
    length = chunk_size
    while length > 16 and length * heads * ((start + length) // rate + config.sliding_window) * 4 > max_score_bytes:
        length //= 2
    return max(1, min(length, chunk_size))


class IndexerCapture:
    """Prefill one sequence in chunks through the stock model, reporting indexer internals to an observer.

    Usage::

        capture = IndexerCapture(model, memory_layers=[10, 12, 20], chunk_size=512)
        cache = capture.prefill(input_ids, observer)       # input_ids: [N] int64
        keys = capture.indexer_keys(cache, layer=10)        # [N // m, index_head_dim]
    """

    def __init__(
        self,
        model,
        memory_layers: Iterable[int] = (),
        chunk_size: int = 512,
        logits: bool = True,
        topk: bool = True,
        max_score_bytes: int = 1 << 30,
    ):
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        self.model = model
        self.config = model.config
        self.decoder = model.model if hasattr(model, "model") else model
        self.csa_layers = csa_layers(self.config)
        self.memory_layers = list(memory_layers)
        self.chunk_size = int(chunk_size)
        self.want_logits = logits
        self.want_topk = topk
        self.rate = csa_rate(self.config)
        self.max_score_bytes = int(max_score_bytes)

    def chunk_length(self, start: int) -> int:
        """Tokens in the chunk starting at ``start`` (see :func:`prefill_chunk_length`)."""
        return prefill_chunk_length(self.config, start, self.chunk_size, self.max_score_bytes)

    def _register(self, observer: IndexerObserver, chunk_ref: list[ChunkInfo]):
        handles = []
        layers = self.decoder.layers
        for idx in self.csa_layers:
            indexer = layers[idx].self_attn.compressor.indexer
            if self.want_logits:
                def on_scores(module, args, output, idx=idx):
                    observer.on_logits(idx, chunk_ref[0], output[0].detach())

                handles.append(indexer.scorer.register_forward_hook(on_scores))
            if self.want_topk:
                def on_picks(module, args, output, idx=idx):
                    observer.on_topk(idx, chunk_ref[0], output[0].detach())

                handles.append(indexer.register_forward_hook(on_picks))
        for idx in self.memory_layers:
            def on_attention_input(module, args, kwargs, idx=idx):
                hidden = args[0] if args else kwargs["hidden_states"]
                observer.on_hidden(idx, chunk_ref[0], hidden[0].detach())

            handles.append(layers[idx].self_attn.register_forward_pre_hook(on_attention_input, with_kwargs=True))
        return handles

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, observer: IndexerObserver | None = None, progress=None):
        """Run the whole sequence chunk by chunk; returns the stock ``DynamicCache`` holding its state.

        ``progress``: optional callable ``progress(n_tokens_done)`` after each chunk.
        """
        cache, _ = self._run(torch.as_tensor(input_ids, dtype=torch.long).reshape(-1), 0, observer, progress)
        return cache

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, new_tokens: int, observer: IndexerObserver | None = None,
                 progress=None):
        """The backbone's greedy continuation of ``prompt_ids`` with the hooks on throughout: the prompt in chunks,
        then ``new_tokens`` tokens one decode step each (end-of-sequence tokens included), the last one fed too, so
        the observer sees every position of prompt + continuation once. Returns ``(cache, generated ids)``.
        Labelling a continuation this way costs one prefill of the prompt, not two (decode, then teacher-force)."""
        prompt = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1)
        if new_tokens < 1 or prompt.numel() < 1:
            raise ValueError("generate needs a non-empty prompt and new_tokens >= 1")
        return self._run(prompt, new_tokens, observer, progress)

    def _run(self, prompt: torch.Tensor, new_tokens: int, observer, progress):
        """Prefill ``prompt`` in chunks, then (``new_tokens`` > 0) greedy decode steps through the same cache, the
        observer told of every chunk (a decode step is a chunk of one token). Returns (cache, generated ids)."""
        from transformers import DynamicCache

        observer = observer or IndexerObserver()
        device = execution_device(self.decoder.embed_tokens)  # a device map's first GPU, offloaded or not
        cache = DynamicCache(config=self.config)
        chunk_ref = [ChunkInfo(0, 0)]
        handles = self._register(observer, chunk_ref)
        kw = cache_kwarg()
        # the decode steps need the next-token logits: the causal LM (its head on the last position only)
        lm = self.model if new_tokens and self.model is not self.decoder else None
        if new_tokens and lm is None:
            raise ValueError("generate needs the causal LM (a model with lm_head), not its decoder")
        generated: list[int] = []

        def forward(ids: torch.Tensor, start: int, want_logits: bool):
            chunk = ChunkInfo(start, ids.numel())
            chunk_ref[0] = chunk
            observer.on_chunk_start(chunk)
            position_ids = torch.arange(start, start + ids.numel(), device=device).unsqueeze(0)
            args = dict(input_ids=ids.to(device).unsqueeze(0), position_ids=position_ids, use_cache=True,
                        **{kw: cache})
            out = lm(**args, logits_to_keep=1) if want_logits else self.decoder(**args)
            observer.on_chunk_end(chunk)
            if progress is not None:
                progress(start + ids.numel())
            return int(out.logits[0, -1].argmax()) if want_logits else None

        try:
            total, start = prompt.numel(), 0
            while start < total:
                n = self.chunk_length(start)
                last = start + n >= total
                token = forward(prompt[start : start + n], start, want_logits=last and new_tokens > 0)
                start += min(n, total - start)
            for i in range(new_tokens):
                generated.append(token)
                token = forward(torch.tensor([token]), start, want_logits=i + 1 < new_tokens)
                start += 1
        finally:
            for handle in handles:
                handle.remove()
        return cache, generated

    def indexer_keys(self, cache, layer: int) -> torch.Tensor:
        """The compressed indexer keys K^IComp of CSA layer ``layer``: [n_entries, index_head_dim]."""
        keys = cache.layers[layer].compressed_kv["indexer"]
        if keys is None:
            return torch.zeros(0, self.config.index_head_dim)
        return keys[0]


def collect_logits(model, input_ids, chunk_size: int) -> dict[int, torch.Tensor]:
    """Small-input helper (tests, debugging): the full [N, T] raw logits of every CSA layer, causal-masked
    with ``-inf`` where ``s >= (t + 1) // m``. Holds everything in memory: not for long documents."""

    class Collector(IndexerObserver):
        def __init__(self):
            self.parts: dict[int, list[tuple[ChunkInfo, torch.Tensor]]] = {}

        def on_logits(self, layer, chunk, logits):
            self.parts.setdefault(layer, []).append((chunk, logits.clone()))

    collector = Collector()
    capture = IndexerCapture(model, chunk_size=chunk_size, topk=False)
    n = int(torch.as_tensor(input_ids).numel())
    capture.prefill(input_ids, collector)
    t_total = n // capture.rate
    out = {}
    for layer, parts in collector.parts.items():
        full = torch.full((n, t_total), float("-inf"))
        for chunk, logits in parts:
            full[chunk.start : chunk.start + chunk.length, : logits.shape[-1]] = logits.float().cpu()
        visible = (torch.arange(n) + 1) // capture.rate
        full[torch.arange(t_total).unsqueeze(0) >= visible.unsqueeze(1)] = float("-inf")
        out[layer] = full
    return out

