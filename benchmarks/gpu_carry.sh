#!/bin/bash
# Prepare .gpu/ for a session on the device machine (NVIDIA H200, Python 3.12, nothing to download
# there): the wheels corella needs that its image lacks, llama-cpp-python's sdist trimmed to ~10 MB
# (built there with CUDA), and a real bundle's crm.onnx. Then, with the device tool:
#   run(command="bash benchmarks/gpu_session.sh", carry=[".gpu"], timeout_s=600)
# .gpu/ is ignored by git through .git/info/exclude (this script adds it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CRM=${CRM:-bundles/ml100k-v2/crm.onnx}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/wheels
platforms=()
for n in 28 27 24 17; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
# what the image lacks (KINDS.md lists what it has): the serving stack, gguf-py, llama-cpp-python's deps
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 -d .gpu/wheels \
  fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv typing-inspection \
  annotated-types uvicorn httptools uvloop orjson gguf diskcache
version=$($PY -c 'import llama_cpp; print(llama_cpp.__version__)')
$PY -m pip download -q --no-deps --no-binary :all: -d .gpu/sdist "llama-cpp-python==$version"
tmp=$(mktemp -d)
tar xzf .gpu/sdist/*.tar.gz -C "$tmp"
root=$(ls -d "$tmp"/llama_cpp_python-*)
rm -rf "$root"/.git "$root"/vendor/llama.cpp/{models,docs,media,benches,.git} .gpu/sdist
tar czf ".gpu/llama_cpp_python-$version.tar.gz" -C "$tmp" "$(basename "$root")"
rm -rf "$tmp"
[ -f "$CRM" ] && cp "$CRM" .gpu/crm.onnx || echo "no $CRM: the CRM figures will be skipped"
du -sh .gpu
