"""The fused gated-score kernels (and their CPU path) equal the formula computed directly in float64."""

import os

import numpy as np
import pytest
import torch

from lsa_runtime.kernels.gated_score import fused_gated_logits, gated_logits, gated_logits_torch


def direct(q, w, keys, scale):
    """numpy float64: z[r, t] = scale * sum_h w[r, h] * max(0, q[r, h] . k[t])."""
    s = np.einsum("rhd,td->rht", q.double().numpy(), keys.double().numpy())
    return scale * np.einsum("rht,rh->rt", np.maximum(s, 0.0), w.double().numpy())


def _inputs(seed, rows=9, heads=5, dim=16, entries=77):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, heads, dim, generator=gen), torch.randn(rows, heads, generator=gen),
            torch.randn(entries, dim, generator=gen))


@pytest.mark.parametrize("chunk", [7, 32, 10_000])
def test_torch_path_equals_formula(chunk):
    q, w, k = _inputs(chunk)
    got = gated_logits_torch(q, w, k, 0.3, chunk=chunk).double().numpy()
    np.testing.assert_allclose(got, direct(q, w, k, 0.3), rtol=1e-5, atol=1e-5)


def test_gradients_equal_float64_autograd():
    q, w, k = _inputs(3)
    g = torch.randn(q.shape[0], k.shape[0], generator=torch.Generator().manual_seed(9))
    qa, wa = q.clone().requires_grad_(), w.clone().requires_grad_()
    (fused_gated_logits(qa, wa, k, 0.3) * g).sum().backward()
    qd, wd = q.double().requires_grad_(), w.double().requires_grad_()
    s = torch.einsum("rhd,td->rht", qd, k.double()).relu()
    (0.3 * torch.einsum("rht,rh->rt", s, wd) * g.double()).sum().backward()
    torch.testing.assert_close(qa.grad.double(), qd.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(wa.grad.double(), wd.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton kernels need a CUDA device (or TRITON_INTERPRET=1 with triton installed)")
def test_triton_kernels_equal_torch_path():
    """On a GPU in bf16 (tensor cores): relative error <= 5e-3; under the CPU interpreter in fp32: <= 1e-5."""
    pytest.importorskip("triton")
    cuda = torch.cuda.is_available()
    device, dtype, tol = ("cuda", torch.bfloat16, 5e-3) if cuda else ("cpu", torch.float32, 1e-5)
    q, w, k = _inputs(5, rows=70, heads=4, dim=32, entries=300)
    q, w, k = q.to(device, dtype), w.to(device), k.to(device, dtype)

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    z = gated_logits(q, w, k, 0.1)
    assert rel(z, gated_logits_torch(q.float(), w, k.float(), 0.1)) <= tol
    g = torch.randn_like(z)
    qa, wa = q.clone().requires_grad_(), w.clone().requires_grad_()
    (fused_gated_logits(qa, wa, k, 0.1) * g).sum().backward()
    qb, wb = q.float().requires_grad_(), w.clone().requires_grad_()
    (gated_logits_torch(qb, wb, k.float(), 0.1) * g).sum().backward()
    assert rel(qa.grad, qb.grad) <= tol and rel(wa.grad, wb.grad) <= tol


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton kernels need a CUDA device (or TRITON_INTERPRET=1 with triton installed)")
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_few_rows_kernel_equals_formula(rows):
    """A trigger's scoring (1..FEW_ROWS query rows, power-of-two heads) takes the few-rows kernel; it equals
    the float64 formula, including a ragged last entry tile."""
    pytest.importorskip("triton")
    from lsa_runtime.kernels.gated_score import FEW_ROWS

    assert rows <= FEW_ROWS
    cuda = torch.cuda.is_available()
    device, dtype, tol = ("cuda", torch.bfloat16, 5e-3) if cuda else ("cpu", torch.float32, 1e-5)
    q, w, k = _inputs(11 + rows, rows=rows, heads=16, dim=32, entries=300)
    z = gated_logits(q.to(device, dtype), w.to(device), k.to(device, dtype), 0.2).cpu().double()
    # the oracle sees the operands as the kernel does (bf16-rounded on a GPU)
    want = torch.from_numpy(direct(q.to(dtype).float(), w, k.to(dtype).float(), 0.2))
    assert ((z - want).norm() / want.norm()).item() <= tol


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton kernels need a CUDA device (or TRITON_INTERPRET=1 with triton installed)")
@pytest.mark.parametrize("heads", [4, 3])
def test_backward_kernel_equals_float64_gradients(heads):
    """The backward kernel (blocks of flattened (row, head) pairs) gives the float64 autograd gradients, with
    ragged last blocks and a head count that does not divide the block."""
    pytest.importorskip("triton")
    from lsa_runtime.kernels.gated_score import gated_logits_backward

    cuda = torch.cuda.is_available()
    device, dtype, tol = ("cuda", torch.bfloat16, 5e-3) if cuda else ("cpu", torch.float32, 1e-5)
    q, w, k = _inputs(21, rows=70, heads=heads, dim=32, entries=300)
    q, k = q.to(dtype).float(), k.to(dtype).float()  # the oracle sees the operands as the kernel does
    g = torch.randn(70, 300, generator=torch.Generator().manual_seed(2))
    dq, dw = gated_logits_backward(q.to(device, dtype), w.to(device), k.to(device, dtype), g.to(device), 0.1)
    qd, wd = q.double().requires_grad_(), w.double().requires_grad_()
    s = torch.einsum("rhd,td->rht", qd, k.double()).relu()
    (0.1 * torch.einsum("rht,rh->rt", s, wd) * g.double()).sum().backward()

    def rel(a, b):
        return ((a.cpu().double() - b).norm() / b.norm()).item()

    assert rel(dq, qd.grad) <= tol and rel(dw, wd.grad) <= tol


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton kernels need a CUDA device (or TRITON_INTERPRET=1 with triton installed)")
@pytest.mark.parametrize("heads,chunk", [(16, 8192), (4, 8192), (16, 128), (4, 128)])
def test_backward_kernel_skips_what_rows_do_not_see(heads, chunk):
    """With n_visible, the backward (16 heads: one row per program; 4: programs straddle rows) gives the float64
    gradients of the visible entries only, however grad_z is filled past them (NaN there: never read), for rows
    in any order (the kernel takes them longest first) and some that see nothing; with one chunk of entries per
    program or three (partial sums added after)."""
    pytest.importorskip("triton")
    from lsa_runtime.kernels.gated_score import gated_logits_backward

    cuda = torch.cuda.is_available()
    device, dtype, tol = ("cuda", torch.bfloat16, 5e-3) if cuda else ("cpu", torch.float32, 1e-5)
    rows, entries = 37, 300
    q, w, k = _inputs(31, rows=rows, heads=heads, dim=32, entries=entries)
    q, k = q.to(dtype).float(), k.to(dtype).float()
    gen = torch.Generator().manual_seed(4)
    nv = torch.randint(0, entries + 1, (rows,), generator=gen)
    nv[3], nv[7] = 0, entries
    g = torch.randn(rows, entries, generator=gen)
    visible = torch.arange(entries)[None, :] < nv[:, None]
    dq, dw = gated_logits_backward(q.to(device, dtype), w.to(device), k.to(device, dtype),
                                   g.masked_fill(~visible, float("nan")).to(device), 0.1, n_visible=nv.to(device),
                                   chunk=chunk)
    qd, wd = q.double().requires_grad_(), w.double().requires_grad_()
    s = torch.einsum("rhd,td->rht", qd, k.double()).relu()
    (0.1 * torch.einsum("rht,rh->rt", s, wd) * (g * visible).double()).sum().backward()

    def rel(a, b):
        return ((a.cpu().double() - b).norm() / b.norm()).item()

    assert rel(dq, qd.grad) <= tol and rel(dw, wd.grad) <= tol
    assert dq[3].abs().max().item() == 0 and dw[3].abs().max().item() == 0  # a row that sees nothing
