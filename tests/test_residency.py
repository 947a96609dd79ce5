"""The ResidentSet: one set of entries for every CSA layer. Oracles: the cold pool's own rows of the resident
entries (indexed on the host), hand-counted fetches and bytes, and a change made in one step (change_to) against
the same change made in two (prepare on a snapshot, then install)."""

import pytest
import torch

from lsa_runtime.backbone import csa_layers, load_config
from lsa_runtime.cold_pool import ColdPool
from lsa_runtime.residency import ResidentSet

N = 200


def filled(config, seed=0):
    """A pool holding N entries of every CSA layer, and an empty ResidentSet over it."""
    widths = {"compressor": config.head_dim, "indexer": config.index_head_dim}
    layers = csa_layers(config)
    pool = ColdPool(layers, widths, torch.float32, initial_entries=N)
    gen = torch.Generator().manual_seed(seed)
    for layer in layers:
        for name, width in widths.items():
            pool.append(layer, name, torch.randn(N, width, generator=gen))
    return ResidentSet(layers, widths, pool, "cpu", torch.float32), pool


def assert_rows_are_the_pools(residency, pool):
    for layer in residency.layers:
        for name in ("compressor", "indexer"):
            assert torch.equal(residency.rows(layer, name), pool.host_rows(layer, name)[residency.ids])


def test_change_to_holds_the_pool_rows_and_counts_what_it_fetches():
    config = load_config("tiny")
    residency, pool = filled(config)
    row_bytes = (config.head_dim + config.index_head_dim) * 4 * len(residency.layers)  # one entry, every layer
    first = torch.arange(0, N, 3)
    residency.change_to(first, 4)
    assert torch.equal(residency.ids, first) and residency.count == first.numel()
    assert_rows_are_the_pools(residency, pool)
    assert pool.moved_bytes("fetch") == first.numel() * row_bytes and pool.moved_bytes("prefill") == 0
    ids = torch.tensor([199, 0, 3, 7, 9, 150, 3])  # any order, repeats: the set is sorted and unique
    change = residency.change_to(ids, 4)
    assert torch.equal(residency.ids, torch.tensor([0, 3, 7, 9, 150, 199]))
    assert change.selected == 6 and change.fetched == 2  # 7 and 9 were not resident; 0, 3, 150, 199 were
    assert pool.moved_bytes("fetch") == (first.numel() + 2) * row_bytes
    assert_rows_are_the_pools(residency, pool)
    again = residency.change_to(residency.ids, 4)
    assert again.fetched == 0 and pool.moved_bytes("fetch") == (first.numel() + 2) * row_bytes
    assert [c.selected for c in residency.changes] == [first.numel(), 6, 6]


def test_born_entries_join_once_whatever_the_number_of_layers():
    config = load_config("tiny")
    residency, pool = filled(config)
    residency.change_to(torch.tensor([2, 5]), 2)
    gen = torch.Generator().manual_seed(1)
    for first in (N, N + 1, N + 2):  # three decode windows, one entry each, emitted by every layer in turn
        for layer in residency.layers:
            for name, width in residency.widths.items():
                row = torch.randn(1, width, generator=gen)
                pool.append(layer, name, row)
                residency.append_born(layer, name, row, first)
        assert torch.equal(residency.ids, torch.tensor([2, 5, *range(N, first + 1)]))
    assert_rows_are_the_pools(residency, pool)  # past the headroom of 2 rows too (they grew)


def test_prepare_then_install_equals_change_to_with_the_born_entries_appended():
    config = load_config("tiny")
    a, pool_a = filled(config, seed=4)
    b, pool_b = filled(config, seed=4)
    for residency in (a, b):
        residency.change_to(torch.arange(0, N, 2), 4)
    snapshot = b.snapshot()
    selection = torch.arange(1, N, 5)
    prepared = b.prepare(snapshot, selection, 4)  # planned from the snapshot; b is unchanged meanwhile
    assert torch.equal(b.ids, torch.arange(0, N, 2))
    for residency, pool in ((a, pool_a), (b, pool_b)):  # the same entry is born in both before the swap
        g = torch.Generator().manual_seed(2)
        for layer in residency.layers:
            for name, width in residency.widths.items():
                row = torch.randn(1, width, generator=g)
                pool.append(layer, name, row)
                residency.append_born(layer, name, row, N)
    change = b.install(prepared)
    a.change_to(selection, 4)
    a_ids = torch.cat([a.ids, torch.tensor([N])])  # change_to selects only; install keeps the newborn
    assert torch.equal(b.ids, a_ids) and change.selected == selection.numel()
    assert change.fetched == a.changes[-1].fetched
    assert_rows_are_the_pools(b, pool_b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_layers_on_two_devices_keep_their_rows_beside_them():
    """A backbone spread over a GPU and the CPU: each layer's rows live on its own device, batched per device,
    and hold the pool's rows of the resident entries (the same as on one device)."""
    config = load_config("tiny")
    residency, pool = filled(config)
    split = ResidentSet(residency.layers, residency.widths, pool,
                        {L: ("cuda" if i % 2 else "cpu") for i, L in enumerate(residency.layers)}, torch.float32)
    for ids in (torch.arange(0, N, 3), torch.arange(50, N)):
        split.change_to(ids, 4)
        residency.change_to(ids, 4)
        for i, layer in enumerate(split.layers):
            for name in ("compressor", "indexer"):
                rows = split.rows(layer, name)
                assert rows.device.type == ("cuda" if i % 2 else "cpu")
                assert torch.equal(rows.cpu(), residency.rows(layer, name))
