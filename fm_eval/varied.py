"""Varied needle prompts with a declared train / held-out split: the memory indexer's training corpus and the
``varied_*`` evaluation tasks.

The RULER-style tasks of :mod:`fm_eval.tasks` use one needle phrasing and one question phrasing. The method's
authors train the memory indexer on thousands of prompts of many kinds (needles, QA, multi-turn chat, writing),
labelled from the model's own answers. This module generates, offline and seeded, single-needle prompts that vary
along three axes, each with named values:

* **needle format** (what carries the fact "the special magic number for K is: V"): ``kv_sentence`` (RULER's
  "One of the special magic numbers for K is: V."), ``note`` ("Remember: the ..."), ``table_row`` (a table
  header and a row), ``log_line`` (a log record), ``chat_turn`` (a user turn stating it and the assistant's reply);
* **haystack kind** (what fills the context): ``code`` (held-out standard-library packages, as
  :mod:`fm_eval.tasks`), ``prose`` (story sentences built from word lists), ``wordlist`` (numbered word lists),
  ``logs`` (server log records), ``chat`` (a multi-turn user / assistant conversation);
* **question style** (the question line after the whole context): ``direct`` (RULER's), ``indirect`` ("Somewhere
  above, a number was tied to K. Which one?"), ``what_was`` ("What was the special magic number for K again?"),
  ``follow_up`` (one more user turn of a conversation, answered by "Assistant:").

Every prompt opens with RULER's preamble, its haystack's own opening line or nothing (seeded), and ends with
RULER's answer line ("The special magic number for K mentioned in the provided text is:"): the bundled 15M
``reference`` backbone answers nothing else (free answer lines, e.g. "The access code of K is", gave 0 of 20 in
full decoding), so the variation is in the carrier of the fact, the question line, the haystack and the preamble.

:data:`SPLIT` declares which values are held out of training: the format ``chat_turn``, the haystack ``prose``
and the question ``what_was``. The training corpus (:func:`corpus_records`, ``fm-index make-corpus``) only ever
combines the seen values; the evaluation tasks (:data:`VARIED_TASKS`, ``fm-index evaluate --tasks varied_seen,
varied_new_format,...``) report seen and held-out combinations separately:

* ``varied_seen``: seen format x seen haystack x seen question;
* ``varied_new_format`` / ``varied_new_haystack`` / ``varied_new_question``: exactly one axis held out;
* ``varied_new_all``: held-out format in a held-out haystack with the held-out question.

All text is written by this module (word lists, templates) or read from the running interpreter's standard
library (``code``): nothing is downloaded. Values are 7-digit numbers, written once per prompt (no haystack kind
writes 7-digit numbers); keys are "adjective-noun" pairs. Prompts are fitted to a length in the backbone's tokens
exactly as the RULER tasks are (:func:`fm_eval.tasks._haystack_prompt`, within :func:`length_tolerance`), and
each records its needle's character and token offset, requested and measured depth, and its format, haystack
and question in ``metadata``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lsa_runtime.errors import FmIndexError

from .tasks import (
    _ADJECTIVES,
    _NOUNS,
    DEFAULT_HAYSTACK_PACKAGES,
    Haystack,
    PromptTokens,
    Sample,
    TaskSpec,
    _code_haystack,
    _haystack_prompt,
    _pseudo_word,
    _word_key,
    length_tolerance,
    sample_seed,
    spread_depths,
    stdlib_code_lines,
)

CORPUS_FORMAT = "fm-index-varied-corpus/1"


class VariedPromptError(FmIndexError):
    """A bad option for the varied prompts or the training corpus."""


# ---- needle formats ---------------------------------------------------------------------------------------

# The fact every needle carries and every answer line repeats. The bundled 15M `reference` backbone answers only
# when the answer line is the one it was trained on and the needle holds "... for KEY is: VALUE" (measured: free
# phrasings such as "The access code of KEY is" give 0 of 20 in full decoding), so the formats vary what carries
# the fact and the questions vary the question line; both keep these words.
FACT = "special magic number for {key} is: {value}"
ANSWER_LINE = " The special magic number for {key} mentioned in the provided text is:"


@dataclass(frozen=True)
class NeedleFormat:
    """How the fact "key -> value" is written into the haystack."""

    name: str
    template: str  # {fact} (FACT filled in), {key}, {value}; may hold several lines

    def render(self, key: str, value: str, code: bool) -> str:
        text = self.template.format(fact=FACT.format(key=key, value=value), key=key, value=value)
        return "\n".join(f"# {line}" for line in text.split("\n")) if code else text


NEEDLE_FORMATS: dict[str, NeedleFormat] = {f.name: f for f in [
    NeedleFormat("kv_sentence", "One of the special magic numbers for {key} is: {value}."),
    NeedleFormat("note", "Remember: the {fact}."),
    NeedleFormat("table_row", "| notes |\n| {fact} |"),
    NeedleFormat("log_line", "2026-04-02 07:41:09 NOTICE [registry] the {fact}"),
    NeedleFormat("chat_turn", "User: Please remember that the {fact}.\nAssistant: Of course, I will remember it."),
]}


# ---- question styles --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuestionStyle:
    """The query after the context: a question line, then the answer line (:data:`ANSWER_LINE`)."""

    name: str
    template: str  # {key}

    def render(self, key: str) -> str:
        return self.template.format(key=key) + ANSWER_LINE.format(key=key)


QUESTION_STYLES: dict[str, QuestionStyle] = {q.name: q for q in [
    QuestionStyle("direct", "\n# Question: What is the special magic number for {key} mentioned in the provided "
                            "text?\n# Answer:"),
    QuestionStyle("indirect", "\nQuestion: Somewhere above, a number was tied to {key}. Which one?\nAnswer:"),
    QuestionStyle("what_was", "\nQuestion: What was the special magic number for {key} again?\nAnswer:"),
    QuestionStyle("follow_up", "\nUser: Thanks. One more question: what special magic number did I give you for "
                               "{key}?\nAssistant:"),
]}


# ---- haystack kinds ---------------------------------------------------------------------------------------

_NAMES = ("Ada Bruno Clara Dmitri Elena Farid Greta Hugo Ines Jonas Kira Liam Mara Nils Olga Pavel Quinn Rosa "
          "Sven Tara Umar Vera Wim Xenia Yusuf Zora").split()
_VERBS = ("walked past|painted|talked about|looked at|forgot about|carried|repaired|sketched|found|cleaned|"
          "admired|described|photographed|waited near|read about|dreamed of").split("|")
_PLACES = ("in the old town|by the river|at the market|near the harbor|in the garden|on the hill|behind the "
           "library|at the station|in the kitchen|under the bridge|along the coast|in the workshop").split("|")
_TIMES = ("In the morning|Later that day|After lunch|Before sunset|On a quiet evening|Every spring|Once|"
          "That winter|At dawn|During the storm").split("|")
_MOODS = ("calm|cheerful|tired|curious|patient|restless|thoughtful|quiet").split("|")
_LEVELS = ("INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR")
_SERVICES = ("api", "auth", "cache", "db", "queue", "scheduler", "web", "worker")
_ROUTES = ("/items", "/users", "/orders", "/health", "/search", "/login", "/cart", "/reports")
_TOPICS = ("the weather|a soup recipe|a walk in the park|an old film|the train timetable|a birthday gift|"
           "a garden plan|a book about birds|a chess opening|a bicycle repair").split("|")


def _prose_units(rng: random.Random, n: int = 900) -> list[str]:
    """Sentences of a plain story, no digits: names, things from the needle-key word lists, places, times."""
    units = []
    for _ in range(n):
        who = rng.choice(_NAMES)
        thing = f"the {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"
        pattern = rng.randrange(4)
        if pattern == 0:
            units.append(f"{rng.choice(_TIMES)}, {who} {rng.choice(_VERBS)} {thing} {rng.choice(_PLACES)}.")
        elif pattern == 1:
            units.append(f"{who} felt {rng.choice(_MOODS)} and {rng.choice(_VERBS)} {thing}.")
        elif pattern == 2:
            units.append(f"{thing.capitalize()} stood {rng.choice(_PLACES)}, and {who} {rng.choice(_VERBS)} it.")
        else:
            units.append(f"{who} and {rng.choice(_NAMES)} {rng.choice(_VERBS)} {thing} {rng.choice(_PLACES)}.")
    return units


def _wordlist_units(rng: random.Random, n: int = 1200) -> list[str]:
    """Numbered lines of words: dictionary words and pronounceable non-words, three to six a line."""
    units = []
    for i in range(n):
        words = [rng.choice(_NOUNS) if rng.random() < 0.4 else rng.choice(_ADJECTIVES) if rng.random() < 0.5
                 else _pseudo_word(rng) for _ in range(rng.randint(3, 6))]
        units.append(f"{i + 1}. {', '.join(words)}")
    return units


def _log_units(rng: random.Random, n: int = 900) -> list[str]:
    """Server log records: date, time, level, service, a request or an event; numbers of at most 5 digits."""
    units, minute = [], rng.randrange(24 * 60)
    for _ in range(n):
        minute = (minute + rng.randint(0, 2)) % (24 * 60)
        stamp = f"2026-03-{rng.randint(10, 28):02d} {minute // 60:02d}:{minute % 60:02d}:{rng.randint(0, 59):02d}"
        level, service = rng.choice(_LEVELS), rng.choice(_SERVICES)
        kind = rng.randrange(3)
        if kind == 0:
            msg = (f"{rng.choice(('GET', 'POST', 'PUT'))} {rng.choice(_ROUTES)} {rng.choice((200, 201, 304, 404, 500))}"
                   f" in {rng.randint(2, 9999)} ms")
        elif kind == 1:
            msg = f"request {rng.getrandbits(24):06x} retried after {rng.randint(1, 99)} s"
        else:
            msg = f"{rng.choice(('connected to', 'lost', 'reloaded'))} {rng.choice(_SERVICES)} pool of {rng.randint(2, 64)}"
        units.append(f"{stamp} {level} [{service}] {msg}")
    return units


def _chat_units(rng: random.Random, n: int = 700) -> list[str]:
    """Turns of a small-talk conversation, user and assistant alternating (no digits)."""
    asks = ("Can you tell me something about {t}?", "I keep thinking about {t}.", "What do you think of {t}?",
            "My friend {w} asked me about {t}.", "Let us talk about {t} for a moment.")
    answers = ("Sure, {t} is a pleasant topic, and there is a lot to say about it.",
               "I think {t} depends on the season and on the people involved.",
               "{w} probably enjoys {t} as much as you do.",
               "Many people find {t} relaxing after a long week.",
               "That is a good question about {t}; let me think it over.")
    units = []
    for i in range(n):
        topic, who = rng.choice(_TOPICS), rng.choice(_NAMES)
        if i % 2 == 0:
            units.append("User: " + rng.choice(asks).format(t=topic, w=who))
        else:
            units.append("Assistant: " + rng.choice(answers).format(t=topic, w=who))
    return units


HAYSTACK_KINDS = ("code", "prose", "wordlist", "logs", "chat")
# A prompt opens with RULER's preamble, its haystack's own line, or nothing (a third each, seeded).
_RULER_PREAMBLE = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                   "I will quiz you about the numbers afterwards.\n")
_PREAMBLES = {
    "code": "Here is some Python code with comments.\n",
    "prose": "Read the following story carefully.\n",
    "wordlist": "Below are several numbered lines of words and notes.\n",
    "logs": "Here is an excerpt of a server log.\n",
    "chat": "The following is a long conversation between a user and an assistant.\n",
}


def make_haystack(kind: str, rng: random.Random, packages: tuple[str, ...]) -> Haystack:
    """A seeded haystack stream of one kind (units joined by newlines; prose sentences by spaces)."""
    if kind == "code":
        return _code_haystack(packages, rng)
    if kind == "prose":
        return Haystack(_prose_units(rng), " ")
    if kind == "wordlist":
        return Haystack(_wordlist_units(rng), "\n")
    if kind == "logs":
        return Haystack(_log_units(rng), "\n")
    if kind == "chat":
        return Haystack(_chat_units(rng), "\n")
    raise VariedPromptError(f"unknown haystack kind '{kind}'; known: {', '.join(HAYSTACK_KINDS)}")


# ---- the split --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """Which values of each axis are held out of training (never in the training corpus)."""

    heldout_formats: tuple[str, ...] = ("chat_turn",)
    heldout_haystacks: tuple[str, ...] = ("prose",)
    heldout_questions: tuple[str, ...] = ("what_was",)

    def formats(self, seen: bool) -> tuple[str, ...]:
        return tuple(f for f in NEEDLE_FORMATS if (f not in self.heldout_formats) == seen)

    def haystacks(self, seen: bool) -> tuple[str, ...]:
        return tuple(h for h in HAYSTACK_KINDS if (h not in self.heldout_haystacks) == seen)

    def questions(self, seen: bool) -> tuple[str, ...]:
        return tuple(q for q in QUESTION_STYLES if (q not in self.heldout_questions) == seen)

    def as_dict(self) -> dict:
        return {"seen": {"formats": list(self.formats(True)), "haystacks": list(self.haystacks(True)),
                         "questions": list(self.questions(True))},
                "heldout": {"formats": list(self.heldout_formats), "haystacks": list(self.heldout_haystacks),
                            "questions": list(self.heldout_questions)}}


SPLIT = Split()


@dataclass(frozen=True)
class VariedTask:
    """An evaluation task: which formats, haystacks and questions its samples draw from (seen or held out)."""

    spec: TaskSpec
    seen_format: bool
    seen_haystack: bool
    seen_question: bool

    def pools(self, split: Split = SPLIT) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        return (split.formats(self.seen_format), split.haystacks(self.seen_haystack),
                split.questions(self.seen_question))


def _task(name: str, description: str, f: bool, h: bool, q: bool) -> VariedTask:
    return VariedTask(TaskSpec(name, "varied", "mixed", description, max_new_tokens=32), f, h, q)


VARIED_TASKS: dict[str, VariedTask] = {t.spec.name: t for t in [
    _task("varied_seen", "one needle; seen format, haystack and question (as in the training corpus)", True, True,
          True),
    _task("varied_new_format", "one needle in a held-out format (chat_turn); seen haystacks and questions", False,
          True, True),
    _task("varied_new_haystack", "one needle of a seen format in a held-out haystack (prose); seen questions", True,
          False, True),
    _task("varied_new_question", "one needle, seen format and haystack, held-out question (what_was)", True, True,
          False),
    _task("varied_new_all", "held-out format in a held-out haystack, held-out question", False, False, False),
]}


# ---- one prompt -------------------------------------------------------------------------------------------


def build_prompt(tokens: PromptTokens, length: int, rng: random.Random, fmt: str, haystack: str, question: str,
                 depth: float, packages: Sequence[str] = DEFAULT_HAYSTACK_PACKAGES, task: str = "varied"):
    """One single-needle prompt of ``length`` tokens: (context, query, answers, metadata).

    The needle (``fmt``) sits at ``depth`` of the ``haystack`` tokens; the ``question`` comes after the context."""
    for value, known, what in ((fmt, NEEDLE_FORMATS, "needle format"), (question, QUESTION_STYLES, "question style")):
        if value not in known:
            raise VariedPromptError(f"unknown {what} '{value}'; known: {', '.join(known)}")
    if haystack not in HAYSTACK_KINDS:
        raise VariedPromptError(f"unknown haystack kind '{haystack}'; known: {', '.join(HAYSTACK_KINDS)}")
    if not 0.0 <= depth <= 1.0:
        raise VariedPromptError(f"needle depth must be in [0, 1], got {depth}")
    needle_format = NEEDLE_FORMATS[fmt]
    key, value = _word_key(rng), str(rng.randint(10**6, 10**7 - 1))
    hay = make_haystack(haystack, rng, tuple(packages))
    needle = needle_format.render(key, value, code=haystack == "code")
    query = QUESTION_STYLES[question].render(key)
    preamble = (_RULER_PREAMBLE, _PREAMBLES[haystack], "")[rng.randrange(3)]
    context, query, records, meta = _haystack_prompt(preamble, hay, [(depth, needle)], query, tokens, length, task,
                                                     allow_partial=True)
    records[0].update(key=key, value=value, asked=True)
    meta.update(needles=records, format=fmt, haystack=haystack, question=question, key=key,
                haystack_packages=list(packages) if haystack == "code" else [])
    return context, query, [value], meta


def _check_length(length: int) -> None:
    if length < 256:
        raise VariedPromptError(f"length {length} is too short for a varied needle prompt (use at least 256 tokens)")


def generate_varied_sample(task: str, tokenizer, length: int, seed: int = 0, index: int = 0, num_samples: int = 1,
                           haystack_packages: Sequence[str] = DEFAULT_HAYSTACK_PACKAGES,
                           depths: Sequence[float] | None = None, split: Split = SPLIT) -> Sample:
    """Sample ``index`` of ``num_samples`` of a ``varied_*`` task: deterministic in (seed, task, length, index).

    The needle format cycles with ``index`` over the task's formats (so any ``num_samples`` covers them evenly);
    haystack and question are drawn from the task's pools with the sample's seed; depths spread evenly."""
    if task not in VARIED_TASKS:
        raise VariedPromptError(f"unknown varied task '{task}'; known: {', '.join(VARIED_TASKS)}")
    _check_length(length)
    formats, haystacks, questions = VARIED_TASKS[task].pools(split)
    s_seed = sample_seed(seed, task, length, index)
    rng = random.Random(s_seed)
    fmt = formats[index % len(formats)]
    haystack = rng.choice(haystacks)
    question = rng.choice(questions)
    depth = list(depths)[0] if depths is not None else spread_depths(index, num_samples, 1)[0]
    tokens = PromptTokens(tokenizer)
    context, query, answers, meta = build_prompt(tokens, length, rng, fmt, haystack, question, depth,
                                                 haystack_packages, task)
    prompt_tokens = tokens.count(context + query)
    if prompt_tokens > length or prompt_tokens < length - length_tolerance(length):
        raise VariedPromptError(f"could not fit task {task} to {length} tokens (got {prompt_tokens})")
    meta.update(prompt_tokens=prompt_tokens, index=index, num_samples=num_samples, base_seed=seed, metric="all",
                split={"format": fmt not in split.heldout_formats, "haystack": haystack not in split.heldout_haystacks,
                       "question": question not in split.heldout_questions})
    return Sample(task, length, depth, s_seed, context, query, answers, meta)


# ---- the training corpus ----------------------------------------------------------------------------------


def corpus_plan(lengths: Sequence[int], per_format: int, split: Split = SPLIT) -> list[tuple[int, str, str, str, int]]:
    """(length, format, haystack, question, index) of every training prompt: ``per_format`` prompts per seen
    format and length; haystack and question cycle over every seen combination (index-wise), so each pair appears
    as evenly as ``per_format`` allows."""
    formats, haystacks, questions = split.formats(True), split.haystacks(True), split.questions(True)
    if not formats or not haystacks or not questions:
        raise VariedPromptError("the split holds out every value of an axis: nothing left to train on")
    pairs = [(h, q) for q in questions for h in haystacks]
    plan = []
    for length in lengths:
        for f_i, fmt in enumerate(formats):
            for i in range(per_format):
                h, q = pairs[(i + f_i) % len(pairs)]
                plan.append((length, fmt, h, q, i))
    return plan


def check_corpus_out(out: str | Path, overwrite: bool = False) -> Path:
    """The corpus file to write: a .jsonl path that is not a directory, absent unless ``overwrite``."""
    out = Path(out)
    if out.suffix.lower() not in (".jsonl", ".ndjson"):
        raise VariedPromptError(f"--out must be a .jsonl file (build-labels reads JSONL), got {out}")
    if out.is_dir():
        raise VariedPromptError(f"--out {out} is a directory")
    if out.exists() and not overwrite:
        raise VariedPromptError(f"{out} already exists; choose another --out (or --overwrite)")
    return out


def check_corpus_options(lengths: Sequence[int], per_format: int,
                         haystack_packages: Sequence[str] = DEFAULT_HAYSTACK_PACKAGES,
                         split: Split = SPLIT) -> tuple[int, ...]:
    """Validated lengths; also checks ``per_format`` and, where code haystacks are seen, the stdlib packages."""
    if "code" in split.haystacks(True):
        if not haystack_packages:
            raise VariedPromptError("no haystack package given")
        stdlib_code_lines(tuple(haystack_packages))  # a package missing from this Python: one-line error now
    if per_format < 1:
        raise VariedPromptError(f"--per-format must be >= 1, got {per_format}")
    if not lengths:
        raise VariedPromptError("no length given")
    for length in lengths:
        _check_length(int(length))
    return tuple(int(n) for n in lengths)


def corpus_records(tokenizer, lengths: Sequence[int], per_format: int, seed: int = 0,
                   haystack_packages: Sequence[str] = DEFAULT_HAYSTACK_PACKAGES, split: Split = SPLIT,
                   progress: Callable[[], None] | None = None) -> Iterator[dict]:
    """The training corpus's records (``id``, ``text`` = context + question, and what made them), seen values
    only. Seeds are derived from ``seed`` under a name no evaluation task uses, so a corpus never repeats an
    evaluation prompt of the same seed; needle depths are drawn uniformly."""
    lengths = check_corpus_options(lengths, per_format, haystack_packages, split)
    tokens = PromptTokens(tokenizer)
    for length, fmt, haystack, question, i in corpus_plan(lengths, per_format, split):
        s_seed = sample_seed(seed, f"corpus/{fmt}", length, i)
        rng = random.Random(s_seed)
        depth = rng.random()
        context, query, answers, meta = build_prompt(tokens, length, rng, fmt, haystack, question, depth,
                                                     haystack_packages, "make-corpus")
        needle = meta["needles"][0]
        yield {"id": f"{fmt}-{haystack}-{question}-{length}-{i}", "text": context + query, "answers": answers,
               "format": fmt, "haystack": haystack, "question": question, "length": length,
               "prompt_tokens": tokens.count(context + query), "seed": s_seed,
               "needle": {k: needle[k] for k in ("text", "key", "value", "char_offset", "token_offset",
                                                 "depth_requested", "depth")}}
        if progress is not None:
            progress()


def write_corpus(out: str | Path, tokenizer, lengths: Sequence[int], per_format: int, seed: int = 0,
                 haystack_packages: Sequence[str] = DEFAULT_HAYSTACK_PACKAGES, split: Split = SPLIT,
                 progress: Callable[[], None] | None = None, overwrite: bool = False) -> dict:
    """Write the training corpus as JSONL to ``out`` (a temporary name, then renamed) and a ``.json`` card beside
    it (options, split, counts); returns the card. ``build-labels --corpus OUT`` reads it."""
    from lsa_runtime.outputs import temp_path, write_text_atomic

    out = check_corpus_out(out, overwrite)
    lengths = check_corpus_options(lengths, per_format, haystack_packages, split)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out)
    counts: dict[str, dict[str, int]] = {"format": {}, "haystack": {}, "question": {}}
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in corpus_records(tokenizer, lengths, per_format, seed, haystack_packages, split, progress):
                f.write(json.dumps(record) + "\n")
                n += 1
                for axis in counts:
                    counts[axis][record[axis]] = counts[axis].get(record[axis], 0) + 1
        tmp.replace(out)
    finally:
        if tmp.exists():
            tmp.unlink()
    card = {"format": CORPUS_FORMAT, "corpus": out.name, "documents": n, "lengths": list(lengths),
            "per_format": per_format, "seed": seed, "haystack_packages": list(haystack_packages),
            "split": split.as_dict(), "counts": counts}
    write_text_atomic(out.with_suffix(".json"), json.dumps(card, indent=1) + "\n")
    return card


def load_tokenizer(model: str):
    """The tokenizer of a bundled backbone name or checkpoint directory (prompts are sized in its tokens)."""
    from transformers import AutoTokenizer

    from lsa_runtime.backbone import resolve_model_path

    path = resolve_model_path(model)
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        raise VariedPromptError(f"model {model} has no tokenizer: the prompts are sized in its tokens")
    return AutoTokenizer.from_pretrained(path)
