#!/bin/bash
# Results: docs/BENCHMARKS.md, "Runs 22-25"; raw under run22/.
# Device call for issue 18 (written 2026-12-06, thirty-third session). Two parts:
# 1. On an H200 only (the goal's chip): run 21's batch-1 steps at 512K, full and LSA (13,125 slots), compiled, with
#    the Lightning Indexer's unsorted picks; run 21 measured them on an H100 only (BENCHMARKS "Run 21, second part").
# 2. On either chip: the trigger's share of decode time at the batch sizes runs 13-15 did not re-measure (goal 3,
#    "at every batch size measured"): 128K with 3,277 slots at B = 1, 4, 16, 47 and 512K with 13,125 slots at B = 1,
#    4, 11, churn 0.25, prefetched one step ahead on the side stream (the Session's static path with prefetch_steps=1;
#    the bench times the synchronous trigger, the Session's default prefetch 0, in the same run), then 128K with
#    random selections (churn 1.0) with what time is left.
# Call: run(timeout_s=600, command="bash docs/bench_results/static_h200/run22.sh"); results under $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s)
F="warning\|online softmax\|split the reduction\|important use case\|^softmax\.$\|^$\|_warn_once\|USDT"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "device: $gpu"
left() { echo $(( 570 - ($(date +%s) - start) )); }
if echo "$gpu" | grep -q H200; then
  for mode in full lsa; do
    [ $(left) -gt 200 ] || { echo "out of time before $mode"; continue; }
    extra=(); [ $mode = lsa ] && extra=(--resident 13125)
    echo "$mode, 512K, B = 1 (unsorted picks)"
    timeout 170 python3 bench/bench_static.py --compile --contexts 524288 --batches 1 --steps 8 "${extra[@]}" \
      --profile-ops --json $OUT/${mode}_512k_b1.json 2>&1 | grep -v -i "$F"
  done
fi
tag=$(echo "$gpu" | grep -q H200 && echo h200 || echo h100)
for run in "131072 3277 1,4,16,47 0.25" "524288 13125 1,4,11 0.25" "131072 3277 1,4,16,47 1.0"; do
  set -- $run
  [ $(left) -gt 90 ] || { echo "no time left for $run"; continue; }
  echo "context $1, $2 slots, B = $3, prefetch 1, churn $4"
  timeout $(left) python3 bench/bench_static.py --compile --triggers --prefetch 1 --prefetch-on stream --churn $4 \
    --contexts $1 --batches $3 --steps 8 --resident $2 --max-seconds $(( $(left) - 60 )) \
    --json $OUT/${tag}_resident_$(( $1 / 1024 ))k_d1_churn$4.json 2>&1 | grep -v -i "$F"
done
echo "all done at $(( $(date +%s) - start )) s"
