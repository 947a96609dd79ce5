"""Fused gated scoring I[t, s] = scale * sum_h w_h * relu(q_h . k_s) for many queries over many entries.

The memory indexer's score (and the native Lightning Indexer's, DeepSeek-V4 section 2.3.1, eq. 13) is a
matmul per head followed by a ReLU and a weighted sum over heads. Written naively it materialises
``[rows, heads, entries]`` (64 heads x 100K entries x 4 B = 25 MB per row); these kernels never do:

* :func:`gated_logits` (forward): per (rows-block, entries-block) tile, loop over heads, one
  ``[BLOCK_R, D] @ [D, BLOCK_T]`` tensor-core product each, ReLU, scale by w_h, accumulate in fp32.
* the same forward for a few rows (a decode-time trigger scores ONE hidden state per layer): per entries-block,
  one ``[BLOCK_T, D] @ [D, H]`` product per row (all heads at once), ReLU, dot with w over heads. A one-row
  score is a matrix-vector shape bound by reading the keys; the many-rows tile would multiply 64-128 rows of
  which one is real.
* :func:`gated_logits_backward`: per block of (row, head) pairs, loop over entry tiles; recompute the
  products, ``dW[r, h] = scale * sum_s dz * relu(s)`` and ``dQ[r, h] = scale * w_h * sum_s dz * [s > 0] k_s``.
  Keys are frozen (the document side of the dual encoder): no dK. The tile's M dimension runs over flattened
  (row, head) pairs, so the H heads of a row share one dz row. (A first kernel with one program per
  (rows-block, head) re-read the fp32 dz tile once per head: 3.16-3.18 ms fwd+bwd vs 3.03-3.07 on the H200,
  docs/BENCHMARKS.md; it and a two-heads variant were removed.)

FLOPs: forward 2*R*H*D*T, backward 4*R*H*D*T. On CPU (and wherever Triton is missing) the same functions
run a chunked torch path (:func:`gated_logits_torch`), which is also the reference in the tests.
"""

from __future__ import annotations

import torch

FEW_ROWS = 8  # at most this many query rows take the few-rows forward kernel

try:  # Triton ships with CUDA builds of torch; CPU-only installs run the torch path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def triton_available(device: torch.device | str, head_dim: int | None = None) -> bool:
    """Whether the Triton kernels can run: a CUDA device (or the CPU interpreter) and, for tl.dot/tl.arange,
    a power-of-two head_dim >= 16 (the V4 indexer's 128 is; other sizes take the torch path)."""
    import os

    if triton is None:
        return False
    if head_dim is not None and (head_dim < 16 or head_dim & (head_dim - 1)):
        return False
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def gated_logits_torch(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, scale: float,
                       chunk: int = 8192) -> torch.Tensor:
    """Reference/CPU path. q [R, H, D], w [R, H], keys [T, D] -> fp32 [R, T], chunked over entries so at most
    [R, H, chunk] is alive."""
    rows, _, _ = q.shape
    out = torch.empty(rows, keys.shape[0], dtype=torch.float32, device=q.device)
    wf = w.float()
    for start in range(0, keys.shape[0], chunk):
        k = keys[start : start + chunk]
        s = torch.einsum("rhd,td->rht", q, k.to(q.dtype)).float().relu_()  # [R, H, chunk]
        out[:, start : start + k.shape[0]] = torch.einsum("rht,rh->rt", s, wf) * scale
    return out


