#!/usr/bin/env bash
# The algorithms on rotten_tomatoes at equal forward passes (2,000 a run), in harness processes
# that share the one GPU (a 135M step is launch-bound, so they overlap), after
# carry_packaged.sh assemble (docs/convergence.md). One 10-minute call per preset:
#   OUT=/some/dir bash bench/convergence_algorithms.sh grid    # seed 0: each algorithm's lr grid
#   OUT=/some/dir bash bench/convergence_algorithms.sh seeds   # seeds 1, 2 of the chosen points; q = 2, 4, 8
#   OUT=/some/dir bash bench/convergence_algorithms.sh hamlet  # held-out LM loss: 3 seeds each, AdamW, lr 1e-5/1e-4
#   OUT=/some/dir bash bench/convergence_algorithms.sh hamlet-seeds  # ZO-SGD at 1e-4 seeds 1, 2; momentum, FZOO at 1e-4
#   OUT=/some/dir bash bench/convergence_algorithms.sh sparse-hybrid  # sparse's and the hybrid option's grids + seeds
#   OUT=/some/dir bash bench/convergence_algorithms.sh debates-rest   # every algorithm on debates; FZOO's Hamlet seeds
#   OUT=/some/dir bash bench/convergence_algorithms.sh final-seeds    # seeds 1, 2 of AdamW everywhere, debates, hybrid
#   OUT=/some/dir bash bench/convergence_algorithms.sh last-seeds-a   # what final-seeds' budget skipped; sign; sparse on Hamlet; lr cosine
#   OUT=/some/dir bash bench/convergence_algorithms.sh last-seeds-b   # debates: the algorithms' seeds 1 and 2; the eps rules
#   OUT=/some/dir bash bench/convergence_algorithms.sh recipes-rest   # the eps rules' seed 2; lr cosine at 3e-5
#   OUT=/some/dir bash bench/convergence_algorithms.sh recipes-bf16   # ZO-SGD and adaptive eps with bfloat16 weights
#   OUT=/some/dir bash bench/convergence_algorithms.sh qlora          # LoRA-ZO and QLoRA-ZO (NF4), rotten_tomatoes
#   OUT=/some/dir bash bench/convergence_algorithms.sh qlora-hamlet   # the same on Hamlet (SEEDS="0 1": fewer)
#   OUT=/some/dir bash bench/convergence_algorithms.sh qlora-fp8      # QLoRA-ZO, the NF4 base computed in fp8 or not
#   OUT=/some/dir bash bench/convergence_algorithms.sh qlora-fp8-tune # the fp8 arm at eps 1e-1 and at lr 3e-4
# (the qlora presets need bitsandbytes: a call carrying .carry/bnb runs `carry_packaged.sh bnb` first)
# The hamlet preset steps with CUDA graphs (optim.cuda_graphs; the same results, a third of the time
# for this model), its batches padded to multiples of 32 tokens so that a few graphs serve them all.
set -uo pipefail
OUT=${OUT:-bench-out}
BUDGET=${BUDGET:-480}
mkdir -p "$OUT"
eval "$(bash bench/carry_packaged.sh env)"
export PYTHONUNBUFFERED=1
task=(--task rotten_tomatoes --set eval_batch_size=250 --time-budget-s "$BUDGET")
zo="steps=1000,eval_every=100"
fzoo="optim.algorithm=fzoo,optim.fzoo.probes=4,optim.perturbation=rademacher,steps=400,eval_every=40"
hamlet=(--task text --set task.max_length=256,task.num_train=189,task.num_dev=20,task.num_test=20
        --set task.pad_to_multiple_of=32,eval_batch_size=20 --time-budget-s "$BUDGET")
