"""LSA's resident mode of the static-shape step (lsa_runtime/static_residency.py): a row whose CSA slots hold the
resident set decodes as the Session's LSA path does. The oracle is that path itself (``LSACSACache`` over a
``ResidentSet``, tested against full decoding in test_session.py): the same policy's selections are installed in
the static row at the same steps, and the logits, the tokens and the entries that reach the cold pool must agree."""

import pytest
import torch

from lsa_runtime.backbone import csa_layers
from lsa_runtime.policies import RandomPolicy
from lsa_runtime.session import Session
from lsa_runtime.static_decode import StaticDecodeState, decode_step
from lsa_runtime.static_residency import StaticResidentRows

pytestmark = pytest.mark.usefixtures("one_thread")

TAU, BUDGET, NEW = 16, 24, 50  # 3 triggers while decoding after the first; 24 of ~80 entries resident


class RecordingRandom(RandomPolicy):
    """RandomPolicy that remembers what it selected at each trigger (fetches and kept rows both occur)."""

    def __init__(self, budget, seed):
        super().__init__(budget, seed=seed)
        self.selected = []

    def select(self, state):
        ids = super().select(state)
        self.selected.append(torch.as_tensor(ids).sort().values)
        return ids


def _lsa_reference(model, tokenizer, prompt):
    """The Session's LSA path: its tokens, the logits of its decode steps, its selections and its final state."""
    policy = RecordingRandom(BUDGET, seed=3)
    session = Session(model, tokenizer, policy=policy, tau=TAU)
    logits = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: logits.append(out[0, -1].detach().clone()))
    try:
        out = session.generate(prompt, max_new_tokens=NEW, stop_at_eos=False)
    finally:
        handle.remove()
    return out.token_ids, torch.stack(logits[-(NEW - 1):]), policy.selected, session._state


def test_a_static_row_with_resident_slots_decodes_as_the_lsa_path(backbone):
    model, tokenizer = backbone
    prompt = torch.randint(3, 1024, (333,), generator=torch.Generator().manual_seed(7)).tolist()
    tokens, want_logits, selections, reference = _lsa_reference(model, tokenizer, prompt)
    assert len(selections) == 1 + (NEW - 1) // TAU  # the first after prefill, then every TAU decode steps

    # the same sequence prefilled on the LSA path up to its first trigger, then joined to row 1 of a static state
    session = Session(model, tokenizer, policy=RecordingRandom(BUDGET, seed=3), tau=TAU)
    ids = session._begin(prompt, keep_context=False, max_new_tokens=NEW)
    state = session._state
    state.policy = session.policy  # what Session._run gives each sequence
    first_logits = session._prefill(state, ids)
    session._trigger(state)
    assert torch.equal(state.residency.ids, selections[0])
    headroom = TAU // model.config.compress_rates["compressed_sparse_attention"] + 2
    static = StaticDecodeState(model.config, batch=2, capacity=len(prompt) + NEW + 1, resident=BUDGET + headroom)
    seen = [0, 0]  # tokens seen per row: the host's count, as StaticRunner keeps it
    rows = StaticResidentRows(static, csa_layers(model.config), seen)
    position = rows.join(1, state.cache, state.residency, state.pool)
    seen[1] = position
    assert position == len(prompt) and rows.length(1) == BUDGET
    assert int(first_logits.argmax()) == tokens[0]

    got, triggers = [], 1
    for step, token in enumerate(tokens[:-1]):
        logits = decode_step(model, static, [0, token], [0, position + step])  # row 0: empty, stepped, ignored
        seen[1] += 1
        got.append(logits[1].clone())
        # the host's count of the row's slots is the device's
        assert rows.length(1) == int(static.layers[csa_layers(model.config)[0]].compressor.lengths[1])
        if (step + 1) % TAU == 0:  # the Session's window boundary: born entries to the pool, the next selection
            born = rows.length(1) - rows.filled[1]
            assert born == rows.flush(1) and rows.filled[1] == rows.length(1)
            change = rows.install(1, selections[triggers], headroom)
            assert change.selected == selections[triggers].numel() and rows.length(1) == change.selected
            assert 0 < change.fetched < change.selected  # some rows kept in place, the others from the pool
            triggers += 1
    assert triggers == len(selections)
    got = torch.stack(got)
    torch.testing.assert_close(got, want_logits, rtol=0, atol=1e-4)
    assert [tokens[0]] + got.argmax(-1).tolist() == tokens

    # every entry the row emitted reached its pool, as the LSA path's cache put them in its own
    rows.flush(1)
    for layer in csa_layers(model.config):
        for name in ("compressor", "indexer"):
            mine = state.pool.host_rows(layer, name)
            theirs = reference.pool.host_rows(layer, name)[:mine.shape[0]]
            assert mine.shape[0] == (len(prompt) + NEW - 1) // 4
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)


