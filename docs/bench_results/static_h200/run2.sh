#!/bin/bash
# Second H200 call for issue 18, section 3 (2026-12-02): the static step with its decoder layers compiled
# (lsa_runtime/compiled_step.py) and captured as one CUDA graph, at 512K tokens; kernels per replayed step
# (profiler) with and without compilation; the GPU tests (fp32 with batched_mm experts, bf16, bf16 compiled).
# Call: run(timeout_s=260, command="bash docs/bench_results/static_h200/run2.sh"); results under $OUT. <= 4 minutes.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s)
timeout 130 python3 bench/bench_static.py --compile --profile --contexts 524288 --batches 1,16 --steps 12 \
  --max-seconds 60 --json $OUT/static_compiled.json 2>&1 | grep -v -i warning | tee $OUT/static_compiled.txt
echo "compiled bench done at $(( $(date +%s) - start )) s"
timeout 40 python3 bench/bench_static.py --profile --contexts 524288 --batches 1 --steps 6 \
  --json $OUT/static_eager_layers.json 2>&1 | grep -v -i warning
echo "eager-layer profile done at $(( $(date +%s) - start )) s"
timeout $(( 245 - ($(date +%s) - start) )) python3 -m pytest -q -p no:cacheprovider -m gpu -s --tb=short \
  tests/test_static_decode.py > $OUT/gpu_tests.txt 2>&1; grep -E "passed|failed|whole-step|^E  " $OUT/gpu_tests.txt | head -12
echo "all done at $(( $(date +%s) - start )) s"
