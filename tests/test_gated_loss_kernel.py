"""The training loss computed inside the gated-score forward (lsa_runtime/kernels/gated_loss.py): its torch path
equals the trainer's loss formula (indexer_train.loss), and the Triton kernels (GPU, or the CPU interpreter)
equal the torch path in the loss and in the gradients of q and w, for focal / BCE / unweighted focal, with
ragged n_visible."""

import os

import pytest
import torch

from lsa_runtime.kernels.gated_loss import entry_loss, fused_gated_loss, gated_loss_torch
from lsa_runtime.kernels.gated_score import gated_logits_torch


def _inputs(seed, rows=5, heads=16, dim=16, entries=150):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, heads, dim, generator=gen)
    w = torch.randn(rows, heads, generator=gen) * 0.5
    keys = torch.randn(entries, dim, generator=gen)
    targets = (torch.rand(rows, entries, generator=gen) < 0.1).float()
    n_visible = torch.randint(entries // 3, entries + 1, (rows,), generator=gen)
    n_visible[0] = entries  # one full row, the others ragged
    return q, w, keys, targets, n_visible


@pytest.mark.parametrize("kind,alpha", [("focal", 0.5), ("bce", 0.5), ("focal", -1.0)])
def test_torch_path_equals_the_trainers_loss(kind, alpha):
    elementwise_loss = pytest.importorskip("indexer_train.loss").elementwise_loss  # the trainer's formula
    q, w, keys, targets, nv = _inputs(1)
    got = gated_loss_torch(q, w, keys, targets, nv, 0.25, kind, 2.0, alpha)
    z = gated_logits_torch(q, w, keys, 0.25)
    per = elementwise_loss(z, targets, kind, 2.0, alpha)
    want = torch.stack([per[r, : int(nv[r])].mean() for r in range(q.shape[0])])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(entry_loss(z, targets, kind, 2.0, alpha), per)


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton kernels need a CUDA device (or TRITON_INTERPRET=1 with triton installed)")
@pytest.mark.parametrize("kind,alpha", [("focal", 0.5), ("bce", 0.5), ("focal", -1.0)])
def test_kernel_equals_torch_path_in_loss_and_gradients(kind, alpha):
    pytest.importorskip("triton")
    cuda = torch.cuda.is_available()
    device, dtype, tol = ("cuda", torch.bfloat16, 5e-3) if cuda else ("cpu", torch.float32, 1e-5)
    q, w, keys, targets, nv = _inputs(3)
    q = q.to(dtype).float()  # the reference sees the operands as the kernel does
    keys = keys.to(dtype).float()
    grad_rows = torch.rand(q.shape[0])  # a weighted sum of the row losses: the backward scales per row

    qa = q.to(device, dtype).clone().requires_grad_()
    wa = w.to(device).clone().requires_grad_()
    loss = fused_gated_loss(qa, wa, keys.to(device, dtype), targets.to(device), nv.to(device), 0.25, kind, 2.0,
                            alpha, force_kernel=True)
    (loss * grad_rows.to(device)).sum().backward()

    qb, wb = q.double().requires_grad_(), w.double().requires_grad_()
    want = gated_loss_torch(qb, wb, keys.double(), targets.double(), nv, 0.25, kind, 2.0, alpha)
    (want * grad_rows.double()).sum().backward()

    def rel(a, b):
        return ((a.detach().cpu().double() - b.detach()).norm() / b.detach().norm()).item()

    assert rel(loss, want) <= tol
    assert rel(qa.grad, qb.grad) <= tol and rel(wa.grad, wb.grad) <= tol


def test_cpu_path_is_differentiable_and_refuses_unknown_losses():
    q, w, keys, targets, nv = _inputs(4)
    q.requires_grad_()
    fused_gated_loss(q, w, keys, targets, nv, 0.25).sum().backward()  # torch path on CPU
    assert q.grad is not None and torch.isfinite(q.grad).all()
    with pytest.raises(ValueError, match="unknown loss"):
        fused_gated_loss(q, w, keys, targets, nv, 0.25, kind="hinge")


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton kernels need a CUDA device (or TRITON_INTERPRET=1 with triton installed)")
@pytest.mark.parametrize("heads", [16, 4])
def test_kernel_on_a_causal_batch(heads):
    """Rows of triggers along a document (n_visible from 0 to all, shuffled, more rows than a block): blocks whose
    rows see none of a tile skip it; loss and gradients still equal the float64 torch path."""
    pytest.importorskip("triton")
    cuda = torch.cuda.is_available()
    device, dtype, tol = ("cuda", torch.bfloat16, 5e-3) if cuda else ("cpu", torch.float32, 1e-5)
    rows, entries = 45, 200
    q, w, keys, targets, _ = _inputs(8, rows=rows, heads=heads, entries=entries)
    nv = torch.randperm(rows, generator=torch.Generator().manual_seed(1)) * entries // (rows - 1)
    q, keys = q.to(dtype).float(), keys.to(dtype).float()
    qa = q.to(device, dtype).clone().requires_grad_()
    wa = w.to(device).clone().requires_grad_()
    loss = fused_gated_loss(qa, wa, keys.to(device, dtype), targets.to(device), nv.to(device), 0.25, "focal", 2.0,
                            0.5, force_kernel=True)
    loss.sum().backward()
    qb, wb = q.double().requires_grad_(), w.double().requires_grad_()
    want = gated_loss_torch(qb, wb, keys.double(), targets.double(), nv, 0.25, "focal", 2.0, 0.5)
    want.sum().backward()

    def rel(a, b):
        return ((a.detach().cpu().double() - b.detach()).norm() / b.detach().norm()).item()

    assert nv.min().item() == 0 and nv.max().item() == entries
    assert rel(loss, want) <= tol
    assert rel(qa.grad, qb.grad) <= tol and rel(wa.grad, wb.grad) <= tol
