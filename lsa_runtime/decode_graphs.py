"""CUDA graphs for the stateless modules of DeepSeek-V4's one-token decode step.

An eager V4 decode step is host-bound at small batch: kernel launches and operator dispatch, not arithmetic
(docs/BENCHMARKS.md). Most of a step's operators are in the manifold-constrained hyper-connections (mHC, paper
section 2.2; each ``DeepseekV4HyperConnection`` computes its pre/post/comb weights with a hc_sinkhorn_iters =
20 step Sinkhorn-Knopp loop, two per layer, on a [1, 1, hc_mult, hidden] input), then attention and the MoE
blocks (counts by module: ``bench/bench_decode.py --count-ops``). The mHC and MoE modules hold no state
and at decode always see the same shapes: each one is captured once as a CUDA graph and replayed with one
launch (plus the copy of its inputs into static buffers).

:func:`install_decode_graphs` wraps, in one model, every module of the classes it is given: by default the
hyper-connections ``DeepseekV4HyperConnection`` and the final ``DeepseekV4HyperHead``, and the MoE blocks
``DeepseekV4SparseMoeBlock`` when their experts run a synchronisation-free implementation (transformers'
default ``grouped_mm``, or ``batched_mm``; the ``eager`` experts loop calls ``nonzero``, which a capture
forbids). A module whose capture still fails (e.g. ``grouped_mm`` copies from pageable host memory in fp32) is
noted in :attr:`DecodeGraphs.failed` and runs eagerly. Attention and the KV cache stay eager: they change state
every step (that is where LSA's resident set lives). A wrapped module replays its graph only when it can (CUDA
input, one token per row, gradients off, inputs of a shape it has captured or may still capture) and runs
eagerly otherwise (prefill, CPU, training). The wrapper does not fork the module: it replaces the instance's
``forward`` attribute and :meth:`DecodeGraphs.remove` puts it back.

Replay runs the kernels the eager forward runs, on the same operands: outputs are bit-identical
(tests/test_decode_graphs.py, GPU). A replay's outputs are the graph's static buffers, valid until the same
module runs again (the next step); the decoder layer consumes them at once. A graph reads the weights where
they were at capture: install after the model has its final weights and device, and remove before moving or
reloading it.
"""

from __future__ import annotations

from typing import Iterable

import torch

DEFAULT_CLASSES = ("DeepseekV4HyperConnection", "DeepseekV4HyperHead", "DeepseekV4SparseMoeBlock")
SYNC_FREE_EXPERTS = ("batched_mm", "grouped_mm")  # transformers' experts implementations without nonzero()


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    return [a for a in list(args) + [kwargs[k] for k in sorted(kwargs)] if isinstance(a, torch.Tensor)]


def _signature(args: tuple, kwargs: dict) -> tuple:
    """What a captured graph is valid for: each tensor's shape/dtype/device, every other argument's value."""
    def one(a):
        if isinstance(a, torch.Tensor):
            return ("T", tuple(a.shape), a.dtype, str(a.device))
        return ("V", repr(a))
    return tuple(one(a) for a in args) + tuple((k, one(kwargs[k])) for k in sorted(kwargs))


