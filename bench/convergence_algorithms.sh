#!/usr/bin/env bash
# The algorithms on rotten_tomatoes at equal forward passes, in three harness processes that
# share the one GPU (a 135M step is launch-bound, so they overlap), after carry_packaged.sh
# assemble (docs/convergence.md). One seed; a preset for a 10-minute call.
#   OUT=/some/dir bash bench/convergence_algorithms.sh
set -uo pipefail
OUT=${OUT:-bench-out}
BUDGET=${BUDGET:-480}
mkdir -p "$OUT"
eval "$(bash bench/carry_packaged.sh env)"
export PYTHONUNBUFFERED=1
rt=(--task rotten_tomatoes --set eval_batch_size=250 --seeds 0 --time-budget-s "$BUDGET")
# 2,000 forward passes each: ZO-SGD 1,000 steps of 2; FZOO N = 4: 400 steps of 5
python3 bench/convergence.py run "${rt[@]}" --out "$OUT/mezo" \
    --arm zo:zo:steps=1000,eval_every=100,lr=3e-5 \
    --arm momentum:zo:optim.algorithm=momentum,steps=1000,eval_every=100 --grid momentum:lr=3e-5,1e-4 \
    > "$OUT/mezo.log" 2>&1 &
python3 bench/convergence.py run "${rt[@]}" --out "$OUT/fzoo" \
    --arm fzoo:zo:optim.algorithm=fzoo,optim.fzoo.probes=4,optim.perturbation=rademacher,steps=400,eval_every=40 \
    --grid fzoo:lr=1e-4,3e-4,1e-3 > "$OUT/fzoo.log" 2>&1 &
python3 bench/convergence.py run "${rt[@]}" --out "$OUT/sign" \
    --arm sign:zo:optim.mezo.transform=sign,steps=1000,eval_every=100 --grid sign:lr=3e-5,1e-4 \
    > "$OUT/sign.log" 2>&1 &
wait
tail -n 5 "$OUT"/*.log
python3 bench/convergence.py summarize "$OUT/mezo" "$OUT/fzoo" "$OUT/sign" --target-arm zo --out "$OUT/merged" \
    2>&1 | tail -n 40
