#!/bin/bash
# Issue 20 section 3 on one H200 (written 2026-12-03, tenth session; not run yet beyond the probe below): labels at
# the method's settings on long documents, with the bundled `reference` backbone (its long-context skill is the
# card's: this measures the labels and the indexer, not the backbone). Two calls back to back on one machine (the
# label directory is git-ignored under runs/ and stays on the device's disk while it is held; build-labels resumes
# where it stopped):
#   call 1: make-corpus (16K / 32K / 64K tokens; single, multikey, multivalue, vt; 7 prompts per seen needle format,
#           kind and length: 336 documents), then build-labels --source generate (the model's own answers labelled,
#           as the authors label their dumps), nucleus 0.6, 3 votes, the release's top-k softmax, until 540 s;
#   call 2: build-labels again (resumes, finishes), then train (focal loss, rank 256, 6 epochs, a quarter of the
#           documents held out) and the label statistics; results under $OUT: manifest.json (positives per trigger
#           window before the vote: candidates_mean; after it: positives_mean), train_state.json (held-out F1 / AUC
#           of the union against recency and chance at the same retrieval ratio), log.txt.
# `fm-index train` reads the shards through datasets, which the image lacks: carry `.whl` (made here first:
#   for w in datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19; do python3 -m pip download --no-deps
#   --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
#   --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $w; done).
# Calls: run(timeout_s=600, carry=[".whl", "runs/labels_long/corpus.jsonl.gz"], command="bash
#        docs/results/labels_long_h200/run.sh 1"), then at once the same with "... run.sh 2"; if its log says
#        build-labels stopped at the time limit (rc=124), call 2 again at once (it resumes, then trains).
# Probe (2026-12-03, H200, 104 s call; probe/): 4 single-needle documents of 64K: make-corpus 11 s (2.8 s a
# prompt), build-labels 55 s (~12.5 s a document after the first, 4,750 tokens/s; golden 9.2 of 16,384 visible
# entries per trigger, 2,391 in some layer's nucleus before the vote). So the 336 documents need ~40 min of label
# building (112 x 12.5 s at 64K, ~6 s at 32K, ~3 s at 16K): more than one session's device time. Build the
# corpus here first (the same make-corpus command into runs/labels_long/, then gzip -k: ~9 min of the device saved;
# the card beside it, corpus.json, stays here) and either speed label building up or spread the calls over two
# sessions (the labels do not survive a fresh machine: keep it warm between calls). Where the 12.5 s go on the GPU
# is not profiled (one 64K document under torch.profiler first); on this repository's CPU (cProfile of one 8K document,
# --chunk-size 4096): 195 s in the backbone's forwards, of which transformers' eager attention 122 s and the
# Lightning Indexer's scorer (fp32 logits over chunk x entries x heads) 53 s: the prompt's two prefills (the
# continuation's, timed alone at 40 s with chunks of 4,096 and 12 s with 512, and the capture pass's, the same
# forwards), not the 64 decode steps (~50 ms each) nor the label math.
# A small local check of the same commands: LENGTHS=2k PER_FORMAT=1 DEVICE=cpu OUT=/tmp/x W=/tmp/x/w bash ... 1; ... 2
set -u
cd "$(dirname "$0")/../../.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:?set OUT} PHASE=${1:?call 1 or 2}
LENGTHS=${LENGTHS:-16k,32k,64k} PER_FORMAT=${PER_FORMAT:-7} DEVICE=${DEVICE:-cuda} W=${W:-runs/labels_long}
CHUNK=${CHUNK:-512}
FM="python3 cli.py"
[ -x .venv/bin/python ] && FM=".venv/bin/python cli.py"   # a local check from this repository's venv
python3 -c "import datasets" 2>/dev/null || { [ -d .whl ] && python3 -m pip install -q --no-deps --no-index \
  .whl/*.whl; }
mkdir -p $W $OUT
T0=$(date +%s)
left() { echo $(( 560 - ($(date +%s) - T0) )); }
# the corpus built ahead (gzipped to stay well inside the carry limit), else built here
[ -f $W/corpus.jsonl ] || [ ! -f $W/corpus.jsonl.gz ] || gunzip -k $W/corpus.jsonl.gz
if [ "$PHASE" = 1 ]; then
  [ -f $W/corpus.jsonl ] || $FM make-corpus --out $W/corpus.jsonl --lengths $LENGTHS \
    --kinds single,multikey,multivalue,vt --per-format $PER_FORMAT --seed 20 2>&1 | tail -3 | tee -a $OUT/log.txt
fi
# CHUNK: build-labels' --chunk-size (the probe ran 4,096; on this CPU 512 prefills an 8K prompt 3.3x faster: measure
# both on the GPU before the long run)
timeout $(left) $FM build-labels --corpus $W/corpus.jsonl --out $W/labels --source generate --new-tokens 64 \
  --nucleus 0.6 --min-votes 3 --softmax-over topk --chunk-size $CHUNK --device $DEVICE \
  $([ -f $W/labels/manifest.json ] && echo --resume) 2>&1 | tail -25 | tee -a $OUT/log.txt
echo "build-labels rc=${PIPESTATUS[0]} at $(( $(date +%s) - T0 )) s" | tee -a $OUT/log.txt
[ -f $W/labels/manifest.json ] && cp $W/labels/manifest.json $OUT/
complete() { python3 -c "import json, sys; sys.exit(not json.load(open('$W/labels/manifest.json'))['complete'])"; }
if [ "$PHASE" = 2 ] && complete 2>/dev/null && [ "$(left)" -gt 60 ]; then
  timeout $(left) $FM train --labels $W/labels --out $W/train --rank 256 --epochs 6 --eval-fraction 0.25 \
    --model reference $([ $DEVICE = cuda ] && echo --bf16) 2>&1 | tail -30 | tee -a $OUT/log.txt
  [ -f $W/train/train_state.json ] && cp $W/train/train_state.json $OUT/
fi
echo "call $PHASE done at $(( $(date +%s) - T0 )) s" | tee -a $OUT/log.txt
