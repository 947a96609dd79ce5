"""The static decode step with its arithmetic fused by ``torch.compile`` (inductor): fewer, larger kernels.

Replayed as one CUDA graph (:mod:`.static_decode`), the step of the Flash-shaped model still launches ~25,800
kernels at batch 1, each a few microseconds of device time on tiny tensors: mHC (two hyper-connections per layer,
a 20-step Sinkhorn loop each) ~47% of them, attention and its stores ~40% (docs/BENCHMARKS.md, "The static-shape
step"). Here every decoder layer runs one compiled function: transformers' ``DeepseekV4DecoderLayer.forward``
(hyper-connections, norms, the static attention block with its in-place store writes and the Lightning Indexer's
top-k, the MoE block, the residual glue), compiled once and bound to every layer. A layer never reads its layer
number: a forward pre-hook hands it its own stores (``static_layer``), so layers of one kind (sliding, CSA, HCA;
hash-routed or not) share one graph per batch size, whatever the depth.

transformers' modules keep their code and weights (the compiled function traces them); the eager step stays the
numerical reference (tests/test_static_decode.py). Compile before capturing a CUDA graph: the first steps compile
(minutes on a GPU for the Flash layout), later ones run the generated kernels, which a capture records like any
other. The embedding, the final hyper-head, norm and LM head stay eager (a handful of kernels). The hyper-
connections' Sinkhorn loop is rewritten entry by entry (:mod:`.fused_mhc`) so that it fuses instead of leaving
one kernel per normalisation.
"""

from __future__ import annotations

import functools

import torch

from .fused_inputs import fuse_attention_inputs
from .fused_mhc import install_fusable_mhc, uninstall_fusable_mhc
from .static_decode import StaticDecodeState, install_static_attention


# inductor fuses at most 64 nodes into one kernel by default; the entry-wise Sinkhorn loop (fused_mhc) is ~1,300
MAX_FUSION_SIZE = 2048


@functools.cache
def _compiled(function):
    # dynamic=False: decode shapes are fixed per batch size; each batch size and layer kind is its own graph
    return torch.compile(function, dynamic=False, options={"max_fusion_size": MAX_FUSION_SIZE})


def _hand_over_stores(layer, args, kwargs):
    """Forward pre-hook of a decoder layer: with a static state as the cache, pass the layer's stores in."""
    state = kwargs.get("past_key_values", kwargs.get("cache"))
    if isinstance(state, StaticDecodeState):
        kwargs = dict(kwargs, static_layer=state.layers[layer.layer_idx])
    return args, kwargs


def _static_or_eager(layer, *args, **kwargs):
    """A decoder layer's forward: the compiled function for a static step, transformers' own for any other cache
    (a chunked prefill's shapes change every chunk: compiling them would recompile without end)."""
    forward = type(layer).forward
    if isinstance(kwargs.get("past_key_values", kwargs.get("cache")), StaticDecodeState):
        forward = _compiled(forward)
    return forward(layer, *args, **kwargs)


def _decoder(model):
    return model.model if hasattr(model, "model") else model


def compile_static_step(model, fuse_mhc: bool = True, fuse_inputs: bool = False) -> int:
    """Compile every decoder layer of ``model`` for the static step (idempotent); returns the number of layers.
    ``fuse_mhc``: the hyper-connections' Sinkhorn loop entry by entry (:mod:`.fused_mhc`), so that it fuses.
    ``fuse_inputs``: each attention block's input projections as one GEMV (:mod:`.fused_inputs`; ~1 ms less a
    Flash-shaped step at 512K on an H100, but opt-in: under torch 2.11 the fused layers compile one graph per layer,
    not per kind, which with several shapes can exhaust dynamo's cache; docs/BENCHMARKS.md "Runs 26-30";
    ``bench/bench_static.py --fuse-inputs``).

    Graphs are built lazily on the first static steps; ``torch._dynamo.config.cache_size_limit`` is raised so
    that every layer kind and batch size keeps its graph. Other caches (prefill with a ``DynamicCache``, the stock
    decode) keep transformers' eager forward and hyper-connections (:mod:`.fused_mhc` runs its loop only while
    compiling), so the model serves them unchanged."""
    install_static_attention(model)
    if fuse_mhc:
        install_fusable_mhc(model)
    if fuse_inputs:
        fuse_attention_inputs(model)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    layers = _decoder(model).layers
    for layer in layers:
        if "forward" in layer.__dict__:  # already compiled (or wrapped by someone else: leave it)
            continue
        layer.forward = functools.partial(_static_or_eager, layer)
        layer._lsa_store_hook = layer.register_forward_pre_hook(_hand_over_stores, with_kwargs=True)
    return len(layers)


def uncompile_static_step(model) -> None:
    """Back to eager code in every layer and transformers' hyper-connections (torch keeps the compiled graphs)."""
    uninstall_fusable_mhc(model)
    for layer in _decoder(model).layers:
        hook = layer.__dict__.pop("_lsa_store_hook", None)
        if hook is not None:
            hook.remove()
            del layer.forward
