"""Batched decoding: several sequences in one forward per step (continuous batching) give each sequence what it
gets decoding alone. The oracle is the single-sequence path (a fresh Session per prompt), itself tested against
transformers' generate in test_session.py."""

import pytest
import torch

from lsa_runtime.backbone import cache_kwarg, default_memory_layers
from lsa_runtime.batching import forward_rows, install_row_attention
from lsa_runtime.memory_indexer import MemoryIndexer, MemoryIndexerConfig
from lsa_runtime.policies import RecentPolicy
from lsa_runtime.session import Session, SessionConfig, SessionError

pytestmark = pytest.mark.usefixtures("one_thread")

TAU = 16
LENGTHS = (200, 333, 97, 260)  # different lengths: different positions, compressor phases and trigger steps
NEW = 40


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(3, 1024, (n,), generator=gen).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def indexer(backbone):
    model, _ = backbone
    config = MemoryIndexerConfig.from_backbone_config(model.config, default_memory_layers(model.config),
                                                      rank=model.config.q_lora_rank, tau=TAU)
    return MemoryIndexer.init_from_native(model, config)


def _alone(model, tokenizer, options, indexer, prompt, max_new=NEW):
    session = Session(model, tokenizer, indexer=indexer, **options)
    return session.generate(prompt, max_new_tokens=max_new, stop_at_eos=False)


def test_forward_rows_equals_each_sequence_alone(backbone, prompts):
    """Logits of one batched step over three sequences at different positions == each sequence's own step."""
    model, _ = backbone
    from transformers import DynamicCache

    caches, singles, positions = [], [], []
    for ids in prompts[:3]:
        for target in (caches, singles):
            cache = DynamicCache(config=model.config)
            with torch.no_grad():
                model(input_ids=torch.tensor([ids]), use_cache=True, **{cache_kwarg(): cache})
            target.append(cache)
        positions.append(len(ids))
    tokens = [17, 401, 5]
    install_row_attention(model)
    with torch.no_grad():
        batched = forward_rows(model, caches, tokens, positions, torch.device("cpu"))
        for r, (cache, token, position) in enumerate(zip(singles, tokens, positions)):
            alone = model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[position]]), use_cache=True,
                          logits_to_keep=1, **{cache_kwarg(): cache}).logits[0, -1]
            torch.testing.assert_close(batched[r], alone, rtol=1e-5, atol=1e-5)
    # the caches advanced as the single ones did (a next step agrees too)
    with torch.no_grad():
        again = forward_rows(model, caches, [3, 3, 3], [p + 1 for p in positions], torch.device("cpu"))
        for r, (cache, position) in enumerate(zip(singles, positions)):
            alone = model(input_ids=torch.tensor([[3]]), position_ids=torch.tensor([[position + 1]]), use_cache=True,
                          logits_to_keep=1, **{cache_kwarg(): cache}).logits[0, -1]
            torch.testing.assert_close(again[r], alone, rtol=1e-5, atol=1e-5)


