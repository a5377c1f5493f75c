#!/usr/bin/env bash
# Installs what mate_ops needs and builds mate_ops._C in place. Safe to re-run: an
# unchanged extension is not rebuilt. Works on a system Python and in a fresh
# `python -m venv` (whose pip and setuptools may be old).
#   PYTHON=...   interpreter to set up (default: python3, i.e. the active venv's)
#   MAX_JOBS=N   parallel compile jobs (default 2)
# On a machine without torch this installs the pinned CPU build (torch==2.13.0);
# an existing torch (e.g. a CUDA or MUSA build) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check "$@"; }
# true when every named module is importable; looks them up without importing them
# (importing torch alone takes seconds), so a re-run with nothing to do is quick
have() { "$PY" -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))' "$@"; }

# 1. setuptools. A fresh Python 3.11 venv has setuptools 65 and no `wheel`: its editable
#    install stops at "invalid command 'bdist_wheel'" and pip falls back to a legacy
#    `setup.py develop`. setuptools >= 77 has bdist_wheel built in and reads pyproject's
#    licence field. Upgraded only when older, in the environment of $PY only.
if ! "$PY" -c 'import sys, importlib.metadata as m; sys.exit(int(m.version("setuptools").split(".")[0]) < 77)' 2>/dev/null; then
  echo "setup_env: upgrading setuptools (>= 77 needed)"
  pip_install -q "setuptools>=77"
fi

# 2. torch: any importable torch is kept. Otherwise the pinned CPU build; never an unpinned
#    `pip install torch`, which would resolve to the CUDA build (gigabytes).
if ! have torch; then
  echo "setup_env: no torch found, installing torch==2.13.0"
  pip_install torch==2.13.0
fi

# 3. build and test tools (skipped when all are installed); numpy only
#    silences torch's "Failed to initialize NumPy" warning
if ! have ninja expecttest pytest hypothesis numpy; then
  echo "setup_env: installing ninja expecttest pytest hypothesis numpy"
  pip_install -q ninja expecttest pytest hypothesis numpy
fi
# transformers for the integration tests (tests/test_integration_transformers.py), pinned
# like pyproject's [test] extra; an installed transformers is kept (those tests may then
# skip or differ); needs Python >= 3.10 (older Pythons skip those tests). It depends on
# no torch, so pip leaves the torch above alone.
TRANSFORMERS_PIN=5.24.0
if ! have transformers && "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "setup_env: installing transformers==$TRANSFORMERS_PIN (integration tests)"
  pip_install -q "transformers==$TRANSFORMERS_PIN"
fi
# CUTLASS's headers (nvidia-cutlass, 6 MB; see pyproject.toml): tests/test_device_sources.py
# compiles the Hopper kernels of csrc/musa/arch/sm90 with them (nvcc only; never run here),
# and CUDA builds find them through setup.py
CUTLASS_PIN=4.2.0.0
if ! have cutlass_library; then
  echo "setup_env: installing nvidia-cutlass==$CUTLASS_PIN (CUTLASS headers for the sm90 kernels)"
  pip_install -q --no-deps "nvidia-cutlass==$CUTLASS_PIN"  # headers only, not its generator's deps
fi
# cuobjdump and nvdisasm (nvidia-cuda-cuobjdump / -nvdisasm, a few MB each; not in the nvcc
# package this machine has):
# tests/test_device_sources.py reads the Hopper forward's SASS to keep its consumer warpgroups
# free of register spills (scripts/sass_roles.py)
CUOBJDUMP_PIN=13.5.37
if command -v nvcc >/dev/null && ! "$PY" -c 'import sys; sys.path.insert(0, "scripts"); import sass_roles; sys.exit(sass_roles.find_cuobjdump() is None)'; then
  echo "setup_env: installing nvidia-cuda-cuobjdump / -nvdisasm==$CUOBJDUMP_PIN (SASS of the sm90 kernels)"
  pip_install -q --no-deps "nvidia-cuda-cuobjdump==$CUOBJDUMP_PIN" "nvidia-cuda-nvdisasm==$CUOBJDUMP_PIN"