def test_install_refuses_what_the_slots_cannot_hold(backbone):
    model, tokenizer = backbone
    prompt = torch.randint(3, 1024, (200,), generator=torch.Generator().manual_seed(8)).tolist()
    session = Session(model, tokenizer, policy=RecordingRandom(BUDGET, seed=1), tau=TAU)
    ids = session._begin(prompt, keep_context=False, max_new_tokens=8)
    state = session._state
    state.policy = session.policy
    session._prefill(state, ids)
    session._trigger(state)
    static = StaticDecodeState(model.config, batch=1, capacity=len(prompt) + 9, resident=BUDGET + 6)
    rows = StaticResidentRows(static, csa_layers(model.config), [0])
    rows.join(0, state.cache, state.residency, state.pool)
    with pytest.raises(ValueError, match="exceed the 30 slots"):
        rows.install(0, torch.arange(25), headroom=6)
    with pytest.raises(ValueError, match="outside the 50 entries"):
        rows.install(0, torch.tensor([3, 50]), headroom=6)
    with pytest.raises(ValueError, match="resident mode"):
        static.store_row(0, state.cache, len(prompt))
    with pytest.raises(ValueError, match="StaticResidentRows needs"):
        StaticResidentRows(StaticDecodeState(model.config, batch=1, capacity=8), csa_layers(model.config), [0])
    with pytest.raises(ValueError, match="positions: 2 rows, the state has 1"):
        StaticResidentRows(static, csa_layers(model.config), [0, 0])
    full = StaticDecodeState(model.config, batch=1, capacity=len(prompt) + 9)
    with pytest.raises(ValueError, match="loads rows with their resident entries"):
        full.load_row(0, state.cache, resident={})


def _native_indexer(model):
    """A memory indexer whose towers are the backbone's own indexer (its scores are the native logits)."""
    from lsa_runtime.backbone import default_memory_layers
    from lsa_runtime.memory_indexer import MemoryIndexer, MemoryIndexerConfig

    config = MemoryIndexerConfig.from_backbone_config(model.config, default_memory_layers(model.config),
                                                      rank=model.config.q_lora_rank, tau=TAU)
    return MemoryIndexer.init_from_native(model, config)


def _three_prompts() -> list[list[int]]:
    """Three prompts of different lengths (positions, compressor phases and trigger steps differ)."""
    gen = torch.Generator().manual_seed(9)
    return [torch.randint(3, 1024, (n,), generator=gen).tolist() for n in (333, 150, 260)]


@pytest.fixture(scope="module")
def memory_indexer(backbone):
    return _native_indexer(backbone[0])


