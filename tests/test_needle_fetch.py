"""reference/needle_fetch.py against independent computations: the needle's entries against the tokens that spell
the answer, the labels' vote against build-labels' own golden set."""

from fm_eval.tasks import Sample
from indexer_train.build_labels import LabelParams, label_generated
from indexer_train.corpus import Document
from lsa_runtime.backbone import csa_layers, default_memory_layers
from reference.needle_fetch import above_by_distance, label_side, needle_entries


def test_needle_entries_are_the_entries_of_the_answers_tokens(backbone):
    _, tokenizer = backbone
    context = "x = 1\n" * 40 + "The special magic number for blue-fox is: 7391846.\n" + "y = 2\n" * 40
    sample = Sample(task="niah_single_1", length=0, depth=0.5, seed=0, context=context,
                    query="What is the special magic number for blue-fox?", answers=["7391846"])
    ids = tokenizer(sample.prompt, add_special_tokens=True)["input_ids"]
    entries = needle_entries(tokenizer, sample, ids, 4)
    assert entries
    # the text of those entries' tokens holds the answer; without the first or last entry it does not
    assert "7391846" in tokenizer.decode(ids[4 * entries[0]: 4 * entries[-1] + 4])
    assert "7391846" not in tokenizer.decode(ids[4 * entries[0] + 4: 4 * entries[-1] + 4])
    assert "7391846" not in tokenizer.decode(ids[4 * entries[0]: 4 * entries[-1]])


def test_the_labels_vote_agrees_with_build_labels_golden_set(backbone):
    model, _ = backbone
    tau, prompt = 8, list(range(5, 5 + 120))
    layers = tuple(default_memory_layers(model.config))
    params = LabelParams(layers=layers, tau=tau, min_votes=2, source="generate", new_tokens=tau).check(model.config)
    rows, _, _ = label_generated(model, Document(id="d", index=0, text=None, input_ids=prompt), prompt, params)
    first = [r for r in rows if r.position == len(prompt) - 1][0]
    golden = set(first.positives.tolist())
    visible = first.n_visible
    assert 0 < len(golden) < visible and len(csa_layers(model.config)) >= 2
    probe = sorted(golden)[:3] + [s for s in range(visible) if s not in golden][:3]
    for s in probe:
        view = label_side(model, prompt, [s], tau, 0.6, 512)
        assert (view["max_votes"] >= 2) == (s in golden), s


def test_bad_indices_exit_2_before_any_model_is_loaded(tmp_path, capsys):
    import pytest

    from reference.needle_fetch import main

    for bad, says in ((["--indices", "3,x"], "separated by commas"), (["--indices", "20"], "0..19"),
                      (["--attention", "window"], "needs --fetch-only"), (["--distance-cap", "-1"], "distance_cap"),
                      (["--page-size", "8"], "max_pages")):
        with pytest.raises(SystemExit) as exit_:
            main(["--indexer", str(tmp_path), *bad])  # tmp_path is no export either: these checks come first
        assert exit_.value.code == 2
        assert says in capsys.readouterr().err


def test_above_by_distance_counts_a_hand_checked_case():
    import torch

    # 10 entries of 4 tokens, query at token 39: distances 39, 35, ..., 7, 3 (entry s starts at token 4 s)
    scores = torch.tensor([0.9, 0.1, 0.6, 0.2, 0.3, 0.7, 0.5, 0.4, 0.8, 0.05])
    bands = above_by_distance(scores, 0.5, t0=39, rate=4, edges=(8, 16, 64))
    assert bands == [  # the band [16, 64) holds entries 0-5, none lies at 64 or beyond (no band for it)
        {"from": 0, "to": 8, "entries": 2, "above": 1, "mean_score": 0.425},  # entries 8, 9
        {"from": 8, "to": 16, "entries": 2, "above": 1, "mean_score": 0.45},  # 6, 7 (0.5 reaches the threshold)
        {"from": 16, "to": 64, "entries": 6, "above": 3, "mean_score": 0.4667},
    ]
    assert above_by_distance(scores, 0.5, t0=39, rate=4, edges=(8,))[-1] == {
        "from": 8, "to": None, "entries": 8, "above": 4, "mean_score": 0.4625}
