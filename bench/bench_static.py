"""The static-shape batched decode step (``lsa_runtime/static_decode.py``) at DeepSeek-V4-Flash dimensions: step time
and aggregate tokens/s vs batch size, eager and as one CUDA graph per batch size.

    python bench/bench_static.py [--contexts 131072,524288] [--batches 1,4,16] [--steps 24] [--json out.json]

The backbone is ``bench/flash_model.py`` (V4-Flash attention and KV layout, shrunk MoE, random bf16). Each of the B
rows of one ``StaticDecodeState`` is filled synthetically as after ``context`` tokens (window ring, context/4 CSA
entries of C^Comp and K^IComp, context/128 HCA entries, open compression windows and CSA overlaps), then greedy
decode steps run: ``static_step`` eagerly, and the same step captured once as a CUDA graph and replayed (GPU).
Full semantics: every entry is on the device and the native top-k chooses among all of them, as ``bench_batch.py
--modes all`` (issue 18's honest full decoder, per-sequence caches); compare the two tables. Reported per context
and B: median step ms (eager, graph), aggregate tokens/s of the graph (eager on a CPU), the state's device bytes per
row. ``--small``: a 12-layer small-width model, for a CPU smoke test (eager only). ``--compile``: every decoder layer
compiled first (``lsa_runtime/compiled_step.py``; the first step of each batch size compiles, reported apart).
``--profile``: kernels per replayed step and their device time (torch.profiler over 3 replays), the top kernels.
``--fuse-inputs``: each attention block's input projections as one GEMV (``lsa_runtime/fused_inputs.py``).
``--resident R``: LSA's resident mode (``lsa_runtime/static_residency.py``): every CSA layer holds R entry slots per
row, R - 18 of them filled (the resident set; 18 = tau/4 + 2 slots for the entries born before the next trigger at
tau = 64), the native top-k choosing among those; the rest of the row's entries live in its host cold pool,
reported as host MiB per row (C^Comp + K^IComp of every CSA entry, the model's dtype). ``--triggers`` (with
``--resident``; eager steps on a CPU): each row also triggers every tau = 64 steps, staggered (row r at steps where
(step + r * 64 / B) % 64 == 0, as rows that joined at different times), as ``Session(static_decode=True)`` runs a
trigger (``lsa_runtime/static_residency.py``): the born entries flushed to a cold pool (one pinned pool of context/4
random entries per CSA layer, shared by the rows: the host cannot pin 3.5 GB per row at B = 64) and to the memory
layers' device keys, a random memory indexer at Flash dimensions scoring every entry with h_t0 from the graph's
buffers, its top R - 18 installed in place (random scores: nearly every row fetched, the costliest case). Triggers
are timed apart from the replays (synchronised host clock); reported: median trigger ms, the trigger's share of
decode time at tau, and tokens/s with the triggers counted. ``--prefetch D`` (with ``--triggers``): up to 8
synchronous triggers first, timed by phase (flush, select, plan, assemble, write) beside the host's load average;
then each trigger started D steps before its boundary and installed at the boundary, as
``Session(prefetch_steps=D)`` runs it (``--prefetch-on stream``, the Session's: the job on the decode thread on a side
CUDA stream, run once the next replay is queued, so that its host work overlaps the replay; ``thread``: a helper
thread per row, as runs 8-12 measured), the TAU steps in which every row starts one and installs one timed whole
(their mean step against the best replay). With ``--triggers``, ``--profile`` also profiles one synchronous trigger
(host ops with shapes, kernels) and, with ``--prefetch``, one start and one install. ``--switch-intervals 5,0.2``:
each batch size once per GIL switch interval (the helper threads and the decode thread share the GIL).
``--profile-window`` (with ``--prefetch``): the window's first 8 steps under torch.profiler (host ops and Python
functions of the decode and helper threads, a Chrome trace beside ``--json``), the other 56 timed.
``--churn F``: each selection keeps a random 1 - F of the row's set and takes the indexer's best others (a trained
indexer's consecutive sets overlap; 1.0, the default, is the random indexer's top entries, nearly all fetched).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_batch import write_json  # noqa: E402
from bench.bench_decode import small_config  # noqa: E402
from bench.flash_model import flash_config  # noqa: E402
from lsa_runtime.compiled_step import compile_static_step  # noqa: E402
from lsa_runtime.fused_inputs import fuse_attention_inputs  # noqa: E402
from lsa_runtime.prefetch import ResidentPrefetcher, StreamPrefetcher  # noqa: E402
from lsa_runtime.static_decode import StaticDecodeState, install_static_attention, static_step  # noqa: E402
from lsa_runtime.static_runner import StaticRunner  # noqa: E402


BORN_SLOTS = 64 // 4 + 2  # resident mode: slots kept free for the entries born before the next trigger (tau = 64)


def advance(runner: StaticRunner) -> None:
    """One token more in every row: the device's positions and the runner's host copies (``StaticResidentRows``
    counts born entries from those)."""
    runner.state.positions.add_(1)
    runner.positions[:] = [p + 1 for p in runner.positions]


def fill(runner: StaticRunner, context: int, gen: torch.Generator) -> None:
    """Every row as after ``context`` tokens: random contents (finite gates), the lengths and positions exact (in
    resident mode the CSA slots filled up to their capacity less ``BORN_SLOTS``)."""
    state = runner.state
    def randn_(t):
        t.copy_(torch.randn(t.shape, generator=gen, device=t.device, dtype=torch.float32).to(t.dtype))

    for layer in state.layers:
        randn_(layer.window)
        for store in (layer.compressor, layer.indexer):
            if store is None:
                continue
            for name, t in store.tensors().items():
                if name != "lengths":
                    randn_(t)
            slots = store.entries.shape[1]
            resident = state.geometry.resident is not None and layer.indexer is not None
            store.lengths.fill_(min(context // store.rate, slots - BORN_SLOTS) if resident else context // store.rate)
    state.positions.fill_(context)
    runner.positions[:] = [context] * state.geometry.batch
    state.tokens.fill_(5)


TAU = 64  # --triggers: decode steps between a row's triggers (the method's tau)


def attach_pool(runner: StaticRunner, context: int, device: str, gen: torch.Generator, filled: int, spare: int):
    """For ``--triggers``: one cold pool of ``context // 4`` random entries per CSA layer, and the memory layers'
    K^IComp of them on the device, shared by every row; each row's ``filled`` slots taken as entries 0 .. filled - 1.
    ``spare``: room for the entries every row will flush into it, allocated now (as ``Session`` sizes a row's pool
    for its prompt and new tokens): growing a pinned pool mid-run re-pins and copies it on the decode thread, a
    stall that belongs to this shared pool, not to a row's. Returns the memory keys ``{layer: GrowingRows}``."""
    from lsa_runtime.backbone import csa_layers, default_memory_layers
    from lsa_runtime.cold_pool import ColdPool, GrowingRows

    config, dtype = runner.model.config, runner.model.dtype
    n, layers = context // 4, csa_layers(config)
    widths = {"compressor": config.head_dim, "indexer": config.index_head_dim}
    pool = ColdPool(layers, widths, dtype, initial_entries=n + spare)
    keys = {L: GrowingRows(config.index_head_dim, dtype, device, capacity=n + spare)
            for L in default_memory_layers(config)}
    for layer in layers:
        for name, width in widths.items():
            for start in range(0, n, 16384):
                rows = torch.randn(min(16384, n - start), width, generator=gen, device=device).to(dtype)
                pool.append(layer, name, rows)
                if name == "indexer" and layer in keys:
                    keys[layer].append(rows)
    resident = runner.resident
    for row in range(runner.state.geometry.batch):  # synthetic: what StaticResidentRows.join would have set
        resident.ids[row], resident.pools[row], resident.filled[row] = \
            torch.arange(filled, device=resident.device), pool, filled
        resident.marks[row] = (filled, runner.positions[row])
    return keys


