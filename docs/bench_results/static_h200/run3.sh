#!/bin/bash
# Next H200 call for issue 18, section 3 (ready, not yet run): after 2026-12-02's run2.sh, (1) the GPU tests written
# since: the compiled step against an fp32 oracle, the bf16 -> fp32 index-score GEMM against the stock scorer,
# Session(static_decode=True) on one CUDA graph; (2) kernels with transformers' Sinkhorn loop vs the entry-wise one
# (lsa_runtime/fused_mhc.py) at 512K, B = 1; (3) the compiled static step with the new index scoring at the batch
# sizes the 40 GiB concurrency goal asks for (512K: 11 rows; 128K: 47 rows), with kernel profiles.
# Call: run(timeout_s=600, command="bash docs/bench_results/static_h200/run3.sh"); results under $OUT. <= 9 minutes.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s)
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu -s --tb=short tests/test_static_decode.py \
  tests/test_batching.py -k "static or cuda_graph or index_scores" > $OUT/gpu_tests.txt 2>&1
grep -E "passed|failed|whole-step|static decode on|^E  " $OUT/gpu_tests.txt | head -16
echo "tests done at $(( $(date +%s) - start )) s"
F="warning\|online softmax\|split the reduction\|important use case\|^softmax\.$\|^$"
timeout 80 python3 bench/bench_static.py --compile --stock-mhc --profile --contexts 524288 --batches 1 --steps 12 \
  --json $OUT/static_512k_stock_mhc.json 2>&1 | grep -v -i "$F"
timeout 170 python3 bench/bench_static.py --compile --profile --contexts 524288 --batches 1,11,16 --steps 12 \
  --max-seconds 110 --json $OUT/static_512k.json 2>&1 | grep -v -i "$F"
echo "512K done at $(( $(date +%s) - start )) s"
timeout 140 python3 bench/bench_static.py --compile --profile --contexts 131072 --batches 16,47 --steps 12 \
  --max-seconds 80 --json $OUT/static_128k.json 2>&1 | grep -v -i "$F"
echo "all done at $(( $(date +%s) - start )) s"
