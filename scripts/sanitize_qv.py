"""qv calls for `compute-sanitizer --tool memcheck` and `--tool racecheck` (scripts/device_run.sh):
the mma.sync qv kernel (arch/sm80/fmha_qv_mma.cu), whose column warps exchange partial scores
through shared memory, on ragged tile edges, splits, GQA packing, paged K / V, ScoreMod and
padded head dims."""
import torch

import mate_ops  # noqa: F401
from mate_ops import mha_interface as mi
from mate_ops import testing as T

import sys

dev, bf16 = "cuda", torch.bfloat16
if sys.argv[1:] == ["plain"]:  # the mma.sync kernel without qv, the same cp.async pipeline (a baseline)
    x = torch.randn(2, 45, 4, 64, dtype=bf16, device=dev)
    mi.flash_attn_varlen_func(x, x, x, causal=True)
    mi.flash_attn_varlen_func(x, x, x, num_splits=2)
    torch.cuda.synchronize()
    print("sanitize_qv plain: done")
    sys.exit(0)
torch.manual_seed(0)
r = lambda *s, dt=bf16: torch.randn(*s, dtype=dt, device=dev)  # noqa: E731
q, k, v, qv = r(2, 45, 4, 64), r(2, 77, 2, 64), r(2, 77, 2, 512), r(2, 45, 4, 512)
mi.flash_attn_varlen_func(q, k, v, qv=qv, causal=True)
mi.flash_attn_varlen_func(q[:, :3], k, v, qv=qv[:, :3], num_splits=3, pack_gqa=True, softcap=8.0)
cu_q, cu_k = T.random_cu_seqlens([5, 0, 33]).to(dev), T.random_cu_seqlens([17, 9, 50]).to(dev)
mi.flash_attn_varlen_func(r(38, 4, 48), r(76, 2, 48), r(76, 2, 200), cu_q, cu_k, 33, 50, qv=r(38, 4, 200),
                          window_size=(20, 3))
kd, vd = torch.randn(3, 70, 2, 64, dtype=bf16), torch.randn(3, 70, 2, 512, dtype=bf16)
kp, vp, pt = T.make_paged_kv(kd, vd, [70, 1, 33], 16)
mi.flash_attn_with_kvcache(r(3, 2, 4, 64), kp.to(dev), vp.to(dev), qv=r(3, 2, 4, 512),
                           cache_seqlens=torch.tensor([70, 1, 33], dtype=torch.int32, device=dev),
                           page_table=pt.to(dev), causal=True, num_splits=0)
torch.cuda.synchronize()
print("sanitize_qv: done")
