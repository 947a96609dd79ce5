#!/bin/bash
# Results: docs/BENCHMARKS.md, "Run 16"; raw under run16/.
# H200 call for issue 18's first goal (tenth session, 2026-12-03): the batch-1 step at 512K, full and LSA (13,125
# slots, no triggers) on the static path, compiled, each with a profile of 3 replays (kernels per step, the 30
# costliest kernel names and the 15 most launched, in the JSON): where run 3's 16.3 ms goes before any fused kernel
# is written, and LSA at B = 1 on the fast path, not measured so far.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s)
F="warning\|online softmax\|split the reduction\|important use case\|^softmax\.$\|^$\|_warn_once\|USDT"
echo "full, 512K, B = 1"
timeout 280 python3 bench/bench_static.py --compile --profile --contexts 524288 --batches 1 --steps 16 \
  --json $OUT/full_512k_b1.json 2>&1 | grep -v -i "$F"
left=$(( 540 - ($(date +%s) - start) ))
echo "LSA, 512K, B = 1, 13,125 slots"
timeout $left python3 bench/bench_static.py --compile --profile --contexts 524288 --batches 1 --steps 16 \
  --resident 13125 --json $OUT/lsa_512k_b1.json 2>&1 | grep -v -i "$F"
echo "all done at $(( $(date +%s) - start )) s"
