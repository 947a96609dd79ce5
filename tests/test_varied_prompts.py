"""Varied needle prompts (fm_eval.varied) and `fm-index make-corpus`: lengths, where the answer really is, the
declared split (held-out formats / haystacks / questions never in the training corpus, found by an independent
scan of the text), determinism, bad input."""

import json
import re

import pytest
from typer.testing import CliRunner

from cli import app
from fm_eval.tasks import (
    TASKS,
    generate_sample,
    length_tolerance,
    parse_tasks,
    score_prediction,
)
from fm_eval.varied import (
    HAYSTACK_KINDS,
    NEEDLE_FORMATS,
    QUESTION_STYLES,
    SPLIT,
    TASK_KINDS,
    VARIED_TASKS,
    VariedPromptError,
    check_kinds,
    corpus_plan,
    load_tokenizer,
    write_corpus,
)
from indexer_train.corpus import Corpus
from lsa_runtime.errors import FmIndexError

runner = CliRunner()

# Detectors written here from the held-out values' surface, independently of the generator's metadata: the chat
# turn that carries the fact, the held-out question line, and two sentence shapes only the prose haystack writes.
HELD_OUT_FORMAT = re.compile(r"User: Please remember that the special magic number for [a-z]+-[a-z]+ is: \d{7}")
HELD_OUT_QUESTION = re.compile(r"Question: What was the special magic number for [a-z]+-[a-z]+ again\?")
PROSE = re.compile(r"\b[A-Z][a-z]+ felt [a-z]+ and |\bstood (in|by|at|near|on|behind|under|along) the [a-z ]+, and [A-Z]")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("reference")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    card = write_corpus(out, tokenizer, [512, 1024], per_format=12, seed=3)
    return out, card, [json.loads(line) for line in out.read_text().splitlines()]


def test_split_is_declared_and_disjoint():
    for seen, held, known in ((SPLIT.formats(True), SPLIT.formats(False), NEEDLE_FORMATS),
                              (SPLIT.haystacks(True), SPLIT.haystacks(False), HAYSTACK_KINDS),
                              (SPLIT.questions(True), SPLIT.questions(False), QUESTION_STYLES)):
        assert held and seen and not set(seen) & set(held) and set(seen) | set(held) == set(known)
    assert SPLIT.as_dict()["heldout"] == {"formats": ["chat_turn"], "haystacks": ["prose"], "questions": ["what_was"],
                                          "kinds": ["multiquery"]}
    assert set(SPLIT.kinds(True)) | set(SPLIT.kinds(False)) == set(TASK_KINDS) and SPLIT.kinds(False) == ("multiquery",)


@pytest.mark.parametrize("task", [name for name, t in VARIED_TASKS.items() if t.kind == "single"])
def test_lengths_and_the_answer_at_its_recorded_offset(task, tokenizer):
    for length in (1024, 3000):
        for index in range(3):
            sample = generate_sample(task, tokenizer, length, seed=1, index=index, num_samples=3)
            ids = tokenizer(sample.prompt)["input_ids"]  # as the evaluation runner encodes it
            assert length - length_tolerance(length) <= len(ids) <= length
            assert len(ids) == sample.metadata["prompt_tokens"]
            (needle,) = sample.metadata["needles"]
            (value,) = sample.answers
            assert re.fullmatch(r"\d{7}", value)
            assert sample.prompt.count(value) == 1  # written once, in the needle, and not in the query
            assert sample.context[needle["char_offset"]:].startswith(needle["text"]) and value in needle["text"]
            offset = needle["token_offset"]
            assert value not in tokenizer.decode(ids[:offset])
            assert value in tokenizer.decode(ids[offset:offset + 60])
            assert abs(needle["depth"] - sample.depth) <= 0.05
            assert needle["key"] in sample.query and sample.query.endswith("mentioned in the provided text is:")
            assert score_prediction(sample, f" {value}.") == 1.0 and score_prediction(sample, " 1234567.") == 0.0


