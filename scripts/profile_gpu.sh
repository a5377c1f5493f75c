#!/usr/bin/env bash
# Hardware counters and SASS of a tensor-core FMHA kernel (GPU machine, after
# scripts/device_run.sh installed the package). Writes ncu_*.txt and sass_*.txt under $OUT.
#   env: DIMS ("128 256 192x128": D or DxDv), KERNEL (kernel name regex, default fmha_sm90 on
#        compute capability 9.0 else fmha_mma), MASK (full or causal), SEQ (tokens per sequence,
#        default 2048; B = 16384 / SEQ as in bench_gpu.py's prefill table), DTYPE (bf16 or fp8:
#        e4m3 q / k / v with unit descales, bench_gpu.py's fp8 table), NCU_EXTRA (more ncu options,
#        e.g. "--print-details all" for the stall reasons), STALLS=1 (also the warp-state samples per
#        SASS instruction: stalls_<d>_s<seq>.csv, for scripts/stall_ledger.py)
set -uo pipefail
OUT=${OUT:-/tmp/out}
cd /tmp
cat > /tmp/one_call.py <<'PY'
import sys, torch, mate_ops
from mate_ops import mha_interface as mi
D, _, Dv = sys.argv[1].partition("x")
D, Dv = int(D), int(Dv or D)
S = int(sys.argv[3]); B, H, causal = 16384 // S, 2048 // D, sys.argv[2] == "causal"
q = torch.randn(B, S, H, D, dtype=torch.bfloat16, device="cuda")
k, v = torch.randn_like(q), torch.randn(B, S, H, Dv, dtype=torch.bfloat16, device="cuda")
kw = {}
if sys.argv[4] == "fp8":
    q, k, v = (x.to(torch.float8_e4m3fn) for x in (q, k, v))
    kw = {f"{n}_descale": torch.ones(B, H, device="cuda") for n in "qkv"}
for _ in range(3):
    mi.flash_attn_varlen_func(q, k, v, causal=causal, **kw)
torch.cuda.synchronize()
PY
KERNEL=${KERNEL:-$(python3 -c 'import torch; print("fmha_sm90" if torch.cuda.get_device_capability() == (9, 0) else "fmha_mma")')}
for d in ${DIMS:-128}; do
  ncu --clock-control none --kernel-name regex:$KERNEL --launch-skip 2 --launch-count 1 ${NCU_EXTRA:-} \
      --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats --section SchedulerStats \
      --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section InstructionStats \
      python3 /tmp/one_call.py "$d" "${MASK:-full}" "${SEQ:-2048}" "${DTYPE:-bf16}" > "$OUT/ncu_d${d}_s${SEQ:-2048}${DTYPE:+_$DTYPE}.txt" 2>&1
  echo "== D $d S ${SEQ:-2048} ${MASK:-full} ${DTYPE:-bf16} ($KERNEL)"
  grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Local|Registers|Achieved Occupancy|Theoretical Occupancy|Warp Cycles Per Issued|Issue Slots Busy|Stall|Pipe|Executed Ipc|Shared|Bank|L1/TEX Hit|Block Limit" "$OUT/ncu_d${d}_s${SEQ:-2048}${DTYPE:+_$DTYPE}.txt" | head -n 60
  if [ "${STALLS:-0}" = 1 ]; then  # per-instruction warp-state samples (source page, SASS view)
    rep="$OUT/stalls_d${d}_s${SEQ:-2048}_${MASK:-full}"
    ncu --clock-control none --kernel-name regex:$KERNEL --launch-skip 2 --launch-count 1 \
        --section SourceCounters --section WarpStateStats -f -o "$rep" \
        python3 /tmp/one_call.py "$d" "${MASK:-full}" "${SEQ:-2048}" "${DTYPE:-bf16}" > "$rep.log" 2>&1
    ncu -i "$rep.ncu-rep" --page source --csv --print-source sass > "$rep.csv" 2>>"$rep.log"
    echo "stall samples: $(wc -l < "$rep.csv") lines in $rep.csv"
  fi
done
so=$(python3 -c 'import mate_ops._C as c; print(c.__file__)')
if [ "$KERNEL" != fmha_mma ]; then  # per sm90 kernel: local-memory traffic (spills) and wgmma counts
  cuobjdump --dump-sass "$so" 2>/dev/null > "$OUT/sass_all.txt"
  awk '/Function : /{name=$3} /STL|LDL/{stl[name]++} /HGMMA/{mma[name]++} END{for (n in mma) print n, "HGMMA", mma[n], "STL/LDL", stl[n]+0}' \
      "$OUT/sass_all.txt" | grep fmha_sm90 | sed 's/_ZN4mate6device4sm9016fmha_sm90_kernelINS1_6ConfigIN7cutlass//'
  exit 0
fi
cuobjdump --dump-sass "$so" 2>/dev/null | awk '/Function : /{if (p) exit} /Function : .*fmha_mma_kernel.*Li128ELi4ELi1ELi64.*Lb1E/{p=1} p{print}' > "$OUT/sass_d128.txt"
echo "sass lines: $(wc -l < "$OUT/sass_d128.txt")"
grep -oE '^\s+/\*[0-9a-f]+\*/\s+[@!P0-9 ]*[A-Z][A-Z0-9._]+' "$OUT/sass_d128.txt" | awk '{print $NF}' | sed 's/\..*//' | sort | uniq -c | sort -rn | head -n 25