hzo="steps=500,eval_every=50,optim.cuda_graphs=true"
debates=(--task debates --set eval_batch_size=100,task.pad_to_multiple_of=16 --time-budget-s "$BUDGET")
# the hybrid option at its chosen point: the top block and the final norm by AdamW, the rest by ZO-SGD
hybrid="hybrid:zo:optim.first_order=model.norm.weight,model.layers.29.*,$zo,lr=3e-5,optim.first_order_lr=1e-4"
rotten16=("${task[@]}" --set task.pad_to_multiple_of=16)  # rotten_tomatoes with the padding CUDA graphs want
# the eps rules: eps decayed to a tenth; adaptive eps (|L+ - L-| of a 16-example batch at eps 1e-3 has a
# median of ~0.013 on rotten_tomatoes: the band asks for more)
epsdecay="optim.eps_schedule=linear,optim.eps_min_ratio=0.1"
epsband="optim.eps_band_low=0.02,optim.eps_band_high=0.05"
launch() {  # NAME ARGS...: one harness process into $OUT/NAME
    local name=$1
    shift
    python3 bench/convergence.py run "${task[@]}" --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1 &
}
case "${1:-}" in
    grid)
        launch mezo --seeds 0 --arm "zo:zo:$zo,lr=3e-5" \
            --arm "momentum:zo:optim.algorithm=momentum,$zo" --grid momentum:lr=3e-5,1e-4
        launch fzoo --seeds 0 --arm "fzoo:zo:$fzoo" --grid fzoo:lr=1e-4,3e-4,1e-3
        launch sign --seeds 0 --arm "sign:zo:optim.mezo.transform=sign,$zo" --grid sign:lr=3e-5,1e-4 ;;
    seeds)
        launch zo-seeds --seeds 1,2 --arm "zo:zo:$zo,lr=3e-5"
        launch fzoo-seeds --seeds 1,2 --arm "fzoo:zo:$fzoo,lr=1e-3"
        launch momentum-seeds --seeds 1,2 --arm "momentum:zo:optim.algorithm=momentum,$zo,lr=3e-5"
        launch directions --seeds 0 --arm "q2:zo:q=2,steps=500,eval_every=50,lr=3e-5" \
            --arm "q4:zo:q=4,steps=250,eval_every=25,lr=3e-5" --arm "q8:zo:q=8,steps=125,eval_every=25,lr=3e-5" ;;
    hamlet)
        task=(--task text --set task.max_length=256,task.num_train=189,task.num_dev=20,task.num_test=20
              --set task.pad_to_multiple_of=32,eval_batch_size=20 --time-budget-s "$BUDGET")
        g="optim.cuda_graphs=true"
        zo="steps=500,eval_every=50,$g"
        launch mezo --seeds 0,1,2 --arm "zo:zo:$zo,lr=3e-5"
        launch momentum --seeds 0,1,2 --arm "momentum:zo:optim.algorithm=momentum,$zo,lr=3e-5"
        launch fzoo --seeds 0,1,2 --arm "fzoo:zo:optim.algorithm=fzoo,optim.fzoo.probes=4,$g,steps=200,eval_every=20,lr=1e-3,optim.perturbation=rademacher"
        launch others --seeds 0 --arm "zo-1e-4:zo:$zo,lr=1e-4" --arm "zo-1e-5:zo:$zo,lr=1e-5" \
            --arm ft:adamw:lr=3e-5 --arm lora:adamw:lora=true,lr=3e-4 ;;
    hamlet-seeds)  # seeds 1 and 2 of ZO-SGD at the lr hamlet's grid chose, momentum and FZOO there
        task=(--task text --set task.max_length=256,task.num_train=189,task.num_dev=20,task.num_test=20
              --set task.pad_to_multiple_of=32,eval_batch_size=20 --time-budget-s "$BUDGET")
        g="optim.cuda_graphs=true"
        zo="steps=500,eval_every=50,$g"
        launch mezo-1 --seeds 1 --arm "zo-1e-4:zo:$zo,lr=1e-4"
        launch mezo-2 --seeds 2 --arm "zo-1e-4:zo:$zo,lr=1e-4"
        launch momentum-lr --seeds 0 --arm "momentum-1e-4:zo:optim.algorithm=momentum,$zo,lr=1e-4"
        launch fzoo-lr --seeds 0 --arm "fzoo-1e-4:zo:optim.algorithm=fzoo,optim.fzoo.probes=4,$g,steps=200,eval_every=20,lr=1e-4,optim.perturbation=rademacher" ;;
    sparse-hybrid)  # rotten_tomatoes with graphs; the hybrid option cannot use them (a backward)
        task=("${rotten16[@]}")
        g="optim.cuda_graphs=true"
        launch sparse --seeds 0,1,2 --arm "sparse:zo:optim.algorithm=sparse,$zo,$g" --grid sparse:lr=3e-5,1e-4,3e-4
        # the top block and the final norm by AdamW, the rest by ZO-SGD at its tuned lr
        launch hybrid --seeds 0,1,2 --arm "hybrid:zo:optim.first_order=model.norm.weight,model.layers.29.*,$zo,lr=3e-5" \
            --grid hybrid:optim.first_order_lr=1e-5,1e-4
        launch zo-1e-4 --seeds 0 --arm "zo-1e-4:zo:$zo,lr=1e-4,$g"
        task=("${hamlet[@]}")
        launch momentum-hamlet --seeds 1,2 --arm "momentum-1e-4:zo:optim.algorithm=momentum,$hzo,lr=1e-4" ;;
    debates-rest)
        task=("${debates[@]}")
        g="optim.cuda_graphs=true"
        launch debates-zo --seeds 0,1,2 --arm "zo:zo:$zo,$g" --grid zo:lr=3e-5,1e-4,3e-4
        launch debates-others --seeds 0 --arm "momentum:zo:optim.algorithm=momentum,$zo,$g,lr=1e-4" \
            --arm "fzoo:zo:$fzoo,$g,lr=1e-3" --arm "sparse:zo:optim.algorithm=sparse,$zo,$g,lr=1e-4"
        task=("${hamlet[@]}")
        launch fzoo-hamlet --seeds 1,2 --arm "fzoo-1e-4:zo:optim.algorithm=fzoo,optim.fzoo.probes=4,optim.cuda_graphs=true,steps=200,eval_every=20,lr=1e-4,optim.perturbation=rademacher"
        launch sparse-hamlet --seeds 0 --arm "sparse-1e-4:zo:optim.algorithm=sparse,$hzo,lr=1e-4" ;;
    final-seeds)  # seeds 1 and 2 where the calls above ran one: AdamW on every task, debates' ZO-SGD, the hybrid option
        launch hybrid-seeds --seeds 1,2 \
            --arm "$hybrid"
        launch rt-adamw --seeds 1,2 --arm ft:adamw:lr=1e-5 --arm lora:adamw:lora=true,lr=1e-4
        task=("${debates[@]}")
        launch debates-zo-seeds --seeds 1,2 --arm "zo:zo:$zo,optim.cuda_graphs=true,lr=1e-4"
        launch debates-adamw --seeds 1,2 --arm ft:adamw:lr=1e-5 --arm lora:adamw:lora=true,lr=1e-4
        task=("${hamlet[@]}")
        launch hamlet-adamw --seeds 1,2 --arm ft:adamw:lr=3e-5 --arm lora:adamw:lora=true,lr=3e-4 ;;
    last-seeds-a)  # the seeds still missing on rotten_tomatoes and Hamlet (docs/convergence.md, "Not run")
        task=("${rotten16[@]}")
        g="optim.cuda_graphs=true"
        launch hybrid-seed2 --seeds 2 \
            --arm "$hybrid"
        launch rt-adamw-seed2 --seeds 2 --arm ft:adamw:lr=1e-5 --arm lora:adamw:lora=true,lr=1e-4
        launch sign-seeds --seeds 1,2 --arm "sign:zo:optim.mezo.transform=sign,$zo,lr=1e-4"  # eager, as its seed 0 ran
        # a recipe: lr 1e-4 (where a constant lr peaks early, then collapses) decayed by a cosine
        launch recipe-cosine --seeds 0,1,2 --arm "cosine-1e-4:zo:$zo,$g,lr=1e-4,optim.schedule=cosine"
        task=("${hamlet[@]}")
        launch sparse-hamlet-seeds --seeds 1,2 --arm "sparse-1e-4:zo:optim.algorithm=sparse,$hzo,lr=1e-4" ;;
    last-seeds-b)  # debates: seed 2 of ZO-SGD, seeds 1 and 2 of the other algorithms
        task=("${debates[@]}")
        g="optim.cuda_graphs=true"
        launch debates-zo-seed2 --seeds 2 --arm "zo:zo:$zo,$g,lr=1e-4"
        launch debates-momentum --seeds 1,2 --arm "momentum:zo:optim.algorithm=momentum,$zo,$g,lr=1e-4"
        launch debates-fzoo --seeds 1,2 --arm "fzoo:zo:$fzoo,$g,lr=1e-3"
        launch debates-sparse --seeds 1,2 --arm "sparse:zo:optim.algorithm=sparse,$zo,$g,lr=1e-4"
        task=("${rotten16[@]}")  # the eps rules on rotten_tomatoes at ZO-SGD's tuned lr
        launch recipe-eps-decay --seeds 0,1,2 --arm "eps-linear:zo:$zo,$g,lr=3e-5,$epsdecay"
        launch recipe-eps-adaptive --seeds 0,1,2 --arm "eps-band:zo:$zo,$g,lr=3e-5,$epsband" ;;
    recipes-rest)  # the eps rules' seed 2 (last-seeds-b's budget skipped it); the lr cosine at ZO-SGD's tuned lr
        task=("${rotten16[@]}")
        g="optim.cuda_graphs=true"
        launch recipe-eps-decay-2 --seeds 2 --arm "eps-linear:zo:$zo,$g,lr=3e-5,$epsdecay"
        launch recipe-eps-adaptive-2 --seeds 2 --arm "eps-band:zo:$zo,$g,lr=3e-5,$epsband"
        for seed in 0 1 2; do  # one process a seed: these runs are launch-bound, so they overlap
            launch "recipe-cosine-3e-5-$seed" --seeds $seed --arm "cosine-3e-5:zo:$zo,$g,lr=3e-5,optim.schedule=cosine"
        done ;;
    recipes-bf16)  # the eps rules where they can matter: bfloat16 weights, whose |L+ - L-| rounding noise is large
        task=("${rotten16[@]}" --set model.dtype=bfloat16)
        g="optim.cuda_graphs=true"
        for seed in 0 1 2; do
            launch "bf16-zo-$seed" --seeds $seed --arm "zo-bf16:zo:$zo,$g,lr=3e-5"
            launch "bf16-eps-band-$seed" --seeds $seed --arm "eps-band-bf16:zo:$zo,$g,lr=3e-5,$epsband"
        done ;;
    qlora|qlora-hamlet)  # LoRA-ZO over the base and over its NF4 quantization, at the CPU study's point (docs/quantized.md)
        python3 -c "import bitsandbytes" 2> /dev/null \
            || { echo "bitsandbytes is not importable: carry .carry/bnb and run bench/carry_packaged.sh bnb" >&2; exit 2; }
        lora="steps=1000,eval_every=100,lr=1e-3,eps=1e-2" tag=rt
        [ "$1" = qlora ] || { task=("${hamlet[@]}"); lora="steps=500,eval_every=50,lr=1e-3,eps=1e-2" tag=hamlet; }
        # each block once over both streams' rows (optim.batch_streams): the base's products once a step
        plain=("${task[@]}" --set optim.batch_streams=true)
        for seed in ${SEEDS:-0 1 2}; do  # one process a run: eager LoRA steps are launch-bound, so they overlap
            task=("${plain[@]}" --set lora=true)
            launch "lora-$tag-$seed" --seeds $seed --arm "lora-zo:zo:$lora"
            task+=(--set model.quantize=nf4)
            launch "qlora-$tag-$seed" --seeds $seed --arm "qlora-zo:zo:$lora"
        done ;;
    qlora-fp8)  # QLoRA-ZO as in qlora, its base's products in float32 or in fp8 (model.base_compute fp8; an fp8 GPU)
        python3 -c "import bitsandbytes" 2> /dev/null \
            || { echo "bitsandbytes is not importable: carry .carry/bnb and run bench/carry_packaged.sh bnb" >&2; exit 2; }
        lora="steps=1000,eval_every=100,lr=1e-3,eps=1e-2"
        plain=("${task[@]}" --set optim.batch_streams=true,lora=true,model.quantize=nf4)
        for seed in ${SEEDS:-0 1 2}; do
            task=("${plain[@]}")
            launch "qlora-rt-$seed" --seeds $seed --arm "qlora-zo:zo:$lora"
            task+=(--set model.base_compute=fp8)
            launch "qlora-fp8-rt-$seed" --seeds $seed --arm "qlora-fp8:zo:$lora"
        done ;;
    qlora-fp8-tune)  # the fp8 arm of qlora-fp8 at a larger eps and at a smaller lr
        python3 -c "import bitsandbytes" 2> /dev/null \
            || { echo "bitsandbytes is not importable: carry .carry/bnb and run bench/carry_packaged.sh bnb" >&2; exit 2; }
        task+=(--set optim.batch_streams=true,lora=true,model.quantize=nf4,model.base_compute=fp8)
        for seed in ${SEEDS:-0 1 2}; do
            launch "fp8-eps1e-1-$seed" --seeds $seed --arm "qlora-fp8-eps0.1:zo:steps=1000,eval_every=100,lr=1e-3,eps=1e-1"
            launch "fp8-lr3e-4-$seed" --seeds $seed --arm "qlora-fp8-lr3e-4:zo:steps=1000,eval_every=100,lr=3e-4,eps=1e-2"
        done ;;
    *) echo "usage: OUT=dir bash bench/convergence_algorithms.sh grid|seeds|hamlet|hamlet-seeds|sparse-hybrid|debates-rest|final-seeds|last-seeds-a|last-seeds-b|recipes-rest|recipes-bf16|qlora|qlora-hamlet|qlora-fp8|qlora-fp8-tune" >&2
       exit 2 ;;
esac
wait
for log in "$OUT"/*.log; do echo "== $log"; grep -E "seed [0-9]+ step [0-9]+: dev" "$log" | tail -n 3; done
# one archive: a device call brings back only a few files
tar czf /tmp/convergence.tgz -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv /tmp/convergence.tgz "$OUT/"
