#!/bin/bash
# H200 call (written 2026-12-04, twenty-first session; not run yet): where the long evaluations' prefill time goes.
# `fm-index evaluate` at 32K-128K on the bundled L6i spends most of a run in prefill (128K: 16-22 s a prompt alone,
# RESULTS section 11d; 64K: 5-6 s with 8 workers), far above what a 15M-parameter model's weights need. One Session
# prefill per mode and length under torch.profiler (bench/bench_prefill.py: the evaluation's SessionConfig, chunk 4096,
# the table's export with its floor), transformers' eager attention and the window form (evaluate --attention window),
# the operators by device time and input shape. ~4-6 minutes of device time:
#   run(timeout_s=600, command="bash docs/bench_results/prefill_h200/run.sh")
# Results: $OUT/prefill.txt (the tables), $OUT/prefill.json (every operator); docs/BENCHMARKS.md, "Prefill".
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s)
timeout 540 python3 bench/bench_prefill.py --model reference \
  --indexer docs/results/labels_long_h200/run4_l6i_rebuild/export --fetch-top 64 --chunk-size 4096 \
  --lengths 65536,131072 --modes full,lsa --attention eager,window --top 30 --json $OUT/prefill.json 2>&1 | grep -v "USDT\|Loading weights" \
  | tee $OUT/prefill.txt
echo "rc=${PIPESTATUS[0]} at $(( $(date +%s) - start )) s"
