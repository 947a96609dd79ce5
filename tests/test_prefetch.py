"""Prefetch (``Session(prefetch_steps=d)``): the next window's set is prepared on a helper thread d steps ahead
and swapped in at the window boundary. Oracles: lossless policies stay lossless (tokens equal full decoding),
the resident rows after a swap are the pool's rows of (selected entries + entries born meanwhile), and the
result does not depend on how fast the helper thread is."""

import time

import pytest
import torch

from lsa_runtime.backbone import load_backbone
from lsa_runtime.policies import GivenEntriesPolicy, OraclePolicy, record_native_picks
from lsa_runtime.session import Session, SessionError

PROMPT_TOKENS = 480
NEW_TOKENS = 40
CHUNK = 160


pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def prompt_ids():
    return torch.randint(3, 1024, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def full_tokens(backbone, prompt_ids):
    model, tokenizer = backbone
    return Session(model, tokenizer, mode="full", chunk_size=CHUNK).generate(prompt_ids, NEW_TOKENS).token_ids


def test_all_entries_with_prefetch_equal_full(backbone, prompt_ids, full_tokens):
    """Selected at t0 - d: every entry visible then; the d steps' newborns join at the swap -> every entry."""
    model, tokenizer = backbone
    session = Session(model, tokenizer, mode="all", tau=8, prefetch_steps=3, chunk_size=CHUNK)
    out = session.generate(prompt_ids, NEW_TOKENS)
    assert out.token_ids == full_tokens
    stats = session.stats
    assert stats.triggers == 1 + (NEW_TOKENS - 1) // 8  # the first synchronous, four prefetched
    assert stats.resident_entries == stats.csa_entries
    assert stats.prefetch_seconds > 0


def test_oracle_with_lead_is_lossless(backbone, prompt_ids, full_tokens):
    """The oracle told that its set serves t0 + d + 1 .. t0 + d + tau (``TriggerState.lead``) reads exactly what
    full decoding reads there; without the lead it would miss entries and change the tokens."""
    model, tokenizer = backbone
    recorder = Session(model, tokenizer, mode="full", chunk_size=CHUNK)
    _, picks = record_native_picks(recorder, prompt_ids, NEW_TOKENS)
    session = Session(model, tokenizer, policy=OraclePolicy(picks, tau=4), tau=4, prefetch_steps=2,
                      chunk_size=CHUNK)
    out = session.generate(prompt_ids, NEW_TOKENS)
    assert out.token_ids == full_tokens
    assert session.stats.resident_entries < session.stats.csa_entries


def test_memory_indexer_with_pool_keys_and_prefetch_is_lossless_when_it_fetches_everything(backbone, prompt_ids,
                                                                                           full_tokens):
    """lsa with the memory keys kept in the pool: the helper thread streams them for its trigger. Threshold ~0
    fetches every entry, so the tokens must be full decoding's."""
    from lsa_runtime.backbone import default_memory_layers
    from lsa_runtime.memory_indexer import MemoryIndexer, MemoryIndexerConfig

    model, tokenizer = backbone
    config = MemoryIndexerConfig.from_backbone_config(model.config, default_memory_layers(model.config),
                                                      rank=model.config.q_lora_rank, tau=8)
    indexer = MemoryIndexer.init_from_native(model, config)
    session = Session(model, tokenizer, mode="lsa", indexer=indexer, threshold=1e-6, tau=8, prefetch_steps=3,
                      memory_keys="pool", chunk_size=CHUNK)
    assert session.generate(prompt_ids, NEW_TOKENS).token_ids == full_tokens
    stats = session.stats
    assert stats.resident_entries == stats.csa_entries and stats.triggers == 1 + (NEW_TOKENS - 1) // 8
    assert stats.device_bytes["memory_index_keys"] == 0  # streamed per trigger, not held


def every_third(state):
    return torch.arange(0, state.n_visible, 3)


def test_swapped_rows_are_the_pool_rows_of_selected_and_newborn_entries(backbone, prompt_ids):
    model, tokenizer = backbone
    seen = []

    def select(state):
        seen.append((state.n_visible, state.lead))
        return every_third(state)

    tau, d = 8, 3
    session = Session(model, tokenizer, policy=GivenEntriesPolicy(select), tau=tau, prefetch_steps=d,
                      chunk_size=CHUNK)
    steps = 1 + 2 * tau  # ends on the second window boundary, right after a swap
    session.generate(prompt_ids, steps + 1)
    assert [lead for _, lead in seen] == [0, d, d]
    n_start = seen[-1][0]  # entries visible when the last prefetch started
    residency, pool = session.residency, session.cold_pool
    n_now = pool.count(residency.layers[0])
    assert n_now > n_start  # entries were born during the lead (the test's premise)
    want = torch.cat([torch.arange(0, n_start, 3), torch.arange(n_start, n_now)])
    assert torch.equal(residency.ids, want)
    for layer in residency.layers:
        for name in ("compressor", "indexer"):
            assert torch.equal(residency.rows(layer, name), pool.host_rows(layer, name)[want])


def test_a_slow_helper_changes_timing_not_tokens(backbone, prompt_ids):
    model, tokenizer = backbone

    def run(delay):
        def select(state):
            time.sleep(delay)
            return every_third(state)

        session = Session(model, tokenizer, policy=GivenEntriesPolicy(select), tau=8, prefetch_steps=2,
                          chunk_size=CHUNK)
        return session.generate(prompt_ids, NEW_TOKENS).token_ids, session.stats

    fast, _ = run(0.0)
    slow, stats = run(0.5)  # far longer than two decode steps of the tiny model: the swap must wait
    assert slow == fast
    assert stats.prefetch_wait_seconds > 0.3


def test_helper_errors_reach_the_caller(backbone, prompt_ids):
    model, tokenizer = backbone
    calls = []

    def select(state):
        calls.append(state)
        if len(calls) > 1:  # the first trigger (synchronous) is fine; the first prefetch selects too far
            return torch.tensor([state.n_visible + 5])
        return every_third(state)

    session = Session(model, tokenizer, policy=GivenEntriesPolicy(select), tau=8, prefetch_steps=2,
                      chunk_size=CHUNK)
    with pytest.raises(SessionError, match="outside the"):
        session.generate(prompt_ids, NEW_TOKENS)


@pytest.mark.parametrize("bad", [-1, 8, 1.5])
def test_prefetch_steps_must_be_below_tau(backbone, bad):
    model, tokenizer = backbone
    with pytest.raises(SessionError, match=r"prefetch_steps \(--prefetch-steps\) must be an integer in 0..tau-1"):
        Session(model, tokenizer, mode="all", tau=8, prefetch_steps=bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the helper's CUDA stream and zero-copy gather need a GPU")
def test_prefetch_on_a_gpu_is_lossless_and_holds_the_pool_rows(prompt_ids):
    """On a GPU the helper works on its own stream (memory-indexer towers as a CUDA graph, zero-copy gathers
    from the pinned pool) while decoding goes on: a memory indexer that fetches every entry (threshold ~0) must
    still give full decoding's tokens, and a partial set must hold exactly the pool's rows."""
    from lsa_runtime.backbone import default_memory_layers
    from lsa_runtime.memory_indexer import MemoryIndexer, MemoryIndexerConfig

    model, tokenizer = load_backbone("tiny", device="cuda", dtype=torch.float32)
    full = Session(model, tokenizer, mode="full", chunk_size=CHUNK).generate(prompt_ids, NEW_TOKENS).token_ids
    config = MemoryIndexerConfig.from_backbone_config(model.config, default_memory_layers(model.config),
                                                      rank=model.config.q_lora_rank, tau=8)
    indexer = MemoryIndexer.init_from_native(model, config)
    session = Session(model, tokenizer, mode="lsa", indexer=indexer, threshold=1e-6, tau=8, prefetch_steps=3,
                      chunk_size=CHUNK)
    assert session.generate(prompt_ids, NEW_TOKENS).token_ids == full
    assert session.stats.resident_entries == session.stats.csa_entries

    session = Session(model, tokenizer, policy=GivenEntriesPolicy(every_third), tau=8, prefetch_steps=3,
                      chunk_size=CHUNK)
    session.generate(prompt_ids, 2 + 2 * 8)  # ends right after the second swap
    torch.cuda.synchronize()
    residency, pool = session.residency, session.cold_pool
    for layer in residency.layers:
        for name in ("compressor", "indexer"):
            want = pool.host_rows(layer, name)[residency.ids]
            assert torch.equal(residency.rows(layer, name).cpu(), want)
        assert residency.count < pool.count(layer)


def test_stream_prefetcher_runs_the_job_at_launch_or_at_finish():
    """StreamPrefetcher (the static step's): start only takes the job; launch runs it once (a second launch does
    nothing); finish returns its result, running it first when it was never launched; its error is raised at
    finish; a cancelled job that never ran is dropped unrun; only one job at a time."""
    from lsa_runtime.prefetch import StreamPrefetcher

    calls = []
    prefetcher = StreamPrefetcher()
    prefetcher.start(lambda: calls.append("a") or 7, "cpu")
    assert prefetcher.pending and calls == []
    with pytest.raises(RuntimeError, match="already in flight"):
        prefetcher.start(lambda: 0, "cpu")
    prefetcher.launch()
    prefetcher.launch()
    assert calls == ["a"]
    finished = prefetcher.finish()
    assert finished.result == 7 and calls == ["a"] and not prefetcher.pending
    prefetcher.start(lambda: calls.append("b") or 8, "cpu")  # never launched: finish runs it, its time is waited
    finished = prefetcher.finish()
    assert finished.result == 8 and calls == ["a", "b"] and finished.wait_seconds >= finished.helper_seconds

    def fails():
        raise ValueError("selection out of range")

    prefetcher.start(fails, "cpu")
    prefetcher.launch()  # kept, not raised on the decode step that launched it
    with pytest.raises(ValueError, match="selection out of range"):
        prefetcher.finish()
    assert not prefetcher.pending
    prefetcher.start(lambda: calls.append("c"), "cpu")
    prefetcher.close()
    prefetcher.launch()
    assert calls == ["a", "b"] and not prefetcher.pending
    with pytest.raises(RuntimeError, match="no prefetch in flight"):
        prefetcher.finish()
