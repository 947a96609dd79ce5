#!/bin/bash
# Next H200 call for issue 18 (ready, not yet run; written 2026-12-02, fifth session): where a trigger's host time
# goes. Run 6 profiled 9-21 ms of host time per trigger (0.75 ms of device work), mostly CPU ops on 13,107 ids that
# take well under 1 ms elsewhere, varying 2x within one call. Here every synchronous trigger is timed by phase
# (flush, select, plan, assemble, write; synchronised host clock) with the host's load average beside it; then the
# prefetched window as in run 6; full at B = 11 first (ratios within one call; 150 s for its compile).
# Call: run(timeout_s=600, command="bash docs/bench_results/static_h200/run7.sh"); results under $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s)
uptime; nproc
F="warning\|online softmax\|split the reduction\|important use case\|^softmax\.$\|^$\|_warn_once"
timeout 150 python3 bench/bench_static.py --compile --contexts 524288 --batches 11 --steps 12 \
  --json $OUT/full_b11.json 2>&1 | grep -v -i "$F"
echo "full done at $(( $(date +%s) - start )) s"
timeout $(( 540 - ($(date +%s) - start) )) python3 bench/bench_static.py --compile --profile --triggers --prefetch 16 \
  --contexts 524288 --batches 11,64 --steps 12 --resident 13125 --max-seconds 200 \
  --json $OUT/resident_13125_prefetch16.json 2>&1 | grep -v -i "$F"
uptime
echo "all done at $(( $(date +%s) - start )) s"
