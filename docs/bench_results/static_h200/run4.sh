#!/bin/bash
# Next H200 call for issue 18 (ready, not yet run): LSA's resident mode on the static step (2026-12-02, fourth
# session). (1) GPU tests written since run 3: the Session's static path in the trigger modes (random and lsa,
# fp32, one graph per call, triggers between replays), the bf16 near-tie criterion, the GPU default; (2) the
# compiled static step in resident mode at 512K: 13,125 slots (10% of 131,072 entries + 18 for the entries born
# between triggers, the paper's regime) at B = 11 (full's capacity at 40 GiB), 32, 64; 2,066 slots (budget 2,048)
# at B = 64 (full at B = 11 first, in the same call); every row triggering every 64 steps (--triggers: flush, random memory indexer over all 131,072 entries,
# install in place; one shared pinned pool). Against run 3's full step: 402.3 tok/s at B = 11.
# Call: run(timeout_s=600, command="bash docs/bench_results/static_h200/run4.sh"); results under $OUT. <= 9 minutes.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s)
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu -s --tb=short tests/test_static_residency.py \
  tests/test_batching.py -k "gpu" > $OUT/gpu_tests.txt 2>&1
grep -E "passed|failed|static .* on|static decode on|^E  " $OUT/gpu_tests.txt | head -16
echo "tests done at $(( $(date +%s) - start )) s"
F="warning\|online softmax\|split the reduction\|important use case\|^softmax\.$\|^$"
timeout 100 python3 bench/bench_static.py --compile --contexts 524288 --batches 11 --steps 12 \
  --json $OUT/full_b11.json 2>&1 | grep -v -i "$F"   # full, the same call: ratios within one run
echo "full done at $(( $(date +%s) - start )) s"
timeout $(( 470 - ($(date +%s) - start) )) python3 bench/bench_static.py --compile --profile --triggers --contexts 524288 --batches 11,32,64 \
  --steps 12 --resident 13125 --max-seconds 230 --json $OUT/resident_13125.json 2>&1 | grep -v -i "$F"
echo "13,125 slots done at $(( $(date +%s) - start )) s"
timeout $(( 560 - ($(date +%s) - start) )) python3 bench/bench_static.py --compile --profile --triggers \
  --contexts 524288 --batches 64 --steps 12 --resident 2066 --json $OUT/resident_2066.json 2>&1 | grep -v -i "$F"
echo "all done at $(( $(date +%s) - start )) s"
