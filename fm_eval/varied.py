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
  ``follow_up`` (one more user turn of a conversation, answered by "Assistant:");
* **task kind** (what is hidden and asked, RULER's task shapes): ``single`` (one needle), ``multikey`` (four needles
  of four keys in the same format, one asked), ``multivalue`` (four needles of one key, all four values asked),
  ``multiquery`` (four keys, all asked at once), ``vt`` (variable tracking: a chain "VAR A = 12345." ... "VAR E =
  VAR D.", RULER's question and answer lines; the format and question axes do not apply).

Every prompt opens with RULER's preamble, its haystack's own opening line or nothing (seeded), and ends with
RULER's answer line ("The special magic number for K mentioned in the provided text is:", "... numbers for K
... are:" where several values are asked; vt: RULER's): the bundled 15M
``reference`` backbone answers nothing else (free answer lines, e.g. "The access code of K is", gave 0 of 20 in
full decoding), so the variation is in the carrier of the fact, the question line, the haystack and the preamble.

:data:`SPLIT` declares which values are held out of training: the format ``chat_turn``, the haystack ``prose``,
the question ``what_was`` and the kind ``multiquery``. The training corpus (:func:`corpus_records`, ``fm-index make-corpus``) only ever
combines the seen values; the evaluation tasks (:data:`VARIED_TASKS`, ``fm-index evaluate --tasks varied_seen,
varied_new_format,...``) report seen and held-out combinations separately:

* ``varied_seen``: seen format x seen haystack x seen question;
* ``varied_new_format`` / ``varied_new_haystack`` / ``varied_new_question``: exactly one axis held out;
* ``varied_new_all``: held-out format in a held-out haystack with the held-out question;
* ``varied_multikey`` / ``varied_multivalue`` / ``varied_vt``: the other seen kinds, seen values otherwise;
* ``varied_multiquery``: the held-out kind, seen values otherwise.

The training corpus holds the single kind only unless asked (``make-corpus --kinds``), so earlier corpora stay
reproducible byte for byte.

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
import string
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
    _distinct,
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
ANSWER_LINE_PLURAL = " The special magic numbers for {key} mentioned in the provided text are:"


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
    plural: str  # the same question where several values are asked ({key}: one key or "K1, K2, and K3")

    def render(self, key: str, several: bool = False) -> str:
        if several:
            return self.plural.format(key=key) + ANSWER_LINE_PLURAL.format(key=key)
        return self.template.format(key=key) + ANSWER_LINE.format(key=key)


QUESTION_STYLES: dict[str, QuestionStyle] = {q.name: q for q in [
    QuestionStyle("direct", "\n# Question: What is the special magic number for {key} mentioned in the provided "
                            "text?\n# Answer:",
                  "\n# Question: What are all the special magic numbers for {key} mentioned in the provided "
                  "text?\n# Answer:"),
    QuestionStyle("indirect", "\nQuestion: Somewhere above, a number was tied to {key}. Which one?\nAnswer:",
                  "\nQuestion: Somewhere above, several numbers were tied to {key}. Which ones?\nAnswer:"),
    QuestionStyle("what_was", "\nQuestion: What was the special magic number for {key} again?\nAnswer:",
                  "\nQuestion: What were the special magic numbers for {key} again?\nAnswer:"),
    QuestionStyle("follow_up", "\nUser: Thanks. One more question: what special magic number did I give you for "
                               "{key}?\nAssistant:",
                  "\nUser: Thanks. One more question: what special magic numbers did I give you for "
                  "{key}?\nAssistant:"),
]}

# ---- task kinds -------------------------------------------------------------------------------------------

TASK_KINDS = ("single", "multikey", "multivalue", "multiquery", "vt")
N_NEEDLES = 4  # keys of multikey / multiquery, values of multivalue (RULER's defaults)
VT_HOPS = 4  # variable tracking: one chain of 5 variables (RULER's vt task)
VT_FORMAT = "vt_statement"  # the format recorded for vt prompts (its statements are RULER's, not a carrier)


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
    heldout_kinds: tuple[str, ...] = ("multiquery",)

    def formats(self, seen: bool) -> tuple[str, ...]:
        return tuple(f for f in NEEDLE_FORMATS if (f not in self.heldout_formats) == seen)

    def haystacks(self, seen: bool) -> tuple[str, ...]:
        return tuple(h for h in HAYSTACK_KINDS if (h not in self.heldout_haystacks) == seen)

    def questions(self, seen: bool) -> tuple[str, ...]:
        return tuple(q for q in QUESTION_STYLES if (q not in self.heldout_questions) == seen)

    def kinds(self, seen: bool) -> tuple[str, ...]:
        return tuple(k for k in TASK_KINDS if (k not in self.heldout_kinds) == seen)

    def as_dict(self) -> dict:
        return {"seen": {"formats": list(self.formats(True)), "haystacks": list(self.haystacks(True)),
                         "questions": list(self.questions(True)), "kinds": list(self.kinds(True))},
                "heldout": {"formats": list(self.heldout_formats), "haystacks": list(self.heldout_haystacks),
                            "questions": list(self.heldout_questions), "kinds": list(self.heldout_kinds)}}


SPLIT = Split()


@dataclass(frozen=True)
class VariedTask:
    """An evaluation task: which formats, haystacks and questions its samples draw from (seen or held out)."""

    spec: TaskSpec
    seen_format: bool
    seen_haystack: bool
    seen_question: bool
    kind: str = "single"

    def pools(self, split: Split = SPLIT) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        return (split.formats(self.seen_format), split.haystacks(self.seen_haystack),
                split.questions(self.seen_question))


def _task(name: str, description: str, f: bool, h: bool, q: bool, kind: str = "single") -> VariedTask:
    # several values (multivalue, multiquery) or five variable names (vt) need more new tokens than one value
    new_tokens = 32 if kind in ("single", "multikey") else 64
    return VariedTask(TaskSpec(name, "varied", "mixed", description, max_new_tokens=new_tokens), f, h, q, kind)


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
    _task("varied_multikey", "four needles of four keys in one seen format, one asked; seen haystack and question",
          True, True, True, "multikey"),
    _task("varied_multivalue", "four needles of one key in one seen format, all asked; seen haystack and question",
          True, True, True, "multivalue"),
    _task("varied_vt", "variable tracking (RULER's statements and question) in a seen haystack", True, True, True,
          "vt"),
    _task("varied_multiquery", "held-out kind: four keys in one seen format, all asked at once; seen haystack and "
          "question", True, True, True, "multiquery"),
]}