@pytest.mark.parametrize("options", [
    # fetches and kept rows at every trigger (slow suite only: random-prefetch below fetches at every trigger too)
    pytest.param({"mode": "random", "budget": BUDGET, "seed": 4}, id="random", marks=pytest.mark.slow),
    # the memory indexer: h_t0 from the runner's buffers, device memory keys
    pytest.param({"mode": "lsa", "budget": BUDGET}, id="lsa-budget"),
    # no budget: a slot for every entry; the memory keys streamed
    pytest.param({"mode": "lsa", "memory_keys": "pool"}, id="lsa-pool-keys"),
    # prepared while the next step runs
    pytest.param({"mode": "random", "budget": BUDGET, "seed": 4, "prefetch_steps": 3}, id="random-prefetch"),
    pytest.param({"mode": "lsa", "budget": BUDGET, "prefetch_steps": 5}, id="lsa-budget-prefetch"),
])
def test_session_static_decode_in_the_trigger_modes_gives_the_cold_pool_paths_tokens_and_sets(backbone,
                                                                                              memory_indexer,
                                                                                              options):
    """Session(static_decode=True) in a trigger mode: three prompts, two rows (the third joins the row the first
    finished sequence leaves), tau = 16; with prefetch the trigger fires d steps early (its job run by the
    StreamPrefetcher after the next step is queued; the cold-pool path's on its helper thread). Each sequence's
    tokens, its trigger record (entries selected and fetched at every trigger) and its entry counts equal the
    cold-pool path decoding it alone; a conversation continues from the written-back state (keep_context) as the
    cold-pool path's does."""
    model, tokenizer = backbone
    indexer = memory_indexer if options["mode"] == "lsa" else None
    prompts = _three_prompts()
    static = Session(model, tokenizer, indexer=indexer, tau=TAU, max_batch=2, static_decode=True, **options)
    batch = static.generate(prompts, max_new_tokens=NEW, stop_at_eos=False)
    for prompt, got in zip(prompts, batch):
        alone = Session(model, tokenizer, indexer=indexer, tau=TAU, **options)
        want = alone.generate(prompt, max_new_tokens=NEW, stop_at_eos=False)
        assert got.token_ids == want.token_ids
        a, b = got.stats, want.stats
        assert a.triggers == b.triggers == 1 + (NEW - 1) // TAU
        assert a.selected_per_trigger == b.selected_per_trigger and a.entries_fetched == b.entries_fetched > 0
        assert (a.prefetch_seconds > 0) == (b.prefetch_seconds > 0) == bool(options.get("prefetch_steps"))
        assert (a.context_tokens, a.csa_entries, a.resident_entries) == (b.context_tokens, b.csa_entries,
                                                                         b.resident_entries)
        assert (a.fetch_bytes_to_device, a.cold_pool_bytes) == (b.fetch_bytes_to_device, b.cold_pool_bytes)
        assert a.device_bytes["memory_index_keys"] == b.device_bytes["memory_index_keys"]
        # the row's slots (the largest selection + room for the born) are what it held: the cold-pool path's rows
        # when every selection fills the budget (random), more where a selection is smaller
        if options["mode"] == "random":
            assert a.device_bytes["csa_kv"] == b.device_bytes["csa_kv"]
        assert a.device_bytes["csa_kv"] >= b.device_bytes["csa_kv"] > 0
    # one conversation, two turns
    turns = [prompts[1], [7, 8, 9]]
    static, alone = (Session(model, tokenizer, indexer=indexer, tau=TAU, static_decode=s, **options)
                     for s in (True, False))
    for i, turn in enumerate(turns):
        got = static.generate(turn, max_new_tokens=20, stop_at_eos=False, keep_context=i > 0)
        want = alone.generate(turn, max_new_tokens=20, stop_at_eos=False, keep_context=i > 0)
        assert got.token_ids == want.token_ids, i
    assert static.residency.ids.tolist() == alone.residency.ids.tolist()


@pytest.mark.slow
def test_session_static_compile_in_mode_lsa_gives_the_cold_pool_paths_tokens_and_sets(backbone, memory_indexer):
    """Session(static_decode=True, static_compile=True) in mode lsa: the compiled layers write each trigger's h_t
    (the memory layers' attention input) as the eager step does, so the three prompts in two rows get the cold-pool
    path's tokens and its selections and fetches at every trigger. Before 2026-12-06 a forward hook kept h_t, and
    a compiled layer does not run its submodules' hooks: the triggers scored zeros. Slow: inductor compiles the
    layer kinds."""
    from lsa_runtime.compiled_step import uncompile_static_step

    model, tokenizer = backbone
    # no recency tail or sink: every resident entry is one the memory indexer chose from h_t
    options = {"mode": "lsa", "budget": BUDGET, "keep_recent": 0, "keep_first": 0}
    prompts = _three_prompts()
    try:
        static = Session(model, tokenizer, indexer=memory_indexer, tau=TAU, max_batch=2, static_decode=True,
                         static_compile=True, **options)
        batch = static.generate(prompts, max_new_tokens=NEW, stop_at_eos=False)
    finally:
        uncompile_static_step(model)
    for prompt, got in zip(prompts, batch):
        want = Session(model, tokenizer, indexer=memory_indexer, tau=TAU, **options).generate(
            prompt, max_new_tokens=NEW, stop_at_eos=False)
        assert got.token_ids == want.token_ids
        a, b = got.stats, want.stats
        assert a.triggers == b.triggers == 1 + (NEW - 1) // TAU
        assert a.selected_per_trigger == b.selected_per_trigger and a.entries_fetched == b.entries_fetched > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode,prefetch", [("random", 0), ("lsa", 0), ("random", 3), ("lsa", 1)])
