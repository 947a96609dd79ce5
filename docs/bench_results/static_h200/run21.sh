#!/bin/bash
# Results: docs/BENCHMARKS.md, "Run 21"; raw under run21/.
# H200 call for issue 18 (written 2026-12-03, fourteenth session; not run yet). Run 20 timed torch.topk unsorted
# 10-20% below sorted in isolation (bench/bench_topk.py); the static step's Lightning Indexer selects unsorted since
# (lsa_runtime/static_decode.py `_lightning_indexer`). First the GPU tests of the static path (the whole step as one
# CUDA graph against the eager step and the fp32 oracle, fused inputs included: run 20 lost that result to its own
# output filter), then the batch-1 steps at 512K, full and LSA (13,125 slots), as run 20 ran them without
# --fuse-inputs, so that the two runs compare sorted and unsorted picks (run 20: 16.15 / 15.42 ms).
# Call: run(timeout_s=600, command="bash docs/bench_results/static_h200/run21.sh"); results under $OUT.
# Fifteenth session: only the GPU tests ran (5 passed, run21/gpu_tests.txt, BENCHMARKS "Run 21, first part"); the
# timings are still to run (the tests again first: _index_scores now makes the head weights contiguous).
# Twenty-ninth session (2026-12-05): run whole on an H100 (the kind lent), 236 s: BENCHMARKS "Run 21, second part",
# raw run21/h100_*. On an H200 it is still to run (the goal's chip).
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s)
F="warning\|online softmax\|split the reduction\|important use case\|^softmax\.$\|^$\|_warn_once\|USDT"
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu --tb=short tests/test_static_decode.py \
  > $OUT/gpu_tests.txt 2>&1
echo "gpu tests rc=$? at $(( $(date +%s) - start )) s"
grep -E "[0-9]+ (passed|failed|errors?)|^(FAILED|ERROR)|^E  " $OUT/gpu_tests.txt | tail -8
for mode in full lsa; do
  left=$(( 560 - ($(date +%s) - start) ))
  [ $left -gt 40 ] || { echo "out of time before $mode"; continue; }
  extra=(); [ $mode = lsa ] && extra=(--resident 13125)
  echo "$mode, 512K, B = 1 (unsorted picks)"
  timeout $left python3 bench/bench_static.py --compile --contexts 524288 --batches 1 --steps 8 "${extra[@]}" \
    --profile-ops --json $OUT/${mode}_512k_b1.json 2>&1 | grep -v -i "$F"
done
echo "all done at $(( $(date +%s) - start )) s"
