#!/bin/bash
# Issue 19 on the nvidia-h200-x2 machine, in one call (plan: <= 9 minutes). Run from the repository root with `.whl`
# carried (the datasets wheel and the two it needs that the image lacks: dill, multiprocess; `fm-index train` reads
# the label shards through datasets). Everything lands in $OUT (6 files):
#   log.txt              every step's output, in order
#   bench_two_gpu.json   step a: same tokens, step times, bytes per device, plan vs measured (bench/bench_two_gpu.py)
#   plan_gpus2.txt/.json step e: fm-index plan --gpus 2 for the Flash-shaped model's config
#   train_states.json    step d: train_state.json of the one-process and the DDP run
#   summary.txt          one line per check, and the seconds each step took
# Steps: (a) bench_two_gpu.py; (b) build-labels --device-map over two GPUs vs --device cuda:0, table for table, with
# the bundled reference model (float32) and with the Flash-shaped model (bf16); (c) torchrun --nproc_per_node 2
# build-labels (shards by RANK/WORLD_SIZE) + merge-labels vs one process; (d) torchrun --nproc_per_node 2 train
# (NCCL DDP) vs one process on the Flash-shaped labels: held-out metrics and wall time; (e) plan --gpus 2.
# .whl (git-ignored) is made here, before the call: echo /.whl/ >> .git/info/exclude; for w in datasets==5.2.0 dill==0.4.1
#   multiprocess==0.70.19; do python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
#   --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $w; done
# Call: run(kind="nvidia-h200-x2", timeout_s=600, carry=[".whl"], command="bash docs/bench_results/two_gpu/run.sh")
set -u
cd "$(dirname "$0")/../../.."
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # KINDS.md: multicast stays off
OUT=${OUT:?set OUT}
LOG=$OUT/log.txt SUM=$OUT/summary.txt W=/tmp/two_gpu
rm -rf $W && mkdir -p $W
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
note() { echo "$*" | tee -a $SUM; }
step() { echo -e "\n===== $1 (at $(elapsed) s) =====" >>$LOG; }
left() { echo $(( 540 - $(elapsed) )); }   # seconds left of the 9-minute plan
# run NAME LIMIT CMD...: a step under `timeout`, its output appended to the log; notes rc and seconds
run() {
  local name=$1 limit=$2; shift 2
  if [ "$limit" -gt "$(left)" ]; then limit=$(left); fi
  if [ "$limit" -le 5 ]; then note "$name: SKIPPED (no time left)"; return 99; fi
  step "$name: $*"
  local s=$(date +%s)
  timeout $limit "$@" >>$LOG 2>&1; local rc=$?
  note "$name: rc=$rc in $(( $(date +%s) - s )) s$([ $rc = 124 ] && echo " (timed out at $limit s)")"
  return $rc
}

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >>$LOG 2>&1 || note "wheels: install FAILED (fm-index train will fail)"
export PYTHONPATH=.:/tmp/site
{ nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, pyarrow, sys; print('torch', torch.__version__, 'transformers', transformers.__version__, 'pyarrow', pyarrow.__version__, 'python', sys.version.split()[0], 'gpus', torch.cuda.device_count())"
  python3 -c "import datasets; print('datasets', datasets.__version__)"; df -h /tmp /dev/shm | tail -2; date -u; } 2>&1 | tee -a $SUM >>$LOG

