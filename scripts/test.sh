#!/usr/bin/env bash
# Installs everything (scripts/setup.sh), then lints and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
RBKD_EXTRAS=test,gpu,plots bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check .
# pytest from the repo root imports the installed package (--import-mode=importlib in pyproject).
pytest "$@"
