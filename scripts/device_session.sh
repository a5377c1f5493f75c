#!/usr/bin/env bash
# One GPU-machine call that validates and measures (device tool): device_run.sh's build, tests
# and sanitizers, then benchmark commands, each cut off so the whole call ends by DEADLINE
# seconds; the benchmark logs come back as $OUT/b_<name>.log, everything else packed into
# $OUT/logs.tgz (at most 8 files come back from a call).
#   TESTS="tests/a.py ..." BENCHES="name:args;name:ENV=VAL args" DEADLINE=580 bash scripts/device_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; ROOT=$(pwd)
PYTEST_K=${PYTEST_K:-"cuda or sm90"} BENCH="" bash scripts/device_run.sh ${TESTS:-}
export PYTHONPATH=/tmp/site
IFS=';' read -ra items <<< "${BENCHES:-}"
for item in "${items[@]}"; do
  name=${item%%:*}; cmd=${item#*:}
  left=$(( ${DEADLINE:-580} - SECONDS ))
  if [ "$left" -lt 20 ]; then echo "bench $name: skipped (no time left)"; continue; fi
  # leading VAR=VALUE words are the environment, then the script under bench/ and its arguments
  read -ra words <<< "$cmd"; envs=(); while [[ "${words[0]}" == *=* ]]; do envs+=("${words[0]}"); words=("${words[@]:1}"); done
  (cd /tmp && env "${envs[@]}" timeout "$left" python3 "$ROOT/bench/${words[0]}" "${words[@]:1}" >"$OUT/b_$name.log" 2>&1)
  echo "bench $name rc=$? at ${SECONDS}s"
done
cd "$OUT" && others=$(ls | grep -v '^b_' | grep -v '^logs.tgz$') && [ -n "$others" ] && tar czf logs.tgz $others && rm -rf $others
ls "$OUT"
