"""Lightning-Indexer distillation by forward hooks (DeepSeek-V3.2 / V4 indexer training, no forked model).

For every CSA layer, the indexer is trained towards the main attention: the target of query t is the main
attention's probability mass on each compressed entry, summed over heads and renormalised over the entries the
query attended (``p[t, s]``, detached); the indexer's distribution is the softmax of its raw logits I[t, s]
over the same entries; the loss is KL(p || softmax(I)) averaged over queries that see at least one entry.
During the dense warm-up ``index_topk`` covers every entry, so the set is all causally visible entries
(s < (t+1)//m); in the sparse phase it is the native top-k selection. The indexer's inputs (attention input
x_t and the shared low-rank query) are detached, so the indexer learns only from this loss and the language
model only from its own (the native top-k is not differentiable).

Hooks: a forward pre-hook on ``self_attn.compressor.indexer`` (detach inputs), a forward hook on it (the
top-k picks, -1 = invalid), on ``...indexer.scorer`` (raw logits [B, S, T] with grad) and on ``self_attn``
(``DeepseekV4Attention.forward`` returns ``(output, attn_weights)``; the compressed entries are the last T
columns of attn_weights [B, H, S, S + T]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class IndexerDistillation:
    """Collects KL(main attention || Lightning Indexer) per CSA layer during a forward pass."""

    def __init__(self, model, csa_layers: list[int], detach_inputs: bool = True):
        self.csa_layers = list(csa_layers)
        self.enabled = True
        self.losses: dict[int, torch.Tensor] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self._picks: dict[int, torch.Tensor] = {}
        self._handles = []
        for i in self.csa_layers:
            attn = model.model.layers[i].self_attn
            indexer = attn.compressor.indexer
            if detach_inputs:
                self._handles.append(indexer.register_forward_pre_hook(_detach_tensor_args, with_kwargs=True))
            self._handles.append(indexer.register_forward_hook(self._keep_picks(i)))
            self._handles.append(indexer.scorer.register_forward_hook(self._keep_logits(i)))
            self._handles.append(attn.register_forward_hook(self._distill(i)))

    def set_topk(self, model, topk: int) -> None:
        for i in self.csa_layers:
            model.model.layers[i].self_attn.compressor.indexer.index_topk = topk

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def pop_loss(self) -> tuple[torch.Tensor | None, dict[int, float]]:
        """Mean KL over the CSA layers of the last forward pass, and the per-layer values."""
        if not self.losses:
            return None, {}
        per_layer = {i: float(v.detach()) for i, v in self.losses.items()}
        total = torch.stack(list(self.losses.values())).mean()
        self.losses = {}
        return total, per_layer

    def _keep_logits(self, i):
        def hook(module, args, output):
            if self.enabled:
                self._logits[i] = output  # [B, S, T] fp32, with grad
        return hook

    def _keep_picks(self, i):
        def hook(module, args, output):
            if self.enabled:
                self._picks[i] = output  # [B, S, k], -1 = invalid
        return hook

    def _distill(self, i):
        def hook(module, args, output):
            if not self.enabled or i not in self._logits:
                return
            logits, picks = self._logits.pop(i), self._picks.pop(i)
            attn_weights = output[1]  # [B, H, S, S_kv + T]
            self.losses[i] = indexer_kl(logits, picks, attn_weights)
        return hook


def _detach_tensor_args(module, args, kwargs):
    args = tuple(a.detach() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    kwargs = {k: (v.detach() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kwargs.items()}
    return args, kwargs


def selected_mask(picks: torch.Tensor, n_entries: int) -> torch.Tensor:
    """[B, S, k] top-k picks (-1 = none) -> [B, S, T] boolean mask of selected entries."""
    safe = torch.where(picks >= 0, picks, torch.full_like(picks, n_entries))
    mask = torch.zeros(*picks.shape[:-1], n_entries + 1, dtype=torch.bool, device=picks.device)
    mask.scatter_(-1, safe, True)
    return mask[..., :n_entries]


def indexer_kl(logits: torch.Tensor, picks: torch.Tensor, attn_weights: torch.Tensor) -> torch.Tensor:
    """KL(p || softmax(I)) over the selected entries, p = head-summed attention mass renormalised (detached).

    logits: raw indexer scores I[t, s] [B, S, T]; picks: native top-k [B, S, k]; attn_weights: main attention
    probabilities [B, H, S, S_kv + T] whose last T columns are the compressed entries.
    """
    n_entries = logits.shape[-1]
    if n_entries == 0:
        return logits.sum() * 0.0
    mask = selected_mask(picks, n_entries)  # [B, S, T]
    with torch.no_grad():
        mass = attn_weights[..., -n_entries:].float().sum(dim=1) * mask  # [B, S, T]
        total = mass.sum(-1, keepdim=True)
        rows = (total.squeeze(-1) > 0) & mask.any(-1)  # [B, S]
        target = mass / total.clamp_min(1e-30)
        log_target = torch.where(target > 0, target.clamp_min(1e-30).log(), torch.zeros_like(target))
    # A large finite fill (not -inf) keeps rows with no selected entry finite in the backward pass.
    log_q = F.log_softmax(logits.float().masked_fill(~mask, -1e9), dim=-1)
    kl = torch.where(target > 0, target * (log_target - log_q), torch.zeros_like(log_q)).sum(-1)  # [B, S]
    return (kl * rows).sum() / rows.sum().clamp_min(1)
