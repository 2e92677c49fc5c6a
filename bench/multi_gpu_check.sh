#!/usr/bin/env bash
# Scale-out on one multi-GPU host: data/pert parallel (resident) and sliced offload vs one GPU.
#   OUT=/some/dir STAGE=1 bash bench/multi_gpu_check.sh     # tests, link, resident DP/pert, OPT-30B sliced, OPT-66B x1
#   OUT=/some/dir STAGE=2 bash bench/multi_gpu_check.sh     # ZO2's settings, sliced OPT-30B/66B, OPT-175B under 16 GiB
# Every JSON goes to $WORK; $OUT gets summary.json (all of them), topo.txt and the test log.
set -u
OUT=${OUT:-bench-out}; WORK=${WORK:-/tmp/distzo-bench}; STAGE=${STAGE:-1}
mkdir -p "$OUT" "$WORK"
export PYTHONPATH=src PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
N=$(nvidia-smi -L | wc -l)
B="bench/bench_offload.py"
TR="torchrun --standalone --nproc-per-node"
run() { local name=$1 limit=$2; shift 2; echo "== $name"; timeout "$limit" "$@" > "$WORK/$name.log" 2>&1 || tail -n 4 "$WORK/$name.log"; }
if [ "$STAGE" = 1 ]; then
  { nvidia-smi topo -m; nvidia-smi --query-gpu=name,memory.total --format=csv; free -g | head -2; nproc; } > "$OUT/topo.txt"
  timeout 200 python -m pytest tests/test_offload.py -q -rfE --tb=short -p no:cacheprovider > "$OUT/tests.log" 2>&1
  tail -n 3 "$OUT/tests.log"
  run link 120 python $B link --out "$WORK/link.json"
  run par1 200 python bench/bench_parallel.py --out "$WORK/par1.json"
  for n in 2 $N; do run par$n 240 $TR $n bench/bench_parallel.py --modes data data-xN pert --out "$WORK/par$n.json"; done
  run off30-1 240 python $B step --model opt-30b --batch 4x512 --steps 4 --warmup 1 --out "$WORK/off30-1.json"
  for n in 2 $N; do run off30-$n 240 $TR $n $B step --model opt-30b --batch 4x512 --pert 2 --steps 4 --warmup 1 --out "$WORK/off30-$n.json"; done
  run off66-zo2 300 python $B step --model opt-66b --batch 1x2048 --steps 3 --warmup 1 --out "$WORK/off66-zo2.json"
else
  timeout 200 python -m pytest tests/test_offload.py -q -rfE --tb=short -p no:cacheprovider > "$OUT/tests.log" 2>&1
  tail -n 3 "$OUT/tests.log"
  run zo2-13b 150 python $B step --model opt-13b --batch 1x2048 --out "$WORK/zo2-13b.json"
  run zo2-13b-budget 150 python $B step --model opt-13b --batch 1x2048 --gpu-memory 6.18GB --out "$WORK/zo2-13b-budget.json"
  run zo2-66b 200 python $B step --model opt-66b --batch 1x2048 --steps 3 --warmup 1 --out "$WORK/zo2-66b.json"
  run off30-1 150 python $B step --model opt-30b --batch 4x512 --steps 4 --warmup 1 --out "$WORK/off30-1.json"
  for n in 2 $N; do run off30-$n 200 $TR $n $B step --model opt-30b --batch 4x512 --pert 2 --steps 4 --warmup 1 --out "$WORK/off30-$n.json"; done
  run off66-$N 240 $TR $N $B step --model opt-66b --batch 4x512 --pert 2 --steps 3 --warmup 1 --out "$WORK/off66-$N.json"
  run off175-16g 300 python $B step --model opt-175b --batch 1x512 --gpu-memory 16GiB --steps 2 --warmup 1 --out "$WORK/off175-16g.json"
fi
python - "$WORK" "$OUT/summary-$STAGE.json" <<'PY'
import json, pathlib, sys
rows = {p.stem: json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json"))}
pathlib.Path(sys.argv[2]).write_text(json.dumps(rows, indent=1))
keep = ("ms_per_step", "floor_ms", "vs_floor", "gpu_used_GB", "h2d_GBs", "build_s", "resident_blocks", "params_B")
for name, r in rows.items():
    if "runs" in r:
        print(name, {m: (v.get("ms_per_step"), v.get("tokens_per_s")) if isinstance(v, dict) else v for m, v in r["runs"].items()})
    elif "ms_per_step" in r:
        print(name, {k: round(r[k], 3) if isinstance(r[k], float) else r[k] for k in keep if k in r})
    else:
        print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})
PY
