#!/usr/bin/env bash
# The GPU suite on one GPU, in under 8 minutes: correctness and speed into OUT/gpu.json and
# OUT/gpu.log (see bench/gpu.py; OUT defaults to bench/results/gpu).
#
#   bench/gpu.sh OUT                        # on a CUDA machine
#   bench/gpu.sh OUT --only train_mfu,decode   # some parts (a second run after a failure)
#   bench/gpu.sh OUT --device cpu --tiny    # a dry run anywhere, in under a minute
#
# Any argument is passed to `python -m bench.gpu`. The Python is $PYTHON when set, else the project's
# .venv when there is one, else the first of `python3` and `python` on PATH that imports torch (a GPU
# image's own Python: the package runs from this checkout through PYTHONPATH, uninstalled).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
    PY="$ROOT/.venv/bin/python"
else
    PY=""
    for candidate in python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" >/dev/null 2>&1; then
            PY="$candidate"
            break
        fi
    done
    if [[ -z "$PY" ]]; then
        echo "bench/gpu.sh: no python3 or python on PATH imports torch: set PYTHON=/path/to/python" >&2
        exit 1
    fi
fi

cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$PY" -m bench.gpu "$@"
