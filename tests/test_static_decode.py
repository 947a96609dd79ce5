"""Static-shape batched decode (lsa_runtime.static_decode): B sequences in fixed-size stores give each sequence the
logits and greedy tokens of the stock transformers model decoding it alone, and the step runs the same operators on
the same shapes every step, with no host synchronisation. Tiny bundled model, fp32, CPU: rates m = 4 (CSA) and
m' = 32 (HCA), window 32, index_topk 16."""

import collections
import shutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache

from lsa_runtime.backbone import cache_kwarg
from lsa_runtime.static_decode import (
    StaticDecodeState,
    decode_step,
    install_static_attention,
    static_step,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# 3 tokens: no entry yet (the first CSA window closes without an overlap), fewer entries than index_topk all along
# (masked picks), window ring not yet full, crosses m' = 32 at position 31; 97: more entries than index_topk (the
# top-k selects), crosses 128; 200: a wrapped ring, crosses 224. All cross ten CSA boundaries in 40 steps.
LENGTHS = (3, 97, 200)
STEPS = 40
CAPACITY = 256
TOLERANCE = 1e-4  # observed: max |logit difference| about 7e-7 over the 40 steps


def _prefill(model, ids):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), use_cache=True, **{cache_kwarg(): cache}).logits[0, -1]
    return cache, logits


def _prompts(lengths, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1024, (n,), generator=gen).tolist() for n in lengths]


def _stores(state):
    for i, layer in enumerate(state.layers):
        for name in ("compressor", "indexer"):
            if getattr(layer, name) is not None:
                yield i, name, getattr(layer, name)


def test_batched_static_steps_equal_each_sequence_decoded_alone(backbone):
    """Three prompts of different lengths (positions and compressor phases differ) prefilled by the stock model,
    then 40 greedy steps together: each step's logits within 1e-4 of the stock model decoding that sequence alone
    with its DynamicCache, the same greedy tokens; afterwards the stores hold the stock cache's entries."""
    model, _ = backbone
    prompts = _prompts(LENGTHS)
    prefilled = [_prefill(model, ids) for ids in prompts]
    alone = [_prefill(model, ids)[0] for ids in prompts]  # the reference's own caches
    state = StaticDecodeState.from_caches(model.config, [c for c, _ in prefilled], CAPACITY)
    tokens = [int(logits.argmax()) for _, logits in prefilled]
    positions = list(LENGTHS)
    worst = 0.0
    for step in range(STEPS):
        got = decode_step(model, state, tokens, positions)
        with torch.no_grad():
            want = torch.stack([
                model(input_ids=torch.tensor([[t]]), position_ids=torch.tensor([[p]]), use_cache=True,
                      logits_to_keep=1, **{cache_kwarg(): c}).logits[0, -1]
                for t, p, c in zip(tokens, positions, alone)])
        worst = max(worst, float((got - want).abs().max()))
        torch.testing.assert_close(got, want, rtol=TOLERANCE, atol=TOLERANCE,
                                   msg=lambda m, step=step: f"step {step}: {m}")
        assert got.argmax(-1).tolist() == want.argmax(-1).tolist(), f"step {step}"
        tokens, positions = want.argmax(-1).tolist(), [p + 1 for p in positions]
    print(f"static decode vs stock alone: max |logit difference| {worst:.2e} over {STEPS} steps")

    # the state advanced as the stock caches did: entries C^Comp / K^IComp, lengths, window
    for i, name, store in _stores(state):
        for row, cache in enumerate(alone):
            stock = cache.layers[i]
            n = stock.entry_count[name]
            assert n == positions[row] // store.rate and int(store.lengths[row]) == n
            torch.testing.assert_close(store.entries[row, :n], stock.compressed_kv[name][0], rtol=1e-5, atol=1e-5)
    for row, cache in enumerate(alone):
        keys = cache.layers[0].keys[0, 0]  # last W - 1 tokens
        slots = torch.arange(positions[row] - keys.shape[0], positions[row]) % state.geometry.window
        torch.testing.assert_close(state.layers[0].window[row, slots], keys, rtol=1e-5, atol=1e-5)

    # store_row writes each row back into the (stale) cache it was loaded from: every tensor of the stock cache
    # that decoded alone, and the stock model continues from either with the same logits
    for row, ((cache, _), stock) in enumerate(zip(prefilled, alone)):
        state.store_row(row, cache, positions[row])
        for mine, theirs in zip(cache.layers, stock.layers, strict=True):
            assert mine.cumulative_length == theirs.cumulative_length == positions[row]
            torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-5, atol=1e-5)
            for part in ("compressed_kv", "buffer_kv", "buffer_gate", "overlap_kv", "overlap_gate", "entry_count"):
                for name, want in getattr(theirs, part, {}).items():
                    got = getattr(mine, part)[name]
                    assert (got is None) == (want is None), (part, name)
                    if isinstance(want, torch.Tensor):
                        assert got.shape == want.shape, (part, name)
                        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
                    else:
                        assert got == want, (part, name)
        with torch.no_grad():
            step = dict(input_ids=torch.tensor([[tokens[row]]]), position_ids=torch.tensor([[positions[row]]]),
                        use_cache=True, logits_to_keep=1)
            torch.testing.assert_close(model(**step, **{cache_kwarg(): cache}).logits,
                                       model(**step, **{cache_kwarg(): stock}).logits, rtol=1e-4, atol=1e-4)


