#!/bin/bash
# Results: data/reference/README.md, "Indexer or reading?" (KS default, run 2026-12-03, 214 s on one H200; then
# KS="1024 4096" RANK_N=10 BUDGET=540, 368 s, raw in docs/results/topk_probe_h200/run2/).
# Issue 20 section 1, a diagnostic for the next long-context piece (written 2026-12-03, eleventh session): the
# default (L6) answers single needles 55-65% at 32K and nothing at 64K with its native top-64 (data/reference/
# README.md, "Needles, the default"). Does it fail because its Lightning Indexer picks the wrong compressed entries
# at long range, or because attention cannot use them? The same evaluation (same seeds, tasks, n) with index_topk
# raised to 256 and to every entry (16,384 at 64K: the indexer no longer selects): if accuracy comes back with more
# picks, the indexer's selection is what the next piece must train; if not, the backbone's reading is.
# Call: run(timeout_s=600, carry=["reference/work/corpus.npz"], command="[KS=...] [RANK_N=N] bash reference/topk_probe.sh"); results
# under $OUT (topk_K.json, eval_K.log).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$(date +%s) BUDGET=${BUDGET:-540} done_ks=0  # seconds for the whole call (less when the session's device time is short)
for K in ${KS-16384 256}; do
  left=$(( BUDGET - ($(date +%s) - start) ))
  [ $left -gt 60 ] || { echo "top-k $K: no time left"; continue; }
  n_ks=$(echo ${KS-16384 256} | wc -w)
  minutes=$(python3 -c "print(round(min(4.2, ($left - 40) / 60 / max(1, $n_ks - $done_ks)), 1))")
  echo "top-k $K: up to $minutes min"
  cap=$(python3 -c "print(min($left, int($minutes * 60) + 60))")  # a task started before the deadline may finish
  timeout $cap python3 -m reference.evaluate_needles --model data/reference --corpus reference/work/corpus.npz \
    --attention window --lengths 65536 32768 --n 20 --n-at 65536=10 --topk $K \
    --tasks single_number_code single_number_noise multivalue_number_code --chunk-above 32768 --chunk 4096 \
    --chunk-gib 8 --max-minutes $minutes --out $OUT/topk_$K.json > $OUT/eval_$K.log 2>&1
  echo "rc=$? at $(( $(date +%s) - start )) s"; tail -12 $OUT/eval_$K.log
  done_ks=$((done_ks + 1))
done
# RANK_N=N: then the indexer's rank of the needle per CSA layer (reference/needle_rank.py; the first N prompts of the
# same evaluation at 64K and 32K, code and noise haystacks) with what time is left; ATTN=1 adds the main attention's
# own rank of the needle with every entry readable (--attention-rank). KS="" skips the top-k evaluations: the call
# for that (written 2026-12-03, twelfth session, not run yet):
#   run(timeout_s=600, carry=["reference/work/corpus.npz"], command='KS="" RANK_N=10 ATTN=1 BUDGET=400 bash reference/topk_probe.sh')
if [ -n "${RANK_N:-}" ]; then
  for task in single_number_code single_number_noise; do
    left=$(( BUDGET - ($(date +%s) - start) ))
    [ $left -gt 30 ] || break
    timeout $left python3 -m reference.needle_rank --device cuda --corpus reference/work/corpus.npz --task $task \
      --lengths 65536 32768 --n $RANK_N --chunk 4096 ${ATTN:+--attention-rank} --out $OUT/needle_rank_$task.json \
      > $OUT/needle_rank_$task.log 2>&1
    echo "needle_rank $task rc=$? at $(( $(date +%s) - start )) s"; tail -3 $OUT/needle_rank_$task.log
  done
fi
