"""mHC's weights with the Sinkhorn-Knopp loop written entry by entry, so that a compiler fuses it into one kernel.

transformers' ``DeepseekV4HyperConnection`` projects the ``hc_mult`` residual streams to ``pre``, ``post`` and a
``hc x hc`` matrix ``comb`` made doubly stochastic by ``hc_sinkhorn_iters`` (20) alternating column and row
normalisations, each a ``sum`` over one axis of a 4 x 4 matrix. Compiled (:mod:`.compiled_step`), inductor generates
48 loop nests for one hyper-connection (``torch._inductor.metrics.generated_kernel_count`` on a CPU, whose backend
then merges them into 2 functions); a GPU backend cannot put reductions over different axes in one kernel, so most
of them stay kernels there. Here the same arithmetic runs
on the 16 entries as separate ``[B, S]`` tensors: the sums are plain additions, the whole loop is pointwise and
fuses (14 loop nests on a CPU with the fusion limit that :mod:`.compiled_step` sets). On the H200 the compiled Flash
step goes from 8,139 to 4,957 kernels and 19.8 to 16.3 ms at 512K, batch 1 (docs/BENCHMARKS.md, run 3).

:class:`FusableHyperConnection` is mixed into the model's hyper-connections by :func:`install_fusable_mhc` (a
subclass swap, as :func:`.static_decode.install_static_attention`); only the compiled path installs it, and its
forward takes the entry-wise loop only while being compiled (eager, the unrolled loop would launch more kernels,
not fewer, so eager callers keep transformers' forward). transformers' forward stays the reference: same outputs
up to fp32 summation order (tests/test_static_decode.py).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def sinkhorn_by_entries(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """transformers' loop on ``comb`` ``[..., n, n]``: normalise the columns, then ``iters - 1`` times the rows and
    the columns (each divided by its sum + ``eps``); the sums added entry by entry, left to right."""
    n = comb.shape[-1]
    c = [[comb[..., i, j] for j in range(n)] for i in range(n)]

    def columns(c):
        sums = [functools.reduce(torch.add, (c[i][j] for i in range(n))) + eps for j in range(n)]
        return [[c[i][j] / sums[j] for j in range(n)] for i in range(n)]

    def rows(c):
        sums = [functools.reduce(torch.add, c[i]) + eps for i in range(n)]
        return [[c[i][j] / sums[i] for j in range(n)] for i in range(n)]

    c = columns(c)
    for _ in range(iters - 1):
        c = columns(rows(c))
    return torch.stack([torch.stack(row, dim=-1) for row in c], dim=-2)


class FusableHyperConnection:
    """Mixed into ``DeepseekV4HyperConnection``: while compiled, its forward (transformers 5.17-5.24) with the
    Sinkhorn loop replaced by :func:`sinkhorn_by_entries` (:meth:`entrywise_forward`); eager, transformers' own.
    Returns ``(post, comb, collapsed)`` as the stock forward does."""

    def forward(self, hidden_streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():
            return self.entrywise_forward(hidden_streams)
        return super().forward(hidden_streams)

    def entrywise_forward(self, hidden_streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch_size, seq_len = hidden_streams.shape[:2]
        hc = self.hc_mult
        flattened = self.input_norm(hidden_streams.view(batch_size, seq_len, -1).float())
        flattened = F.linear(flattened, self.fn.float())
        pre_w, post_w, comb_w = flattened.split([hc, hc, hc * hc], dim=-1)
        pre_b, post_b, comb_b = self.base.split([hc, hc, hc * hc])
        pre_scale, post_scale, comb_scale = self.scale.unbind(0)
        comb_w = comb_w.view(*comb_w.shape[:-1], hc, hc)
        pre = torch.sigmoid(pre_w * pre_scale + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post_w * post_scale + post_b)
        comb = torch.softmax(comb_w * comb_scale + comb_b.view(hc, hc), dim=-1) + self.hc_eps
        comb = sinkhorn_by_entries(comb, self.hc_sinkhorn_iters, self.hc_eps)
        collapsed = (pre.unsqueeze(-1) * hidden_streams).sum(dim=2).to(hidden_streams.dtype)
        return post, comb, collapsed


@functools.cache
def _fusable_class(base: type) -> type:
    return type(f"Fusable{base.__name__}", (FusableHyperConnection, base), {})


def install_fusable_mhc(model) -> int:
    """Swap every hyper-connection of ``model`` to :class:`FusableHyperConnection` (idempotent); returns how many."""
    count = 0
    for module in model.modules():
        if type(module).__name__ == "DeepseekV4HyperConnection":
            module.__class__ = _fusable_class(type(module))
            count += 1
        elif isinstance(module, FusableHyperConnection):
            count += 1
    return count


def uninstall_fusable_mhc(model) -> None:
    """Back to transformers' hyper-connection forward."""
    for module in model.modules():
        if isinstance(module, FusableHyperConnection):
            module.__class__ = type(module).__mro__[2]
