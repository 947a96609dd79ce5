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
        self.config = SimpleNamespace(layers=tuple(self.logits), csa_indices=(), keep_recent=0, keep_first=0,
                                      ensemble="max", fetch_top=0, **config)

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
