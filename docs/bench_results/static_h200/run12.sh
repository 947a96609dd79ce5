#!/bin/bash
# Results: docs/BENCHMARKS.md, "Run 12"; raw under run12/.
# H200 call for issue 18 (written 2026-12-02, seventh session; run 2026-12-03): run 11 at 512K. Run 7's synchronous
# trigger at 512K (B = 64, 13,125 slots) was 11.2 ms, 7.4 ms of it the PCIe fetch of a set replaced almost whole
# (random scores); with `--churn F` a selection keeps a random 1 - F of the row's set. Here: churn 1.0 / 0.25 /
# 0.1 at B = 64, each with 8 synchronous triggers by phase and the prefetched window (16 steps ahead); one process
# per churn (the compile cache makes the later ones quick).
# Call: run(timeout_s=600, command="bash docs/bench_results/static_h200/run12.sh"); results under $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s)
F="warning\|online softmax\|split the reduction\|important use case\|^softmax\.$\|^$\|_warn_once\|USDT"
for churn in 1.0 0.25 0.1; do
  left=$(( 570 - ($(date +%s) - start) ))
  [ $left -gt 90 ] || { echo "no time left for churn $churn"; break; }
  echo "churn $churn"
  timeout $left python3 bench/bench_static.py --compile --triggers --prefetch 16 --churn $churn --contexts 524288 \
    --batches 64 --steps 8 --resident 13125 --json $OUT/resident_512k_b64_churn$churn.json 2>&1 | grep -v -i "$F"
done
echo "all done at $(( $(date +%s) - start )) s"
