"""A small set of calls routed to the Hopper FMHA kernel (arch/sm90) for compute-sanitizer:
    compute-sanitizer --tool memcheck python3 scripts/sanitize_sm90.py
Needs a compute capability 9.0 GPU and a build with the sm90 kernels; otherwise it says so
and exits 0 (the calls would take the mma.sync path)."""
import os

os.environ["MATE_OPS_FMHA_PATH"] = "sm90"  # read by the extension at its first forward launch

import torch  # noqa: E402

import mate_ops  # noqa: E402,F401

if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
    print("sanitize_sm90: needs a compute capability 9.0 GPU; nothing run")
    raise SystemExit(0)
M = torch.ops.mate
dev, bf16 = "cuda", torch.bfloat16
g = torch.Generator(device=dev).manual_seed(0)


def call(B, Sq, Sk, H, Hk, D, Dv, dtype=bf16, **kw):
    q = torch.randn(B, Sq, H, D, device=dev, dtype=dtype, generator=g)
    k = torch.randn(B, Sk, Hk, D, device=dev, dtype=dtype, generator=g)
    v = torch.randn(B, Sk, Hk, Dv, device=dev, dtype=dtype, generator=g)
    M.fmha_fwd(q, k, v, num_splits=1, **kw)


call(2, 129, 300, 4, 2, 128, 128, causal=True)
call(1, 70, 65, 2, 1, 64, 64, window_size_left=20, window_size_right=3)
call(1, 129, 130, 2, 2, 256, 256, learnable_sink=torch.randn(2, device=dev))
call(1, 100, 1100, 2, 1, 256, 256, causal=True)  # past 1024 keys: width 256's 80-key tiles
call(1, 65, 200, 2, 1, 192, 128, softcap=5.0, alibi_slopes=torch.rand(2, device=dev))
call(1, 33, 40, 2, 2, 96, 96, dtype=torch.float16)
cu = torch.tensor([0, 1, 130, 300], dtype=torch.int32, device=dev)
qr = torch.randn(300, 4, 128, device=dev, dtype=bf16, generator=g)
kr = torch.randn(300, 2, 128, device=dev, dtype=bf16, generator=g)
M.fmha_fwd(qr, kr, kr, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=170, max_seqlen_k=170, causal=True,
           num_splits=1)
# paged K / V (page 128: whole key tiles), left padding, NaN in every unused slot
from mate_ops import testing as T  # noqa: E402
kd = torch.randn(2, 300, 2, 128, dtype=bf16)
kp, vp, pt = T.make_paged_kv(kd, kd, [300, 140], 128)
M.fmha_fwd(torch.randn(2, 150, 4, 128, device=dev, dtype=bf16, generator=g), kp.to(dev), vp.to(dev),
           page_table=pt.to(dev), seqused_k=torch.tensor([300, 140], dtype=torch.int32, device=dev),
           cache_leftpad=torch.tensor([3, 130], dtype=torch.int32, device=dev), causal=True, num_splits=1)
# pages smaller than the key tile: 16-key TMA boxes, one page each, boxes past the last page
kp, vp, pt = T.make_paged_kv(kd, kd, [300, 140], 16)
M.fmha_fwd(torch.randn(2, 150, 4, 128, device=dev, dtype=bf16, generator=g), kp.to(dev), vp.to(dev),
           page_table=pt.to(dev), seqused_k=torch.tensor([300, 140], dtype=torch.int32, device=dev),
           cache_leftpad=torch.tensor([3, 20], dtype=torch.int32, device=dev), causal=True, num_splits=1)
# fp8 e4m3 on fp8 wgmma (V staged transposed, launch.cpp; D 96, 128 and 256), descales per
# (batch, kv head); ragged q/k; D 72 staged as bf16
f8 = torch.float8_e4m3fn
ds = torch.rand(2, 2, device=dev) + 0.5
q8, k8, v8 = (torch.randn(2, 150, H, 96, device=dev, generator=g).to(f8) for H in (4, 2, 2))
M.fmha_fwd(q8, k8, v8, causal=True, q_descale=ds, k_descale=ds, v_descale=ds, num_splits=1)
cu8 = torch.tensor([0, 130, 300], dtype=torch.int32, device=dev)
qr8, kr8 = qr.to(f8), kr.to(f8)
M.fmha_fwd(qr8, kr8, kr8, cu_seqlens_q=cu8, cu_seqlens_k=cu8, max_seqlen_q=170, max_seqlen_k=170, q_descale=ds,
           v_descale=ds, num_splits=1)
q8, k8, v8 = (torch.randn(2, S, H, 256, device=dev, generator=g).to(f8) for S, H in ((77, 2), (205, 1), (205, 1)))
M.fmha_fwd(q8, k8, v8, window_size_left=60, window_size_right=10, q_descale=ds[:, :1], k_descale=ds[:, :1],
           num_splits=1)
q8, k8, v8 = (torch.randn(1, 140, H, 72, device=dev, generator=g).to(f8) for H in (2, 2, 2))
M.fmha_fwd(q8, k8, v8, causal=True, num_splits=1)
torch.cuda.synchronize()
print("sanitize_sm90: done")
