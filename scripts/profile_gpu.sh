#!/usr/bin/env bash
# Hardware counters and SASS of the tensor-core FMHA kernel (GPU machine, after
# scripts/device_run.sh installed the package). Writes ncu_*.txt and sass_*.txt under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
cd /tmp
cat > /tmp/one_call.py <<'PY'
import sys, torch, mate_ops
from mate_ops import mha_interface as mi
B, S, H, D, causal = 8, 2048, 16, int(sys.argv[1]), sys.argv[2] == "causal"
q = torch.randn(B, S, H, D, dtype=torch.bfloat16, device="cuda")
k, v = torch.randn_like(q), torch.randn_like(q)
for _ in range(3):
    mi.flash_attn_varlen_func(q, k, v, causal=causal)
torch.cuda.synchronize()
PY
for d in ${DIMS:-128}; do
  ncu --clock-control none --kernel-name regex:fmha_mma --launch-skip 2 --launch-count 1 \
      --section LaunchStats --section Occupancy --section WarpStateStats --section SchedulerStats \
      --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section InstructionStats \
      python3 /tmp/one_call.py "$d" full > "$OUT/ncu_d$d.txt" 2>&1
  grep -E "Registers|Achieved Occupancy|Theoretical Occupancy|Warp Cycles Per Issued|Issue Slots Busy|Stall|Pipe|Executed Ipc|Shared|Bank|L1/TEX Hit|Block Limit" "$OUT/ncu_d$d.txt" | head -n 60
done
so=$(python3 -c 'import mate_ops._C as c; print(c.__file__)')
cuobjdump --dump-sass "$so" 2>/dev/null | awk '/Function : /{if (p) exit} /Function : .*fmha_mma_kernel.*Li128ELi4ELi1ELi64.*Lb1E/{p=1} p{print}' > "$OUT/sass_d128.txt"
echo "sass lines: $(wc -l < "$OUT/sass_d128.txt")"
grep -oE '^\s+/\*[0-9a-f]+\*/\s+[@!P0-9 ]*[A-Z][A-Z0-9._]+' "$OUT/sass_d128.txt" | awk '{print $NF}' | sed 's/\..*//' | sort | uniq -c | sort -rn | head -n 25