class _GraphedForward:
    """One module's forward: replay a captured graph for a known input signature, capture a new one (at most
    ``max_graphs``), or run the original forward."""

    def __init__(self, module: torch.nn.Module, pool, max_graphs: int):
        self.module = module
        self.eager = module.forward  # the bound original (the instance attribute is what we replace)
        self.pool = pool
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, tuple] = {}  # signature -> (graph, static inputs, static output)
        self.replays = 0
        self.failed: str | None = None  # why a capture failed: the module then always runs eagerly

    def _eligible(self, tensors: list[torch.Tensor]) -> bool:
        if torch.is_grad_enabled() or not tensors or not all(t.device.type == "cuda" for t in tensors):
            return False
        first = tensors[0]
        # decode: one token per row ([B, 1, ...]); a prefill chunk of any length runs eagerly
        return first.dim() >= 2 and first.shape[1] == 1 and not torch.cuda.is_current_stream_capturing()

    def _capture(self, args, kwargs, signature):
        static_args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        static_kwargs = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        device = _tensors(args, kwargs)[0].device
        with torch.cuda.device(device):
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up off the capture (cuBLAS handles, lazy init), as torch asks
                for _ in range(2):
                    self.eager(*static_args, **static_kwargs)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                # thread_local: a prefetch thread (lsa_runtime/prefetch.py) may use the GPU during a capture
                with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                    static_out = self.eager(*static_args, **static_kwargs)
            except RuntimeError as exc:  # the forward does something a capture forbids (a sync, a pageable copy)
                self.failed = f"{type(self.module).__name__}: {str(exc).splitlines()[0]}"
                return None
        entry = (graph, _tensors(static_args, static_kwargs), static_out)
        self.graphs[signature] = entry
        return entry

    def __call__(self, *args, **kwargs):
        tensors = _tensors(args, kwargs)
        if self.failed is not None or not self._eligible(tensors):
            return self.eager(*args, **kwargs)
        signature = _signature(args, kwargs)
        entry = self.graphs.get(signature)
        if entry is None:
            if len(self.graphs) >= self.max_graphs:
                return self.eager(*args, **kwargs)
            entry = self._capture(args, kwargs, signature)
            if entry is None:
                return self.eager(*args, **kwargs)
        graph, static_inputs, static_out = entry
        for buf, value in zip(static_inputs, tensors):
            buf.copy_(value)
        graph.replay()
        self.replays += 1
        return static_out


class DecodeGraphs:
    """The graphs installed in one model; :meth:`remove` restores the eager forwards and frees the graphs."""

    def __init__(self, wrapped: list[_GraphedForward], skipped: dict[str, str]):
        self.wrapped = wrapped
        self.skipped = skipped  # class name -> why it was not wrapped

    @property
    def replays(self) -> int:
        return sum(w.replays for w in self.wrapped)

    @property
    def graphs(self) -> int:
        return sum(len(w.graphs) for w in self.wrapped)

    @property
    def failed(self) -> dict[str, str]:
        """Module class -> why its capture failed (those modules run eagerly), e.g. an experts implementation that
        copies from pageable host memory in this dtype."""
        return {w.failed.split(":")[0]: w.failed for w in self.wrapped if w.failed is not None}

    def remove(self) -> None:
        for w in self.wrapped:
            if w.module.__dict__.get("forward") is w:
                del w.module.forward  # back to the class's forward
            w.graphs.clear()
        self.wrapped = []


def experts_sync_free(model: torch.nn.Module) -> bool:
    """Whether the model's MoE experts run without host synchronisation (and so can be captured)."""
    impl = getattr(model.config, "_experts_implementation", None)
    return impl in SYNC_FREE_EXPERTS


def install_decode_graphs(model: torch.nn.Module, classes: Iterable[str] = DEFAULT_CLASSES,
                          max_graphs: int = 2) -> DecodeGraphs:
    """Wrap every module of ``classes`` (class names) in ``model`` so its one-token forward replays a CUDA graph.

    ``max_graphs``: signatures captured per module (batch sizes, dtypes); further ones run eagerly. All graphs
    share one memory pool. MoE blocks are skipped unless :func:`experts_sync_free`. Returns the handle that
    removes them. Without CUDA nothing is wrapped (the handle is empty). Installing again in the same model
    returns the installed handle."""
    installed = getattr(model, "_lsa_decode_graphs", None)
    if installed is not None and installed.wrapped:
        return installed
    classes = set(classes)
    skipped: dict[str, str] = {}
    if not torch.cuda.is_available():
        return DecodeGraphs([], {c: "no CUDA" for c in classes})
    if "DeepseekV4SparseMoeBlock" in classes and not experts_sync_free(model):
        classes.discard("DeepseekV4SparseMoeBlock")
        skipped["DeepseekV4SparseMoeBlock"] = ("experts implementation "
                                               f"{getattr(model.config, '_experts_implementation', None)!r} "
                                               "synchronises (nonzero); use one of " + ", ".join(SYNC_FREE_EXPERTS))
    pool = torch.cuda.graph_pool_handle()
    wrapped = []
    for module in model.modules():
        if type(module).__name__ in classes and not isinstance(module.__dict__.get("forward"), _GraphedForward):
            w = _GraphedForward(module, pool, max_graphs)
            module.forward = w
            wrapped.append(w)
    handle = DecodeGraphs(wrapped, skipped)
    model._lsa_decode_graphs = handle
    return handle
