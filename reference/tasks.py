"""Synthetic long-context retrieval tasks (RULER-style), built at the token level for training and evaluation.

Each task yields a :class:`Sample`: exactly ``length`` token ids that end with a question and its answer, and
the answer's span (the tokens a greedy decoder must reproduce). Haystacks are stdlib source (a window of the
tokenised corpus) or repeated noise sentences; needles are inserted at uniformly random depths.

Tasks (RULER names): ``niah_single`` (one needle), ``niah_multikey`` (one needle among needles with other keys),
``niah_multivalue`` (one key, several values: all of them, in order), ``niah_multiquery`` (several keys, each with
its own value, all asked at once: their values in the order the question names the keys, which is independent
of the order the needles appear in), ``vt`` (variable tracking: follow a chain
of assignments ``VAR A = 12345``, ``VAR B = VAR A``, ...: name every variable that holds the value). Values are
7-digit numbers or uuid-like hex strings (vt: 5-digit numbers). Wording, preambles and queries follow RULER as
``fm_eval/tasks.py`` writes them, so the model is trained on the prompts it is evaluated with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ADJECTIVES = (
    "amber ancient brave bright calm clever crimson curious daring dusty eager electric fancy fierce fragile "
    "gentle giant golden graceful hidden hollow humble icy jolly keen lively lonely lucky mellow misty modest "
    "noble odd pale patient proud quick quiet rapid rare restless rusty sacred shiny silent silver sleepy "
    "smooth solar spotted steady stormy sunny swift tidy tiny velvet violet vivid wandering warm wild wise "
    "wooden young zealous"
).split()
NOUNS = (
    "anchor badger beacon bison canyon cedar comet coral crane dolphin dragon eagle ember falcon fern fjord "
    "forest fox glacier harbor hawk heron island jaguar kettle lantern lemur lotus meadow meteor monk otter "
    "owl panda parrot pebble pine planet prairie quartz raven reef river rocket saddle salmon sparrow spruce "
    "squirrel summit temple thistle tiger tower tulip valley violin walrus willow wizard yak zebra"
).split()
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
VALUE_KINDS = ("number", "uuid")


def random_key(rng: np.random.Generator) -> str:
    return f"{ADJECTIVES[rng.integers(len(ADJECTIVES))]}-{NOUNS[rng.integers(len(NOUNS))]}"


def random_value(rng: np.random.Generator, kind: str) -> str:
    if kind == "number":
        return str(int(rng.integers(1_000_000, 10_000_000)))
    digits = "".join("0123456789abcdef"[i] for i in rng.integers(0, 16, 32))
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def random_var(rng: np.random.Generator) -> str:
    return "".join(chr(65 + int(i)) for i in rng.integers(0, 26, 5))


def needle_text(kind: str, key: str, value: str) -> str:
    return f"\n# One of the special magic {kind}s for {key} is: {value}.\n"


def niah_preamble(kind: str) -> str:
    return (f"Some special magic {kind}s are hidden within the following text. Make sure to memorize it. "
            f"I will quiz you about the {kind}s afterwards.\n")


VT_PREAMBLE = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"


def join_keys(keys: list[str]) -> str:
    """RULER's list of asked keys: ``a``; ``a, and b``; ``a, b, and c``."""
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def question_text(kind: str, key: str, multi: bool = False) -> str:
    """``key`` may be several keys joined by :func:`join_keys` (multi-query, with ``multi=True``)."""
    if multi:
        return (f"\n# Question: What are all the special magic {kind}s for {key} mentioned in the provided text?"
                f"\n# Answer: The special magic {kind}s for {key} mentioned in the provided text are:")
    return (f"\n# Question: What is the special magic {kind} for {key} mentioned in the provided text?"
            f"\n# Answer: The special magic {kind} for {key} mentioned in the provided text is:")


def vt_statement(name: str, source: str) -> str:
    return f" VAR {name} = {source}. "


def vt_question(value: str, n_vars: int) -> str:
    return (f"\n# Question: Find all variables that are assigned the value {value} in the text above.\n"
            f"# Answer: According to the chain(s) of variable assignment in the text above, {n_vars} "
            f"variables are assigned the value {value}, they are:")


