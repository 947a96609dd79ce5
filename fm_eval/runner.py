"""The long-context evaluation behind ``fm-index evaluate``: RULER-style tasks x lengths x resident-set modes.

For every (task, length) cell, ``samples`` prompts from :mod:`fm_eval.tasks` are decoded greedily by
:class:`lsa_runtime.Session` in each mode and scored with RULER's string match. Modes (the Session's, see
``lsa_runtime.config.SessionConfig``):

* ``full``     -- plain DeepSeek-V4: every compressed entry on the device (footprint ratio 1);
* ``lsa``      -- FlashMemory: the trained memory indexer picks the resident set every tau steps;
* ``recent``   -- the ``budget`` most recent entries (no retrieval);
* ``random``   -- ``budget`` entries drawn uniformly (seeded);
* ``oracle``   -- exactly the entries the full model's native top-k reads in the tau steps after each trigger
  (union over steps and CSA layers, most-read first when capped by ``budget``; ``OraclePolicy`` fed by
  ``record_native_picks`` of the full run): the upper bound of any trigger-time selection;
* ``hisparse`` -- a lossless per-step scheme in the spirit of SGLang's HiSparse: the native top-k scores all
  entries every step (indexer keys of all entries stay on the device) and the picked KV rows missing from a
  fixed device buffer of ``max(budget, index_topk)`` rows per CSA layer are fetched from the host at that step.
  Compare its bytes moved and tokens/s with lsa's.

The same resident budget: in each cell ``lsa`` runs first; the mean number of entries its triggers selected
(over the cell's samples; ``SessionStats.selected_per_trigger``) is the ``budget`` of recent, random and oracle
(and hisparse's buffer, at least one step's top-k). Without ``lsa`` among the modes, ``budget`` must be given.

Output in ``out``: ``runs.jsonl`` (one line per decoded sample and mode, appended as they finish, so an
interrupted run resumes; its ``stats`` are the Session's, its ``timing`` the worker's wall time for the prompt's
build and for the whole run, Session set-up included, so that an evaluation's time can be attributed),
``config.json``, ``results.json`` (every run plus the summaries), ``results.md``
(accuracy per task and length, footprint ratio, bytes moved and tokens/s per mode) and two plots
(``accuracy_vs_footprint.png``, ``footprint_vs_length.png``), written by :mod:`fm_eval.report`; with oracle among
the modes, ``picks/``: the full runs' native top-k picks (:mod:`fm_eval.picks_store`), so a resumed oracle run
replays them instead of decoding full again.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from lsa_runtime.backbone import load_backbone, load_config, parse_device, parse_dtype
from lsa_runtime.config import TRAINED_DISTANCE, SessionConfig, check_distance_cap
from lsa_runtime.errors import FmIndexError
from lsa_runtime.outputs import OutputLock, write_text_atomic
from lsa_runtime.placement import parse_device_map
from lsa_runtime.policies import make_policy, record_native_picks, trained_distance_cap
from lsa_runtime.window_attention import ATTENTIONS, set_attention
from lsa_runtime.window_attention import NAME as WINDOW

from . import MODES
from .picks_store import load_picks, picks_path, save_picks
from .report import markdown_report, summarize, write_plots
from .tasks import (
    DEFAULT_HAYSTACK_PACKAGES,
    TASKS,
    Sample,
    generate_sample,
    parse_tasks,
    score_prediction,
    task_spec,
)

FORMAT = "fm-index-evaluate/1"
BUDGETED = ("recent", "random", "oracle")
NEEDS_FULL_PICKS = ("oracle",)
# a worker's exit code when it ran out of device or host memory (lsa_runtime's DeviceMemoryError): the parent then
# says that several workers share that memory, the first thing to shrink
OUT_OF_MEMORY_EXIT = 3
# Options that must match for a resumed run to continue the same evaluation.
_FINGERPRINT_KEYS = ("model", "indexer", "seed", "samples", "max_new_tokens", "haystack_packages", "tau",
                     "threshold", "budget", "dtype", "chunk_size", "prefetch_steps", "keep_recent", "keep_first",
                     "ensemble", "pool_storage", "fetch_top", "page_size", "max_pages", "attention",
                     "distance_cap", "page_ties", "fetch_neighbours")


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
    device_map: str | None = None  # instead of device: the backbone's layers spread over devices (load_backbone)
    dtype: str | None = None
    haystack_packages: tuple[str, ...] = DEFAULT_HAYSTACK_PACKAGES
    tau: int | None = None  # None: the export's (else 64)
    threshold: float | None = None  # None: the export's (else 0.5)
    budget: int | None = None  # resident budget of recent/random/oracle when lsa is not run
    chunk_size: int = 512
    prefetch_steps: int = 0  # Session(prefetch_steps=...): triggers prepared this many steps ahead, off-thread
    keep_recent: int | None = None  # lsa's recency tail, entries (None: the export's)
    keep_first: int | None = None  # lsa's sink, entries (None: the export's)
    pool_storage: str = "model"  # the cold pool's host rows: model dtype or fp8 (SessionConfig.pool_storage)
    ensemble: str | None = None  # lsa's combination of the memory layers' scores: max or mean (None: the export's)
    fetch_top: int | None = None  # lsa's floor: each memory layer's best-scored entries fetched (None: the export's)
    fetch_neighbours: int | None = None  # lsa: the entries either side of each selected one (None: the export's)
    page_size: int = 0  # lsa's page recall: whole pages of this many entries (0: single entries)
    max_pages: int = 0  # ... and how many pages stay resident
    page_ties: str = "recent"  # ... and which of equal-count pages stay: the newer (the release) or the best-scored
    # lsa: entries farther than this many tokens scored as if this far (None: off; "trained": the export's distance)
    distance_cap: int | str | None = None
    attention: str = "eager"  # eager (transformers') or window (the same attention without the dense score matrix)
    # which of each cell's prompts to decode (None: all `samples`); not part of the fingerprint: a subset decodes the
    # very same prompts, so an evaluation can be completed in pieces (e.g. the prompts another machine did not run)
    prompts: tuple[int, ...] | None = None

    def indices(self) -> tuple[int, ...]:
        """The prompt indices this run decodes in every (task, length) cell."""
        return tuple(range(self.samples)) if self.prompts is None else self.prompts

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
        if self.attention not in ATTENTIONS:
            raise EvaluationError(f"--attention must be one of {', '.join(ATTENTIONS)}, got {self.attention!r}")
        SessionConfig(mode="all", keep_recent=self.keep_recent, keep_first=self.keep_first, ensemble=self.ensemble,
                      pool_storage=self.pool_storage, fetch_top=self.fetch_top, chunk_size=self.chunk_size,
                      page_size=self.page_size, max_pages=self.max_pages, distance_cap=self.distance_cap,
                      page_ties=self.page_ties, fetch_neighbours=self.fetch_neighbours)
        parse_device(self.device)
        if self.device_map is not None:
            parse_device_map(self.device_map, load_config(self.model))
        if self.dtype is not None:
            parse_dtype(self.dtype)
        prompts = None if self.prompts is None else parse_prompts(self.prompts, int(self.samples))
        return replace(self, modes=modes, tasks=tasks, lengths=lengths, samples=int(self.samples), prompts=prompts,
                       haystack_packages=tuple(self.haystack_packages),
                       distance_cap=check_distance_cap(self.distance_cap))

    def fingerprint(self) -> dict:
        blob = asdict(self)
        if not blob["prefetch_steps"]:  # 0, the default: absent, so evaluations from before the option resume
            del blob["prefetch_steps"]
        if blob["pool_storage"] == "model":  # likewise
            del blob["pool_storage"]
        if not blob["page_size"]:  # likewise: single entries, as before page recall
            del blob["page_size"], blob["max_pages"]
        if blob["page_ties"] == "recent":  # likewise: the release's tie rule, as before the option
            del blob["page_ties"]
        if blob["fetch_neighbours"] is None:  # likewise: the export's, off before exports could hold them
            del blob["fetch_neighbours"]
        if blob["attention"] == "eager":  # likewise: transformers' attention, as before the option
            del blob["attention"]
        for key in ("keep_recent", "keep_first", "ensemble", "fetch_top", "distance_cap"):  # likewise: the defaults
            if blob[key] is None:
                del blob[key]
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


def parse_prompts(text: str | Sequence[int], samples: int) -> tuple[int, ...]:
    """Prompt indices from "11-19" or "0,3,7-9" (ranges inclusive), each below ``samples``: sorted, unique."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    indices: set[int] = set()
    for part in parts:
        raw = part.strip() if isinstance(part, str) else str(part)
        if not raw:
            continue
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", raw)
        if match is None:
            raise EvaluationError(f"--prompts must be comma-separated indices or ranges (11-19 or 0,3,7-9), got "
                                  f"'{raw}'")
        low, high = int(match[1]), int(match[2] if match[2] is not None else match[1])
        if high < low:
            raise EvaluationError(f"--prompts range '{raw}' runs backwards")
        if high >= samples:
            raise EvaluationError(f"--prompts {raw}: prompt indices run from 0 to {samples - 1} (--samples {samples})")
        indices.update(range(low, high + 1))
    if not indices:
        raise EvaluationError("--prompts names no prompt")
    return tuple(sorted(indices))


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


