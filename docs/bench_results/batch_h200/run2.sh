#!/bin/bash
# The batched attention (2026-12-02, second version) on the H200 in one short call: its GPU tests (transformers 5.17,
# fp32 and bf16, tokens equal to decoding alone) and one throughput point at 128K (all, B = 1 and 16).
export PYTHONUNBUFFERED=1 PYTHONPATH=.
timeout 75 python3 -m pytest -q -p no:cacheprovider -m gpu -s --tb=short tests/test_batching.py -k gpu \
  > $OUT/gpu_tests2_full.txt 2>&1; grep -E "passed|failed|batched on|^E  " $OUT/gpu_tests2_full.txt | head -12
timeout 55 python3 bench/bench_batch.py --contexts 131072 --batches 1,16 --modes all --steps 12 \
  --json $OUT/batch2_128k.json 2>&1 | grep -v -i warning
