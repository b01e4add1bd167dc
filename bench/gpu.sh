#!/usr/bin/env bash
# The GPU suite on one GPU, in under 8 minutes: writes bench/results/gpu.json (see bench/gpu.py).
#
#   bench/gpu.sh                        # on a CUDA machine
#   bench/gpu.sh --device cpu --tiny    # a dry run anywhere, in seconds
#
# Any argument is passed to `python -m bench.gpu`. The Python is the project's .venv when there is
# one, else `python` (or `python3`) from PATH; $PYTHON overrides both.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
    PY="$ROOT/.venv/bin/python"
elif command -v python >/dev/null 2>&1; then
    PY=python
else
    PY=python3
fi

cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m bench.gpu "$@"