# ---- progress -------------------------------------------------------------------------------------------


class Reporter:
    """Progress callbacks (the CLI draws them with rich); the default does nothing."""

    def start(self, total_runs: int, done: int = 0) -> None: ...

    def phase(self, text: str) -> None: ...

    def run_done(self, record: dict) -> None: ...


# ---- the runner -------------------------------------------------------------------------------------------


def prompt_digest(sample: Sample) -> str:
    return hashlib.sha256(sample.prompt.encode()).hexdigest()[:16]


class Evaluation:
    """Runs (or resumes) one evaluation into ``out``; :meth:`run` returns the results dictionary."""

    def __init__(self, config: EvalConfig, out: str | Path, resume: bool = False, reporter: Reporter | None = None,
                 backbone=None, workers: int = 1, batch: int = 1, static_decode: bool | None = None,
                 static_compile: bool = False):
        self.config = config.check()
        self.out = Path(out)
        self.reporter = reporter or Reporter()
        self.resume = resume
        self._backbone = backbone
        if int(workers) < 1:
            raise EvaluationError(f"--workers must be >= 1, got {workers}")
        self.workers = int(workers)
        if isinstance(batch, bool) or int(batch) != batch or int(batch) < 1:
            raise EvaluationError(f"--batch must be an integer >= 1, got {batch}")
        self.batch = int(batch)
        if self.batch > 1 and self.config.attention != "eager":
            # a batch's decode steps attend per row with padded keys and their own mask (lsa_runtime.batching),
            # which the window form does not read
            raise EvaluationError("--attention window decodes one prompt at a time: leave --batch at 1")
        # the runs through the static-shape step or not (SessionConfig.static_decode; None: the Session's default,
        # on one GPU: mode full and the budgeted modes), except hisparse's and the full runs that record native
        # picks for the oracle (the static step records none)
        self.static_decode = None if static_decode is None else bool(static_decode)
        # the static step's decoder layers compiled (SessionConfig.static_compile) for the runs with bounded slots
        # (_session_config)
        if static_compile and static_decode is False:
            raise EvaluationError("--static-compile compiles the static step: it cannot go with --stock-decode")
        self.static_compile = bool(static_compile)
        self.done: dict[tuple, dict] = {}
        self._prompt_seconds: dict[tuple, float] = {}  # (task, length, index): the prompt's build time
        self.identity: dict[str, str] = {}  # set by _preflight

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
            try:
                previous = json.loads(config_file.read_text()).get("fingerprint", {})
            except json.JSONDecodeError as exc:
                raise EvaluationError(f"corrupt {config_file} (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                                      "choose another --out") from None
            changed = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
            if changed:
                key = changed[0]
                raise EvaluationError(f"cannot resume {self.out}: it was run with --{key.replace('_', '-')} "
                                      f"{_show(previous.get(key))}, this run asks for {_show(fingerprint.get(key))} "
                                      f"(use the same options, or another --out)")
            was = json.loads(config_file.read_text()).get("identity", {})
            for key, now in self.identity.items():
                if key in was and was[key] != now:
                    what = "--model's config" if key.startswith("model") else "the --indexer files"
                    raise EvaluationError(f"cannot resume {self.out}: {what} changed since it was run ({key} "
                                          f"{was[key][:16]}, now {now[:16]}); use another --out")
        _write_json(config_file, {"format": FORMAT, "fingerprint": fingerprint, "identity": self.identity,
                                  "config": _jsonable(self.config)})
        if runs.exists():
            self.done.update(_read_runs(runs))  # a line cut by an interruption is dropped: that run is redone
            write_text_atomic(runs, "".join(json.dumps(record) + "\n" for record in self.done.values()))

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
        """Run (or resume) the evaluation, holding the output directory's lock."""
        if self.out.exists() and not self.out.is_dir():
            raise EvaluationError(f"--out {self.out} exists and is not a directory")
        self._preflight()
        with OutputLock(self.out, "evaluate"):
            return self._run()

    def _preflight(self) -> None:
        """The checks that need the backbone's config and the memory indexer but not the backbone's weights, made
        before anything is written (worker processes would otherwise each fail on them after the output exists).
        Also fixes what identifies the model and indexer beyond their paths: a resumed run must use the same."""
        from lsa_runtime.backbone import config_hash, load_config
        from lsa_runtime.memory_indexer import read_memory_indexer

        cfg = self.config
        backbone_config = load_config(cfg.model)
        limit = int(getattr(backbone_config, "max_position_embeddings", 0) or 0)
        longest = max(cfg.lengths) + (cfg.max_new_tokens or max(task_spec(t).max_new_tokens for t in cfg.tasks))
        if limit and longest > limit:
            raise EvaluationError(f"length {max(cfg.lengths)} plus the generated tokens exceeds the model's maximum "
                                  f"of {limit} positions (max_position_embeddings)")
        self.identity = {"model_config_hash": config_hash(backbone_config)}
        tau = cfg.tau
        if "lsa" in cfg.modes:
            indexer = read_memory_indexer(cfg.indexer, backbone_config)
            tau = tau if tau is not None else indexer.config.tau
            self.identity["indexer_sha256"] = indexer_digest(cfg.indexer)
            if cfg.distance_cap == TRAINED_DISTANCE:
                trained_distance_cap(indexer)  # an export that records no training distance is refused here
        tau = int(tau if tau is not None else 64)
        if cfg.prefetch_steps >= tau:
            raise EvaluationError(f"--prefetch-steps {cfg.prefetch_steps} must be below tau ({tau}, the export's)")

    def _run(self) -> dict:
        cfg = self.config
        self._prepare_out()
        indices = cfg.indices()
        total = len(cfg.tasks) * len(cfg.lengths) * len(indices) * len(cfg.modes)
        self.reporter.start(total, done=len([k for k in self.done if k[3] in cfg.modes and k[0] in cfg.tasks
                                             and k[1] in cfg.lengths and k[2] in indices]))
        pending = [(task, length) for length in cfg.lengths for task in cfg.tasks
                   if any((task, length, i, mode) not in self.done for i in indices for mode in cfg.modes)]
        if pending and self.workers > 1 and (len(pending) > 1 or len(indices) > 1):
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
        With fewer cells than workers (e.g. two tasks at one length) each cell's prompts are split between
        workers, in two rounds: full and lsa first, then the modes whose budget is lsa's mean over the whole
        cell (hisparse, recent, random, oracle), so a split cell gets the budget an unsplit one gets.
        """
        cfg = self.config
        order = sorted(pending, key=lambda cell: -cell[1])
        indices = list(cfg.indices())
        if self.workers <= len(order) or len(indices) == 1:
            self._spawn([(task, length, None, None) for task, length in order])
            return
        parts = -(-self.workers // len(order))  # slices per cell: every worker gets one where it can
        slices = [indices[k::parts] for k in range(min(parts, len(indices)))]
        budgeted = tuple(m for m in cfg.modes if m in ("hisparse",) + BUDGETED)
        for modes in (tuple(m for m in cfg.modes if m not in budgeted), budgeted):
            units = [(task, length, indices, modes) for task, length in order for indices in slices
                     if any((task, length, i, m) not in self.done for i in indices for m in modes)]
            if units:
                self._spawn(units)

    def _spawn(self, units: list[tuple]) -> None:
        """Run ``units`` (task, length, sample indices or None for all, modes or None for all) in at most
        ``workers`` processes, round-robin, and wait for them; their runs are read back into ``done``."""
        import multiprocessing
        import time

        n = min(self.workers, len(units))
        shares = [units[k::n] for k in range(n)]
        threads = max(1, (os.cpu_count() or 1) // n) if torch.device(self.config.device).type == "cpu" else 1
        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        procs = [context.Process(target=_worker_main, args=(self.config, str(self.out), share, threads, self.batch,
                                                                     self.static_decode, self.static_compile),
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
            raise EvaluationError(worker_failure(failed, n))
        self.done.update(_read_runs(runs))

    def _load(self) -> None:
        from lsa_runtime.memory_indexer import load_memory_indexer

        cfg = self.config
        if self._backbone is None:
            self.reporter.phase(f"loading {cfg.model}")
            self._backbone = load_backbone(cfg.model, device=cfg.device, dtype=cfg.dtype, device_map=cfg.device_map)
        self.model, self.tokenizer = self._backbone
        if cfg.attention != "eager" or self.model.config._attn_implementation == WINDOW:
            # the model's every forward (prefill, stock decode steps); a model another evaluation left in the window
            # form goes back to transformers' own, any other is left as loaded
            set_attention(self.model, cfg.attention)
        if self.tokenizer is None:
            raise EvaluationError(f"model {cfg.model} has no tokenizer: the tasks are text prompts")
        self.memory_indexer = load_memory_indexer(cfg.indexer, self.model) if "lsa" in cfg.modes else None
        export = self.memory_indexer.config if self.memory_indexer is not None else None
        self.tau = int(cfg.tau if cfg.tau is not None else (export.tau if export else 64))
        self.threshold = float(cfg.threshold if cfg.threshold is not None else (export.threshold if export else 0.5))
        self._warm_up()

    def _warm_up(self) -> None:
        """Decode a few tokens, plain and through the cold-pool path, before any measured run: the first decode in
        a process pays one-time costs (kernel selection, allocator growth) that would count against the first
        cell's tokens/s."""
        from lsa_runtime.session import Session

        self.reporter.phase("warming up")
        prompt = list(range(3, 3 + 96))
        for config in (SessionConfig(mode="full"), SessionConfig(mode="all", tau=4)):
            Session(self.model, self.tokenizer, config).generate(prompt, max_new_tokens=8, stop_at_eos=False)

    def _run_cell(self, task: str, length: int, indices: list[int] | None = None,
                  modes: tuple[str, ...] | None = None) -> None:
        """Decode the cell's prompts ``indices`` (by default the configured ones, ``--prompts``, else all) in
        ``modes`` (the configured ones by default)."""
        cfg = self.config
        modes = cfg.modes if modes is None else modes
        todo = lambda mode, i: (task, length, i, mode) not in self.done  # noqa: E731
        mine = cfg.indices() if indices is None else indices
        # only the prompts with work left here: at 128K one prompt takes ~10 s to build, and a split cell's
        # workers would each build all of them
        wanted = [i for i in mine if any(todo(m, i) for m in modes)]
        self.reporter.phase(f"{task} @ {length:,}: generating prompts")
        samples = {}
        for i in wanted:
            start = time.perf_counter()
            samples[i] = generate_sample(task, self.tokenizer, length, seed=cfg.seed, index=i, num_samples=cfg.samples,
                                         haystack_packages=cfg.haystack_packages)
            self._prompt_seconds[(task, length, i)] = time.perf_counter() - start
        for i, sample in samples.items():  # a resumed run must continue on the very same prompts
            for mode in cfg.modes:
                done = self.done.get((task, length, i, mode))
                if done is not None and done["prompt_sha"] != prompt_digest(sample):
                    raise EvaluationError(f"cannot resume {self.out}: prompt {i} of {task} at {length} differs from "
                                          f"the one decoded before (another tokenizer or Python standard library?)")
        max_new = cfg.max_new_tokens or task_spec(task).max_new_tokens
        picks: dict[int, dict] = {}
        plain_full = []  # full runs whose native picks no oracle needs: decoded as a batch below
        # full first: the oracle replays its native top-k picks (recorded whenever the oracle is configured, also
        # when a later round of split workers decodes it)
        for i, sample in samples.items():
            need_picks = any(todo(m, i) for m in NEEDS_FULL_PICKS if m in cfg.modes)
            stored = picks_path(self.out, task, length, i)
            full_todo = "full" in modes and todo("full", i)
            if need_picks and not full_todo and (kept := load_picks(stored, prompt_digest(sample))) is not None:
                picks[i] = kept  # decoded by an earlier call of this evaluation: no full decode again
            elif need_picks:
                self.reporter.phase(f"{task} @ {length:,}: full")
                record, picks[i] = self._decode(sample, i, "full", None, max_new, want_picks=True)
                save_picks(stored, picks[i], prompt_digest(sample))
                if full_todo:
                    self._append(record)
            elif full_todo:
                plain_full.append(i)
        if plain_full:
            self.reporter.phase(f"{task} @ {length:,}: full")
            self._decode_batched(samples, plain_full, "full", None, max_new, picks)
        if "lsa" in modes:
            self.reporter.phase(f"{task} @ {length:,}: lsa")
            self._decode_batched(samples, [i for i in samples if todo("lsa", i)], "lsa", None, max_new, picks)
        budget = self._cell_budget(task, length)
        for mode in ("hisparse",) + BUDGETED:
            if mode not in modes:
                continue
            self.reporter.phase(f"{task} @ {length:,}: {mode} (budget {budget})")
            self._decode_batched(samples, [i for i in samples if todo(mode, i)], mode, budget, max_new, picks)

    def _cell_budget(self, task: str, length: int) -> int | None:
        """lsa's mean selected entries per trigger over the cell's samples (else the configured budget)."""
        cfg = self.config
        if "lsa" not in cfg.modes:
            return cfg.budget
        selected = [r["selected_mean"] for i in range(cfg.samples)
                    if (r := self.done.get((task, length, i, "lsa"))) and r.get("selected_mean") is not None]
        return max(1, round(sum(selected) / len(selected))) if selected else 1

    def _session_config(self, mode: str, budget: int | None, records_picks: bool = False) -> SessionConfig:
        cfg = self.config
        budget = self._buffer_rows(budget) if mode == "hisparse" else budget if mode in BUDGETED else None
        # --static-compile: the runs whose slots are bounded (full; a budget) take the compiled static step; lsa
        # without a budget would hold a slot per entry there, so it keeps the default path and its footprint
        compiled = self.static_compile and not records_picks and (mode == "full" or (mode != "hisparse"
                                                                                      and budget is not None))
        static = False if records_picks or mode == "hisparse" else True if compiled else self.static_decode
        return SessionConfig(mode=mode, static_decode=static, static_compile=compiled,
                             tau=self.tau, threshold=self.threshold, chunk_size=cfg.chunk_size,
                             seed=cfg.seed, prefetch_steps=cfg.prefetch_steps, keep_recent=cfg.keep_recent,
                             keep_first=cfg.keep_first, ensemble=cfg.ensemble, fetch_top=cfg.fetch_top,
                             page_size=cfg.page_size, max_pages=cfg.max_pages, distance_cap=cfg.distance_cap,
                             page_ties=cfg.page_ties, fetch_neighbours=cfg.fetch_neighbours,
                             pool_storage=cfg.pool_storage,
                             budget=budget)

    def _decode(self, sample: Sample, index: int, mode: str, budget: int | None, max_new: int,
                want_picks: bool = False, picks: dict | None = None) -> tuple[dict, dict | None]:
        from lsa_runtime.session import Session

        start = time.perf_counter()
        config = self._session_config(mode, budget, records_picks=want_picks)
        policy = make_policy(config, self.memory_indexer, picks or {})
        session = Session(self.model, self.tokenizer, config, policy=policy)
        recorded = None
        if want_picks:  # the full run, with the native top-k picks of every decode query (the oracle's input)
            generation, recorded = record_native_picks(session, sample.prompt, max_new, temperature=0.0)
        else:
            generation = session.generate(sample.prompt, max_new_tokens=max_new, temperature=0.0)
        return self._generation_record(sample, index, mode, budget, config, generation,
                                       time.perf_counter() - start), recorded

    def _decode_batched(self, samples: dict[int, Sample], indices: list[int], mode: str, budget: int | None,
                        max_new: int, picks: dict) -> None:
        """Decode ``samples[indices]`` in ``mode``, up to ``batch`` together (each with the policy a lone run would
        get: its own seeded random draws, its own oracle picks), appending each record as its batch finishes."""
        from lsa_runtime.session import Session

        if self.batch == 1:
            for i in indices:
                self._append(self._decode(samples[i], i, mode, budget, max_new, picks=picks.get(i))[0])
            return
        if not indices:
            return
        config = replace(self._session_config(mode, budget), max_batch=self.batch)
        policies_of = lambda group: [make_policy(config, self.memory_indexer, picks.get(i) or {})  # noqa: E731
                                     for i in group]
        session = Session(self.model, self.tokenizer, config, policy=policies_of(indices[:1])[0])
        for first in range(0, len(indices), self.batch):
            group = indices[first:first + self.batch]
            start = time.perf_counter()
            policies = policies_of(group)
            generations = session.generate([samples[i].prompt for i in group], max_new_tokens=max_new,
                                           temperature=0.0, policies=policies if policies[0] is not None else None)
            wall = time.perf_counter() - start  # the whole group's: its runs share every step
            for i, generation in zip(group, generations):
                self._append(self._generation_record(samples[i], i, mode, budget, config, generation, wall,
                                                     len(group)))

    def _generation_record(self, sample: Sample, index: int, mode: str, budget: int | None, config,
                           generation, wall_seconds: float, batch: int = 1) -> dict:
        stats = generation.stats
        selected = list(stats.selected_per_trigger) if stats.triggers else None
        record = self._record(sample, index, mode, budget, generation.text, stats.as_dict())
        record.update(new_tokens=len(generation.token_ids), finish_reason=generation.finish_reason,
                      prompt_tokens=generation.prompt_tokens, selected_per_trigger=selected,
                      selected_mean=stats.selected_mean,
                      buffer_entries=config.budget if mode == "hisparse" else None,
                      # where a worker's time went besides prefill and decode (stats): building the prompt, and the
                      # run's wall time from its policy and Session to its text (a batch's: the whole group's)
                      timing={"prompt_seconds": self._prompt_seconds.get((sample.task, sample.length, index)),
                              "run_seconds": wall_seconds, "batch": batch})
        return record

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
             backbone=None, workers: int = 1, batch: int = 1, static_decode: bool | None = None,
             static_compile: bool = False) -> dict:
    """Run (or resume) the evaluation of ``config`` into ``out``; returns the results dictionary. ``workers``:
    decode in that many processes on the same device (see :meth:`Evaluation._run_workers`); ``batch``: decode up
    to that many prompts of a cell and mode together (``Session.generate`` with a list; same greedy tokens);
    ``static_decode``: decode through the static-shape step (same greedy tokens; every mode but hisparse); None:
    the Session's default (on one GPU: mode full and the budgeted modes); ``static_compile``: the static step
    compiled, taken by the runs of mode full and of the budgeted modes but hisparse (not the oracle's recording
    runs, not lsa without a budget: it would hold a slot per entry)."""
    return Evaluation(config, out, resume=resume, reporter=reporter, backbone=backbone, workers=workers,
                      batch=batch, static_decode=static_decode, static_compile=static_compile).run()


