#!/bin/bash
# H200 call for issue 18's 128K row of the concurrency goal (written 2026-12-02, sixth session; run in the seventh,
# BENCHMARKS "Run 8"): full
# and LSA's resident mode on the static step at 128K tokens. At a 40 GiB KV budget full holds 47 rows of 128K
# (BENCHMARKS, goals table); LSA with 3,277 slots (10% of the 32,768 entries, as 13,125 of 131,072 at 512K) is run at
# B = 47 (equal rows) and 128 (~2.7x; the 128 GB host holds ~145 cold pools of 128K in bf16), every trigger counted
# (synchronous, with the device-side plan of run 7). Ratios within this call only.
# Call: run(timeout_s=600, command="bash docs/bench_results/static_h200/run8.sh"); results under $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s)
F="warning\|online softmax\|split the reduction\|important use case\|^softmax\.$\|^$\|_warn_once"
timeout 200 python3 bench/bench_static.py --compile --contexts 131072 --batches 47 --steps 12 \
  --json $OUT/full_128k_b47.json 2>&1 | grep -v -i "$F"
echo "full done at $(( $(date +%s) - start )) s"
timeout $(( 570 - ($(date +%s) - start) )) python3 bench/bench_static.py --compile --triggers --contexts 131072 \
  --batches 128,47 --steps 12 --resident 3277 --max-seconds 250 --json $OUT/resident_128k_3277.json 2>&1 | grep -v -i "$F"
echo "all done at $(( $(date +%s) - start )) s"
