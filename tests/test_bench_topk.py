"""bench/bench_topk.py's two-stage top-k: the same set of indices as torch.topk (the brute-force oracle)."""

import pytest
import torch

from bench.bench_topk import METHODS, same_sets, two_stage


@pytest.mark.parametrize(("batch", "n", "k", "segments"), [(1, 13125, 512, 8), (3, 13125, 512, 32), (2, 4097, 64, 7),
                                                           (2, 1000, 512, 8)])  # the last: segments narrower than k
def test_two_stage_picks_the_top_k(batch, n, k, segments):
    scores = torch.randn(batch, n, generator=torch.Generator().manual_seed(n))
    scores[0, n // 2:] = float("-inf")  # row 0 half masked, as the slots beyond a row's length are
    got, want = two_stage(scores, k, segments), scores.topk(k, dim=-1).indices
    assert got.shape == want.shape
    real = scores.gather(1, want) > float("-inf")
    # the real (finite) picks are the same entries; the -inf picks are any of the masked slots, as with topk
    for row in range(batch):
        assert set(got[row][scores[row, got[row]] > float("-inf")].tolist()) == set(want[row][real[row]].tolist())
    assert same_sets(got[1:], want[1:])


def test_every_method_agrees_on_distinct_scores():
    scores = torch.randn(4, 20000, generator=torch.Generator().manual_seed(1))
    want = scores.topk(512, dim=-1).indices
    for name, method in METHODS.items():
        assert same_sets(method(scores, 512), want), name
