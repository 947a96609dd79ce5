#!/bin/bash
# Results: docs/BENCHMARKS.md, "Run 20"; raw under run20/.
# H200 call for issue 18's first goal (written 2026-12-03, thirteenth session; run 2026-12-03 in the fourteenth, one
# H200, torch 2.11.0+cu130, transformers 5.17.0). In that run the GPU test's result line was lost: its output went
# through the filter $F, whose "warning" drops pytest's summary ("1 passed, 3 warnings in ...") too, so whether it
# passed is not known. Fixed since: the test's whole output goes to $OUT/gpu_tests.txt and its exit code and result
# lines are printed (as run13/14.sh do). Run 17 found the batch-1 step's ~380 small GEMVs latency-bound (4.4-6.5 us each
# for 0.16-1.75 us of bytes); lsa_runtime/fused_inputs.py stacks each attention block's input projections into one GEMV
# (7 launches -> 1 in a CSA layer, 4 -> 1 in an HCA layer, 2 -> 1 in a sliding one: 188 fewer a step). First its GPU
# test (the compiled whole-step graph with fused inputs, held to the fp32 oracle like the unfused one), then the batch-1
# step at 512K, full and LSA (13,125 slots), without and with --fuse-inputs on the same machine, the fused ones with
# --profile-ops. Before them (~30 s): bench/bench_topk.py, the indexer's top-k of 512, torch.topk against four exact
# alternatives, at 13,125 / 131,078 candidates (run 17: ~70 us a call whatever the length).
# Call: run(timeout_s=600, command="bash docs/bench_results/static_h200/run20.sh"); results under $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s)
F="warning\|online softmax\|split the reduction\|important use case\|^softmax\.$\|^$\|_warn_once\|USDT"
timeout 60 python3 bench/bench_topk.py --json $OUT/topk.json 2>&1 | grep -v -i "$F"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu -k "one_cuda_graph and True-True" -s --tb=short \
  tests/test_static_decode.py > $OUT/gpu_tests.txt 2>&1
echo "gpu test rc=$?"
grep -E "[0-9]+ (passed|failed|errors?)|^(FAILED|ERROR)|^E  " $OUT/gpu_tests.txt | tail -8
for fused in "" "--fuse-inputs"; do
  for mode in full lsa; do
    left=$(( 560 - ($(date +%s) - start) ))
    [ $left -gt 40 ] || { echo "out of time before $mode $fused"; continue; }
    extra=(); [ $mode = lsa ] && extra=(--resident 13125)
    [ -n "$fused" ] && extra+=(--fuse-inputs --profile-ops)
    echo "$mode, 512K, B = 1 ${fused:-(each projection alone)}"
    timeout $left python3 bench/bench_static.py --compile --contexts 524288 --batches 1 --steps 8 "${extra[@]}" \
      --json $OUT/${mode}_512k_b1${fused:+_fused}.json 2>&1 | grep -v -i "$F"
  done
done
echo "all done at $(( $(date +%s) - start )) s"
