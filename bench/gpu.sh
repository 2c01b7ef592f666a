#!/usr/bin/env bash
# The prepared GPU check: one command, one GPU, under 8 minutes.
#
#   bash bench/gpu.sh                     # -> bench/results/gpu-<gpu>-<date>.md (+ .json files)
#
# Steps (each writes its part of the report as soon as it ends, so a run stopped at a time limit
# keeps what it measured):
#   1. preflight: a CUDA device and Triton, or exit 3 at once with one line (nothing installed);
#   2. rbkd from this checkout: the installed one if it imports, else the source tree staged as
#      the wheel lays it out (rbkd, rbkd.kernels, rbkd.cli; the C++ CPU kernels are not needed);
#   3. the GPU tests (pytest -m gpu);
#   4. the Triton block-size sweep (bench/gpu_tune.py);
#   5. the op benchmarks (bench/test_bench_ops.py -m gpu: rbkd Triton, torch eager, torch.compile,
#      Liger-Kernel where it imports) and bench/report.py;
#   6. the sparse soft-label cases (bench/gpu_sparse.py, issue 16): sparse_kd_loss fwd+bwd at
#      8192 x 128256 bf16, k = 32 and 128, against rbkd's dense kd_loss and Liger-Kernel's dense KL
#      where it imports, and capture_soft_labels at J = 8;
#   7. one epoch of the small and large Fashion-MNIST teachers and of the general student through
#      the CLI (bench/gpu_train.py; needs Fashion-MNIST under $RBKD_DATA or Debian's folder).
#
# Environment: PYTHON (default python3), RBKD_GPU_NAME (default: from the GPU's name),
# RBKD_GPU_RESULTS (default bench/results), RBKD_GPU_STEPS (default "tests,tune,bench,sparse,train"),
# RBKD_GPU_WHEELS (a folder of wheels to put on the path first, e.g. liger-kernel for a machine
# without an index), RBKD_BENCH_ROUND_S (seconds of timed rounds per benchmark case, default 0.4).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STEPS=${RBKD_GPU_STEPS:-tests,tune,bench,sparse,train}
RESULTS=${RBKD_GPU_RESULTS:-bench/results}
SECONDS=0

say() { echo "gpu.sh [${SECONDS}s] $*"; }
has_step() { [[ ",$STEPS," == *",$1,"* ]]; }

# ---- 1. preflight: fail early and clearly ----------------------------------------------------
if ! "$PY" - <<'EOF'
import sys
try:
    import torch
except ImportError as exc:
    sys.exit(f"bench/gpu.sh: torch does not import ({exc}); this check needs PyTorch with CUDA")
if not torch.cuda.is_available():
    sys.exit(f"bench/gpu.sh: no CUDA device (torch {torch.__version__}, "
             f"CUDA build {torch.version.cuda}); run it on a machine with an NVIDIA GPU")
try:
    import triton  # noqa: F401
except ImportError as exc:
    sys.exit(f"bench/gpu.sh: triton does not import ({exc}); pip install 'rbkd[gpu]'")
EOF
then
  exit 3
fi

