"""RULER-style synthetic long-context tasks, written by us: offline, seeded, sized in backbone tokens.

The task families and their scoring follow RULER (Hsieh et al., 2024, "RULER: What's the Real Context Size
of Your Long-Context Language Models?"):

* needle in a haystack (``niah_*``): single, multi-key (distractor needles), multi-value (one key, several
  values), multi-query (several keys asked at once); 7-digit numbers or uuid-like values; needles placed at
  depths spread evenly over the haystack;
* variable tracking (``vt``): chains of assignments ``VAR A = 12345``, ``VAR B = VAR A``, ... spread over the
  haystack; the answer is every variable of the chain (multi-hop retrieval);
* aggregation: common-word extraction (``cwe``, a numbered word list where a few words repeat more often)
  and frequent-word extraction (``fwe``, coded words with Zipf frequencies);
* ``context_independent``: a haystack with no useful information and a query that carries its own answer.
  The full model needs nothing from the context, so every entry a memory indexer fetches is a false
  positive: this task measures the method's fetch overhead where retrieval cannot help.

Haystacks: code of held-out standard-library packages (read from the running interpreter, so offline on
every machine; the packages are a parameter), RULER's repeated noise sentences, or distractor needles.

Lengths are in tokens of the backbone's tokenizer: a generator fills its haystack until the whole prompt
(``context + query``, encoded as the runner encodes it) is ``length`` tokens, at most and within
:func:`length_tolerance` below. Each :class:`Sample` records where its needles landed (requested depth,
measured depth, token offset in the prompt). Scoring is RULER's string match (:func:`string_match_all`).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import random
import re
import string
import sysconfig
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from lsa_runtime.errors import FmIndexError

# RULER's "repeat" haystack.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# The stdlib packages the reference model never saw in training (reference/build_corpus.py).
DEFAULT_HAYSTACK_PACKAGES = ("email", "json", "http", "wsgiref", "xmlrpc")

# Keys of needles are "adjective-noun" pairs, as RULER's word keys.
_ADJECTIVES = ("able acid angry bitter brave bright broad calm cheap clean clever cold cool curly damp dark dear "
               "deep dry eager early easy empty fair fancy fast fierce flat fresh giant glad golden grand green "
               "happy heavy hollow honest huge humble icy jolly kind large lazy little lively loud lucky mellow "
               "merry mighty modern narrow neat nervous noble odd old orange pale plain polite proud purple quick "
               "quiet rapid rare red rich rough round royal rusty sad safe salty sharp shiny short shy silent "
               "silly simple slow small smooth soft solid sour spicy steep sticky stormy strong sunny sweet swift "
               "tall tame tender thick tidy tiny tough vast warm wet wide wild wise witty young zealous").split()
_NOUNS = ("anchor apple arrow badge banjo barn basket beach bell bison blade bottle bridge brush bucket cabin "
          "camel candle canyon carpet castle cedar chair cherry cloud clover comet copper coral crane crow "
          "desert dragon drum eagle engine falcon feather fence ferry flute forest fox garden gate glacier goat "
          "harbor hammer harp hawk helmet heron hill island jacket jungle kettle kite ladder lagoon lamp lantern "
          "lemon lion lizard maple marble meadow mirror moon mountain needle oak ocean orchid otter owl paddle "
          "panda parrot pebble pepper piano pillow pine planet pond pumpkin puzzle quartz rabbit radio raven "
          "reef ribbon river robin rocket saddle salmon shell shovel silver sparrow spider spoon squirrel "
          "statue stone storm sugar tiger tower trumpet tulip turtle valley violin wagon walrus whale willow "
          "window wolf yacht zebra").split()
_CONSONANTS = "bcdfghjklmnprstvz"
_VOWELS = "aeiou"


def length_tolerance(length: int) -> int:
    """How far below ``length`` a generated prompt may fall (it never exceeds ``length``)."""
    return max(8, length // 100)


# ---- task specifications --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """One RULER task configuration (the fields RULER's ``synthetic.yaml`` sets per task).

    ``family``: niah | vt | cwe | fwe | context_independent. ``haystack``: code | noise | needles | words.
    ``num_needle_k`` keys, ``num_needle_v`` values per key, ``num_needle_q`` keys asked (niah).
    ``metric``: ``all`` (fraction of answers found) or ``part`` (any answer found).
    """

    name: str
    family: str
    haystack: str
    description: str
    num_needle_k: int = 1
    num_needle_v: int = 1
    num_needle_q: int = 1
    key_type: str = "words"  # words | uuids
    value_type: str = "numbers"  # numbers | uuids
    num_chains: int = 1
    num_hops: int = 4
    num_common: int = 10
    freq_common: int = 30
    freq_uncommon: int = 3
    num_top: int = 3
    zipf_alpha: float = 2.0
    max_new_tokens: int = 32
    metric: str = "all"


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in [
    TaskSpec("niah_single_1", "niah", "noise", "one needle (number) in repeated noise"),
    TaskSpec("niah_single_2", "niah", "code", "one needle (number) in held-out stdlib code"),
    TaskSpec("niah_single_3", "niah", "code", "one needle (uuid) in held-out stdlib code", value_type="uuids",
             max_new_tokens=48),
    TaskSpec("niah_multikey_1", "niah", "code", "4 needles with other keys, 1 asked (code)", num_needle_k=4),
    TaskSpec("niah_multikey_2", "niah", "needles", "haystack made of distractor needles, 1 asked"),
    TaskSpec("niah_multikey_3", "niah", "needles", "distractor needles, uuid keys and uuid values",
             key_type="uuids", value_type="uuids", max_new_tokens=48),
    TaskSpec("niah_multivalue", "niah", "code", "one key with 4 values, all asked", num_needle_v=4,
             max_new_tokens=64),
    TaskSpec("niah_multiquery", "niah", "code", "4 keys, all 4 asked at once", num_needle_k=4, num_needle_q=4,
             max_new_tokens=64),
    TaskSpec("vt", "vt", "noise", "variable tracking: one chain of 4 hops", max_new_tokens=30),
    TaskSpec("cwe", "cwe", "words", "the 10 most common words of a numbered list", max_new_tokens=120),
    TaskSpec("fwe", "fwe", "words", "the 3 most frequent coded words (Zipf frequencies)", max_new_tokens=50),
    TaskSpec("context_independent", "context_independent", "code",
             "no useful context: the query carries its own answer (fetches are false positives)"),
]}


def _varied_tasks() -> dict[str, TaskSpec]:
    from .varied import VARIED_TASKS  # imported late: fm_eval.varied builds on this module

    return {name: task.spec for name, task in VARIED_TASKS.items()}


def task_spec(name: str) -> TaskSpec:
    """The spec of a RULER task (:data:`TASKS`) or of a ``varied_*`` task (:mod:`fm_eval.varied`)."""
    if name in TASKS:
        return TASKS[name]
    varied = _varied_tasks()
    if name in varied:
        return varied[name]
    raise FmIndexError(f"unknown task '{name}'; known: {', '.join([*TASKS, *varied])}")


def parse_tasks(text: str | Sequence[str] | None) -> list[TaskSpec]:
    """``"niah_single_2,vt"`` (or None / "all" for every RULER task) -> specs; ``varied`` stands for every
    ``varied_*`` task of :mod:`fm_eval.varied` (not part of "all"); unknown names are an FmIndexError."""
    if text is None or (isinstance(text, str) and text.strip() in ("", "all")):
        return list(TASKS.values())
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    varied = _varied_tasks()
    names = [v for n in names for v in (list(varied) if n == "varied" else [n])]
    unknown = [n for n in names if n not in TASKS and n not in varied]
    if unknown:
        raise FmIndexError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join([*TASKS, *varied])} "
                           f"(varied = every varied_* task)")
    if not names:
        raise FmIndexError("no task given")
    return [TASKS[n] if n in TASKS else varied[n] for n in dict.fromkeys(names)]


# ---- samples ----------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One prompt: the model reads ``context + query`` and must produce ``answers`` (RULER string match).

    ``length`` is the requested prompt length in tokens (``metadata["prompt_tokens"]`` the real one);
    ``depth`` the requested depth (0 = start of the haystack, 1 = end) of the first asked needle, None
    where no needle is asked for (cwe, fwe, context_independent). ``metadata["needles"]`` lists every
    inserted needle with its requested and measured depth and its token offset in the prompt.
    """

    task: str
    length: int
    depth: float | None
    seed: int
    context: str
    query: str
    answers: list[str]
    metadata: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return self.context + self.query

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict) -> "Sample":
        return cls(**{k: row[k] for k in ("task", "length", "depth", "seed", "context", "query", "answers",
                                           "metadata")})


