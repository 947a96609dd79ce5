#!/bin/bash
# Results: docs/BENCHMARKS.md, "Run 27"; raw under run27/.
# Device call for issue 18 (written 2026-12-06, thirty-fourth session). Run 26 (H100) ran the gathers' GPU tests:
# 23 passed, one failed on its own comparison (the rows' ids live on the device; the test compared them with a CPU
# tensor and had set them from one). The test is mended; this call runs the two files again, then run 26's second
# part: the batch-1 steps at 512K, full and LSA (13,125 slots) and full with the attention inputs fused. On an H100
# (no H200 lent) full and full fused only, on one machine, against run 21's H100 figures.
# Call: run(timeout_s=600, command="bash docs/bench_results/static_h200/run27.sh"); results under $OUT.
# Run 2026-12-06 on an H100 (184 s): 24 passed; full 17.03, full fused 15.89 ms. Then on the same warm machine (58 s):
#   for x in "" "--fuse-inputs"; do python3 bench/bench_static.py --compile --contexts 524288 --batches 1 --steps 8 \
#     --resident 13125 $x --json $OUT/h100_lsa${x:+_fused}_512k_b1.json; done   (LSA 16.44, fused 15.02 ms)
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s)
F="warning\|online softmax\|split the reduction\|important use case\|^softmax\.$\|^$\|_warn_once\|USDT"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "device: $gpu"
tag=$(echo "$gpu" | grep -q H200 && echo h200 || echo h100)
left() { echo $(( ${BUDGET:-570} - ($(date +%s) - start) )); }
timeout 150 python3 -m pytest -q -p no:cacheprovider -m "not slow" --tb=short tests/test_pool_gather_kernel.py \
  tests/test_static_residency.py > $OUT/gpu_tests.txt 2>&1
echo "gpu tests rc=$?"; grep -E "[0-9]+ (passed|failed|errors?)|^(FAILED|ERROR)|^E  " $OUT/gpu_tests.txt | tail -8
modes="full lsa full_fused"; [ $tag = h200 ] || modes="full full_fused"
for mode in $modes; do
  [ $(left) -gt 100 ] || { echo "out of time before $mode"; continue; }
  extra=(); [ $mode = lsa ] && extra=(--resident 13125); [ $mode = full_fused ] && extra=(--fuse-inputs)
  echo "$mode, 512K, B = 1 (unsorted picks)"
  timeout $(( $(left) - 10 )) python3 bench/bench_static.py --compile --contexts 524288 --batches 1 --steps 8 \
    "${extra[@]}" --profile-ops --json $OUT/${tag}_${mode}_512k_b1.json 2>&1 | grep -v -i "$F"
done
echo "all done at $(( $(date +%s) - start )) s"