class _OpTrace(TorchDispatchMode):
    """Every aten operator a region runs, with its output shapes (what a CUDA graph capture would record)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves(out)
        self.ops.append((str(func), tuple(tuple(t.shape) for t in leaves if isinstance(t, torch.Tensor))))
        return out


# .item() / .tolist() / bool(t) / int(t) all reach _local_scalar_dense; the others have data-dependent shapes
HOST_SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten.item")


def _lengths(state, rate):
    return next(store for _, _, store in _stores(state) if store.rate == rate).lengths.clone()


def test_the_step_keeps_its_storage_shapes_and_operators_and_never_syncs(backbone):
    """Three steps with different rows emitting (first: row 0 closes a CSA and an HCA window at position 31;
    second: rows 1 and 2 close CSA windows; third: none): every state tensor keeps its storage and shape, the step
    body runs the identical operator sequence on identical shapes, and none of its operators reads a value back to
    the host or has a data-dependent shape."""
    model, _ = backbone
    lengths = (31, 6, 50)
    state = StaticDecodeState.from_caches(model.config, [_prefill(model, ids)[0] for ids in _prompts(lengths, 9)],
                                          CAPACITY)
    install_static_attention(model)
    before = {name: (t.data_ptr(), t.shape) for name, t in state.tensors().items()}
    emitted, traces = [], []
    for step in range(3):
        state.tokens.copy_(torch.tensor([5, 6, 7]))
        state.positions.copy_(torch.tensor(lengths) + step)
        csa, hca = _lengths(state, 4), _lengths(state, 32)
        with _OpTrace() as trace, torch.no_grad():
            static_step(model, state)
        traces.append(trace.ops)
        emitted.append(((_lengths(state, 4) - csa).tolist(), (_lengths(state, 32) - hca).tolist()))
    # the traced steps do emit in different rows (else this test would show nothing)
    assert emitted == [([1, 0, 0], [1, 0, 0]), ([0, 1, 1], [0, 0, 0]), ([0, 0, 0], [0, 0, 0])]
    assert {name: (t.data_ptr(), t.shape) for name, t in state.tensors().items()} == before
    assert traces[0] == traces[1] == traces[2]
    counts = collections.Counter(op for op, _ in traces[0])
    assert not [op for op in counts if op.startswith(HOST_SYNC_OPS)], counts
    assert counts["aten.index_put_.default"] > 0 and counts["aten.topk.default"] > 0  # traced the static path


def test_rows_leave_and_join_without_touching_the_others(backbone):
    """Continuous batching on the static state, host-side only: a finished row keeps being stepped (its position
    frozen, its logits ignored: the state's shapes never change, so a captured graph stays valid), then a new
    sequence is loaded into that row (``load_row`` resets it in place). Every live row's logits stay within 1e-4 of
    the stock model decoding that sequence alone, before, during and after, and no state tensor is reallocated."""
    model, _ = backbone
    first, joining = _prompts((97, 3, 200)), _prompts((150,), seed=8)[0]
    state = StaticDecodeState.from_caches(model.config, [_prefill(model, ids)[0] for ids in first], CAPACITY)
    storage = {name: t.data_ptr() for name, t in state.tensors().items()}
    alone = {row: _prefill(model, ids) for row, ids in enumerate(first)}
    tokens = {row: int(logits.argmax()) for row, (_, logits) in alone.items()}
    positions = {row: len(ids) for row, ids in enumerate(first)}
    live = {0, 1, 2}

    def step():
        rows = range(3)
        got = decode_step(model, state, [tokens.get(r, 5) for r in rows], [positions[r] for r in rows])
        for row in sorted(live):
            with torch.no_grad():
                want = model(input_ids=torch.tensor([[tokens[row]]]), position_ids=torch.tensor([[positions[row]]]),
                             use_cache=True, logits_to_keep=1, **{cache_kwarg(): alone[row][0]}).logits[0, -1]
            torch.testing.assert_close(got[row], want, rtol=TOLERANCE, atol=TOLERANCE)
            tokens[row], positions[row] = int(want.argmax()), positions[row] + 1

    for _ in range(10):
        step()
    live.discard(1)  # row 1 finished: stepped with a dummy token at a frozen position
    for _ in range(6):
        step()
    alone[1] = _prefill(model, joining)
    positions[1] = state.load_row(1, alone[1][0])
    tokens[1] = int(alone[1][1].argmax())
    live.add(1)
    for _ in range(14):
        step()
    assert positions == {0: 97 + 30, 1: 150 + 14, 2: 200 + 30}
    assert {name: t.data_ptr() for name, t in state.tensors().items()} == storage


def test_capacity_and_foreign_caches_are_refused(backbone):
    model, _ = backbone
    cache, _ = _prefill(model, _prompts((40,))[0])
    with pytest.raises(ValueError, match="no room"):
        StaticDecodeState.from_caches(model.config, [cache], capacity=40)
    state = StaticDecodeState.from_caches(model.config, [cache], capacity=41)
    with pytest.raises(ValueError, match="beyond the capacity"):
        decode_step(model, state, [5], [41])
    two = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6], [7, 8]]), use_cache=True, **{cache_kwarg(): two})
    with pytest.raises(ValueError, match="batch 1"):
        state.load_row(0, two)


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "compiled", "fused"), [(torch.float32, False, False), (torch.bfloat16, False, False),
                                                          (torch.bfloat16, True, False),
                                                          (torch.bfloat16, True, True)])
def test_the_whole_step_replays_as_one_cuda_graph(dtype, compiled, fused):
    """On a GPU the whole model step over the static state is captured once and replayed: 24 replayed steps give
    the logits of the same static step run without a graph on a twin state, bit for bit (same kernels, same
    operands); the eager static step itself is checked against the stock model by the CPU test above.

    ``compiled``: the layers compiled (compile_static_step) before the capture. Compiled bf16 code rounds
    differently from eager bf16 code, and the tiny model's random logits are near ties (2026-12-02, H200: a greedy
    token differed at the first step), so the oracle is the fp32 static step on the same weights and tokens
    (teacher-forced with its own greedy tokens): compiling may not move the logits further from it than the eager
    bf16 step is (at most 2x that step's own deviation). ``fused``: the attention blocks' input projections stacked
    into one GEMV each (lsa_runtime/fused_inputs.py) before compiling, held to the same bound."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from lsa_runtime.backbone import load_backbone
    from lsa_runtime.compiled_step import compile_static_step
    from lsa_runtime.static_decode import use_capturable_experts

    def prepared(dtype):
        model, _ = load_backbone("tiny", dtype=dtype, device="cuda")
        use_capturable_experts(model)
        install_static_attention(model)
        caches = [_prefill_on(model, ids) for ids in _prompts(LENGTHS)]
        states = [StaticDecodeState.from_caches(model.config, [c for c, _ in caches], CAPACITY, dtype, "cuda")
                  for _ in range(3)]
        return model, states, torch.stack([logits.argmax() for _, logits in caches])

    def run(model, state, tokens, positions):
        state.tokens.copy_(tokens)
        state.positions.copy_(positions)
        with torch.no_grad():
            return static_step(model, state)

    model, (graphed, twin, plain), tokens = prepared(dtype)
    positions = torch.tensor(LENGTHS, device="cuda")
    forced, oracle, eager_bf16 = None, [], []
    if compiled:  # the fp32 oracle's tokens drive every run below; the eager bf16 step's deviation from it
        model32, (state32, _, _), t = prepared(torch.float32)
        forced, p = [t], positions
        for _ in range(24):
            oracle.append(run(model32, state32, forced[-1], p).float())
            eager_bf16.append(run(model, plain, forced[-1], p).float())
            forced.append(oracle[-1].argmax(-1))
            p = p + 1
        del model32, state32
        tokens = forced[0]
        compile_static_step(model, fuse_inputs=fused)
    saved = {name: t.clone() for name, t in graphed.tensors().items()}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(2):  # warm-up outside capture (lazy inits, cuBLAS workspaces, compilation); it advances the state
            static_step(model, graphed)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = static_step(model, graphed)
    for name, t in graphed.tensors().items():  # undo the warm-up: the replays start from the prefilled state
        t.copy_(saved[name])
    deviation = {"compiled": 0.0, "eager": 0.0}
    for step in range(24):
        for state in (graphed, twin):
            state.tokens.copy_(tokens)
            state.positions.copy_(positions)
        graph.replay()
        with torch.no_grad():
            eager = static_step(model, twin)
        assert torch.equal(out, eager), f"step {step}: replay differs from the same step run without a graph"
        if compiled:
            deviation["compiled"] = max(deviation["compiled"], float((out.float() - oracle[step]).abs().max()))
            deviation["eager"] = max(deviation["eager"], float((eager_bf16[step] - oracle[step]).abs().max()))
        tokens, positions = (forced[step + 1] if compiled else eager.argmax(-1)), positions + 1
    what = ("compiled layers" if compiled else "eager layers") + (", fused input projections" if fused else "")
    print(f"whole-step CUDA graph, {dtype}, {what}: 24 replays equal the step without a graph"
          + (f"; max |logit - fp32 oracle|: compiled {deviation['compiled']:.3g}, eager bf16 "
             f"{deviation['eager']:.3g}" if compiled else ""))
    if compiled:
        assert deviation["compiled"] <= 2 * deviation["eager"] + 1e-3, deviation


def _layer_kinds(model, hidden=()):
    """The distinct (attention kind, hash-routed MoE, keeps h_t) triples of the model's layers (``hidden``: the
    layers whose stores keep h_t for triggers): what a compiled layer specialises on."""
    return {(kind, layer.mlp.is_hash, i in hidden)
            for i, (kind, layer) in enumerate(zip(model.config.layer_types, model.model.layers))}


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile (inductor) needs a C++ compiler on a CPU")
@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_compiled_layers_give_the_eager_static_step_and_share_graphs_by_kind(fused):
    """compile_static_step: 12 steps of the compiled step give the eager static step's logits (within 1e-4; fp32
    reorderings), the same greedy tokens and stores; the 12 layers compile one graph per layer kind, not per
    layer (the layers never read their layer number); a prefill with a stock cache still runs transformers' eager
    code (the same logits, bit for bit, and no graph compiled for it). The memory layers' stores keep h_t
    (``StaticLayer.hidden``, what a trigger reads): the compiled step writes there what a forward hook on the
    eager step's attention block sees (a hook itself is not run inside a compiled layer); those layers compile
    their own graph. ``fused``: the attention inputs stacked (lsa_runtime/fused_inputs.py; slow: a second
    compile; under torch 2.11 this case compiled 12 graphs, run 30)."""
    from lsa_runtime.backbone import default_memory_layers, load_backbone
    from lsa_runtime.compiled_step import compile_static_step, uncompile_static_step

    model, _ = load_backbone("tiny", dtype=torch.float32)
    prompts = _prompts(LENGTHS)
    caches = [_prefill(model, ids) for ids in prompts]
    eager = StaticDecodeState.from_caches(model.config, [c for c, _ in caches], CAPACITY)
    compiled = StaticDecodeState.from_caches(model.config, [c for c, _ in caches], CAPACITY)
    memory = default_memory_layers(model.config)
    for i in memory:
        compiled.layers[i].hidden = torch.full((len(LENGTHS), model.config.hidden_size), float("nan"))
    seen = {}  # the oracle: the eager step's attention input at the memory layers, read by a hook

    def keep(i):
        def hook(module, args, kwargs):
            seen[i] = (args[0] if args else kwargs["hidden_states"])[:, -1].clone()
        return hook

    hooks = [model.model.layers[i].self_attn.register_forward_pre_hook(keep(i), with_kwargs=True) for i in memory]
    tokens = [int(logits.argmax()) for _, logits in caches]
    positions = list(LENGTHS)
    want_steps = []
    for _ in range(12):
        want = decode_step(model, eager, tokens, positions)
        want_steps.append((tokens, positions, want, dict(seen)))
        tokens, positions = want.argmax(-1).tolist(), [p + 1 for p in positions]
    for hook in hooks:
        hook.remove()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert compile_static_step(model, fuse_inputs=fused) == len(model.model.layers)
    try:
        for step, (tokens, positions, want, hidden) in enumerate(want_steps):
            got = decode_step(model, compiled, tokens, positions)
            torch.testing.assert_close(got, want, rtol=TOLERANCE, atol=TOLERANCE,
                                       msg=lambda m, step=step: f"step {step}: {m}")
            assert got.argmax(-1).tolist() == want.argmax(-1).tolist(), f"step {step}"
            assert sorted(hidden) == memory
            for i in memory:
                torch.testing.assert_close(compiled.layers[i].hidden, hidden[i], rtol=TOLERANCE, atol=TOLERANCE,
                                           msg=lambda m, step=step, i=i: f"step {step}, h_t at layer {i}: {m}")
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        prefill_after = _prefill(model, prompts[1])[1]
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    finally:
        uncompile_static_step(model)
    assert torch.equal(prefill_after, caches[1][1])
    assert graphs == len(_layer_kinds(model, memory)) < len(model.model.layers)
    assert len(_layer_kinds(model, memory)) == len(_layer_kinds(model)) + 1  # the memory layers: one kind more
    for name, t in eager.tensors().items():
        torch.testing.assert_close(compiled.tensors()[name], t, rtol=1e-5, atol=1e-5, msg=name)


def _prefill_on(model, ids):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids], device=model.device), use_cache=True,
                       **{cache_kwarg(): cache}).logits[0, -1]
    return cache, logits


