#!/bin/bash
# Results: docs/BENCHMARKS.md, "Run 14"; raw under run14/.
# H200 call for issue 18 (tenth session, 2026-12-03), right after run 13 on the same machine: the GPU tests of the
# static full path and batching (the Session's greedy rows now sampled by one argmax a step), run 12's 512K case
# with the stream prefetcher (B = 64, 13,125 slots, churn 0.25), and full at 128K, B = 47 (run 8's baseline) again.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s)
timeout 170 python3 -m pytest -q -p no:cacheprovider -m gpu --tb=short tests/test_batching.py \
  tests/test_static_decode.py > $OUT/gpu_tests.txt 2>&1
grep -E "passed|failed|^E  |tokens equal" $OUT/gpu_tests.txt | head -12
F="warning\|online softmax\|split the reduction\|important use case\|^softmax\.$\|^$\|_warn_once\|USDT"
left=$(( 560 - ($(date +%s) - start) ))
echo "512K, B = 64, stream 16 ahead, churn 0.25"
timeout $left python3 bench/bench_static.py --compile --triggers --prefetch 16 --prefetch-on stream --churn 0.25 \
  --contexts 524288 --batches 64 --steps 8 --resident 13125 --json $OUT/resident_512k_b64_stream_d16_churn0.25.json \
  2>&1 | grep -v -i "$F"
left=$(( 575 - ($(date +%s) - start) ))
[ $left -gt 60 ] && { echo "full, 128K, B = 47"; timeout $left python3 bench/bench_static.py --compile \
  --contexts 131072 --batches 47 --steps 16 --json $OUT/full_128k_b47.json 2>&1 | grep -v -i "$F"; }
echo "all done at $(( $(date +%s) - start )) s"
