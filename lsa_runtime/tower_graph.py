"""The memory indexer's trigger towers replayed as one CUDA graph.

At a trigger, the towers of the three memory layers (W_DQ h_t, the latent RMSNorm, W_IUQ, RoPE_t, W_w) are
about 45 small kernels on a handful of rows: on a GPU their launch overhead, not their arithmetic, is most of
the trigger's scoring time (docs/BENCHMARKS.md). :class:`TriggerTowerGraph` captures them once per
(indexer weights, device, dtype) and replays them with one launch; the inputs are copied into static buffers
(h_t of every layer, the position t on the device, so nothing synchronises). The graph reads the weights where
they are, so in-place weight updates are seen; moving the indexer (``.to``) builds a new graph.

Replay runs exactly the kernels the eager path runs, on the same operands: the results are bit-identical
(tests/test_tower_graph.py, GPU). Without CUDA the eager path runs; ``MemoryIndexer.cuda_graphs = False``
selects it on a GPU too.
"""

from __future__ import annotations

from typing import Callable

import torch


class TriggerTowerGraph:
    """``towers(hidden [n, d], positions [n]) -> (q [n, H, dh], w [n, H])`` captured as a CUDA graph."""

    def __init__(self, towers: Callable, n_rows: int, hidden_size: int, dtype: torch.dtype, device: torch.device):
        self.hidden = torch.zeros(n_rows, hidden_size, dtype=dtype, device=device)
        self.positions = torch.zeros(n_rows, dtype=torch.long, device=device)
        with torch.cuda.device(device), torch.no_grad():  # capture on the indexer's device, whatever is current
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up off the capture (cuBLAS handles, lazy init), as torch asks
                for _ in range(2):
                    towers(self.hidden, self.positions)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: a capture on the prefetch thread (lsa_runtime/prefetch.py) is not invalidated by the
            # decode thread's own CUDA calls meanwhile
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.q, self.w = towers(self.hidden, self.positions)

    def __call__(self, hidden: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy the inputs in, replay, and return fresh copies of (q, w) (the static outputs are reused)."""
        self.hidden.copy_(hidden)
        self.positions.fill_(int(position))
        self.graph.replay()
        return self.q.clone(), self.w.clone()


def graph_key(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> tuple:
    """What a captured graph depends on: where every weight lives, the device and the input dtype."""
    return (str(device), dtype, tuple(p.data_ptr() for p in module.parameters()),
            tuple(b.data_ptr() for b in module.buffers()))
