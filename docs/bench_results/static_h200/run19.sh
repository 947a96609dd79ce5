#!/bin/bash
# Results: docs/BENCHMARKS.md, "Run 19"; raw under run19/.
# H200 call for issue 18 (written 2026-12-03, tenth session; not run yet): the Session end to end on the static
# path, Flash-shaped model (bench/flash_model.py, no tokenizer), compiled, 1,024-token prompts, 200 new tokens,
# greedy: the Session's own host work between two steps (sampling, bookkeeping, the loop) against the step itself,
# at 16 and 64 rows, mode full; then mode random with a budget, prefetched one step ahead (the stream prefetcher).
# Call: run(timeout_s=600, command="bash docs/bench_results/static_h200/run19.sh"); results under $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
F="warning\|online softmax\|split the reduction\|important use case\|^softmax\.$\|^$\|_warn_once\|USDT"
timeout 330 python3 bench/bench_session_host.py --flash --batches 16,64 --prompt-tokens 1024 --new-tokens 200 \
  --runs 1 2>&1 | grep -v -i "$F" | tee $OUT/full.txt
timeout 230 python3 bench/bench_session_host.py --flash --batches 64 --prompt-tokens 1024 --new-tokens 200 \
  --runs 1 --mode random --budget 64 --prefetch-steps 1 2>&1 | grep -v -i "$F" | tee $OUT/random_prefetch1.txt