def test_session_static_decode_in_a_trigger_mode_on_a_gpu(mode, prefetch):
    """On the GPU (fp32, the step one CUDA graph per call, triggers between replays; h_t0 from buffers the graph
    writes): three prompts in two rows give the cold-pool path's tokens and trigger record decoding alone. With
    prefetch the job runs on the StreamPrefetcher's side stream while the next replay runs (d = 1: launched and
    installed around the same replay), the cold-pool path's on its helper thread."""
    from lsa_runtime.backbone import load_backbone

    model, tokenizer = load_backbone("tiny", dtype=torch.float32, device="cuda")
    indexer = _native_indexer(model) if mode == "lsa" else None
    options = {"mode": mode, "budget": BUDGET, "tau": TAU, "seed": 4, "indexer": indexer, "prefetch_steps": prefetch}
    prompts = _three_prompts()
    session = Session(model, tokenizer, max_batch=2, static_decode=True, **options)
    batch = session.generate(prompts, max_new_tokens=NEW, stop_at_eos=False)
    agree = []
    for prompt, got in zip(prompts, batch):
        want = Session(model, tokenizer, static_decode=False, **options).generate(prompt, max_new_tokens=NEW,
                                                                                  stop_at_eos=False)
        agree.append(next((i for i, (a, b) in enumerate(zip(got.token_ids, want.token_ids)) if a != b), NEW))
        assert got.stats.selected_per_trigger == want.stats.selected_per_trigger
        assert got.stats.entries_fetched == want.stats.entries_fetched
    print(f"static {mode} (prefetch {prefetch}) on {torch.cuda.get_device_name()}: tokens equal to the cold-pool "
          f"path alone before the first difference {agree} of {NEW}")
    assert agree == [NEW] * 3


def test_a_static_stream_stopped_while_a_prefetch_is_in_flight(backbone):
    """stream() through the static step closed 15 tokens in (tau = 16, prefetch 5: the first sequence's prefetch is
    preparing its next set): its prefetcher is closed before its row is handed back, no helper thread is left, its
    written-back state has the cold-pool path's entries, and the Session decodes normally afterwards."""
    import threading

    model, tokenizer = backbone
    prompts = _three_prompts()
    options = {"mode": "random", "budget": BUDGET, "seed": 4, "tau": TAU, "prefetch_steps": 5}
    session = Session(model, tokenizer, max_batch=2, static_decode=True, **options)
    before = {t.name for t in threading.enumerate()}
    stream = session.stream(prompts, max_new_tokens=NEW, stop_at_eos=False)
    for item in stream:
        if item.sequence == 0 and len(session._last_jobs[0].produced) == 15:
            break
    stream.close()
    job = session._last_jobs[0]
    assert job.finish_reason == "stopped" and job.state.prefetcher is None and job.row is None
    # the first trigger's set + the entries born in the 14 decoded tokens (the 15th was never run)
    assert job.state.residency.count == BUDGET + (333 + 14) // 4 - 333 // 4
    leftover = {t.name for t in threading.enumerate()} - before
    assert not any(name.startswith("fm-index-prefetch") for name in leftover)
    again = session.generate(prompts[:2], max_new_tokens=20, stop_at_eos=False)
    alone = [Session(model, tokenizer, **options).generate(p, max_new_tokens=20, stop_at_eos=False).token_ids
             for p in prompts[:2]]
    assert [g.token_ids for g in again] == alone