def worker_failure(failed: list[tuple[str, int]], workers: int) -> str:
    """The one-line error for failed workers (``(name, exit code)`` each, in start order) out of ``workers``."""
    name, code = failed[0]
    if any(c == OUT_OF_MEMORY_EXIT for _, c in failed):
        name = next(n for n, c in failed if c == OUT_OF_MEMORY_EXIT)
        hint = (f"; {workers} workers share that memory: --resume with fewer --workers continues" if workers > 1
                else ": --resume continues once the setting the error names is smaller")
        return (f"evaluation worker {name} ran out of memory (its error is printed above); finished runs are "
                f"kept{hint}")
    return (f"evaluation worker {name} failed (exit code {code}, its error is printed above); finished runs are "
            f"kept: --resume continues")


def _worker_main(config: EvalConfig, out: str, units: list[tuple], threads: int, batch: int = 1,
                 static_decode: bool | None = None, static_compile: bool = False) -> None:
    """One worker process: load the backbone (and indexer), decode ``units`` (task, length, sample indices or
    None, modes or None: :meth:`Evaluation._run_cell`'s arguments), append runs to out/runs.jsonl. Out of memory
    (DeviceMemoryError) it prints the error and exits with OUT_OF_MEMORY_EXIT, which the parent names."""
    exit_with_parent(os.getppid())
    torch.set_num_threads(threads)
    evaluation = Evaluation(config, out, resume=True, batch=batch, static_decode=static_decode,
                            static_compile=static_compile)
    evaluation.done = _read_runs(Path(out) / "runs.jsonl")  # read only: the parent owns the directory
    from lsa_runtime.session import DeviceMemoryError

    try:
        evaluation._load()
        for task, length, indices, modes in units:
            evaluation._run_cell(task, length, indices, modes)
    except DeviceMemoryError:
        import traceback

        traceback.print_exc()
        raise SystemExit(OUT_OF_MEMORY_EXIT) from None


def exit_with_parent(parent_pid: int, interval: float = 1.0) -> None:
    """End this process when ``parent_pid`` is no longer its parent. A worker outlives an evaluate process that is
    killed (``timeout``'s SIGTERM, SIGKILL: no ``finally`` runs) and would go on appending to runs.jsonl without the
    directory's lock, into whatever evaluation takes that path next; a daemon thread checks every ``interval``
    seconds. A line cut by the exit is dropped on resume (``_read_runs``)."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval)
        os._exit(3)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def indexer_digest(source: str | Path) -> str:
    """sha256 over an indexer's files (an export directory's config and weights, or a checkpoint file)."""
    path = Path(source).expanduser()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and
                                                 not p.name.startswith("."))
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


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
    write_text_atomic(path, text)


def _show(value) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def _write_json(path: Path, blob: dict) -> None:
    _write_text(path, json.dumps(blob, indent=1) + "\n")
