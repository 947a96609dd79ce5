"""The memory indexer's training loss with its gradient computed inside the gated-score forward (Triton).

Training scores every visible entry of a row, z_s = scale * sum_h w_h relu(q_h . k_s), takes a per-entry BCE or
focal loss l(z_s, y_s) and back-propagates into q and w (the keys are frozen). As three steps (the gated-score
forward writes z [rows, entries], torch computes the loss and dl/dz over that tensor in a dozen element-wise
kernels, the gated-score backward) the middle step reads and writes the [rows, entries] tensor a dozen times
(its cost: docs/BENCHMARKS.md). Here the forward kernel finishes each [rows, entries] tile with the loss: z never leaves
the registers, the kernel writes dl/dz (what the backward reads) and adds the rows' losses; the backward is
:func:`~.gated_score.gated_logits_backward`. Nothing of shape [rows, heads, entries] is materialised. Both
kernels take the rows longest first and skip what a row does not see (s >= n_visible): a training batch of
triggers along documents costs its visible entries, not the [rows, max n_visible] rectangle.

Per row r (n = n_visible[r] entries, y the 0/1 targets), as ``indexer_train.loss`` defines it:

    loss_r = (1 / n) sum_{s < n} l(z_s, y_s),   l = -alpha_t (1 - p_t)^gamma log p_t,  p_t = sigmoid(+-z_s)

(BCE: gamma = 0, alpha_t = 1; alpha < 0: no class weighting). With u = +-z (sign of the target), log p_t =
-softplus(-u), (1 - p_t)^gamma = exp(-gamma softplus(u)) and dl/dz = +-alpha_t (1 - p_t)^gamma (gamma p_t log p_t
- (1 - p_t)): stable for any z.

:func:`fused_gated_loss` returns loss_r and is differentiable in q and w: both kernels run in the forward
(the gradients of loss_r are [R, H, D] and [R, H], small) and the backward scales them by the incoming
gradient. Where Triton cannot run, the same function computes the loss with the chunked torch path and
autograd (the reference in the tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import gated_score
from .gated_score import _launch, gated_logits_backward, gated_logits_torch, triton, triton_available

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _softplus(x):
        return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))

    _LOSS_CONFIGS = gated_score._CONFIGS + [
        triton.Config({"BLOCK_R": br, "BLOCK_T": bt}, num_warps=nw, num_stages=ns)
        for br, bt, nw, ns in [(64, 128, 8, 2), (64, 128, 4, 3), (64, 64, 8, 3), (128, 64, 8, 2), (64, 256, 8, 2)]
    ]

    @triton.autotune(configs=_LOSS_CONFIGS, key=["H", "D", "FOCAL", "CLASS_WEIGHT"], reset_to_zero=["LOSS"])
    @triton.jit
    def _gated_fwd_loss_kernel(Q, W, K, Y, NV, ORDER, DZ, LOSS, R, T, scale, gamma, alpha,
                               stride_qr, stride_qh, stride_wr, stride_kt, stride_yr, stride_dzr,
                               H: tl.constexpr, D: tl.constexpr, FOCAL: tl.constexpr, CLASS_WEIGHT: tl.constexpr,
                               BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
        # The block's rows are ORDER[pid_r * BLOCK_R:...] (longest first, so a block's rows see similar counts);
        # a tile past every row's visible entries does nothing: dz there is never read (the backward stops at
        # each row's NV), so a causal batch costs its visible entries.
        pid_t = tl.program_id(0)
        pid_r = tl.program_id(1)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = offs_r < R
        rows = tl.load(ORDER + offs_r, mask=row_ok, other=0)
        n = tl.load(NV + rows, mask=row_ok, other=0)
        if pid_t * BLOCK_T < tl.max(n, axis=0):
            offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
            offs_d = tl.arange(0, D)
            k = tl.load(K + offs_t[:, None] * stride_kt + offs_d[None, :], mask=offs_t[:, None] < T, other=0.0)
            z = gated_score.gated_tile(Q, W, k, rows, row_ok, offs_d, stride_qr, stride_qh, stride_wr, H, BLOCK_R,
                                       BLOCK_T) * scale  # the gated-score forward's tile
            # epilogue: the loss and dl/dz of every entry of the tile, where it is visible to its row
            inv_n = 1.0 / tl.maximum(n, 1).to(tl.float32)
            ok = row_ok[:, None] & (offs_t[None, :] < n[:, None])
            y = tl.load(Y + rows[:, None] * stride_yr + offs_t[None, :], mask=ok, other=0)
            pos = y.to(tl.float32) > 0.5
            u = tl.where(pos, z, -z)  # p_t = sigmoid(u)
            nlp = _softplus(-u)  # -log p_t
            nl1mp = nlp + u  # -log (1 - p_t) = softplus(u)
            one_minus = tl.exp(-nl1mp)  # 1 - p_t
            if CLASS_WEIGHT:
                alpha_t = tl.where(pos, alpha, 1.0 - alpha)
            else:
                alpha_t = 1.0
            if FOCAL:
                weight = alpha_t * tl.exp(-gamma * nl1mp)  # alpha_t (1 - p_t)^gamma
                dl_du = weight * (-gamma * tl.exp(-nlp) * nlp - one_minus)  # dl/du; u = +-z
            else:
                weight = alpha_t
                dl_du = -weight * one_minus
            tl.store(DZ + rows[:, None] * stride_dzr + offs_t[None, :],
                     tl.where(pos, dl_du, -dl_du) * inv_n[:, None], mask=ok)
            part = tl.sum(tl.where(ok, weight * nlp, 0.0), axis=1) * inv_n
            tl.atomic_add(LOSS + rows, part, mask=row_ok)


def entry_loss(z: torch.Tensor, y: torch.Tensor, kind: str = "focal", gamma: float = 2.0,
               alpha: float = 0.5) -> torch.Tensor:
    """Per-entry BCE or focal loss of logits ``z`` against 0/1 targets ``y`` (torch; ``indexer_train.loss`` has
    the same formula for the trainer, tests/test_gated_loss_kernel.py checks they agree)."""
    y = y.to(z.dtype)
    bce = F.binary_cross_entropy_with_logits(z, y, reduction="none")
    if kind == "bce":
        return bce
    if kind != "focal":
        raise ValueError(f"unknown loss '{kind}' (use focal or bce)")
    p = torch.sigmoid(z)
    p_t = p * y + (1 - p) * (1 - y)
    per = (1 - p_t).pow(gamma) * bce
    if alpha is not None and alpha >= 0:
        per = (alpha * y + (1 - alpha) * (1 - y)) * per
    return per


def gated_loss_torch(q, w, keys, targets, n_visible, scale: float, kind: str = "focal", gamma: float = 2.0,
                     alpha: float = 0.5, chunk: int = 8192) -> torch.Tensor:
    """Reference/CPU path: loss_r [R] through :func:`~.gated_score.gated_logits_torch` (differentiable)."""
    t_len = keys.shape[0]
    z = gated_logits_torch(q, w, keys, scale, chunk=chunk)  # [R, T] fp32
    per = entry_loss(z, targets[:, :t_len], kind, gamma, alpha)
    nv = n_visible.to(z.device)
    visible = torch.arange(t_len, device=z.device).unsqueeze(0) < nv.unsqueeze(1)
    return (per * visible).sum(dim=1) / nv.clamp(min=1).float()


class _FusedGatedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, w, keys, targets, n_visible, scale, kind, gamma, alpha):
        q_c, w_c = q.contiguous(), w.contiguous()
        keys = keys.to(q.dtype).contiguous()
        targets = targets.contiguous()
        rows, heads, dim = q_c.shape
        loss = torch.zeros(rows, dtype=torch.float32, device=q.device)
        dq = torch.zeros_like(q_c)
        dw = torch.zeros(rows, heads, dtype=torch.float32, device=q.device)
        if rows:
            nv = n_visible.to(device=q.device, dtype=torch.int32).clamp(max=keys.shape[0]).contiguous()
            order = torch.argsort(nv, descending=True, stable=True).to(torch.int32)
            t_len = keys.shape[0]
            loss.zero_()
            # d loss_r / d z_s, written (and read by the backward) only where s < n_visible[r]
            grad_z = torch.empty(rows, t_len, dtype=torch.float32, device=q.device)
            grid = lambda meta: (triton.cdiv(t_len, meta["BLOCK_T"]), triton.cdiv(rows, meta["BLOCK_R"]))  # noqa
            _launch(_gated_fwd_loss_kernel, grid, q_c, w_c, keys, targets, nv, order, grad_z, loss, rows, t_len,
                    float(scale), float(gamma), float(alpha if alpha is not None else -1.0), q_c.stride(0),
                    q_c.stride(1), w_c.stride(0), keys.stride(0), targets.stride(0), grad_z.stride(0), H=heads,
                    D=dim, FOCAL=kind == "focal", CLASS_WEIGHT=kind == "focal" and alpha is not None and alpha >= 0,
                    interpret_meta={"BLOCK_R": 16, "BLOCK_T": 32})
            dq, dw = gated_logits_backward(q_c, w_c, keys, grad_z, scale, n_visible=nv, order=order)  # the backward
            dw = dw.float()
        ctx.save_for_backward(dq, dw)
        ctx.w_dtype = w.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dq, dw = ctx.saved_tensors
        g = grad_loss.float()
        return ((dq.float() * g[:, None, None]).to(dq.dtype), (dw * g[:, None]).to(ctx.w_dtype),
                None, None, None, None, None, None, None)


def fused_loss_available(q: torch.Tensor) -> bool:
    """The Triton loss path runs on a CUDA device with Triton, H and D powers of two >= 16 (tl.dot, tl.arange).
    Not under the CPU interpreter by default: it is exercised there by the tests, calling the kernel directly."""
    heads, dim = q.shape[-2], q.shape[-1]
    pow2 = all(x >= 16 and not x & (x - 1) for x in (heads, dim))
    return q.device.type == "cuda" and pow2 and triton_available(q.device, dim)


def fused_gated_loss(q, w, keys, targets, n_visible, scale: float, kind: str = "focal", gamma: float = 2.0,
                     alpha: float = 0.5, force_kernel: bool = False) -> torch.Tensor:
    """loss_r [R] of rows q [R, H, D], w [R, H] over keys [T, D] with 0/1 ``targets`` [R, >=T] and
    ``n_visible`` [R]; differentiable in q and w. One Triton pass where :func:`fused_loss_available` (or
    ``force_kernel``, e.g. under TRITON_INTERPRET), the torch path otherwise."""
    if kind not in ("focal", "bce"):
        raise ValueError(f"unknown loss '{kind}' (use focal or bce)")
    if force_kernel or fused_loss_available(q):
        return _FusedGatedLoss.apply(q, w, keys, targets, n_visible, scale, kind, gamma, alpha)
    return gated_loss_torch(q, w, keys, targets, n_visible, scale, kind, gamma, alpha)
