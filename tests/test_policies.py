"""The resident set as the authors' release builds it (MemoryIndexerPolicy): threshold on the layers' combined
score, a recency tail, a sink, a cap; checked against sets written out by hand."""

from types import SimpleNamespace

import pytest
import torch

from lsa_runtime.config import SessionConfig, SessionError
from lsa_runtime.policies import MemoryIndexerPolicy, TriggerState, make_policy


class FixedScores:
    """A stand-in memory indexer whose layers score the entries with given logits."""

    def __init__(self, logits: dict[int, list[float]], **config):
        self.logits = {L: torch.tensor(v) for L, v in logits.items()}
        self.config = SimpleNamespace(**{"layers": tuple(self.logits), "csa_indices": (), "keep_recent": 0,
                                         "keep_first": 0, "ensemble": "max", "fetch_top": 0, "fetch_neighbours": 0,
                                         **config})

    def trigger_logits(self, hidden, position, keys, n_visible):
        return {L: v[:n_visible] for L, v in self.logits.items()}


def select(policy, n):
    return policy.select(TriggerState(position=4 * n, n_visible=n, trigger_index=0,
                                      resident=torch.zeros(0, dtype=torch.long))).tolist()


# logits: sigmoid >= 0.5 exactly where the logit is >= 0
L2 = [3.0, -1.0, 0.5, -2.0, -0.1, 2.0, -3.0, -4.0, 0.2, -1.0]
L4 = [-1.0, -1.0, -0.4, 1.0, -0.1, -2.5, -3.0, -4.0, -1.0, -1.0]


def test_threshold_over_the_max_of_the_layers_is_the_or_rule():
    assert select(MemoryIndexerPolicy(FixedScores({2: L2, 4: L4})), 10) == [0, 2, 3, 5, 8]


def test_mean_ensemble():
    # mean of the sigmoids >= 0.5: entries whose two logits average to a non-negative sigmoid mean
    policy = MemoryIndexerPolicy(FixedScores({2: L2, 4: L4}), ensemble="mean")
    expect = [s for s in range(10) if (torch.sigmoid(torch.tensor(L2[s])) + torch.sigmoid(torch.tensor(L4[s]))) / 2
              >= 0.5]
    assert select(policy, 10) == expect == [0, 2]


def test_recency_tail_and_sink_are_always_resident():
    policy = MemoryIndexerPolicy(FixedScores({2: L2, 4: L4}), keep_recent=3, keep_first=2)
    assert select(policy, 10) == [0, 1, 2, 3, 5, 7, 8, 9]
    assert select(policy, 4) == [0, 1, 2, 3]  # a short context: tail and sink cover it


def test_the_cap_keeps_tail_and_sink_then_the_best_scores():
    policy = MemoryIndexerPolicy(FixedScores({2: L2, 4: L4}), keep_recent=2, budget=4)
    # forced: 8, 9; selected outside them: 0 (3.0), 2 (0.5), 3 (1.0), 5 (2.0) -> the best two: 0 and 5
    assert select(policy, 10) == [0, 5, 8, 9]
    tight = MemoryIndexerPolicy(FixedScores({2: L2, 4: L4}), keep_recent=3, budget=2)
    assert select(tight, 10) == [7, 8, 9]  # the tail is kept even past the budget


def test_make_policy_takes_the_exports_settings_unless_the_config_overrides_them():
    indexer = FixedScores({2: L2, 4: L4})
    indexer.config.keep_recent, indexer.config.keep_first = 3, 1
    policy = make_policy(SessionConfig(mode="lsa").resolved(), indexer)
    assert (policy.keep_recent, policy.keep_first, policy.ensemble) == (3, 1, "max")
    policy = make_policy(SessionConfig(mode="lsa", keep_recent=0, ensemble="mean").resolved(), indexer)
    assert (policy.keep_recent, policy.keep_first, policy.ensemble) == (0, 1, "mean")
    with pytest.raises(SessionError, match="keep_recent"):
        SessionConfig(mode="lsa", keep_recent=-1)
    with pytest.raises(SessionError, match="ensemble"):
        SessionConfig(mode="lsa", ensemble="median")


