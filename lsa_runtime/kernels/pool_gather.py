"""Zero-copy gather of scattered cold-pool rows straight from pinned host memory into device memory.

A trigger fetches entries scattered over the cold pool. The staged path (``ColdPool.gather``) gathers them on
the CPU into a pinned staging buffer and then copies that buffer to the device, so the CPU gather bounds it.
Here the GPU does the gather itself: pinned host memory is mapped into the device's address space (CUDA unified
addressing), so a kernel can read row ``ids[i]`` of the host pool over PCIe and write it to row ``i`` of a
device tensor, hundreds of rows in flight (:data:`PROGRAMS` programs of 16 rows): one pass over the bus (figures:
docs/BENCHMARKS.md, "Trigger cost" with a program per block, "Runs 26-30" with 32; ``bench/bench_trigger.py``).
``ColdPool.gather`` uses it by default on a GPU. On the CPU it is tested under the Triton interpreter.
"""

from __future__ import annotations

import contextlib

import torch

from .gated_score import triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _gather_rows_kernel(SRC, IDS, DST, n_rows, width, stride_src, stride_dst,
                            ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
        # each program takes blocks of ROWS rows in turn (grid-stride): the grid may be smaller than the work
        cols = tl.arange(0, BLOCK_W)
        for block in range(tl.program_id(0), tl.cdiv(n_rows, ROWS), tl.num_programs(0)):
            rows = block * ROWS + tl.arange(0, ROWS)
            row_ok = rows < n_rows
            src_rows = tl.load(IDS + rows, mask=row_ok, other=0).to(tl.int64)
            for c0 in range(0, width, BLOCK_W):
                col_ok = (c0 + cols) < width
                mask = row_ok[:, None] & col_ok[None, :]
                values = tl.load(SRC + src_rows[:, None] * stride_src + (c0 + cols)[None, :], mask=mask)
                tl.store(DST + rows[:, None].to(tl.int64) * stride_dst + (c0 + cols)[None, :], values, mask=mask)


PROGRAMS = 32
"""Most programs of one gather launch (each takes blocks of 16 rows in turn); 0: one program per block. A gather
that runs beside a decode step (a prefetched trigger, on its side stream) holds the SMs it is given while its reads
cross PCIe, and the step's kernels wait for them; 32 programs keep enough reads in flight for the bus and leave the
other SMs to the step (measured: docs/BENCHMARKS.md, "Runs 24-25"; the gather alone ~4% slower, "Runs 26-30")."""


def _grid(blocks: int, programs: int | None) -> int:
    """Programs to launch for ``blocks`` blocks of work: ``programs`` (None: :data:`PROGRAMS`) caps them, 0 none."""
    cap = PROGRAMS if programs is None else programs
    if cap < 0:
        raise ValueError(f"programs must be >= 0, got {cap}")
    return max(1, min(blocks, cap)) if cap else max(1, blocks)


def _on(device: torch.device):
    """Make ``device`` the current CUDA device for a launch (a no-op on the CPU interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()

def zero_copy_available(source: torch.Tensor, device: torch.device | str) -> bool:
    """The kernel needs Triton, a CUDA target and a pinned host source (or the CPU interpreter for checks)."""
    import os

    if triton is None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return torch.device(device).type == "cuda" and source.is_pinned()


def gather_rows(source: torch.Tensor, ids: torch.Tensor, device: torch.device | str,
                out: torch.Tensor | None = None, programs: int | None = None) -> torch.Tensor:
    """``source[ids]`` written to ``device`` by a device-side gather: source [N, W] (pinned host, contiguous
    rows), ids [n] int64 -> [n, W] on ``device``; ``programs``: see :data:`PROGRAMS`. Call only where
    :func:`zero_copy_available` is true."""
    device = torch.device(device)
    ids = ids.to(device=device if device.type == "cuda" else "cpu", dtype=torch.long).reshape(-1)
    n, width = ids.numel(), source.shape[1]
    if out is None:
        out = torch.empty((n, width), dtype=source.dtype, device=device)
    if n == 0:
        return out
    if source.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError("gather_rows needs row-contiguous source and output")
    rows_per_program, block_w = 16, min(256, triton.next_power_of_2(width))
    grid = (_grid(triton.cdiv(n, rows_per_program), programs),)
    with _on(out.device):  # Triton launches on the current device: the output's
        _gather_rows_kernel[grid](source, ids, out, n, width, source.stride(0), out.stride(0),
                                  ROWS=rows_per_program, BLOCK_W=block_w)
    return out


if triton is not None:

    @triton.jit
    def _gather_layers_kernel(SRC_PTRS, IDS, DST_ROWS, DST, n_rows, n_layers, width, stride_src, stride_dl,
                              stride_dr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
        # blocks of ROWS rows times layers, each program taking them in turn (grid-stride, layer-major)
        blocks = tl.cdiv(n_rows, ROWS)
        cols = tl.arange(0, BLOCK_W)
        for task in range(tl.program_id(0), blocks * n_layers, tl.num_programs(0)):
            layer = task // blocks
            src = tl.load(SRC_PTRS + layer).to(tl.pointer_type(DST.dtype.element_ty))  # this layer's row store
            rows = (task % blocks) * ROWS + tl.arange(0, ROWS)
            row_ok = rows < n_rows
            src_rows = tl.load(IDS + rows, mask=row_ok, other=0).to(tl.int64)
            dst_rows = tl.load(DST_ROWS + rows, mask=row_ok, other=0).to(tl.int64)
            for c0 in range(0, width, BLOCK_W):
                col_ok = (c0 + cols) < width
                mask = row_ok[:, None] & col_ok[None, :]
                values = tl.load(src + src_rows[:, None] * stride_src + (c0 + cols)[None, :], mask=mask)
                tl.store(DST + layer.to(tl.int64) * stride_dl + dst_rows[:, None] * stride_dr
                         + (c0 + cols)[None, :], values, mask=mask)


def gather_rows_layers(sources: list[torch.Tensor], ids: torch.Tensor, dst_rows: torch.Tensor,
                       out: torch.Tensor, programs: int | None = None) -> torch.Tensor:
    """``out[l, dst_rows[i]] = sources[l][ids[i]]`` for every layer l, in ONE launch: a trigger moves the same
    entries in all 21 CSA layers, and per-layer launches cost more host time than the copies themselves.

    ``sources``: one ``[N_l, W]`` row-contiguous tensor per layer, all pinned host (zero-copy reads over PCIe)
    or all on ``out``'s device, same dtype and row stride; ``ids`` / ``dst_rows``: int64 on ``out``'s device
    (ids < every N_l); ``out``: ``[L, R, W]`` with row-contiguous layers; ``programs``: see :data:`PROGRAMS`. Call
    only where :func:`zero_copy_available` is true for the sources."""
    n = ids.numel()
    if n == 0 or not sources:
        return out
    width, stride = sources[0].shape[1], sources[0].stride(0)
    if any(s.stride(0) != stride or s.stride(1) != 1 or s.dtype != out.dtype for s in sources) or out.stride(2) != 1:
        raise ValueError("gather_rows_layers needs row-contiguous sources of one dtype and row stride")
    if out.shape[0] != len(sources) or out.shape[2] != width:
        raise ValueError(f"out {tuple(out.shape)} does not fit {len(sources)} layers of width {width}")
    pointers = torch.tensor([s.data_ptr() for s in sources], dtype=torch.int64).to(out.device)
    rows_per_program, block_w = 16, min(256, triton.next_power_of_2(width))
    grid = (_grid(triton.cdiv(n, rows_per_program) * len(sources), programs),)
    with _on(out.device):  # Triton launches on the current device: the output's
        _gather_layers_kernel[grid](pointers, ids, dst_rows, out, n, len(sources), width, stride, out.stride(0),
                                    out.stride(1), ROWS=rows_per_program, BLOCK_W=block_w)
    return out
