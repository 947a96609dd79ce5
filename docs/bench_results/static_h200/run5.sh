#!/bin/bash
# H200 call for issue 18 (2026-12-02, fifth session): the trigger's cost in LSA's resident mode, attributed and
# taken off the critical path. Run 4 timed synchronous triggers at 13-36% of decode time (median 12-31 ms each).
# Here: (1) full at B = 11 again (ratios within one run); (2) 13,125 slots at 512K, B = 11 / 32 / 64, each trigger
# prefetched 16 steps ahead on the helper thread (Session's prefetch_steps = 16): the TAU steps in which every row
# starts one and installs one are timed as a whole; one synchronous trigger profiled (host ops with shapes, kernels);
# (3) the same at 2,066 slots, B = 64.
# Call: run(timeout_s=600, command="bash docs/bench_results/static_h200/run5.sh"); results under $OUT. <= 9 minutes.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s)
F="warning\|online softmax\|split the reduction\|important use case\|^softmax\.$\|^$\|_warn_once"
timeout 100 python3 bench/bench_static.py --compile --contexts 524288 --batches 11 --steps 12 \
  --json $OUT/full_b11.json 2>&1 | grep -v -i "$F"
echo "full done at $(( $(date +%s) - start )) s"
timeout $(( 420 - ($(date +%s) - start) )) python3 bench/bench_static.py --compile --profile --triggers --prefetch 16 \
  --contexts 524288 --batches 11,32,64 --steps 12 --resident 13125 --max-seconds 240 \
  --json $OUT/resident_13125_prefetch16.json 2>&1 | grep -v -i "$F"
echo "13,125 slots done at $(( $(date +%s) - start )) s"
timeout $(( 540 - ($(date +%s) - start) )) python3 bench/bench_static.py --compile --profile --triggers --prefetch 16 \
  --contexts 524288 --batches 64 --steps 12 --resident 2066 --json $OUT/resident_2066_prefetch16.json 2>&1 \
  | grep -v -i "$F"
echo "all done at $(( $(date +%s) - start )) s"
