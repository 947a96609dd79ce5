#!/bin/bash
# Results: docs/BENCHMARKS.md, "Run 18"; raw under run18/.
# H200 call for issue 18's trigger goal (written 2026-12-03, tenth session; not run yet): "<= 5% at every batch size
# measured". Runs 13-15 measured the stream prefetcher at the largest batch of each length (128K B = 128, 512K
# B = 64); here the smaller ones the earlier runs measured synchronously: 128K B = 47 and 16 (3,277 slots), 512K
# B = 11 and 32 (13,125 slots), prefetched 16 steps ahead on the stream, churn 0.25. One process per row.
# Call: run(timeout_s=600, command="bash docs/bench_results/static_h200/run18.sh"); results under $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s)
F="warning\|online softmax\|split the reduction\|important use case\|^softmax\.$\|^$\|_warn_once\|USDT"
for run in "131072 47 3277" "524288 11 13125" "131072 16 3277" "524288 32 13125"; do
  set -- $run
  left=$(( 575 - ($(date +%s) - start) ))
  [ $left -gt 75 ] || { echo "no time left for $run"; break; }
  echo "context $1, B = $2, $3 slots, stream 16 ahead, churn 0.25"
  timeout $left python3 bench/bench_static.py --compile --triggers --prefetch 16 --prefetch-on stream --churn 0.25 \
    --contexts $1 --batches $2 --steps 8 --resident $3 --json $OUT/resident_$1_b$2_stream_d16_churn0.25.json \
    2>&1 | grep -v -i "$F"
done
echo "all done at $(( $(date +%s) - start )) s"
