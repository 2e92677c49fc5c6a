#!/usr/bin/env bash
# Sliced offload vs one GPU offloading alone: OPT-13B and OPT-30B, global batch 4 x 512.
#   OUT=/some/dir bash bench/sliced_check.sh
set -u
OUT=${OUT:-bench-out}; WORK=${WORK:-/tmp/distzo-sliced}
mkdir -p "$OUT" "$WORK"
export PYTHONPATH=src PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
N=$(nvidia-smi -L | wc -l)
B="bench/bench_offload.py"
run() { local name=$1 limit=$2; shift 2; echo "== $name"; timeout "$limit" "$@" > "$WORK/$name.log" 2>&1 || tail -n 4 "$WORK/$name.log"; }
for m in opt-13b opt-30b; do
  run $m-1 120 python $B step --model $m --batch 4x512 --steps 4 --warmup 1 --out "$WORK/$m-1.json"
  for n in 2 $N; do
    run $m-$n 150 torchrun --standalone --nproc-per-node $n $B step --model $m --batch 4x512 --pert 2 --steps 4 --warmup 1 --out "$WORK/$m-$n.json"
  done
done
python - "$WORK" "$OUT/sliced.json" <<'PY'
import json, pathlib, sys
rows = {p.stem: json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json"))}
pathlib.Path(sys.argv[2]).write_text(json.dumps(rows, indent=1))
for name, r in rows.items():
    print(name, {k: round(r[k], 3) if isinstance(r[k], float) else r[k] for k in
                 ("ms_per_step", "floor_ms", "vs_floor", "h2d_GBs", "gpu_used_GB", "loss", "all_ms")})
PY
