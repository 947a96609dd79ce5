"""The device-side cold-pool gather returns exactly source[ids] (Triton interpreter on CPU, or a GPU)."""

import os

import pytest
import torch

from lsa_runtime.kernels.pool_gather import gather_rows, zero_copy_available


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs a CUDA device with pinned memory, or TRITON_INTERPRET=1 with triton installed")
@pytest.mark.parametrize("width,programs", [(32, None), (300, None), (512, None), (300, 1), (512, 3)])
def test_gather_rows_equals_index_select(width, programs):
    """Every block of rows gathered, with one program per block or a few taking them in turn."""
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
    gather_rows(source, ids, device, out=out, programs=programs)
    assert torch.equal(out.cpu(), source[ids])
    assert gather_rows(source, ids[:0], device).shape == (0, width)


def test_grid_caps_the_programs():
    from lsa_runtime.kernels import pool_gather

    assert [pool_gather._grid(b, p) for b, p in ((10, 0), (10, 4), (3, 4), (0, 4), (0, 0))] == [10, 4, 3, 1, 1]
    with pytest.raises(ValueError, match="programs"):
        pool_gather._grid(10, -1)


def test_not_available_without_a_gpu_target():
    source = torch.zeros(4, 8)
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert not zero_copy_available(source, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs a CUDA device with pinned memory, or TRITON_INTERPRET=1 with triton installed")
@pytest.mark.parametrize("width,programs", [(32, None), (512, None), (32, 2), (512, 7)])
def test_gather_rows_layers_equals_per_layer_indexing(width, programs):
    """One launch for all layers: out[l, dst_rows] == sources[l][ids], other rows untouched, sources of
    different lengths (pool rows grow per layer); with a program per (block, layer) or a few taking them in turn
    (77 rows: 5 blocks x 5 layers, so 2 and 7 programs end on different layers)."""
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
    gather_rows_layers(sources, ids.to(device), dst_rows.to(device), out, programs=programs)
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
    """ResidentSet.change_to, batched (a shared store, two multi-layer gathers per row kind) == per layer, and both
    hold the pool's rows of the resident entries."""
    pytest.importorskip("triton")
    from lsa_runtime.backbone import csa_layers, load_config
    from lsa_runtime.cold_pool import ColdPool
    from lsa_runtime.residency import ResidentSet

    config = load_config("tiny")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    widths = {"compressor": config.head_dim, "indexer": config.index_head_dim}
    results = []
    for batched in (False, True):
        pool = ColdPool(csa_layers(config), widths, torch.float32, initial_entries=64)
        gen = torch.Generator().manual_seed(0)
        for layer in csa_layers(config):
            for name, width in widths.items():
                pool.append(layer, name, torch.randn(200, width, generator=gen).to(device))
        residency = ResidentSet(csa_layers(config), widths, pool, device, torch.float32, batched=batched)
        residency.change_to(torch.arange(0, 200, 3), 4)
        before = pool.moved_bytes("fetch")
        change = residency.change_to(torch.tensor([0, 1, 3, 4, 99, 150, 151, 199]), 4)
        assert change.fetched == 4  # 1, 4, 151, 199 are not resident (0, 3, 99, 150 are)
        rows = {(layer, name): residency.rows(layer, name).cpu() for layer in residency.layers for name in widths}
        for (layer, name), got in rows.items():
            assert torch.equal(got, pool.host_rows(layer, name)[residency.ids])
        assert all(t.shape[0] == 8 + 4 for layer in residency.layers for t in residency.device_tensors(layer).values())
        results.append((rows, pool.moved_bytes("fetch") - before))
    (unbatched, moved_a), (batched_rows, moved_b) = results
    assert moved_a == moved_b == 4 * len(csa_layers(config)) * sum(widths.values()) * 4
    for key in unbatched:
        assert torch.equal(unbatched[key], batched_rows[key])


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs a CUDA device with pinned memory, or TRITON_INTERPRET=1 with triton installed")
def test_static_resident_rows_install_with_the_multi_layer_gathers():
    """StaticResidentRows where the pool's multi-layer gather runs (two launches per row kind: kept slots, fetched
    rows): install, then prepare + install_prepared with entries born in between, leave every CSA layer's slots
    holding the pool's rows of the resident ids (born rows after them), the lengths set, the other row untouched."""
    pytest.importorskip("triton")
    from lsa_runtime.backbone import csa_layers, load_config
    from lsa_runtime.cold_pool import ColdPool
    from lsa_runtime.static_decode import StaticDecodeState
    from lsa_runtime.static_residency import StaticResidentRows

    config = load_config("tiny")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layers = csa_layers(config)
    widths = {"compressor": config.head_dim, "indexer": config.index_head_dim}
    state = StaticDecodeState(config, 2, 64, torch.float32, device, resident=40)
    positions = [0, 0]  # tokens seen per row, as the runner counts them
    rows = StaticResidentRows(state, layers, positions)
    pool = ColdPool(layers, widths, torch.float32, initial_entries=64)
    assert pool.gather_layers_available(device)  # the path under test
    gen = torch.Generator().manual_seed(0)
    for layer in layers:
        for name, width in widths.items():
            pool.append(layer, name, torch.randn(200, width, generator=gen).to(device))
    store = lambda layer, name: getattr(state.layers[layer], name)  # noqa: E731
    other = {(layer, name): store(layer, name).entries[0].clone() for layer in layers for name in widths}
    first = torch.arange(0, 60, 3)  # 20 entries resident in row 1's slots
    for layer in layers:
        for name in widths:
            store(layer, name).entries[1, :20] = pool.host_rows(layer, name)[first].to(device)
            store(layer, name).lengths[1] = 20
    rows.ids[1], rows.pools[1], rows.filled[1], rows.marks[1] = first.to(device), pool, 20, (20, 0)  # ids on the device

    def holds(ids, born=None):
        for layer in layers:
            for name in widths:
                want = pool.host_rows(layer, name)[ids]
                if born is not None:
                    want = torch.cat([want, born[(layer, name)]])
                got = store(layer, name).entries[1, :want.shape[0]].cpu()
                assert torch.equal(got, want) and int(store(layer, name).lengths[1]) == want.shape[0]
                assert torch.equal(store(layer, name).entries[0], other[(layer, name)])

    change = rows.install(1, torch.tensor([0, 1, 3, 4, 99, 150, 151, 199, 57]), 8)
    assert (change.selected, change.fetched) == (9, 6)  # 0, 3, 57 were resident; 1, 4, 99, 150, 151, 199 not
    holds(torch.tensor([0, 1, 3, 4, 57, 99, 150, 151, 199]))
    snapshot, filled = rows.ids[1].clone(), rows.filled[1]
    prepared = rows.prepare(1, torch.tensor([3, 5, 57, 120, 199, 7, 8]), snapshot, filled)
    assert prepared.fetched == 4  # 5, 7, 8, 120
    born = {}  # two entries emitted after the snapshot: slots 9 and 10
    for layer in layers:
        for name, width in widths.items():
            born[(layer, name)] = torch.randn(2, width, generator=gen)
            store(layer, name).entries[1, 9:11] = born[(layer, name)].to(device)
            store(layer, name).lengths[1] = 11
    positions[1] += 8  # the two windows of 4 tokens that closed: the host's count of those entries
    assert rows.length(1) == 11
    change = rows.install_prepared(1, prepared, 8)
    assert (change.selected, change.fetched) == (7, 4)
    holds(torch.tensor([3, 5, 7, 8, 57, 120, 199]), born)
    assert torch.equal(rows.ids[1].cpu(), torch.tensor([3, 5, 7, 8, 57, 120, 199, 200, 201]))  # born: 200, 201
