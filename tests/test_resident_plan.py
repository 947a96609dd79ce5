"""One shared ResidentPlan for all CSA layers (lsa_cache.set_resident_all) gives exactly what each layer's own
set_resident gives: the same rows, ids, fetch counts and bytes, also when a layer's resident set differs."""

import torch

from lsa_runtime.backbone import csa_layers, load_config
from lsa_runtime.cold_pool import ColdPool
from lsa_runtime.lsa_cache import LSACSACache, build_lsa_cache, set_resident_all


def _layers(config, n_entries=200, seed=0):
    pool = ColdPool(csa_layers(config), {"compressor": config.head_dim, "indexer": config.index_head_dim},
                    torch.float32, initial_entries=n_entries)
    cache = build_lsa_cache(config, pool, [])
    gen = torch.Generator().manual_seed(seed)
    layers = [layer for layer in cache.layers if isinstance(layer, LSACSACache)]
    for layer in layers:
        for name, width in layer.widths.items():
            layer.update_compressor_states(name, torch.randn(1, n_entries, width, generator=gen))
        layer.end_prefill()
    return layers, pool


def test_shared_plan_equals_per_layer_set_resident():
    config = load_config("tiny")
    a, pool_a = _layers(config)
    b, pool_b = _layers(config)
    assert len(a) >= 3
    first = torch.arange(0, 200, 3)
    odd = torch.arange(1, 120, 2)  # one layer starts from another resident set: it needs its own plan
    for layers in (a, b):
        for i, layer in enumerate(layers):
            layer.set_resident(odd if i == 1 else first, 4)
    for ids in (torch.arange(0, 200, 5), torch.tensor([0, 3, 7, 9, 150, 199]), torch.tensor([0, 3, 7, 9, 150, 199])):
        before_a, before_b = pool_a.bytes_to_device, pool_b.bytes_to_device
        want = [layer.set_resident(ids, 4) for layer in a]
        fetched, moved = set_resident_all(b, ids, 4)
        assert fetched == sum(n for n, _ in want) and moved == sum(m for _, m in want)
        assert pool_a.bytes_to_device - before_a == pool_b.bytes_to_device - before_b == moved
        for la, lb in zip(a, b):
            assert torch.equal(la.resident_ids, lb.resident_ids) and torch.equal(lb.resident_ids, ids)
            for name in la.widths:
                assert torch.equal(la.resident[name].view(), lb.resident[name].view())
                # and the rows are the pool's rows of those entries
                assert torch.equal(lb.resident[name].view(), pool_b.host_rows(lb.layer_idx, name)[ids])
    assert moved == 0  # the last call repeated the set: nothing fetched