@dataclass(frozen=True)
class Picker:
    """What a bench trigger selects with: a random memory indexer at Flash dimensions, and ``churn``, the share of a
    selection that is new against the row's current set (1.0: the indexer's top entries alone, which for random
    scores replace nearly the whole set, the costliest case; below 1 a random ``1 - churn`` of the current set is
    kept and the indexer's best others fill the rest, as consecutive sets of a trained indexer overlap)."""

    indexer: torch.nn.Module
    churn: float


def select(runner: StaticRunner, picker: Picker, keys: dict, row: int, hidden: dict, position: int, n: int, size: int,
           current: torch.Tensor | None = None):
    """The pick for ``row`` (entry ids on the rows' device, as ``Session._select`` hands the static rows): every one
    of the ``n`` entries scored at each memory layer (h_t0 from ``hidden``), the OR of the layers taken as the max
    logit, its top ``size``; with ``picker.churn < 1`` a random part of ``current`` (the row's ids: now, or at the
    prefetch's snapshot) kept and the best others added."""
    logits = picker.indexer.trigger_logits(hidden, position, {L: k.view() for L, k in keys.items()}, n)
    best = torch.stack([logits[L] for L in keys]).amax(0)
    size = min(size, n)
    if picker.churn >= 1.0:
        return best.topk(size).indices
    current = runner.resident.ids[row] if current is None else current
    current = current[current < n]
    # which entries stay: seeded by row and position (helper threads pick concurrently; one shared generator is not
    # thread-safe)
    gen = torch.Generator().manual_seed(row * 1_000_003 + position)
    order = torch.randperm(current.numel(), generator=gen).to(current.device)
    kept = current[order[: min(current.numel(), round((1 - picker.churn) * size))]]
    best[kept] = float("-inf")  # the others: the indexer's best among the entries not kept
    return torch.cat([kept, best.topk(size - kept.numel()).indices])


def trigger(runner: StaticRunner, picker: Picker, keys: dict, row: int, size: int | None = None):
    """One row's trigger as the Session runs it in resident mode (flush, score every entry, install in place) for a
    selection of ``size`` entries (default: the slots less ``BORN_SLOTS``); returns the ``ResidentChange``."""
    resident = runner.resident
    resident.flush(row, keys)
    n = resident.pools[row].count(resident.layers[0])
    hidden = {L: runner.hidden[L][row] for L in keys}
    ids = select(runner, picker, keys, row, hidden, runner.positions[row] - 1, n,
                 size or runner.state.geometry.resident - BORN_SLOTS)
    return resident.install(row, ids, BORN_SLOTS)


