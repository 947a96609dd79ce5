#!/bin/bash
# Next H200 call for issue 18, section 3 (ready, not yet run): the static-shape batched step
# (lsa_runtime/static_decode.py, milestone 1, full semantics) captured as one CUDA graph per batch size.
# 1. its GPU test: 24 replays equal the eager static step, fp32 and bf16 (also shows whether transformers 5.17's
#    cache attributes load: the CPU tests ran under 5.24);
# 2. step time and tokens/s vs B at Flash dimensions, eager and replayed, to set against bench_batch.py's `all`
#    rows (BENCHMARKS, "Batched decoding"): 15.6 tok/s at B = 16, 128K.
# Call: run(timeout_s=600, command="bash docs/bench_results/static_h200/run.sh"); results under $OUT. <= 9 minutes.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s)
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu -s --tb=short tests/test_static_decode.py \
  > $OUT/gpu_tests.txt 2>&1; grep -E "passed|failed|whole-step|^E  " $OUT/gpu_tests.txt | head -12
timeout 330 python3 bench/bench_static.py --contexts 131072,524288 --batches 1,4,16 --steps 24 --max-seconds 280 \
  --json $OUT/static.json 2>&1 | grep -v -i warning
echo "all done at $(( $(date +%s) - start )) s"
