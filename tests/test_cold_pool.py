"""The cold pool and its row stores: appends, gathers by entry index, byte counting, no aliasing."""

import pytest
import torch

from lsa_runtime.cold_pool import ColdPool, GrowingRows, pinning_available


def test_growing_rows_appends_and_counts_capacity():
    rows = GrowingRows(width=3, dtype=torch.float32, device="cpu", capacity=2, growth=0.5, min_growth=4)
    parts = [torch.arange(6.0).view(2, 3), torch.arange(6.0, 21.0).view(5, 3), torch.zeros(0, 3)]
    for part in parts:
        rows.append(part)
    assert torch.equal(rows.view(), torch.cat(parts))
    assert len(rows) == 7
    assert rows.capacity >= 7
    assert rows.nbytes == rows.capacity * 3 * 4  # what is allocated, slack included
    rows.reserve(20)
    assert rows.capacity == 20 and torch.equal(rows.view(), torch.cat(parts))


def test_pool_gather_returns_rows_by_entry_index_and_counts_bytes():
    gen = torch.Generator().manual_seed(0)
    pool = ColdPool([2, 4], {"compressor": 8, "indexer": 4}, dtype=torch.float32)
    assert pool.pin == pinning_available()
    chunks = [torch.randn(n, 8, generator=gen) for n in (5, 0, 3, 9)]
    for chunk in chunks:
        pool.append(4, "compressor", chunk)
    everything = torch.cat(chunks)  # entry s is row s, in emission order
    assert pool.count(4) == 17 and pool.count(2) == 0
    ids = torch.tensor([16, 0, 7, 7, 3])
    got = pool.gather(4, "compressor", ids, "cpu")
    assert torch.equal(got, everything[ids])
    assert pool.moved_bytes() == pool.moved_bytes("fetch") == 5 * 8 * 4 and pool.moved_rows("fetch") == 5
    pool.gather(4, "compressor", ids[:2], "cpu", purpose="prefill")
    assert pool.moved_bytes("prefill") == 2 * 8 * 4 and pool.moved_bytes() == 7 * 8 * 4
    # the staging buffer is reused: an earlier result must not change when the next gather runs
    second = pool.gather(4, "compressor", torch.tensor([1, 2, 3, 4, 5]), "cpu")
    assert torch.equal(got, everything[ids])
    assert torch.equal(second, everything[1:6])
    assert pool.used_bytes == 17 * 8 * 4


def test_pool_gather_refuses_entries_not_stored():
    pool = ColdPool([2], {"compressor": 4, "indexer": 2}, dtype=torch.float32)
    pool.append(2, "compressor", torch.ones(3, 4))
    with pytest.raises(IndexError, match="not in the cold pool"):
        pool.gather(2, "compressor", torch.tensor([3]), "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the zero-copy gather reads pinned host memory from a GPU")
def test_pool_zero_copy_gather_equals_staged_gather_across_growth():
    from lsa_runtime.kernels.pool_gather import zero_copy_available

    gen = torch.Generator().manual_seed(0)
    pool = ColdPool([2], {"compressor": 512, "indexer": 128}, dtype=torch.bfloat16, initial_entries=64)
    if not zero_copy_available(pool.host_rows(2, "compressor"), "cuda"):
        pytest.skip("Triton is not installed: ColdPool uses the staged path")
    reference = []
    for n in (40, 100, 3000):  # the last appends grow (reallocate) the pinned rows while a gather may be reading
        chunk = torch.randn(n, 512, generator=gen).to(torch.bfloat16)
        reference.append(chunk)
        pool.append(2, "compressor", chunk.cuda())
        everything = torch.cat(reference)
        ids = torch.randint(0, everything.shape[0], (777,), generator=gen)
        fast = pool.gather(2, "compressor", ids, "cuda")
        pool.zero_copy = False
        staged = pool.gather(2, "compressor", ids, "cuda")
        pool.zero_copy = True
        assert torch.equal(fast.cpu(), everything[ids]) and torch.equal(staged.cpu(), everything[ids])
    assert pool.moved_rows() == 6 * 777