def test_tasks_draw_from_their_side_of_the_split(tokenizer):
    seen = [generate_sample("varied_seen", tokenizer, 1024, seed=2, index=i, num_samples=8) for i in range(8)]
    assert {s.metadata["format"] for s in seen} == set(SPLIT.formats(True))  # the format cycles with the index
    for s in seen:
        assert not HELD_OUT_FORMAT.search(s.prompt) and not HELD_OUT_QUESTION.search(s.prompt)
        assert not PROSE.search(s.prompt)
    for task, detector in (("varied_new_format", HELD_OUT_FORMAT), ("varied_new_haystack", PROSE),
                           ("varied_new_question", HELD_OUT_QUESTION)):
        for i in range(4):
            sample = generate_sample(task, tokenizer, 1024, seed=2, index=i, num_samples=4)
            assert detector.search(sample.prompt), (task, sample.prompt[:300])
    allnew = generate_sample("varied_new_all", tokenizer, 1024, seed=2, index=0, num_samples=1)
    assert all(d.search(allnew.prompt) for d in (HELD_OUT_FORMAT, HELD_OUT_QUESTION, PROSE))


def test_training_corpus_never_holds_a_heldout_value(corpus, tokenizer):
    path, card, records = corpus
    assert len(records) == card["documents"] == 2 * len(SPLIT.formats(True)) * 12 == len(Corpus(path))
    for record in records:
        text = record["text"]
        assert not HELD_OUT_FORMAT.search(text) and not HELD_OUT_QUESTION.search(text) and not PROSE.search(text)
        assert "chat_turn" not in record["id"] and "prose" not in record["id"] and "what_was" not in record["id"]
        n = len(tokenizer(text)["input_ids"])
        assert record["length"] - length_tolerance(record["length"]) <= n <= record["length"]
        needle = record["needle"]
        assert text[needle["char_offset"]:].startswith(needle["text"]) and text.count(needle["value"]) == 1
    # every seen haystack and question appears (the plan cycles over their pairs), counted from the text's id
    assert {r["id"].split("-")[1] for r in records} == set(SPLIT.haystacks(True))
    assert {r["id"].split("-")[2] for r in records} == set(SPLIT.questions(True))


def test_corpus_is_deterministic_by_seed(tmp_path, tokenizer, corpus):
    path, _, _ = corpus
    again = tmp_path / "again.jsonl"
    write_corpus(again, tokenizer, [512, 1024], per_format=12, seed=3)
    assert again.read_bytes() == path.read_bytes()
    other = tmp_path / "other.jsonl"
    write_corpus(other, tokenizer, [512], per_format=2, seed=4)
    first = [json.loads(line)["text"] for line in path.read_text().splitlines()][:2]
    assert [json.loads(line)["text"] for line in other.read_text().splitlines()][:2] != first
    a = generate_sample("varied_new_all", tokenizer, 1024, seed=5, index=1, num_samples=2).to_dict()
    assert a == generate_sample("varied_new_all", tokenizer, 1024, seed=5, index=1, num_samples=2).to_dict()
    assert a["context"] != generate_sample("varied_new_all", tokenizer, 1024, seed=6, index=1, num_samples=2).context


def test_corpus_plan_counts():
    plan = corpus_plan([2048, 4096], per_format=5)
    assert len(plan) == 2 * len(SPLIT.formats(True)) * 5
    assert len(set(plan)) == len(plan) and {p[1] for p in plan} == {"single"}
    # the other kinds spread the (haystack, question) pairs: 4 formats x 3 prompts cover all 12 pairs per length
    plan = corpus_plan([2048], per_format=3, kinds=("multikey", "vt"))
    pairs = {(h, q) for h in SPLIT.haystacks(True) for q in SPLIT.questions(True)}
    assert {(p[3], p[4]) for p in plan if p[1] == "multikey"} == pairs
    assert {p[3] for p in plan if p[1] == "vt"} == set(SPLIT.haystacks(True)) and {p[4] for p in plan if p[1] == "vt"} == {"vt"}
    assert len(set(plan)) == len(plan) == 2 * 12


def test_task_names():
    assert [s.name for s in parse_tasks("varied")] == list(VARIED_TASKS)
    assert [s.name for s in parse_tasks("all")] == list(TASKS)  # "all" stays the RULER set
    assert [s.name for s in parse_tasks("vt,varied_seen")] == ["vt", "varied_seen"]
    with pytest.raises(FmIndexError, match="unknown task"):
        parse_tasks("varied_bogus")


