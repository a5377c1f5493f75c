#!/usr/bin/env bash
# The README's first command: set up, then run the demo against the oracle.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
"${PYTHON:-python3}" examples/demo.py "$@"
