#!/usr/bin/env bash
# Sets up rbkd from a fresh checkout: a virtual environment in .venv, PyTorch, the package with its
# compiled CPU kernels, Triton and matplotlib (the gpu and plots extras; RBKD_EXTRAS chooses),
# and Fashion-MNIST from Debian when apt is there. Safe to run again: it only installs what is missing or changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first and pinned: 2.13.0 is the CPU wheel on this machine's disk. Left to itself, pip would
# resolve plain "torch" to a CUDA build of several GB. Set RBKD_TORCH to choose another build.
python -c "import torch" 2>/dev/null || pip install -q "${RBKD_TORCH:-torch==2.13.0}"

# The build runs without isolation so it reuses this environment's scikit-build-core and pybind11.
pip install -q "scikit-build-core>=0.11" "pybind11>=2.12" ninja
# Extras: gpu (Triton; the test suite runs its kernels under TRITON_INTERPRET=1 on the CPU) and
# plots (matplotlib) by default; scripts/test.sh adds test, which brings the test tools and the
# README examples' Hugging Face and Lightning (~210 MB the demo does not need). A CPU-only user
# of their own environment installs plain `pip install ".[plots]"`, without Triton.
pip install -q --no-build-isolation -e ".[${RBKD_EXTRAS:-gpu,plots}]"

# The embedded default dataset. Debian ships Fashion-MNIST as a package; elsewhere use
# `rbkd data fetch fashion-mnist`.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 ||
      (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) ||
      echo "setup: could not install dataset-fashion-mnist; run 'rbkd data fetch fashion-mnist'" >&2
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 ||
      echo "setup: could not install dataset-fashion-mnist; run 'rbkd data fetch fashion-mnist'" >&2
  else
    echo "setup: Fashion-MNIST not installed; run 'rbkd data fetch fashion-mnist' or install Debian's dataset-fashion-mnist" >&2
  fi
fi
rbkd info
