"""Per-call eager time of our Python entry points beside torch SDPA on the same tensors.

On a GPU the shapes are small enough that a call costs what the host spends on it (Python
wrapper, argument parsing, dispatcher, launch): the number that decides whether users can
call us eagerly in a decode loop. On the CPU the same calls run on tiny shapes, where host
time dominates too.

    python3 bench/bench_overhead.py                 # cuda if available, else cpu
    python3 bench/bench_overhead.py --device cpu
    python3 bench/bench_overhead.py --profile       # also: where our decode call spends its time

Rows:
- decode: flash_attn_with_kvcache(q (B,1,H,D), dense cache of Sk keys, cache_seqlens tensor)
  vs SDPA(q, k, v) on the same cache viewed as (B, Hk, Sk, D) with enable_gqa.
- prefill: flash_attn_varlen_func on one ragged sequence of S tokens (causal) vs SDPA on the
  same tokens viewed dense.
"""
import argparse
import time

import torch
import torch.nn.functional as F

import mate_ops  # noqa: F401
from mate_ops.mha_interface import flash_attn_varlen_func, flash_attn_with_kvcache


def per_call_us(fn, device, iters, warmup=50):
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):  # best of 5 rounds: the least disturbed by other processes
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / iters * 1e6)
    return best


def decode_case(device, dtype, B, Sk, H, Hk, D):
    q = torch.randn(B, 1, H, D, device=device, dtype=dtype)
    k_cache = torch.randn(B, Sk, Hk, D, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    seqlens = torch.full((B,), Sk, dtype=torch.int32, device=device)
    kt, vt, qt = k_cache.transpose(1, 2), v_cache.transpose(1, 2), q.transpose(1, 2)

    def ours():
        return flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens)

    def sdpa():
        return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)

    return ours, sdpa


def prefill_case(device, dtype, S, H, Hk, D):
    q = torch.randn(S, H, D, device=device, dtype=dtype)
    k = torch.randn(S, Hk, D, device=device, dtype=dtype)
    v = torch.randn_like(k)
    cu = torch.tensor([0, S], dtype=torch.int32, device=device)
    qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]

    def ours():
        return flash_attn_varlen_func(q, k, v, cu, cu, S, S, causal=True)

    def sdpa():
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)

    return ours, sdpa


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=0)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    iters = args.iters or (2000 if gpu else 500)
    if gpu:  # the shapes
        rows = [("decode B1 Sk256 H32/8 D128", decode_case(device, dtype, 1, 256, 32, 8, 128)),
                ("varlen one 128-token seq H32/8 D128 causal", prefill_case(device, dtype, 128, 32, 8, 128))]
    else:  # tiny: host time dominates
        rows = [("decode B1 Sk16 H4/2 D32", decode_case(device, dtype, 1, 16, 4, 2, 32)),
                ("varlen one 16-token seq H4/2 D32 causal", prefill_case(device, dtype, 16, 4, 2, 32))]
    name = torch.cuda.get_device_name() if gpu else "CPU"
    print(f"per-call eager time, {name}, torch {torch.__version__}, {dtype}, {iters} calls x best of 5")
    print(f"{'case':<44} {'ours us':>9} {'SDPA us':>9} {'ours/SDPA':>10}")
    with torch.inference_mode():
        for label, (ours, sdpa) in rows:
            t_ours, t_sdpa = per_call_us(ours, device, iters), per_call_us(sdpa, device, iters)
            print(f"{label:<44} {t_ours:9.1f} {t_sdpa:9.1f} {t_ours / t_sdpa:9.2f}x")
        if args.profile:  # where our decode call spends its host time: Python, then the op's C++ side
            import cProfile
            import pstats

            ours = rows[0][1][0]
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(iters):
                ours()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(8)
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as p:
                for _ in range(200):
                    ours()
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))

if __name__ == "__main__":
    main()