def sample_seed(seed: int, task: str, length: int, index: int) -> int:
    """A per-sample seed, stable across processes and Python versions (no ``hash()``)."""
    digest = hashlib.sha256(f"{seed}/{task}/{length}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def spread_depths(index: int, num_samples: int, num_needles: int) -> list[float]:
    """Depths of a sample's needles, spread evenly: needle j sits in slice j of [0, 1] (one slice per needle),
    and sample ``index`` of ``num_samples`` sweeps its position inside the slice from start to end."""
    frac = index / (num_samples - 1) if num_samples > 1 else 0.5
    return [(j + frac) / num_needles for j in range(num_needles)]


class PromptTokens:
    """Counts tokens exactly as the evaluation runner encodes prompts (the tokenizer's defaults)."""

    def __init__(self, tokenizer):
        if tokenizer is None:
            raise FmIndexError("the backbone has no tokenizer: RULER tasks are sized in tokens and need one")
        self.tokenizer = tokenizer

    def count(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def counts(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []

    def token_offset(self, text: str, char_offset: int) -> int:
        """Index of the token of ``text`` holding character ``char_offset`` (where that character starts)."""
        enc = self.tokenizer(text, return_offsets_mapping=True)
        for i, (start, end) in enumerate(enc["offset_mapping"]):
            if end > char_offset and end > start:
                return i
        return len(enc["input_ids"])


# ---- haystacks ------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def stdlib_code_lines(packages: tuple[str, ...]) -> tuple[str, ...]:
    """Non-blank source lines of the given stdlib packages (or modules), files in sorted path order.

    Read from the running interpreter's standard library, so no download is ever needed.
    """
    lib = Path(sysconfig.get_paths()["stdlib"])
    lines: list[str] = []
    for package in packages:
        directory, module = lib / package, lib / f"{package}.py"
        files = sorted(directory.rglob("*.py")) if directory.is_dir() else [module] if module.is_file() else []
        if not files:
            raise FmIndexError(f"haystack package '{package}' is not in this Python's standard library ({lib})")
        for path in files:
            text = path.read_text(encoding="utf-8", errors="replace")
            lines.append(f"# ---- {path.relative_to(lib).as_posix()} ----")
            lines.extend(line.rstrip() for line in text.splitlines() if line.strip())
    return tuple(lines)


@dataclass
class Haystack:
    """A stream of units (code lines or sentences) joined by ``sep``; cycles when a prompt needs more."""

    units: Sequence[str]
    sep: str
    start: int = 0  # where this sample's stream starts (seeded), so samples do not share one haystack

    def take(self, n: int) -> list[str]:
        m = len(self.units)
        return [self.units[(self.start + i) % m] for i in range(n)]


def _code_haystack(packages: tuple[str, ...], rng: random.Random) -> Haystack:
    lines = stdlib_code_lines(packages)
    return Haystack(lines, "\n", start=rng.randrange(len(lines)))


def _noise_haystack() -> Haystack:
    return Haystack([s.strip() + "." for s in NOISE.split(".") if s.strip()], " ")


# ---- keys, values, words ---------------------------------------------------------------------------------


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _word_key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _distinct(make: Callable[[], str], n: int, taken: set[str] | None = None) -> list[str]:
    taken = set() if taken is None else taken
    out: list[str] = []
    while len(out) < n:
        item = make()
        if item not in taken:
            taken.add(item)
            out.append(item)
    return out


def _pseudo_word(rng: random.Random) -> str:
    """A pronounceable non-word (CWE words): 2-3 consonant-vowel syllables, optionally a final consonant."""
    syllables = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.choice((2, 3))))
    return syllables + (rng.choice(_CONSONANTS) if rng.random() < 0.5 else "")


def _coded_word(rng: random.Random) -> str:
    """A coded word (FWE): 5 random lowercase letters."""
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(5))


