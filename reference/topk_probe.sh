#!/bin/bash
# Issue 20 section 1, a diagnostic for the next long-context piece (written 2026-12-03, eleventh session): the
# default (L6) answers single needles 55-65% at 32K and nothing at 64K with its native top-64 (data/reference/
# README.md, "Needles, the default"). Does it fail because its Lightning Indexer picks the wrong compressed entries
# at long range, or because attention cannot use them? The same evaluation (same seeds, tasks, n) with index_topk
# raised to 256 and to every entry (16,384 at 64K: the indexer no longer selects): if accuracy comes back with more
# picks, the indexer's selection is what the next piece must train; if not, the backbone's reading is.
# Call: run(timeout_s=600, carry=["reference/work/corpus.npz"], command="bash reference/topk_probe.sh"); results
# under $OUT (topk_K.json, eval_K.log).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s) BUDGET=${BUDGET:-540}  # seconds for the whole call (less when the session's device time is short)
for K in 16384 256; do
  left=$(( BUDGET - ($(date +%s) - start) ))
  [ $left -gt 60 ] || { echo "top-k $K: no time left"; continue; }
  minutes=$(python3 -c "print(round(min(4.2, ($left - 40) / 60 / (2 if $K == 16384 else 1)), 1))")
  echo "top-k $K: up to $minutes min"
  cap=$(python3 -c "print(min($left, int($minutes * 60) + 60))")  # a task started before the deadline may finish
  timeout $cap python3 -m reference.evaluate_needles --model data/reference --corpus reference/work/corpus.npz \
    --attention window --lengths 65536 32768 --n 20 --n-at 65536=10 --topk $K \
    --tasks single_number_code single_number_noise multivalue_number_code --chunk-above 32768 --chunk 4096 \
    --chunk-gib 8 --max-minutes $minutes --out $OUT/topk_$K.json > $OUT/eval_$K.log 2>&1
  echo "rc=$? at $(( $(date +%s) - start )) s"; tail -12 $OUT/eval_$K.log
done
