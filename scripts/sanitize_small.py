"""A small set of device calls for `compute-sanitizer --tool memcheck` (scripts/device_run.sh):
dense, varlen, paged, splits + merge, decode path, append + rotary, combine."""
import torch

import mate_ops  # noqa: F401
from mate_ops import mha_interface as mi
from mate_ops import testing as T

dev, bf16 = "cuda", torch.bfloat16
torch.manual_seed(0)
q, k, v = (torch.randn(2, 33, 4, 64, dtype=bf16, device=dev) for _ in range(3))
mi.flash_attn_varlen_func(q, k[:, :, :2].contiguous(), v[:, :, :2].contiguous(), causal=True, num_splits=3)
cu = T.random_cu_seqlens([5, 0, 28]).to(dev)
qr = torch.randn(33, 4, 96, dtype=bf16, device=dev)
mi.flash_attn_varlen_func(qr, qr, qr, cu, cu, 28, 28, window_size=(8, 0), softcap=10.0)
kd, vd = torch.randn(3, 70, 2, 64, dtype=bf16), torch.randn(3, 70, 2, 64, dtype=bf16)
kp, vp, pt = T.make_paged_kv(kd, vd, [70, 1, 33], 16)
kp, vp, pt = kp.to(dev), vp.to(dev), pt.to(dev)
qd = torch.randn(3, 1, 8, 64, dtype=bf16, device=dev)
lens = torch.tensor([60, 0, 30], dtype=torch.int32, device=dev)
angle = torch.rand(128, 16, device=dev)
mi.flash_attn_with_kvcache(qd, kp, vp, torch.randn(3, 1, 2, 64, dtype=bf16, device=dev),
                           torch.randn(3, 1, 2, 64, dtype=bf16, device=dev), rotary_cos=angle.cos().to(bf16),
                           rotary_sin=angle.sin().to(bf16), cache_seqlens=lens, page_table=pt, causal=True, num_splits=0)
op, lp = torch.randn(3, 2, 4, 8, 64, device=dev), torch.randn(3, 2, 4, 8, device=dev)
mi.flash_attn_combine(op, lp, out_dtype=bf16)
torch.cuda.synchronize()
print("sanitize_small: done")
