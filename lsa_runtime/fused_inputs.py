"""One GEMV for every projection that reads an attention block's input, in the static decode step.

At batch 1 the step's small GEMVs cost their launch, not their bytes (docs/BENCHMARKS.md, "Run 17": ~380 GEMVs
of 0.8-8.4 MB at 4.4-6.5 us each, against 0.16-1.75 us for their bytes at 4.8 TB/s). A DeepSeek-V4 attention
block projects its input x with up to seven matrices: the query's low-rank down-projection (``q_a_proj``), the
shared K=V (``kv_proj``), its compressor's C and Z (``compressor.kv_proj`` / ``gate_proj``) and, in a CSA layer,
the Lightning Indexer's own compressor (``compressor.indexer.kv_proj`` / ``gate_proj``) and its head weights
w_h(t) of I[t,s] (``compressor.indexer.scorer.weights_proj``). :func:`fuse_attention_inputs` stacks them into
one matrix per block and makes each module's weight a view of its rows: no extra memory, and the modules compute
what they did (transformers' eager path, the numerical reference, is unchanged). :func:`project_inputs` runs the
one GEMV and splits it by module. Every output element is the same dot product as before; only the GEMM kernel's
blocking, hence the rounding, may differ (tests/test_fused_inputs.py).

Fuse once the model sits on its device in its dtype: ``Module.to`` copies a view's storage apart from the stack
(the values stay equal; the memory saving is lost until fused again).
"""

from __future__ import annotations

import torch
from torch import nn

# the projections of an attention block's input x, by path under the block, in the stack's row order
INPUT_PROJECTIONS = ("q_a_proj", "kv_proj", "compressor.kv_proj", "compressor.gate_proj",
                     "compressor.indexer.kv_proj", "compressor.indexer.gate_proj",
                     "compressor.indexer.scorer.weights_proj")
STACK = "_fused_input_weight"  # the block's stacked weight (a non-persistent buffer: never in a state dict)
NAMES = "_fused_input_names"
SIZES = "_fused_input_sizes"


def _linear(block: nn.Module, path: str) -> nn.Linear | None:
    module = block
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module if type(module) is nn.Linear else None  # a quantised subclass keeps its own kernel


def fuse_attention_inputs(model) -> int:
    """Stack the input projections of every attention block of ``model`` (idempotent); returns how many blocks
    hold a stack. A block is left alone unless its projections are plain bias-free ``nn.Linear`` of one dtype and
    device (a quantised or offloaded checkpoint keeps its modules)."""
    decoder = model.model if hasattr(model, "model") else model
    fused = 0
    for layer in decoder.layers:
        block = layer.self_attn
        if getattr(block, STACK, None) is not None:
            fused += 1
            continue
        found = [(path, _linear(block, path)) for path in INPUT_PROJECTIONS]
        found = [(path, m) for path, m in found if m is not None]
        weights = [m.weight for _, m in found]
        if len(found) < 2 or any(m.bias is not None for _, m in found) or \
                len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1 or weights[0].device.type == "meta":
            continue
        with torch.no_grad():
            stack = torch.cat([w.detach() for w in weights], dim=0)
        start = 0
        for _, module in found:
            rows = module.weight.shape[0]
            module.weight = nn.Parameter(stack[start:start + rows], requires_grad=module.weight.requires_grad)
            start += rows
        block.register_buffer(STACK, stack, persistent=False)
        setattr(block, NAMES, tuple(path for path, _ in found))
        setattr(block, SIZES, tuple(m.weight.shape[0] for _, m in found))
        fused += 1
    return fused


def project_inputs(block: nn.Module, hidden_states: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """``{path: x @ W_path^T}`` for every stacked projection of ``block`` from one GEMV, or None if the block has
    no stack (each projection then runs alone)."""
    stack = getattr(block, STACK, None)
    if stack is None:
        return None
    out = nn.functional.linear(hidden_states, stack)
    return dict(zip(getattr(block, NAMES), out.split(getattr(block, SIZES), dim=-1)))
