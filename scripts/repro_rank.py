# Repro of a device-only crash on a rank-mismatch bad input (kept for the device run).
import torch, mate_ops
q = torch.randn(2, 3, 16, device="cuda", dtype=torch.bfloat16)
k = torch.randn(2, 5, 2, 16, device="cuda", dtype=torch.bfloat16)
try:
    torch.ops.mate.fmha_fwd(q, k, k)
except RuntimeError as e:
    print("raised:", str(e)[:200])
