"""CUDA graphs for the backbone's stateless decode modules (lsa_runtime/decode_graphs.py): replayed decode steps
give bit-identical logits to the eager ones (GPU), a Session generates the same tokens with and without them
(GPU), and off a GPU (or outside one-token decode) the wrapper is the eager forward."""

import pytest
import torch

from lsa_runtime.decode_graphs import DEFAULT_CLASSES, _GraphedForward, install_decode_graphs

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def _decode_logits(model, ids, steps):
    """Prefill ``ids`` then greedy-decode ``steps`` tokens one at a time; the logits of every decode step."""
    from transformers import DynamicCache

    from lsa_runtime.backbone import cache_kwarg

    cache = DynamicCache(config=model.config)
    kw = {cache_kwarg(): cache}
    out = []
    with torch.no_grad():
        logits = model(input_ids=ids[None], use_cache=True, **kw).logits[0, -1]
        pos = ids.numel()
        for _ in range(steps):
            token = logits.argmax().view(1, 1)
            logits = model(input_ids=token, position_ids=torch.tensor([[pos]], device=ids.device), use_cache=True,
                           **kw).logits[0, -1]
            out.append(logits.clone())
            pos += 1
    return torch.stack(out)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_graphed_decode_steps_equal_eager_bit_for_bit(sample_ids, dtype):
    """bf16: every wrapped module replays; fp32: the MoE blocks' capture may fail (transformers' grouped_mm path
    copies from pageable memory in fp32), they then run eagerly and the steps are still identical."""
    from lsa_runtime.backbone import load_backbone

    model, _ = load_backbone("tiny", dtype=dtype, device="cuda")
    ids = sample_ids[:300].cuda()
    eager = _decode_logits(model, ids, 12)
    handle = install_decode_graphs(model)
    try:
        n_hc = sum(type(m).__name__ in ("DeepseekV4HyperConnection", "DeepseekV4HyperHead") for m in model.modules())
        assert len(handle.wrapped) >= n_hc > 0
        graphed = _decode_logits(model, ids, 12)
        assert handle.replays >= 12 * n_hc  # every decode step replayed the graphs (the prefill ran eagerly)
        failed = sum(w.failed is not None for w in handle.wrapped)
        assert handle.graphs + failed == len(handle.wrapped)  # one signature each, or eager after a failed capture
        assert set(handle.failed) <= {"DeepseekV4SparseMoeBlock"}
        if dtype == torch.bfloat16:
            assert failed == 0
        assert install_decode_graphs(model) is handle  # installed once per model
    finally:
        handle.remove()
    assert not any(isinstance(m.__dict__.get("forward"), _GraphedForward) for m in model.modules())
    assert torch.equal(graphed, eager)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("mode,options", [("full", {}), ("recent", {"budget": 24, "tau": 16})])
def test_session_generates_the_same_with_decode_graphs(mode, options):
    from lsa_runtime.backbone import load_backbone
    from lsa_runtime.session import Session

    model, tok = load_backbone("tiny", dtype=torch.bfloat16, device="cuda")
    prompt = list(range(5, 400))
    options = {**options, "static_decode": False}  # mode full's GPU default is the static step (its own graph)
    eager = Session(model, tok, mode=mode, decode_graphs=False, **options).generate(prompt, max_new_tokens=40)
    session = Session(model, tok, mode=mode, **options)  # default on a GPU: graphs on
    graphed = session.generate(prompt, max_new_tokens=40)
    assert session.decode_graphs is not None and session.decode_graphs.replays > 0
    session.decode_graphs.remove()
    assert graphed.token_ids == eager.token_ids


def test_wrapper_is_the_eager_forward_where_it_cannot_replay(tiny_model):
    """On a CPU (and with gradients on, or for a prefill chunk) the wrapped forward is the eager one: same outputs,
    nothing captured; without CUDA install_decode_graphs wraps nothing and says why."""
    hc = next(m for m in tiny_model.modules() if type(m).__name__ == "DeepseekV4HyperConnection")
    streams = torch.randn(1, 1, tiny_model.config.hc_mult, tiny_model.config.hidden_size)
    wrapper = _GraphedForward(hc, pool=None, max_graphs=2)
    with torch.no_grad():
        want = hc(streams)
        got = wrapper(streams)
        got_prefill = wrapper(streams.expand(1, 5, -1, -1).contiguous())
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and len(got_prefill) == 3
    assert wrapper.graphs == {} and wrapper.replays == 0
    if not torch.cuda.is_available():
        handle = install_decode_graphs(tiny_model)
        assert handle.wrapped == [] and set(handle.skipped) == set(DEFAULT_CLASSES)
