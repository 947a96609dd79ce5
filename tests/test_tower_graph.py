"""The trigger towers replayed as one CUDA graph (lsa_runtime/tower_graph.py) == the eager towers, bit for bit."""

import copy

import pytest
import torch

from tests.test_memory_indexer import random_indexer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")]


def test_graph_replay_equals_eager_towers_and_follows_weight_updates():
    indexer = random_indexer(7, layers=(2, 4, 6)).to("cuda", torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    for position in (517, 4099, 1 << 19):  # each replay takes its own h_t and t
        hidden = {L: (torch.randn(10, generator=gen) * 3).to("cuda", torch.bfloat16) for L in (2, 4, 6)}
        indexer.cuda_graphs = True
        q, w = indexer.trigger_queries(hidden, position)
        indexer.cuda_graphs = False
        q_eager, w_eager = indexer.trigger_queries(hidden, position)
        assert torch.equal(q, q_eager) and torch.equal(w, w_eager), position
    graph = indexer.tower_graph
    with torch.no_grad():  # in-place weight update: the same graph reads the new weights
        indexer.layer(4).W_IUQ.weight.mul_(2)
    indexer.cuda_graphs = True
    q, w = indexer.trigger_queries(hidden, position)
    assert indexer.tower_graph is graph
    indexer.cuda_graphs = False
    q_eager, _ = indexer.trigger_queries(hidden, position)
    assert torch.equal(q, q_eager)
    indexer.cuda_graphs = True
    indexer.float()  # weights moved: a new graph
    q32, _ = indexer.trigger_queries({L: h.float() for L, h in hidden.items()}, position)
    assert indexer.tower_graph is not graph and q32.dtype == torch.float32
    clone = copy.deepcopy(indexer)  # a captured graph does not travel
    assert clone.tower_graph is None and torch.equal(clone.trigger_queries(hidden, position)[0], q32)


def test_fetch_with_graph_equals_fetch_without():
    indexer = random_indexer(9, layers=(2, 4, 6)).to("cuda", torch.bfloat16)
    gen = torch.Generator().manual_seed(4)
    hidden = {L: (torch.randn(10, generator=gen) * 3).to("cuda", torch.bfloat16) for L in (2, 4, 6)}
    keys = {L: torch.randn(5000, 8, generator=gen).to("cuda", torch.bfloat16) for L in (2, 4, 6)}
    indexer.cuda_graphs = False
    scores = torch.sigmoid(indexer.trigger_logits(hidden, 20003, keys)[4])
    threshold = float(scores.median())  # a random indexer may score everything >= 0.5: cut where the set is mixed
    want = indexer.fetch(hidden, 20003, keys, threshold=threshold)
    indexer.cuda_graphs = True
    got = indexer.fetch(hidden, 20003, keys, threshold=threshold)
    assert indexer.tower_graph is not None  # the graph path ran
    assert torch.equal(got, want) and 0 < got.numel() < 5000
