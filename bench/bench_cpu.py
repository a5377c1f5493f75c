"""CPU benchmark: mate_ops FMHA forward vs torch.nn.functional.scaled_dot_product_attention
on the same tensors, in one run. Prints a markdown table (times, TFLOP/s, ratio).

    python3 bench/bench_cpu.py             # the table of docs/performance.md
    python3 bench/bench_cpu.py --quick     # fewer repetitions
    python3 bench/bench_cpu.py --backward  # only the backward table (docs/performance.md,
                                           # "CPU: FMHA backward")

ratio = SDPA time / our time (> 1: we are faster). FLOPs are counted as
4 * H * D * sum(Sq * Sk_eff) (QK^T and PV; causal halves Sk_eff), as in docs/design.md.
"""
import argparse
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import mate_ops  # noqa: F401
from mate_ops import mha_interface as mi
from mate_ops import testing as T


def timeit(fn, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def causal_pairs(sq, sk, causal):
    if not causal:
        return sq * sk
    return sum(min(sk, max(0, i + sk - sq + 1)) for i in range(sq))


def row(name, ours, peer, flops):
    return f"| {name} | {ours * 1e3:.1f} | {peer * 1e3:.1f} | {flops / ours / 1e9:.0f} | {flops / peer / 1e9:.0f} | {peer / ours:.2f} |"


def dense_case(B, H, S, D, causal, dtype, reps):
    q = torch.randn(B, S, H, D, dtype=dtype)
    k, v = torch.randn_like(q), torch.randn_like(q)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # SDPA's (B, H, S, D) views of the same data
    ours = timeit(lambda: mi.flash_attn_varlen_func(q, k, v, causal=causal), reps)
    peer = timeit(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal), reps)
    flops = 4 * B * H * D * causal_pairs(S, S, causal)
    name = f"B{B} H{H} S{S} D{D} {'causal' if causal else 'full'} {str(dtype).split('.')[-1]}"
    return row(name, ours, peer, flops)


def backward_case(B, H, Hk, S, D, causal, dtype, reps):
    """Backward only: dq, dk, dv of one attention call from the same forward graph, ours
    (fmha_bwd through autograd) vs SDPA's CPU backward on the same tensors (GQA via enable_gqa).
    FLOPs: 10 * H * D * pairs (five GEMMs of the size of the forward's two)."""
    q = torch.randn(B, S, H, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, S, Hk, D, dtype=dtype, requires_grad=True)
    v = torch.randn(B, S, Hk, D, dtype=dtype, requires_grad=True)
    g = torch.randn(B, S, H, D, dtype=dtype)
    out = mi.flash_attn_varlen_func(q, k, v, causal=causal)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal, enable_gqa=Hk != H).transpose(1, 2)
    ours = timeit(lambda: torch.autograd.grad(out, (q, k, v), g, retain_graph=True), reps)
    peer = timeit(lambda: torch.autograd.grad(ref, (q, k, v), g, retain_graph=True), reps)
    flops = 10 * B * H * D * causal_pairs(S, S, causal)
    gqa = f" H{H}/{Hk}" if Hk != H else f" H{H}"
    name = f"B{B}{gqa} S{S} D{D} {'causal' if causal else 'full'} {str(dtype).split('.')[-1]}"
    return row(name, ours, peer, flops)


def print_backward_table(reps):
    print("| backward (dq, dk, dv) | ours ms | SDPA ms | ours GFLOP/s | SDPA GFLOP/s | ratio |")
    print("|---|---|---|---|---|---|")
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    for case in [(1, 16, 16, 2048, 128, True, bf16), (1, 16, 16, 2048, 128, False, fp32),
                 (4, 32, 8, 512, 64, True, bf16), (2, 8, 8, 1024, 128, True, fp16),
                 (1, 16, 16, 2048, 128, True, fp32)]:
        print(backward_case(*case, reps=reps), flush=True)


