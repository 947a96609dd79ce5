"""RULER-style task generators and scoring: determinism, lengths, where the needles really are, answers."""

import re
from collections import Counter

import pytest

from fm_eval.tasks import (DEFAULT_HAYSTACK_PACKAGES, TASKS, Sample, generate_sample, generate_samples,
                                       length_tolerance, mean_percent, parse_tasks, postprocess_prediction,
                                       score_prediction, spread_depths, stdlib_code_lines, string_match_all,
                                       string_match_part)
from lsa_runtime.errors import FmIndexError

NIAH = [name for name, spec in TASKS.items() if spec.family == "niah"]


def test_seeded_determinism(tiny_tokenizer):
    for task in ("niah_multikey_1", "vt", "cwe", "fwe", "context_independent"):
        a = generate_sample(task, tiny_tokenizer, 1024, seed=3, index=1, num_samples=3).to_dict()
        b = generate_sample(task, tiny_tokenizer, 1024, seed=3, index=1, num_samples=3).to_dict()
        assert a == b
        assert Sample.from_dict(a).to_dict() == a
        other = generate_sample(task, tiny_tokenizer, 1024, seed=4, index=1, num_samples=3)
        assert other.prompt != a["context"] + a["query"]
        assert other.answers != a["answers"]


@pytest.mark.parametrize("task", list(TASKS))
def test_prompt_fills_the_length_in_tokens(task, tiny_tokenizer):
    for length in (1024, 3000):
        sample = generate_sample(task, tiny_tokenizer, length, seed=0, index=0, num_samples=2)
        n = len(tiny_tokenizer(sample.prompt)["input_ids"])  # as the runner encodes it
        assert n == sample.metadata["prompt_tokens"]
        assert length - length_tolerance(length) <= n <= length
        assert sample.task == task and sample.length == length and sample.answers


def test_depths_spread_evenly():
    assert spread_depths(0, 5, 1) == [0.0]
    assert spread_depths(4, 5, 1) == [1.0]
    assert spread_depths(2, 5, 1) == [0.5]
    assert spread_depths(0, 1, 1) == [0.5]
    assert spread_depths(1, 3, 4) == [0.125, 0.375, 0.625, 0.875]


def test_single_needle_is_at_the_stated_depth(tiny_tokenizer):
    samples = generate_samples("niah_single_2", tiny_tokenizer, 2048, num_samples=5, seed=1)
    assert [s.depth for s in samples] == [0.0, 0.25, 0.5, 0.75, 1.0]
    for sample in samples:
        (needle,) = sample.metadata["needles"]
        ids = tiny_tokenizer(sample.prompt)["input_ids"]
        offset = needle["token_offset"]
        # the needle starts in the token at its recorded offset: absent before it, present from it on
        assert needle["text"] not in tiny_tokenizer.decode(ids[:offset])
        assert needle["text"] in tiny_tokenizer.decode(ids[offset:offset + 40])
        # measured independently in characters of the haystack (without the needle): same depth within 5%
        hay_start = sample.context.index("\n") + 1
        hay_chars = len(sample.context) - hay_start - len(needle["text"]) - 1
        char_depth = (needle["char_offset"] - hay_start) / hay_chars
        assert abs(char_depth - sample.depth) <= 0.05
        assert abs(needle["depth"] - sample.depth) <= 0.05
        # the asked key's value is written exactly once, in the needle
        assert sample.context.count(sample.answers[0]) == 1
        assert f"for {needle['key']} is: {sample.answers[0]}." in needle["text"]


