#!/bin/bash
# Issue 17 (runtime structure) on the H200: GPU tests of the new runtime, then before/after benches
# (.before = the runtime at 1c252ed, before the restructure), then the trigger bench.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
cd "$(git rev-parse --show-toplevel)"  # run from the repository, with .before/ = lsa_runtime and bench of 1c252ed
start=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"; } 2>&1 | tee $OUT/env.txt
echo "== GPU tests" | tee $OUT/gpu_tests.txt
timeout 200 python3 -m pytest -q -p no:cacheprovider -m "gpu or not slow" tests/test_prefetch.py tests/test_decode_graphs.py \
  tests/test_tower_graph.py tests/test_cold_pool.py tests/test_pool_gather_kernel.py tests/test_residency.py 2>&1 | tail -25 | tee -a $OUT/gpu_tests.txt
echo "tests done at $(( $(date +%s) - start )) s" | tee -a $OUT/gpu_tests.txt
A="--contexts 524288 --steps 66 --modes full+graphs,lsa+graphs,lsa-prefetch+graphs"
for round in 1 2; do
  timeout 150 python3 .before/bench/bench_decode.py $A --json $OUT/decode_before_$round.json 2>&1 | grep -v Warning | tee $OUT/decode_before_$round.txt
  timeout 150 python3 bench/bench_decode.py $A --json $OUT/decode_after_$round.json 2>&1 | grep -v Warning | tee $OUT/decode_after_$round.txt
  echo "round $round done at $(( $(date +%s) - start )) s"
done
timeout 60 python3 .before/bench/bench_resident.py 2>&1 | tee $OUT/resident_before.txt
timeout 60 python3 bench/bench_resident.py 2>&1 | tee $OUT/resident_after.txt
echo "resident done at $(( $(date +%s) - start )) s"
remaining=$(( 560 - ($(date +%s) - start) ))
if [ $remaining -gt 60 ]; then
  timeout $(( remaining - 10 )) python3 bench/bench_decode.py --contexts 524288 --steps 10 --modes full+graphs,lsa+graphs --profile 3 2>&1 | grep -v Warning > $OUT/decode_profile_shapes.txt
fi
echo "all done at $(( $(date +%s) - start )) s"
