#!/bin/bash
# H200 call for issue 18 (written 2026-12-02, sixth session; run in the seventh, BENCHMARKS "Run 7"): the trigger with its plan on the
# device. Runs 5, 6 and a profile of 2026-12-02 (sixth session: B = 64, 13,125 slots: 29 ms wall, 26 ms host, 0.75 ms
# device) put a synchronous trigger's host time in CPU ops on ~13K ids: three index ops 13.6 ms, searchsorted 3.7 ms,
# sort 1.1 ms (the same ops take 0.1-0.3 ms on the 2-core development machine). StaticResidentRows now keeps each
# row's ids on the device (unique, ResidentPlan and the gathers run there; the host reads two counts). Here: the GPU
# tests of the static trigger path (tokens equal to the cold-pool path alone), full at B = 11 (ratios within one
# call), then 13,125 slots at B = 11 and 64 with every synchronous trigger timed by phase, one trigger profiled and
# the prefetched window; the JSON records the host's CPUs and torch's threads.
# Call: run(timeout_s=600, command="bash docs/bench_results/static_h200/run7.sh"); results under $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s)
uptime; nproc; python3 -c "import torch; print('torch threads', torch.get_num_threads())"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu -s --tb=short tests/test_static_residency.py \
  tests/test_batching.py -k "gpu" > $OUT/gpu_tests.txt 2>&1
grep -E "passed|failed|static .* on|static decode on|^E  " $OUT/gpu_tests.txt | head -16
echo "tests done at $(( $(date +%s) - start )) s"
F="warning\|online softmax\|split the reduction\|important use case\|^softmax\.$\|^$\|_warn_once"
timeout 150 python3 bench/bench_static.py --compile --contexts 524288 --batches 11 --steps 12 \
  --json $OUT/full_b11.json 2>&1 | grep -v -i "$F"
echo "full done at $(( $(date +%s) - start )) s"
timeout $(( 560 - ($(date +%s) - start) )) python3 bench/bench_static.py --compile --profile --triggers --prefetch 16 \
  --contexts 524288 --batches 64,11 --steps 12 --resident 13125 --max-seconds 200 \
  --json $OUT/resident_13125_prefetch16.json 2>&1 | grep -v -i "$F"
uptime
echo "all done at $(( $(date +%s) - start )) s"