@pytest.mark.parametrize("task", NIAH)
def test_niah_needles_and_answers(task, tiny_tokenizer):
    spec = TASKS[task]
    sample = generate_sample(task, tiny_tokenizer, 2048, seed=5, index=1, num_samples=3)
    needles = sample.metadata["needles"]
    assert len(needles) == spec.num_needle_k * spec.num_needle_v
    for needle in needles:
        assert sample.context.count(needle["text"]) == 1
        assert sample.prompt[needle["char_offset"]:].startswith(needle["text"])
        assert abs(needle["depth"] - needle["depth_requested"]) <= 0.05
    asked = [n for n in needles if n["asked"]]
    assert sorted(n["value"] for n in asked) == sorted(sample.answers)
    assert len({n["key"] for n in asked}) == spec.num_needle_q
    for key in {n["key"] for n in asked}:
        assert key in sample.query
    for needle in needles:
        if not needle["asked"]:
            assert needle["value"] not in sample.answers and needle["key"] not in sample.query
    # every needle value is one the task promises (7-digit number or uuid)
    pattern = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}" \
        if spec.value_type == "uuids" else r"[1-9]\d{6}"
    assert all(re.fullmatch(pattern, n["value"]) for n in needles)


def test_code_haystack_is_held_out_stdlib_code(tiny_tokenizer):
    sample = generate_sample("niah_single_2", tiny_tokenizer, 2048, seed=2, index=0, num_samples=1)
    source = set(stdlib_code_lines(tuple(DEFAULT_HAYSTACK_PACKAGES)))
    needle = sample.metadata["needles"][0]["text"]
    lines = sample.context.split("\n")[1:-1]  # drop the instruction and the (possibly partial) last line
    assert len(lines) > 20
    assert all(line in source or line == needle for line in lines)
    other = generate_sample("niah_single_2", tiny_tokenizer, 2048, seed=2, haystack_packages=("json",))
    json_lines, other_needle = set(stdlib_code_lines(("json",))), other.metadata["needles"][0]["text"]
    assert all(line in json_lines or line == other_needle for line in other.context.split("\n")[1:-1])
    with pytest.raises(FmIndexError, match="no_such_package"):
        generate_sample("niah_single_2", tiny_tokenizer, 2048, haystack_packages=("no_such_package",))


