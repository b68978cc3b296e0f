#!/usr/bin/env bash
# The GPU run (benchmarks/gpu.py): ctr_step with XLA and mixed precision off and on (tfmm vs
# DeepCTR), predictor_latency, moco_queue, retrieval and embed in under 8 minutes, one JSON.
#
#   bash benchmarks/gpu.sh [--out=results.json]    # on a GPU machine after `make setup`
#   bash benchmarks/gpu.sh --tiny --out=x.json     # smoke run, any machine (tests/test_gpu_script.py)
#
# Installs nothing. The interpreter: $PYTHON, else this checkout's .venv (make setup), else
# python3; this checkout's tfmm and benchmarks come first on the path, so a venv carried to
# another machine (its editable install pointing elsewhere) runs this code.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi

export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m benchmarks.gpu "$@"
