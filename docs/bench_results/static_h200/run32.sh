#!/bin/bash
# Results: docs/BENCHMARKS.md (to write: "Run 32"); raw under run32/.
# Device call for issue 18's follow-up (written 2026-12-06, thirty-fourth session; not run yet). The replay at 512K
# x 64 (13,125 slots) took 45.04 ms without --triggers (run 29, H100) and 54.82 ms with (run 26, another H100); on
# H200s 40.45 ms (run 4) and 50.3 ms (run 12). The replay is timed before any trigger runs; what the mode changes
# in it is the capacity (--triggers --prefetch 1 adds 145 positions: each HCA series 4,097 entry slots instead of
# 4,096, so its attention spans 4,225 keys, no longer a multiple of 8) and the memory layers' h_t writes. On one
# machine: plain, plain with the triggers' capacity (--extra-positions 145), and with --triggers.
# Call: run(timeout_s=600, command="bash docs/bench_results/static_h200/run32.sh"); results under $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s)
F="warning\|online softmax\|split the reduction\|important use case\|^softmax\.$\|^$\|_warn_once\|USDT"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "device: $gpu"
left() { echo $(( ${BUDGET:-570} - ($(date +%s) - start) )); }
T="--triggers --prefetch 1 --prefetch-on stream --churn 1.0"
for spec in plain:"" capacity:"--extra-positions 145" triggers:"$T"; do
  name=${spec%%:*} extra=${spec#*:}
  [ $(left) -gt 100 ] || { echo "out of time before $name"; continue; }
  echo "512K, B = 64, 13,125 slots: $name ($extra)"
  timeout $(( $(left) - 10 )) python3 bench/bench_static.py --compile --contexts 524288 --batches 64 --steps 8 \
    --resident 13125 $extra --json $OUT/b64_$name.json 2>&1 | grep -v -i "$F"
done
echo "all done at $(( $(date +%s) - start )) s"
