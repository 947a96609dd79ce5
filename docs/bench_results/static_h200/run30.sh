#!/bin/bash
# Results: docs/BENCHMARKS.md, "Runs 26-30"; raw under run30/.
# Device call of 2026-12-06 (thirty-fourth session), as made, with fused attention inputs briefly the compiled step's
# default (commit "Fused attention inputs by default ...", reverted after this call): the static step's tests, the
# GPU test of the batched static decode and the fused inputs' tests. Result: 17 passed, one failed
# (test_compiled_layers_give_the_eager_static_step_and_share_graphs_by_kind, a CPU test: 12 graphs compiled for the
# tiny model's 12 layers where one per kind, 4, was expected; torch 2.11 on the device, 2.13 here gives 4).
# Call: run(timeout_s=270, command="bash docs/bench_results/static_h200/run30.sh"); results under $OUT.
export PYTHONPATH=.
timeout 250 python3 -m pytest -q -p no:cacheprovider -m "not slow" --tb=short tests/test_static_decode.py \
  "tests/test_batching.py::test_static_decode_on_a_gpu_replays_one_graph" tests/test_fused_inputs.py \
  > $OUT/gpu_tests.txt 2>&1
echo rc=$?; grep -E "[0-9]+ (passed|failed|errors?)|^(FAILED|ERROR)|^E  " $OUT/gpu_tests.txt | tail -8
