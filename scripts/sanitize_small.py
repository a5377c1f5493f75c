"""A small set of device calls for `compute-sanitizer --tool memcheck` (scripts/device_run.sh):
dense, varlen, paged, splits + merge, decode path, append + rotary, combine, and MLA (dense split
over parts, sparse with the extra cache, both FP8 layouts, sparse prefill, the portable path)."""
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
# MLA
from mate_ops import flash_mla as fm
mlens = torch.tensor([700, 0, 65], dtype=torch.int32, device=dev)
mtable = torch.randperm(36, dtype=torch.int32, device=dev).view(3, 12)
mcache = torch.randn(36, 64, 1, 576, dtype=bf16, device=dev)
mq = torch.randn(3, 2, 64, 576, dtype=bf16, device=dev)
fm.flash_mla_with_kvcache(mq, mcache, mtable, mlens, 512, *fm.get_mla_metadata(mlens, 128, 1), causal=True)
fm.flash_mla_with_kvcache(mq.float(), mcache.float(), mtable, mlens, 512, None, None)  # portable kernel
midx = torch.randint(-1, 36 * 64 + 9, (3, 2, 100), dtype=torch.int32, device=dev)
ecache = torch.randn(2, 16, 1, 576, dtype=bf16, device=dev)
eidx = torch.randint(-1, 40, (3, 2, 9), dtype=torch.int32, device=dev)
fm.flash_mla_with_kvcache(mq[:, :, :16], mcache, None, None, 512, None, None, indices=midx,
                          extra_k_cache=ecache, extra_indices_in_kvcache=eidx,
                          attn_sink=torch.randn(16, device=dev))
for layout, dqk in (("v32", 576), ("model1", 512)):
    qc = fm.quantize_k_cache(torch.randn(6, 64, 1, dqk, dtype=bf16), layout).to(dev)
    fm.flash_mla_with_kvcache(torch.randn(2, 1, 128, dqk, dtype=bf16, device=dev), qc, None, None, 512, None, None,
                              is_fp8_kvcache=True, indices=torch.randint(-1, 6 * 64, (2, 1, 70), dtype=torch.int32,
                                                                         device=dev))
kv = torch.randn(300, 1, 576, dtype=bf16, device=dev)
fm.flash_mla_sparse_fwd(torch.randn(20, 128, 576, dtype=bf16, device=dev), kv,
                        torch.randint(-1, 305, (20, 1, 90), dtype=torch.int32, device=dev), 0.05, 512)
torch.cuda.synchronize()
print("sanitize_small: done")
