#!/usr/bin/env bash
# One run on the GPU machine (device tool): build with nvcc, run the tests on cuda, benchmark.
#   bash scripts/device_run.sh [test files...]     logs under $OUT
#   env: PYTEST_K (default "cuda"), BENCH ("" = no benchmark, "--only decode", ...),
#        SANITIZE (0 = skip compute-sanitizer)
# Wheels in .whl/ are installed first (the GPU machine has no package index): the sm90 kernels
# need `pip download --no-deps nvidia-cutlass==4.2.0.0 -d .whl` here and .whl carried along.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
# The image's CXX (/opt/gcc/bin/g++) links libstdc++ statically into the extension; its
# uninitialized locale then crashes on the first error message that formats a number.
# Build with the system compiler, which links libstdc++ dynamically like torch does.
if [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null | head -n 1 | sed 's/^/driver, max SM clock: /'
start=$(date +%s)
# a regular (non-editable) install: the image's setuptools falls back to `setup.py develop`
# for editable installs, which needs the network
python3 -m pip install --no-build-isolation --no-deps . >"$OUT/build.log" 2>&1
rc=$?; echo "build rc=$rc in $(( $(date +%s) - start ))s"
if [ $rc -ne 0 ]; then tail -n 80 "$OUT/build.log"; exit $rc; fi
ROOT=$(pwd)
# run from outside the checkout so the installed package (with its built _C) is imported
cd /tmp
python3 -c "import torch, mate_ops; print('cuda kernel:', torch._C._dispatch_has_kernel_for_dispatch_key('mate::fmha_fwd', 'CUDA'))"
ldd "$(python3 -c 'import mate_ops._C as c; print(c.__file__)')" | grep -q libstdc++ || echo "WARNING: libstdc++ linked statically"
# one pytest process per file, so a crash costs one file's results, not the run's
for f in "${@/#tests\//$ROOT/tests/}"; do
  case "$f" in -*) continue;; esac
  name=$(basename "$f" .py)
  timeout 300 python3 -m pytest -q -p no:cacheprovider --rootdir "$ROOT" -c "$ROOT/pytest.ini" -k "${PYTEST_K:-cuda}" "$f" \
    >"$OUT/$name.log" 2>&1
  echo "$name rc=$? $(grep -E '[0-9]+ (passed|failed)' "$OUT/$name.log" | tail -n 1)"
  grep -E "^FAILED|Fatal Python" "$OUT/$name.log" | head -n 5
done
# sanitize TOOL SCRIPT LOG LABEL: one compute-sanitizer run, its summary line (or "nothing run")
sanitize() {
  compute-sanitizer --tool "$1" python3 "$ROOT/scripts/$2" >"$OUT/$3" 2>&1
  echo "$4: $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY|nothing run' "$OUT/$3" | tail -n 1)"
}
if [ "${SANITIZE:-1}" != 0 ] && command -v compute-sanitizer >/dev/null; then
  sanitize memcheck sanitize_small.py memcheck.log "memcheck"
  sanitize memcheck sanitize_bwd.py memcheck_bwd.log "memcheck (backward)"
  sanitize memcheck sanitize_qv.py memcheck_qv.log "memcheck (qv)"
  sanitize racecheck sanitize_qv.py racecheck_qv.log "racecheck (qv)"
  sanitize memcheck sanitize_sm90.py memcheck_sm90.log "memcheck (sm90)"
  sanitize memcheck sanitize_sm90_bwd.py memcheck_sm90_bwd.log "memcheck (sm90 backward)"
  sanitize memcheck sanitize_sm90_mla.py memcheck_sm90_mla.log "memcheck (sm90 MLA)"
  sanitize racecheck sanitize_sm90.py racecheck_sm90.log "racecheck (sm90)"
  sanitize racecheck sanitize_sm90_mla.py racecheck_sm90_mla.log "racecheck (sm90 MLA)"
fi
# BENCH="" skips the benchmark; BENCH="--only decode" etc. picks a part
if [ "${BENCH-all}" != "" ]; then
  [ "${BENCH-all}" = all ] && BENCH=""
  python3 "$ROOT/bench/bench_gpu.py" $BENCH 2>&1 | tee "$OUT/bench.log" | grep -v '^|---' | tail -n 60
fi
