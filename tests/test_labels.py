"""The streaming label math equals a brute-force oracle written independently with numpy and Python loops."""

import numpy as np
import pytest
import torch

from indexer_train.labels import WindowLabeler, nucleus_mask, trigger_positions, visible_softmax


def oracle_nucleus(probs_row: np.ndarray, p: float) -> set[int]:
    """Stable sort by (-probability, index); shortest prefix whose float64 mass reaches p."""
    order = sorted(range(len(probs_row)), key=lambda s: (-probs_row[s], s))
    order = [s for s in order if probs_row[s] > 0]
    mass = np.cumsum(np.array([probs_row[s] for s in order], dtype=np.float64))
    for i, m in enumerate(mass):
        if m >= p:
            return set(order[: i + 1])
    return set(order)


def oracle_document(logits: dict, picks: dict, n_tokens: int, tau: int, rate: int, p: float, votes: int):
    """Per trigger: (positives, native_topk_union, n_candidates) from full [N, T] logits, by plain loops."""
    golden, topk_sets, cand = {}, {}, {}
    for t in range(n_tokens):
        nv = (t + 1) // rate
        counts: dict[int, int] = {}
        cand[t], topk_sets[t] = set(), set()
        for layer in logits:
            row = logits[layer][t, :nv].astype(np.float32)
            if nv == 0:
                continue
            probs = torch.softmax(torch.from_numpy(row), -1).numpy()
            for s in oracle_nucleus(probs, p):
                counts[s] = counts.get(s, 0) + 1
                cand[t].add(s)
            topk_sets[t] |= {int(s) for s in picks[layer][t] if s >= 0}
        golden[t] = {s for s, c in counts.items() if c >= votes}
    out = {}
    for t0 in trigger_positions(n_tokens, tau):
        nv0 = (t0 + 1) // rate
        window = range(t0, t0 + tau)
        pos = sorted({s for t in window for s in golden[t] if s < nv0})
        top = sorted({s for t in window for s in topk_sets[t] if s < nv0})
        n_c = len({s for t in window for s in cand[t] if s < nv0})
        out[t0] = (pos, top, n_c)
    return out


def test_visible_softmax_matches_sliced_softmax():
    torch.manual_seed(0)
    logits = torch.randn(6, 10)
    nv = torch.tensor([0, 1, 3, 5, 9, 10])
    probs = visible_softmax(logits, nv)
    for r in range(6):
        n = int(nv[r])
        assert torch.all(probs[r, n:] == 0)
        if n:
            torch.testing.assert_close(probs[r, :n], torch.softmax(logits[r, :n], -1))


@pytest.mark.parametrize("p", [0.1, 0.6, 0.9, 0.999])
@pytest.mark.parametrize("first_k", [1, 4, 64])
def test_nucleus_equals_oracle_with_ties(p, first_k):
    gen = torch.Generator().manual_seed(int(p * 1000) + first_k)
    # Quantised logits create many exact ties, the hard case for a top-k based nucleus.
    logits = torch.randint(-3, 4, (40, 57), generator=gen).float() * 0.5
    nv = torch.randint(0, 58, (40,), generator=gen)
    probs = visible_softmax(logits, nv)
    mask = nucleus_mask(probs, p, first_k=first_k)
    for r in range(40):
        expect = oracle_nucleus(probs[r].numpy(), p)
        assert set(torch.nonzero(mask[r]).flatten().tolist()) == expect, r


def test_nucleus_of_a_hand_checked_row():
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.2, 0.1]])
    # 0.4 -> 0.6 reaches p=0.6 with entries 1 and the lower-indexed of the tied 0.2s (entry 2).
    assert nucleus_mask(probs, 0.6, first_k=1)[0].nonzero().flatten().tolist() == [1, 2]
    assert nucleus_mask(probs, 0.61, first_k=1)[0].nonzero().flatten().tolist() == [1, 2, 3]


def test_trigger_positions():
    assert trigger_positions(127, 64) == []
    assert trigger_positions(128, 64) == [64]
    assert trigger_positions(300, 64) == [64, 128, 192]


@pytest.mark.parametrize("tau,p,votes,chunk", [(8, 0.6, 3, 13), (16, 0.3, 1, 16), (12, 0.9, 5, 50), (8, 0.6, 2, 7)])
def test_window_labeler_equals_oracle(tau, p, votes, chunk):
    gen = torch.Generator().manual_seed(tau * 100 + votes)
    n, rate, n_layers, k = 90, 4, 5, 3
    t_total = n // rate
    logits = {L: (torch.randn(n, t_total, generator=gen) * 2).round(decimals=1) for L in range(n_layers)}
    picks = {}
    for L in range(n_layers):
        pk = torch.randint(0, t_total, (n, k), generator=gen)
        nv = ((torch.arange(n) + 1) // rate).unsqueeze(1)
        picks[L] = torch.where(pk < nv, pk, torch.full_like(pk, -1))
    labeler = WindowLabeler(n_tokens=n, tau=tau, rate=rate, nucleus=p, min_votes=votes, first_k=2)
    got = {}
    for start in range(0, n, chunk):
        length = min(chunk, n - start)
        t_chunk = (start + length) // rate  # entries emitted by the end of the chunk (as the model has them)
        labeler.start_chunk(start, length)
        for L in range(n_layers):
            labeler.add_logits(logits[L][start : start + length, :t_chunk])
            labeler.add_topk(picks[L][start : start + length], t_chunk)
        for trig in labeler.end_chunk():
            got[trig.position] = (trig.positives.tolist(), trig.native_topk_union.tolist(), trig.n_candidates)
    expect = oracle_document({L: v.numpy() for L, v in logits.items()}, {L: v.numpy() for L, v in picks.items()},
                             n, tau, rate, p, votes)
    assert got == expect
    assert any(len(v[0]) for v in got.values())
