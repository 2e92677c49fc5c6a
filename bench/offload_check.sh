#!/usr/bin/env bash
# Offload on one GPU: GPU parity tests, the host link, and offloaded steps of OPT-13B / OPT-30B.
#   OUT=/some/dir bash bench/offload_check.sh
set -u
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
B="python bench/bench_offload.py"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; free -g | head -2; df -h /dev/shm | tail -1; nproc; } | tee "$OUT/device.txt"
timeout ${TEST_TIMEOUT:-240} python -m pytest tests/test_offload.py tests/test_kernels.py -q -rfE --tb=short -p no:cacheprovider > "$OUT/tests.log" 2>&1
tail -n 6 "$OUT/tests.log"
timeout 120 $B link --out "$OUT/link.json" 2>&1 | tail -n 14
for run in "opt-13b" "opt-13b --gpu-memory 6GiB" "opt-13b --pageable --steps 3 --warmup 1" "opt-30b"; do
  name=$(echo $run | tr ' ' '_' | tr -d '-')
  timeout ${STEP_TIMEOUT:-200} $B step --model $run --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  python - "$OUT/$name.json" <<'PY' || tail -n 5 "$OUT/$name.log"
import json, sys
r = json.load(open(sys.argv[1]))
print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k in (
  "model", "gpu_memory_budget", "pageable", "resident_blocks", "build_s", "ms_per_step", "floor_ms", "vs_floor",
  "h2d_GBs", "gpu_used_GB", "max_reserved_GB", "all_ms")})
PY
done
