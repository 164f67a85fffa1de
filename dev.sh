#!/usr/bin/env bash
# Set up a virtual environment (.venv) and run the demo or the test suite.
#   ./dev.sh demo      the end-to-end example (examples/demo.py), offline, a few minutes on 2 CPUs
#   ./dev.sh test      the whole test suite (needs PostgreSQL at 127.0.0.1:5432, database `test`)
# Extra arguments go to the demo script or to pytest.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${LIBSTORE_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import libstore, pytest" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first and pinned: the CPU wheel, never a multi-GB CUDA build
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -e ".[test]"
fi

cmd=${1:-test}
shift || true
case "$cmd" in
  demo) exec "$VENV/bin/python" examples/demo.py "$@" ;;
  test) exec "$VENV/bin/python" -m pytest -n 2 -q "$@" ;;
  *) echo "usage: ./dev.sh demo|test [args]" >&2; exit 2 ;;
esac
