#!/usr/bin/env bash
# Sliced offload vs one GPU offloading alone, global batch 4 x 512: every (prefetch depth,
# write-back interval) of one build in turn.
#   OUT=/some/dir bash bench/sliced_check.sh
#   OUT=/some/dir MODELS="opt-13b" GPUS="2" PREFETCH="1 2" WRITE_EVERY="1 2 4" bash bench/sliced_check.sh
set -u
OUT=${OUT:-bench-out}; WORK=${WORK:-/tmp/distzo-sliced}
mkdir -p "$OUT" "$WORK"
export PYTHONPATH=src PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
N=$(nvidia-smi -L | wc -l)
MODELS=${MODELS:-opt-13b opt-30b}; GPUS=${GPUS:-2 $N}; PREFETCH=${PREFETCH:-1 2}; WRITE_EVERY=${WRITE_EVERY:-1 2 4}
B="bench/bench_offload.py"
SWEEP="--batch 4x512 --steps 4 --warmup 1 --prefetch $PREFETCH --write-every $WRITE_EVERY"
run() { local name=$1 limit=$2; shift 2; echo "== $name"; timeout "$limit" "$@" > "$WORK/$name.log" 2>&1 || tail -n 4 "$WORK/$name.log"; }
for m in $MODELS; do
  run $m-1 240 python $B step --model $m $SWEEP --out "$WORK/$m-1.json"
  for n in $GPUS; do
    run $m-$n 240 torchrun --standalone --nproc-per-node $n $B step --model $m --pert 2 $SWEEP --out "$WORK/$m-$n.json"
  done
done
python - "$WORK" "$OUT/sliced.json" <<'PY'
import json, pathlib, sys
rows = {p.stem: json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json"))}
pathlib.Path(sys.argv[2]).write_text(json.dumps(rows, indent=1))
keep = ("ms_per_step", "mean_ms", "floor_ms", "bytes_down_per_step_GB", "gpu_used_GB", "loss", "all_ms")
for name, r in rows.items():
    print(name, "h2d", round(r["h2d_GBs"], 1), "build_s", r["build_s"])
    for combo, run in r.get("by_prefetch", {"": r}).items():
        print("  ", combo, {k: round(run[k], 3) if isinstance(run[k], float) else run[k] for k in keep if k in run})
PY
