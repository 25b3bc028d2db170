#!/usr/bin/env bash
# Fetch, here (a machine with PyPI), the wheels that bench/gpu.sh installs on a GPU machine that
# has no network: gptlab's core needs that the GPU image lacks (see BENCHMARKS.md, "On a GPU").
# They go to .whl/ (ignored by .gitignore; the device tool carries it: `carry: [".whl"]`).
#
#   bash bench/gpu_wheels.sh        (or: make gpu-wheels)
#
# The GPU image (2026-11) has torch 2.11.0+cu130, transformers 5.17.0, huggingface_hub 1.33.0,
# tokenizers, safetensors, numpy, pyyaml, tqdm, jinja2, matplotlib, pyarrow, pandas, requests,
# httpx, fsspec, aiohttp, xxhash, filelock, pytest, pytest-xdist, pytest-timeout, hypothesis;
# not datasets, dill, multiprocess, omegaconf or gguf. omegaconf 2.4 vendors its ANTLR runtime
# (no antlr4-python3-runtime wheel needed). datasets 5.0.0 (huggingface_hub < 2, httpx,
# pyarrow >= 21) fits that image; 5.2.0 (huggingface_hub >= 1.31, pyarrow >= 24, no httpx) waits
# in .whl/alt/ in case 5.0.0 does not import there: gpu.sh then installs it instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
get() {  # get DIR NAME==VERSION
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${PLATFORMS[@]}" -d "$1" "$2"
}
rm -rf .whl
mkdir -p .whl/alt
for p in datasets==5.0.0 dill==0.4.1 multiprocess==0.70.19 omegaconf==2.4.0 gguf==0.19.0; do
    get .whl "$p"
done
get .whl/alt datasets==5.2.0
grep -qxF /.whl/ .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
ls -l .whl .whl/alt
echo ".whl: $(du -sh .whl | cut -f1) (the device tool carries at most 64 MiB in all)"
