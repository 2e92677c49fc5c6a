#!/usr/bin/env bash
# The convergence benchmark on one GPU, once bench/carry_packaged.sh assemble has run there
# (the calls, in order, are in docs/convergence.md).
#   OUT=/some/dir bash bench/convergence_gpu.sh PRESET [bench/convergence.py run flags...]
# Presets, on debates (296 train / 100 dev / 200 test) unless named otherwise:
#   smoke       a minute: every family runs a few steps (check the machine before a long call)
#   zo          ZO-SGD's lr grid with seed 0, then the best lr with seeds 1 and 2
#   zo-seeds    ZO-SGD at LR with seeds 1 and 2 (when the zo call ran out of time after its grid)
#   directions  q = 1, 2, 4, 8 at LR, each with the same number of forward passes
#   baselines   AdamW full and LoRA (MeZO's protocol: 5 epochs, batch 16, linear decay), lr grids, 3 seeds
#   hamlet      LM loss on held-out Hamlet: ZO-SGD at LR against AdamW full and LoRA
# Flags after the preset come after its own, so they win (--seeds 1,2; --set eval_batch_size=200).
# BUDGET (seconds, default 540) bounds the harness inside a 10-minute call.
set -uo pipefail
OUT=${OUT:-bench-out}
BUDGET=${BUDGET:-540}
LR=${LR:-3e-5}
mkdir -p "$OUT"
eval "$(bash bench/carry_packaged.sh env)"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0

debates=(--task debates --set task.num_train=296,task.num_dev=100,task.num_test=200,eval_batch_size=100)
zo="steps=4000,eval_every=200"
case "${1:-}" in
    smoke) args=("${debates[@]}" --set task.num_dev=32,task.num_test=32 --arm zo:zo:steps=40,eval_every=20
                 --arm ft:adamw:epochs=1 --arm lora:adamw:lora=true,epochs=1,lr=1e-3 --seeds 0 --target-arm zo) ;;
    zo) args=("${debates[@]}" --arm "zo:zo:$zo" --grid zo:lr=1e-5,3e-5,1e-4 --seeds 0,1,2 --target-arm zo) ;;
    zo-seeds) args=("${debates[@]}" --arm "zo:zo:$zo,lr=$LR" --seeds 1,2 --target-arm zo) ;;
    directions) args=("${debates[@]}" --arm "q1:zo:q=1,steps=4000,eval_every=200,lr=$LR"
                      --arm "q2:zo:q=2,steps=2000,eval_every=100,lr=$LR" --arm "q4:zo:q=4,steps=1000,eval_every=50,lr=$LR"
                      --arm "q8:zo:q=8,steps=500,eval_every=25,lr=$LR" --seeds 0 --target-arm q1) ;;
    baselines) args=("${debates[@]}" --arm ft:adamw --grid ft:lr=1e-5,3e-5,1e-4
                     --arm lora:adamw:lora=true --grid lora:lr=1e-4,3e-4,1e-3 --seeds 0,1,2) ;;
    hamlet) args=(--task text --set task.max_length=256,task.num_train=189,task.num_dev=20,task.num_test=20
                  --arm "zo:zo:steps=2000,eval_every=100,lr=$LR" --arm ft:adamw:lr=3e-5
                  --arm lora:adamw:lora=true,lr=3e-4 --seeds 0 --target-arm zo) ;;
    *) echo "usage: OUT=dir bash bench/convergence_gpu.sh smoke|zo|zo-seeds|directions|baselines|hamlet [flags]" >&2
       exit 2 ;;
esac
shift

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/convergence.log"
python3 bench/convergence.py run "${args[@]}" --time-budget-s "$BUDGET" --out "$OUT" "$@" 2>&1 | tee -a "$OUT/convergence.log"
