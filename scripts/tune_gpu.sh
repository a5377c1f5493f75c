#!/usr/bin/env bash
# Tile tuning on the GPU machine, after scripts/device_run.sh has installed the package:
# the prefill and decode tables for each MATE_OPS_FMHA_TILE variant of fmha_mma.cu.
#   bash scripts/tune_gpu.sh "0 1 2 3"
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/out}
cd /tmp
for v in ${1:-0 1}; do
  echo "== MATE_OPS_FMHA_TILE=$v"
  MATE_OPS_FMHA_TILE=$v python3 "$ROOT/bench/bench_gpu.py" --quick --only prefill --dims ${DIMS:-128,256} 2>&1 \
    | tee "$OUT/tune_prefill_$v.log" | grep '^| B'
  MATE_OPS_FMHA_TILE=$v python3 "$ROOT/bench/bench_gpu.py" --quick --only decode 2>&1 \
    | tee "$OUT/tune_decode_$v.log" | grep -E '^\| (dense|paged)'
done
