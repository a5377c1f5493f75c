"""One dense MLA decode (B 64, Sq 1, Hq 128, Sk 4096, page 64) and one memory-bound one (Hq 16):
the kernels for `ncu` (scripts/device_run.sh does not run this; see docs/performance.md)."""
import sys

import torch

import mate_ops  # noqa: F401
from mate_ops import flash_mla as fm

torch.manual_seed(0)
for Hq in [int(h) for h in (sys.argv[1:] or ["128", "16"])]:
    B, Sk, P = 64, 4096, 64
    pages = B * Sk // P
    cache = torch.randn(pages, P, 1, 576, dtype=torch.bfloat16, device="cuda")
    table = torch.randperm(pages, dtype=torch.int32, device="cuda").view(B, Sk // P)
    lens = torch.full((B,), Sk, dtype=torch.int32, device="cuda")
    q = torch.randn(B, 1, Hq, 576, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        fm.flash_mla_with_kvcache(q, cache, table, lens, 512, None, None)
torch.cuda.synchronize()
