#!/usr/bin/env bash
# One run on the GPU machine (device tool): build with nvcc, run the tests on cuda, benchmark.
#   bash scripts/device_run.sh [pytest args...]     logs under $OUT
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
start=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1
rc=$?; echo "build rc=$rc in $(( $(date +%s) - start ))s"
if [ $rc -ne 0 ]; then tail -n 80 "$OUT/build.log"; exit $rc; fi
python3 -c "import torch, mate_ops; print('cuda kernel:', torch._C._dispatch_has_kernel_for_dispatch_key('mate::fmha_fwd', 'CUDA'))"
python3 -m pytest -q -x -p no:cacheprovider "$@" 2>&1 | tee "$OUT/pytest.log" | tail -n 40
python3 bench/bench_gpu.py 2>&1 | tee "$OUT/bench.log" | tail -n 20