# ---- fitting a prompt to a token length -----------------------------------------------------------------


def _largest_fitting(count_at: Callable[[int], int], target: int, guess: int, hi: int,
                     step: int | None = None) -> int:
    """Largest n in [0, hi] with count_at(n) <= target (count_at nondecreasing), searched from ``guess`` in
    steps doubling from ``step`` (default guess / 64: a close guess deserves a small one). The answer does not
    depend on the guess or the step, only the number of count_at calls does."""
    guess = min(max(guess, 0), hi)
    first = max(1, step if step is not None else guess // 64)
    if count_at(guess) <= target:
        lo, step = guess, first
        while lo < hi:
            probe = min(hi, lo + step)
            if count_at(probe) > target:
                hi = probe - 1
                break
            lo, step = probe, step * 2
    else:
        hi, step = guess - 1, first
        while True:
            probe = max(0, hi - step)
            if probe == 0 or count_at(probe) <= target:
                lo = probe
                break
            hi, step = probe - 1, step * 2
    while lo < hi:  # invariant: count_at(lo) <= target (or lo == 0)
        mid = (lo + hi + 1) // 2
        if count_at(mid) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _fit(render: Callable[[int], str], tokens: PromptTokens, target: int, guess: int, hi: int,
         task: str, step: int | None = None, memo: dict[int, int] | None = None) -> tuple[int, str, int]:
    """Find the largest haystack size n whose prompt fits in ``target`` tokens; returns (n, prompt, tokens).
    ``memo``: token counts of renderings already measured (n -> tokens)."""
    memo = {} if memo is None else memo

    def count_at(n: int) -> int:
        if n not in memo:
            memo[n] = tokens.count(render(n))
        return memo[n]

    n = _largest_fitting(count_at, target, guess, hi, step)
    if count_at(n) > target:
        raise FmIndexError(f"length {target} is too short for task {task}: its prompt without haystack already "
                           f"takes {count_at(n)} tokens")
    return n, render(n), count_at(n)


# ---- generators -----------------------------------------------------------------------------------------


def generate_samples(task: str | TaskSpec, tokenizer, length: int, num_samples: int, seed: int = 0,
                     haystack_packages: Sequence[str] = DEFAULT_HAYSTACK_PACKAGES) -> list[Sample]:
    """``num_samples`` samples of ``task`` at ``length`` prompt tokens; needle depths spread evenly over them."""
    return [generate_sample(task, tokenizer, length, seed=seed, index=i, num_samples=num_samples,
                            haystack_packages=haystack_packages) for i in range(num_samples)]


def generate_sample(task: str | TaskSpec, tokenizer, length: int, seed: int = 0, index: int = 0,
                    num_samples: int = 1, haystack_packages: Sequence[str] = DEFAULT_HAYSTACK_PACKAGES,
                    depths: Sequence[float] | None = None) -> Sample:
    """Sample ``index`` of ``num_samples`` of ``task``: deterministic in (seed, task, length, index).

    ``depths`` overrides the evenly spread needle depths (niah: one per needle; vt: one per statement).
    """
    if isinstance(task, str) and task not in TASKS:
        from .varied import VARIED_TASKS, generate_varied_sample

        if task in VARIED_TASKS:
            return generate_varied_sample(task, tokenizer, length, seed=seed, index=index, num_samples=num_samples,
                                          haystack_packages=haystack_packages, depths=depths)
        raise FmIndexError(f"unknown task '{task}'; known: {', '.join([*TASKS, *VARIED_TASKS])}")
    spec = TASKS[task] if isinstance(task, str) else task
    if length < 16:
        raise FmIndexError(f"length {length} is too short (need at least 16 tokens)")
    tokens = PromptTokens(tokenizer)
    s_seed = sample_seed(seed, spec.name, length, index)
    rng = random.Random(s_seed)
    packages = tuple(haystack_packages)
    builder = {"niah": _build_niah, "vt": _build_vt, "cwe": _build_cwe, "fwe": _build_fwe,
               "context_independent": _build_context_independent}[spec.family]
    context, query, answers, metadata, depth = builder(spec, tokens, length, rng, index, num_samples, packages,
                                                       depths)
    prompt_tokens = tokens.count(context + query)
    if prompt_tokens > length or prompt_tokens < length - length_tolerance(length):
        raise FmIndexError(f"could not fit task {spec.name} to {length} tokens (got {prompt_tokens})")
    metadata.update(prompt_tokens=prompt_tokens, index=index, num_samples=num_samples, base_seed=seed,
                    metric=spec.metric)
    return Sample(spec.name, length, depth, s_seed, context, query, answers, metadata)


def _needle_sentence(spec: TaskSpec, key: str, value: str, code: bool) -> str:
    kind = "uuid" if spec.value_type == "uuids" else "number"
    text = f"One of the special magic {kind}s for {key} is: {value}."
    return f"# {text}" if code else text


def _place(units: list[str], inserts: list[tuple[float, str]], unit_tokens: list[int]) -> tuple[list[str], list[int]]:
    """Insert ``(depth, text)`` items between units at the boundary nearest to ``depth`` of the haystack tokens
    (cumulative unit token counts); keeps the order of equal depths. Returns the new units and, per insert,
    its index in the new list."""
    cumulative = [0]
    for c in unit_tokens:
        cumulative.append(cumulative[-1] + c)
    total = cumulative[-1]
    slots = []
    for depth, _ in inserts:
        goal = depth * total
        slot = min(range(len(cumulative)), key=lambda i: (abs(cumulative[i] - goal), i))
        slots.append(slot)
    order = sorted(range(len(inserts)), key=lambda j: (slots[j], j))
    out: list[str] = []
    positions = [0] * len(inserts)
    k = 0
    for i in range(len(units) + 1):
        while k < len(order) and slots[order[k]] == i:
            positions[order[k]] = len(out)
            out.append(inserts[order[k]][1])
            k += 1
        if i < len(units):
            out.append(units[i])
    return out, positions


def _haystack_prompt(preamble: str, hay: Haystack, inserts: list[tuple[float, str]], query: str,
                     tokens: PromptTokens, length: int, task: str, allow_partial: bool):
    """Fit ``preamble + haystack-with-inserts + query`` to ``length`` tokens; measure where inserts landed.

    Returns (context, query, records) with one record per insert: depth requested/measured, offsets.
    """
    per_unit = max(1.0, sum(tokens.counts(list(hay.take(min(len(hay.units), 256))))) /
                   min(len(hay.units), 256))
    fixed = tokens.count(preamble + "".join(t + hay.sep for _, t in inserts) + query)
    guess = max(0, int((length - fixed) / (per_unit + 0.5)))
    hi = max(guess * 2 + 64, 64)
    counted: list[int] = []  # token counts of the stream's units, extended on demand (take(n) is a prefix)

    def unit_tokens(n: int) -> list[int]:
        if n > len(counted):
            counted.extend(tokens.counts(hay.take(max(n, 2 * len(counted)))[len(counted):]))
        return counted[:n]

    def body(n: int, tail: str = "") -> tuple[list[str], list[int]]:
        units, counts = hay.take(n), unit_tokens(n)
        if tail:  # the partial unit is part of the haystack the depths refer to
            units, counts = units + [tail], counts + tokens.counts([tail])
        return _place(units, inserts, counts)

    def render(n: int, tail: str = "") -> str:
        return preamble + hay.sep.join(body(n, tail)[0]) + query

    # a close guess (each tokenization of the prompt costs ~0.1 s per 64K tokens): the units' own token counts
    # summed, scaled by how the joined text of that many units measures (joined, units merge across their
    # separators: ~8% fewer tokens in the noise haystack); the search from it still decides
    prefix = list(itertools.accumulate(unit_tokens(hi), initial=0))
    close = max(0, bisect.bisect_right(prefix, length - fixed) - 1)
    memo: dict[int, int] = {close: tokens.count(render(close))}
    scale = (memo[close] - fixed) / prefix[close] if prefix[close] > 0 and memo[close] > fixed else 1.0
    close = max(0, bisect.bisect_right(prefix, (length - fixed) / scale) - 1)
    n, _, used = _fit(render, tokens, length, close, hi, task, step=max(1, close // 2048), memo=memo)
    tail = ""
    if allow_partial and used < length:  # top up with a prefix of the next unit (a partial code line)
        nxt = hay.take(n + 1)[-1]
        c = _largest_fitting(lambda k: tokens.count(render(n, nxt[:k])) if k else used, length,
                             len(nxt) // 2, len(nxt))
        tail = nxt[:c]
    placed, positions = body(n, tail)
    haystack = hay.sep.join(placed)
    context = preamble + haystack
    prompt = context + query
    starts, pos = [], len(preamble)
    for piece in placed:
        starts.append(pos)
        pos += len(piece) + len(hay.sep)
    hay_first = tokens.token_offset(prompt, len(preamble))
    hay_end = tokens.token_offset(prompt, len(context))
    # Depth is measured in haystack tokens, as it is requested: the inserted needles themselves do not count.
    insert_tokens = tokens.counts([text + hay.sep for _, text in inserts])
    hay_tokens = hay_end - hay_first - sum(insert_tokens)
    records = []
    for (depth, text), p in zip(inserts, positions):
        offset = tokens.token_offset(prompt, starts[p])
        before = sum(c for q, c in zip(positions, insert_tokens) if q < p)
        records.append({"text": text, "depth_requested": depth, "char_offset": starts[p], "token_offset": offset,
                        "depth": (offset - hay_first - before) / max(1, hay_tokens)})
    meta = {"haystack_tokens": hay_tokens, "haystack_token_start": hay_first, "haystack_units": n,
            "haystack_cycled": n > len(hay.units), "partial_unit_chars": len(tail)}
    return context, query, records, meta


def _build_niah(spec, tokens, length, rng, index, num_samples, packages, depths):
    key_make = (lambda: _uuid(rng)) if spec.key_type == "uuids" else (lambda: _word_key(rng))
    value_make = (lambda: _uuid(rng)) if spec.value_type == "uuids" else (lambda: str(rng.randint(10**6, 10**7 - 1)))
    keys = _distinct(key_make, spec.num_needle_k)
    values = [_distinct(value_make, spec.num_needle_v) for _ in keys]
    asked = sorted(rng.sample(range(spec.num_needle_k), spec.num_needle_q))
    code = spec.haystack == "code"
    needles = [(keys[i], v) for i in range(len(keys)) for v in values[i]]
    order = list(range(len(needles)))
    rng.shuffle(order)  # which needle goes to which depth slice
    depth_list = list(depths) if depths is not None else spread_depths(index, num_samples, len(needles))
    if len(depth_list) != len(needles):
        raise FmIndexError(f"task {spec.name} has {len(needles)} needles; {len(depth_list)} depths given")
    inserts = [(depth_list[slot], _needle_sentence(spec, *needles[j], code)) for slot, j in enumerate(order)]
    kind = "uuids" if spec.value_type == "uuids" else "numbers"
    if spec.haystack == "code":
        hay = _code_haystack(packages, rng)
    elif spec.haystack == "noise":
        hay = _noise_haystack()
    else:  # a haystack made only of distractor needles, with keys and values never asked for
        other_keys = _distinct(key_make, min(8192, length // 8 + 16), set(keys))
        hay = Haystack([_needle_sentence(spec, k, value_make(), False) for k in other_keys], "\n")
    preamble = (f"Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
                f"I will quiz you about the {kind} afterwards.\n")
    asked_keys = [keys[i] for i in asked]

    def answers_of(indices):
        return [v for i in indices for v in values[i]]

    query_keys = asked_keys[0] if len(asked_keys) == 1 else ", ".join(asked_keys[:-1]) + ", and " + asked_keys[-1]
    if len(answers_of(asked)) == 1:
        query = (f"\n# Question: What is the special magic {kind[:-1]} for {query_keys} mentioned in the provided "
                 f"text?\n# Answer: The special magic {kind[:-1]} for {query_keys} mentioned in the provided text is:")
    else:
        query = (f"\n# Question: What are all the special magic {kind} for {query_keys} mentioned in the provided "
                 f"text?\n# Answer: The special magic {kind} for {query_keys} mentioned in the provided text are:")
    context, query, records, meta = _haystack_prompt(preamble, hay, inserts, query, tokens, length, spec.name,
                                                     allow_partial=True)
    slot_of = {j: slot for slot, j in enumerate(order)}
    for j, (key, value) in enumerate(needles):
        records[slot_of[j]].update(key=key, value=value, asked=key in asked_keys)
    answers = answers_of(asked)
    first = min((r for r in records if r["asked"]), key=lambda r: r["depth_requested"])
    meta.update(needles=records, keys=keys, asked_keys=asked_keys, haystack=spec.haystack,
                haystack_packages=list(packages) if code else [])
    return context, query, answers, meta, first["depth_requested"]


def _build_vt(spec, tokens, length, rng, index, num_samples, packages, depths):
    names = _distinct(lambda: "".join(rng.choice(string.ascii_uppercase) for _ in range(5)),
                      spec.num_chains * (spec.num_hops + 1))
    values = _distinct(lambda: str(rng.randint(10**4, 10**5 - 1)), spec.num_chains)
    chains = [names[c * (spec.num_hops + 1):(c + 1) * (spec.num_hops + 1)] for c in range(spec.num_chains)]
    statements = []  # in chain order, hop by hop, chains interleaved
    for hop in range(spec.num_hops + 1):
        for c, chain in enumerate(chains):
            rhs = values[c] if hop == 0 else f"VAR {chain[hop - 1]}"
            statements.append((c, hop, f"VAR {chain[hop]} = {rhs}."))
    depth_list = list(depths) if depths is not None else spread_depths(index, num_samples, len(statements))
    if len(depth_list) != len(statements):
        raise FmIndexError(f"task {spec.name} has {len(statements)} statements; {len(depth_list)} depths given")
    depth_list = sorted(depth_list)  # a chain is read in order: each hop after the one it refers to
    inserts = [(d, text) for d, (_, _, text) in zip(depth_list, statements)]
    preamble = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n")
    query = (f"\n# Question: Find all variables that are assigned the value {values[0]} in the text above.\n"
             f"# Answer: According to the chain(s) of variable assignment in the text above, {spec.num_hops + 1} "
             f"variables are assigned the value {values[0]}, they are:")
    context, query, records, meta = _haystack_prompt(preamble, _noise_haystack(), inserts, query, tokens, length,
                                                     spec.name, allow_partial=False)
    for record, (c, hop, _) in zip(records, statements):
        record.update(chain=c, hop=hop, asked=c == 0)
    meta.update(needles=records, chains=chains, values=values, haystack="noise")
    return context, query, list(chains[0]), meta, records[0]["depth_requested"]


def _build_cwe(spec, tokens, length, rng, index, num_samples, packages, depths):
    preamble = ("Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.\n")
    query = (f"\n# Question: What are the {spec.num_common} most common words in the above list?\n"
             f"# Answer: The top {spec.num_common} words that appear most often in the list are:")
    fixed = tokens.count(preamble + query)
    item_tokens = max(1.0, sum(tokens.counts([f" {i}. {_pseudo_word(random.Random(i))}"
                                              for i in range(100, 164)])) / 64)
    capacity = max(0, int((length - fixed) / item_tokens))
    # RULER's 30 repeats per common word, scaled down when the list is short; always above the rest.
    freq_common = min(spec.freq_common, max(spec.freq_uncommon + 1, capacity // (2 * spec.num_common)))
    pool = _distinct(lambda: _pseudo_word(rng), spec.num_common + max(capacity, 1) + 8)
    common, uncommon = pool[:spec.num_common], pool[spec.num_common:]
    shuffle_seed = rng.getrandbits(64)

    def words_for(n_items: int) -> list[str]:  # n_items uncommon items: the last word may repeat fewer times
        words = [w for w in common for _ in range(freq_common)]
        words += [w for w in uncommon for _ in range(spec.freq_uncommon)][:n_items]
        random.Random(shuffle_seed).shuffle(words)
        return words

    def render(n: int) -> str:
        return preamble + " ".join(f"{i + 1}. {w}" for i, w in enumerate(words_for(n))) + query

    guess = max(0, capacity - spec.num_common * freq_common)
    n, _, _ = _fit(render, tokens, length, guess, len(uncommon) * spec.freq_uncommon, spec.name)
    if n == 0:
        raise FmIndexError(f"length {length} is too short for task {spec.name}: no room for uncommon words")
    words = words_for(n)
    context = preamble + " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
    meta = {"freq_common": freq_common, "freq_uncommon": spec.freq_uncommon, "uncommon_items": n,
            "num_words": len(words), "haystack": "words"}
    return context, query, common, meta, None


def _build_fwe(spec, tokens, length, rng, index, num_samples, packages, depths):
    preamble = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words.\n")
    query = ("\n# Question: Do not provide any explanation. What are the three most frequently appeared words in "
             "the above coded text?\n# Answer: According to the coded text above, the three most frequently "
             "appeared words are:")
    vocab = _distinct(lambda: _coded_word(rng), 4096)
    shuffle_seed = rng.getrandbits(64)

    def counts_for(scale: int) -> list[int]:  # Zipf: rank r appears floor(scale / r^alpha) times
        return [c for c in (int(scale / (r + 1) ** spec.zipf_alpha) for r in range(len(vocab))) if c > 0]

    def words_for(scale: int) -> list[str]:
        words = [vocab[r] for r, c in enumerate(counts_for(scale)) for _ in range(c)]
        random.Random(shuffle_seed).shuffle(words)
        return words

    def render(scale: int) -> str:
        return preamble + " ".join(words_for(scale)) + query

    fixed = tokens.count(preamble + query)
    per_word = max(1.0, sum(tokens.counts([" " + w for w in vocab[:64]])) / 64)
    guess = int(max(0, length - fixed) / per_word / 1.6)  # sum of 1/r^2 ~ 1.64
    scale, _, _ = _fit(render, tokens, length, guess, max(4 * guess, 64), spec.name)
    counts = counts_for(scale)
    if len(counts) <= spec.num_top or len(set(counts[:spec.num_top + 1])) < spec.num_top + 1:
        raise FmIndexError(f"length {length} is too short for task {spec.name}: the top {spec.num_top} word "
                           f"frequencies are not distinct ({counts[:spec.num_top + 1]})")
    context = preamble + " ".join(words_for(scale))
    meta = {"zipf_scale": scale, "top_counts": counts[:spec.num_top + 1], "num_words": sum(counts),
            "haystack": "words"}
    return context, query, vocab[:spec.num_top], meta, None


def _build_context_independent(spec, tokens, length, rng, index, num_samples, packages, depths):
    key, value = _word_key(rng), str(rng.randint(10**6, 10**7 - 1))
    preamble = "Here is some code.\n"
    query = (f"\n# The special magic number for {key} is: {value}.\n# Question: What is the special magic number "
             f"for {key}?\n# Answer: The special magic number for {key} is:")
    context, query, _, meta = _haystack_prompt(preamble, _code_haystack(packages, rng), [], query, tokens, length,
                                               spec.name, allow_partial=True)
    meta.update(needles=[], key=key, answer_in_query=True, haystack="code", haystack_packages=list(packages))
    return context, query, [value], meta, None


# ---- scoring (RULER's string match) ---------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess_prediction(text: str) -> str:
    """RULER's ``postprocess_pred``: control characters become newlines; surrounding whitespace goes."""
    return _CONTROL.sub("\n", text.strip()).strip()


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """Fraction of the answers that appear (case-insensitive) in the prediction: 1/0 for one answer."""
    if not answers:
        raise FmIndexError("a sample without answers cannot be scored")
    pred = postprocess_prediction(prediction).lower()
    return sum(1.0 for a in answers if a.lower() in pred) / len(answers)


def string_match_part(prediction: str, answers: Sequence[str]) -> float:
    """1 if any answer appears (case-insensitive) in the prediction (RULER's QA metric)."""
    if not answers:
        raise FmIndexError("a sample without answers cannot be scored")
    pred = postprocess_prediction(prediction).lower()
    return max(1.0 if a.lower() in pred else 0.0 for a in answers)


def score_prediction(sample: Sample, prediction: str) -> float:
    """Score in [0, 1] of one prediction for ``sample``, with its task's metric."""
    metric = TASKS[sample.task].metric if sample.task in TASKS else sample.metadata.get("metric", "all")
    return (string_match_all if metric == "all" else string_match_part)(prediction, sample.answers)


def mean_percent(scores: Sequence[float]) -> float:
    """RULER reports a task's score as the mean over its samples, in percent."""
    return 100.0 * sum(scores) / len(scores) if scores else float("nan")
