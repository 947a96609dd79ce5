#!/bin/bash
# Next H200 call for issue 18 (ready, not yet run): the second batched version's throughput and the trigger's share
# of decode time at batch > 1 (every sequence triggers once in tau + 8 steps; median trigger), 128K and 512K, plus
# the bf16 half of its GPU test that the 2026-12-02 call could not finish. Plan: <= 9 minutes.
# Call: run(timeout_s=600, command="bash docs/bench_results/batch_h200/run3.sh"); results under $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s)
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu -s --tb=short tests/test_batching.py -k gpu \
  > $OUT/gpu_tests3_full.txt 2>&1; grep -E "passed|failed|batched on|^E  " $OUT/gpu_tests3_full.txt | head -12
timeout 230 python3 bench/bench_batch.py --contexts 131072 --batches 1,4,16 --max-seconds 170 \
  --json $OUT/batch3_128k.json 2>&1 | grep -v -i warning
timeout 200 python3 bench/bench_batch.py --contexts 524288 --batches 1,8 --max-seconds 120 \
  --json $OUT/batch3_512k.json 2>&1 | grep -v -i warning
echo "all done at $(( $(date +%s) - start )) s"
