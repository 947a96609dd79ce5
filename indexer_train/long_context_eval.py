"""The long-context evaluation behind ``fm-index evaluate``: RULER-style tasks x lengths x resident-set modes.

For every (task, length) cell, ``samples`` prompts from :mod:`indexer_train.ruler_tasks` are decoded greedily
by :class:`lsa_runtime.Session` in each mode and scored with RULER's string match. Modes:

* ``full``     -- plain DeepSeek-V4: every compressed entry on the device (footprint ratio 1);
* ``lsa``      -- FlashMemory: the trained memory indexer picks the resident set every tau steps;
* ``recent``   -- the ``budget`` most recent entries (no retrieval);
* ``random``   -- ``budget`` entries drawn uniformly (seeded);
* ``oracle``   -- exactly the entries the full model's native top-k reads in the tau steps after each trigger
  (union over steps and CSA layers, most-read first when capped by ``budget``; ``OraclePolicy`` fed by
  ``record_native_picks`` of the full run): the upper bound of any trigger-time selection;
* ``hisparse`` -- a lossless per-step scheme in the spirit of SGLang's HiSparse (Session mode ``hisparse``):
  the native top-k scores all entries every step (indexer keys of all entries stay on the device) and the
  picked KV rows missing from a fixed device buffer of ``max(budget, index_topk)`` rows per CSA layer are
  fetched from the host at that step. Compare its bytes moved and tokens/s with lsa's.

The same resident budget: in each cell ``lsa`` runs first; the mean number of entries its triggers selected
(over the cell's samples) is the ``budget`` of recent, random and oracle (and hisparse's buffer, at least one
step's top-k). Without
``lsa`` among the modes, ``budget`` must be given.

Output in ``out``: ``runs.jsonl`` (one line per decoded sample and mode, appended as they finish, so an
interrupted run resumes), ``config.json``, ``results.json`` (every run plus the summaries), ``results.md``
(accuracy per task and length, footprint ratio, bytes moved and tokens/s per mode) and two plots
(``accuracy_vs_footprint.png``, ``footprint_vs_length.png``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import platform
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from lsa_runtime.backbone import load_backbone
from lsa_runtime.errors import FmIndexError
from lsa_runtime.resident_policy import (HiSparsePolicy, MemoryIndexerPolicy, OraclePolicy, RandomPolicy, RecentPolicy,
                                         ResidentPolicy, TriggerState)

from .ruler_tasks import DEFAULT_HAYSTACK_PACKAGES, TASKS, Sample, generate_samples, parse_tasks, score_prediction

FORMAT = "fm-index-evaluate/1"
MODES = ("full", "lsa", "hisparse", "recent", "random", "oracle")  # the order they run in within a cell
BUDGETED = ("recent", "random", "oracle")
NEEDS_FULL_PICKS = ("oracle",)
# Options that must match for a resumed run to continue the same evaluation.
_FINGERPRINT_KEYS = ("model", "indexer", "seed", "samples", "max_new_tokens", "haystack_packages", "tau",
                     "threshold", "budget", "dtype", "chunk_size", "prefetch_steps")


class EvaluationError(FmIndexError):
    """A bad evaluation option or output directory the user can fix."""


@dataclass
class EvalConfig:
    """Everything one ``fm-index evaluate`` run depends on (validated by :meth:`check`)."""

    model: str
    modes: tuple[str, ...] = ("full",)
    tasks: tuple[str, ...] = tuple(TASKS)
    lengths: tuple[int, ...] = (2048, 4096)
    samples: int = 4
    indexer: str | None = None
    max_new_tokens: int | None = None  # None: each task's own (RULER's tokens_to_generate)
    seed: int = 0
    device: str = "cpu"
    dtype: str | None = None
    haystack_packages: tuple[str, ...] = DEFAULT_HAYSTACK_PACKAGES
    tau: int | None = None  # None: the export's (else 64)
    threshold: float | None = None  # None: the export's (else 0.5)
    budget: int | None = None  # resident budget of recent/random/oracle when lsa is not run
    chunk_size: int = 512
    prefetch_steps: int = 0  # Session(prefetch_steps=...): triggers prepared this many steps ahead, off-thread

    def check(self) -> "EvalConfig":
        modes = parse_modes(self.modes)
        tasks = tuple(spec.name for spec in parse_tasks(self.tasks if isinstance(self.tasks, str) or self.tasks
                                                        is None else list(self.tasks)))
        lengths = parse_lengths(self.lengths)
        if int(self.samples) < 1:
            raise EvaluationError(f"--samples must be >= 1, got {self.samples}")
        if self.max_new_tokens is not None and int(self.max_new_tokens) < 1:
            raise EvaluationError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if "lsa" in modes and not self.indexer:
            raise EvaluationError("mode lsa needs --indexer DIR (the output of `fm-index export`)")
        if any(m in modes for m in BUDGETED) and "lsa" not in modes and self.budget is None:
            raise EvaluationError("modes recent/random/oracle take lsa's resident budget: add lsa to --modes "
                                  "(with --indexer) or give --budget N")
        if self.budget is not None and int(self.budget) < 1:
            raise EvaluationError(f"--budget must be >= 1 entries, got {self.budget}")
        if int(self.prefetch_steps) < 0 or (self.tau is not None and int(self.prefetch_steps) >= int(self.tau)):
            raise EvaluationError(f"--prefetch-steps must be in 0..tau-1, got {self.prefetch_steps}"
                                  + (f" with --tau {self.tau}" if self.tau is not None else ""))
        if not self.haystack_packages:
            raise EvaluationError("no haystack package given")
        return replace(self, modes=modes, tasks=tasks, lengths=lengths, samples=int(self.samples),
                       haystack_packages=tuple(self.haystack_packages))

    def fingerprint(self) -> dict:
        blob = asdict(self)
        if not blob["prefetch_steps"]:  # 0, the default: absent, so evaluations from before the option resume
            del blob["prefetch_steps"]
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in blob.items() if k in _FINGERPRINT_KEYS}


def parse_modes(text: str | Sequence[str]) -> tuple[str, ...]:
    names = [m.strip() for m in text.split(",")] if isinstance(text, str) else [str(m).strip() for m in text]
    names = [m for m in names if m]
    unknown = [m for m in names if m not in MODES]
    if unknown:
        raise EvaluationError(f"unknown mode(s) {', '.join(unknown)}; use any of {', '.join(MODES)}")
    if not names:
        raise EvaluationError("no mode given")
    return tuple(m for m in MODES if m in names)


def parse_lengths(text: str | Sequence[int]) -> tuple[int, ...]:
    parts = text.split(",") if isinstance(text, str) else list(text)
    lengths = []
    for part in parts:
        if isinstance(part, str) and not part.strip():
            continue
        raw = part.strip().lower() if isinstance(part, str) else part
        try:
            value = int(raw[:-1]) * 1024 if isinstance(raw, str) and raw.endswith("k") else int(raw)
        except ValueError:
            raise EvaluationError(f"--lengths must be comma-separated token counts (2048,4096 or 2k,4k), "
                                  f"got '{part}'") from None
        if value < 64:
            raise EvaluationError(f"length {value} is too short: use at least 64 tokens")
        lengths.append(value)
    if not lengths:
        raise EvaluationError("no length given")
    return tuple(sorted(set(lengths)))


# ---- policies -----------------------------------------------------------------------------------------


class CountingPolicy(ResidentPolicy):
    """Wraps a policy and records how many entries each of its triggers selected (the resident budget)."""

    def __init__(self, inner: ResidentPolicy):
        self.inner = inner
        self.name = inner.name
        self.memory_layers = tuple(inner.memory_layers)
        self.per_step_buffer = inner.per_step_buffer
        self.selected: list[int] = []

    def select(self, state: TriggerState) -> torch.Tensor:
        ids = torch.as_tensor(self.inner.select(state), dtype=torch.long).reshape(-1)
        self.selected.append(int(torch.unique(ids).numel()))
        return ids

    def describe(self) -> str:
        return self.inner.describe()


# ---- progress -------------------------------------------------------------------------------------------


class Reporter:
    """Progress callbacks (the CLI draws them with rich); the default does nothing."""

    def start(self, total_runs: int) -> None: ...

    def phase(self, text: str) -> None: ...

    def run_done(self, record: dict) -> None: ...


# ---- the runner -------------------------------------------------------------------------------------------


def prompt_digest(sample: Sample) -> str:
    return hashlib.sha256(sample.prompt.encode()).hexdigest()[:16]


class Evaluation:
    """Runs (or resumes) one evaluation into ``out``; :meth:`run` returns the results dictionary."""

    def __init__(self, config: EvalConfig, out: str | Path, resume: bool = False, reporter: Reporter | None = None,
                 backbone=None, workers: int = 1):
        self.config = config.check()
        self.out = Path(out)
        self.reporter = reporter or Reporter()
        self.resume = resume
        self._backbone = backbone
        if int(workers) < 1:
            raise EvaluationError(f"--workers must be >= 1, got {workers}")
        self.workers = int(workers)
        self.done: dict[tuple, dict] = {}

    # ---- output directory -----------------------------------------------------------------------------

    def _prepare_out(self) -> None:
        runs, config_file = self.out / "runs.jsonl", self.out / "config.json"
        if self.out.exists() and not self.out.is_dir():
            raise EvaluationError(f"--out {self.out} exists and is not a directory")
        if runs.exists() and not self.resume:
            raise EvaluationError(f"{self.out} already holds an evaluation (runs.jsonl): pass --resume to "
                                  f"continue it, or choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        fingerprint = self.config.fingerprint()
        if config_file.exists() and self.resume:
            previous = json.loads(config_file.read_text()).get("fingerprint", {})
            changed = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
            if changed:
                raise EvaluationError(f"cannot resume {self.out}: it was run with other {', '.join(changed)} "
                                      f"(choose another --out)")
        _write_json(config_file, {"format": FORMAT, "fingerprint": fingerprint, "config": _jsonable(self.config)})
        if runs.exists():
            lines = runs.read_text().splitlines()
            for line in lines:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by an interruption: that run is redone
                self.done[_key(record)] = record
            with runs.open("w") as f:  # drop a cut last line, keep complete records
                for record in self.done.values():
                    f.write(json.dumps(record) + "\n")

    def _append(self, record: dict) -> None:
        with (self.out / "runs.jsonl").open("a") as f:
            _lock(f)  # worker processes append to the same file
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[_key(record)] = record
        self.reporter.run_done(record)

    # ---- loop -------------------------------------------------------------------------------------------

    def run(self) -> dict:
        cfg = self.config
        self._prepare_out()
        total = len(cfg.tasks) * len(cfg.lengths) * cfg.samples * len(cfg.modes)
        self.reporter.start(total)
        for _ in range(len([k for k in self.done if k[3] in cfg.modes and k[0] in cfg.tasks
                            and k[1] in cfg.lengths and k[2] < cfg.samples])):
            self.reporter.run_done({})
        pending = [(task, length) for length in cfg.lengths for task in cfg.tasks
                   if any((task, length, i, mode) not in self.done for i in range(cfg.samples) for mode in cfg.modes)]
        if pending and self.workers > 1 and len(pending) > 1:
            self._run_workers(pending)
        elif pending:
            self._load()
            for task, length in pending:
                self._run_cell(task, length)
                self.finish(complete=False)  # results so far, readable while a long evaluation runs
        return self.finish()

    def _run_workers(self, pending: list[tuple[str, int]]) -> None:
        """Decode the pending (task, length) cells in ``workers`` processes on the same device.

        A small backbone decodes one token at a time, bound by host time (kernel launches, Python), so
        processes scale until the CPU cores or the accelerator are busy. Cells go longest first, round-robin;
        every worker appends its runs to ``runs.jsonl`` (locked), so an interrupted run resumes as usual.
        """
        import multiprocessing
        import time

        n = min(self.workers, len(pending))
        order = sorted(pending, key=lambda cell: -cell[1])
        shares = [order[k::n] for k in range(n)]
        threads = max(1, (os.cpu_count() or 1) // n) if torch.device(self.config.device).type == "cpu" else 1
        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        procs = [context.Process(target=_worker_main, args=(self.config, str(self.out), share, threads),
                                 name=f"fm-index-eval-{k}") for k, share in enumerate(shares)]
        for proc in procs:
            proc.start()
        runs = self.out / "runs.jsonl"
        try:
            while True:
                alive = sum(proc.is_alive() for proc in procs)
                self.reporter.phase(f"{alive} of {n} workers decoding")
                for record in _read_runs(runs).values():
                    if _key(record) not in self.done:
                        self.done[_key(record)] = record
                        self.reporter.run_done(record)
                if not alive:
                    break
                time.sleep(1.0)
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
                proc.join()
        failed = [(proc.name, proc.exitcode) for proc in procs if proc.exitcode != 0]
        if failed:
            self.finish(complete=False)
            raise EvaluationError(f"evaluation worker {failed[0][0]} failed (exit code {failed[0][1]}, its error "
                                  f"is printed above); finished runs are kept: --resume continues")
        self.done.update(_read_runs(runs))

    def _load(self) -> None:
        from lsa_runtime.session import load_memory_indexer

        cfg = self.config
        if self._backbone is None:
            self.reporter.phase(f"loading {cfg.model}")
            self._backbone = load_backbone(cfg.model, device=cfg.device, dtype=cfg.dtype)
        self.model, self.tokenizer = self._backbone
        if self.tokenizer is None:
            raise EvaluationError(f"model {cfg.model} has no tokenizer: the tasks are text prompts")
        limit = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        longest = max(cfg.lengths) + (cfg.max_new_tokens or max(TASKS[t].max_new_tokens for t in cfg.tasks))
        if limit and longest > limit:
            raise EvaluationError(f"length {max(cfg.lengths)} plus the generated tokens exceeds the model's maximum "
                                  f"of {limit} positions (max_position_embeddings)")
        self.memory_indexer, self.export = (None, {})
        if "lsa" in cfg.modes:
            self.memory_indexer, self.export = load_memory_indexer(cfg.indexer, self.model)
        self.tau = int(cfg.tau if cfg.tau is not None else self.export.get("tau", 64))
        self.threshold = float(cfg.threshold if cfg.threshold is not None else self.export.get("threshold", 0.5))
        if cfg.prefetch_steps >= self.tau:
            raise EvaluationError(f"--prefetch-steps {cfg.prefetch_steps} must be below tau ({self.tau}, the export's)")

    def _run_cell(self, task: str, length: int) -> None:
        cfg = self.config
        self.reporter.phase(f"{task} @ {length:,}: generating prompts")
        samples = generate_samples(task, self.tokenizer, length, cfg.samples, seed=cfg.seed,
                                   haystack_packages=cfg.haystack_packages)
        for i, sample in enumerate(samples):  # a resumed run must continue on the very same prompts
            for mode in cfg.modes:
                done = self.done.get((task, length, i, mode))
                if done is not None and done["prompt_sha"] != prompt_digest(sample):
                    raise EvaluationError(f"cannot resume {self.out}: prompt {i} of {task} at {length} differs from "
                                          f"the one decoded before (another tokenizer or Python standard library?)")
        max_new = cfg.max_new_tokens or TASKS[task].max_new_tokens
        todo = lambda mode, i: (task, length, i, mode) not in self.done  # noqa: E731
        picks: dict[int, dict] = {}
        for i, sample in enumerate(samples):  # full first: the oracle replays its native top-k picks
            need_picks = any(todo(m, i) for m in NEEDS_FULL_PICKS if m in cfg.modes)
            if todo("full", i) and "full" in cfg.modes or need_picks:
                self.reporter.phase(f"{task} @ {length:,}: full")
                record, picks[i] = self._decode(sample, i, "full", None, max_new, want_picks=need_picks)
                if "full" in cfg.modes and todo("full", i):
                    self._append(record)
        if "lsa" in cfg.modes:
            self.reporter.phase(f"{task} @ {length:,}: lsa")
            for i, sample in enumerate(samples):
                if todo("lsa", i):
                    self._append(self._decode(sample, i, "lsa", None, max_new)[0])
        budget = self._cell_budget(task, length)
        for mode in ("hisparse",) + BUDGETED:
            if mode not in cfg.modes:
                continue
            self.reporter.phase(f"{task} @ {length:,}: {mode} (budget {budget})")
            for i, sample in enumerate(samples):
                if todo(mode, i):
                    self._append(self._decode(sample, i, mode, budget, max_new, picks=picks.get(i))[0])

    def _cell_budget(self, task: str, length: int) -> int | None:
        """lsa's mean selected entries per trigger over the cell's samples (else the configured budget)."""
        cfg = self.config
        if "lsa" not in cfg.modes:
            return cfg.budget
        selected = [r["selected_mean"] for i in range(cfg.samples)
                    if (r := self.done.get((task, length, i, "lsa"))) and r.get("selected_mean") is not None]
        return max(1, round(sum(selected) / len(selected))) if selected else 1

    def _policy(self, mode: str, budget: int | None, picks: dict | None) -> ResidentPolicy | None:
        if mode == "full":
            return None
        if mode == "lsa":
            return CountingPolicy(MemoryIndexerPolicy(self.memory_indexer, threshold=self.threshold))
        if mode == "recent":
            return CountingPolicy(RecentPolicy(budget))
        if mode == "random":
            return CountingPolicy(RandomPolicy(budget, seed=self.config.seed))
        if mode == "oracle":
            return CountingPolicy(OraclePolicy(picks, tau=self.tau, budget=budget))
        if mode == "hisparse":
            return CountingPolicy(HiSparsePolicy(self._buffer_rows(budget)))
        raise EvaluationError(f"mode {mode} has no resident policy")

    def _decode(self, sample: Sample, index: int, mode: str, budget: int | None, max_new: int,
                want_picks: bool = False, picks: dict | None = None) -> tuple[dict, dict | None]:
        from lsa_runtime.session import Session, record_native_picks

        policy = self._policy(mode, budget, picks or {})
        session = Session(self.model, self.tokenizer, mode="full", policy=policy, tau=self.tau,
                          chunk_size=self.config.chunk_size, seed=self.config.seed,
                          prefetch_steps=self.config.prefetch_steps)
        recorded = None
        if want_picks:  # the full run, with the native top-k picks of every decode query (the oracle's input)
            generation, recorded = record_native_picks(session, sample.prompt, max_new, temperature=0.0)
        else:
            generation = session.generate(sample.prompt, max_new_tokens=max_new, temperature=0.0)
        stats = generation.stats.as_dict()
        selected = policy.selected if policy is not None and policy.per_step_buffer is None else None
        record = self._record(sample, index, mode, budget, generation.text, stats)
        record.update(new_tokens=len(generation.token_ids), finish_reason=generation.finish_reason,
                      prompt_tokens=generation.prompt_tokens, selected_per_trigger=selected,
                      selected_mean=(sum(selected) / len(selected)) if selected else None,
                      buffer_entries=policy.per_step_buffer if policy is not None else None)
        return record, recorded

    def _buffer_rows(self, budget: int | None) -> int:
        """hisparse's device buffer per CSA layer: the shared budget, but at least one step's native top-k."""
        return max(int(budget or 0), int(self.model.config.index_topk))

    def _record(self, sample: Sample, index: int, mode: str, budget: int | None, prediction: str, stats: dict) -> dict:
        return {"task": sample.task, "length": sample.length, "index": index, "mode": mode, "seed": sample.seed,
                "depth": sample.depth, "prompt_sha": prompt_digest(sample), "answers": sample.answers,
                "prediction": prediction, "score": score_prediction(sample, prediction), "budget": budget,
                "needles": [{k: n[k] for k in ("depth_requested", "depth", "token_offset") if k in n}
                            for n in sample.metadata.get("needles", [])],
                "stats": stats}

    # ---- results ----------------------------------------------------------------------------------------

    def finish(self, complete: bool = True) -> dict:
        """Write results.json, results.md and the plots from every finished run (``complete``: all are done)."""
        cfg = self.config
        runs = [r for k, r in sorted(self.done.items(), key=lambda kv: _sort_key(kv[0]))
                if k[0] in cfg.tasks and k[1] in cfg.lengths and k[2] < cfg.samples and k[3] in cfg.modes]
        results = {
            "format": FORMAT,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "complete": complete,
            "config": _jsonable(cfg),
            "environment": _environment(cfg.device),
            "summary": summarize(runs),
            "runs": runs,
        }
        _write_json(self.out / "results.json", results)
        _write_text(self.out / "results.md", markdown_report(results))
        write_plots(results, self.out)
        return results


def evaluate(config: EvalConfig, out: str | Path, resume: bool = False, reporter: Reporter | None = None,
             backbone=None, workers: int = 1) -> dict:
    """Run (or resume) the evaluation of ``config`` into ``out``; returns the results dictionary. ``workers``:
    decode in that many processes on the same device (see :meth:`Evaluation._run_workers`)."""
    return Evaluation(config, out, resume=resume, reporter=reporter, backbone=backbone, workers=workers).run()


def _worker_main(config: EvalConfig, out: str, cells: list[tuple[str, int]], threads: int) -> None:
    """One worker process: load the backbone (and indexer), decode ``cells``, append runs to out/runs.jsonl."""
    torch.set_num_threads(threads)
    evaluation = Evaluation(config, out, resume=True)
    evaluation.done = _read_runs(Path(out) / "runs.jsonl")  # read only: the parent owns the directory
    evaluation._load()
    for task, length in cells:
        evaluation._run_cell(task, length)


def _read_runs(path: Path) -> dict[tuple, dict]:
    """Complete records of a runs.jsonl by key (a line being written, or cut, is skipped)."""
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[_key(record)] = record
    return done


def _lock(f) -> None:
    """Exclusive lock on an open file until it is closed (POSIX; elsewhere appends are unlocked)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)


