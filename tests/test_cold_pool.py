"""The cold pool and its row stores: appends, gathers by entry index, byte counting, no aliasing."""

import pytest
import torch

from lsa_runtime.cold_pool import ColdPool, GrowingRows, dequantize_fp8, pinning_available, quantize_fp8


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


@pytest.mark.parametrize("storage", ["model", "fp8"])
def test_append_many_stores_what_appends_one_by_one_store(storage):
    """A static row's flush hands every layer's born entries at once: the rows, scales and counts equal those of
    the same appends made one at a time, across a growth of the rows (initial room 4)."""
    gen = torch.Generator().manual_seed(1)
    layers, widths = [2, 4, 6], {"compressor": 16, "indexer": 8}
    one, many = (ColdPool(layers, widths, torch.float32, initial_entries=4, storage=storage) for _ in range(2))
    for n in (3, 0, 5, 1):  # the second batch grows every store
        items = [(layer, name, torch.randn(n, widths[name], generator=gen)) for layer in layers for name in widths]
        for layer, name, entries in items:
            one.append(layer, name, entries)
        many.append_many(items)
    for layer in layers:
        assert many.count(layer) == one.count(layer) == 9
        for name in widths:
            assert torch.equal(many.host_rows(layer, name), one.host_rows(layer, name))
            if storage == "fp8":
                assert torch.equal(many.scales[(layer, name)].view(), one.scales[(layer, name)].view())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="asynchronous appends into pinned rows need a GPU")
def test_append_many_from_a_gpu_equals_the_cpu_path():
    """Asynchronous device -> pinned appends, one event for the batch: a gather after them reads every row."""
    gen = torch.Generator().manual_seed(2)
    layers, widths = [2, 4], {"compressor": 128, "indexer": 64}
    cpu, gpu = ColdPool(layers, widths, torch.bfloat16, pin=False), ColdPool(layers, widths, torch.bfloat16)
    for n in (40, 7, 300):
        items = [(layer, name, torch.randn(n, widths[name], generator=gen).to(torch.bfloat16))
                 for layer in layers for name in widths]
        cpu.append_many(items)
        gpu.append_many([(layer, name, entries.cuda()) for layer, name, entries in items])
    ids = torch.tensor([346, 0, 41, 200])
    for layer in layers:
        for name in widths:
            assert torch.equal(gpu.gather(layer, name, ids, "cuda").cpu(), cpu.gather(layer, name, ids, "cpu"))


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


# ---- fp8 storage ----------------------------------------------------------------------------------------------

def _e4m3_values() -> torch.Tensor:
    """Every finite non-negative e4m3 value, from its bit patterns (sign 0): the oracle of exact round trips."""
    bits = torch.arange(0, 127, dtype=torch.uint8)  # 0x7f is NaN
    return bits.view(torch.float8_e4m3fn).float()


def test_fp8_round_trip_is_exact_on_e4m3_values_times_the_block_scale():
    """A block whose absmax is 448 * s and whose values are e4m3 values times s comes back exactly (scale = s)."""
    gen = torch.Generator().manual_seed(0)
    values = _e4m3_values()
    picks = values[torch.randint(0, values.numel(), (3, 160), generator=gen)]
    picks[:, 0], picks[:, 64], picks[:, 128] = 448.0, 448.0, 448.0  # every block reaches the largest value
    signs = torch.where(torch.rand(3, 160, generator=gen) < 0.5, -1.0, 1.0)
    block_scales = torch.tensor([[0.25, 2.0 ** -9, 8.0], [1.0, 0.5, 2.0], [2.0 ** -3, 4.0, 1.0]])
    x = picks * signs * block_scales.repeat_interleave(torch.tensor([64, 64, 32]), dim=1)
    q, scales = quantize_fp8(x)
    assert q.dtype == torch.uint8 and scales.shape == (3, 3)
    assert torch.equal(scales, block_scales)
    assert torch.equal(dequantize_fp8(q, scales, torch.float32), x)