# corpora: random token ids (labels compare exactly; no tokenizer needed)
python3 - <<'EOF' >>$LOG 2>&1
import json, torch
from lsa_runtime.backbone import load_config
def write(path, vocab, lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for i, n in enumerate(lengths):
            f.write(json.dumps({"id": f"d{i}", "input_ids": torch.randint(3, vocab, (n,), generator=gen).tolist()}) + "\n")
write("/tmp/two_gpu/corpus_reference.jsonl", load_config("reference").vocab_size, [3000, 2000, 2500, 1500, 2800, 1200], 1)
write("/tmp/two_gpu/corpus_flash.jsonl", 32000, [2048] * 24, 2)
EOF

# (a) one model over two GPUs vs one GPU; the saved model is kept in $W/flash for (b) and (d)
run a_bench 230 python3 bench/bench_two_gpu.py --context 16384 --new-tokens 70 --model-dir $W/flash \
  --json $OUT/bench_two_gpu.json
[ -f $W/flash/config.json ] || note "a_bench: no saved Flash-shaped model: the Flash label steps will fail"

# (b) --device-map over two GPUs vs --device cuda:0, reference model (float32, 12 layers: 0-5 on GPU 0, 6-11 on GPU 1)
L="python3 cli.py build-labels --chunk-size 512"
run b_ref_one 60 $L --model reference --corpus $W/corpus_reference.jsonl --out $W/ref_one --device cuda:0
run b_ref_map 60 $L --model reference --corpus $W/corpus_reference.jsonl --out $W/ref_map --device-map "0:0-5,1:6-11"
run b_ref_compare 30 python3 docs/bench_results/two_gpu/compare_labels.py $W/ref_one $W/ref_map --what "reference labels, device map vs one GPU"
tail -1 $LOG >>$SUM
# (c) torchrun: one replica per GPU, documents sharded by RANK/WORLD_SIZE, then merge-labels
run c_ref_torchrun 90 torchrun --standalone --nproc_per_node 2 cli.py build-labels --chunk-size 512 --model reference \
  --corpus $W/corpus_reference.jsonl --out $W/ref_ddp
run c_merge 30 python3 cli.py merge-labels --out $W/ref_ddp
run c_ref_compare 30 python3 docs/bench_results/two_gpu/compare_labels.py $W/ref_one $W/ref_ddp --what "reference labels, torchrun 2 shards + merge vs one process"
tail -1 $LOG >>$SUM
# (b') the Flash-shaped model in bf16 (43 layers, 21 CSA), 24 documents of 2,048 tokens
run b_flash_one 75 $L --model $W/flash --dtype bfloat16 --corpus $W/corpus_flash.jsonl --out $W/flash_one --device cuda:0
run b_flash_map 75 $L --model $W/flash --dtype bfloat16 --corpus $W/corpus_flash.jsonl --out $W/flash_map --device-map "0:0-21,1:22-42"
run b_flash_compare 30 python3 docs/bench_results/two_gpu/compare_labels.py $W/flash_one $W/flash_map --what "Flash-shaped labels, device map vs one GPU"
tail -1 $LOG >>$SUM

# (d) DDP training (NCCL) vs one process on the Flash-shaped labels (hidden 4096, rank 2048, 64 x 128 heads)
LABELS=$W/flash_one; [ -f $LABELS/manifest.json ] || { LABELS=$W/ref_one; note "d: Flash labels missing, training on the reference labels"; }
TR="train --labels $LABELS --epochs 3 --batch-size 16 --bf16 --eval-fraction 0.25 --seed 0"
run d_train_one 80 python3 cli.py $TR --out $W/train_one
run d_train_ddp 80 torchrun --standalone --nproc_per_node 2 cli.py $TR --out $W/train_ddp
python3 - <<EOF 2>&1 | tee -a $SUM >>$LOG
import json
from pathlib import Path
states = {}
for name in ("train_one", "train_ddp"):
    p = Path("$W") / name / "train_state.json"
    states[name] = json.loads(p.read_text()) if p.exists() else None
Path("$OUT/train_states.json").write_text(json.dumps(states, indent=1))
for name, s in states.items():
    if not s or "metrics" not in s:
        print(f"d {name}: no finished state"); continue
    m = s["metrics"]
    print(f"d {name}: steps {s.get('steps')} union F1 {m.get('union_f1', float('nan')):.4f} recall {m.get('union_recall', float('nan')):.4f} "
          f"precision {m.get('union_precision', float('nan')):.4f} ratio {m.get('union_retrieval_ratio', float('nan')):.4f} AUC {m.get('union_auc') or float('nan'):.4f}")
EOF

# (e) the plan for two GPUs (config only)
run e_plan 30 python3 cli.py plan --model $W/flash --context 16K,128K,512K --gpus 2 --gpu-memory 141GiB
sed -n '/===== e_plan/,$p' $LOG > $OUT/plan_gpus2.txt
python3 cli.py plan --model $W/flash --context 16K,128K,512K --gpus 2 --gpu-memory 141GiB --json > $OUT/plan_gpus2.json 2>>$LOG

note "total $(elapsed) s"
echo "===== summary ====="; cat $SUM
