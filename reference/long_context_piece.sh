#!/bin/bash
# A long-context piece for a session with its full device budget (data/reference/README.md, "Gaps"). Two calls back
# to back on one H200 (the machine is released 30 s after a call; its disk keeps call 1's checkpoint only while it is
# warm), here first staging the candidate to continue (it travels as data/reference's weights), unstaging after:
#   bash reference/long_context_piece.sh stage CKPT                          # here, only to continue a candidate
#   run(timeout_s=600, carry=["reference/work/corpus.npz"], command="bash reference/long_context_piece.sh train")
#   run(timeout_s=600, carry=["reference/work/corpus.npz"], command="bash reference/long_context_piece.sh finish")
#   bash reference/long_context_piece.sh unstage                              # here, at once (after a stage)
# A machine can be given back between the calls even when they follow at once (seen 2026-12-02): `train` returns its
# weights under $OUT/ckpt1, and `finish` starts from them once staged here (`stage <files_at>/ckpt1`, `finish`,
# `unstage`), in the same session or a later one.
# Recipe L5 (train) + L6 (finish), run 2026-12-02 from the staged L4 and adopted as the default (data/reference/
# README.md, "Long context, third attempt"): 8 minutes cycling 64K / 4K / 16K / 8K / 32K (64K fits since the chunked
# Lightning Indexer; seed 31), then 3.5 minutes of 4K / 8K / 16K / 32K with the lr decayed over the last 2.5 (seed 32).
# Recipe L7 + L8 (run 2026-12-02, fourth session; NOT adopted, the card's "Long context, fourth attempt"): from the
# default itself (no staging), the card's "Gaps": examples per length fall with length (one 64K sequence per step),
# so the train call cycles 64K / 32K / 64K / 4K (half of its steps at 64K, ~100 sequences in 8 minutes, a quarter
# at 32K; new data: seed 33), the finish call is L6's with seed 34.
# Recipe L9 + L10 (run 2026-12-02, sixth and seventh sessions; NOT adopted, the card's "Long context, fifth
# attempt": better at 8K-32K, worse at 4K and 64K): the card's next "Gaps" candidate, a curriculum of
# the needle's distance inside long sequences: from the default itself, the train call cycles 64K / 32K / 16K / 4K
# with every needle at most 2,048 tokens before the question at first, the bound growing to 64K over 180 steps (about
# the piece's 8 minutes; `reference/train.py --needle-distance`), seed 35; the finish call is L6's with seed 36.
# Recipe L11 + L12 (run 2026-12-03, eighth and ninth sessions; NOT adopted, the card's "Long context, sixth attempt":
# better at 8K and 32K, worse at 4K and 16K, 64K at chance): from L10, the best candidate at 8K-32K, which had to
# win back 4K (the card's "Long context, fifth attempt"). Stage it first (`stage reference/work/L10`): the train
# call cycles 64K / 32K / 16K / 4K with the needle distance growing from 8,192 to 64K over 120 steps (L9 already
# went through the short distances) and the full distance after, seed 37; the finish call spends half its steps at
# 4K (4K / 8K / 4K / 16K / 4K / 32K), lr decayed over the last 2.5 minutes, seed 38. If the machine is lost between
# the calls, `unstage`, then `stage` call 1's ckpt1 (finish refuses a staged candidate that is not a ckpt1).
# `finish` evaluates with the default's exact command (same seeds) and prints the verdict of
# reference/compare_evals.py; the candidate's bf16 checkpoint comes back under $OUT (two 15 MB shards): keep it in
# reference/work/ (git-ignored) to stage it next time, commit it as data/reference only if adopted. train.log /
# init.json say which weights the piece started from (fm_index.json's note says STAGED for a staged candidate).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
MIX=niah_single=0.3,niah_multikey=0.15,niah_multivalue=0.2,niah_multiquery=0.15,vt=0.2
W=/root/fmref3
# the files reference.export writes (and `stage` replaces); the card and training_results.json are not among them
STAGED="data/reference/model.safetensors data/reference/config.json data/reference/generation_config.json data/reference/fm_index.json"
# one sequence per micro-batch at 32K and 64K (activation checkpointing; 55 GiB at 32K before the chunked indexer), eight at 4K
COMMON="--resume --reset-step --checkpointing --attention window --steps 100000 --batch-tokens 65536 \
  --micro-tokens 32768 --lr 1e-3 --code-frac 0.2 --mix $MIX --ckpt-dtype bfloat16 --log-every 1"
