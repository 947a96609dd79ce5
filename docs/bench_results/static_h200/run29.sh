#!/bin/bash
# Results: docs/BENCHMARKS.md, "Run 29"; raw under run29/.
# Device call for issue 18 (written 2026-12-06, thirty-fourth session). Run 27 (H100) found the batch-1 step faster
# with the attention inputs fused (full 17.03 -> 15.89 ms, LSA 16.44 -> 15.02 ms; one sample each), where run 20
# (H200) found it slower: the compiled head-weighted sum then took 80.9 us a call, 13.3 us in run 27 since the head
# weights are contiguous. Before fusing becomes the default: the four batch-1 steps at 512K again on one machine in
# ABBA order (unfused, fused, fused, unfused), then LSA at B = 64 (13,125 slots, no triggers) both ways.
# Call: run(timeout_s=600, command="bash docs/bench_results/static_h200/run29.sh"); results under $OUT.
# Run 2026-12-06 on an H100 (512 s): the tenth step ran out of time; on the same warm machine (58 s):
#   python3 bench/bench_static.py --compile --contexts 524288 --batches 64 --steps 8 --resident 13125 \
#     --fuse-inputs --json $OUT/10_h100_lsa_fused_b64.json   (43.35 ms)
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s)
F="warning\|online softmax\|split the reduction\|important use case\|^softmax\.$\|^$\|_warn_once\|USDT"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "device: $gpu"
tag=$(echo "$gpu" | grep -q H200 && echo h200 || echo h100)
left() { echo $(( ${BUDGET:-570} - ($(date +%s) - start) )); }
mkdir -p $OUT/runs
i=0
for spec in full:1 full_fused:1 lsa:1 lsa_fused:1 lsa_fused:1 lsa:1 full_fused:1 full:1 lsa:64 lsa_fused:64; do
  mode=${spec%:*} b=${spec#*:} i=$((i + 1))
  [ $(left) -gt 90 ] || { echo "out of time before $mode B = $b"; continue; }
  extra=(); case $mode in lsa*) extra=(--resident 13125);; esac
  case $mode in *_fused) extra+=(--fuse-inputs);; esac
  echo "$i. $mode, 512K, B = $b"
  timeout $(( $(left) - 10 )) python3 bench/bench_static.py --compile --contexts 524288 --batches $b --steps 8 \
    "${extra[@]}" --json $OUT/runs/${i}_${tag}_${mode}_b${b}.json 2>&1 | grep -v -i "$F" | grep -v "context   B"
done
tar -C $OUT -czf $OUT/run29_json.tgz runs && rm -r $OUT/runs  # ten JSONs; a call returns at most 8 files
echo "all done at $(( $(date +%s) - start )) s"
