#!/bin/bash
# Results: docs/BENCHMARKS.md (to write: "Run 26"); raw under run26/.
# Device call for issues 18 and 6's fetch goal (written 2026-12-06, thirty-third session; not run yet). What runs
# 22-25 left open:
# 0. The GPU tests of the zero-copy gathers (grid-stride since run 25: so far tested under the Triton interpreter
#    only) and of the static resident rows that use them.
# 1. The zero-copy gather alone with at most 32 programs (the default since run 25) against one per block: the fetch
#    goal (>= 44 GB/s; 47.8 GB/s measured with one per block), bench_trigger.py at 512K, 5% of the entries fetched.
# 2. On an H200 only (the goal's chip): run 21's batch-1 steps at 512K, full and LSA (13,125 slots), unsorted picks;
#    then full with the attention inputs fused (run 20 lost its GEMVs' 0.9 ms to a 5.7x slower compiled head-weighted
#    sum; the head weights are made contiguous since, untimed).
# 3. Random selections (churn 1.0) at 512K, prefetched one step ahead, B = 11 and 64 (not re-measured since runs 7-9).
# Call: run(timeout_s=600, command="bash docs/bench_results/static_h200/run26.sh"); results under $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s)
F="warning\|online softmax\|split the reduction\|important use case\|^softmax\.$\|^$\|_warn_once\|USDT"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "device: $gpu"
tag=$(echo "$gpu" | grep -q H200 && echo h200 || echo h100)
left() { echo $(( ${BUDGET:-570} - ($(date +%s) - start) )); }
timeout 150 python3 -m pytest -q -p no:cacheprovider -m "not slow" --tb=short tests/test_pool_gather_kernel.py \
  tests/test_static_residency.py > $OUT/gpu_tests.txt 2>&1
echo "gpu tests rc=$?"; grep -E "[0-9]+ (passed|failed|errors?)|^(FAILED|ERROR)|^E  " $OUT/gpu_tests.txt | tail -8
for p in 32 0 32; do
  echo "bench_trigger, gather programs $p"
  timeout 90 python3 bench/bench_trigger.py --gather-programs $p \
    --json $OUT/${tag}_trigger_512k_p${p}_$(date +%s).json 2>&1 | grep -v -i "$F" \
    | grep -i "fetch\|zero\|staged\|ceiling\|scoring"
done
if [ $tag = h200 ]; then
  for mode in full lsa full_fused; do
    [ $(left) -gt 200 ] || { echo "out of time before $mode"; continue; }
    extra=(); [ $mode = lsa ] && extra=(--resident 13125); [ $mode = full_fused ] && extra=(--fuse-inputs)
    echo "$mode, 512K, B = 1 (unsorted picks)"
    timeout 170 python3 bench/bench_static.py --compile --contexts 524288 --batches 1 --steps 8 "${extra[@]}" \
      --profile-ops --json $OUT/${mode}_512k_b1.json 2>&1 | grep -v -i "$F"
  done
fi
if [ $(left) -gt 120 ]; then
  echo "512K, 13,125 slots, B = 11,64, churn 1.0, prefetch 1"
  timeout $(left) python3 bench/bench_static.py --compile --triggers --prefetch 1 --prefetch-on stream --churn 1.0 \
    --contexts 524288 --batches 11,64 --steps 8 --resident 13125 --max-seconds $(( $(left) - 90 )) \
    --json $OUT/${tag}_resident_512k_d1_churn1.0.json 2>&1 | grep -v -i "$F"
fi
echo "all done at $(( $(date +%s) - start )) s"