def test_fetch_top_adds_each_layers_best_entries_whatever_their_score():
    # threshold 0.99 (logit >= 4.6): nothing passes it; the floor alone: layer 2's best two (0: 3.0, 5: 2.0) and
    # layer 4's (3: 1.0, 4: -0.1)
    assert select(MemoryIndexerPolicy(FixedScores({2: L2, 4: L4}), threshold=0.99, fetch_top=2), 10) == [0, 3, 4, 5]
    # with the threshold's own set: its union with the floor
    assert select(MemoryIndexerPolicy(FixedScores({2: L2, 4: L4}), fetch_top=2), 10) == [0, 2, 3, 4, 5, 8]
    # ties to the lower index: layer 4's -1.0 at 0, 1, 8, 9 after 3 (1.0), 4 (-0.1), 2 (-0.4); six take 0, 1, 8
    assert select(MemoryIndexerPolicy(FixedScores({4: L4}), threshold=0.99, fetch_top=6), 10) == [0, 1, 2, 3, 4, 8]
    assert select(MemoryIndexerPolicy(FixedScores({4: L4}), threshold=0.99, fetch_top=20), 3) == [0, 1, 2]
    # the cap: the tail (9) stays, then the best E of the rest (0: 3.0, 5: 2.0, 3: 1.0, 4: -0.1) -> 0 and 5
    capped = MemoryIndexerPolicy(FixedScores({2: L2, 4: L4}), threshold=0.99, fetch_top=2, keep_recent=1, budget=3)
    assert select(capped, 10) == [0, 5, 9]
    with pytest.raises(SessionError, match="fetch_top"):
        SessionConfig(mode="lsa", fetch_top=-1)


def test_make_policy_takes_the_exports_fetch_top_unless_the_config_overrides_it():
    indexer = FixedScores({2: L2, 4: L4})
    indexer.config.fetch_top = 2
    assert make_policy(SessionConfig(mode="lsa").resolved(), indexer).fetch_top == 2
    assert make_policy(SessionConfig(mode="lsa", fetch_top=0).resolved(), indexer).fetch_top == 0
    assert "top 2 per layer" in make_policy(SessionConfig(mode="lsa").resolved(), indexer).describe()


def test_distance_cap_reaches_the_memory_indexer_only_when_set():
    class Recording(FixedScores):
        def trigger_logits(self, hidden, position, keys, n_visible, **options):
            self.options = options
            return super().trigger_logits(hidden, position, keys, n_visible)

    indexer = Recording({2: L2, 4: L4})
    capped = make_policy(SessionConfig(mode="lsa", distance_cap=65536).resolved(), indexer)
    assert select(capped, 10) == [0, 2, 3, 5, 8] and indexer.options == {"distance_cap": 65536}
    assert "distances capped at 65536" in capped.describe()
    assert select(make_policy(SessionConfig(mode="lsa", distance_cap=0).resolved(), indexer), 10) == [0, 2, 3, 5, 8]
    assert indexer.options == {}  # off: the plain call a memory indexer without the option takes
    for bad in (-1, 2.5, True, "-1", "64K", "train"):
        with pytest.raises(SessionError, match="distance_cap"):
            SessionConfig(mode="lsa", distance_cap=bad)
    assert SessionConfig(mode="lsa", distance_cap="65536").distance_cap == 65536  # the command line's text


def test_distance_cap_trained_is_the_exports_training_distance_and_refused_without_one():
    trained = FixedScores({2: L2, 4: L4}, trained_distance=40960)
    policy = make_policy(SessionConfig(mode="lsa", distance_cap="trained").resolved(), trained)
    assert policy.distance_cap == 40960 and "distances capped at 40960" in policy.describe()
    for unknown in (FixedScores({2: L2, 4: L4}), FixedScores({2: L2, 4: L4}, trained_distance=0)):
        with pytest.raises(SessionError, match="records no training distance.*--distance-cap 65536"):
            make_policy(SessionConfig(mode="lsa", distance_cap="trained").resolved(), unknown)


def _pages_by_hand(selected: list[bool], forced: list[bool], size: int, k: int,
                   score: list[float] | None = None) -> list[int]:
    """Page recall written out plainly: rank pages by (holds a forced entry, selected count, [best score,] index),
    keep k."""
    pages = [range(p, min(p + size, len(selected))) for p in range(0, len(selected), size)]
    best = [max(score[s] for s in page) if score else 0.0 for page in pages]
    ranked = sorted(range(len(pages)), key=lambda i: (any(forced[s] for s in pages[i]),
                                                      sum(selected[s] for s in pages[i]), best[i], i), reverse=True)
    return sorted(s for i in ranked[:k] for s in pages[i])


