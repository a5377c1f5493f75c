"""GPU benchmark (run on the device machine): our FMHA forward vs torch SDPA's flash
(FlashAttention-2) and cuDNN backends on the same tensors, and decode bandwidth vs the
measured device-to-device copy bandwidth. Prints one markdown table.

    python3 bench/bench_gpu.py [--quick]
"""
import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import mate_ops  # noqa: F401
from mate_ops import mha_interface as mi


def timed(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def sdpa(backend, q, k, v, causal):
    try:
        with sdpa_kernel(backend):
            return timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
    except RuntimeError:
        return float("nan")


def copy_bandwidth():
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x))
    return 2 * x.numel() / t / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    print("| case | ours | SDPA flash | SDPA cuDNN | ours / flash |")
    print("|---|---|---|---|---|")
    shapes = [(8, 2048, 128, True), (8, 2048, 128, False), (2, 8192, 128, True), (8, 2048, 64, True), (8, 2048, 256, True)]
    if args.quick:
        shapes = shapes[:2]
    H = 16
    for B, S, D, causal in shapes:
        q = torch.randn(B, S, H, D, dtype=torch.bfloat16, device="cuda")
        k, v = torch.randn_like(q), torch.randn_like(q)
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        flops = 4 * B * H * D * S * S * (0.5 if causal else 1.0)
        ours = timed(lambda: mi.flash_attn_varlen_func(q, k, v, causal=causal), reps=5)
        fl = sdpa(SDPBackend.FLASH_ATTENTION, qt, kt, vt, causal)
        cu = sdpa(SDPBackend.CUDNN_ATTENTION, qt, kt, vt, causal)
        tf = lambda t: flops / t / 1e12  # noqa: E731
        print(f"| prefill B{B} S{S} H{H} D{D} {'causal' if causal else 'full'} bf16 (TFLOP/s) | {tf(ours):.1f} | "
              f"{tf(fl):.1f} | {tf(cu):.1f} | {fl / ours:.3f} |", flush=True)
    bw = copy_bandwidth()
    for B, Sk, P in [(32, 4096, 16), (32, 4096, 64), (128, 8192, 64)]:
        Hk, Hq, D = 8, 32, 128
        pages = B * Sk // P
        kc = torch.randn(pages, P, Hk, D, dtype=torch.bfloat16, device="cuda")
        vc = torch.randn_like(kc)
        table = torch.randperm(pages, device="cuda", dtype=torch.int32).view(B, Sk // P)
        lens = torch.full((B,), Sk, dtype=torch.int32, device="cuda")
        q = torch.randn(B, 1, Hq, D, dtype=torch.bfloat16, device="cuda")
        t = timed(lambda: mi.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, page_table=table), reps=5)
        gbs = 2 * B * Sk * Hk * D * 2 / t / 1e9
        print(f"| paged decode B{B} Sk{Sk} P{P} H{Hq}/{Hk} D{D} (GB/s K+V) | {gbs:.0f} | copy {bw:.0f} | | "
              f"{gbs / bw:.3f} of copy |", flush=True)


if __name__ == "__main__":
    main()