def test_make_corpus_command_and_bad_input(tmp_path):
    out = tmp_path / "c.jsonl"
    ok = runner.invoke(app, ["make-corpus", "--out", str(out), "--model", "reference", "--lengths", "512",
                             "--per-format", "1", "--seed", "1"])
    assert ok.exit_code == 0, ok.output
    assert len(out.read_text().splitlines()) == len(SPLIT.formats(True))
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["split"]["heldout"]["formats"] == ["chat_turn"] and card["seed"] == 1
    bad_cases = [
        (["--out", str(out)], "already exists"),
        (["--out", str(tmp_path / "d.jsonl"), "--per-format", "0"], "--per-format must be >= 1"),
        (["--out", str(tmp_path / "d.jsonl"), "--lengths", "128"], "too short"),
        (["--out", str(tmp_path / "d.jsonl"), "--lengths", "2k,x"], "--lengths"),
        (["--out", str(tmp_path / "d.txt")], ".jsonl"),
        (["--out", str(tmp_path / "d.jsonl"), "--model", str(tmp_path)], "config.json"),
        (["--out", str(tmp_path / "d.jsonl"), "--lengths", "512", "--haystack-packages", "nosuchpkg"], "nosuchpkg"),
    ]
    for args, message in bad_cases:
        bad = runner.invoke(app, ["make-corpus", "--per-format", "1", *args] if "--per-format" not in args
                            else ["make-corpus", *args])
        assert bad.exit_code == 2 and message in bad.output and "Traceback" not in bad.output, (args, bad.output)
        assert len(bad.output.strip().splitlines()) == 1, bad.output
    assert not (tmp_path / "d.jsonl").exists() and not list(tmp_path.glob("*.tmp"))
    bad = runner.invoke(app, ["evaluate", "--tasks", "varied_bogus", "--out", str(tmp_path / "e")])
    assert bad.exit_code == 2 and "unknown task" in bad.output


def test_evaluate_runs_varied_tasks(tmp_path):
    """`fm-index evaluate --tasks varied_seen,varied_new_all` decodes the same prompts generate_sample gives, with
    the tasks' own number of new tokens, and scores them by string match."""
    import hashlib

    import torch

    from fm_eval.runner import EvalConfig, evaluate
    from lsa_runtime.backbone import load_backbone

    backbone = load_backbone("tiny", dtype=torch.float32)
    config = EvalConfig(model="tiny", modes=("full",), tasks=("varied_seen", "varied_new_all"), lengths=(256,),
                        samples=1)
    results = evaluate(config, tmp_path / "e", backbone=backbone)
    assert {r["task"] for r in results["runs"]} == {"varied_seen", "varied_new_all"}
    for run in results["runs"]:
        sample = generate_sample(run["task"], backbone[1], 256, seed=0, index=0, num_samples=1)
        assert run["prompt_sha"] == hashlib.sha256(sample.prompt.encode()).hexdigest()[:16]
        assert run["new_tokens"] <= VARIED_TASKS[run["task"]].spec.max_new_tokens == 32
        assert run["score"] == float(sample.answers[0] in run["prediction"])
    assert "varied_new_all" in (tmp_path / "e" / "results.md").read_text()


def test_single_needle_prompts_are_those_of_earlier_corpora(tokenizer):
    """Adding task kinds kept every single-needle prompt: hashes of prompts written by the code before the kinds
    existed (2026-12-02; haystacks that do not depend on this Python's standard library)."""
    import hashlib

    def sha(text):
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    expected = {("varied_seen", 1): "b7a1e9639ecfa066", ("varied_new_all", 0): "e8f06dc2207857bd",
                ("varied_new_format", 1): "43fdf4ac3fea4c5c"}
    for (task, index), digest in expected.items():
        assert sha(generate_sample(task, tokenizer, 1024, seed=5, index=index, num_samples=3).prompt) == digest


def test_single_kind_corpus_record_of_earlier_corpora(tmp_path, tokenizer):
    out = tmp_path / "c.jsonl"
    write_corpus(out, tokenizer, [512, 1024], per_format=3, seed=3)
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    import hashlib

    record = records["log_line-wordlist-indirect-1024-2"]  # written before --kinds with the same options
    assert hashlib.sha256(record["text"].encode()).hexdigest()[:16] == "7de438c7074c4dd8"
    assert record["kind"] == "single" and record["needles"][0]["value"] == record["needle"]["value"]