def test_page_recall_keeps_whole_pages_ranked_by_their_selected_entries():
    # threshold 0.5 selects 0, 2, 3, 5, 8 (the OR rule above); pages of 3: {0,1,2}: 2, {3,4,5}: 2, {6,7,8}: 1, {9}: 0
    paged = MemoryIndexerPolicy(FixedScores({2: L2, 4: L4}), page_size=3, max_pages=2)
    assert select(paged, 10) == [0, 1, 2, 3, 4, 5]  # the tie between the first two pages does not matter at k = 2
    # one page: of the two with 2 selected entries, the more recent
    assert select(MemoryIndexerPolicy(FixedScores({2: L2, 4: L4}), page_size=3, max_pages=1), 10) == [3, 4, 5]
    # the tail's page ranks first (entry 9 alone in its page), then the best count
    tail = MemoryIndexerPolicy(FixedScores({2: L2, 4: L4}), page_size=3, max_pages=2, keep_recent=1)
    assert select(tail, 10) == [3, 4, 5, 9]
    # the sink's page too; with four pages asked of four, everything
    sink = MemoryIndexerPolicy(FixedScores({2: L2, 4: L4}), threshold=0.99, page_size=3, max_pages=2, keep_first=1,
                               keep_recent=2)
    # nothing selected; the tail 8, 9 spans two pages, {6,7,8} and {9}, the sink one, {0,1,2}: three forced pages for
    # two, the more recent win (the release's top-K over +inf leaves that choice to topk)
    assert select(sink, 10) == [6, 7, 8, 9]
    sink.max_pages = 3
    assert select(sink, 10) == [0, 1, 2, 6, 7, 8, 9]
    assert select(MemoryIndexerPolicy(FixedScores({2: L2}), page_size=3, max_pages=9), 10) == list(range(10))
    # against the plain rewrite on random scores, floors, tails, sinks and page sizes
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        n = int(torch.randint(1, 60, (1,), generator=g))
        logits = {2: torch.randn(n, generator=g).tolist(), 4: torch.randn(n, generator=g).tolist()}
        size, k = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g))
        recent, first, top = (int(torch.randint(0, 6, (1,), generator=g)) for _ in range(3))
        policy = MemoryIndexerPolicy(FixedScores(logits), threshold=0.7, keep_recent=recent, keep_first=first,
                                     fetch_top=top, page_size=size, max_pages=k)
        plain = MemoryIndexerPolicy(FixedScores(logits), threshold=0.7, fetch_top=top)
        chosen = set(select(plain, n))
        selected = [s in chosen for s in range(n)]
        forced = [s >= n - recent or s < first for s in range(n)]
        assert select(policy, n) == _pages_by_hand(selected, forced, size, k), trial
        assert len(select(policy, n)) <= policy.max_selected()
        by_score = MemoryIndexerPolicy(FixedScores(logits), threshold=0.7, keep_recent=recent, keep_first=first,
                                       fetch_top=top, page_size=size, max_pages=k, page_ties="score")
        score = [max(torch.sigmoid(torch.tensor(v[s])).item() for v in logits.values()) for s in range(n)]
        assert select(by_score, n) == _pages_by_hand(selected, forced, size, k, score), trial


def test_page_ties_by_score_keep_the_page_with_the_best_entry():
    # pages of 3: {0,1,2} and {3,4,5} hold 2 selected entries each; the first's best logit is 3.0 (entry 0), the
    # second's 2.0 (entry 5): one page, the release keeps the newer, the score rule the first
    for ties, expect in (("recent", [3, 4, 5]), ("score", [0, 1, 2])):
        policy = MemoryIndexerPolicy(FixedScores({2: L2, 4: L4}), page_size=3, max_pages=1, page_ties=ties)
        assert select(policy, 10) == expect, ties
    # the count still comes first: pages of 2, {0,1} holds the best entry (3.0) but one selection, {2,3} two
    policy = MemoryIndexerPolicy(FixedScores({2: L2, 4: L4}), page_size=2, max_pages=1, page_ties="score")
    assert select(policy, 10) == [2, 3]
    # a forced page before any count: the tail's {8,9} first, then {2,3} (2), then {0,1} (3.0) over {4,5} (2.0)
    tail = MemoryIndexerPolicy(FixedScores({2: L2, 4: L4}), page_size=2, max_pages=3, keep_recent=1,
                               page_ties="score")
    assert select(tail, 10) == [0, 1, 2, 3, 8, 9]
    with pytest.raises(SessionError, match="page_ties"):
        SessionConfig(mode="lsa", page_size=8, max_pages=4, page_ties="best")
    policy = make_policy(SessionConfig(mode="lsa", page_size=8, max_pages=4, page_ties="score").resolved(),
                         FixedScores({2: L2}))
    assert policy.page_ties == "score" and "page ties by score" in policy.describe()


def test_page_recall_is_configured_whole():
    with pytest.raises(SessionError, match="page recall needs both"):
        SessionConfig(mode="lsa", page_size=8)
    with pytest.raises(SessionError, match="no budget"):
        SessionConfig(mode="lsa", page_size=8, max_pages=4, budget=100)
    with pytest.raises(SessionError, match="max_pages"):
        SessionConfig(mode="lsa", page_size=8, max_pages=-1)
    policy = make_policy(SessionConfig(mode="lsa", page_size=8, max_pages=4).resolved(), FixedScores({2: L2}))
    assert (policy.page_size, policy.max_pages) == (8, 4) and "4 pages of 8" in policy.describe()
    assert make_policy(SessionConfig(mode="lsa").resolved(), FixedScores({2: L2})).page_size == 0


