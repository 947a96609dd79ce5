"""reference.needle_rank: the needle's tokens are found where they were planted, and the rank reported per CSA layer
equals a brute-force rank over the full indexer logits (lsa_runtime.capture.collect_logits)."""

import numpy as np
import torch

from lsa_runtime.backbone import csa_layers
from lsa_runtime.capture import collect_logits
from reference.needle_rank import needle_positions, rank_sample, ranks_of
from reference.tasks import Sample


def test_needle_positions_find_the_planted_value_not_the_answer_itself():
    ids = np.array([5, 6, 7, 101, 102, 103, 8, 9, 1, 2, 55, 101, 102, 103])
    # answer " 101 102 103" at 10..13 (its first token may differ in the needle: here 55 vs 7)
    assert needle_positions(ids, answer_start=10, answer_len=4) == [3, 4, 5]
    assert ranks_of(torch.tensor([0.5, 2.0, 1.0, 3.0]), [2]) == 3
    assert ranks_of(torch.tensor([0.5, 2.0, 1.0, 3.0]), [0, 3]) == 1


def test_rank_sample_equals_a_brute_force_rank(tiny_model, sample_ids):
    ids = sample_ids[:400].numpy().copy()
    value = [900, 901, 902]
    ids[123:126] = value  # the needle: tokens 123-125, entries 30 and 31
    ids[380], ids[381:384] = 7, value  # the answer, first answer token at 380
    sample = Sample(input_ids=ids, answer_start=380, answer_len=4, task="niah_single", depths=[0.3])
    got = rank_sample(tiny_model, sample, chunk=64)
    assert got["needle_tokens"] == [123, 124, 125] and got["needle_entries"] == [30, 31]
    query = 379
    full = collect_logits(tiny_model, torch.as_tensor(ids[:query + 1]), chunk_size=400)
    for layer in csa_layers(tiny_model.config):
        row = full[layer][query, : (query + 1) // 4]
        best = max(row[30].item(), row[31].item())
        assert got["ranks"][str(layer)] == 1 + sum(1 for v in row.tolist() if v > best)