@pytest.mark.parametrize("task", ["varied_multikey", "varied_multivalue", "varied_multiquery", "varied_vt"])
def test_task_kinds_hide_and_ask_what_they_say(task, tokenizer):
    """Each kind's needles sit in the text at their recorded offsets, each value written once; the answers are
    read back from the text with patterns written here (not the generator's metadata)."""
    kind = VARIED_TASKS[task].kind
    for index in range(3):
        sample = generate_sample(task, tokenizer, 1024, seed=2, index=index, num_samples=3)
        text, meta = sample.prompt, sample.metadata
        n = len(tokenizer(text)["input_ids"])
        assert 1024 - length_tolerance(1024) <= n <= 1024 and meta["kind"] == kind
        for needle in meta["needles"]:
            assert text[needle["char_offset"]:].startswith(needle["text"])
        if kind == "vt":
            value = re.search(r"assigned the value (\d{5}) in the text above", sample.query).group(1)
            chain = [re.search(r"VAR ([A-Z]{5}) = " + re.escape(value) + r"\.", text).group(1)]
            for _ in range(4):  # follow the chain through the text
                chain.append(re.search(r"VAR ([A-Z]{5}) = VAR " + chain[-1] + r"\.", text).group(1))
            assert sample.answers == chain and "5 variables are assigned" in sample.query
            continue
        facts = re.findall(r"special magic numbers? for ([a-z]+-[a-z]+) is: (\d{7})", sample.context)
        assert len(facts) == 4 and all(text.count(v) == 1 for _, v in facts)
        asked = re.search(r"The special magic numbers? for (.+) mentioned in the provided text (is|are):$",
                          sample.query).group(1)
        asked_keys = asked.replace(", and ", ", ").split(", ")
        assert sample.answers == [v for k, v in facts_in_order(facts, meta) if k in asked_keys]
        keys = {k for k, _ in facts}
        assert len(keys) == {"varied_multikey": 4, "varied_multivalue": 1, "varied_multiquery": 4}[task]
        assert len(asked_keys) == {"varied_multikey": 1, "varied_multivalue": 1, "varied_multiquery": 4}[task]
        assert sample.query.endswith("are:") == (len(sample.answers) > 1)
        first = next(n for n in meta["needles"] if n["asked"])
        assert abs(first["depth"] - sample.depth) <= 0.05
        assert score_prediction(sample, " " + ", ".join(sample.answers) + ".") == 1.0
        assert score_prediction(sample, " 1234567.") == 0.0
        if task == "varied_multiquery":
            assert meta["split"]["kind"] is False


def facts_in_order(facts, meta):
    """The text's (key, value) pairs in the generator's fact order (key-major), found by value."""
    order = {n["value"]: i for i, n in enumerate(meta["needles"])}
    return sorted(facts, key=lambda kv: order[kv[1]])


def test_corpus_with_kinds_never_holds_the_heldout_kind(tmp_path, tokenizer):
    out = tmp_path / "k.jsonl"
    card = write_corpus(out, tokenizer, [512], per_format=1, seed=1, kinds=("single", "multikey", "multivalue", "vt"))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    per_kind = len(SPLIT.formats(True))
    assert card["counts"]["kind"] == {"single": per_kind, "multikey": per_kind, "multivalue": per_kind,
                                      "vt": per_kind} and card["kinds"] == ["single", "multikey", "multivalue", "vt"]
    for record in records:
        text = record["text"]
        asked = re.search(r"for (.+) mentioned in the provided text", text[-300:])
        # multiquery asks several keys at once: never in a training corpus
        assert asked is None or ", and " not in asked.group(1)
        assert not HELD_OUT_FORMAT.search(text) and not HELD_OUT_QUESTION.search(text) and not PROSE.search(text)
        assert all(text[n["char_offset"]:].startswith(n["text"]) for n in record["needles"])
    assert len({r["id"] for r in records}) == len(records)
    with pytest.raises(VariedPromptError, match="held out"):
        check_kinds(["single", "multiquery"])
    with pytest.raises(VariedPromptError, match="unknown task kind"):
        check_kinds(["bogus"])
    bad = runner.invoke(app, ["make-corpus", "--out", str(tmp_path / "b.jsonl"), "--kinds", "single,multiquery"])
    assert bad.exit_code == 2 and "held out" in bad.output and not (tmp_path / "b.jsonl").exists()