# ---- 2. rbkd from this checkout ----------------------------------------------------------------
STAGE=$(mktemp -d /tmp/rbkd-gpu.XXXXXX)
if [ -n "${RBKD_GPU_WHEELS:-}" ] && ls "$RBKD_GPU_WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$STAGE/site" \
    "$RBKD_GPU_WHEELS"/*.whl || exit 1
  export PYTHONPATH="$STAGE/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# -P: the checkout's own rbkd/ (without kernels/ and cli/ inside) must not shadow the staged one.
if ! (cd /tmp && "$PY" -P -c "import rbkd.kernels, rbkd.cli" 2>/dev/null); then
  mkdir -p "$STAGE/src"
  cp -r rbkd "$STAGE/src/rbkd"
  cp -r kernels "$STAGE/src/rbkd/kernels"
  cp -r cli "$STAGE/src/rbkd/cli"
  export PYTHONPATH="$STAGE/src${PYTHONPATH:+:$PYTHONPATH}"
  say "rbkd staged from the checkout in $STAGE/src (Triton and torch backends)"
fi
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

GPU=$("$PY" -P -c "import torch; print(torch.cuda.get_device_name(0))")
NAME=${RBKD_GPU_NAME:-$(echo "$GPU" | tr 'A-Z' 'a-z' | sed -e 's/nvidia//' -e 's/[^a-z0-9]\+/-/g' \
  -e 's/^-//' -e 's/-$//')}
BASE="gpu-${NAME:-unknown}-$(date -u +%Y-%m-%d)"
WORK="$STAGE/work"
mkdir -p "$WORK" "$RESULTS"
say "$GPU: writing $RESULTS/$BASE.md (steps: $STEPS)"
"$PY" -P - >"$WORK/versions.txt" 2>&1 <<'EOF'
import importlib, platform, torch
print(f"- GPU: {torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB; driver CUDA {torch.version.cuda}")
print(f"- Python {platform.python_version()}, torch {torch.__version__}", end="")
for mod in ("triton", "liger_kernel"):
    try:
        m = importlib.import_module(mod)
        print(f", {mod} {getattr(m, '__version__', 'installed')}", end="")
    except ImportError:
        print(f", {mod} not installed", end="")
print()
EOF

STATUS=0
# ---- 3. the GPU tests ---------------------------------------------------------------------------
if has_step tests; then
  say "GPU tests"
  "$PY" -P -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors tests/ >"$WORK/tests.log" 2>&1
  rc=$?
  [ $rc -ne 0 ] && STATUS=1
  tail -n 15 "$WORK/tests.log"
  { echo "## GPU tests (pytest -m gpu tests/)"; echo; echo '```'
    grep -E "passed|failed|error" "$WORK/tests.log" | tail -n 20; echo '```'; } >"$WORK/tests.md"
fi

# ---- 4. block-size sweep --------------------------------------------------------------------
if has_step tune; then
  say "block-size sweep"
  "$PY" -P bench/gpu_tune.py --json "$RESULTS/$BASE-tune.json" --md "$WORK/tune.md" || STATUS=1
fi

# ---- 5. op benchmarks -----------------------------------------------------------------------
if has_step bench; then
  say "op benchmarks"
  RBKD_BENCH_ROUND_S=${RBKD_BENCH_ROUND_S:-0.4} "$PY" -P -m pytest -m gpu -q -p no:cacheprovider \
    bench/test_bench_ops.py --benchmark-json="$WORK/bench.json" --benchmark-disable-gc \
    >"$WORK/bench.log" 2>&1 || STATUS=1
  tail -n 5 "$WORK/bench.log"
fi

# ---- 6. sparse soft labels (issue 16) ------------------------------------------------------------
if has_step sparse; then
  say "sparse soft labels: sparse_kd_loss and capture"
  "$PY" -P bench/gpu_sparse.py --json "$RESULTS/$BASE-sparse.json" --md "$WORK/sparse.md" || STATUS=1
fi

# ---- 7. one epoch of each model through the CLI -----------------------------------------------
if has_step train; then
  say "one epoch of the small and large teachers and the general student"
  "$PY" -P bench/gpu_train.py --work "$WORK/runs" --json "$RESULTS/$BASE-train.json" \
    --md "$WORK/train.md" || STATUS=1
fi

# ---- the report ---------------------------------------------------------------------------------
NOTES=(--note "bash bench/gpu.sh (steps: $STEPS), $SECONDS s in all; exit status $STATUS")
while IFS= read -r line; do NOTES+=(--note "${line#- }"); done <"$WORK/versions.txt"
EXTRA=()
for part in tests tune sparse train; do
  [ -f "$WORK/$part.md" ] && EXTRA+=(--append "$WORK/$part.md")
done
if [ -f "$WORK/bench.json" ]; then
  "$PY" -P bench/report.py "$WORK/bench.json" --name "$BASE" --out-dir "$RESULTS" \
    "${NOTES[@]}" "${EXTRA[@]}" || STATUS=1
else
  { echo "# rbkd GPU check: $BASE"; echo
    for n in "${NOTES[@]}"; do [ "$n" != --note ] && echo "- $n"; done; echo
    for part in tests tune sparse train; do [ -f "$WORK/$part.md" ] && cat "$WORK/$part.md" && echo; done
  } >"$RESULTS/$BASE.md"
fi
say "done: $RESULTS/$BASE.md (exit $STATUS)"
exit $STATUS
