#!/bin/bash
# H200 call for issue 18 (written 2026-12-02, seventh session): prefetched triggers at 128K. In the seventh session's
# first try (run8/resident_128k_3277_prefetch16.json) the prefetched window at B = 128 averaged 489 ms a step
# against a 41 ms replay, while synchronous triggers took 4-5 ms: the bench's one shared cold pool had room for
# 4,096 more entries, and 128 rows flush ~5,000 in the run, so it grew (re-pinned and copied ~1.5 GB on the decode
# thread) mid-window. The pool is now sized for every row's flushes (a Session sizes each row's pool for its prompt
# and new tokens), and the JSON keeps every window step, start and install, and whether the pool grew. Here: 3,277
# slots at 128K, B = 128 and 47, prefetched 16 steps ahead, one start and one install profiled (host ops).
# Call: run(timeout_s=600, command="bash docs/bench_results/static_h200/run9.sh"); results under $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s)
F="warning\|online softmax\|split the reduction\|important use case\|^softmax\.$\|^$\|_warn_once\|USDT"
timeout 540 python3 bench/bench_static.py --compile --profile --triggers --prefetch 16 --contexts 131072 \
  --batches 128,47 --steps 12 --resident 3277 --max-seconds 300 --json $OUT/resident_128k_3277_prefetch16.json 2>&1 |
  grep -v -i "$F"
echo "all done at $(( $(date +%s) - start )) s"