def trigger_phases(runner: StaticRunner, picker: Picker, keys: dict, row: int, size: int, device: str) -> dict:
    """:func:`trigger` (its install spelt out) with a synchronised host clock after each phase: ms of the flush of
    born entries, the selection (scoring, top-k), the plan (unique ids, ``ResidentPlan``), the
    assembly of the new rows (kept and fetched) and their write into the slots."""
    from lsa_runtime.residency import ResidentPlan

    resident, times = runner.resident, {}
    clock = [time.perf_counter()]

    def lap(name):
        synchronize(device)
        now = time.perf_counter()
        times[name] = (now - clock[0]) * 1e3
        clock[0] = now

    resident.flush(row, keys)
    lap("flush")
    n = resident.pools[row].count(resident.layers[0])
    hidden = {L: runner.hidden[L][row] for L in keys}
    ids = select(runner, picker, keys, row, hidden, runner.positions[row] - 1, n, size)
    lap("select")
    plan = ResidentPlan(resident.ids[row], resident._unique(ids))
    lap("plan")
    rows = resident._assemble(row, plan)  # StaticResidentRows.install's two steps, apart
    lap("assemble")
    resident._write(row, rows)
    resident.ids[row], resident.filled[row] = plan.ids, int(plan.ids.numel())
    resident.marks[row] = (resident.filled[row], runner.positions[row])
    lap("write")
    return times


def start_prefetch(runner: StaticRunner, picker: Picker, keys: dict, row: int, prefetcher, size: int,
                   device: str) -> None:
    """The next window's trigger for ``row``, as ``Session`` runs it with ``prefetch_steps``: born entries flushed
    and h_t0 copied now, the scoring and :meth:`StaticResidentRows.prepare` (gather from the cold pool) by
    ``prefetcher`` while the graph replays (a ``StreamPrefetcher``, the Session's: on the decode thread once the
    next replay is queued; a ``ResidentPrefetcher``: on its helper thread)."""

    from lsa_runtime.cold_pool import GrowingRows

    resident = runner.resident
    resident.flush(row, keys)
    n = resident.pools[row].count(resident.layers[0])
    hidden = {L: runner.hidden[L][row].clone() for L in keys}
    position = runner.positions[row] - 1
    snapshot, filled = resident.ids[row].clone(), resident.filled[row]
    # the memory keys of the n entries as of now: the rows share them and keep appending while the helper scores
    keys = {L: GrowingRows.over(k.view()[:n], n) for L, k in keys.items()}

    def job():
        return resident.prepare(row, select(runner, picker, keys, row, hidden, position, n, size, snapshot),
                                snapshot, filled)

    if isinstance(prefetcher, StreamPrefetcher):
        prefetcher.start(job, device, reads=[snapshot, *hidden.values(), *(k.view() for k in keys.values())])
    else:
        prefetcher.start(job, device)


def state_bytes(state: StaticDecodeState) -> int:
    return sum(t.numel() * t.element_size() for t in state.tensors().values())


def pool_bytes_per_row(config, context: int, dtype: torch.dtype) -> int:
    """Host cold-pool bytes of one row in resident mode: C^Comp and K^IComp of every CSA entry."""
    from lsa_runtime.backbone import csa_layers

    entries = context // config.compress_rates["compressed_sparse_attention"]
    return len(csa_layers(config)) * entries * (config.head_dim + config.index_head_dim) * dtype.itemsize


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(run, runner: StaticRunner, steps: int, device: str) -> list[float]:
    """Step times (ms, host clock, synchronised); the positions advance as decoding would."""
    out = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        out.append((time.perf_counter() - start) * 1e3)
        advance(runner)
    return out


