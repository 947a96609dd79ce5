"""The device-side cold-pool gather returns exactly source[ids] (Triton interpreter on CPU, or a GPU)."""

import os

import pytest
import torch

from lsa_runtime.kernels.pool_gather import gather_rows, zero_copy_available


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs a CUDA device with pinned memory, or TRITON_INTERPRET=1 with triton installed")
@pytest.mark.parametrize("width", [32, 300, 512])
def test_gather_rows_equals_index_select(width):
    pytest.importorskip("triton")
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    gen = torch.Generator().manual_seed(width)
    source = torch.randn(1000, width, generator=gen).to(torch.bfloat16)
    if cuda:
        source = source.pin_memory()
    assert zero_copy_available(source, device)
    ids = torch.randint(0, 1000, (257,), generator=gen)
    out = torch.full((257, width), float("nan"), dtype=torch.bfloat16, device=device)  # poisoned
    gather_rows(source, ids, device, out=out)
    assert torch.equal(out.cpu(), source[ids])
    assert gather_rows(source, ids[:0], device).shape == (0, width)


def test_not_available_without_a_gpu_target():
    source = torch.zeros(4, 8)
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert not zero_copy_available(source, "cpu")
