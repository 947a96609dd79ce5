#!/bin/bash
# Issue 16 (the real V4-Flash) on the lent H200: the device-map and release-format GPU tests, then the memory plan
# against measured allocations. Run from the repository root with `.whl` carried (datasets and its two pure-Python
# dependencies, for the build-labels test; how it is made: docs/bench_results/two_gpu/run.sh); results under $OUT.
# Call: run(timeout_s=600, carry=[".whl"], command="bash docs/bench_results/real_model_h200/gpu_check.sh")
export PYTHONUNBUFFERED=1
start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > $OUT/pip.txt 2>&1 || echo "wheels: install FAILED" | tee $OUT/pip.txt
export PYTHONPATH=.:/tmp/site
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, sys; print('torch', torch.__version__, 'transformers', transformers.__version__, 'python', sys.version.split()[0])"; } 2>&1 | tee $OUT/env.txt
timeout 60 python3 docs/bench_results/real_model_h200/fp8_diag.py 2>&1 | tee $OUT/fp8_diag.txt
timeout 300 python3 -m pytest -q -p no:cacheprovider -m "gpu or not slow" -rfEs -s --tb=short tests/test_device_map.py \
  tests/test_official_checkpoint.py tests/test_residency.py tests/test_cold_pool.py > $OUT/gpu_tests_full.txt 2>&1; grep -E "^(FAILED|ERROR|SKIPPED|PASSED)|passed|failed|release miniature|^E  " $OUT/gpu_tests_full.txt | head -60 | tee $OUT/gpu_tests.txt
echo "tests done at $(( $(date +%s) - start )) s" | tee -a $OUT/gpu_tests.txt
timeout 300 python3 bench/bench_plan.py --contexts 16384,32768 --json $OUT/plan.json 2>&1 | grep -v -i warning | tee $OUT/plan.txt
echo "all done at $(( $(date +%s) - start )) s"