# ---- one prompt -------------------------------------------------------------------------------------------


def build_prompt(tokens: PromptTokens, length: int, rng: random.Random, fmt: str, haystack: str, question: str,
                 depth: float, packages: Sequence[str] = DEFAULT_HAYSTACK_PACKAGES, task: str = "varied",
                 kind: str = "single"):
    """One prompt of ``length`` tokens: (context, query, answers, metadata).

    The (first asked) needle, in format ``fmt``, sits at ``depth`` of the ``haystack`` tokens, the other needles of
    the ``kind`` at seeded depths; the ``question`` comes after the context. For ``vt`` the five statements sit in
    chain order from ``depth`` on, and ``fmt`` / ``question`` are not used (RULER's lines)."""
    if kind not in TASK_KINDS:
        raise VariedPromptError(f"unknown task kind '{kind}'; known: {', '.join(TASK_KINDS)}")
    for value, known, what in ((fmt, NEEDLE_FORMATS, "needle format"), (question, QUESTION_STYLES, "question style")):
        if kind != "vt" and value not in known:
            raise VariedPromptError(f"unknown {what} '{value}'; known: {', '.join(known)}")
    if haystack not in HAYSTACK_KINDS:
        raise VariedPromptError(f"unknown haystack kind '{haystack}'; known: {', '.join(HAYSTACK_KINDS)}")
    if not 0.0 <= depth <= 1.0:
        raise VariedPromptError(f"needle depth must be in [0, 1], got {depth}")
    code = haystack == "code"
    if kind == "vt":
        return _build_vt_prompt(tokens, length, rng, make_haystack(haystack, rng, tuple(packages)), haystack, depth,
                                packages, task)
    n_keys = N_NEEDLES if kind in ("multikey", "multiquery") else 1
    n_values = N_NEEDLES if kind == "multivalue" else 1
    # drawn in this order (keys, values, haystack) so that single-needle prompts stay those of earlier corpora
    keys = _distinct(lambda: _word_key(rng), n_keys)
    values = _distinct(lambda: str(rng.randint(10**6, 10**7 - 1)), n_keys * n_values)
    hay = make_haystack(haystack, rng, tuple(packages))
    facts = [(keys[i // n_values], v) for i, v in enumerate(values)]  # (key, value), key-major
    asked_keys = keys if kind == "multiquery" else [keys[rng.randrange(n_keys)]] if kind == "multikey" else keys
    first = next(i for i, (k, _) in enumerate(facts) if k in asked_keys)
    depths = [depth if i == first else rng.random() for i in range(len(facts))]
    needle_format = NEEDLE_FORMATS[fmt]
    inserts = [(d, needle_format.render(k, v, code=code)) for d, (k, v) in zip(depths, facts)]
    several = kind in ("multivalue", "multiquery")
    key_text = asked_keys[0] if len(asked_keys) == 1 else ", ".join(asked_keys[:-1]) + ", and " + asked_keys[-1]
    query = QUESTION_STYLES[question].render(key_text, several)
    preamble = (_RULER_PREAMBLE, _PREAMBLES[haystack], "")[rng.randrange(3)]
    context, query, records, meta = _haystack_prompt(preamble, hay, inserts, query, tokens, length, task,
                                                     allow_partial=True)
    for record, (k, v) in zip(records, facts):
        record.update(key=k, value=v, asked=k in asked_keys)
    answers = [v for k, v in facts if k in asked_keys]
    meta.update(needles=records, format=fmt, haystack=haystack, question=question, kind=kind, key=asked_keys[0],
                asked_keys=asked_keys, haystack_packages=list(packages) if code else [])
    return context, query, answers, meta


def _build_vt_prompt(tokens, length, rng, hay, haystack, depth, packages, task):
    """Variable tracking as RULER writes it (statements, question and answer lines) in a varied haystack: one chain
    of ``VT_HOPS`` + 1 variables, its first statement at ``depth``, the others after it in chain order."""
    names = _distinct(lambda: "".join(rng.choice(string.ascii_uppercase) for _ in range(5)), VT_HOPS + 1)
    value = str(rng.randint(10**4, 10**5 - 1))
    prefix = "# " if haystack == "code" else ""
    statements = [f"{prefix}VAR {names[0]} = {value}."] + [
        f"{prefix}VAR {names[h]} = VAR {names[h - 1]}." for h in range(1, VT_HOPS + 1)]
    depths = sorted([depth] + [depth + (1 - depth) * rng.random() for _ in range(VT_HOPS)])
    preamble = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    query = (f"\n# Question: Find all variables that are assigned the value {value} in the text above.\n"
             f"# Answer: According to the chain(s) of variable assignment in the text above, {VT_HOPS + 1} "
             f"variables are assigned the value {value}, they are:")
    context, query, records, meta = _haystack_prompt(preamble, hay, list(zip(depths, statements)), query, tokens,
                                                     length, task, allow_partial=True)
    for hop, record in enumerate(records):
        record.update(key=names[hop], value=value if hop == 0 else names[hop - 1], asked=True, hop=hop)
    meta.update(needles=records, format=VT_FORMAT, haystack=haystack, question="vt", kind="vt", key=names[0],
                asked_keys=list(names), haystack_packages=list(packages) if haystack == "code" else [])
    return context, query, list(names), meta


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
    kind = VARIED_TASKS[task].kind
    s_seed = sample_seed(seed, task, length, index)
    rng = random.Random(s_seed)
    fmt = formats[index % len(formats)]
    haystack = rng.choice(haystacks)
    question = rng.choice(questions)
    depth = list(depths)[0] if depths is not None else spread_depths(index, num_samples, 1)[0]
    tokens = PromptTokens(tokenizer)
    context, query, answers, meta = build_prompt(tokens, length, rng, fmt, haystack, question, depth,
                                                 haystack_packages, task, kind)
    prompt_tokens = tokens.count(context + query)
    if prompt_tokens > length or prompt_tokens < length - length_tolerance(length):
        raise VariedPromptError(f"could not fit task {task} to {length} tokens (got {prompt_tokens})")
    meta.update(prompt_tokens=prompt_tokens, index=index, num_samples=num_samples, base_seed=seed, metric="all",
                split={"format": fmt not in split.heldout_formats, "haystack": haystack not in split.heldout_haystacks,
                       "question": question not in split.heldout_questions, "kind": kind not in split.heldout_kinds})
    return Sample(task, length, depth, s_seed, context, query, answers, meta)


# ---- the training corpus ----------------------------------------------------------------------------------


def corpus_plan(lengths: Sequence[int], per_format: int, split: Split = SPLIT,
                kinds: Sequence[str] = ("single",)) -> list[tuple[int, str, str, str, str, int]]:
    """(length, kind, format, haystack, question, index) of every training prompt: ``per_format`` prompts per
    kind, seen format and length (vt, whose statements are RULER's, as many as one kind of every format gets);
    haystack and question cycle over every seen combination (index-wise), so each pair appears as evenly as
    ``per_format`` allows. The single kind's entries come first, in the order of corpora before ``kinds``."""
    formats, haystacks, questions = split.formats(True), split.haystacks(True), split.questions(True)
    if not formats or not haystacks or not questions:
        raise VariedPromptError("the split holds out every value of an axis: nothing left to train on")
    check_kinds(kinds, split)
    pairs = [(h, q) for q in questions for h in haystacks]
    plan = []
    for kind in kinds:
        for l_i, length in enumerate(lengths):
            for f_i, fmt in enumerate(formats):
                for i in range(per_format):
                    # single: the cycle of corpora written before the kinds; the others spread the pairs over
                    # formats and lengths, so that a few prompts per format already cover every pair
                    slot = i + f_i if kind == "single" else i * len(formats) + f_i + l_i
                    h, q = pairs[slot % len(pairs)]
                    if kind == "vt":  # one vt prompt per (format slot, i): the slot only varies the haystack
                        plan.append((length, kind, VT_FORMAT, h, "vt", f_i * per_format + i))
                    else:
                        plan.append((length, kind, fmt, h, q, i))
    return plan


def check_kinds(kinds: Sequence[str], split: Split = SPLIT) -> tuple[str, ...]:
    """Task kinds for a training corpus: known, seen (never a held-out kind), at least one."""
    if not kinds:
        raise VariedPromptError("no task kind given")
    for kind in kinds:
        if kind not in TASK_KINDS:
            raise VariedPromptError(f"unknown task kind '{kind}'; known: {', '.join(TASK_KINDS)}")
        if kind in split.heldout_kinds:
            raise VariedPromptError(f"task kind '{kind}' is held out of training (the split); seen kinds: "
                                    f"{', '.join(split.kinds(True))}")
    return tuple(dict.fromkeys(kinds))


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
                   progress: Callable[[], None] | None = None, kinds: Sequence[str] = ("single",)) -> Iterator[dict]:
    """The training corpus's records (``id``, ``text`` = context + question, and what made them), seen values
    only. Seeds are derived from ``seed`` under a name no evaluation task uses, so a corpus never repeats an
    evaluation prompt of the same seed; needle depths are drawn uniformly. ``needle``: the first asked needle;
    ``needles``: all of them (vt: the chain's statements)."""
    lengths = check_corpus_options(lengths, per_format, haystack_packages, split)
    tokens = PromptTokens(tokenizer)
    for length, kind, fmt, haystack, question, i in corpus_plan(lengths, per_format, split, kinds):
        # single-needle prompts keep the seeds and ids of corpora written before the kinds existed
        name = f"corpus/{fmt}" if kind == "single" else f"corpus/{kind}/{fmt}"
        s_seed = sample_seed(seed, name, length, i)
        rng = random.Random(s_seed)
        depth = rng.random()
        context, query, answers, meta = build_prompt(tokens, length, rng, fmt, haystack, question, depth,
                                                     haystack_packages, "make-corpus", kind)
        fields = ("text", "key", "value", "char_offset", "token_offset", "depth_requested", "depth")
        needles = [{k: n[k] for k in (*fields, "asked")} for n in meta["needles"]]
        first = next(n for n in needles if n["asked"])
        prefix = "" if kind == "single" else f"{kind}-"
        yield {"id": f"{prefix}{fmt}-{haystack}-{question}-{length}-{i}", "text": context + query,
               "answers": answers, "kind": kind, "format": fmt, "haystack": haystack, "question": question,
               "length": length, "prompt_tokens": tokens.count(context + query), "seed": s_seed,
               "needle": {k: first[k] for k in fields}, "needles": needles}
        if progress is not None:
            progress()


def write_corpus(out: str | Path, tokenizer, lengths: Sequence[int], per_format: int, seed: int = 0,
                 haystack_packages: Sequence[str] = DEFAULT_HAYSTACK_PACKAGES, split: Split = SPLIT,
                 progress: Callable[[], None] | None = None, overwrite: bool = False,
                 kinds: Sequence[str] = ("single",)) -> dict:
    """Write the training corpus as JSONL to ``out`` (a temporary name, then renamed) and a ``.json`` card beside
    it (options, split, counts); returns the card. ``build-labels --corpus OUT`` reads it."""
    from lsa_runtime.outputs import temp_path, write_text_atomic

    out = check_corpus_out(out, overwrite)
    lengths = check_corpus_options(lengths, per_format, haystack_packages, split)
    kinds = check_kinds(kinds, split)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out)
    counts: dict[str, dict[str, int]] = {"kind": {}, "format": {}, "haystack": {}, "question": {}}
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in corpus_records(tokenizer, lengths, per_format, seed, haystack_packages, split, progress,
                                         kinds):
                f.write(json.dumps(record) + "\n")
                n += 1
                for axis in counts:
                    counts[axis][record[axis]] = counts[axis].get(record[axis], 0) + 1
        tmp.replace(out)
    finally:
        if tmp.exists():
            tmp.unlink()
    card = {"format": CORPUS_FORMAT, "corpus": out.name, "documents": n, "lengths": list(lengths),
            "per_format": per_format, "kinds": list(kinds), "seed": seed, "haystack_packages": list(haystack_packages),
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
