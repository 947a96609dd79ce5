#!/bin/bash
# Results: docs/BENCHMARKS.md (to write: "Run 31"); raw under run31/.
# Device call for issue 18's follow-up (written 2026-12-06, thirty-fourth session; not run yet). Run 30 found the
# fused attention inputs compiling one graph per layer under torch 2.11 (12 for the tiny model's 12 layers, where
# torch 2.13 compiles one per layer kind, 4). Whether the unfused layers do the same under 2.11 was never measured:
# both cases of the graph-count test (the fused one is slow-marked; since 2026-12-06 it also checks the compiled
# step's h_t at the memory layers), and the Session in mode lsa with static_compile against the cold-pool path (the
# triggers read h_t the compiled layers write; before that day they scored zeros), on the device's torch.
# Call: run(timeout_s=300, command="bash docs/bench_results/static_h200/run31.sh"); results under $OUT.
export PYTHONPATH=.
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 240 python3 -m pytest -q -p no:cacheprovider -m "" --tb=short \
  -k "share_graphs_by_kind or static_compile_in_mode_lsa" tests/test_static_decode.py tests/test_static_residency.py \
  > $OUT/graph_count_tests.txt 2>&1
echo rc=$?; grep -E "[0-9]+ (passed|failed|errors?)|^(FAILED|ERROR)|^E  " $OUT/graph_count_tests.txt | tail -12
