#!/usr/bin/env bash
# Parity tests, kernel throughput and the step benchmark in one go on a CUDA machine.
#   OUT=/some/dir bash bench/gpu_check.sh [bench_step arguments...]
set -u
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/device.txt"
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/device.txt"
timeout ${TEST_TIMEOUT:-200} python -m pytest tests/test_kernels.py -q -rfE -s --tb=short -p no:cacheprovider > "$OUT/tests.log" 2>&1
tail -n 25 "$OUT/tests.log"
timeout ${KBENCH_TIMEOUT:-120} python bench/kernel_bench.py --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log" | tail -n 14
timeout ${PROBE_TIMEOUT:-60} python bench/host_probe.py > "$OUT/host_probe.log" 2>&1; head -n 7 "$OUT/host_probe.log"
timeout ${STEP_TIMEOUT:-300} python bench/bench_step.py --out "$OUT/step.json" --profile "$OUT/profile.txt" "$@" 2>&1 | tee "$OUT/step.log" | tail -n 20