def profile_replays(graph, replays: int) -> dict:
    """Kernels per replay and their summed device time (ms per replay), the 30 costliest kernel names and the 15
    most launched (a step of thousands of small kernels is bound by their count, not their bytes)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in kernels) / 1e3 / replays
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:30]
    return {"kernels_per_step": sum(e.count for e in kernels) / replays, "device_ms_per_step": total,
            "top": [{"name": e.key[:90], "count": e.count / replays, "ms": e.self_device_time_total / 1e3 / replays}
                    for e in top],
            "most_launched": [{"name": e.key[:90], "count": e.count / replays,
                               "ms": e.self_device_time_total / 1e3 / replays}
                              for e in sorted(kernels, key=lambda e: -e.count)[:15]]}


def run_batch(model, context: int, batch: int, args, device: str) -> dict:
    from lsa_runtime.backbone import default_memory_layers

    # positions the run reaches: timed eager and replayed steps, warm-up / capture / profile steps, the trigger run
    capacity = context + 2 * args.steps + 8 + (2 * TAU + args.prefetch + 16 if args.triggers else 0) \
        + args.extra_positions

    hidden = default_memory_layers(model.config) if args.triggers else ()
    runner = StaticRunner(model, batch, capacity, graph=False, resident=args.resident, hidden_layers=hidden)
    state = runner.state
    fill(runner, context, torch.Generator(device=device).manual_seed(context + batch))
    row = {"context": context, "batch": batch, "state_bytes_per_row": state_bytes(state) // batch,
           "resident_slots": args.resident}
    if args.resident is not None:
        row["host_pool_bytes_per_row"] = pool_bytes_per_row(model.config, context, model.dtype)
    with torch.no_grad():
        if args.compile:  # the first step of a batch size (and capacity) compiles its layer kinds
            synchronize(device)
            began = time.perf_counter()
            static_step(model, state)
            synchronize(device)
            row["compile_seconds"] = time.perf_counter() - began
        eager = time_steps(lambda: static_step(model, state), runner, args.steps, device)
        if args.profile_ops:  # one more eager (compiled) step, its ops with shapes: the positions stay
            row["ops_profile"] = profile_ops(lambda: static_step(model, state), device)
        row["eager_step_ms"] = eager
        row["eager_median_ms"] = sorted(eager[2:])[len(eager[2:]) // 2]
        if device == "cuda" and not args.no_graph:
            runner.capture()  # warm-up steps off the capture, then the capture
            replay = time_steps(runner.graph.replay, runner, args.steps, device)
            row["graph_step_ms"] = replay
            row["graph_median_ms"] = sorted(replay[1:])[len(replay[1:]) // 2]
            if args.profile:
                row["profile"] = profile_replays(runner.graph, 3)
        if args.triggers:
            row.update(replay_with_triggers(runner, context, batch, args, device))
    best = row.get("graph_median_ms", row["eager_median_ms"])
    row["tokens_per_s"] = batch * 1e3 / best
    if "trigger_ms_median" in row:  # every row triggers once per tau steps
        per_step = row["trigger_ms_median"] * batch / TAU
        row["trigger_share"] = per_step / (best + per_step)
        row["tokens_per_s_with_triggers"] = batch * 1e3 / (best + per_step)
    if "window_step_ms" in row:  # prefetched: the timed window's mean step against the best replay
        row["trigger_share"] = max(0.0, 1 - best / row["window_step_ms"])
        row["tokens_per_s_with_triggers"] = batch * 1e3 / row["window_step_ms"]
    return row  # the state is freed here; the caller empties the CUDA cache


def replay_with_triggers(runner: StaticRunner, context: int, batch: int, args, device: str) -> dict:
    """Replays (eager steps without a graph) with every row's trigger at its staggered step.

    Synchronous (``--prefetch 0``): TAU + 8 steps, each trigger timed apart from the replays. With ``--prefetch d``
    the trigger for a boundary starts d steps before it (``start_prefetch``; its job run by ``--prefetch-on``'s
    prefetcher) and is installed at the boundary (``install_prepared``), as ``Session(prefetch_steps=d)`` runs it:
    a step's starts and installs queued after the previous replay, the stream prefetcher's jobs after this one;
    each row triggers at two boundaries TAU apart, and the TAU steps in which every row starts one prefetch and
    installs one are timed as a whole (replays slowed by the jobs' device work, the decode thread's blocking parts,
    its waits): their mean is the step time with triggers. The slots: a selection leaves tau/4 + 2 + d/4 + 1 free,
    as the Session's."""
    from lsa_runtime.backbone import default_memory_layers
    from lsa_runtime.memory_indexer import MemoryIndexer, MemoryIndexerConfig

    config = runner.model.config
    mcfg = MemoryIndexerConfig.from_backbone_config(config, default_memory_layers(config),
                                                    rank=128 if args.small else 2048, tau=TAU)
    picker = Picker(MemoryIndexer(mcfg).to(device=device, dtype=runner.model.dtype), args.churn)
    d = args.prefetch
    lead_slots = d // 4 + 1 if d else 0
    size = runner.state.geometry.resident - BORN_SLOTS - lead_slots  # a selection's entries
    filled = size - (1 if d else 0)  # before the first install: up to (TAU + d) / 4 + 2 entries are born
    # every row flushes at most one entry per 4 positions it advances (run_batch's capacity less the context)
    ahead = runner.state.geometry.capacity - context
    keys = attach_pool(runner, context, device, torch.Generator(device=device).manual_seed(context), filled,
                       spare=batch * (ahead // 4 + 2))
    pool = runner.resident.pools[0]
    pool_capacity = pool.rows[(runner.resident.layers[0], "compressor")].capacity
    for layer in runner.state.layers:  # drop the entries the timed steps appended
        if layer.indexer is not None:
            layer.compressor.lengths.fill_(filled)
            layer.indexer.lengths.fill_(filled)

    def replay():
        if runner.graph is not None:
            runner.graph.replay()
        else:
            static_step(runner.model, runner.state)

    out = {"churn": args.churn, "memory_keys_bytes_per_row": len(keys) * (context // 4) * config.index_head_dim
           * runner.model.dtype.itemsize}
    def grew() -> bool:  # the shared pool re-pinned mid-run (spare too small): its stalls are in the figures
        return pool.rows[(runner.resident.layers[0], "compressor")].capacity > pool_capacity

    if args.profile:
        out["trigger_profile"] = profile_trigger(runner, picker, keys, device)
    if not d:
        offsets = [r * TAU // batch for r in range(batch)]
        steps, triggers, fetched = [], [], []
        for i in range(TAU + 8):
            for r in range(batch):
                if i and (i + offsets[r]) % TAU == 0:
                    synchronize(device)
                    start = time.perf_counter()
                    fetched.append(trigger(runner, picker, keys, r).fetched)
                    synchronize(device)
                    triggers.append((time.perf_counter() - start) * 1e3)
            synchronize(device)
            start = time.perf_counter()
            replay()
            synchronize(device)
            steps.append((time.perf_counter() - start) * 1e3)
            advance(runner)
        return {**out, "trigger_ms": triggers, "trigger_ms_median": sorted(triggers)[len(triggers) // 2],
                "trigger_ms_mean": sum(triggers) / len(triggers), "replay_with_triggers_step_ms": steps,
                "fetched_per_trigger": sum(fetched) / len(fetched), "pool_grew": grew()}
    # first 8 synchronous triggers (rows 0-7 in turn, selections of the prefetched size), timed apart and by phase,
    # for comparison; the host's load average beside them (a busy host slows every host-side phase). Eight at every
    # B: with one trigger per row a B = 1 run timed only the scoring path's first call (1.8 s on the H100, run 22)
    sync, phases = [], []
    load = os.getloadavg()
    for i in range(8):
        r = i % batch
        synchronize(device)
        start = time.perf_counter()
        phases.append(trigger_phases(runner, picker, keys, r, size, device))
        sync.append((time.perf_counter() - start) * 1e3)
    out["sync_trigger_ms"], out["sync_trigger_ms_median"] = sync, sorted(sync)[len(sync) // 2]
    out["sync_trigger_phases_ms_median"] = {k: sorted(p[k] for p in phases)[len(phases) // 2] for k in phases[0]}
    out["host_load_average"] = [load, os.getloadavg()]
    # boundaries b_r and b_r + TAU with b_r in [d + 1, d + TAU]: in the steps [TAU + 1, 2 TAU] every row starts one
    # prefetch and installs one (the steady state of one trigger per row per TAU steps)
    bounds = [d + 1 + r * TAU // batch for r in range(batch)]
    prefetchers = [prefetcher_class(args.prefetch_on)() for _ in range(batch)]
    if args.profile:  # one start and one install of row 0 under the profiler (the decode thread's blocking parts)
        out["prefetch_profile"] = profile_prefetch(runner, picker, keys, size, device, args.prefetch_on)
    starts, installs, waits, helper, fetched, window_steps = [], [], [], [], [], []
    # --profile-window: the first WINDOW_PROFILED steps of the steady state under the profiler (host ops and Python
    # frames of both threads), the rest of it timed
    profiled = range(TAU + 1, TAU + 1 + WINDOW_PROFILED) if args.profile_window else range(0)
    first_timed = TAU + 1 + len(profiled)
    window, prof = None, None

    def due(i: int, timed: bool) -> None:
        """The starts and installs that step i's replay follows, queued after step i - 1's replay (as the Session
        queues a step's after-step work behind it): host work that overlaps that replay."""
        for r in range(batch):
            if i - bounds[r] in (-d, TAU - d):
                start = time.perf_counter()
                start_prefetch(runner, picker, keys, r, prefetchers[r], size, device)
                if timed:  # the profiler slows what it watches
                    starts.append((time.perf_counter() - start) * 1e3)
            if i - bounds[r] in (0, TAU):
                start = time.perf_counter()
                finished = prefetchers[r].finish()
                change = runner.resident.install_prepared(r, finished.result, BORN_SLOTS, keys)
                if timed:
                    installs.append((time.perf_counter() - start) * 1e3)
                    waits.append(finished.wait_seconds * 1e3)
                    helper.append(finished.helper_seconds * 1e3)
                fetched.append(change.fetched)

    try:
        due(1, True)
        for i in range(1, 2 * TAU + d + 9):
            if i == first_timed:
                synchronize(device)
                window = time.perf_counter()
            if profiled and i == profiled[0]:
                prof = start_window_profile()
            step_began = time.perf_counter()
            replay()
            advance(runner)  # the host's positions count this step's token: the next starts flush its entry
            for prefetcher in prefetchers:  # stream: the jobs started after the last replay run while this one runs
                if isinstance(prefetcher, StreamPrefetcher):
                    prefetcher.launch()
            due(i + 1, i not in profiled)
            if args.wait == "stream" and device == "cuda":
                torch.cuda.current_stream().synchronize()
            else:
                synchronize(device)
            if window is not None and i <= 2 * TAU:
                window_steps.append((time.perf_counter() - step_began) * 1e3)
            if profiled and i == profiled[-1]:
                out["window_profile"] = stop_window_profile(prof, len(profiled), args.json)
                prof = None
            if i == 2 * TAU:
                window_ms = (time.perf_counter() - window) * 1e3
    finally:
        if prof is not None:
            prof.stop()
        for prefetcher in prefetchers:
            prefetcher.close()
    blocking = starts + installs
    timed = 2 * TAU - first_timed + 1
    return {**out, "prefetch_steps": d, "prefetch_on": args.prefetch_on, "window_step_ms": window_ms / timed,
            "window_steps_ms": window_steps,
            "start_ms": starts, "install_ms": installs, "pool_grew": grew(),
            "blocking_ms_median": sorted(blocking)[len(blocking) // 2],
            "blocking_ms_mean": sum(blocking) / len(blocking),
            "wait_ms_median": sorted(waits)[len(waits) // 2], "helper_ms_median": sorted(helper)[len(helper) // 2],
            "fetched_per_trigger": sum(fetched) / len(fetched)}


WINDOW_PROFILED = 8  # --profile-window: steady-state prefetched steps under the profiler


def start_window_profile():
    """torch.profiler over host activity with Python frames (both threads: decode and helpers), started now."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], with_stack=True)
    prof.start()
    return prof


def stop_window_profile(prof, steps: int, json_path: str | None) -> dict:
    """Stop ``prof``; host self time per op and Python function, both threads summed (ms per step, the 20 largest;
    idle helpers' queue waits left out), and the Chrome trace gzipped beside ``json_path``
    (``<json>.window_trace.json.gz``): its timeline shows each thread apart."""
    import gzip
    import shutil
    import tempfile

    prof.stop()
    # an idle helper thread waits in its executor's queue: that wait is not work
    idle = ("_queue.SimpleQueue", "concurrent/futures/thread.py", "threading.py")
    by_op = sorted((e for e in prof.key_averages() if not any(k in e.key for k in idle)),
                   key=lambda e: -e.self_cpu_time_total)[:20]
    out = {"steps": steps,
           "top_ops": [{"name": e.key[:80], "count": e.count / steps,
                        "ms_per_step": e.self_cpu_time_total / 1e3 / steps} for e in by_op]}
    if json_path:
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            prof.export_chrome_trace(tmp.name)
            trace = f"{json_path}.window_trace.json.gz"
            with open(tmp.name, "rb") as src, gzip.open(trace, "wb") as dst:
                shutil.copyfileobj(src, dst)
        out["trace"] = trace
    return out


def profile_ops(fn, device: str, top: int = 40) -> dict:
    """``fn()`` (one step, not a graph replay: the host ops that launch each kernel are seen) under torch.profiler
    with shapes: the ``top`` (op, input shapes) groups by the device time of the kernels they launch themselves
    (self: an op's children count apart; on a CPU, by their own host time), with their calls a step."""
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        fn()
        synchronize(device)
    events = [e for e in prof.key_averages(group_by_input_shape=True) if e.device_type.name == "CPU"]

    def ms(e):
        return (e.self_device_time_total if device == "cuda" else e.self_cpu_time_total) / 1e3

    ranked = sorted(events, key=ms, reverse=True)[:top]
    return {"clock": "device" if device == "cuda" else "host", "ms": sum(ms(e) for e in events),
            "top": [{"name": e.key[:60], "shapes": str(e.input_shapes)[:160], "count": e.count, "ms": ms(e)}
                    for e in ranked]}


def profile_trigger(runner: StaticRunner, picker: Picker, keys: dict, device: str) -> dict:
    """One synchronous trigger of row 0 under torch.profiler (host and device, shapes): its wall ms, the ops of
    most host time (self) and the kernels of most device time."""
    trigger(runner, picker, keys, 0)  # warm: allocator, kernels' first launches
    return profile_host(lambda: trigger(runner, picker, keys, 0), device)


def prefetcher_class(where: str):
    """--prefetch-on: ``stream`` (the Session's static path: the decode thread, a side stream) or ``thread``."""
    return {"stream": StreamPrefetcher, "thread": ResidentPrefetcher}[where]


def profile_prefetch(runner: StaticRunner, picker: Picker, keys: dict, size: int, device: str, where: str) -> dict:
    """The decode thread's two blocking parts of a prefetched trigger of row 0, each under torch.profiler as
    :func:`profile_trigger`: the start (flush, h_t0 copied, the job handed over) and the install (the born rows
    moved, the prepared rows written); the job runs between them, outside both."""
    prefetcher = prefetcher_class(where)()
    try:
        for _ in range(2):  # the first pair warms (allocator, first launches); the second is profiled
            start = profile_host(lambda: start_prefetch(runner, picker, keys, 0, prefetcher, size, device), device)
            finished = prefetcher.finish()
            install = profile_host(lambda: runner.resident.install_prepared(0, finished.result, BORN_SLOTS, keys),
                                   device)
    finally:
        prefetcher.close()
    return {"start": start, "install": install}


def profile_host(fn, device: str) -> dict:
    """``fn()`` under torch.profiler (host and device, shapes), synchronised: its wall ms, the ops of most host
    time (self) and the kernels of most device time."""
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        start = time.perf_counter()
        fn()
        synchronize(device)
        wall = (time.perf_counter() - start) * 1e3
    events = prof.key_averages(group_by_input_shape=True)
    host = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
    kernels = sorted((e for e in prof.key_averages() if e.device_type.name == "CUDA"),
                     key=lambda e: -e.self_device_time_total)[:6]
    return {"wall_ms": wall,
            "host_ms": sum(e.self_cpu_time_total for e in events) / 1e3,
            "device_ms": sum(e.self_device_time_total for e in prof.key_averages()
                             if e.device_type.name == "CUDA") / 1e3,
            "top_host": [{"name": e.key[:60], "shapes": str(e.input_shapes)[:120], "count": e.count,
                          "ms": e.self_cpu_time_total / 1e3} for e in host],
            "top_device": [{"name": e.key[:60], "count": e.count, "ms": e.self_device_time_total / 1e3}
                           for e in kernels]}


def main() -> None:
    from transformers import DeepseekV4ForCausalLM

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="131072,524288")
    ap.add_argument("--batches", default="1,4,16", help="batch sizes (rows of one static state)")
    ap.add_argument("--steps", type=int, default=24, help="timed steps per run, eager and replayed")
    ap.add_argument("--extra-positions", type=int, default=0, metavar="N",
                    help="N more positions of capacity per row (a row's HCA series holds capacity // 128 entry "
                         "slots): to time a shape apart from the mode that sets it, e.g. 145 = what --triggers "
                         "--prefetch 1 adds")
    ap.add_argument("--small", action="store_true", help="small dimensions for a CPU smoke test")
    ap.add_argument("--no-graph", action="store_true", help="eager steps only")
    ap.add_argument("--compile", action="store_true",
                    help="compile every decoder layer first (lsa_runtime/compiled_step.py; minutes on a GPU)")
    ap.add_argument("--profile", action="store_true", help="count the kernels of a replayed step (GPU)")
    ap.add_argument("--profile-ops", action="store_true",
                    help="one eager step (compiled with --compile) under torch.profiler with shapes: the host ops and "
                         "shapes whose kernels take the most device time (host time on a CPU; the top 40 in the "
                         "JSON, 12 printed)")
    ap.add_argument("--stock-mhc", action="store_true",
                    help="with --compile: keep transformers' Sinkhorn loop (no lsa_runtime/fused_mhc.py)")
    ap.add_argument("--fuse-inputs", action="store_true",
                    help="each attention block's input projections as one GEMV (lsa_runtime/fused_inputs.py)")
    ap.add_argument("--resident", type=int, default=None,
                    help="LSA's resident mode: CSA entry slots per row (e.g. 13,125 = 10%% of 512K's 131,072 + 18)")
    ap.add_argument("--triggers", action="store_true",
                    help="with --resident: every row triggers every 64 steps, staggered (timed apart)")
    ap.add_argument("--prefetch", type=int, default=0, metavar="D",
                    help="with --triggers: start each trigger D steps before its boundary (Session's "
                         "prefetch_steps; 0: synchronous)")
    ap.add_argument("--prefetch-on", choices=("stream", "thread"), default="stream",
                    help="with --prefetch: where the prefetched trigger runs: 'stream' (the Session's static path: "
                         "the decode thread, on a side CUDA stream, once the next replay is queued) or 'thread' (a "
                         "helper thread per row, as runs 8-12 measured)")
    ap.add_argument("--profile-window", action="store_true",
                    help=f"with --prefetch: the first {WINDOW_PROFILED} steady-state steps under torch.profiler (host "
                         "ops and Python frames of the decode and helper threads; trace beside --json), the rest timed")
    ap.add_argument("--churn", type=float, default=1.0,
                    help="with --triggers: share of each selection that is new against the row's current set (1.0: "
                         "the random indexer's top entries, nearly all fetched; 0.1: 90%% of the set kept)")
    ap.add_argument("--switch-intervals", default=None, metavar="MS[,MS...]",
                    help="Python's GIL switch interval(s) in ms, each batch size run once per value (default: the "
                         "interpreter's, 5 ms); the decode thread and prefetch helpers take turns on the GIL")
    ap.add_argument("--gather-programs", type=int, default=None, metavar="N",
                    help="most programs of one zero-copy pool gather (lsa_runtime/kernels/pool_gather.py PROGRAMS; "
                         "0: one per block of 16 rows; default: the module's)")
    ap.add_argument("--wait", choices=("device", "stream"), default="device",
                    help="with --prefetch: what each window step waits for before the next: every stream (runs "
                         "13-23) or the decode stream alone, as a Session's step (its tokens' read) does; a side "
                         "stream's gather may then run on into the next step, which an install orders itself after")
    ap.add_argument("--max-seconds", type=float, default=None, help="stop starting new runs after this long")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.gather_programs is not None:
        if args.gather_programs < 0:
            print("error: --gather-programs must be >= 0", file=sys.stderr)
            sys.exit(2)
        from lsa_runtime.kernels import pool_gather

        pool_gather.PROGRAMS = args.gather_programs
    try:
        args.switch_intervals = [float(x) for x in args.switch_intervals.split(",")] if args.switch_intervals \
            else [sys.getswitchinterval() * 1e3]
    except ValueError:
        args.switch_intervals = []
    if not args.switch_intervals or min(args.switch_intervals) <= 0:
        print("error: --switch-intervals must be positive numbers of ms, comma-separated", file=sys.stderr)
        sys.exit(2)
    if args.profile_window and not args.prefetch:
        print("error: --profile-window needs --prefetch (it profiles the prefetched window)", file=sys.stderr)
        sys.exit(2)
    if not 0.0 <= args.churn <= 1.0:
        print("error: --churn must be between 0 and 1", file=sys.stderr)
        sys.exit(2)
    if args.steps < 4:
        print("error: --steps must be at least 4", file=sys.stderr)
        sys.exit(2)
    if args.extra_positions < 0:
        print("error: --extra-positions must be 0 or more", file=sys.stderr)
        sys.exit(2)
    if args.triggers and args.resident is None:
        print("error: --triggers needs --resident (LSA's resident mode)", file=sys.stderr)
        sys.exit(2)
    if args.prefetch and (not args.triggers or not 0 < args.prefetch < TAU):
        print(f"error: --prefetch needs --triggers and 0 < D < {TAU}", file=sys.stderr)
        sys.exit(2)
    if args.resident is not None and args.resident <= BORN_SLOTS + args.prefetch // 4 + 2:
        print(f"error: --resident must exceed the {BORN_SLOTS} slots kept for entries born between triggers",
              file=sys.stderr)
        sys.exit(2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = small_config() if args.small else flash_config()
    torch.manual_seed(0)
    with torch.device(device):
        model = DeepseekV4ForCausalLM(config)
    model = model.to(dtype).eval()
    install_static_attention(model)
    if args.compile:
        compile_static_step(model, fuse_mhc=not args.stock_mhc, fuse_inputs=args.fuse_inputs)
    elif args.fuse_inputs:
        fuse_attention_inputs(model)
    rows, began = [], time.perf_counter()
    print(f"{'context':>9} {'B':>3} {'eager ms':>9} {'graph ms':>9} {'tok/s':>8} {'state/row MiB':>14}"
          + (f" {'host pool/row MiB':>18}  (resident slots {args.resident:,})" if args.resident else ""), flush=True)
    for context in (int(c) for c in args.contexts.split(",")):
        for batch, interval in itertools.product((int(b) for b in args.batches.split(",")), args.switch_intervals):
            if args.max_seconds and time.perf_counter() - began > args.max_seconds:
                print(f"stopped at {args.max_seconds:g} s (--max-seconds)", flush=True)
                break
            # Python's GIL switch interval: the helper threads of prefetched triggers and the decode thread take
            # turns on the GIL; a thread that wants it back may wait up to this long for a busy one to yield
            sys.setswitchinterval(interval / 1e3)
            row = run_batch(model, context, batch, args, device)
            row["switch_interval_ms"] = interval
            if device == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            graph = f"{row['graph_median_ms']:9.2f}" if "graph_median_ms" in row else f"{'-':>9}"
            print(f"{context:>9,} {batch:>3} {row['eager_median_ms']:9.2f} {graph} {row['tokens_per_s']:8.1f} "
                  f"{row['state_bytes_per_row'] / 2**20:14.1f}"
                  + (f" {row['host_pool_bytes_per_row'] / 2**20:18.1f}" if args.resident else "")
                  + (f"  (compiled in {row['compile_seconds']:.0f} s)" if "compile_seconds" in row else ""), flush=True)
            if "trigger_ms_median" in row:
                print(f"    triggers: median {row['trigger_ms_median']:.2f} ms ({len(row['trigger_ms'])} timed, "
                      f"{row['fetched_per_trigger']:,.0f} entries fetched each), "
                      f"{100 * row['trigger_share']:.1f}% of decode time at tau = {TAU}; "
                      f"{row['tokens_per_s_with_triggers']:.1f} tok/s with them; memory keys "
                      f"{row['memory_keys_bytes_per_row'] / 2**20:.0f} MiB/row", flush=True)
            if "window_step_ms" in row:
                print(f"    synchronous triggers: median {row['sync_trigger_ms_median']:.2f} ms "
                      f"({len(row['sync_trigger_ms'])} timed; by phase "
                      + ", ".join(f"{k} {v:.2f}" for k, v in row["sync_trigger_phases_ms_median"].items())
                      + f"; host load {row['host_load_average'][0][0]:.1f})", flush=True)
                steps = sorted(row["window_steps_ms"])
                print(f"    prefetched {row['prefetch_steps']} steps ahead on the {row['prefetch_on']} (GIL switch "
                      f"interval {row['switch_interval_ms']:g} ms): step {row['window_step_ms']:.2f} ms with "
                      f"triggers (median {steps[len(steps) // 2]:.2f}, max {steps[-1]:.2f}; the triggers' share "
                      f"{100 * row['trigger_share']:.1f}% of the step against the best replay), "
                      f"{row['tokens_per_s_with_triggers']:.1f} tok/s; decode thread blocked "
                      f"{row['blocking_ms_median']:.2f} ms per start/install (median; mean "
                      f"{row['blocking_ms_mean']:.2f}, max {max(row['start_ms'] + row['install_ms']):.2f}), waited "
                      f"{row['wait_ms_median']:.2f} ms, helper {row['helper_ms_median']:.2f} ms, "
                      f"{row['fetched_per_trigger']:,.0f} entries fetched each", flush=True)
            if "window_profile" in row:
                w = row["window_profile"]
                print(f"    window profiled ({w['steps']} steps), host self time per step: "
                      + "; ".join(f"{k['name'][:32]} x{k['count']:.1f} {k['ms_per_step']:.2f} ms"
                                  for k in w["top_ops"][:6]),
                      flush=True)
            if row.get("pool_grew"):
                print("    WARNING: the shared cold pool grew (re-pinned) during the run: its stalls are in these "
                      "figures", flush=True)
            for name, t in (("start", row.get("prefetch_profile", {}).get("start")),
                            ("install", row.get("prefetch_profile", {}).get("install"))):
                if t is not None:
                    print(f"    one prefetch {name} profiled: {t['wall_ms']:.2f} ms wall, host {t['host_ms']:.2f} ms; "
                          + "; ".join(f"{k['name'][:28]} x{k['count']} {k['ms']:.2f}" for k in t["top_host"][:5]),
                          flush=True)
            if "trigger_profile" in row:
                t = row["trigger_profile"]
                print(f"    one trigger profiled: {t['wall_ms']:.2f} ms wall, host {t['host_ms']:.2f} ms, device "
                      f"{t['device_ms']:.2f} ms; host: " + "; ".join(f"{k['name'][:28]} x{k['count']} {k['ms']:.2f}"
                                                                     for k in t["top_host"][:4])
                      + "; device: " + "; ".join(f"{k['name'][:28]} x{k['count']} {k['ms']:.2f}"
                                                 for k in t["top_device"][:3]), flush=True)
            if "ops_profile" in row:
                o = row["ops_profile"]
                print(f"    one eager step's ops by {o['clock']} time ({o['ms']:.2f} ms in all):", flush=True)
                for k in o["top"][:12]:
                    print(f"      {k['ms']:7.3f} ms x{k['count']:<4} {k['name'][:36]} {k['shapes'][:80]}", flush=True)
            if "profile" in row:
                p = row["profile"]
                print(f"    replay: {p['kernels_per_step']:,.0f} kernels, {p['device_ms_per_step']:.2f} ms device; "
                      "top: " + "; ".join(f"{k['name'][:40]} x{k['count']:.0f} {k['ms']:.2f} ms" for k in p["top"][:3])
                      + "; most launched: " + "; ".join(f"{k['name'][:40]} x{k['count']:.0f} {k['ms']:.2f} ms"
                                                        for k in p["most_launched"][:3]), flush=True)
            if args.json:
                write_json(args.json, rows, args, device)


if __name__ == "__main__":
    main()
