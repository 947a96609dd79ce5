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
top-k picks, -1 = invalid), on ``...indexer.scorer`` (raw logits with grad) and on ``self_attn``
(``DeepseekV4Attention.forward`` returns ``(output, attn_weights)``; the compressed entries are the last T
columns of attn_weights: [B, H, S, S + T] from the eager attention, [B, 1, S, T] head-summed from
``attention.py``). The scorer's logits come in one of two forms: transformers' indexer scores every entry,
I[t, s] as [B, S, T]; ``attention.py``'s ``ChunkedIndexer`` (installed with the window attention) calls its
scorer with ``picks=`` and gets I[t, s] only at the picks, [B, S, k]. The KL is a softmax over the picks, so it
needs nothing else, and no [S, S/4] tensor per CSA layer is kept until :meth:`pop_loss` (at 64K tokens that was
4 GiB of fp32 logits per layer, plus their [S, S/4] gradients during the backward pass).

Activation checkpointing: a checkpointed decoder layer runs its forward again during the backward pass, and
these hooks fire again there. Only hook calls made while the model's own forward runs are collected (a
pre-hook and a hook on ``model.model`` open and close that span); the hooks keep just a reference to the
scorer's logits and compute the (detached) target without autograd, and the KL itself is computed in
:meth:`pop_loss`, outside the checkpointed region. So each layer's loss is collected once per forward, and the
replay saves exactly the tensors the first pass saved: loss and gradients equal those without checkpointing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class IndexerDistillation:
    """Collects KL(main attention || Lightning Indexer) per CSA layer during a forward pass."""

    def __init__(self, model, csa_layers: list[int], detach_inputs: bool = True):
        self.csa_layers = list(csa_layers)
        self.enabled = True
        self._in_forward = False
        self._entries: dict[int, tuple] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self._picks: dict[int, torch.Tensor] = {}
        self._handles = [model.model.register_forward_pre_hook(self._begin),
                         model.model.register_forward_hook(self._end)]
        for i in self.csa_layers:
            attn = model.model.layers[i].self_attn
            indexer = attn.compressor.indexer
            if detach_inputs:  # also during a checkpoint replay, so the replay builds the same graph
                self._handles.append(indexer.register_forward_pre_hook(_detach_tensor_args, with_kwargs=True))
            self._handles.append(indexer.register_forward_hook(self._keep_picks(i)))
            self._handles.append(indexer.scorer.register_forward_hook(self._keep_logits(i), with_kwargs=True))
            self._handles.append(attn.register_forward_hook(self._distill(i)))

    @property
    def losses(self) -> dict[int, tuple]:
        return self._entries

    @losses.setter
    def losses(self, value) -> None:  # ``distill.losses = {}`` drops what a failed forward left
        self._entries = dict(value)

    def set_topk(self, model, topk: int) -> None:
        for i in self.csa_layers:
            model.model.layers[i].self_attn.compressor.indexer.index_topk = topk

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def pop_loss(self) -> tuple[torch.Tensor | None, dict[int, float]]:
        """Mean KL over the CSA layers of the last forward pass, and the per-layer values."""
        if not self._entries:
            return None, {}
        losses = {i: kl_at_picks(*entry) for i, entry in self._entries.items()}
        self._entries = {}
        return torch.stack(list(losses.values())).mean(), {i: float(v.detach()) for i, v in losses.items()}

    def _collecting(self) -> bool:
        return self.enabled and self._in_forward

    def _begin(self, module, args):
        self._in_forward = True
        self._entries, self._logits, self._picks = {}, {}, {}

    def _end(self, module, args, output):
        self._in_forward = False
        self._logits, self._picks = {}, {}

    def _keep_logits(self, i):
        def hook(module, args, kwargs, output):
            if self._collecting():
                # (logits with grad, whether they are at the picks [B, S, k] rather than [B, S, T], T)
                compressed_kv = args[1] if len(args) > 1 else kwargs["compressed_kv"]
                self._logits[i] = (output, kwargs.get("picks") is not None, compressed_kv.shape[-2])
        return hook

    def _keep_picks(self, i):
        def hook(module, args, output):
            if self._collecting():
                self._picks[i] = output  # [B, S, k], -1 = invalid
        return hook

    def _distill(self, i):
        def hook(module, args, output):
            if not self._collecting() or i not in self._logits or output[1] is None:
                return  # (attention.py returns no weights without autograd: nothing to train then)
            (logits, at_picks, n_entries), picks = self._logits.pop(i), self._picks.pop(i)
            index, valid, target, rows = kl_target(picks, output[1], n_entries)
            self._entries[i] = (logits, None if at_picks else index, valid, target, rows)
        return hook