# ---- summaries, table, plots ------------------------------------------------------------------------------


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _rate(runs, tokens_key: str, seconds_key: str) -> float | None:
    tokens = sum(r["stats"].get(tokens_key) or 0 for r in runs)
    seconds = sum(r["stats"].get(seconds_key) or 0 for r in runs)
    return tokens / seconds if seconds > 0 else None


def _group_summary(runs: list[dict]) -> dict:
    return {
        "n": len(runs),
        "accuracy": 100.0 * _mean(r["score"] for r in runs),
        "footprint_ratio": _mean(r["stats"].get("footprint_ratio") for r in runs),
        "device_bytes": _mean(r["stats"].get("device_total") for r in runs),
        "full_bytes": _mean(r["stats"].get("full_total") for r in runs),
        "csa_entries": _mean(r["stats"].get("csa_entries") for r in runs),
        "selected_entries": _mean(r.get("selected_mean") if r.get("selected_mean") is not None
                                  else r.get("buffer_entries") for r in runs),
        "budget": _mean(r.get("budget") for r in runs),
        "triggers": _mean(r["stats"].get("triggers") for r in runs),
        "entries_fetched": _mean(r["stats"].get("entries_fetched") for r in runs),
        "bytes_moved": _mean(r["stats"].get("fetch_bytes_to_device") for r in runs),
        "prefill_bytes_moved": _mean(r["stats"].get("prefill_bytes_to_device") for r in runs),
        "trigger_seconds": _mean(r["stats"].get("trigger_seconds") for r in runs),
        "decode_tokens_per_second": _rate(runs, "decode_tokens", "decode_seconds"),
        "prefill_tokens_per_second": _rate(runs, "prefill_tokens", "prefill_seconds"),
    }


