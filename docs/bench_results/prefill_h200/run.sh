#!/bin/bash
# H200 call (written 2026-12-04, twenty-first session; not run yet): where the long evaluations' prefill time goes.
# `fm-index evaluate` at 32K-128K on the bundled L6i spends most of a run in prefill (128K: 16-22 s a prompt alone,
# RESULTS section 11d; 64K: 5-6 s with 8 workers), far above what a 15M-parameter model's weights need. One Session
# prefill per mode and length under torch.profiler (bench/bench_prefill.py: the evaluation's SessionConfig, chunk 4096,
# the table's export with its floor), transformers' eager attention and the window form (evaluate --attention window),
# the operators by device time and input shape. ~4-6 minutes of device time:
#   run(timeout_s=600, command="bash docs/bench_results/prefill_h200/run.sh")
# Twenty-ninth session (2026-12-05, an H100, the session's last 280 s): the GPU test and 64K's first profile (full,
# eager) ran with --lengths 65536 (BENCHMARKS "Prefill", raw h100_64k_partial/); the rest is still to run.
# Results: $OUT/gpu_test.txt, $OUT/prefill.txt (the tables; each run's first token: eager and window should
# agree), $OUT/prefill.json (every operator); docs/BENCHMARKS.md, "Prefill".
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s)
# first: evaluate --attention window against eager on the GPU (tiny, fp32; the static decode fed by a window prefill)
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu -k window tests/test_evaluate.py > $OUT/gpu_test.txt 2>&1
echo "gpu test rc=$? at $(( $(date +%s) - start )) s"
grep -E "[0-9]+ (passed|failed|skipped)|^E  " $OUT/gpu_test.txt | tail -5
timeout 480 python3 bench/bench_prefill.py --model reference \
  --indexer docs/results/labels_long_h200/run4_l6i_rebuild/export --fetch-top 64 --chunk-size 4096 \
  --lengths 65536,131072 --modes full,lsa --attention eager,window --top 30 --json $OUT/prefill.json 2>&1 \
  | grep -v "USDT\|Loading weights" | tee $OUT/prefill.txt
echo "rc=${PIPESTATUS[0]} at $(( $(date +%s) - start )) s"