if triton is not None:

    _CONFIGS = [
        triton.Config({"BLOCK_R": br, "BLOCK_T": bt}, num_warps=nw, num_stages=ns)
        for br, bt, nw, ns in [(64, 128, 4, 2), (64, 128, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 2)]
    ]

    @triton.jit
    def gated_tile(Q, W, k, offs_r, row_ok, offs_d, stride_qr, stride_qh, stride_wr,
                   H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
        """sum_h w_h relu(q_h . k) of a [BLOCK_R rows, BLOCK_T entries] tile, unscaled, fp32 (inlined by Triton
        into the kernels that call it: this forward and the training loss's, kernels/gated_loss.py)."""
        acc = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32)
        for h in range(H):
            q = tl.load(Q + offs_r[:, None] * stride_qr + h * stride_qh + offs_d[None, :],
                        mask=row_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k))  # [BLOCK_R, BLOCK_T], fp32 accumulate
            w = tl.load(W + offs_r * stride_wr + h, mask=row_ok, other=0.0).to(tl.float32)
            acc += w[:, None] * tl.maximum(s, 0.0)
        return acc

    @triton.autotune(configs=_CONFIGS, key=["H", "D"])
    @triton.jit
    def _gated_fwd_kernel(Q, W, K, Z, R, T, scale,
                          stride_qr, stride_qh, stride_wr, stride_kt, stride_zr,
                          H: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
        pid_t = tl.program_id(0)
        pid_r = tl.program_id(1)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, D)
        row_ok = offs_r < R
        k = tl.load(K + offs_t[:, None] * stride_kt + offs_d[None, :], mask=offs_t[:, None] < T, other=0.0)
        acc = gated_tile(Q, W, k, offs_r, row_ok, offs_d, stride_qr, stride_qh, stride_wr, H, BLOCK_R, BLOCK_T)
        tl.store(Z + offs_r[:, None] * stride_zr + offs_t[None, :], acc * scale,
                 mask=row_ok[:, None] & (offs_t[None, :] < T))

    _FEW_ROWS_CONFIGS = [
        triton.Config({"BLOCK_T": bt}, num_warps=nw, num_stages=ns)
        for bt, nw, ns in [(64, 4, 2), (128, 4, 2), (128, 8, 3), (256, 8, 2)]
    ]

    @triton.autotune(configs=_FEW_ROWS_CONFIGS, key=["H", "D"])
    @triton.jit
    def _gated_fwd_few_rows_kernel(Q, W, K, Z, R, T, scale,
                                   stride_qr, stride_qh, stride_wr, stride_kt, stride_zr,
                                   H: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr):
        pid_t = tl.program_id(0)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_h = tl.arange(0, H)
        offs_d = tl.arange(0, D)
        t_ok = offs_t < T
        k = tl.load(K + offs_t[:, None] * stride_kt + offs_d[None, :], mask=t_ok[:, None], other=0.0)
        for r in range(R):  # each key tile is read once for all rows
            q = tl.load(Q + r * stride_qr + offs_h[:, None] * stride_qh + offs_d[None, :])  # [H, D]
            s = tl.dot(k, tl.trans(q))  # [BLOCK_T, H], fp32 accumulate
            w = tl.load(W + r * stride_wr + offs_h).to(tl.float32)
            z = tl.sum(tl.maximum(s, 0.0) * w[None, :], axis=1)
            tl.store(Z + r * stride_zr + offs_t, z * scale, mask=t_ok)

    _FLAT_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_T": bt}, num_warps=nw, num_stages=ns)
        for bm, bt, nw, ns in [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 3),
                               (128, 32, 4, 4)]  # (64, 64, 4, 3) won on the H200; six more tried there did not
    ]

    @triton.autotune(configs=_FLAT_CONFIGS, key=["H", "D"], reset_to_zero=[])
    @triton.jit
    def _gated_bwd_flat_kernel(Q, W, K, DZ, DQ, DW, M, T, scale, stride_kt, stride_dzr,
                               H: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr):
        # q [R, H, D], w [R, H], dq, dw contiguous: seen flat as [R*H, D] and [R*H]; m = r * H + h
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        m_ok = offs_m < M
        rows = offs_m // H
        q = tl.load(Q + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None], other=0.0)
        w = tl.load(W + offs_m, mask=m_ok, other=0.0).to(tl.float32)
        dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        dw = tl.zeros([BLOCK_M], dtype=tl.float32)
        n_tiles = tl.cdiv(T, BLOCK_T)
        for tile in range(0, n_tiles):
            offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
            t_ok = offs_t < T
            k = tl.load(K + offs_t[:, None] * stride_kt + offs_d[None, :], mask=t_ok[:, None], other=0.0)
            dz = tl.load(DZ + rows[:, None] * stride_dzr + offs_t[None, :], mask=m_ok[:, None] & t_ok[None, :],
                         other=0.0).to(tl.float32)  # one dz row serves the H heads of its row
            s = tl.dot(q, tl.trans(k))
            dw += tl.sum(dz * tl.maximum(s, 0.0), axis=1)
            dq += tl.dot(tl.where(s > 0, dz * w[:, None], 0.0).to(k.dtype), k)
        tl.store(DQ + offs_m[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=m_ok[:, None])
        tl.store(DW + offs_m, dw * scale, mask=m_ok)


def _launch(kernel, grid, *args, interpret_meta=None, **kwargs):
    """Autotuned launch on a GPU; under TRITON_INTERPRET (CPU checks) the plain kernel with one small config."""
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        meta = interpret_meta or {"BLOCK_R": 64, "BLOCK_T": 64}
        kernel.fn[grid(meta)](*args, **kwargs, **meta)
    else:
        kernel[grid](*args, **kwargs)


def gated_logits(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Fused forward: q [R, H, D], w [R, H], keys [T, D] -> fp32 [R, T]. Torch path where Triton cannot run."""
    if not triton_available(q.device, q.shape[-1]):
        return gated_logits_torch(q, w, keys, scale)
    q, w, keys = q.contiguous(), w.contiguous(), keys.to(q.dtype).contiguous()
    rows, heads, dim = q.shape
    t_len = keys.shape[0]
    out = torch.empty(rows, t_len, dtype=torch.float32, device=q.device)
    if rows <= FEW_ROWS and heads >= 16 and not heads & (heads - 1):  # tl.dot needs a power-of-two N >= 16
        grid = lambda meta: (triton.cdiv(t_len, meta["BLOCK_T"]),)  # noqa: E731
        _launch(_gated_fwd_few_rows_kernel, grid, q, w, keys, out, rows, t_len, float(scale), q.stride(0),
                q.stride(1), w.stride(0), keys.stride(0), out.stride(0), H=heads, D=dim,
                interpret_meta={"BLOCK_T": 64})
        return out
    grid = lambda meta: (triton.cdiv(t_len, meta["BLOCK_T"]), triton.cdiv(rows, meta["BLOCK_R"]))  # noqa: E731
    _launch(_gated_fwd_kernel, grid, q, w, keys, out, rows, t_len, float(scale), q.stride(0), q.stride(1), w.stride(0),
                            keys.stride(0), out.stride(0), H=heads, D=dim)
    return out


def gated_logits_backward(q, w, keys, grad_z, scale: float):
    """Gradients of sum(grad_z * gated_logits(q, w, keys)) w.r.t. q and w (keys are frozen)."""
    if not triton_available(q.device, q.shape[-1]):
        with torch.enable_grad():
            qq, ww = q.detach().requires_grad_(), w.detach().float().requires_grad_()
            z = gated_logits_torch(qq, ww, keys, scale)
            dq, dw = torch.autograd.grad(z, (qq, ww), grad_z)
        return dq, dw.to(w.dtype)
    q, w, keys = q.contiguous(), w.contiguous(), keys.to(q.dtype).contiguous()
    grad_z = grad_z.contiguous()
    rows, heads, dim = q.shape
    dq = torch.empty_like(q)
    dw = torch.empty(rows, heads, dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(rows * heads, meta["BLOCK_M"]),)  # noqa: E731
    _launch(_gated_bwd_flat_kernel, grid, q, w, keys, grad_z, dq, dw, rows * heads, keys.shape[0], float(scale),
            keys.stride(0), grad_z.stride(0), H=heads, D=dim, interpret_meta={"BLOCK_M": 64, "BLOCK_T": 64})
    return dq, dw.to(w.dtype)


class GatedLogits(torch.autograd.Function):
    """Autograd wrapper: z = scale * sum_h w_h relu(q_h . k_s), fused on GPU, chunked torch elsewhere."""

    @staticmethod
    def forward(ctx, q, w, keys, scale: float):
        ctx.save_for_backward(q, w, keys)
        ctx.scale = scale
        return gated_logits(q, w, keys, scale)

    @staticmethod
    def backward(ctx, grad_z):
        q, w, keys = ctx.saved_tensors
        dq, dw = gated_logits_backward(q, w, keys, grad_z, ctx.scale)
        return dq, dw, None, None


def fused_gated_logits(q, w, keys, scale: float) -> torch.Tensor:
    return GatedLogits.apply(q, w, keys, scale)
