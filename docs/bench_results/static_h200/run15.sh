#!/bin/bash
# Results: docs/BENCHMARKS.md, "Run 15"; raw under run15/.
# H200 call for issue 18 (tenth session, 2026-12-03), right after runs 13-14 on the same machine: run 13's 128K row
# (stream, 16 ahead, churn 0.25) again, to see it reproduce, and full at 512K, B = 11 (run 4's baseline) on this
# machine.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s)
F="warning\|online softmax\|split the reduction\|important use case\|^softmax\.$\|^$\|_warn_once\|USDT"
echo "128K, B = 128, stream 16 ahead, churn 0.25, again"
timeout 280 python3 bench/bench_static.py --compile --triggers --prefetch 16 --prefetch-on stream --churn 0.25 \
  --contexts 131072 --batches 128 --steps 8 --resident 3277 --json $OUT/resident_128k_b128_stream_d16_churn0.25.json \
  2>&1 | grep -v -i "$F"
left=$(( 560 - ($(date +%s) - start) ))
[ $left -gt 60 ] && { echo "full, 512K, B = 11"; timeout $left python3 bench/bench_static.py --compile \
  --contexts 524288 --batches 11 --steps 16 --json $OUT/full_512k_b11.json 2>&1 | grep -v -i "$F"; }
echo "all done at $(( $(date +%s) - start )) s"
