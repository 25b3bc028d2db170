#!/usr/bin/env bash
# gptlab on a GPU, in one command: what a session lent the project's GPU machine runs (the
# device tool: `run` with command "bash bench/gpu.sh", carry [".whl"], timeout_s 600; fetch the
# wheels first, here: `make gpu-wheels`). BENCHMARKS.md, "On a GPU", says what each step does.
#
#   1 install  the wheels in .whl/ that the machine lacks, into $SITE (no network there)
#   2 machine  nvidia-smi -L, torch, CUDA, transformers and the versions datasets leans on
#   3 tests    the suite with CUDA visible (device="auto" takes CUDA) -> $OUT/tests.log
#   4 pipeline `gptlab pipeline --preset demo` with cut step counts, beside the tests
#              -> $OUT/report.json, $OUT/report.md
#   5 bench/sampling.py and bench/sft_step.py on the pipeline's models (--device cuda), and
#     bench/gpu_check.py real-model: a random-weight Llama of SmolLM2-135M's shape, converted by
#     `gptlab convert`, against transformers (logits fp32 / bf16, greedy tokens, sampling and an
#     SFT step's speed and peak memory) -> $OUT/real_model.json
#   6 sft_profile  bench/gpu_check.py sft-profile: where an SFT step's time goes on that shape
#     (gptlab's shared prefix, gptlab's whole rows, transformers) -> $OUT/sft_profile.txt
#   7 summary  -> $OUT/summary.md, printed last
# Every step runs under a time limit inside one budget (GPTLAB_GPU_CHECK_BUDGET seconds, 540);
# a step that fails or runs out of time is logged and the next one runs; the script exits 1 at
# the end if any step failed. The whole console output is also $OUT/gpu.log.
#
# A dry run on a CPU machine (tiny sizes, a few test files; OUT defaults to a temporary dir):
#   GPTLAB_GPU_CHECK_DEVICE=cpu GPTLAB_GPU_CHECK_PYTHON=.venv/bin/python bash bench/gpu.sh
# Other knobs: GPTLAB_GPU_CHECK_TESTS (pytest's arguments), GPTLAB_GPU_CHECK_WORKERS (xdist
# workers), GPTLAB_GPU_CHECK_WORK (scratch dir, /tmp/gptlab_gpu_check), GPTLAB_GPU_CHECK_SITE
# (where the wheels go, /tmp/site), GPTLAB_GPU_CHECK_WHEELS (where they are, .whl).
set -euo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
ROOT=$PWD

if [[ ${1:-} == --step ]]; then  # one step, run by `step` below under `timeout`
    STEP=$2
else
    STEP=
    export PY=${GPTLAB_GPU_CHECK_PYTHON:-python3}
    export DEVICE=${GPTLAB_GPU_CHECK_DEVICE:-cuda}
    export BUDGET=${GPTLAB_GPU_CHECK_BUDGET:-540}
    export WORK=${GPTLAB_GPU_CHECK_WORK:-/tmp/gptlab_gpu_check}
    export SITE=${GPTLAB_GPU_CHECK_SITE:-/tmp/site}
    export WHL=${GPTLAB_GPU_CHECK_WHEELS:-$ROOT/.whl}
    export OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gptlab-gpu-check.XXXXXX")}
    export PYTHONPATH=$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}
    export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
    if [[ $DEVICE == cpu ]]; then
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} THREADS=1
        export TESTS=${GPTLAB_GPU_CHECK_TESTS:-tests/test_devices.py tests/test_engine.py \
tests/test_sft_loss.py tests/test_corpus.py tests/test_interop.py}
        export WORKERS=${GPTLAB_GPU_CHECK_WORKERS:-0}
    else
        export THREADS=6
        export TESTS=${GPTLAB_GPU_CHECK_TESTS:-tests}
        export WORKERS=${GPTLAB_GPU_CHECK_WORKERS:-10}
    fi
    mkdir -p "$OUT"
    rm -rf "$WORK"
    mkdir -p "$WORK"
    : > "$WORK/steps.tsv"
    exec > >(tee "$OUT/gpu.log") 2>&1
    TEE_PID=$!
fi

# --- the steps (each runs as `bash bench/gpu.sh --step NAME`) ---------------------------------

