#!/bin/bash
# Results: docs/BENCHMARKS.md, "Runs 22-25"; raw under run23/.
# Device call for issue 18 (written 2026-12-06, thirty-third session), after run 22:
# 1. B = 1 at 128K and 512K again (churn 0.25, prefetch 1): run 22 timed one synchronous trigger at B = 1, the scoring
#    path's first call (1.7-1.8 s); bench_static.py now times eight at every B.
# 2. 128K, B = 47, churn 1.0, prefetch 1 on the stream, with --profile (one trigger, and one start and install, under
#    torch.profiler) and --profile-window (the window's first 8 steps: host ops and Python frames): where run 22's
#    6.6% share (the goal: <= 5%) goes.
# Call: run(timeout_s=600, command="bash docs/bench_results/static_h200/run23.sh"); results under $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s)
F="warning\|online softmax\|split the reduction\|important use case\|^softmax\.$\|^$\|_warn_once\|USDT"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "device: $gpu"
tag=$(echo "$gpu" | grep -q H200 && echo h200 || echo h100)
left() { echo $(( 570 - ($(date +%s) - start) )); }
echo "128K, B = 47, churn 1.0, prefetch 1, profiled"
timeout 300 python3 bench/bench_static.py --compile --triggers --prefetch 1 --prefetch-on stream --churn 1.0 \
  --contexts 131072 --batches 47 --steps 8 --resident 3277 --profile --profile-window \
  --json $OUT/${tag}_resident_128k_b47_d1_churn1.0_profile.json 2>&1 | grep -v -i "$F"
for run in "131072 3277" "524288 13125"; do
  set -- $run
  [ $(left) -gt 90 ] || { echo "no time left for $run"; continue; }
  echo "context $1, $2 slots, B = 1, prefetch 1, churn 0.25"
  timeout $(left) python3 bench/bench_static.py --compile --triggers --prefetch 1 --prefetch-on stream --churn 0.25 \
    --contexts $1 --batches 1 --steps 8 --resident $2 \
    --json $OUT/${tag}_resident_$(( $1 / 1024 ))k_b1_d1_churn0.25.json 2>&1 | grep -v -i "$F"
done
ls -la $OUT
echo "all done at $(( $(date +%s) - start )) s"
