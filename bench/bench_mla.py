"""MLA benchmark on the GPU (device machine): our decode / sparse prefill beside the peers of
issue 11 in one run. Prints markdown tables.

    python3 bench/bench_mla.py [--quick]          (also: python3 bench/bench_gpu.py --only mla)

- Dense decode (compute-bound at Hq 128): TFLOP/s = 2 B Sq Hq Sk (576 + 512) / time, beside a
  plain-torch MLA decode on a dense latent cache (bmm -> fp32 softmax -> bmm) and the measured
  bf16 matmul ceiling. Paged cache, page 64, bf16, not causal.
- Memory-bound decode (Hq 16): GB/s of cache bytes touched (every selected token's bytes once
  per query row; dense: the whole cache) beside the measured copy bandwidth.
- Sparse prefill: TFLOP/s (same FLOP count, Sk = topk) beside the matmul ceiling.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu import copy_bandwidth, timed  # noqa: E402

import mate_ops  # noqa: E402,F401
from mate_ops import flash_mla as fm  # noqa: E402
from mate_ops.flashmla import quantize_k_cache  # noqa: E402

BF16 = torch.bfloat16


def matmul_ceiling():
    a = torch.randn(8192, 8192, dtype=BF16, device="cuda")
    t = timed(lambda: a @ a, reps=5, inner=3)
    return 2 * 8192**3 / t / 1e12


def mla_flops(rows, keys):
    return 2.0 * rows * keys * (576 + 512)


def paged(B, Sk, P=64, width=576, dtype=BF16):
    pages = B * Sk // P
    cache = torch.randn(pages, P, 1, width, dtype=dtype, device="cuda")
    table = torch.randperm(pages, dtype=torch.int32, device="cuda").view(B, Sk // P)
    lens = torch.full((B,), Sk, dtype=torch.int32, device="cuda")
    return cache, table, lens


def torch_mla(q, k_dense, scale):
    """Plain torch: q (B, Sq*Hq, 576), k (B, Sk, 576) -> (B, Sq*Hq, 512)."""
    s = torch.bmm(q, k_dense.transpose(1, 2))
    p = torch.softmax(s.float() * scale, dim=-1).to(BF16)
    return torch.bmm(p, k_dense[..., :512])


def dense_table(quick, ceiling):
    print("\n| dense decode bf16, Hq 128, page 64 | ours TFLOP/s | plain torch TFLOP/s | ours / torch | "
          "ours / matmul ceiling |")
    print("|---|---|---|---|---|")
    shapes = [(64, 1, 4096), (128, 2, 8192)] if quick else [
        (B, Sq, Sk) for B in (64, 128) for Sq in (1, 2) for Sk in (4096, 8192)]
    for B, Sq, Sk in shapes:
        Hq = 128
        cache, table, lens = paged(B, Sk)
        q = torch.randn(B, Sq, Hq, 576, dtype=BF16, device="cuda")
        t = timed(lambda: fm.flash_mla_with_kvcache(q, cache, table, lens, 512, None, None))
        flops = mla_flops(B * Sq * Hq, Sk)
        # the same keys as a dense (B, Sk, 576) tensor for the plain-torch peer
        k_dense = cache[table.long()].reshape(B, Sk, 576)
        qd = q.reshape(B, Sq * Hq, 576)
        tt = timed(lambda: torch_mla(qd, k_dense, 576**-0.5))
        ours, peer = flops / t / 1e12, flops / tt / 1e12
        print(f"| B {B}, Sq {Sq}, Sk {Sk} | {ours:.0f} | {peer:.0f} | {ours / peer:.2f}x | {ours / ceiling:.2f} |")
        del cache, table, k_dense
        torch.cuda.empty_cache()


def memory_table(quick, bw):
    print("\n| memory-bound decode, Hq 16 | ours GB/s | copy GB/s | ours / copy | ours TFLOP/s |")
    print("|---|---|---|---|---|")
    B, Hq = 64, 16
    # dense bf16, Sk 8192
    Sk = 8192
    cache, table, lens = paged(B, Sk)
    q = torch.randn(B, 1, Hq, 576, dtype=BF16, device="cuda")
    t = timed(lambda: fm.flash_mla_with_kvcache(q, cache, table, lens, 512, None, None))
    nbytes = B * Sk * 576 * 2
    print(f"| dense bf16, B {B}, Sk {Sk} | {nbytes / t / 1e9:.0f} | {bw:.0f} | {nbytes / t / 1e9 / bw:.2f} | "
          f"{mla_flops(B * Hq, Sk) / t / 1e12:.0f} |")
    del cache, table
    # sparse top-k over FP8 caches (each query row selects topk distinct tokens)
    topk = 2048
    for layout, dqk, token_bytes in (("v32", 576, 656), ("model1", 512, 584)):
        pages = B * 8192 // 64
        kv = torch.randn(pages, 64, 1, dqk, dtype=BF16, device="cuda")
        cache = quantize_k_cache(kv, layout)
        del kv
        q = torch.randn(B, 1, Hq, dqk, dtype=BF16, device="cuda")
        idx = torch.stack([torch.randperm(pages * 64, device="cuda")[:topk] for _ in range(B)]).to(torch.int32)
        idx = idx.view(B, 1, topk)
        t = timed(lambda: fm.flash_mla_with_kvcache(q, cache, None, None, 512, None, None, is_fp8_kvcache=True,
                                                    indices=idx))
        nbytes = B * topk * token_bytes
        print(f"| sparse FP8 {layout}, B {B}, topk {topk} | {nbytes / t / 1e9:.0f} | {bw:.0f} | "
              f"{nbytes / t / 1e9 / bw:.2f} | {mla_flops(B * Hq, topk) / t / 1e12:.0f} |")
        del cache
        torch.cuda.empty_cache()
    if not quick:  # sparse FP8 at Hq 128: compute-bound again
        pages = B * 8192 // 64
        cache = quantize_k_cache(torch.randn(pages, 64, 1, 576, dtype=BF16, device="cuda"), "v32")
        q = torch.randn(B, 1, 128, 576, dtype=BF16, device="cuda")
        idx = torch.randint(0, pages * 64, (B, 1, topk), dtype=torch.int32, device="cuda")
        t = timed(lambda: fm.flash_mla_with_kvcache(q, cache, None, None, 512, None, None, is_fp8_kvcache=True,
                                                    indices=idx))
        print(f"| sparse FP8 v32, Hq 128, B {B}, topk {topk} | {B * topk * 656 / t / 1e9:.0f} | {bw:.0f} | "
              f"{B * topk * 656 / t / 1e9 / bw:.2f} | {mla_flops(B * 128, topk) / t / 1e12:.0f} |")


def prefill_table(quick, ceiling):
    print("\n| sparse prefill bf16, Hq 128 | ours TFLOP/s | ours / matmul ceiling |")
    print("|---|---|---|")
    Sq, topk, Skv, Hq = (1024 if quick else 4096), 2048, 8192, 128
    q = torch.randn(Sq, Hq, 576, dtype=BF16, device="cuda")
    kv = torch.randn(Skv, 1, 576, dtype=BF16, device="cuda")
    idx = torch.randint(0, Skv, (Sq, 1, topk), dtype=torch.int32, device="cuda")
    t = timed(lambda: fm.flash_mla_sparse_fwd(q, kv, idx, 576**-0.5, 512), reps=5, inner=2)
    ours = mla_flops(Sq * Hq, topk) / t / 1e12
    print(f"| Sq {Sq}, topk {topk} | {ours:.0f} | {ours / ceiling:.2f} |")


def main(quick=False):
    torch.manual_seed(0)
    ceiling = matmul_ceiling()
    bw = copy_bandwidth()
    print(f"\nMLA: bf16 matmul ceiling {ceiling:.0f} TFLOP/s, copy bandwidth {bw:.0f} GB/s")
    dense_table(quick, ceiling)
    memory_table(quick, bw)
    prefill_table(quick, ceiling)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    main(a.quick)