do_install() {
    # Only what the machine lacks: a wheel of a package already installed would shadow it.
    local missing=() w name
    for w in "$WHL"/*.whl; do
        [[ -e $w ]] || { echo "no wheels in $WHL (make gpu-wheels, where pip has PyPI)"; return 1; }
        name=$(basename "$w"); name=${name%%-*}
        if "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$name" \
                2>/dev/null; then
            echo "  $name: installed already, $("$PY" -c "import importlib.metadata as m, \
sys; print(m.version(sys.argv[1]))" "$name")"
        else
            missing+=("$w")
        fi
    done
    if ((${#missing[@]})); then
        echo "  installing ${missing[*]}"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "${missing[@]}"
    fi
    if ! "$PY" -c "import datasets" 2>/dev/null && ls "$WHL"/alt/datasets-*.whl >/dev/null 2>&1
    then
        "$PY" -c "import datasets" 2>&1 | tail -1 || true
        echo "  datasets does not import; installing $(ls "$WHL"/alt/datasets-*.whl) instead"
        rm -rf "$SITE"/datasets "$SITE"/datasets-*.dist-info
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "$WHL"/alt/datasets-*.whl
    fi
    "$PY" - <<'PYEOF'
import importlib, importlib.metadata
for name in ("omegaconf", "datasets", "dill", "multiprocess", "gguf", "gptlab"):
    mod = importlib.import_module(name)
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        version = getattr(mod, "__version__", "?")
    print(f"  import {name}: ok, {version} ({mod.__file__})")
PYEOF
}

do_machine() {
    machine_info 2>&1 | tee "$WORK/machine.txt"
}

machine_info() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi -L
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    elif [[ $DEVICE == cpu ]]; then
        echo "no nvidia-smi (a CPU dry run)"
    else
        echo "no nvidia-smi on a machine meant to have a GPU"; return 1
    fi
    echo "cpus: $(nproc)"
    "$PY" - <<'PYEOF'
import importlib.metadata as m, os, platform, sys
import torch, transformers
print(f"python {platform.python_version()} ({sys.executable}), torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"transformers {transformers.__version__}")
names = ("tokenizers", "safetensors", "numpy", "pyarrow", "pandas", "fsspec", "httpx",
         "huggingface_hub", "pytest", "pytest-xdist", "pytest-timeout")
print("packages: " + ", ".join(f"{n} {m.version(n)}" if list(m.distributions(name=n))
                               else f"{n} missing" for n in names))
if os.environ["DEVICE"] != "cpu":
    assert torch.cuda.is_available(), "torch sees no CUDA device"
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, "
              f"capability {p.major}.{p.minor}, {p.multi_processor_count} SMs; "
              f"bf16 {torch.cuda.is_bf16_supported()}")
PYEOF
}

do_tests() {
    local args=(-q -rfE --maxfail=25 -p no:cacheprovider --durations=15)
    # A test that hangs is named (with its stack) before the step's own limit ends the run.
    "$PY" -c "import pytest_timeout" 2>/dev/null && args+=(--timeout 180)
    if ((WORKERS > 0)) && "$PY" -c "import xdist" 2>/dev/null; then
        args+=(-n "$WORKERS" --dist loadfile)
    else
        args+=(-p no:xdist)
    fi
    # tee -i: on the step's time limit (SIGINT) pytest still prints its summary into the log.
    # shellcheck disable=SC2086
    "$PY" -m pytest -o addopts="" "${args[@]}" $TESTS 2>&1 | tee -i "$OUT/tests.log" >/dev/null
}

pipeline_flags() {
    if [[ $DEVICE == cpu ]]; then  # seconds on one core, for the dry run only
        echo --rounds 1 --pretrain-steps 20 --sft-steps 40 --sft-eval-every 20 \
            --sft-exec-eval 20 --sft-examples 200 --sample-prompts 16 --k 4 --reward-epochs 1 \
            --ppo-steps 2 --ppo-batch 8 --ppo-minibatch 4 --eval-limit 30 --no-ties
    else  # about two minutes on a fast GPU (the demo's own: 16 minutes on 2 CPU cores)
        echo --rounds 2 --pretrain-steps 150 --sft-steps 600 --sft-eval-every 100 \
            --sft-exec-eval 150 --sample-prompts 128 --k 8 --reward-epochs 2 \
            --ppo-steps 8 --ppo-batch 32 --ppo-minibatch 16 --eval-limit 300
    fi
}

do_pipeline() {
    # shellcheck disable=SC2046
    "$PY" -m gptlab pipeline --preset demo --out "$WORK/demo" --seed 0 --threads "$THREADS" \
        $(pipeline_flags)
    [[ -s $WORK/demo/report.json && -s $WORK/demo/report.md ]] \
        || { echo "the pipeline exited 0 but wrote no report.json / report.md"; return 1; }
    cp "$WORK/demo/report.json" "$WORK/demo/report.md" "$OUT/"
}

do_sampling() {
    local size=()
    [[ $DEVICE == cpu ]] && size=(--n 4 --k 2 --max-new-tokens 16 --repeats 1)
    "$PY" bench/sampling.py --device "$DEVICE" --threads "$THREADS" "${size[@]}" \
        --model "$WORK/demo/sft" --prompts "$WORK/demo/world/prompts.jsonl" \
        2>&1 | tee "$WORK/sampling.log"
}

do_sft_step() {
    local size=()
    [[ $DEVICE == cpu ]] && size=(--steps 2 --batch-size 4 --repeats 1)
    "$PY" bench/sft_step.py --device "$DEVICE" --threads "$THREADS" "${size[@]}" \
        --model "$WORK/demo/pretrain" --data "$WORK/demo/sft_data.jsonl" \
        2>&1 | tee "$WORK/sft_step.log"
}

do_real_model() {
    local size=()
    [[ $DEVICE == cpu ]] && size=(--tiny)
    "$PY" bench/gpu_check.py real-model --device "$DEVICE" --threads "$THREADS" "${size[@]}" \
        --work "$WORK/real" --json "$OUT/real_model.json"
}

do_sft_profile() {
    local size=()
    [[ $DEVICE == cpu ]] && size=(--tiny)
    "$PY" bench/gpu_check.py sft-profile --device "$DEVICE" --threads "$THREADS" "${size[@]}" \
        --work "$WORK/real" 2>&1 | tee "$OUT/sft_profile.txt"
}

if [[ -n $STEP ]]; then
    set -o pipefail
    "do_$STEP"
    exit
fi

# --- the driver ---------------------------------------------------------------------------------

RESERVE=20  # seconds kept for the summary
step() {  # step NAME LIMIT: run do_NAME under a time limit, record ok / failed / skipped
    local name=$1 limit=$2 left=$((BUDGET - SECONDS - RESERVE)) t0=$SECONDS rc=0
    ((limit > left)) && limit=$left
    if ((limit < 15)); then
        echo "== $name: SKIPPED, the budget of ${BUDGET}s is spent"
        printf '%s\tskipped\t0\tno time left\n' "$name" >> "$WORK/steps.tsv"
        return 0
    fi
    echo "== $name (at ${SECONDS}s, limit ${limit}s)"
    # SIGINT first (pytest then prints its summary), SIGKILL 15 s later.
    timeout -s INT -k 15 "$limit" bash "$ROOT/bench/gpu.sh" --step "$name" || rc=$?
    local dt=$((SECONDS - t0)) status=ok note=
    if ((rc != 0)); then
        status=FAILED
        note="exit $rc"
        ((rc == 124 || rc == 137)) && note="timed out after ${limit}s"
    fi
    echo "== $name: $status in ${dt}s${note:+ ($note)}"
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$dt" "$note" >> "$WORK/steps.tsv"
}

main() {  # a function, parsed whole before it runs: editing this file meanwhile is harmless
    echo "gptlab GPU check: device $DEVICE, budget ${BUDGET}s, OUT=$OUT, work in $WORK"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git status \
    --porcelain 2>/dev/null | grep -q . && echo ' (with uncommitted changes)')"
    step install 90
    step machine 60
    # The suite and the pipeline run side by side (the suite on WORKERS processes, the pipeline on
    # THREADS threads); the benchmarks wait for both, on a quiet machine.
    # The pipeline is the background job: a background job ignores SIGINT, and pytest needs it to
    # print its summary when its time is up.
    step pipeline 240 &
    PIPELINE_JOB=$!
    step tests 240
    wait "$PIPELINE_JOB" || true
    echo "--- the end of tests.log:"
    tail -n 40 "$OUT/tests.log" 2>/dev/null || echo "(no tests.log)"
    step sampling 75
    step sft_step 60
    step real_model 150
    step sft_profile 90
    "$PY" bench/gpu_check.py summary --steps "$WORK/steps.tsv" --work "$WORK" --out "$OUT" \
        --device "$DEVICE" > /dev/null || echo "the summary failed"
    rc=0
    if grep -qv $'\tok\t' "$WORK/steps.tsv"; then
        echo "gptlab GPU check: some steps did not pass; exit 1"
        rc=1
    else
        echo "gptlab GPU check: every step passed"
    fi
    echo "files in OUT ($OUT): $(cd "$OUT" && ls | tr '\n' ' ')"
    echo
    cat "$OUT/summary.md" 2>/dev/null || true
    exec >&- 2>&-
    wait "$TEE_PID" 2>/dev/null || true
    return "$rc"
}

main
