#!/usr/bin/env bash
# On the lent GPU machine (device tool, carry=[".gpu"]): install runtime-only TVM and tvm_ffi for its
# Python 3.12, then run the benchmark; gpu_results.json lands in $OUT. Prepare .gpu/ here first:
#   python benchmarks/gpu.py prepare
set -euo pipefail
site=/tmp/site
mkdir -p "$site"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .gpu/wheels/*.whl
tar -xJf .gpu/tvm_runtime.tar.xz -C "$site"
export PYTHONPATH="$site" TVM_USE_RUNTIME_LIB=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 benchmarks/gpu_run.py --dir .gpu --out "${OUT:-/tmp/gpu-out}" 2>&1 | tee "${OUT:-/tmp/gpu-out}/gpu_run.log"
