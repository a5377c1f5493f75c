"""A small set of dense bf16 MLA decode calls routed to the Hopper MLA kernel (arch/sm90) for
compute-sanitizer:
    compute-sanitizer --tool memcheck python3 scripts/sanitize_sm90_mla.py
Needs a compute capability 9.0 GPU and a build with the sm90 kernels; otherwise it says so and
exits 0 (the calls would take the mma.sync path)."""
import os

os.environ["MATE_OPS_MLA_PATH"] = "sm90"  # read by the extension at its first MLA launch

import torch  # noqa: E402

import mate_ops  # noqa: E402,F401
from mate_ops import testing as T  # noqa: E402

if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
    print("sanitize_sm90_mla: needs a compute capability 9.0 GPU; nothing run")
    raise SystemExit(0)
g = torch.Generator().manual_seed(0)


def call(lens, hq, sq=1, hkv=1, page=64, causal=False):
    dense = torch.randn(len(lens), max(lens + [1]), hkv, 576, generator=g).to(torch.bfloat16)
    kc, _, table = T.make_paged_kv(dense, dense[..., :1], lens, page, generator=g)
    q = torch.randn(len(lens), sq, hq, 576, generator=g).to(torch.bfloat16)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    torch.ops.mate.mla_decode(q.cuda(), kc.cuda(), table.cuda(), seqlens.cuda(), 512, None, None, None, causal)


call([1, 63, 65, 1000], hq=128)                 # split over parts, ragged last tiles
call([0, 1, 0, 65], hq=16, sq=2, causal=True)   # empty caches, a row with no key
call([5, 100, 300], hq=64, hkv=2, sq=2, page=128, causal=True)
call([3, 40, 64, 9] * 20, hq=128, page=256)     # many short sequences per part
torch.cuda.synchronize()
print("sanitize_sm90_mla: done")
