#!/bin/bash
# Results: docs/BENCHMARKS.md (to write: "Run 31"); raw under run31/.
# Device call for issue 18's follow-up (written 2026-12-06, thirty-fourth session; not run yet). Run 30 found the
# fused attention inputs compiling one graph per layer under torch 2.11 (12 for the tiny model's 12 layers, where
# torch 2.13 compiles one per layer kind, 4). Whether the unfused layers do the same under 2.11 was never measured:
# both cases of the graph-count test (the fused one is slow-marked; since 2026-12-06 it also checks the compiled
# step's h_t at the memory layers), and the Session in mode lsa with static_compile against the cold-pool path (the
# triggers read h_t the compiled layers write; before that day they scored zeros), on the device's torch.
# Call: run(timeout_s=600, command="bash docs/bench_results/static_h200/run31.sh"); results under $OUT.
export PYTHONPATH=.
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 240 python3 -m pytest -q -p no:cacheprovider -m "" --tb=short \
  -k "share_graphs_by_kind or static_compile_in_mode_lsa" tests/test_static_decode.py tests/test_static_residency.py \
  > $OUT/graph_count_tests.txt 2>&1
echo rc=$?; grep -E "[0-9]+ (passed|failed|errors?)|^(FAILED|ERROR)|^E  " $OUT/graph_count_tests.txt | tail -12
# Then the replay at 512K x 64 (13,125 slots) without and with --triggers on one machine: run 29 timed 45.04 ms
# without (H100), run 26 54.82 ms with (another H100); on H200s run 4 40.45 ms and run 12 50.3 ms. The replay is
# timed before any trigger runs, so the modes should not differ; what differs is the capacity (triggers add
# 2 tau + 16 positions: one more HCA entry) and the memory layers' h_t writes.
F="warning\|online softmax\|split the reduction\|important use case\|^softmax\.$\|^$\|_warn_once\|USDT"
for extra in "" "--triggers --prefetch 1 --prefetch-on stream --churn 1.0"; do
  echo "512K, B = 64, 13,125 slots ${extra:-(no triggers)}"
  timeout 200 python3 bench/bench_static.py --compile --contexts 524288 --batches 64 --steps 8 --resident 13125 \
    $extra --json $OUT/b64_${extra:+triggers}${extra:-plain}.json 2>&1 | grep -v -i "$F"
done
