#!/usr/bin/env bash
# Sets up rbkd from a fresh checkout: a virtual environment in .venv, PyTorch, the package with its
# compiled CPU kernels, matplotlib (the plots extra) and, where an NVIDIA GPU is present, Triton
# (the gpu extra); RBKD_EXTRAS chooses instead. Fashion-MNIST and the Python 3.11 documentation
# sources (the language-model corpus) from Debian when apt is there.
# Safe to run again: it only installs what is missing or changed.
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
# Extras: plots (matplotlib) always, gpu (Triton) only where there is an NVIDIA GPU to run its
# kernels: on a CPU-only machine it is about 1 GB of the environment for nothing (triton 3.9.0:
# 999 MB of a 2.1 GB .venv). scripts/test.sh asks for test,gpu,plots: the suite runs the Triton
# kernels under TRITON_INTERPRET=1 on the CPU, and test brings the test tools and the README
# examples' Hugging Face and Lightning (~210 MB the demo does not need). lm (transformers,
# tokenizers) is always there, so that `rbkd lm ...` works after set-up.
if [ -z "${RBKD_EXTRAS:-}" ]; then
  RBKD_EXTRAS=plots,lm
  if { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; } ||
    [ -n "$(ls -A /proc/driver/nvidia/gpus 2>/dev/null)" ]; then
    RBKD_EXTRAS=gpu,plots,lm
  else
    echo "setup: no NVIDIA GPU here: Triton (the gpu extra) not installed; RBKD_EXTRAS=gpu,plots,lm adds it" >&2
  fi
fi
pip install -q --no-build-isolation -e ".[${RBKD_EXTRAS}]"

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
# The language-model corpus: the Python 3.11 documentation's reStructuredText sources (Debian's
# python3.11-doc, /usr/share/doc/python3.11/html/_sources; docs/lm-data.md). Elsewhere give any
# folder of text files with --corpus DIR, or put them in $RBKD_DATA/pydocs/.
if [ ! -d /usr/share/doc/python3.11/html/_sources ] && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get install -y -qq python3.11-doc >/dev/null 2>&1 ||
      (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq python3.11-doc >/dev/null 2>&1)) ||
      echo "setup: could not install python3.11-doc; give rbkd lm a text folder with --corpus DIR" >&2
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo apt-get install -y -qq python3.11-doc >/dev/null 2>&1 ||
      echo "setup: could not install python3.11-doc; give rbkd lm a text folder with --corpus DIR" >&2
  else
    echo "setup: the pydocs corpus is not installed; install Debian's python3.11-doc or give rbkd lm a text folder with --corpus DIR" >&2
  fi
fi
rbkd info
