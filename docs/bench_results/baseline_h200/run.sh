#!/bin/bash
# Issue 18 section 1 on the lent H200: the honest full baseline. transformers' stock decoder (full), the best
# exact full decoder we have (all: LSA's cache and kernels with every entry resident) and LSA, each with the
# backbone's stateless modules as CUDA graphs (a Session's default on a GPU), at 128K and 512K tokens.
# Run from the repository root after gpu_check.sh (issue 16) when both share a call; results under $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s)
timeout 280 python3 bench/bench_decode.py --contexts 131072,524288 --steps 66 --tau 64 \
  --modes full+graphs,all+graphs,lsa+graphs --json $OUT/decode_baseline.json > $OUT/decode_baseline_full.txt 2>&1
grep -v -i warning $OUT/decode_baseline_full.txt | tail -40
echo "decode done at $(( $(date +%s) - start )) s"