def test_variable_tracking_chain_resolves_to_the_answers(tiny_tokenizer):
    sample = generate_sample("vt", tiny_tokenizer, 2048, seed=9, index=0, num_samples=1)
    value = re.search(r"assigned the value (\d+)", sample.query).group(1)
    assignments = dict(re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", sample.context))

    def resolve(name):
        rhs = assignments[name]
        return resolve(rhs[4:]) if rhs.startswith("VAR ") else rhs

    holders = {name for name in assignments if resolve(name) == value}
    assert holders == set(sample.answers) and len(holders) == TASKS["vt"].num_hops + 1
    # each hop is written after the variable it copies
    for name, rhs in assignments.items():
        if rhs.startswith("VAR "):
            assert sample.context.index(f"VAR {rhs[4:]} =") < sample.context.index(f"VAR {name} =")


def test_common_words_are_the_most_common(tiny_tokenizer):
    sample = generate_sample("cwe", tiny_tokenizer, 3000, seed=1)
    words = re.findall(r"\d+\. ([a-z]+)", sample.context)
    counts = Counter(words).most_common()
    top = {w for w, _ in counts[:10]}
    assert top == set(sample.answers)
    assert counts[9][1] > counts[10][1]


def test_frequent_words_are_the_most_frequent(tiny_tokenizer):
    sample = generate_sample("fwe", tiny_tokenizer, 3000, seed=1)
    body = sample.context.split("\n", 1)[1]
    counts = Counter(body.split()).most_common()
    assert [w for w, _ in counts[:3]] == sample.answers
    assert counts[0][1] > counts[1][1] > counts[2][1] > counts[3][1]


def test_context_independent_has_no_answer_in_the_context(tiny_tokenizer):
    sample = generate_sample("context_independent", tiny_tokenizer, 2048, seed=0)
    assert sample.answers[0] not in sample.context
    assert sample.answers[0] in sample.query
    assert sample.depth is None and sample.metadata["needles"] == []


def test_bad_requests_are_user_errors(tiny_tokenizer):
    with pytest.raises(FmIndexError, match="unknown task"):
        generate_sample("needle", tiny_tokenizer, 2048)
    with pytest.raises(FmIndexError, match="too short"):
        generate_sample("niah_multiquery", tiny_tokenizer, 100)
    with pytest.raises(FmIndexError, match="unknown task"):
        parse_tasks("vt,niah")
    assert [s.name for s in parse_tasks("vt,cwe,vt")] == ["vt", "cwe"]
    assert len(parse_tasks("all")) == len(TASKS)


def test_string_match_all_and_part_hand_checked():
    assert string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert string_match_all(" 7470262.", ["7470262"]) == 1.0
    assert string_match_all("747026", ["7470262"]) == 0.0
    assert string_match_all("they are: zdlct, ORGVW", ["ZDLCT", "orgvw"]) == 1.0  # case-insensitive
    assert string_match_part("none of them", ["a-b", "c"]) == 0.0
    assert string_match_part("only c here", ["a-b", "c"]) == 1.0
    assert postprocess_prediction("  12\x0034\n ") == "12\n34"
    assert mean_percent([1.0, 0.0, 0.5, 0.5]) == 50.0
    with pytest.raises(FmIndexError):
        string_match_all("x", [])


def test_score_prediction_uses_the_samples_answers(tiny_tokenizer):
    single = generate_sample("niah_single_1", tiny_tokenizer, 1024, seed=0)
    assert score_prediction(single, f" {single.answers[0]}.\n# Question") == 1.0
    assert score_prediction(single, " 1234567") == (1.0 if single.answers[0] == "1234567" else 0.0)
    multi = generate_sample("niah_multivalue", tiny_tokenizer, 2048, seed=0)
    assert score_prediction(multi, " " + ", ".join(multi.answers[:3])) == 0.75
    assert score_prediction(multi, " " + ", ".join(reversed(multi.answers))) == 1.0


def test_the_fit_finds_the_largest_fitting_size_from_any_guess():
    """_largest_fitting against brute force on random nondecreasing counts: the same answer whatever the guess and
    the first step (they change only how many counts it takes)."""
    import random

    from fm_eval.tasks import _largest_fitting

    rng = random.Random(0)
    for _ in range(300):
        hi = rng.randint(1, 400)
        counts = [0]
        for _ in range(hi):
            counts.append(counts[-1] + rng.choice((0, 1, 1, 2, 5)))
        target = rng.randint(0, counts[-1] + 3)
        expected = max([n for n in range(hi + 1) if counts[n] <= target], default=0)
        guess, step = rng.randint(-5, hi + 5), rng.choice((None, 1, 2, 7, 100))
        assert _largest_fitting(counts.__getitem__, target, guess, hi, step) == expected


def test_the_fitted_prompts_are_the_stored_evaluations_own():
    """Regenerated prompts have the digests the stored evaluations decoded: the H200's seed-1 single needle and
    variable-tracking prompts at 64K (noise haystacks, the same on every interpreter; RESULTS 11d) and this CPU's
    held-out prose prompts at 16K (RESULTS 11c). The fit's guess from the units' token counts (2026-12-04) must not
    move a prompt by a token."""
    import gzip
    import hashlib
    import json
    from pathlib import Path

    from lsa_runtime.backbone import load_backbone

    tokenizer = load_backbone("reference")[1]
    raw = Path(__file__).resolve().parents[1] / "docs/results"
    cases = [("table_long_h200/run4_controls_seed1/seed1_64k", "niah_single_1", 0),
             ("table_long_h200/run4_controls_seed1/seed1_64k", "vt", 7),
             ("varied_16k_cpu", "varied_new_all", 0), ("varied_16k_cpu", "varied_seen", 5)]
    for folder, task, index in cases:
        with gzip.open(raw / folder / "runs.jsonl.gz", "rt") as f:
            run = next(r for r in map(json.loads, f) if r["task"] == task and r["index"] == index)
        config = json.loads((raw / folder / "config.json").read_text())["config"]
        sample = generate_sample(task, tokenizer, run["length"], seed=config["seed"], index=index,
                                 num_samples=config["samples"], haystack_packages=config["haystack_packages"])
        assert hashlib.sha256(sample.prompt.encode()).hexdigest()[:16] == run["prompt_sha"], (folder, task, index)
