#!/usr/bin/env bash
# A second build of the package on the GPU machine, so that one run can time two versions of a
# kernel child against child (bench_gpu.py --compare). Run after scripts/device_run.sh, which
# installed the working tree's own build (B); this builds the working tree with the files under
# BASE laid over it (a folder that mirrors the repository's paths, e.g. ab_base/csrc/musa/arch/
# sm90/fmha_fwd_sm90.cuh from `git show HEAD:...`) into SITE (default /tmp/site_a), in a copy of
# the tree; more versions, more calls with other folders and sites:
#   bash scripts/device_run.sh tests/test_sm90_fmha.py && bash scripts/device_ab.sh ab_base
#   bash scripts/device_ab.sh ab_chains /tmp/site_c
#   python3 bench/bench_gpu.py --only prefill --compare "A:PYTHONPATH=/tmp/site_a" --compare "B:MATE_OPS_UNUSED=1" \
#       --compare "C:PYTHONPATH=/tmp/site_c"
# The same build environment as device_run.sh: the sm_90a target and the CUTLASS headers from the
# carried wheel (without them the build silently leaves the Hopper kernels out, and A times the
# mma.sync path: session 12's first A/B run did that).
set -uo pipefail
BASE=${1:?usage: device_ab.sh BASE_DIR [SITE]}
SITE=${2:-/tmp/site_a}
TAG=$(basename "$SITE")
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
if [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi
if [ -d /tmp/site/cutlass_library ]; then export PYTHONPATH=/tmp/site; fi
python3 -c "import cutlass_library" 2>/dev/null || { echo "device_ab: no CUTLASS headers (run device_run.sh first)"; exit 1; }
src=$(mktemp -d)/src
mkdir -p "$src" && tar --exclude=./build --exclude=./.git --exclude=./.whl -cf - . | tar -xf - -C "$src"
(cd "$BASE" && find . -type f) | while read -r f; do cp "$BASE/$f" "$src/$f"; done
start=$(date +%s)
(cd "$src" && python3 -m pip install --no-build-isolation --no-deps --target "$SITE" . >"$OUT/build_$TAG.log" 2>&1)
rc=$?; echo "build $SITE rc=$rc in $(( $(date +%s) - start ))s"
[ $rc -ne 0 ] && tail -n 40 "$OUT/build_$TAG.log"
# the Hopper kernels are in A's extension (else the comparison is against another path)
(cd /tmp && PYTHONPATH="$SITE" python3 -c "
import mate_ops._C as c
n = open(c.__file__, 'rb').read().count(b'fmha_sm90_kernel')
print(c.__file__, 'Hopper kernels:', 'yes' if n else 'NO (mma.sync only)')
raise SystemExit(0 if n else 1)") || rc=1
exit $rc
