#!/bin/bash
# Results: docs/BENCHMARKS.md, "Runs 22-25"; raw under run25/.
# Device call for issue 18 (thirty-third session), right after run 24 on the same machine: the gather's programs
# again, alternating, at B = 128 (run 13's churn-1.0 case: 9.0%) and B = 47, churn 1.0, each step waiting for every
# stream (the bench's measure since run 13).
# Call: run(timeout_s=460, command="BUDGET=420 bash docs/bench_results/static_h200/run25.sh"); results under $OUT
# (in run25/ renamed 1_ .. 5_ in the order of the calls, the time stamps dropped).
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s)
F="warning\|online softmax\|split the reduction\|important use case\|^softmax\.$\|^$\|_warn_once\|USDT"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "device: $gpu"
tag=$(echo "$gpu" | grep -q H200 && echo h200 || echo h100)
left() { echo $(( ${BUDGET:-480} - ($(date +%s) - start) )); }
for run in "128 32" "128 0" "47 0" "47 32" "128 32"; do
  set -- $run
  [ $(left) -gt 50 ] || { echo "no time left for $run"; continue; }
  echo "128K, B = $1, churn 1.0, prefetch 1, gather programs $2"
  timeout $(left) python3 bench/bench_static.py --compile --triggers --prefetch 1 --prefetch-on stream --churn 1.0 \
    --contexts 131072 --batches $1 --steps 8 --resident 3277 --gather-programs $2 \
    --json $OUT/${tag}_128k_b$1_churn1.0_p$2_$(date +%s).json 2>&1 | grep -v -i "$F"
done
echo "all done at $(( $(date +%s) - start )) s"