@pytest.mark.gpu
def test_index_scores_on_a_gpu_match_the_stock_scorer():
    """_index_scores with bf16 keys on a GPU (one bf16 GEMM with fp32 output instead of the stock fp32 conversion):
    I[t,s] within fp32 summation-order error of transformers' DeepseekV4IndexerScorer, and the same top-k up to a
    swap at the boundary."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from lsa_runtime.backbone import load_backbone
    from lsa_runtime.static_decode import _BMM_TO_FP32, _index_scores

    assert _BMM_TO_FP32, "this torch has no bf16 -> fp32 bmm: the static step runs the stock scorer"
    model, _ = load_backbone("tiny", dtype=torch.bfloat16, device="cuda")
    indexer = model.model.layers[2].self_attn.compressor.indexer
    gen = torch.Generator(device="cuda").manual_seed(3)
    config = model.config
    q = torch.randn(4, 1, config.index_n_heads, config.index_head_dim, generator=gen, device="cuda").bfloat16()
    keys = torch.randn(4, 4096, config.index_head_dim, generator=gen, device="cuda").bfloat16()
    hidden = torch.randn(4, 1, config.hidden_size, generator=gen, device="cuda").bfloat16()
    with torch.no_grad():
        got = _index_scores(indexer.scorer, q, keys, hidden)
        want = indexer.scorer(q, keys, hidden)[:, 0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    k = config.index_topk
    for a, b in zip(got.topk(k).indices.tolist(), want.topk(k).indices.tolist()):
        assert len(set(a) ^ set(b)) <= 2


def test_entrywise_sinkhorn_gives_transformers_hyper_connection(backbone):
    """fused_mhc: the hyper-connection with its Sinkhorn loop written entry by entry returns transformers' (post,
    comb, collapsed) on random streams (within fp32 summation order; observed equal); eager, the installed forward
    is transformers' own; uninstalling restores transformers' class."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperConnection

    from lsa_runtime.fused_mhc import FusableHyperConnection, install_fusable_mhc, uninstall_fusable_mhc

    model, _ = backbone
    streams = torch.randn(3, 1, model.config.hc_mult, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    modules = [m for m in model.modules() if type(m) is DeepseekV4HyperConnection]
    with torch.no_grad():
        want = [m(streams) for m in modules]
        assert install_fusable_mhc(model) == len(modules) == 2 * model.config.num_hidden_layers
        try:
            assert all(isinstance(m, FusableHyperConnection) for m in modules)
            got = [m.entrywise_forward(streams) for m in modules]
            eager = [m(streams) for m in modules]
        finally:
            uninstall_fusable_mhc(model)
    assert all(type(m) is DeepseekV4HyperConnection for m in modules)
    assert all(torch.equal(a, b) for e, w in zip(eager, want) for a, b in zip(e, w))
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    comb = got[0][1]
    torch.testing.assert_close(comb.sum(-2), torch.ones_like(comb.sum(-2)), rtol=1e-3, atol=1e-3)  # doubly stochastic
