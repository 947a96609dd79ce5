#!/bin/bash
# H200 call for issue 18 (written 2026-12-02, seventh session): is the prefetched window at 128K slow because the
# decode thread waits for the GIL? Run 9: at B = 128 the decode thread's start took 3.3 ms (median) in the window
# but 0.9 ms of host ops under the profiler, with two helper jobs of ~8.5 ms a step beside it; Python hands the GIL
# to a waiting thread only every switch interval (5 ms). Here: 3,277 slots at 128K, B = 128, prefetched 16 steps
# ahead, with the default interval and with 0.2 ms, in one process (ratios within the call). The last minutes of a
# session's device time: one batch size only.
# Call: run(timeout_s=240, command="bash docs/bench_results/static_h200/run10.sh"); results under $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
F="warning\|online softmax\|split the reduction\|important use case\|^softmax\.$\|^$\|_warn_once\|USDT"
timeout 225 python3 bench/bench_static.py --compile --triggers --prefetch 16 --contexts 131072 --batches 128 \
  --switch-intervals 5,0.2 --steps 8 --resident 3277 --json $OUT/resident_128k_b128_switch.json 2>&1 | grep -v -i "$F"
