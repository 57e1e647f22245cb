#!/bin/bash
# Issue 12's checks on the device machine, in one command (prepared by benchmarks/gpu_carry.sh).
# Budget: ~4 min to build llama.cpp with CUDA, ~3 min of tests, ~2 min of figures.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv | tee "$OUT/card.txt"
started=$(date +%s)
CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA=OFF -DLLAVA_BUILD=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip install -q --no-build-isolation --no-deps --no-compile \
  --target /tmp/site .gpu/llama_cpp_python-*.tar.gz > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "llama.cpp CUDA build: $(( $(date +%s) - started )) s"
python3 -m corella_cli doctor --json > "$OUT/doctor.json"; cat "$OUT/doctor.json"
timeout 300 python3 -m pytest -q -m gpu -rs -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/pytest-gpu.log" | tail -30
timeout 200 python3 -m benchmarks.gpu_figures /tmp/gf --crm .gpu/crm.onnx > /dev/null 2> "$OUT/figures.err"
cp /tmp/gf/gpu_figures.json "$OUT/" 2>/dev/null && cat "$OUT/gpu_figures.json" || tail -20 "$OUT/figures.err"
