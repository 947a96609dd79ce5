"""Multi-hot retrieval loss of the memory indexer: BCE or focal loss over ALL entries visible at each trigger.

For a row (trigger t0, layer L) with n = n_visible(t0) entries, logits x_s = sigmoid^-1 I[t0, s] for s < n
(the gated score against the frozen keys of the row's document) and targets y_s = 1 iff s is golden
(``positives``):

    BCE:    l_s = -[y_s log p_s + (1 - y_s) log(1 - p_s)],                   p_s = sigmoid(x_s)
    focal:  l_s = -alpha_t (1 - p_t)^gamma log p_t,  p_t = p_s if y_s else 1 - p_s,
            alpha_t = alpha if y_s else 1 - alpha   (alpha < 0: no class weighting; Lin et al. 2017)

    row loss   = (1 / n) sum_{s < n} l_s          batch loss = mean over rows

Rows of one document and layer share the document's keys (one group from the key side); the gated score is
computed ``chunk_size`` entries at a time, so no [R, H, n] tensor is ever whole, even at 100K+ entries. On a GPU
the loss of a group is computed inside the gated-score forward kernel (:mod:`lsa_runtime.kernels.gated_loss`:
it writes dl/dz instead of z, so the [R, n] logits never go through a dozen torch element-wise kernels).
"""

from __future__ import annotations

import torch
from torch import nn

from lsa_runtime.kernels.gated_loss import entry_loss, fused_gated_loss, fused_loss_available

from .dual_encoder import key_side, query_tower


def elementwise_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str = "focal", gamma: float = 2.0,
                     alpha: float = 0.5) -> torch.Tensor:
    """Per-entry BCE or focal loss from logits (fp32, numerically stable through log-sigmoid); the formula lives
    beside the Triton kernel that also implements it (``lsa_runtime.kernels.gated_loss.entry_loss``)."""
    return entry_loss(logits.float(), targets.float(), kind, gamma, alpha)


def multi_hot(positives: torch.Tensor, n_entries: int) -> torch.Tensor:
    """positives [R, P] (-1 = padding) -> float targets [R, n_entries]."""
    target = torch.zeros(positives.shape[0], n_entries + 1, device=positives.device)
    index = torch.where((positives >= 0) & (positives < n_entries), positives, torch.full_like(positives, n_entries))
    target.scatter_(1, index, 1.0)
    return target[:, :n_entries]


class MemoryIndexerLoss(nn.Module):
    """``loss(sentence_features, labels)`` for ``SentenceTransformerTrainer``: focal (default) or BCE.

    ``sentence_features``: [query features, document features] as built by
    :class:`~indexer_train.collator.LabelRowCollator`; ``labels``: padded positives [B, P].
    """

    def __init__(self, model, loss: str = "focal", gamma: float = 2.0, alpha: float = 0.5, chunk_size: int = 8192,
                 fused: bool | None = None):
        super().__init__()
        if loss not in ("focal", "bce"):
            raise ValueError(f"unknown loss '{loss}' (use focal or bce)")
        self.model = model
        self.kind, self.gamma, self.alpha, self.chunk_size = loss, float(gamma), float(alpha), int(chunk_size)
        # None: the loss inside the forward kernel wherever it runs (a GPU with Triton) and gradients are wanted;
        # True forces it (tests under TRITON_INTERPRET); False: scores, then the torch loss, then the backward
        self.fused = fused

    def forward(self, sentence_features, labels: torch.Tensor) -> torch.Tensor:
        query_features, document_features = sentence_features
        n_visible = query_features["n_visible"]
        out = self.model(query_features)  # through DDP when distributed: the only forward with parameters
        q, w = out["query_heads"], out["head_weights"]  # [B, H, dh], [B, H]
        groups = key_side(self.model)(dict(document_features))["key_groups"]  # parameter-free: not through DDP
        tower = query_tower(self.model)
        total = q.new_zeros(())
        for rows, layer, keys in groups:
            rows = rows.to(q.device)
            nv = n_visible[rows]
            t_len = int(nv.max())
            targets = multi_hot(labels[rows], t_len)
            if self.fused or (self.fused is None and torch.is_grad_enabled() and fused_loss_available(q)):
                scale = tower.indexer.layer(layer).softmax_scale
                row_loss = fused_gated_loss(q[rows], w[rows], keys[:t_len], targets, nv, scale, self.kind,
                                            self.gamma, self.alpha, force_kernel=bool(self.fused))
                total = total + row_loss.sum()
                continue
            logits = tower.indexer.layer(layer).logits_from_query(q[rows], w[rows], keys[:t_len], self.chunk_size)
            visible = torch.arange(t_len, device=q.device).unsqueeze(0) < nv.unsqueeze(1)  # [R, T]
            per_entry = elementwise_loss(logits, targets, self.kind, self.gamma, self.alpha) * visible
            total = total + (per_entry.sum(dim=1) / nv.clamp(min=1).float()).sum()
        return total / max(int(q.shape[0]), 1)

    def get_config_dict(self) -> dict:
        return {"loss": self.kind, "gamma": self.gamma, "alpha": self.alpha, "chunk_size": self.chunk_size}
