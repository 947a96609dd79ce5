#!/bin/bash
# Results: docs/BENCHMARKS.md, "Run 17"; raw under run17/.
# H200 call for issue 18's first goal (written 2026-12-03, tenth session; run in the thirteenth): run 16 named the
# kernels of the batch-1 step at 512K by name only (a graph replay hides the ops that launch them). Here one eager
# compiled step of each, full and LSA (13,125 slots), under torch.profiler with shapes (`--profile-ops`: the ops and
# input shapes whose kernels take the most device time), beside the replay's profile again: which GEMMs (shapes) make
# the 7.8 ms, before writing batch-1 kernels or fusing projections.
# Call: run(timeout_s=600, command="bash docs/bench_results/static_h200/run17.sh"); results under $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s)
F="warning\|online softmax\|split the reduction\|important use case\|^softmax\.$\|^$\|_warn_once\|USDT"
echo "full, 512K, B = 1"
timeout 280 python3 bench/bench_static.py --compile --profile --profile-ops --contexts 524288 --batches 1 \
  --steps 8 --json $OUT/full_512k_b1_ops.json 2>&1 | grep -v -i "$F"
left=$(( 560 - ($(date +%s) - start) ))
echo "LSA, 512K, B = 1, 13,125 slots"
timeout $left python3 bench/bench_static.py --compile --profile --profile-ops --contexts 524288 --batches 1 \
  --steps 8 --resident 13125 --json $OUT/lsa_512k_b1_ops.json 2>&1 | grep -v -i "$F"
echo "all done at $(( $(date +%s) - start )) s"