case "${1:-}" in
  train)
    nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/env.txt
    cp data/reference/fm_index.json $OUT/init.json
    # the chunked indexer copies transformers 5.24's key computation: check it against this machine's transformers
    python3 -m pytest -q -p no:cacheprovider tests/test_reference_model.py \
      -k "chunked_indexer or window_attention_equals or activation_checkpointing" > $OUT/tests.txt 2>&1 ||
      { tail -20 $OUT/tests.txt; echo "chunked indexer differs from this transformers: not training"; exit 4; }
    tail -1 $OUT/tests.txt
    python3 -m reference.train --ckpt $W/ckpt1 --init data/reference $COMMON --warmup 20 --seed 37 \
      --stages 65536/32768/16384/4096:0:64 --needle-distance 8192:65536:120 --max-minutes 8.0 > $OUT/train1.log 2>&1
    tail -3 $OUT/train1.log
    # the machine may be given back between the two calls: call 1's weights come back to be staged for call 2
    mkdir -p $OUT/ckpt1 && cp $W/ckpt1/weights-*.safetensors $W/ckpt1/state.json $OUT/ckpt1/ ;;
  finish)
    INIT=$W/ckpt1  # on the machine of call 1; else call 1's weights staged here as data/reference (`stage`)
    test -d $INIT || { grep -q "STAGED candidate [^ ]*ckpt1" data/reference/fm_index.json && INIT=data/reference; } ||
      { echo "no $W/ckpt1 (call 1 ran on another machine) and no staged ckpt1: stage call 1's ckpt1 first"; exit 3; }
    echo "finish from $INIT" | tee $OUT/finish_init.txt
    python3 -m reference.train --ckpt $W/ckpt2 --init $INIT $COMMON --warmup 10 --seed 38 \
      --stages 4096/8192/4096/16384/4096/32768:0:64 --max-minutes 3.5 --decay-minutes 2.5 > $OUT/train2.log 2>&1
    tail -3 $OUT/train2.log
    python3 -m reference.evaluate_needles --model $W/ckpt2 --attention window --lengths 4096 8192 16384 32768 65536 \
      --n 40 --n-at 16384=20 32768=20 65536=10 --chunk-above 32768 --chunk 4096 --chunk-gib 8 --max-minutes 4.2 \
      --out $OUT/eval_candidate.json > $OUT/eval.log 2>&1
    python3 -m reference.compare_evals $OUT/eval_candidate.json | tee $OUT/verdict.txt
    cp $W/ckpt2/weights-*.safetensors $W/ckpt2/state.json $OUT/ ;;
  stage)  # here, before the device calls: a candidate to continue travels as data/reference's weights
    ckpt=${2:-}
    test -f "$ckpt/state.json" || { echo "stage: ${ckpt:-(none)} is not a training checkpoint (no state.json)"; exit 2; }
    git diff --quiet -- $STAGED || { echo "stage: data/reference's weights or config have local changes; commit or restore them first"; exit 2; }
    ${PYTHON:-python3} -m reference.export --ckpt "$ckpt" --out data/reference --note "STAGED candidate $ckpt for a device call: \
run 'bash reference/long_context_piece.sh unstage' after it" >/dev/null &&
    echo "staged $ckpt as data/reference (the tree's size is unchanged); unstage right after the device calls" ;;
  unstage)  # here, after the device calls: the committed reference back (git holds it)
    git checkout -- $STAGED && git diff --quiet -- $STAGED && echo "data/reference's weights and config restored from git" ;;
  *) echo "usage: bash reference/long_context_piece.sh train|finish (device) | stage CKPT|unstage (here)"; exit 2 ;;
esac
