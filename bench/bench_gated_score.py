"""Memory-indexer training throughput at DeepSeek-V4-Flash dimensions: fused Triton kernel vs chunked torch.

The training step of the memory indexer is dominated by the gated score of every row over every visible entry,
z[r, s] = scale * sum_h w_h * relu(q_h . k_s), and its backward (dQ, dW; the keys are frozen).
FLOPs per row and entry: 2*H*D forward, 4*H*D backward. This script checks the fused kernel against the
torch path on fresh random inputs (relative error), then times both (CUDA events, medians after warm-up)
and prints a table; then the whole training step with the focal loss (three steps vs the loss in the
forward's epilogue), for rows that see all entries and for a causal batch (rows see 1/R..R/R of them, as
triggers along a document do: the workload estimate comes from this one). With --json it also writes the
figures.

    python bench/bench_gated_score.py [--rows 256] [--entries 100000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lsa_runtime.kernels import gated_loss, gated_score
from lsa_runtime.kernels.gated_loss import entry_loss, fused_gated_loss, fused_loss_available, gated_loss_torch
from lsa_runtime.kernels.gated_score import fused_gated_logits, gated_logits_torch

try:
    from bench.timing import median_ms
except ImportError:  # run as a script: bench/ is on sys.path
    from timing import median_ms


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def time_ms(fn):
    """triton.testing.do_bench (median over 300 ms after 50 ms of warm-up) on a GPU; median of 10 runs on CPU."""
    if torch.cuda.is_available():
        import triton.testing

        return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
    return median_ms(fn, reps=10)


def workload_flops(n_docs=10_000, lo=16_384, hi=524_288, layers=3, heads=64, dim=128, tau=64, rate=4):
    """FLOPs of one epoch over the method's workload: docs with lengths uniform in [lo, hi].

    A document of N tokens has triggers at k*tau, each scoring ~k*tau/rate visible entries, so
    sum_k k*tau/rate ~ N^2 / (2 * tau * rate) entry-scores per layer, each 6*H*D FLOPs (fwd + bwd).
    """
    mean_sq = (hi ** 3 - lo ** 3) / (3 * (hi - lo))
    return n_docs * layers * 6 * heads * dim * mean_sq / (2 * tau * rate)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    scale = args.dim ** -0.5
    gen = torch.Generator(device=device).manual_seed(0)
    R, H, D, T = args.rows, args.heads, args.dim, args.entries

    def fresh(t=T):
        q = torch.randn(R, H, D, device=device, dtype=dtype, generator=gen)
        w = torch.randn(R, H, device=device, dtype=torch.float32, generator=gen) * H ** -0.5
        k = torch.randn(t, D, device=device, dtype=dtype, generator=gen)
        return q, w, k

    # Correctness on fresh inputs, fast path vs reference path, forward and backward.
    q, w, k = fresh(min(T, 20_000))
    g = torch.randn(R, k.shape[0], device=device, generator=gen)
    qa, wa = q.clone().requires_grad_(), w.clone().requires_grad_()
    za = fused_gated_logits(qa, wa, k, scale)
    (za * g).sum().backward()
    qb, wb = q.float().requires_grad_(), w.clone().requires_grad_()
    zb = gated_logits_torch(qb, wb, k.float(), scale)
    (zb * g).sum().backward()
    errors = {"z": rel_err(za, zb), "dq": rel_err(qa.grad, qb.grad), "dw": rel_err(wa.grad, wb.grad)}

    q, w, k = fresh()
    g = torch.randn(R, T, device=device, generator=gen)
    flops_fwd, flops_all = 2 * R * H * D * T, 6 * R * H * D * T
    results = {}
    paths = [("fused (Triton)" if device == "cuda" else "fused (CPU fallback)", fused_gated_logits),
             ("chunked torch", lambda q, w, k, s: gated_logits_torch(q, w, k, s, chunk=8192))]
    for name, fn in paths:
        qq, ww = q.clone().requires_grad_(), w.clone().requires_grad_()

        def fwd():
            with torch.no_grad():
                fn(qq, ww, k, scale)

        def fwd_bwd():
            qq.grad = ww.grad = None
            (fn(qq, ww, k, scale) * g).sum().backward()

        t_f, t_fb = time_ms(fwd), time_ms(fwd_bwd)
        results[name] = {"fwd_ms": t_f, "fwd_bwd_ms": t_fb, "fwd_tflops": flops_fwd / t_f / 1e9,
                         "fwd_bwd_tflops": flops_all / t_fb / 1e9, "rows_per_s": R / t_fb * 1e3}
        if fn is fused_gated_logits and device == "cuda":
            results[name]["backward_config"] = str(getattr(gated_score._gated_bwd_kernel, "best_config", None))
    best = max(r["fwd_bwd_tflops"] for r in results.values())
    workload = workload_flops(heads=H, dim=D)
    scores = workload / (6 * H * D)  # entry-scores of the workload (each 6 H D FLOPs as fwd + bwd)

    # The whole training step of the loss (scores, focal loss over the visible entries, gradients of q and w):
    # three steps (fused forward, torch loss, fused backward) vs the loss computed in the forward kernel's
    # epilogue (kernels/gated_loss.py) then the backward. Rows see all T entries.
    targets = (torch.rand(R, T, device=device, generator=gen) < 0.01).float()
    n_visible = torch.full((R,), T, device=device, dtype=torch.long)
    step = {}
    qq, ww = q.clone().requires_grad_(), w.clone().requires_grad_()

    def three_steps():
        qq.grad = ww.grad = None
        z = fused_gated_logits(qq, ww, k, scale)
        (entry_loss(z, targets, "focal", 2.0, 0.5).sum(dim=1) / T).sum().backward()

    def loss_in_forward():
        qq.grad = ww.grad = None
        fused_gated_loss(qq, ww, k, targets, n_visible, scale, "focal", 2.0, 0.5).sum().backward()

    # A causal batch, as the trainer sees one: rows are triggers along a document, row r sees n_visible[r]
    # entries (spread evenly over 1..T, shuffled). Only the visible entries are work (the workload counts them);
    # the kernels skip the tiles a row does not see, the three-step path computes the rectangle.
    causal_nv = (torch.randperm(R, device=device, generator=gen) + 1) * T // R

    def loss_in_forward_causal():
        qq.grad = ww.grad = None
        fused_gated_loss(qq, ww, k, targets, causal_nv, scale, "focal", 2.0, 0.5).sum().backward()

    candidates = [("scores, torch loss, backward (3 steps)", three_steps, R * T)]
    if fused_loss_available(q):
        candidates.append(("loss in the forward's epilogue, backward", loss_in_forward, R * T))
        candidates.append(("same, causal batch (visible entries)", loss_in_forward_causal,
                           int(causal_nv.sum())))
        # its gradients against the three steps' on the same inputs
        loss_in_forward()
        g1 = (qq.grad.clone(), ww.grad.clone())
        three_steps()
        errors["loss_fwd_dq"], errors["loss_fwd_dw"] = rel_err(g1[0], qq.grad), rel_err(g1[1], ww.grad)
        loss1 = fused_gated_loss(q, w, k, targets, n_visible, scale).sum()
        loss3 = gated_loss_torch(q.float(), w, k.float(), targets, n_visible, scale).sum()
        errors["loss_fwd_loss"] = rel_err(loss1, loss3)
        # the causal batch (skipped tiles) against the torch path's loss and autograd on the same rows
        loss_in_forward_causal()
        qb, wb = q.float().requires_grad_(), w.clone().requires_grad_()
        lb = gated_loss_torch(qb, wb, k.float(), targets, causal_nv, scale)
        lb.sum().backward()
        la = fused_gated_loss(q, w, k, targets, causal_nv, scale).sum()
        errors["causal_loss"], errors["causal_dq"], errors["causal_dw"] = (
            rel_err(la, lb.sum()), rel_err(qq.grad, qb.grad), rel_err(ww.grad, wb.grad))
        del qb, wb, lb
    for name, fn, visible in candidates:  # visible: the entry-scores the step does (each 6 H D FLOPs)
        if fn is loss_in_forward_causal and device == "cuda":  # tuned for causal batches, as in training
            for kernel in (gated_loss._gated_fwd_loss_kernel, gated_score._gated_bwd_kernel):
                kernel.cache.clear()
        t = time_ms(fn)
        step[name] = {"ms": t, "entry_scores": visible, "tflops_on_visible": 6 * H * D * visible / t / 1e9,
                      "rows_per_s": R / t * 1e3, "workload_minutes": scores * (t / 1e3) / visible / 60}
        if fn is not three_steps and device == "cuda":
            step[name]["configs"] = {"loss": str(gated_loss._gated_fwd_loss_kernel.best_config),
                                     "backward": str(gated_score._gated_bwd_kernel.best_config)}
    summary = {
        "date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "shape": {"rows": R, "heads": H, "dim": D, "entries": T}, "rel_errors": errors, "results": results,
        "workload_flops": workload, "workload_minutes_at_best": workload / (best * 1e12) / 60,
        "training_step": step,
    }
    print(f"gated score + backward, rows={R} heads={H} dim={D} entries={T}, {summary['device']}")
    print("rel. error fused vs torch: " + "  ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    print(f"{'path':34s} {'fwd ms':>9s} {'fwd TFLOP/s':>12s} {'fwd+bwd ms':>11s} {'fwd+bwd TFLOP/s':>16s} "
          f"{'rows/s':>9s}")
    for name, r in results.items():
        print(f"{name:34s} {r['fwd_ms']:9.2f} {r['fwd_tflops']:12.1f} {r['fwd_bwd_ms']:11.2f} "
              f"{r['fwd_bwd_tflops']:16.1f} {r['rows_per_s']:9.0f}")
    print(f"method's workload (10,000 docs of 16K-512K tokens, 3 layers, 1 epoch): {workload:.2e} FLOP "
          f"-> {summary['workload_minutes_at_best']:.1f} min at the best rate above (gated score alone, rows that "
          "see every entry; the training steps below include the loss, the causal one is the workload's shape)")
    print(f"{'training step with the focal loss':42s} {'ms':>8s} {'TFLOP/s on visible':>19s} {'workload min':>13s}")
    for name, r in step.items():
        print(f"{name:42s} {r['ms']:8.2f} {r['tflops_on_visible']:19.1f} {r['workload_minutes']:13.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