def sample_texts(n: int, seed: int = 0) -> list[str]:
    """Needle, question and assignment lines, so the tokenizer learns the tasks' words (tokenizer training)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        kind = VALUE_KINDS[rng.integers(2)]
        key = random_key(rng)
        out.append(needle_text(kind, key, random_value(rng, kind)) + question_text(kind, key, bool(rng.integers(2)))
                   + f" {random_value(rng, kind)}.\n" + vt_statement(random_var(rng), f"VAR {random_var(rng)}")
                   + vt_question(random_value(rng, "number")[:5], 5) + f" {random_var(rng)}, {random_var(rng)}.\n"
                   + niah_preamble(kind) + VT_PREAMBLE + NOISE)
    return out


@dataclass
class Sample:
    input_ids: np.ndarray  # [length] int64
    answer_start: int  # first answer token
    answer_len: int  # number of answer tokens (the exact-match span)
    task: str
    depths: list[float]  # relative positions of the needles in the haystack


class TaskBuilder:
    """Builds samples from a tokenizer and a haystack token array (documents separated by ``eos``)."""

    TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt")

    def __init__(self, tokenizer, haystack_tokens: np.ndarray, bos_id: int, n_multi: int = 4):
        self.tokenizer = tokenizer
        self.haystack = haystack_tokens
        self.bos_id = bos_id
        self.n_multi = n_multi
        self.noise = np.asarray(self.encode(NOISE * 64), dtype=np.int64)
        self._cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def haystack_tokens(self, rng: np.random.Generator, n: int, source: str) -> np.ndarray:
        if source == "noise":
            reps = -(-n // len(self.noise)) + 1
            start = int(rng.integers(0, len(self.noise)))
            return np.tile(self.noise, reps)[start:start + n]
        start = int(rng.integers(0, len(self.haystack) - n))
        return self.haystack[start:start + n].astype(np.int64)

    def build(self, rng: np.random.Generator, task: str, length: int, kind: str | None = None,
              source: str | None = None, n_multi: int | None = None, max_distance: int | None = None) -> Sample:
        """One sample of ``task`` with exactly ``length`` tokens (``kind``/``source`` random when None;
        ``n_multi`` overrides the number of keys / values of the multi-needle tasks). ``max_distance``: the needles
        go into the last ``max_distance`` haystack tokens before the question (None: anywhere), the training
        curriculum that moves them away from the question gradually."""
        n_multi = n_multi or self.n_multi
        kind = kind or VALUE_KINDS[rng.integers(2)]
        source = source or ("code", "noise")[rng.integers(2)]
        if task == "niah_single":
            key, value = random_key(rng), random_value(rng, kind)
            needles = [needle_text(kind, key, value)]
            question, answer = question_text(kind, key), f" {value}"
        elif task == "niah_multikey":
            keys = []
            while len(keys) < n_multi:
                k = random_key(rng)
                if k not in keys:
                    keys.append(k)
            values = [random_value(rng, kind) for _ in keys]
            needles = [needle_text(kind, k, v) for k, v in zip(keys, values)]
            pick = int(rng.integers(len(keys)))
            question, answer = question_text(kind, keys[pick]), f" {values[pick]}"
        elif task == "niah_multiquery":
            # RULER's niah_multiquery: n keys with one value each, all asked; the needles go into the haystack in
            # a shuffled order, so the answer order (the question's) cannot be read off the needle order.
            keys = []
            while len(keys) < n_multi:
                k = random_key(rng)
                if k not in keys:
                    keys.append(k)
            values = [random_value(rng, kind) for _ in keys]
            order = rng.permutation(len(keys))
            needles = [needle_text(kind, keys[j], values[j]) for j in order]
            question, answer = question_text(kind, join_keys(keys), multi=True), " " + ", ".join(values)
        elif task == "niah_multivalue":
            key = random_key(rng)
            values = [random_value(rng, kind) for _ in range(n_multi)]
            needles = [needle_text(kind, key, v) for v in values]
            question, answer = question_text(kind, key, multi=True), " " + ", ".join(values)
        elif task == "vt":
            # RULER's variable tracking: chains VAR A = 12345, VAR B = VAR A, ... (statements in chain order,
            # chains interleaved); the answer names every variable of the asked chain, in order.
            n_chains, hops = int(rng.integers(1, 3)), int(rng.integers(2, 5))
            names: list[str] = []
            while len(names) < n_chains * (hops + 1):
                v = random_var(rng)
                if v not in names:
                    names.append(v)
            values = []
            while len(values) < n_chains:
                v = str(int(rng.integers(10_000, 100_000)))
                if v not in values:
                    values.append(v)
            chains = [names[c * (hops + 1):(c + 1) * (hops + 1)] for c in range(n_chains)]
            needles = [vt_statement(chain[h], values[c] if h == 0 else f"VAR {chain[h - 1]}")
                       for h in range(hops + 1) for c, chain in enumerate(chains)]
            question, answer = vt_question(values[0], hops + 1), " " + ", ".join(chains[0])
        else:
            raise ValueError(f"unknown task '{task}' (one of {', '.join(self.TASKS)})")
        preamble = VT_PREAMBLE if task == "vt" else niah_preamble(kind)
        needle_ids = [self.encode(t) for t in needles]
        question_ids, answer_ids, tail_ids = self.encode(question), self.encode(answer), self.encode(".\n")
        preamble_ids = self.encode(preamble)
        fixed = 1 + len(preamble_ids) + sum(map(len, needle_ids)) + len(question_ids) + len(answer_ids) + len(tail_ids)
        n_hay = length - fixed
        if n_hay < 16:
            raise ValueError(f"length {length} too short for task {task}")
        hay = self.haystack_tokens(rng, n_hay, source)
        lowest = 0 if max_distance is None else max(0, n_hay - int(max_distance))
        cuts = np.sort(rng.integers(lowest, n_hay + 1, len(needle_ids)))
        parts, prev = [np.array([self.bos_id]), np.asarray(preamble_ids)], 0
        for cut, ids in zip(cuts, needle_ids):
            parts += [hay[prev:cut], np.asarray(ids)]
            prev = cut
        parts += [hay[prev:], np.asarray(question_ids)]
        answer_start = sum(len(p) for p in parts)
        parts += [np.asarray(answer_ids), np.asarray(tail_ids)]
        ids = np.concatenate(parts).astype(np.int64)
        assert len(ids) == length, (len(ids), length)
        return Sample(ids, answer_start, len(answer_ids), task, [float(c) / max(n_hay, 1) for c in cuts])
