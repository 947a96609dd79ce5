#!/bin/bash
# Issue 18 section 2 on the lent H200: batched decoding. The GPU tests (batched tokens == alone, fp32 and bf16; the
# fp8 pool's GPU test with the device-independent scales), then bench/bench_batch.py at Flash dimensions.
# Call: run(timeout_s=560, command="bash docs/bench_results/batch_h200/run.sh"); results under $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s)
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu -rfEs -s --tb=short tests/test_batching.py \
  "tests/test_cold_pool.py::test_fp8_pool_on_a_gpu_equals_the_cpu_path" > $OUT/gpu_tests_full.txt 2>&1
grep -E "^(FAILED|ERROR)|passed|failed|batched on|^E  " $OUT/gpu_tests_full.txt | head -30 | tee $OUT/gpu_tests.txt
echo "tests done at $(( $(date +%s) - start )) s"
timeout 200 python3 bench/bench_batch.py --contexts 131072 --batches 1,4,16 --steps 24 --max-seconds 150 \
  --json $OUT/batch_128k.json 2>&1 | grep -v -i warning | tee $OUT/batch_128k.txt
timeout 200 python3 bench/bench_batch.py --contexts 524288 --batches 1,4 --steps 24 --max-seconds 150 \
  --json $OUT/batch_512k.json 2>&1 | grep -v -i warning | tee $OUT/batch_512k.txt
echo "all done at $(( $(date +%s) - start )) s"