# random and oracle run in the slow suite only (-m slow): 34 s of the default suite's CI budget, and
# test_evaluate's batched-vs-alone test decodes both modes batched in the default suite
@pytest.mark.parametrize("options", [
    pytest.param({"mode": "full"}, id="full"),
    pytest.param({"mode": "lsa", "tau": TAU}, id="lsa"),
    pytest.param({"mode": "lsa", "tau": TAU, "memory_keys": "pool", "pool_storage": "fp8"}, id="lsa-poolkeys-fp8"),
    pytest.param({"mode": "random", "tau": TAU, "budget": 24, "seed": 3}, id="random", marks=pytest.mark.slow),
    pytest.param({"mode": "hisparse", "budget": 40}, id="hisparse"),
    pytest.param({"mode": "oracle", "tau": TAU, "budget": 24}, id="oracle", marks=pytest.mark.slow),
])
def test_batch_gives_each_sequence_its_tokens_and_stats_alone(backbone, prompts, indexer, options):
    """Four prompts, at most three decoding together (the fourth joins when one finishes): the same greedy
    tokens, finish reasons and per-sequence stats (triggers, selections, fetches, bytes) as decoding alone."""
    model, tokenizer = backbone
    indexer_arg = indexer if options["mode"] == "lsa" else None
    session = Session(model, tokenizer, indexer=indexer_arg, max_batch=3, **options)
    batch = session.generate(prompts, max_new_tokens=NEW, stop_at_eos=False)
    assert len(batch) == len(prompts)
    for prompt, got in zip(prompts, batch):
        want = _alone(model, tokenizer, options, indexer_arg, prompt)
        assert got.token_ids == want.token_ids
        assert got.prompt_tokens == len(prompt) and got.finish_reason == want.finish_reason == "length"
        a, b = got.stats, want.stats
        assert (a.context_tokens, a.csa_entries, a.resident_entries, a.device_bytes, a.triggers,
                a.selected_per_trigger, a.entries_fetched, a.fetch_bytes_to_device, a.cold_pool_bytes) == \
               (b.context_tokens, b.csa_entries, b.resident_entries, b.device_bytes, b.triggers,
                b.selected_per_trigger, b.entries_fetched, b.fetch_bytes_to_device, b.cold_pool_bytes)
    if options["mode"] in ("lsa", "random", "oracle"):
        assert all(g.stats.triggers == 3 for g in batch)  # after prefill, then at steps 16 and 32 of 40


def test_stream_interleaves_sequences_and_eos_leaves_the_batch(backbone, prompts):
    """stream() yields every sequence's tokens in its own order, tagged by prompt index; a sequence that meets its
    end-of-sequence token leaves while the others go on (here: each prompt's own greedy 6th token made EOS)."""
    model, tokenizer = backbone
    alone = [_alone(model, tokenizer, {"mode": "full"}, None, p, 12).token_ids for p in prompts[:3]]
    session = Session(model, tokenizer, mode="full", max_batch=3)
    pieces = list(session.stream(prompts[:3], max_new_tokens=12, stop_at_eos=False))
    order = [p.sequence for p in pieces]
    assert order[:3] == [0, 1, 2] and sorted(set(order)) == [0, 1, 2]
    for i in range(3):
        assert [p.token_id for p in pieces if p.sequence == i] == alone[i]

    eos = alone[1][5]
    old = model.config.eos_token_id
    model.config.eos_token_id = eos
    try:
        out = Session(model, tokenizer, mode="full", max_batch=3).generate(prompts[:3], max_new_tokens=12)
    finally:
        model.config.eos_token_id = old
    for i, got in enumerate(out):
        cut = alone[i].index(eos) + 1 if eos in alone[i] else 12
        assert got.token_ids == alone[i][:cut]
        assert got.finish_reason == ("eos" if eos in alone[i] else "length")
    assert out[1].finish_reason == "eos" and len(out[1].token_ids) <= 6