def test_fp8_scales_are_the_smallest_power_of_two_that_fits_the_block():
    """Oracle: 2 ** ceil(log2(absmax / 448)) in Python's exact-enough float64, on random absmaxes and on the edges
    (absmax exactly 448 * 2^k, one bf16 step above it, zero, the smallest and largest fp32 exponents)."""
    import math

    from lsa_runtime.cold_pool import power_of_two_scales

    gen = torch.Generator().manual_seed(4)
    edges = [0.0, 448.0, 448.0 * 2.0 ** -20, 448.0 * 2.0 ** 30, 450.0, 449.0 * 2.0 ** -5, 1e-30, 3e38, 1.0]
    amax = torch.cat([torch.tensor(edges), torch.exp(torch.randn(2000, generator=gen) * 20).to(torch.bfloat16).float()])
    want = [1.0 if a == 0 else 2.0 ** math.ceil(math.log2(a / 448.0)) for a in amax.tolist()]
    assert power_of_two_scales(amax).tolist() == want


def test_fp8_rounding_error_is_within_half_an_e4m3_step():
    """Normal e4m3 values have 3 mantissa bits: rounding to nearest errs by at most 2^-4 of the value; below the
    smallest normal (2^-6 of the scale) the step is 2^-9 of the scale, so the error is at most 2^-10 of it."""
    x = torch.randn(64, 192, generator=torch.Generator().manual_seed(1)) * 5
    x[0] = 0.0  # an all-zero row keeps scale 1 and comes back as zeros
    q, scales = quantize_fp8(x)
    y = dequantize_fp8(q, scales, torch.float32)
    s = scales.repeat_interleave(64, dim=1)
    assert torch.all((y - x).abs() <= torch.maximum(x.abs() * 2.0 ** -4, s * 2.0 ** -10) * (1 + 1e-6))
    assert torch.equal(y[0], torch.zeros(192)) and torch.equal(scales[0], torch.ones(3))


def test_fp8_pool_gathers_dequantized_rows_and_counts_stored_bytes():
    gen = torch.Generator().manual_seed(2)
    pool = ColdPool([2, 4], {"compressor": 128, "indexer": 32}, torch.float32, storage="fp8")
    rows = {name: torch.randn(40, width, generator=gen) for name, width in pool.widths.items()}
    for layer in pool.layers:
        for name in pool.NAMES:
            pool.append(layer, name, rows[name][:25])
            pool.append(layer, name, rows[name][25:])
    ids = torch.tensor([39, 0, 17, 17])
    got = pool.gather(4, "compressor", ids, "cpu")
    want = dequantize_fp8(*quantize_fp8(rows["compressor"]), torch.float32)[ids]
    assert torch.equal(got, want)
    assert pool.moved_bytes() == 4 * (128 + 2 * 4)  # e4m3 bytes + two fp32 block scales per row
    assert torch.equal(pool.stream_prefix(2, "indexer", 5, "cpu"),
                       dequantize_fp8(*quantize_fp8(rows["indexer"][:5]), torch.float32))
    assert pool.used_bytes == 2 * 40 * ((128 + 2 * 4) + (32 + 1 * 4))
    assert not pool.gather_layers_available("cpu")
    with pytest.raises(ValueError, match="storage"):
        ColdPool([2], {"compressor": 8, "indexer": 8}, torch.float32, storage="int4")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp8_pool_on_a_gpu_equals_the_cpu_path():
    """Pinned fp8 rows quantized on the GPU (asynchronous appends), gathered and streamed to the GPU: the same
    values as the same pool on the CPU."""
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(300, 128, generator=gen).to(torch.bfloat16)
    pools = [ColdPool([2], {"compressor": 128, "indexer": 128}, torch.bfloat16, storage="fp8", pin=pin)
             for pin in (False, True)]
    for pool, device in zip(pools, ("cpu", "cuda")):
        for name in pool.NAMES:
            pool.append(2, name, rows[:100].to(device))
            pool.append(2, name, rows[100:].to(device))
    ids = torch.tensor([299, 3, 150, 3])
    assert torch.equal(pools[1].gather(2, "compressor", ids, "cuda").cpu(), pools[0].gather(2, "compressor", ids, "cpu"))
    assert torch.equal(pools[1].stream_prefix(2, "indexer", 200, "cuda").cpu(),
                       pools[0].stream_prefix(2, "indexer", 200, "cpu"))
