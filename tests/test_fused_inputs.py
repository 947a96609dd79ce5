"""lsa_runtime/fused_inputs.py: one GEMV for an attention block's input projections, checked against each
projection alone, transformers' own forward (unchanged by the fusion) and the stock model decoding alone."""

import copy

import pytest
import torch
from transformers import DynamicCache

from lsa_runtime.backbone import cache_kwarg
from lsa_runtime.fused_inputs import INPUT_PROJECTIONS, STACK, _linear, fuse_attention_inputs, project_inputs
from lsa_runtime.static_decode import StaticDecodeState, decode_step

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fused_pair(backbone):
    """(the tiny backbone as loaded, a deep copy of it with every attention block fused)."""
    model = backbone[0]
    fused = copy.deepcopy(model)
    fuse_attention_inputs(fused)
    return model, fused


def _blocks(model):
    return [layer.self_attn for layer in model.model.layers]


def test_each_module_is_a_view_of_its_block_stack_with_its_own_values(fused_pair):
    model, fused = fused_pair
    kinds = model.config.layer_types
    assert fuse_attention_inputs(fused) == len(kinds)  # idempotent: every block already fused
    for kind, plain, block in zip(kinds, _blocks(model), _blocks(fused), strict=True):
        stack = getattr(block, STACK)
        paths = [p for p in INPUT_PROJECTIONS if _linear(plain, p) is not None]
        # sliding: q and K=V; HCA: + the compressor's C and Z; CSA: + the indexer's C, Z and head weights w_h
        assert len(paths) == {"sliding_attention": 2, "heavily_compressed_attention": 4,
                              "compressed_sparse_attention": 7}[kind]
        start = 0
        for path in paths:
            want, got = _linear(plain, path).weight, _linear(block, path).weight
            assert torch.equal(got, want)
            assert got.untyped_storage().data_ptr() == stack.untyped_storage().data_ptr()  # a view: no copy
            assert torch.equal(stack[start:start + want.shape[0]], want)
            start += want.shape[0]
        assert start == stack.shape[0]
    assert fused.state_dict().keys() == model.state_dict().keys()  # the stack is never saved


def test_one_gemv_gives_each_projection(fused_pair):
    model, fused = fused_pair
    x = torch.randn(3, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for plain, block in zip(_blocks(model), _blocks(fused), strict=True):
        out = project_inputs(block, x)
        assert set(out) == {p for p in INPUT_PROJECTIONS if _linear(plain, p) is not None}
        for path, got in out.items():
            torch.testing.assert_close(got, _linear(plain, path)(x), rtol=1e-6, atol=1e-6)
        assert project_inputs(plain, x) is None  # an unfused block: each projection runs alone


def test_transformers_forward_is_unchanged(fused_pair):
    model, fused = fused_pair
    ids = torch.randint(3, 1024, (1, 120), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(fused(input_ids=ids).logits, model(input_ids=ids).logits)


def test_static_steps_of_the_fused_model_equal_the_stock_model_alone(fused_pair):
    """Two prompts (one past index_topk's entries) prefilled by the stock model, then 24 greedy static steps of
    the fused model: logits within 1e-4 of the stock model decoding each alone, the same tokens."""
    model, fused = fused_pair
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 1024, (n,), generator=gen).tolist() for n in (5, 200)]

    def prefill(ids):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), use_cache=True, **{cache_kwarg(): cache}).logits[0, -1]
        return cache, logits

    prefilled = [prefill(ids) for ids in prompts]
    alone = [prefill(ids)[0] for ids in prompts]
    state = StaticDecodeState.from_caches(model.config, [c for c, _ in prefilled], 256)
    tokens = [int(logits.argmax()) for _, logits in prefilled]
    positions = [len(ids) for ids in prompts]
    for step in range(24):
        got = decode_step(fused, state, tokens, positions)
        with torch.no_grad():
            want = torch.stack([model(input_ids=torch.tensor([[t]]), position_ids=torch.tensor([[p]]),
                                      use_cache=True, logits_to_keep=1, **{cache_kwarg(): c}).logits[0, -1]
                                for t, p, c in zip(tokens, positions, alone)])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m, step=step: f"step {step}: {m}")
        assert got.argmax(-1).tolist() == want.argmax(-1).tolist(), f"step {step}"
        tokens, positions = want.argmax(-1).tolist(), [p + 1 for p in positions]


def test_a_block_with_a_bias_or_another_dtype_is_left_alone(backbone):
    model = copy.deepcopy(backbone[0])
    blocks = _blocks(model)
    old = blocks[0].kv_proj
    blocks[0].kv_proj = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    blocks[1].q_a_proj.to(torch.float64)
    assert fuse_attention_inputs(model) == len(blocks) - 2
    assert getattr(blocks[0], STACK, None) is None and getattr(blocks[1], STACK, None) is None
    assert getattr(blocks[2], STACK, None) is not None
