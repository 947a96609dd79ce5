#!/bin/bash
# Results: docs/BENCHMARKS.md, "Run 11"; raw under run11/.
# H200 call for issue 18 (written 2026-12-02, seventh session; run 2026-12-03): the trigger against how much of the
# set it replaces. Runs 4-10 used a random memory indexer whose consecutive selections barely overlap (a row's first
# trigger fetched ~11,000 of 13,107 entries at 512K, ~2,900 of 3,259 at 128K), so the fetch (PCIe, ~42 GB/s) set the
# synchronous trigger's floor. A trained indexer's consecutive sets overlap; `bench_static.py --churn F` keeps a
# random 1 - F of the row's set and lets the indexer fill the rest (its scoring work unchanged). Here: 128K, 3,277
# slots, B = 128 (run 8's LSA row), churn 1.0 / 0.25 / 0.1, each with 8 synchronous triggers by phase and then the
# prefetched window (16 steps ahead); one process per churn (the compile cache makes the later ones quick). The
# churn-1.0 process also profiles the window's first 8 steady-state steps (`--profile-window`: host ops and Python
# frames of the decode and helper threads, trace under $OUT; run 9's starts took 2-3.3 ms there against 1.3 ms alone,
# not explained by the GIL, run 10) and times the other 56.
# First the GPU tests of the pool and the static trigger path: since run 10 a flush stores every layer's born entries
# with one lock and one CUDA event (`ColdPool.append_many`) instead of 42 of each.
# Call: run(timeout_s=600, command="bash docs/bench_results/static_h200/run11.sh"); results under $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s)
timeout 110 python3 -m pytest -q -p no:cacheprovider -m gpu --tb=short tests/test_cold_pool.py \
  tests/test_static_residency.py > $OUT/gpu_tests.txt 2>&1
grep -E "passed|failed|^E  " $OUT/gpu_tests.txt | head -8
F="warning\|online softmax\|split the reduction\|important use case\|^softmax\.$\|^$\|_warn_once\|USDT"
for churn in 1.0 0.25 0.1; do
  left=$(( 570 - ($(date +%s) - start) ))
  [ $left -gt 60 ] || { echo "no time left for churn $churn"; break; }
  echo "churn $churn"
  extra=""; [ $churn = 1.0 ] && extra="--profile-window"
  timeout $left python3 bench/bench_static.py --compile --triggers --prefetch 16 --churn $churn $extra --contexts 131072 \
    --batches 128 --steps 8 --resident 3277 --json $OUT/resident_128k_b128_churn$churn.json 2>&1 | grep -v -i "$F"
done
echo "all done at $(( $(date +%s) - start )) s"
