#!/bin/bash
# Results: docs/BENCHMARKS.md, "Runs 22-25"; raw under run24/.
# Device call for issue 18 (written 2026-12-06, thirty-third session), after runs 22-23: the prefetched trigger's
# share at 128K, B = 47, churn 1.0 (run 22: 6.6%, the goal <= 5%), one machine, four variants in turn:
#   programs 0, wait device   (runs 13-23: one gather program per 16 rows and layer; each step waits for every stream)
#   programs 32, wait device  (the zero-copy gather in at most 32 programs: leaves the other SMs to the replay)
#   programs 32, wait stream  (and each step waits for the decode stream alone, as a Session's does)
#   programs 0, wait stream
# Call: run(timeout_s=560, command="BUDGET=500 bash docs/bench_results/static_h200/run24.sh"); results under $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s)
F="warning\|online softmax\|split the reduction\|important use case\|^softmax\.$\|^$\|_warn_once\|USDT"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "device: $gpu"
tag=$(echo "$gpu" | grep -q H200 && echo h200 || echo h100)
left() { echo $(( ${BUDGET:-480} - ($(date +%s) - start) )); }
for run in "0 device" "32 device" "32 stream" "0 stream"; do
  set -- $run
  [ $(left) -gt 50 ] || { echo "no time left for $run"; continue; }
  echo "128K, B = 47, churn 1.0, prefetch 1, gather programs $1, wait $2"
  timeout $(left) python3 bench/bench_static.py --compile --triggers --prefetch 1 --prefetch-on stream --churn 1.0 \
    --contexts 131072 --batches 47 --steps 8 --resident 3277 --gather-programs $1 --wait $2 \
    --json $OUT/${tag}_128k_b47_churn1.0_p$1_$2.json 2>&1 | grep -v -i "$F"
done
echo "all done at $(( $(date +%s) - start )) s"
