#!/usr/bin/env bash
# Installs what mate_ops needs and builds it in place (editable). Safe to re-run.
# On a machine without torch this installs the pinned CPU build (torch==2.13.0);
# an existing torch (e.g. a CUDA or MUSA build) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q ninja expecttest pytest
MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install -q --no-build-isolation -e .
