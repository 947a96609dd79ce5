"""Session fidelity: full mode equals transformers' own generate; LSA with every entry resident equals full mode;
the native top-k is restricted to resident entries; a real (in-process) export decodes under a footprint < 1."""

import json

import pytest
import torch

from lsa_runtime.backbone import config_hash, default_memory_layers
from lsa_runtime.memory_indexer import MemoryIndexer, MemoryIndexerConfig
from lsa_runtime.policies import GivenEntriesPolicy, MemoryIndexerPolicy
from lsa_runtime.session import Session, SessionError

PROMPT_TOKENS = 640  # 20 sliding windows, 160 CSA entries, 20 HCA entries
NEW_TOKENS = 48
TAU = 16
CHUNK = 128  # 5 prefill chunks


pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def prompt_ids():
    return torch.randint(3, 1024, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def hf_tokens(backbone, prompt_ids):
    model, _ = backbone
    out = model.generate(prompt_ids.unsqueeze(0), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, PROMPT_TOKENS:].tolist()


@pytest.fixture(scope="module")
def full_run(backbone, prompt_ids):
    model, tokenizer = backbone
    session = Session(model, tokenizer, mode="full", chunk_size=CHUNK)
    return session.generate(prompt_ids, max_new_tokens=NEW_TOKENS), session


@pytest.fixture(scope="module")
def native_export(backbone, tmp_path_factory):
    """A real export: the memory indexer initialised from the backbone's own indexer path, saved and reloaded."""
    model, _ = backbone
    config = MemoryIndexerConfig.from_backbone_config(model.config, default_memory_layers(model.config),
                                                      rank=model.config.q_lora_rank, tau=TAU)
    directory = tmp_path_factory.mktemp("export") / "native"
    MemoryIndexer.init_from_native(model, config).save_export(directory)
    return directory


def test_full_mode_equals_transformers_generate(full_run, hf_tokens):
    out, session = full_run
    assert len(hf_tokens) == NEW_TOKENS
    assert out.token_ids == hf_tokens
    stats = session.stats
    assert stats.footprint_ratio == 1.0 and stats.triggers == 0
    # full decoding holds every CSA entry: 5 CSA layers x N//4 entries x (head_dim + index_head_dim) fp32
    n_tokens = PROMPT_TOKENS + NEW_TOKENS - 1  # the last sampled token is not run through the model
    assert stats.device_bytes["csa_kv"] == 5 * (n_tokens // 4) * 64 * 4
    assert stats.device_bytes["csa_index_keys"] == 5 * (n_tokens // 4) * 32 * 4


def test_lsa_with_every_entry_fetched_equals_full(backbone, prompt_ids, full_run, native_export):
    model, tokenizer = backbone
    session = Session(model, tokenizer, mode="lsa", indexer=native_export, threshold=1e-6, tau=TAU,
                      chunk_size=CHUNK)
    out = session.generate(prompt_ids, max_new_tokens=NEW_TOKENS)
    stats = session.stats
    # the premise: this threshold really made every entry resident (decode-born ones included)
    assert stats.resident_entries == stats.csa_entries == (PROMPT_TOKENS + NEW_TOKENS - 1) // 4
    assert out.token_ids == full_run[0].token_ids
    # one trigger when prefill ends, then every tau decode steps (NEW_TOKENS - 1 tokens run through the model)
    assert stats.triggers == 1 + (NEW_TOKENS - 1) // TAU
    # the first trigger fetches every prompt entry, later ones only what is not resident: nothing
    assert stats.entries_fetched == PROMPT_TOKENS // 4
    assert stats.fetch_bytes_to_device == 5 * (PROMPT_TOKENS // 4) * (64 + 32) * 4


def test_page_recall_resides_whole_pages_and_with_every_page_equals_full(backbone, prompt_ids, full_run,
                                                                         native_export):
    model, tokenizer = backbone
    # nothing passes this threshold: the pages are the tail's (16 entries = 2 pages of 8) and the most recent others
    paged = Session(model, tokenizer, mode="lsa", indexer=native_export, threshold=0.999999, tau=TAU,
                    chunk_size=CHUNK, keep_recent=16, page_size=8, max_pages=5, static_decode=False)
    paged.generate(prompt_ids, max_new_tokens=NEW_TOKENS)
    first = paged.stats.selected_per_trigger[0]
    assert first == 5 * 8 and paged.stats.entries_fetched >= first
    # every page resident: the same tokens as full decoding
    every = Session(model, tokenizer, mode="lsa", indexer=native_export, threshold=0.999999, tau=TAU,
                    chunk_size=CHUNK, keep_recent=0, page_size=8, max_pages=PROMPT_TOKENS // 4 // 8 + 4,
                    static_decode=False)
    out = every.generate(prompt_ids, max_new_tokens=NEW_TOKENS)
    assert every.stats.resident_entries == every.stats.csa_entries
    assert out.token_ids == full_run[0].token_ids


def test_all_mode_equals_full(backbone, prompt_ids, full_run):
    model, tokenizer = backbone
    session = Session(model, tokenizer, mode="all", tau=TAU, chunk_size=CHUNK)
    assert session.generate(prompt_ids, max_new_tokens=NEW_TOKENS).token_ids == full_run[0].token_ids


def test_native_topk_is_restricted_to_resident_entries(backbone, prompt_ids):
    """Independent oracle: at the first decode step, layer 2 (the first CSA layer: its input is the same in full
    and LSA decoding) must pick the top-k of the *stock* indexer scores restricted to the resident set."""
    model, tokenizer = backbone
    decoder = model.model
    stock_scores = []

    def keep_decode_scores(module, args, output):
        if output.shape[1] == 1:
            stock_scores.append(output[0, 0].clone())

    handle = decoder.layers[2].self_attn.compressor.indexer.scorer.register_forward_hook(keep_decode_scores)
    try:
        Session(model, tokenizer, mode="full", chunk_size=CHUNK).generate(prompt_ids, max_new_tokens=2)
    finally:
        handle.remove()
    scores = stock_scores[0]  # [T]: every prompt entry
    assert scores.numel() == PROMPT_TOKENS // 4

    resident = torch.randperm(PROMPT_TOKENS // 4, generator=torch.Generator().manual_seed(3))[:40].sort().values
    policy = GivenEntriesPolicy(lambda state: resident)
    session = Session(model, tokenizer, policy=policy, tau=TAU, chunk_size=CHUNK)
    stream = session.stream(prompt_ids, max_new_tokens=NEW_TOKENS)
    next(stream)  # token 0 comes from prefill
    next(stream)  # token 1 needed the first decode forward
    picks, candidates = session.last_picks()[2]
    assert torch.equal(candidates, resident)
    k = model.config.index_topk
    expected = resident[scores[resident].topk(k).indices].sort().values
    assert torch.equal(picks, expected)
    # and the unrestricted choice differs: the restriction matters
    assert not torch.equal(scores.topk(k).indices.sort().values, expected)

    # at every later step and every CSA layer the picks stay inside the candidates, which are the resident set
    # (unless a trigger changed the set after that forward)
    changes = len(session.residency.changes)
    for _ in stream:
        changed, changes = len(session.residency.changes) != changes, len(session.residency.changes)
        for layer, (picks, candidates) in session.last_picks().items():
            assert candidates is not None and torch.isin(picks, candidates).all()
            assert torch.equal(candidates, session.residency.ids) or changed
            assert picks.numel() == min(k, candidates.numel())


def test_lsa_with_exported_indexer_saves_memory(backbone, prompt_ids, native_export):
    model, tokenizer = backbone
    session = Session.from_pretrained("tiny", indexer=native_export, mode="lsa", threshold=0.9, tau=TAU,
                                      chunk_size=CHUNK, device="cpu", dtype=torch.float32)
    assert isinstance(session.policy, MemoryIndexerPolicy) and session.policy.memory_layers == (6, 8, 10)
    assert "layers 6, 8, 10 = CSA indices 2, 3, 4" in session.describe()
    out = session.generate(prompt_ids, max_new_tokens=NEW_TOKENS)
    stats = session.stats
    assert len(out.token_ids) == NEW_TOKENS
    assert stats.triggers == 1 + (NEW_TOKENS - 1) // TAU
    assert 0 < stats.resident_entries < stats.csa_entries
    assert stats.device_bytes["memory_index_keys"] >= 3 * stats.csa_entries * 32 * 4  # all entries, 3 layers
    assert stats.device_bytes["csa_kv"] < stats.full_bytes["csa_kv"]
    assert stats.footprint_ratio < 1.0
    # the paper's footprint counts the CSA attention KV only: the rows the last trigger allocated (its selection
    # + room for tau/m + 2 newborn entries) over every entry
    assert stats.csa_kv_ratio == (stats.selected_per_trigger[-1] + TAU // 4 + 2) / stats.csa_entries
    assert stats.entries_fetched > 0 and stats.fetch_bytes_to_device > 0 and stats.trigger_seconds > 0


def test_memory_keys_in_the_pool_decode_the_same_with_less_device_memory(backbone, prompt_ids, native_export):
    """memory_keys="pool": the memory layers' keys of every entry stay in the cold pool and each trigger streams
    them; tokens and every trigger's resident set are those of memory_keys="device", the device holds no
    memory keys, and the bytes moved grow by exactly the streamed keys."""
    model, tokenizer = backbone
    runs = {}
    for where in ("device", "pool"):
        session = Session(model, tokenizer, mode="lsa", indexer=native_export, threshold=0.9, tau=TAU,
                          chunk_size=CHUNK, memory_keys=where)
        chosen, visible = [], []
        original = session.policy.select

        def select(state, original=original, chosen=chosen, visible=visible):
            ids = original(state)
            chosen.append(ids.clone())
            visible.append(state.n_visible)
            return ids

        session.policy.select = select
        out = session.generate(prompt_ids, max_new_tokens=NEW_TOKENS)
        runs[where] = (out.token_ids, chosen, visible, session.stats)
    (tok_d, ids_d, vis_d, st_d), (tok_p, ids_p, vis_p, st_p) = runs["device"], runs["pool"]
    assert tok_d == tok_p and len(ids_d) == len(ids_p) == st_d.triggers
    assert all(torch.equal(a, b) for a, b in zip(ids_d, ids_p)) and vis_d == vis_p
    assert st_d.device_bytes["memory_index_keys"] > 0 and st_p.device_bytes["memory_index_keys"] == 0
    assert st_p.device_total == st_d.device_total - st_d.device_bytes["memory_index_keys"]
    key_bytes = model.config.index_head_dim * 4 * 3  # fp32 K^IComp row, 3 memory layers
    assert st_p.fetch_bytes_to_device - st_d.fetch_bytes_to_device == key_bytes * sum(vis_p)
    with pytest.raises(SessionError, match="memory_keys"):
        Session(model, tokenizer, mode="lsa", indexer=native_export, memory_keys="disk")


def test_budget_caps_the_lsa_resident_set(backbone, prompt_ids, native_export):
    model, tokenizer = backbone
    session = Session(model, tokenizer, mode="lsa", indexer=native_export, threshold=0.5, budget=20,
                      tau=TAU, chunk_size=CHUNK, keep_recent=0)
    seen = []
    original = session.policy.select

    def select(state):
        ids = original(state)
        best = torch.stack(list(state.scores.values())).max(0).values
        seen.append((ids, best))
        return ids

    session.policy.select = select
    session.generate(prompt_ids[:320], max_new_tokens=20)
    for ids, best in seen:
        assert ids.numel() == 20
        # the kept entries are the 20 highest scores among those over the threshold
        assert torch.equal(ids.sort().values, best.topk(20).indices.sort().values)
        assert (best[ids] >= 0.5).all()
    assert session.stats.resident_entries <= 20 + TAU // 4 + 1


def test_continued_conversation_equals_generate_on_the_whole_context(backbone, prompt_ids):
    model, tokenizer = backbone
    first, second = prompt_ids[:200], prompt_ids[200:300]
    for mode in ("full", "all"):
        session = Session(model, tokenizer, mode=mode, tau=8, chunk_size=64)
        a = session.generate(first, max_new_tokens=12).token_ids
        b = session.generate(second, max_new_tokens=12, keep_context=True).token_ids
        context = torch.cat([first, torch.tensor(a), second]).unsqueeze(0)
        expected = model.generate(context, max_new_tokens=12, do_sample=False)[0, context.shape[1]:].tolist()
        assert b == expected, mode
        assert session.context_ids == context[0].tolist() + b
        # a new call without keep_context starts clean
        assert session.generate(first, max_new_tokens=12).token_ids == a


def test_stream_yields_the_generate_tokens_and_text(backbone):
    model, tokenizer = backbone
    session = Session(model, tokenizer, mode="recent", budget=8, tau=4, chunk_size=64)
    prompt = "The cold pool keeps every compressed entry on the host. " * 4
    out = session.generate(prompt, max_new_tokens=16)
    pieces = list(session.stream(prompt, max_new_tokens=16))
    assert [p.token_id for p in pieces] == out.token_ids
    assert "".join(p.text for p in pieces) == out.text == tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_sampling_is_repeatable_with_a_seed(backbone, prompt_ids):
    model, tokenizer = backbone
    session = Session(model, tokenizer, mode="random", budget=16, tau=8, chunk_size=64, seed=5)
    a = session.generate(prompt_ids[:100], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=1).token_ids
    session = Session(model, tokenizer, mode="random", budget=16, tau=8, chunk_size=64, seed=5)
    b = session.generate(prompt_ids[:100], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=1).token_ids
    assert a == b


def test_export_metadata_is_checked(backbone, native_export, tmp_path):
    model, _ = backbone
    lsa_config = json.loads((native_export / "lsa_config.json").read_text())
    assert lsa_config["backbone_config_hash"] == config_hash(model.config)
    import shutil

    other = tmp_path / "other"
    shutil.copytree(native_export, other)
    (other / "lsa_config.json").write_text(json.dumps({**lsa_config, "backbone_config_hash": "0123456789abcdef"}))
    from lsa_runtime.errors import FmIndexError

    with pytest.raises(FmIndexError, match="another backbone"):
        Session(model, mode="lsa", indexer=other)
    (other / "lsa_config.json").write_text(json.dumps({**lsa_config, "layers": [2, 3]}))
    with pytest.raises(FmIndexError, match="layer 3 is a heavily_compressed_attention layer, not CSA"):
        Session(model, mode="lsa", indexer=other)


def test_oracle_policy_is_lossless_with_few_resident_entries(backbone, prompt_ids, full_run):
    """Resident = exactly what full decoding's native top-k reads in each trigger window: the restricted top-k
    then equals the full one, so the tokens must too, with a fraction of the entries resident."""
    from lsa_runtime.policies import OraclePolicy, record_native_picks

    model, tokenizer = backbone
    recorder = Session(model, tokenizer, mode="full", chunk_size=CHUNK)
    recorded, picks = record_native_picks(recorder, prompt_ids, NEW_TOKENS)
    assert recorded.token_ids == full_run[0].token_ids
    assert sorted(picks) == list(range(PROMPT_TOKENS, PROMPT_TOKENS + NEW_TOKENS - 1))
    # tau 4: the tiny random model's picks wander, a window of 16 queries x 5 layers reads almost everything
    session = Session(model, tokenizer, policy=OraclePolicy(picks, tau=4), tau=4, chunk_size=CHUNK)
    out = session.generate(prompt_ids, max_new_tokens=NEW_TOKENS)
    assert out.token_ids == full_run[0].token_ids
    stats = session.stats
    assert stats.triggers == 1 + (NEW_TOKENS - 1) // 4
    assert stats.resident_entries < 0.75 * stats.csa_entries
    assert stats.footprint_ratio < 0.9


def test_hisparse_per_step_buffer_is_lossless(backbone, prompt_ids, full_run):
    """Per-step scheme: native top-k over every entry, picks served by a 24-entry LRU buffer per CSA layer."""
    model, tokenizer = backbone
    session = Session(model, tokenizer, mode="hisparse", budget=24, chunk_size=CHUNK)
    out = session.generate(prompt_ids, max_new_tokens=NEW_TOKENS)
    assert out.token_ids == full_run[0].token_ids
    stats = session.stats
    assert stats.triggers == 0
    assert stats.resident_entries == 24  # the buffer is full: more distinct entries were picked than it holds
    assert stats.device_bytes["csa_kv"] == 5 * 24 * 64 * 4
    # the first decode step fetches a whole top-k in each of the 5 CSA layers (the buffer starts empty), and
    # 24 slots cannot hold what 47 steps pick, so later steps miss too
    assert stats.entries_fetched > 5 * model.config.index_topk
    assert stats.fetch_bytes_to_device == stats.entries_fetched * 64 * 4
    # K^IComp of every entry stays on the device in every CSA layer
    assert stats.device_bytes["memory_index_keys"] >= stats.full_bytes["csa_index_keys"]


@pytest.mark.slow
def test_long_prompt_fidelity(backbone, native_export):
    """1,536-token prompt (48 windows, 384 entries), 96 new tokens, tau 32: full == transformers, and the
    lossless LSA paths (every entry fetched, per-step buffer) == full."""
    model, tokenizer = backbone
    ids = torch.randint(3, 1024, (1536,), generator=torch.Generator().manual_seed(5))
    expected = model.generate(ids.unsqueeze(0), max_new_tokens=96, do_sample=False)[0, 1536:].tolist()
    assert Session(model, tokenizer, mode="full").generate(ids, max_new_tokens=96).token_ids == expected
    lossless = [dict(mode="lsa", indexer=native_export, threshold=1e-6, tau=32), dict(mode="hisparse", budget=48)]
    for options in lossless:
        session = Session(model, tokenizer, chunk_size=256, **options)
        assert session.generate(ids, max_new_tokens=96).token_ids == expected, options


def test_with_config_reuses_the_loaded_backbone_and_stats_report_each_triggers_set(backbone, prompt_ids):
    """with_config: another mode on the same model object; stats.selected_per_trigger equals what the policy
    returned at each trigger (counted here by a wrapper), and reading stats twice changes nothing."""
    model, tokenizer = backbone
    full = Session(model, tokenizer, mode="full", chunk_size=CHUNK)
    sizes = []

    def every_fifth(state):
        ids = torch.arange(0, state.n_visible, 5)
        sizes.append(ids.numel())
        return ids

    lsa = full.with_config(mode="all", tau=TAU, policy=GivenEntriesPolicy(every_fifth))
    assert lsa.model is full.model and lsa.config.tau == TAU and full.config.mode == "full"
    lsa.generate(prompt_ids[:320], max_new_tokens=2 * TAU + 2)
    stats = lsa.stats
    assert stats.selected_per_trigger == tuple(sizes) and stats.triggers == len(sizes) == 3
    assert stats.selected_mean == sum(sizes) / 3 and lsa.stats == stats
    recent = lsa.with_config(mode="recent", budget=8)
    recent.generate(prompt_ids[:320], max_new_tokens=TAU + 1)
    assert recent.stats.selected_per_trigger == (8, 8)


def test_oracle_mode_records_the_full_run_and_replays_it(backbone, prompt_ids, full_run):
    """Session(mode="oracle"): each generate first decodes the prompt in full mode, then replays its native picks;
    lossless under greedy decoding, with fewer entries resident (the same as OraclePolicy fed by hand)."""
    model, tokenizer = backbone
    session = Session(model, tokenizer, mode="oracle", tau=4, chunk_size=CHUNK)
    out = session.generate(prompt_ids, max_new_tokens=NEW_TOKENS)
    assert out.token_ids == full_run[0].token_ids
    assert session.stats.triggers == 1 + (NEW_TOKENS - 1) // 4
    assert session.stats.resident_entries < 0.75 * session.stats.csa_entries
    assert session.describe().startswith("oracle")
    with pytest.raises(SessionError, match="keep_context is not available"):
        session.generate(prompt_ids[:8], max_new_tokens=2, keep_context=True)


def test_an_empty_text_prompt_needs_unconditional(backbone):
    model, tokenizer = backbone
    session = Session(model, tokenizer, mode="full")
    with pytest.raises(SessionError, match="the prompt is empty: pass unconditional=True"):
        session.generate("", max_new_tokens=2)
    out = session.generate("", max_new_tokens=3, unconditional=True, stop_at_eos=False)
    assert out.prompt_tokens == 1 and session.context_ids[0] == tokenizer.bos_token_id and len(out.token_ids) == 3


def test_the_cold_pool_is_allocated_once_at_the_conversations_size(backbone):
    """Prompt + max_new_tokens known up front: the pinned pool holds exactly their entries (hand count), instead of
    doubling past them; a per-device breakdown of a one-device model is the whole footprint."""
    model, tokenizer = backbone
    config = model.config
    session = Session(model, tokenizer, mode="recent", budget=16, tau=8)
    out = session.generate(list(range(5, 305)), max_new_tokens=20, stop_at_eos=False)
    entries = (300 + 20) // 4 + 1
    csa = sum(1 for t in config.layer_types if t == "compressed_sparse_attention")
    assert out.stats.cold_pool_bytes == csa * entries * (config.head_dim + config.index_head_dim) * 4  # fp32
    assert out.stats.device_bytes_by_device == {"cpu": out.stats.device_total}


def test_fp8_pool_holds_the_entries_in_e4m3_and_fetches_them_dequantized(backbone, prompt_ids):
    """pool_storage="fp8": host bytes per entry are the e4m3 row plus one fp32 scale per 64 values (counted here
    from the widths), and the resident rows a trigger fetched are the pool's rows rounded through e4m3."""
    from lsa_runtime.cold_pool import dequantize_fp8, quantize_fp8

    model, tok = backbone
    runs = {}
    for storage in ("model", "fp8"):
        session = Session(model, tok, mode="all", tau=TAU, pool_storage=storage)
        session.generate(prompt_ids, max_new_tokens=2)  # one trigger, right after the prefill: it fetches every row
        runs[storage] = session
    exact, compact = runs["model"], runs["fp8"]
    config = model.config
    widths = (config.head_dim, config.index_head_dim)
    capacity = compact.cold_pool.rows[(compact.cold_pool.layers[0], "compressor")].capacity
    per_entry = sum(w + 4 * -(-w // 64) for w in widths)
    assert compact.stats.cold_pool_bytes == len(compact.cold_pool.layers) * capacity * per_entry
    assert exact.stats.cold_pool_bytes == len(exact.cold_pool.layers) * capacity * sum(widths) * 4  # fp32 model
    layer = compact.cold_pool.layers[0]
    prefill = PROMPT_TOKENS // config.compress_rates["compressed_sparse_attention"]  # entries from the prefill alone
    exact_rows = exact.cold_pool.host_rows(layer, "compressor")[:prefill]
    assert torch.equal(compact.cold_pool.host_rows(layer, "compressor")[:prefill],
                       dequantize_fp8(*quantize_fp8(exact_rows), torch.float32))
    fetched = compact.stats.selected_per_trigger[-1]  # (entries born later are appended from the device, exact)
    ids = compact.residency.ids[:fetched].cpu()
    assert fetched > 0 and torch.equal(compact.residency.rows(layer, "compressor")[:fetched].cpu(),
                                       compact.cold_pool.host_rows(layer, "compressor")[ids])


def _teacher_forced_logits(model, prompt: list[int], tokens: list[int], static: bool) -> torch.Tensor:
    """``[len(tokens), vocab]`` fp32: the next-token logits after the prompt and after each of ``tokens[:-1]``,
    decoded one token at a time by transformers' own model (``static=False``) or by the static-shape step (a
    :class:`StaticRunner` row joined from the same prefilled cache)."""
    from transformers import DynamicCache

    from lsa_runtime.backbone import cache_kwarg
    from lsa_runtime.static_runner import StaticRunner

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = [model(input_ids=torch.tensor([prompt]), use_cache=True, **{cache_kwarg(): cache}).logits[0, -1]]
        runner = StaticRunner(model, rows=2, capacity=len(prompt) + len(tokens) + 1, graph=False) if static else None
        row = runner.join(cache) if static else None
        for token in tokens[:-1]:
            if static:
                out.append(runner.step({row: token})[row].clone())
            else:
                out.append(model(input_ids=torch.tensor([[token]]), use_cache=True,
                                 **{cache_kwarg(): cache}).logits[0, -1])
    return torch.stack(out).float()


@pytest.mark.parametrize("name", ["tiny", "reference"])
def test_static_decode_fidelity(name, prompt_ids):
    """The static-shape step (``static_decode``, the GPU default for mode full) on the fidelity prompt (640 tokens,
    48 new): in fp32 its greedy tokens are transformers' generate's; in bf16 its logits along those tokens
    (teacher-forced) stay within the stated tolerance: no further from the fp32 logits than transformers' own bf16
    decode is, times 1.25 (CPU: tiny 0.237 vs 0.237; reference 0.223 vs 0.368, logits up to 16.8)."""
    from lsa_runtime.backbone import load_backbone

    prompt = prompt_ids.tolist()
    model, tokenizer = load_backbone(name, dtype=torch.float32)
    expected = model.generate(prompt_ids.unsqueeze(0), max_new_tokens=NEW_TOKENS,
                              do_sample=False)[0, PROMPT_TOKENS:].tolist()
    got = Session(model, tokenizer, mode="full", static_decode=True).generate(prompt, max_new_tokens=NEW_TOKENS,
                                                                              stop_at_eos=False).token_ids
    assert got == expected
    oracle = _teacher_forced_logits(model, prompt, expected, static=False)
    assert (_teacher_forced_logits(model, prompt, expected, static=True) - oracle).abs().max() < 1e-4
    half, _ = load_backbone(name, dtype=torch.bfloat16)
    stock_error = (_teacher_forced_logits(half, prompt, expected, static=False) - oracle).abs().max().item()
    static_error = (_teacher_forced_logits(half, prompt, expected, static=True) - oracle).abs().max().item()
    assert 0 < static_error <= 1.25 * stock_error, (static_error, stock_error)