def test_policies_per_prompt_and_bad_input(backbone, prompts):
    model, tokenizer = backbone
    session = Session(model, tokenizer, mode="recent", budget=16, tau=TAU)
    # one policy per prompt: each sequence gets the budget it was given
    out = session.generate(prompts[:2], max_new_tokens=20, stop_at_eos=False,
                           policies=[RecentPolicy(8), RecentPolicy(30)])
    assert out[0].stats.selected_per_trigger[0] == 8 and out[1].stats.selected_per_trigger[0] == 30
    with pytest.raises(SessionError, match="2 policies for 3 prompts"):
        session.generate(prompts[:3], policies=[RecentPolicy(8)] * 2)
    with pytest.raises(SessionError, match="prompt 1: token id 5000 is outside"):
        session.generate([prompts[0], [1, 5000]])
    with pytest.raises(SessionError, match="give one prompt, not a list"):
        session.generate(prompts[:2], keep_context=True)
    with pytest.raises(SessionError, match="max_batch"):
        Session(model, tokenizer, mode="full", max_batch=0)
    # a list leaves no conversation to continue
    with pytest.raises(SessionError, match="with one prompt"):
        session.generate([4, 5], keep_context=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_on_a_gpu_gives_each_sequence_its_tokens_alone(prompts, dtype):
    """On the GPU, with decode graphs (a Session's default there): four prompts, three at a time, full and lsa, the
    greedy tokens of each sequence decoded alone. In bf16 a [B, d] product may round differently from [1, d];
    the test prints how many tokens agree and requires every sequence's first 8 tokens to."""
    from lsa_runtime.backbone import load_backbone

    model, tokenizer = load_backbone("tiny", dtype=dtype, device="cuda")
    config = MemoryIndexerConfig.from_backbone_config(model.config, default_memory_layers(model.config),
                                                      rank=model.config.q_lora_rank, tau=TAU)
    indexer = MemoryIndexer.init_from_native(model, config)
    for options in ({"mode": "full"}, {"mode": "lsa", "tau": TAU}):
        indexer_arg = indexer if options["mode"] == "lsa" else None
        batch = Session(model, tokenizer, indexer=indexer_arg, max_batch=3, **options).generate(
            prompts, max_new_tokens=NEW, stop_at_eos=False)
        agree = []
        for prompt, got in zip(prompts, batch):
            want = _alone(model, tokenizer, options, indexer_arg, prompt).token_ids
            same = next((i for i, (a, b) in enumerate(zip(got.token_ids, want)) if a != b), NEW)
            agree.append(same)
            assert same >= 8 if dtype == torch.bfloat16 else got.token_ids == want
        print(f"batched on {torch.cuda.get_device_name()} {dtype} {options['mode']}: tokens equal to decoding "
              f"alone before the first difference {agree} of {NEW}")


def test_a_consumer_that_stops_early_leaves_no_helper_behind(backbone, prompts, indexer):
    """stream() closed after the first token (prefetch on: every sequence owns a helper thread): the sequences
    that started are finished ("stopped"), their helpers closed; the Session decodes normally afterwards."""
    import threading

    model, tokenizer = backbone
    session = Session(model, tokenizer, indexer=indexer, mode="lsa", tau=TAU, prefetch_steps=2, max_batch=2)
    before = {t.name for t in threading.enumerate()}
    stream = session.stream(prompts[:3], max_new_tokens=30, stop_at_eos=False)
    first = next(stream)
    stream.close()
    assert first.sequence == 0
    assert [job.finish_reason for job in session._last_jobs[:1]] == ["stopped"]
    assert all(job.state.prefetcher is None for job in session._last_jobs if job.state is not None)
    leftover = {t.name for t in threading.enumerate()} - before
    assert not any(name.startswith("fm-index-prefetch") for name in leftover)
    again = session.generate(prompts[:2], max_new_tokens=20, stop_at_eos=False)
    alone = [_alone(model, tokenizer, {"mode": "lsa", "tau": TAU, "prefetch_steps": 2}, indexer, p, 20).token_ids
             for p in prompts[:2]]
    assert [g.token_ids for g in again] == alone


def test_sampling_and_the_maximum_context_per_sequence(backbone, prompts):
    """Sampling: each sequence draws from its own generator seeded as a lone run's, so seeded sampling gives the
    same tokens batched, per-sequence rows or the static step (its rows' logits cloned, not the greedy argmax). The
    model's maximum context ends each sequence at its own step ("max_position")."""
    model, tokenizer = backbone
    options = {"mode": "recent", "budget": 32, "tau": TAU}
    for static in (False, True):
        sampled = Session(model, tokenizer, max_batch=4, static_decode=static, **options).generate(
            prompts, max_new_tokens=24, temperature=0.9, top_k=50, seed=7, stop_at_eos=False)
        for prompt, got in zip(prompts, sampled):
            alone = Session(model, tokenizer, **options).generate(prompt, max_new_tokens=24, temperature=0.9,
                                                                   top_k=50, seed=7, stop_at_eos=False)
            assert got.token_ids == alone.token_ids, static
    limit = 345  # prompts of 200, 333, 97, 260 tokens: the second stops after 13 tokens, the others run 30
    session = Session(model, tokenizer, max_batch=4, **options)
    session.max_positions = limit
    out = session.generate(prompts, max_new_tokens=30, stop_at_eos=False)
    for prompt, got in zip(prompts, out):
        alone = Session(model, tokenizer, **options)
        alone.max_positions = limit
        want = alone.generate(prompt, max_new_tokens=30, stop_at_eos=False)
        assert (got.token_ids, got.finish_reason) == (want.token_ids, want.finish_reason)
    assert [g.finish_reason for g in out] == ["length", "max_position", "length", "length"]
    assert len(out[1].token_ids) == limit - len(prompts[1]) + 1


def test_static_decode_gives_each_sequence_its_stock_tokens_and_stats(backbone, prompts):
    """Session(static_decode=True): four prompts in three rows of the static-shape step (the fourth joins the row
    the first finished sequence leaves) give each sequence the stock full path's greedy tokens decoding alone, and,
    written back into their caches, the same footprint stats; keep_context continues from the written-back cache;
    a sequence that meets EOS leaves its row early."""
    model, tokenizer = backbone
    session = Session(model, tokenizer, mode="full", max_batch=3, static_decode=True)
    batch = session.generate(prompts, max_new_tokens=NEW, stop_at_eos=False)
    for prompt, got in zip(prompts, batch):
        want = _alone(model, tokenizer, {"mode": "full"}, None, prompt)
        assert got.token_ids == want.token_ids and got.finish_reason == "length"
        a, b = got.stats, want.stats
        assert (a.context_tokens, a.csa_entries) == (b.context_tokens, b.csa_entries)
        # the entries' bytes are the stock cache's (copies, none sharing the static state's storage); the stock
        # window and open-window buffers are views of larger concatenations (counted whole), the written-back
        # ones exact copies
        for kind in ("csa_kv", "csa_index_keys", "hca"):
            assert a.device_bytes[kind] == b.device_bytes[kind] > 0
        for kind in ("window", "pending"):
            assert 0 < a.device_bytes[kind] <= b.device_bytes[kind]
        assert a.full_bytes["csa_kv"] == b.full_bytes["csa_kv"]

    stock = Session(model, tokenizer, mode="full")
    first = [stock.generate(prompts[2], max_new_tokens=10, stop_at_eos=False),
             stock.generate([7, 8, 9], max_new_tokens=10, stop_at_eos=False, keep_context=True)]
    single = Session(model, tokenizer, mode="full", static_decode=True)
    second = [single.generate(prompts[2], max_new_tokens=10, stop_at_eos=False),
              single.generate([7, 8, 9], max_new_tokens=10, stop_at_eos=False, keep_context=True)]
    assert [g.token_ids for g in second] == [g.token_ids for g in first]
    assert single.stats.context_tokens == stock.stats.context_tokens == 97 + 10 + 3 + 10 - 1

    alone = [_alone(model, tokenizer, {"mode": "full"}, None, p, 12).token_ids for p in prompts[:3]]
    eos = alone[1][5]
    old = model.config.eos_token_id
    model.config.eos_token_id = eos
    try:
        out = Session(model, tokenizer, mode="full", max_batch=2, static_decode=True).generate(prompts[:3],
                                                                                              max_new_tokens=12)
    finally:
        model.config.eos_token_id = old
    for i, got in enumerate(out):
        cut = alone[i].index(eos) + 1 if eos in alone[i] else 12
        assert got.token_ids == alone[i][:cut]
    with pytest.raises(SessionError, match="does not run mode 'hisparse'"):
        Session(model, tokenizer, mode="hisparse", budget=16, static_decode=True)
    with pytest.raises(SessionError, match="static_decode must be True, False or None"):
        Session(model, tokenizer, mode="full", static_decode=1)
    # the default (None) takes the static step on one GPU only: on a CPU the stock path, unless asked
    assert not Session(model, tokenizer, mode="full").static_decode
    assert not Session(model, tokenizer, mode="recent", budget=16).static_decode
    assert Session(model, tokenizer, mode="full", static_decode=True).static_decode
    from lsa_runtime.policies import record_native_picks  # its hook on the stock indexer would record nothing

    with pytest.raises(SessionError, match="record_native_picks needs static_decode=False"):
        record_native_picks(Session(model, tokenizer, mode="full", static_decode=True), prompts[2], 4)


def test_a_joined_row_holds_the_sequence_kv_once(backbone, prompts):
    """StaticRunner.join releases the prefilled cache's window keys and compressed entries (the row holds them) and
    leave writes them back: the stock model then continues from the cache with the logits of a twin cache that
    never joined."""
    from transformers import DynamicCache

    from lsa_runtime.static_runner import StaticRunner

    model, _ = backbone
    caches = [DynamicCache(config=model.config) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(input_ids=torch.tensor([prompts[1]]), use_cache=True, **{cache_kwarg(): cache})
    runner = StaticRunner(model, rows=2, capacity=len(prompts[1]) + 8, graph=False)
    row = runner.join(caches[0])
    held = [layer.keys.shape[2] for layer in caches[0].layers]
    held += [e.shape[1] for layer in caches[0].layers for e in getattr(layer, "compressed_kv", {}).values()]
    assert held and set(held) == {0}
    assert any(e.shape[1] for layer in caches[1].layers for e in getattr(layer, "compressed_kv", {}).values())
    runner.leave(row, caches[0])
    with torch.no_grad():
        got, want = (model(input_ids=torch.tensor([[11]]), use_cache=True, **{cache_kwarg(): c}).logits
                     for c in caches)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


BF16_TIE = 0.25  # logits of two tokens closer than this are a tie a bf16 [B, d] product may break either way


def _stock_logits_before(model, prompt, tokens, upto):
    """The stock model's next-token logits after ``prompt + tokens[:upto]``, decoded token by token (the alone path)."""
    from transformers import DynamicCache

    cache, device = DynamicCache(config=model.config), model.device
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True, **{cache_kwarg(): cache})
        for token in tokens[:upto]:
            out = model(input_ids=torch.tensor([[token]], device=device), use_cache=True, **{cache_kwarg(): cache})
    return out.logits[0, -1].float()


def _check_static_decode(model, tokenizer, prompts, exact):
    """Four prompts in three rows through ``Session(static_decode=True)`` against each decoded alone (stock path).
    ``exact``: the same tokens. Otherwise (bf16) the sequences may part where the alone path's logits are a near tie:
    at the first difference, the two tokens' logits (stock, same prefix) are within BF16_TIE. Returns where each
    sequence first differs (NEW if never)."""
    session = Session(model, tokenizer, mode="full", max_batch=3, static_decode=True)
    batch = session.generate(prompts, max_new_tokens=NEW, stop_at_eos=False)
    agree = []
    for prompt, got in zip(prompts, batch):
        want = _alone(model, tokenizer, {"mode": "full"}, None, prompt).token_ids
        same = next((i for i, (a, b) in enumerate(zip(got.token_ids, want)) if a != b), NEW)
        agree.append(same)
        if exact:
            assert got.token_ids == want
        elif same < NEW:
            logits = _stock_logits_before(model, prompt, want, same)
            gap = abs(float(logits[want[same]] - logits[got.token_ids[same]]))
            assert gap <= BF16_TIE, f"step {same}: {want[same]} vs {got.token_ids[same]}, logits {gap:.3f} apart"
    return agree


def test_static_by_default_where_it_was_tested_on_a_gpu():
    """On one GPU the static step is the default in mode full and in the trigger modes with a budget (slots bounded),
    with the model-dtype pool and device memory keys; not for lsa without a budget (a slot per entry), hisparse,
    all, an fp8 pool or memory keys streamed from the pool."""
    from lsa_runtime.session import static_by_default

    cases = [("full", None, {}, True), ("lsa", 64, {}, True), ("recent", 64, {}, True), ("random", 64, {}, True),
             ("oracle", 64, {}, True), ("lsa", None, {}, False), ("hisparse", 64, {}, False), ("all", None, {}, False),
             ("recent", 64, {"pool_storage": "fp8"}, False), ("lsa", 64, {"memory_keys": "pool"}, False)]
    for mode, budget, more, want in cases:
        assert static_by_default(SessionConfig(mode=mode, budget=budget, **more)) is want, (mode, budget, more)


def test_static_decode_in_bf16_parts_from_the_alone_path_only_at_near_ties(prompts):
    """bf16 on a CPU (no graph): the criterion the GPU test below applies, on the same four prompts."""
    from lsa_runtime.backbone import load_backbone

    model, tokenizer = load_backbone("tiny", dtype=torch.bfloat16)
    agree = _check_static_decode(model, tokenizer, prompts, exact=False)
    assert max(agree) == NEW  # rows part only at near ties (here one of four, at a 0.016 gap); most never do


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_decode_on_a_gpu_replays_one_graph(prompts, dtype):
    """On the GPU the static path's step is one CUDA graph: four prompts, three rows; fp32: the stock path's tokens
    decoding alone; bf16: the same tokens up to a near tie (_check_static_decode)."""
    from lsa_runtime.backbone import load_backbone

    model, tokenizer = load_backbone("tiny", dtype=dtype, device="cuda")
    assert Session(model, tokenizer, mode="full").static_decode  # the defaults on one GPU
    assert Session(model, tokenizer, mode="recent", budget=16).static_decode
    assert not Session(model, tokenizer, mode="recent", budget=16, pool_storage="fp8").static_decode
    agree = _check_static_decode(model, tokenizer, prompts, exact=dtype == torch.float32)
    print(f"static decode on {torch.cuda.get_device_name()} {dtype}: tokens equal to the stock path alone before "
          f"the first difference {agree} of {NEW}")


def test_capacity_buckets_and_static_compile_checks(backbone):
    """static_compile rounds a call's capacity up to a bucket (four per doubling, at least 4,096 tokens), and needs
    the static step."""
    from lsa_runtime.session import capacity_bucket

    assert [capacity_bucket(t) for t in (1, 4096, 4097, 9000, 16385, 300000, 524288, 524289)] == \
        [4096, 4096, 8192, 12288, 20480, 327680, 524288, 655360]
    assert all(t <= capacity_bucket(t) <= 1.25 * t for t in range(16384, 600000, 997))
    model, tokenizer = backbone
    with pytest.raises(SessionError, match="static_compile must be True or False"):
        Session(model, tokenizer, mode="full", static_compile=1)
    with pytest.raises(SessionError, match="needs static_decode"):
        Session(model, tokenizer, mode="full", static_decode=False, static_compile=True)
    with pytest.raises(SessionError, match="which this Session does not take"):
        Session(model, tokenizer, mode="full", static_compile=True)  # a CPU: no static step by default


@pytest.mark.slow
def test_session_static_compile_gives_the_stock_tokens(prompts):
    """Session(static_decode=True, static_compile=True) on a CPU: the compiled static step (capacity bucketed) gives
    each of three prompts, in two rows, the stock path's greedy tokens decoding alone (prefill stays eager:
    test_static_decode.py). Slow: inductor compiles the layer kinds (1.7 min with a cold cache on 2 cores)."""
    from lsa_runtime.backbone import load_backbone
    from lsa_runtime.compiled_step import uncompile_static_step

    model, tokenizer = load_backbone("tiny", dtype=torch.float32)
    try:
        session = Session(model, tokenizer, mode="full", max_batch=2, static_decode=True, static_compile=True)
        batch = session.generate(prompts[:3], max_new_tokens=16, stop_at_eos=False)
        for prompt, got in zip(prompts[:3], batch):
            want = _alone(model, tokenizer, {"mode": "full", "static_decode": False}, None, prompt, 16)
            assert got.token_ids == want.token_ids
    finally:
        uncompile_static_step(model)
