#!/bin/bash
# Results: docs/BENCHMARKS.md, "Run 13"; raw under run13/.
# H200 call for issue 18 (tenth session, 2026-12-03): the prefetched trigger with its host work overlapping the
# replay. Run 11's profile: the decode thread waited for the replay, then did ~20 ms of host work a step while the
# GPU idled. Since then (a) `StaticResidentRows.length` counts a row's slots on the host (from the positions), so a
# flush and an install queue their copies without waiting for the device; (b) `StreamPrefetcher` (the Session's
# static path now) runs a prefetched trigger's job on the decode thread on a side CUDA stream, right after the next
# replay is queued, so its host work and its own syncs overlap that replay (no helper thread); (c) the bench queues a
# step's starts and installs after the previous replay, as the Session does. Here: the GPU tests of the static
# trigger path (prefetch on the side stream, d = 3 and 1, among them), then 128K, B = 128, 3,277 slots (run 11's
# case): stream, 16 ahead, churn 0.25 / 1.0 / 0.1; the thread prefetcher in the new loop order at 0.25; stream 1
# ahead at 0.25. One process per row (the compile cache makes the later ones quick), most telling first.
# Call: run(timeout_s=600, command="bash docs/bench_results/static_h200/run13.sh"); results under $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s)
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu --tb=short tests/test_static_residency.py \
  tests/test_prefetch.py tests/test_pool_gather_kernel.py > $OUT/gpu_tests.txt 2>&1
grep -E "passed|failed|^E  |tokens equal" $OUT/gpu_tests.txt | head -12
F="warning\|online softmax\|split the reduction\|important use case\|^softmax\.$\|^$\|_warn_once\|USDT"
for run in "stream 16 0.25" "stream 16 1.0" "stream 16 0.1" "thread 16 0.25" "stream 1 0.25"; do
  set -- $run
  left=$(( 575 - ($(date +%s) - start) ))
  [ $left -gt 75 ] || { echo "no time left for $run"; break; }
  echo "prefetch on $1, $2 ahead, churn $3"
  timeout $left python3 bench/bench_static.py --compile --triggers --prefetch $2 --prefetch-on $1 --churn $3 \
    --contexts 131072 --batches 128 --steps 8 --resident 3277 --json $OUT/resident_128k_b128_$1_d$2_churn$3.json \
    2>&1 | grep -v -i "$F"
done
echo "all done at $(( $(date +%s) - start )) s"
