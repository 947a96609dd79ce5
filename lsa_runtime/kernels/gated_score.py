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
* :func:`gated_logits_backward`: per block of (row, head) pairs and chunk of ``BWD_CHUNK`` entries, loop over
  entry tiles; recompute the products, ``dW[r, h] = scale * sum_s dz * relu(s)`` and
  ``dQ[r, h] = scale * w_h * sum_s dz * [s > 0] k_s`` (w_h applied once at the end); the chunks' partial sums
  are added after. Keys are frozen (the document side of the dual encoder): no dK. The tile's M dimension
  runs over flattened (row, head) pairs; when a block holds the heads of one row (H a multiple of BLOCK_M, as
  at V4's 64 heads) it reads that row's dz as one vector. With ``n_visible`` a row's programs stop at its
  visible entries, and rows are taken longest first, so a causal batch costs what it sees. Timings:
  docs/BENCHMARKS.md, "Training kernels".

FLOPs: forward 2*R*H*D*T, backward 4*R*H*D*T. On CPU (and wherever Triton is missing) the same functions
run a chunked torch path (:func:`gated_logits_torch`), which is also the reference in the tests.
"""

from __future__ import annotations

import torch

FEW_ROWS = 8  # at most this many query rows take the few-rows forward kernel
BWD_CHUNK = 8192  # entries per backward program (a multiple of every BLOCK_T); its partial sums are added after

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

    _BWD_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_T": bt}, num_warps=nw, num_stages=ns)
        for bm, bt, nw, ns in [(64, 64, 4, 3), (64, 128, 8, 3), (64, 64, 8, 3), (32, 64, 4, 3), (128, 64, 8, 3),
                               (64, 128, 4, 3), (64, 64, 4, 4)]
    ]

    @triton.autotune(configs=_BWD_CONFIGS, key=["H", "D"])
    @triton.jit
    def _gated_bwd_kernel(Q, W, K, DZ, NV, ORDER, DQP, DWP, M, T, scale, stride_kt, stride_dzr,
                          H: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_T: tl.constexpr):
        # q [R, H, D], w [R, H] contiguous: seen flat as [R*H, D] and [R*H]. Program (i, c) takes the (row, head)
        # pairs i*BLOCK_M.. of the rows in ORDER (longest first) and the entries [c*CHUNK, (c+1)*CHUNK) that its
        # rows see (s < NV[row]; dz beyond is never read); it writes its partial dq, dw to slot c of DQP
        # [C, R*H, D] and DWP [C, R*H] (zeros where it sees nothing), summed afterwards. Chunks keep a causal
        # batch balanced: without them the longest row's program alone sets the kernel's time.
        pid_c = tl.program_id(1)
        offs_i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        i_ok = offs_i < M
        rows = tl.load(ORDER + offs_i // H, mask=i_ok, other=0)
        offs_m = rows * H + offs_i % H  # the pairs' places in q, w and the partial slots
        q = tl.load(Q + offs_m[:, None] * D + offs_d[None, :], mask=i_ok[:, None], other=0.0)
        dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        dw = tl.zeros([BLOCK_M, BLOCK_T], dtype=tl.float32)  # summed over entries once, after the loop
        lo = pid_c * CHUNK
        if H % BLOCK_M == 0:  # compile time: every pair of the block belongs to one row, which shares one dz row
            row = tl.load(ORDER + (tl.program_id(0) * BLOCK_M) // H)
            n = tl.minimum(tl.load(NV + row), T)
            for tile in range(lo // BLOCK_T, tl.cdiv(tl.minimum(n, lo + CHUNK), BLOCK_T)):
                offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
                t_ok = offs_t < n
                k = tl.load(K + offs_t[:, None] * stride_kt + offs_d[None, :], mask=t_ok[:, None], other=0.0)
                dz = tl.load(DZ + row * stride_dzr + offs_t, mask=t_ok, other=0.0).to(tl.float32)[None, :]
                s = tl.dot(q, tl.trans(k))
                dw += tl.maximum(s, 0.0) * dz
                dq += tl.dot(tl.where(s > 0, dz, 0.0).to(k.dtype), k)
        else:  # blocks straddle rows (H not a multiple of BLOCK_M): a dz row per pair
            n = tl.minimum(tl.load(NV + rows, mask=i_ok, other=0), T)
            for tile in range(lo // BLOCK_T, tl.cdiv(tl.minimum(tl.max(n, axis=0), lo + CHUNK), BLOCK_T)):
                offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
                k = tl.load(K + offs_t[:, None] * stride_kt + offs_d[None, :], mask=offs_t[:, None] < T, other=0.0)
                dz = tl.load(DZ + rows[:, None] * stride_dzr + offs_t[None, :],
                             mask=i_ok[:, None] & (offs_t[None, :] < n[:, None]), other=0.0).to(tl.float32)
                s = tl.dot(q, tl.trans(k))
                dw += tl.maximum(s, 0.0) * dz
                dq += tl.dot(tl.where(s > 0, dz, 0.0).to(k.dtype), k)
        w = tl.load(W + offs_m, mask=i_ok, other=0.0).to(tl.float32)
        tl.store(DQP + pid_c * M * D + offs_m[:, None] * D + offs_d[None, :], dq * (w * scale)[:, None],
                 mask=i_ok[:, None])
        tl.store(DWP + pid_c * M + offs_m, tl.sum(dw, axis=1) * scale, mask=i_ok)


def _launch(kernel, grid, *args, interpret_meta=None, **kwargs):
    """Autotuned launch on a GPU; under TRITON_INTERPRET (CPU checks) the plain kernel with one small config."""
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        meta = interpret_meta or {"BLOCK_R": 64, "BLOCK_T": 64}
        kernel.fn[grid(meta)](*args, **kwargs, **meta)
    else:  # Triton launches on the current device and stream: make that the tensors' (a model spread over GPUs)
        with torch.cuda.device(next(a.device for a in args if isinstance(a, torch.Tensor))):
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


def gated_logits_backward(q, w, keys, grad_z, scale: float, n_visible: torch.Tensor | None = None,
                          chunk: int = BWD_CHUNK, order: torch.Tensor | None = None):
    """Gradients of sum(grad_z * gated_logits(q, w, keys)) w.r.t. q and w (keys are frozen).

    ``n_visible`` [R] (optional): row r sees entries s < n_visible[r] only; grad_z beyond them is ignored (never
    read) and their gradient contribution is zero. The kernel then skips the entry tiles a row does not see,
    so a causal batch (rows of triggers along a document) costs the visible entries, not the rectangle.
    ``chunk``: entries per kernel program (a multiple of 128), so long and short rows spread over the GPU.
    ``order``: the rows by n_visible, longest first (int32), where the caller already has it.
    """
    if chunk <= 0 or chunk % 128:
        raise ValueError(f"chunk must be a positive multiple of 128 entries, got {chunk}")
    rows, heads, dim = q.shape
    t_len = keys.shape[0]
    if not triton_available(q.device, q.shape[-1]):
        if n_visible is not None:
            visible = torch.arange(t_len, device=grad_z.device)[None, :] < n_visible.to(grad_z.device)[:, None]
            grad_z = grad_z[:, :t_len] * visible
        with torch.enable_grad():
            qq, ww = q.detach().requires_grad_(), w.detach().float().requires_grad_()
            z = gated_logits_torch(qq, ww, keys, scale)
            dq, dw = torch.autograd.grad(z, (qq, ww), grad_z[:, :t_len])
        return dq, dw.to(w.dtype)
    q, w, keys = q.contiguous(), w.contiguous(), keys.to(q.dtype).contiguous()
    if grad_z.stride(-1) != 1:
        grad_z = grad_z.contiguous()
    if n_visible is None:
        nv = torch.full((rows,), t_len, dtype=torch.int32, device=q.device)
        order = torch.arange(rows, dtype=torch.int32, device=q.device)
    else:
        nv = n_visible.to(device=q.device, dtype=torch.int32).clamp(max=t_len).contiguous()
        if order is None:
            order = torch.argsort(nv, descending=True, stable=True).to(torch.int32)
    chunks = triton.cdiv(t_len, chunk)
    dq_parts = torch.empty(chunks, rows * heads, dim, dtype=torch.float32, device=q.device)
    dw_parts = torch.empty(chunks, rows * heads, dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(rows * heads, meta["BLOCK_M"]), chunks)  # noqa: E731
    block_m = heads if heads >= 16 and not heads & (heads - 1) else 64  # both of the kernel's paths get tested
    _launch(_gated_bwd_kernel, grid, q, w, keys, grad_z, nv, order, dq_parts, dw_parts, rows * heads, t_len,
            float(scale), keys.stride(0), grad_z.stride(0), H=heads, D=dim, CHUNK=chunk,
            interpret_meta={"BLOCK_M": min(block_m, 64), "BLOCK_T": 64})
    dq = dq_parts.sum(dim=0).view(rows, heads, dim).to(q.dtype)
    dw = dw_parts.sum(dim=0).view(rows, heads)
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
