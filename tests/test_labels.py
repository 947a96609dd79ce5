"""The streaming label math equals a brute-force oracle written independently with numpy and Python loops."""

import numpy as np
import pytest
import torch

from indexer_train.labels import WindowLabeler, nucleus_mask, topk_nucleus_mask, trigger_positions, visible_softmax


def oracle_nucleus(probs_row: np.ndarray, p: float) -> set[int]:
    """Stable sort by (-probability, index); shortest prefix whose float64 mass reaches p."""
    order = sorted(range(len(probs_row)), key=lambda s: (-probs_row[s], s))
    order = [s for s in order if probs_row[s] > 0]
    mass = np.cumsum(np.array([probs_row[s] for s in order], dtype=np.float64))
    for i, m in enumerate(mass):
        if m >= p:
            return set(order[: i + 1])
    return set(order)


def oracle_topk_nucleus(logits_row: np.ndarray, picks_row: np.ndarray, p: float) -> set[int]:
    """The release's rule, by loops: softmax over the picked entries' logits (the same vector torch sees, -inf at
    empty picks), sorted by (-probability, entry), entry kept while the float64 mass before it is <= p."""
    values = np.array([logits_row[s] if s >= 0 else -np.inf for s in picks_row], dtype=np.float32)
    if not np.isfinite(values).any():
        return set()
    probs = torch.softmax(torch.from_numpy(values), -1).numpy()
    ranked = sorted((float(-probs[i]), int(s), i) for i, s in enumerate(picks_row) if s >= 0)
    kept, before = set(), 0.0
    for _, s, i in ranked:
        if before <= p:
            kept.add(s)
        before += float(np.float64(probs[i]))
    return kept


def oracle_document(logits: dict, picks: dict, n_tokens: int, tau: int, rate: int, p: float, votes: int,
                    softmax_over: str = "visible", first: int | None = None):
    """Per trigger: (positives, native_topk_union, n_candidates) from full [N, T] logits, by plain loops."""
    golden, topk_sets, cand = {}, {}, {}
    for t in range(n_tokens):
        nv = (t + 1) // rate
        counts: dict[int, int] = {}
        cand[t], topk_sets[t] = set(), set()
        for layer in logits:
            if softmax_over == "topk":
                nucleus = oracle_topk_nucleus(logits[layer][t], picks[layer][t], p)
            else:
                row = logits[layer][t, :nv].astype(np.float32)
                if nv == 0:
                    continue
                nucleus = oracle_nucleus(torch.softmax(torch.from_numpy(row), -1).numpy(), p)
            for s in nucleus:
                counts[s] = counts.get(s, 0) + 1
                cand[t].add(s)
            topk_sets[t] |= {int(s) for s in picks[layer][t] if s >= 0}
        golden[t] = {s for s, c in counts.items() if c >= votes}
    out = {}
    for t0 in trigger_positions(n_tokens, tau, first):
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


def test_topk_nucleus_of_a_hand_checked_row():
    """Picks 3, 0, 4 of a row; their softmax over logits ln(5), ln(3), ln(2) is 0.5, 0.3, 0.2."""
    logits = torch.tensor([[np.log(3.0), 9.0, 9.0, np.log(5.0), np.log(2.0)]])
    picks = torch.tensor([[3, 0, 4, -1]])
    for p, kept in [(0.4, [3]), (0.5, [0, 3]), (0.79, [0, 3]), (0.81, [0, 3, 4]), (1.0, [0, 3, 4])]:
        assert topk_nucleus_mask(logits, picks, p)[0].nonzero().flatten().tolist() == kept, p
    assert not topk_nucleus_mask(logits, torch.full((1, 3), -1), 0.6).any()  # no pick: nothing golden


@pytest.mark.parametrize("p", [0.1, 0.6, 0.9, 1.0])
def test_topk_nucleus_equals_oracle_with_ties(p):
    gen = torch.Generator().manual_seed(int(p * 100))
    logits = torch.randint(-3, 4, (40, 57), generator=gen).float() * 0.5  # many exact ties
    picks = torch.stack([torch.randperm(57, generator=gen)[:12] for _ in range(40)])
    picks[::5, -4:] = -1  # rows with fewer valid picks (early queries)
    mask = topk_nucleus_mask(logits, picks, p)
    for r in range(40):
        expect = oracle_topk_nucleus(logits[r].numpy(), picks[r].numpy(), p)
        assert set(torch.nonzero(mask[r]).flatten().tolist()) == expect, r


@pytest.mark.parametrize("tau,p,votes,chunk,softmax_over,first", [
    (8, 0.6, 3, 13, "visible", None), (16, 0.3, 1, 16, "visible", None), (12, 0.9, 5, 50, "visible", None),
    (8, 0.6, 2, 7, "visible", None), (8, 0.6, 3, 13, "topk", None), (16, 0.3, 1, 16, "topk", None),
    (12, 0.9, 2, 50, "topk", None), (8, 0.6, 2, 7, "topk", 37)])
def test_window_labeler_equals_oracle(tau, p, votes, chunk, softmax_over, first):
    gen = torch.Generator().manual_seed(tau * 100 + votes)
    n, rate, n_layers, k = 90, 4, 5, 3
    t_total = n // rate
    logits = {L: (torch.randn(n, t_total, generator=gen) * 2).round(decimals=1) for L in range(n_layers)}
    picks = {}
    for L in range(n_layers):
        pk = torch.randint(0, t_total, (n, k), generator=gen)
        nv = ((torch.arange(n) + 1) // rate).unsqueeze(1)
        picks[L] = torch.where(pk < nv, pk, torch.full_like(pk, -1))
    labeler = WindowLabeler(n_tokens=n, tau=tau, rate=rate, nucleus=p, min_votes=votes, first_k=2,
                            softmax_over=softmax_over, first_trigger=first)
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
                             n, tau, rate, p, votes, softmax_over, first)
    assert got == expect and sorted(got) == trigger_positions(n, tau, first)
    assert any(len(v[0]) for v in got.values())
