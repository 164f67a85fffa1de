#!/usr/bin/env bash
# Set up a virtual environment (.venv) and run the demo, the checks or the test suite.
#   ./dev.sh demo      the end-to-end example (examples/demo.py), offline, a few minutes on 2 CPUs
#   ./dev.sh check     ruff check, ruff format --check and mypy (strict, libstore/), as CI runs them
#   ./dev.sh test      the whole test suite (needs PostgreSQL at 127.0.0.1:5432, database `test`)
# Extra arguments go to the demo script or to pytest.
#
# torch is installed first, pinned (torch==2.13.0), from pip's configured indexes. That is the CPU
# build only where pip finds a CPU wheel first (a local wheel folder or mirror, or macOS); on Linux,
# PyPI's default torch wheel is the CUDA build (several GB). To get the CPU build from PyTorch's
# index, set TORCH_INDEX_URL, which this script passes to pip for torch only:
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu ./dev.sh test
# (by hand: pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu)
set -euo pipefail
cd "$(dirname "$0")"
VENV=${LIBSTORE_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import libstore, pytest, ruff, mypy" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if [ -n "$TORCH_INDEX_URL" ]; then
      "$VENV/bin/python" -m pip install -q "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
    else
      "$VENV/bin/python" -m pip install -q "torch==2.13.0"
    fi
  fi
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
fi

cmd=${1:-test}
shift || true
case "$cmd" in
  demo) exec "$VENV/bin/python" examples/demo.py "$@" ;;
  check)
    "$VENV/bin/python" -m ruff check .
    "$VENV/bin/python" -m ruff format --check .
    exec "$VENV/bin/python" -m mypy ;;
  test) exec "$VENV/bin/python" -m pytest -n 2 -q "$@" ;;
  *) echo "usage: ./dev.sh demo|check|test [args]" >&2; exit 2 ;;
esac