def test_fetch_neighbours_brings_the_entries_beside_each_selected_one():
    # threshold 0.9 selects entry 0 alone (sigmoid 3.0 = 0.95); 0.7 selects 0, 3 (1.0: 0.73) and 5 (2.0: 0.88)
    assert select(MemoryIndexerPolicy(FixedScores({2: L2, 4: L4}), threshold=0.9, fetch_neighbours=1), 10) == [0, 1]
    assert select(MemoryIndexerPolicy(FixedScores({2: L2, 4: L4}), threshold=0.9, fetch_neighbours=2), 10) == [0, 1, 2]
    wide = MemoryIndexerPolicy(FixedScores({2: L2, 4: L4}), threshold=0.7, fetch_neighbours=1, keep_recent=1)
    assert select(wide, 10) == [0, 1, 2, 3, 4, 5, 6, 9]  # the tail (9) brings no neighbour
    # under a budget each entry ranks by the best selected score within its reach: 0 and 1 by entry 0 (0.95), 4, 5
    # and 6 by entry 5 (0.88), 2 and 3 by entry 3 (0.73); room for 5 beside the tail
    capped = MemoryIndexerPolicy(FixedScores({2: L2, 4: L4}), threshold=0.7, fetch_neighbours=1, keep_recent=1,
                                 budget=6)
    assert select(capped, 10) == [0, 1, 4, 5, 6, 9]
    # against the plain rewrite on random scores, floors, tails, sinks and widths
    g = torch.Generator().manual_seed(1)
    for trial in range(200):
        n = int(torch.randint(1, 60, (1,), generator=g))
        logits = {2: torch.randn(n, generator=g).tolist(), 4: torch.randn(n, generator=g).tolist()}
        recent, first, top, w = (int(torch.randint(0, 6, (1,), generator=g)) for _ in range(4))
        chosen = set(select(MemoryIndexerPolicy(FixedScores(logits), threshold=0.7, fetch_top=top), n))
        by_hand = sorted({s for s in range(n) if any(abs(s - c) <= w for c in chosen) or s >= n - recent or s < first})
        policy = MemoryIndexerPolicy(FixedScores(logits), threshold=0.7, keep_recent=recent, keep_first=first,
                                     fetch_top=top, fetch_neighbours=w)
        assert select(policy, n) == by_hand, trial


def test_fetch_neighbours_is_refused_with_page_recall_and_below_zero():
    for config in ({"page_size": 8, "max_pages": 4, "fetch_neighbours": 1}, {"fetch_neighbours": -1},
                   {"fetch_neighbours": 1.5}):
        with pytest.raises(SessionError, match="fetch_neighbours"):
            SessionConfig(mode="lsa", **config)
    with pytest.raises(SessionError, match="fetch_neighbours"):
        MemoryIndexerPolicy(FixedScores({2: L2}), page_size=2, max_pages=1, fetch_neighbours=1)
    policy = make_policy(SessionConfig(mode="lsa", fetch_neighbours=2).resolved(), FixedScores({2: L2}))
    assert policy.fetch_neighbours == 2 and "2 neighbours each side" in policy.describe()
    assert make_policy(SessionConfig(mode="lsa").resolved(), FixedScores({2: L2})).fetch_neighbours == 0


def test_fetch_neighbours_defaults_to_the_exports_and_page_recall_overrides_it():
    """An export written with neighbours (fm-index export --fetch-neighbours) brings them unless the session asks for
    another count (0 included) or for page recall, which brings whole pages instead."""
    exported = FixedScores({2: L2, 4: L4}, fetch_neighbours=1)
    policy = make_policy(SessionConfig(mode="lsa", threshold=0.9).resolved(), exported)
    assert policy.fetch_neighbours == 1 and select(policy, 10) == [0, 1]  # entry 0 (3.0 >= logit(0.9)) and its right
    off = make_policy(SessionConfig(mode="lsa", threshold=0.9, fetch_neighbours=0).resolved(), exported)
    assert off.fetch_neighbours == 0 and select(off, 10) == [0]
    assert make_policy(SessionConfig(mode="lsa", fetch_neighbours=2).resolved(), exported).fetch_neighbours == 2
    pages = make_policy(SessionConfig(mode="lsa", page_size=2, max_pages=1).resolved(), exported)
    assert pages.fetch_neighbours == 0 and pages.page_size == 2
