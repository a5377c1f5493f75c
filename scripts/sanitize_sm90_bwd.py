"""A small set of backward calls routed to the Hopper FMHA backward kernels (arch/sm90/
fmha_bwd_sm90.cuh) for compute-sanitizer:
    compute-sanitizer --tool memcheck python3 scripts/sanitize_sm90_bwd.py
    compute-sanitizer --tool racecheck python3 scripts/sanitize_sm90_bwd.py
    compute-sanitizer --tool synccheck python3 scripts/sanitize_sm90_bwd.py
Needs a compute capability 9.0 GPU and a build with the sm90 kernels; otherwise it says so
and exits 0 (the calls would take the mma.sync path)."""
import os

os.environ["MATE_OPS_FMHA_BWD_PATH"] = "sm90"  # (every width the sm90 kernels serve, the wide ones too)

import torch  # noqa: E402

import mate_ops  # noqa: E402,F401

if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
    print("sanitize_sm90_bwd: needs a compute capability 9.0 GPU; nothing run")
    raise SystemExit(0)
M = torch.ops.mate
dev, bf16 = "cuda", torch.bfloat16
g = torch.Generator(device=dev).manual_seed(0)


def call(B, Sq, Sk, H, Hk, D, Dv, dtype=bf16, **kw):
    q = torch.randn(B, Sq, H, D, device=dev, dtype=dtype, generator=g)
    k = torch.randn(B, Sk, Hk, D, device=dev, dtype=dtype, generator=g)
    v = torch.randn(B, Sk, Hk, Dv, device=dev, dtype=dtype, generator=g)
    out, lse = M.fmha_fwd(q, k, v, **kw)
    M.fmha_bwd(torch.randn_like(out), q, k, v, out, lse, **kw)


call(2, 129, 300, 4, 2, 128, 128, causal=True)
call(1, 70, 65, 2, 1, 64, 64, window_size_left=20, window_size_right=3)
call(1, 257, 130, 8, 2, 128, 128, causal=True, attention_chunk=48, learnable_sink=torch.randn(8, device=dev))
call(1, 65, 200, 2, 1, 128, 128, softcap=5.0, alibi_slopes=torch.rand(2, device=dev))
call(1, 33, 40, 2, 2, 40, 72, dtype=torch.float16)
# the wide widths: 192 x 128 (32-row steps), 256 (dV / dK passes, 48-row steps, 48-key dQ tiles)
call(1, 97, 200, 4, 2, 192, 128, causal=True)
call(1, 130, 97, 4, 1, 160, 96, window_size_left=37, window_size_right=5, dtype=torch.float16)
call(1, 97, 200, 4, 2, 256, 256, causal=True, learnable_sink=torch.randn(4, device=dev))
call(1, 49, 130, 2, 1, 256, 256, softcap=5.0, alibi_slopes=torch.rand(2, device=dev))
cu = torch.tensor([0, 1, 130, 300], dtype=torch.int32, device=dev)
qr = torch.randn(300, 4, 128, device=dev, dtype=bf16, generator=g)
kr = torch.randn(300, 2, 128, device=dev, dtype=bf16, generator=g)
kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=170, max_seqlen_k=170, causal=True)
out, lse = M.fmha_fwd(qr, kr, kr, **kw)
M.fmha_bwd(torch.randn_like(out), qr, kr, kr, out, lse, **kw)
torch.cuda.synchronize()
print("sanitize_sm90_bwd: done")
