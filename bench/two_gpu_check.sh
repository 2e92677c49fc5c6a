#!/usr/bin/env bash
# Two GPUs of one host: the GPU tests of the engines (NCCL fault path included), resident
# pert/data against one GPU (with the forward / exchange split and a kernel profile), and
# sliced offload at each prefetch depth and write-back interval.
#   OUT=/some/dir bash bench/two_gpu_check.sh
#   OUT=/some/dir MODELS="opt-30b" PARTS="sliced" bash bench/two_gpu_check.sh
set -u
OUT=${OUT:-bench-out}; WORK=${WORK:-/tmp/distzo-two}
PARTS=${PARTS:-tests sliced resident}
mkdir -p "$OUT" "$WORK"
export PYTHONPATH=src PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
{ nvidia-smi topo -m; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv; nproc; } > "$OUT/topo.txt"
for part in $PARTS; do
  case $part in
    tests)
      echo "== tests"
      timeout 300 python -m pytest tests/test_offload.py tests/test_parallel.py -q -rfE --tb=short -p no:cacheprovider \
        -k "gpu or cuda" > "$OUT/tests.log" 2>&1; tail -n 3 "$OUT/tests.log" ;;
    resident)
      echo "== resident"
      timeout 200 python bench/bench_parallel.py --profile --out "$WORK/par1.json" > "$WORK/par1.log" 2>&1 || tail -n 5 "$WORK/par1.log"
      timeout 300 torchrun --standalone --nproc-per-node 2 bench/bench_parallel.py --modes pert data data-xN --profile \
        --out "$WORK/par2.json" > "$WORK/par2.log" 2>&1 || tail -n 5 "$WORK/par2.log"
      grep -h "^rank" "$WORK/par2.log" | cut -c1-400
      python -c "import json,sys; [print(f, json.dumps(json.load(open(f))['runs'])) for f in sys.argv[1:]]" "$WORK"/par*.json
      cp "$WORK"/par*.json "$OUT"/ ;;
    sliced)
      OUT=$OUT WORK=$WORK/sliced GPUS=2 bash bench/sliced_check.sh ;;
  esac
done