def varlen_case(lens, H, D, dtype, reps):
    """Ragged batch: we run it as is; SDPA needs padding to the longest length and a mask."""
    cu = T.random_cu_seqlens(lens)
    q = torch.randn(sum(lens), H, D, dtype=dtype)
    k, v = torch.randn_like(q), torch.randn_like(q)
    B, S = len(lens), max(lens)
    pad = lambda x: torch.stack([torch.nn.functional.pad(x[cu[b]:cu[b + 1]], (0, 0, 0, 0, 0, S - lens[b]))  # noqa: E731
                                 for b in range(B)]).transpose(1, 2)
    causal_mask = torch.ones(S, S, dtype=torch.bool).tril()
    valid = torch.arange(S)[None, :] < torch.tensor(lens)[:, None]
    mask = (causal_mask[None] & valid[:, None, :])[:, None]  # (B, 1, S, S)

    ours = timeit(lambda: mi.flash_attn_varlen_func(q, k, v, cu, cu, S, S, causal=True), reps)
    peer = timeit(lambda: F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask), reps)
    flops = 4 * H * D * sum(causal_pairs(n, n, True) for n in lens)
    return row(f"varlen {lens} H{H} D{D} causal {str(dtype).split('.')[-1]} (SDPA padded)", ours, peer, flops)


def decode_case(page_size, reps, B=32, Sk=4096, H=32, Hk=8, D=128, dtype=torch.bfloat16):
    """One decode step on a paged cache: append one token + attend. Peer: gather the pages into a
    dense cache, then SDPA (with GQA) on it. GB/s counts the K and V bytes one step must read."""
    pages_per_seq = (Sk + 1 + page_size - 1) // page_size
    num_pages = B * pages_per_seq
    k_cache = torch.randn(num_pages, page_size, Hk, D, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    page_table = torch.randperm(num_pages, dtype=torch.int32).view(B, pages_per_seq)
    cache_seqlens = torch.full((B,), Sk - 1, dtype=torch.int32)
    q = torch.randn(B, 1, H, D, dtype=dtype)
    k_new, v_new = torch.randn(B, 1, Hk, D, dtype=dtype), torch.randn(B, 1, Hk, D, dtype=dtype)

    def ours():
        mi.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=cache_seqlens,
                                   page_table=page_table, causal=True)

    def peer():
        kd = k_cache[page_table.long()].flatten(1, 2)[:, :Sk].transpose(1, 2)  # (B, Hk, Sk, D)
        vd = v_cache[page_table.long()].flatten(1, 2)[:, :Sk].transpose(1, 2)
        F.scaled_dot_product_attention(q.transpose(1, 2), kd, vd, enable_gqa=True)

    t_ours, t_peer = timeit(ours, reps), timeit(peer, reps)
    nbytes = 2 * B * Sk * Hk * D * k_cache.element_size()
    return (f"| paged decode P{page_size} B{B} Sk{Sk} H{H}/{Hk} D{D} bf16 | {t_ours * 1e3:.1f} | {t_peer * 1e3:.1f} | "
            f"{nbytes / t_ours / 1e9:.1f} | {nbytes / t_peer / 1e9:.1f} | {t_peer / t_ours:.2f} |")


