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


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs a CUDA device with pinned memory, or TRITON_INTERPRET=1 with triton installed")
@pytest.mark.parametrize("width", [32, 512])
def test_gather_rows_layers_equals_per_layer_indexing(width):
    """One launch for all layers: out[l, dst_rows] == sources[l][ids], other rows untouched, sources of
    different lengths (pool rows grow per layer)."""
    pytest.importorskip("triton")
    from lsa_runtime.kernels.pool_gather import gather_rows_layers

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    gen = torch.Generator().manual_seed(width)
    sources = [torch.randn(300 + 7 * i, width, generator=gen).to(torch.bfloat16) for i in range(5)]
    if cuda:
        sources = [s.pin_memory() for s in sources]
    ids = torch.randint(0, 300, (77,), generator=gen)
    dst_rows = torch.randperm(90, generator=gen)[:77]
    out = torch.full((5, 90, width), 7.0, dtype=torch.bfloat16, device=device)
    gather_rows_layers(sources, ids.to(device), dst_rows.to(device), out)
    out = out.cpu()
    untouched = torch.ones(90, dtype=torch.bool)
    untouched[dst_rows] = False
    for layer, source in enumerate(sources):
        assert torch.equal(out[layer, dst_rows], source[ids])
        assert bool((out[layer, untouched] == 7.0).all())
    if cuda:  # device-resident sources (a layer's kept rows) take the same kernel
        dev = [s.to(device) for s in sources]
        out2 = torch.zeros(5, 90, width, dtype=torch.bfloat16, device=device)
        gather_rows_layers(dev, ids.to(device), dst_rows.to(device), out2)
        assert torch.equal(out2.cpu()[:, dst_rows], out[:, dst_rows])


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs a CUDA device with pinned memory, or TRITON_INTERPRET=1 with triton installed")
def test_batched_resident_rows_equal_per_layer_rows():
    """lsa_cache.build_resident_all, batched (a shared store, two multi-layer gathers per row kind) == per layer."""
    pytest.importorskip("triton")
    from lsa_runtime.backbone import csa_layers, load_config
    from lsa_runtime.cold_pool import ColdPool
    from lsa_runtime.lsa_cache import LSACSACache, build_lsa_cache, build_resident_all

    config = load_config("tiny")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    for batched in (False, True):
        pool = ColdPool(csa_layers(config), {"compressor": config.head_dim, "indexer": config.index_head_dim},
                        torch.float32, initial_entries=64)
        cache = build_lsa_cache(config, pool, [])
        gen = torch.Generator().manual_seed(0)
        layers = [layer for layer in cache.layers if isinstance(layer, LSACSACache)]
        for layer in layers:
            for name, width in layer.widths.items():
                layer.update_compressor_states(name, torch.randn(1, 200, width, generator=gen).to(device))
            layer.end_prefill()
            layer.set_resident(torch.arange(0, 200, 3), 4)
        before = pool.bytes_to_device
        rows, fetched = build_resident_all(layers, torch.tensor([0, 1, 3, 4, 99, 150, 151, 199]), 4, batched=batched)
        assert fetched == len(layers) * 4  # 1, 4, 151, 199 are not resident (0, 3, 99, 150 are)
        results.append(([{k: v.view().cpu() for k, v in r.items()} for r in rows], pool.bytes_to_device - before))
        assert all(r["compressor"].capacity == 8 + 4 for r in rows)
    (unbatched, moved_a), (batched_rows, moved_b) = results
    assert moved_a == moved_b
    for a, b in zip(unbatched, batched_rows):
        for name in a:
            assert torch.equal(a[name], b[name])