fi
# pip puts the ninja executable next to the interpreter's scripts; when a venv's python is
# called by its path without activating the venv that folder is not on PATH, and torch
# would fall back to a slow, serial build without ninja
PATH="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export PATH

# 4. Build. `pip install -e .` compiles the extension in a fresh temporary directory every
#    time (setuptools' editable wheel), so each run would recompile everything (minutes on
#    2 cores). Instead:
#    - the package is installed editable once per environment WITHOUT the extension
#      (MATE_OPS_SKIP_EXT=1: seconds), so `import mate_ops` works from anywhere and
#      mate_ops.meta_kernels maps to meta_kernels/;
#    - `setup.py build_ext --inplace` builds mate_ops/_C*.so with ninja in a build folder
#      that persists (build/temp-<env key>), so only changed sources recompile (ninja
#      tracks our headers through depfiles), and ninja's [n/N] lines show progress;
#    - a stamp (build/setup_env.stamp) of the sources under csrc/, setup.py, pyproject.toml
#      and the environment (interpreter, torch version and flavour, toolchain, build knobs)
#      skips even that when nothing changed and the built _C loads against this torch.
#    torch's headers are not in ninja's depfiles (-isystem), so each environment key has
#    its own object folder: a new torch never links objects compiled against an old one.
STAMP=build/setup_env.stamp
state=$(cd / && "$PY" "$ROOT/scripts/build_state.py" "$ROOT")
read -r ENV_KEY SRC_KEY INSTALLED LOADS <<<"$state"
if [ "$INSTALLED" != 1 ]; then
  echo "setup_env: installing mate_ops (editable, Python files) into $("$PY" -c 'import sys; print(sys.prefix)')"
  MATE_OPS_SKIP_EXT=1 pip_install -q --no-build-isolation --no-deps -e .
fi
if [ "$LOADS" = 1 ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$ENV_KEY $SRC_KEY" ]; then
  echo "setup_env: mate_ops._C is up to date (csrc/, setup.py and torch unchanged), not rebuilding"
  exit 0
fi
export MAX_JOBS=${MAX_JOBS:-2}
echo "setup_env: building mate_ops._C with ninja (MAX_JOBS=$MAX_JOBS; only changed sources"\
     "recompile; a first build takes a few minutes on 2 cores; full log: build/setup_env.log)"
mkdir -p build
rm -f "$STAMP"
start=$(date +%s)
# --force: the stamp already said something changed, and distutils' own up-to-date test
# ignores headers; ninja then recompiles only what is out of date.
# The terminal gets ninja's progress as "[n/N] <source>", our setup.py's own lines and any
# error; everything (full command lines, warnings) goes to build/setup_env.log, whose tail
# is printed if the build fails.
set +e
PYTHONUNBUFFERED=1 "$PY" setup.py build_ext --inplace --force --build-temp "build/temp-$ENV_KEY" 2>&1 \
  | tee build/setup_env.log \
  | awk -v root="$ROOT/" '
      /^\[[0-9]+\/[0-9]+\] / {
        src = ""
        for (i = 2; i <= NF; i++) if ($i ~ /\.(c|cc|cpp|cu|mu)$/) src = $i
        if (index(src, root) == 1) src = substr(src, length(root) + 1)
        print "  " $1, (src != "" ? src : "linking"); fflush(); next
      }
      /^mate_ops:|[Ee]rror/ { print "  " substr($0, 1, 300); fflush() }'
rc=$?
set -e
warnings=$(grep -c "warning:" build/setup_env.log || true)
if [ $rc -ne 0 ]; then
  echo "setup_env: the build FAILED (rc=$rc); last lines of build/setup_env.log:"
  tail -n 60 build/setup_env.log
  exit $rc
fi
echo "$ENV_KEY $SRC_KEY" >"$STAMP"
echo "setup_env: built mate_ops._C in $(( $(date +%s) - start ))s ($warnings compiler warnings in build/setup_env.log)"