def summarize(runs: list[dict]) -> dict:
    """Per (mode, task, length) cell and per (mode, length) over tasks (accuracy = mean of task accuracies)."""
    cells: dict[tuple, list] = defaultdict(list)
    for r in runs:
        cells[(r["mode"], r["task"], r["length"])].append(r)
    by_cell = [{"mode": m, "task": t, "length": n, **_group_summary(rs)} for (m, t, n), rs in sorted(
        cells.items(), key=lambda kv: (MODES.index(kv[0][0]), kv[0][2], list(TASKS).index(kv[0][1])
                                       if kv[0][1] in TASKS else 99))]
    by_mode_length = []
    groups: dict[tuple, list] = defaultdict(list)
    for r in runs:
        groups[(r["mode"], r["length"])].append(r)
    for (mode, length), rs in sorted(groups.items(), key=lambda kv: (MODES.index(kv[0][0]), kv[0][1])):
        row = {"mode": mode, "length": length, **_group_summary(rs)}
        row["accuracy"] = _mean(c["accuracy"] for c in by_cell if c["mode"] == mode and c["length"] == length)
        by_mode_length.append(row)
    return {"cells": by_cell, "modes": by_mode_length}


def _fmt(value, spec: str = ".1f", missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def markdown_report(results: dict) -> str:
    cfg, summary = results["config"], results["summary"]
    modes = [m for m in MODES if m in cfg["modes"]]
    cells = {(c["mode"], c["task"], c["length"]): c for c in summary["cells"]}
    per_mode = {(c["mode"], c["length"]): c for c in summary["modes"]}
    env = results["environment"]
    lines = [
        f"# fm-index evaluate: {cfg['model']}",
        "",
        ("" if results.get("complete", True) else "**Partial: the evaluation is still running or was "
                                                   "interrupted (`--resume` continues it).**\n\n") +
        f"{results['created']} on {env['device_name']} (torch {env['torch']}, transformers {env['transformers']}). "
        f"{cfg['samples']} samples per task and length, seed {cfg['seed']}, greedy decoding, RULER string match "
        f"(fraction of the answers found in the prediction). Lengths are prompt tokens. Haystack code: "
        f"{', '.join(cfg['haystack_packages'])}.",
        "",
        "## Accuracy (%) per task and length",
        "",
        "| task | length | " + " | ".join(modes) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in modes) + " |",
    ]
    for length in cfg["lengths"]:
        for task in cfg["tasks"]:
            row = [_fmt(cells.get((m, task, length), {}).get("accuracy")) for m in modes]
            lines.append(f"| {task} | {length:,} | " + " | ".join(row) + " |")
        row = [_fmt(per_mode.get((m, length), {}).get("accuracy")) for m in modes]
        lines.append(f"| **average** | {length:,} | " + " | ".join(f"**{v}**" for v in row) + " |")
    lines += [
        "",
        "## Cost per mode and length",
        "",
        "Footprint ratio: device KV bytes / full decoding's at the end of generation (mean over samples). "
        "Selected: entries a trigger made resident (lsa's mean is the budget of recent/random/oracle). "
        "Bytes moved: host->device bytes fetched after prefill per sample (by triggers; hisparse: at every "
        "decode step, into its buffer of max(budget, top-k) entries per CSA layer).",
        "",
        "| mode | length | accuracy % | footprint ratio | device KV MiB | CSA entries | selected | budget "
        "| triggers | entries fetched | bytes moved MiB | decode tok/s | prefill tok/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    mib = 1024 * 1024
    for mode in modes:
        for length in cfg["lengths"]:
            c = per_mode.get((mode, length))
            if c is None:
                continue
            lines.append(
                f"| {mode} | {length:,} | {_fmt(c['accuracy'])} | {_fmt(c['footprint_ratio'], '.3f')} | "
                f"{_fmt(c['device_bytes'] / mib if c['device_bytes'] is not None else None, '.2f')} | "
                f"{_fmt(c['csa_entries'], '.0f')} | {_fmt(c['selected_entries'], '.1f')} | "
                f"{_fmt(c['budget'], '.0f')} | {_fmt(c['triggers'], '.1f')} | {_fmt(c['entries_fetched'], '.1f')} | "
                f"{_fmt(c['bytes_moved'] / mib if c['bytes_moved'] is not None else None, '.3f')} | "
                f"{_fmt(c['decode_tokens_per_second'], '.1f')} | {_fmt(c['prefill_tokens_per_second'], '.0f')} |")
    lines += ["", "Plots: `accuracy_vs_footprint.png`, `footprint_vs_length.png`. Every run: `results.json`.", ""]
    return "\n".join(lines)


def write_plots(results: dict, out: Path) -> list[Path]:
    """accuracy vs footprint ratio (one point per mode and length) and footprint ratio vs context length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["summary"]["modes"]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    # distinct markers and dashes: controls at one budget often coincide in footprint
    style = {m: dict(marker=mk, linestyle=ls) for m, mk, ls in zip(MODES, "os^vDx", ("-", "--", "-.", ":", "-", "--"))}
    paths = []
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for mode in modes:
        pts = [(r["footprint_ratio"], r["accuracy"], r["length"]) for r in rows
               if r["mode"] == mode and r["footprint_ratio"] is not None]
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=mode, **style[mode])
        for x, y, length in pts:
            ax.annotate(f"{length // 1024}K" if length >= 1024 else str(length), (x, y), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("KV footprint ratio (device / full)")
    ax.set_ylabel("accuracy, mean over tasks (%)")
    ax.set_ylim(-3, 103)
    ax.set_title("Accuracy vs KV footprint")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "accuracy_vs_footprint.png"))
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for mode in modes:
        pts = sorted((r["length"], r["footprint_ratio"]) for r in rows
                     if r["mode"] == mode and r["footprint_ratio"] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=mode, **style[mode])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (prompt tokens)")
    ax.set_ylabel("KV footprint ratio (device / full)")
    ax.set_title("KV footprint vs context length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "footprint_vs_length.png"))
    plt.close("all")
    return paths


# ---- small helpers ----------------------------------------------------------------------------------------


def _key(record: dict) -> tuple:
    return record["task"], record["length"], record["index"], record["mode"]


def _sort_key(key: tuple) -> tuple:
    task, length, index, mode = key
    return length, list(TASKS).index(task) if task in TASKS else 99, MODES.index(mode), index


def _jsonable(config: EvalConfig) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}


def _environment(device: str) -> dict:
    import transformers

    name = platform.processor() or platform.machine()
    if str(device).startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.device(device))
    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "device": str(device), "device_name": name, "host": platform.node()}


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_json(path: Path, blob: dict) -> None:
    _write_text(path, json.dumps(blob, indent=1) + "\n")


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    return path
