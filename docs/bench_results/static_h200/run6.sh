#!/bin/bash
# H200 call for issue 18 (2026-12-02, fifth session): the static trigger's host work cut (run 5's profile: 18-30 ms
# a trigger, 1.8 ms of it on the device). StaticResidentRows now assembles a change with two multi-layer gathers
# per row kind (kept slots, fetched pool rows) and writes it back with one multi-tensor copy, as ResidentSet's
# batched path; ResidentPlan by binary search. (1) its GPU tests; (2) 13,125 slots at 512K, B = 64 then 11:
# synchronous triggers timed, then prefetched 16 steps ahead (a TAU-step window timed whole), one trigger profiled.
# Call: run(timeout_s=420, command="bash docs/bench_results/static_h200/run6.sh"); results under $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s)
timeout 90 python3 -m pytest -q -p no:cacheprovider -m "gpu or not gpu" --tb=short tests/test_pool_gather_kernel.py \
  tests/test_static_residency.py -k "static_resident_rows or gpu" > $OUT/gpu_tests.txt 2>&1
grep -E "passed|failed|^E  " $OUT/gpu_tests.txt | head -8
echo "tests done at $(( $(date +%s) - start )) s"
F="warning\|online softmax\|split the reduction\|important use case\|^softmax\.$\|^$\|_warn_once"
timeout $(( 400 - ($(date +%s) - start) )) python3 bench/bench_static.py --compile --profile --triggers --prefetch 16 \
  --contexts 524288 --batches 64,11 --steps 12 --resident 13125 --max-seconds 170 \
  --json $OUT/resident_13125_prefetch16.json 2>&1 | grep -v -i "$F"
echo "all done at $(( $(date +%s) - start )) s"