def mla_case(kind, reps, B=16, Hq=128, Sk=4096, P=64, topk=2048):
    """MLA decode, one query token: dense bf16 over Sk keys, or sparse top-k over an FP8 V3.2
    cache. GB/s counts the cache bytes one step reads (Sk or topk tokens per sequence); with
    128 heads sharing every key the step is compute bound, so GFLOP/s is printed too."""
    from mate_ops import flashmla as fm

    nb = B * Sk // P
    q = torch.randn(B, 1, Hq, 576, dtype=torch.bfloat16)
    kv = torch.randn(nb, P, 1, 576, dtype=torch.bfloat16)
    lens = torch.full((B,), Sk, dtype=torch.int32)
    if kind == "dense":
        table = torch.randperm(nb, dtype=torch.int32).view(B, Sk // P)
        meta = fm.get_mla_metadata(lens, Hq, 1)
        fn = lambda: fm.flash_mla_with_kvcache(q, kv, table, lens, 512, *meta)  # noqa: E731
        nbytes = B * Sk * 576 * 2
        name = f"MLA dense decode B{B} Hq{Hq} Sk{Sk} P{P} bf16"
    else:
        cache = fm.quantize_k_cache(kv, "v32")
        idx = torch.randint(0, nb * P, (B, 1, topk), dtype=torch.int32)
        meta = fm.get_mla_metadata(lens, Hq, 1, topk=topk)
        fn = lambda: fm.flash_mla_with_kvcache(q, cache, None, lens, 512, *meta, is_fp8_kvcache=True,  # noqa: E731
                                               indices=idx)
        nbytes = B * topk * 656
        name = f"MLA sparse decode B{B} Hq{Hq} topk{topk} P{P} FP8 V3.2"
    t = timeit(fn, reps)
    keys = Sk if kind == "dense" else topk
    flops = 2 * B * Hq * keys * (576 + 512)
    return f"| {name} | {t * 1e3:.1f} | {nbytes / t / 1e9:.2f} | {flops / t / 1e9:.0f} |"


PEAK_MEMORY = r"""
import sys, time, torch, mate_ops
import torch.nn.functional as F
def hwm():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024
S, which = int(sys.argv[1]), sys.argv[2]
q = torch.randn(1, S, 4, 64, dtype=torch.bfloat16); k = torch.randn_like(q); v = torch.randn_like(q)
base = hwm(); t = time.perf_counter()
if which == 'ours':
    torch.ops.mate.fmha_fwd(q, k, v, causal=True)
else:
    F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
print(f"{hwm() - base:.0f} {time.perf_counter() - t:.2f}")
"""


def peak_memory(seqlen, which):
    res = subprocess.run([sys.executable, "-c", PEAK_MEMORY, str(seqlen), which], capture_output=True, text=True)
    if res.returncode != 0:
        return f"failed: {res.stderr.strip().splitlines()[-1]}"
    mib, secs = res.stdout.split()
    return f"peak RSS growth {mib} MiB, {secs} s"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--backward", action="store_true", help="only the backward table")
    args = ap.parse_args()
    reps = 2 if args.quick else 5
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU BLAS symbols from torch; "
          f"ratio = SDPA time / our time\n")
    if args.backward:
        print_backward_table(reps)
        return
    print("| shape | ours ms | SDPA ms | ours GFLOP/s | SDPA GFLOP/s | ratio |")
    print("|---|---|---|---|---|---|")
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    for case in [(1, 16, 2048, 128, True, bf16), (1, 16, 2048, 128, False, fp32), (4, 32, 512, 64, True, bf16),
                 (2, 8, 1024, 256, True, fp16), (1, 16, 2048, 128, True, fp32), (1, 16, 2048, 128, False, bf16)]:
        print(dense_case(*case, reps=reps), flush=True)
    print(varlen_case([1500, 200, 700, 64], 16, 128, bf16, reps), flush=True)
    print()
    print("| decode step (append 1 token + attention) | ours ms | gather + SDPA ms | ours K+V GB/s | peer K+V GB/s | ratio |")
    print("|---|---|---|---|---|---|")
    for page_size in (16, 64):
        print(decode_case(page_size, reps), flush=True)
    print()
    print("| MLA decode (one query token) | ours ms | ours cache GB/s | ours GFLOP/s |")
    print("|---|---|---|---|")
    for kind in ("dense", "sparse"):
        print(mla_case(kind, reps), flush=True)
    print()
    print_backward_table(reps)
    print()
    print(f"one 32k-token causal sequence (H4 D64 bf16), ours: {peak_memory(32768, 'ours')}")
    print(f"same with SDPA:                                  {peak_memory(32768, 'sdpa')}")


if __name__ == "__main__":
    main()
