"""The Session's own host time per row and decode step on the static path: everything a step costs outside the
model's step (the runner's replay on a GPU), i.e. sampling, text, trigger bookkeeping, the loop.

    python bench/bench_session_host.py [--model tiny] [--batches 4,16,64] [--new-tokens 200] [--mode full]
    python bench/bench_session_host.py --flash --batches 16,64 --prompt-tokens 1024     # on a GPU

``Session(static_decode=True, max_batch=B)`` decodes B random prompts of ``--prompt-tokens`` greedily (all
prefilled before the first step); the host clock between the end of one ``StaticRunner.step`` (the model's step,
eager on a CPU) and the start of the next, divided by B, is the Session's host work per row and step. On a GPU
that work runs while the device idles (the next step needs the sampled tokens), so it adds to a step whatever the
model: the figure to set against a Flash-shaped step (~42 ms at 128 rows x 128K on the H200, docs/BENCHMARKS.md).
Best of ``--runs`` runs (2). ``--flash`` (a GPU): the Flash-shaped model of ``bench/flash_model.py`` (random bf16,
no tokenizer: no text; bench/bench_detokenize.py times that) with the static step compiled (``static_compile``); the
timed ``StaticRunner.step`` then waits for its replay (a device synchronise), so the step's column is the replay
and the gaps are the host work alone, a prefetched trigger's job included (in a Session it overlaps the replay:
an upper bound there).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lsa_runtime.backbone import load_backbone  # noqa: E402
from lsa_runtime.session import Session  # noqa: E402
from lsa_runtime.static_runner import StaticRunner  # noqa: E402


def run(model, tokenizer, batch: int, args) -> tuple[float, int, float]:
    """One generate call of ``batch`` prompts (all prefilled before the first step): (seconds between the end of one
    runner step and the start of the next, summed; gaps counted; the median step's seconds)."""
    prompts = [torch.randint(3, model.config.vocab_size, (args.prompt_tokens,),
                             generator=torch.Generator().manual_seed(i)).tolist() for i in range(batch)]
    gaps, steps, last_end = [], [], [None]
    original = StaticRunner.step

    def timed(self, tokens):
        start = time.perf_counter()
        if last_end[0] is not None:
            gaps.append(start - last_end[0])
        out = original(self, tokens)
        if args.flash:  # the replay is asynchronous: the step ends when the device is done
            torch.cuda.synchronize()
        last_end[0] = time.perf_counter()
        steps.append(last_end[0] - start)
        return out

    options = {"mode": args.mode} if args.mode == "full" else {"mode": args.mode, "budget": args.budget,
                                                                "prefetch_steps": args.prefetch_steps}
    session = Session(model, tokenizer, static_decode=True, static_compile=args.flash, max_batch=batch, **options)
    StaticRunner.step = timed
    try:
        session.generate(prompts, max_new_tokens=args.new_tokens, stop_at_eos=False)
    finally:
        StaticRunner.step = original
    return sum(gaps), len(gaps), sorted(steps)[len(steps) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batches", default="4,16,64", help="rows decoding together, comma-separated")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--mode", default="full", choices=("full", "recent", "random"),
                    help="full, or a trigger mode with --budget (triggers every 64 steps)")
    ap.add_argument("--budget", type=int, default=16)
    ap.add_argument("--prefetch-steps", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=2, help="generate calls per batch size, the best reported")
    ap.add_argument("--flash", action="store_true",
                    help="the Flash-shaped model (bench/flash_model.py) on a CUDA device, its static step compiled")
    args = ap.parse_args()
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1 or args.new_tokens < 2 or args.prompt_tokens < 1 or args.runs < 1:
        raise SystemExit("error: --batches must be positive integers, --new-tokens >= 2, --prompt-tokens >= 1, "
                         "--runs >= 1")
    if args.flash and not torch.cuda.is_available():
        raise SystemExit("error: --flash needs a CUDA device")
    torch.set_num_threads(args.threads)
    if args.flash:
        from bench.flash_model import build_flash_model

        model, tokenizer = build_flash_model(), None
    else:
        model, tokenizer = load_backbone(args.model, dtype=torch.float32)
    print(f"{'rows':>5} {'gaps':>6} {'host ms/step':>13} {'host us per row-step':>21} {'step ms (median)':>17}  "
          f"(mode {args.mode})")
    for batch in batches:
        host, gaps, step = min(run(model, tokenizer, batch, args) for _ in range(args.runs))
        print(f"{batch:>5} {gaps:>6} {1e3 * host / gaps:13.2f} {1e6 * host / (gaps * batch):21.1f} {1e3 * step:17.2f}",
              flush=True)


if __name__ == "__main__":
    main()
