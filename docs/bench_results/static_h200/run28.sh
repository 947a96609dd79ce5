#!/bin/bash
# Results: docs/BENCHMARKS.md, "Run 28"; raw under run28/.
# H200 call for issue 18's goal 1 (written 2026-12-06, thirty-fourth session). Run 27 (H100) timed the batch-1 steps
# at 512K with and without the attention inputs fused: full 17.03 / 15.89 ms, LSA (13,125 slots) 16.44 / 15.02 ms.
# The goal is stated on the H200 (<= 3x its memory-traffic limit, ~7.5 ms); its last H200 figures are run 20's
# (16.15 / 15.42 ms, sorted picks, inputs not fused). The same four steps on one H200; on an H100 nothing is run.
# Call: run(timeout_s=420, command="bash docs/bench_results/static_h200/run28.sh"); results under $OUT.
# 2026-12-06: called with kind nvidia-h200 while an H100 was held; it ran on the H100 and ran nothing (not an
# H200). Still to run on an H200; since run 30 fusing stays opt-in, so its fused rows time an option.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s)
F="warning\|online softmax\|split the reduction\|important use case\|^softmax\.$\|^$\|_warn_once\|USDT"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "device: $gpu"
echo "$gpu" | grep -q H200 || { echo "not an H200: nothing run"; exit 0; }
left() { echo $(( ${BUDGET:-400} - ($(date +%s) - start) )); }
for mode in full full_fused lsa lsa_fused; do
  [ $(left) -gt 60 ] || { echo "out of time before $mode"; continue; }
  extra=(); case $mode in lsa*) extra=(--resident 13125);; esac
  case $mode in *_fused) extra+=(--fuse-inputs);; esac
  echo "$mode, 512K, B = 1 (unsorted picks)"
  timeout $(( $(left) - 10 )) python3 bench/bench_static.py --compile --contexts 524288 --batches 1 --steps 8 \
    "${extra[@]}" --profile-ops --json $OUT/h200_${mode}_512k_b1.json 2>&1 | grep -v -i "$F"
done
echo "all done at $(( $(date +%s) - start )) s"