def _detach_tensor_args(module, args, kwargs):
    args = tuple(a.detach() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    kwargs = {k: (v.detach() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kwargs.items()}
    return args, kwargs


@torch.no_grad()
def kl_target(picks: torch.Tensor, attn_weights: torch.Tensor, n_entries: int):
    """The detached target at the picks: (index [B, S, k], valid [B, S, k], p [B, S, k], rows [B, S]).

    ``attn_weights``: main attention probabilities whose last ``n_entries`` columns are the compressed entries,
    [B, H, S, S_kv + T] (eager) or head-summed [B, 1, S, T]; ``picks``: native top-k [B, S, k], -1 = none."""
    valid = picks >= 0
    index = torch.where(valid, picks, torch.zeros_like(picks))
    if n_entries == 0 or picks.shape[-1] == 0:
        return index, valid, torch.zeros(picks.shape, device=picks.device), valid.any(-1)
    mass = attn_weights[..., -n_entries:]
    # head-summed already (attention.py): no [B, S, T] copy, the gather reads it in place
    mass = mass[:, 0] if mass.shape[1] == 1 else mass.float().sum(dim=1)  # [B, S, T]
    mass = mass.gather(-1, index).float() * valid
    total = mass.sum(-1, keepdim=True)
    rows = (total.squeeze(-1) > 0) & valid.any(-1)
    return index, valid, mass / total.clamp_min(1e-30), rows


def kl_at_picks(logits: torch.Tensor, index: torch.Tensor | None, valid: torch.Tensor, target: torch.Tensor,
                rows: torch.Tensor) -> torch.Tensor:
    """KL(p || softmax(I over the picks)) averaged over ``rows``; differentiable in ``logits``: I[t, s] over every
    entry [B, S, T], read at ``index`` [B, S, k], or (``index`` None) already at the picks [B, S, k]."""
    if logits.shape[-1] == 0 or valid.shape[-1] == 0:
        return logits.sum() * 0.0
    at_picks = logits.float() if index is None else logits.float().gather(-1, index)  # I[t, s] of the picks
    # A large finite fill (not -inf) keeps rows with no selected entry finite in the backward pass.
    log_q = F.log_softmax(at_picks.masked_fill(~valid, -1e9), dim=-1)
    log_target = torch.where(target > 0, target.clamp_min(1e-30).log(), torch.zeros_like(target))
    kl = torch.where(target > 0, target * (log_target - log_q), torch.zeros_like(log_q)).sum(-1)  # [B, S]
    return (kl * rows).sum() / rows.sum().clamp_min(1)


def indexer_kl(logits: torch.Tensor, picks: torch.Tensor, attn_weights: torch.Tensor) -> torch.Tensor:
    """KL(p || softmax(I)) over the selected entries, p = head-summed attention mass renormalised (detached).

    logits: raw indexer scores I[t, s] [B, S, T]; picks: native top-k [B, S, k] (distinct entries, -1 = none);
    attn_weights: main attention probabilities whose last T columns are the compressed entries.
    """
    return kl_at_picks(logits, *kl_target(picks, attn_weights, logits.shape[-1]))
