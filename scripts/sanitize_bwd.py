"""A small set of FMHA backward calls for compute-sanitizer (memcheck / racecheck), every
device backward route: the tensor-core dK/dV and dQ kernels (64, 128, 192 x 128 and the
256-wide two-pass tile; plain and softcap / ALiBi instantiations), the portable kernels.
    compute-sanitizer --tool racecheck python3 scripts/sanitize_bwd.py"""
import torch

import mate_ops  # noqa: F401

M = torch.ops.mate
dev, bf16 = "cuda", torch.bfloat16
g = torch.Generator(device=dev).manual_seed(0)


def call(B, Sq, Sk, H, Hk, D, Dv, dtype=bf16, **kw):
    q = torch.randn(B, Sq, H, D, device=dev, dtype=dtype, generator=g)
    k = torch.randn(B, Sk, Hk, D, device=dev, dtype=dtype, generator=g)
    v = torch.randn(B, Sk, Hk, Dv, device=dev, dtype=dtype, generator=g)
    out, lse = M.fmha_fwd(q, k, v, **kw)
    dout = torch.randn(out.shape, device=dev, dtype=out.dtype, generator=g)
    M.fmha_bwd(dout, q, k, v, out, lse, None, **kw)


call(2, 70, 90, 4, 2, 64, 64, causal=True)
call(1, 65, 130, 2, 1, 128, 128, window_size_left=20, window_size_right=3)
call(1, 40, 70, 2, 2, 192, 128, softcap=5.0, alibi_slopes=torch.rand(2, device=dev))
call(1, 33, 40, 2, 1, 256, 256, learnable_sink=torch.randn(2, device=dev), causal=True)
call(1, 20, 30, 2, 1, 40, 24, dtype=torch.float32)  # portable kernels
torch.cuda.synchronize()
print("sanitize_bwd: done")
