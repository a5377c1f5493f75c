"""MLA decode calls for `ncu` (not part of scripts/device_run.sh; see docs/performance.md):
    python3 scripts/profile_mla.py dense128 dense16 sparse16
dense<H>: B 64, Sq 1, Hq H, Sk 4096, page 64, bf16; sparse<H>: FP8 V3.2 cache, topk 2048."""
import sys

import torch

import mate_ops  # noqa: F401
from mate_ops import flash_mla as fm
from mate_ops.flashmla import quantize_k_cache

torch.manual_seed(0)
B, Sk, P = 64, 4096, 64
pages = B * Sk // P
for case in sys.argv[1:] or ["dense128", "dense16", "sparse16"]:
    Hq = int(case.lstrip("densparse"))
    if case.startswith("dense"):
        cache = torch.randn(pages, P, 1, 576, dtype=torch.bfloat16, device="cuda")
        table = torch.randperm(pages, dtype=torch.int32, device="cuda").view(B, Sk // P)
        lens = torch.full((B,), Sk, dtype=torch.int32, device="cuda")
        q = torch.randn(B, 1, Hq, 576, dtype=torch.bfloat16, device="cuda")
        call = lambda: fm.flash_mla_with_kvcache(q, cache, table, lens, 512, None, None)  # noqa: E731
    else:
        cache = quantize_k_cache(torch.randn(pages, P, 1, 576, dtype=torch.bfloat16), "v32").cuda()
        idx = torch.randint(0, pages * P, (B, 1, 2048), dtype=torch.int32, device="cuda")
        q = torch.randn(B, 1, Hq, 576, dtype=torch.bfloat16, device="cuda")
        call = lambda: fm.flash_mla_with_kvcache(q, cache, None, None, 512, None, None,  # noqa: E731
                                                 is_fp8_kvcache=True, indices=idx)
    for _ in range(3):
        call()
torch.cuda.synchronize()
