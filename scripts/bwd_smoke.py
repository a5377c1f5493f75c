"""Device backward smoke check (dev aid): cuda fmha_bwd vs the CPU kernel on the same values,
then backward timing beside SDPA. python3 scripts/bwd_smoke.py"""
import os
import sys
import torch
import mate_ops  # noqa: F401

M = torch.ops.mate
dev = os.environ.get("DEV", "cuda")
torch.manual_seed(0)
fails = 0


def run(name, B, Sq, Sk, H, Hk, D, Dv, dtype, ragged=False, seqused=False, sink=False, alibi=False, lse_grad=False,
        **kw):
    global fails
    g = torch.Generator().manual_seed(hash(name) % 1000)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype).to(dev)  # noqa: E731
    extra = {}
    if ragged:
        lq = torch.randint(1, Sq + 1, (B,), generator=g)
        lk = torch.randint(1, Sk + 1, (B,), generator=g)
        cq = torch.cat([torch.zeros(1, dtype=torch.int64), lq.cumsum(0)]).int()
        ck = torch.cat([torch.zeros(1, dtype=torch.int64), lk.cumsum(0)]).int()
        q, k, v = mk(int(cq[-1]), H, D), mk(int(ck[-1]), Hk, D), mk(int(ck[-1]), Hk, Dv)
        extra.update(cu_seqlens_q=cq.to(dev), cu_seqlens_k=ck.to(dev), max_seqlen_q=int(lq.max()),
                     max_seqlen_k=int(lk.max()))
    else:
        q, k, v = mk(B, Sq, H, D), mk(B, Sk, Hk, D), mk(B, Sk, Hk, Dv)
    if seqused:
        extra.update(seqused_q=torch.randint(0, Sq + 1, (B,), generator=g).int().to(dev),
                     seqused_k=torch.randint(1, Sk + 1, (B,), generator=g).int().to(dev))
    if sink:
        extra["learnable_sink"] = torch.randn(H, generator=g).to(dev)
    if alibi:
        extra["alibi_slopes"] = (torch.rand(H, generator=g) * 0.3).to(dev)
    extra.update(kw)
    out, lse = M.fmha_fwd(q, k, v, **extra)
    dout = mk(*out.shape)
    dlse = torch.randn(lse.shape, generator=g).to(dev) if lse_grad else None
    res = M.fmha_bwd(dout, q, k, v, out, lse, dlse, **extra)
    if dev == "cuda":
        torch.cuda.synchronize()
    cpu = lambda t: t.cpu() if isinstance(t, torch.Tensor) else t  # noqa: E731
    ex_cpu = {a: cpu(b) for a, b in extra.items()}
    ref = M.fmha_bwd(dout.float().cpu(), q.float().cpu(), k.float().cpu(), v.float().cpu(), out.float().cpu(),
                     lse.cpu(), None if dlse is None else dlse.cpu(), **ex_cpu)
    errs = []
    for nm, a, r in zip(("dq", "dk", "dv", "dsink"), res, ref):
        if r.numel() == 0:
            continue
        a = a.float().cpu()
        scale = r.abs().max().item() or 1.0
        e = ((a - r).abs().max().item()) / scale
        bad = not (e < (2e-2 if dtype != torch.float32 else 1e-4)) or not torch.isfinite(a).all()
        errs.append(f"{nm} {e:.1e}{' BAD' if bad else ''}")
        fails += bad
    # determinism
    res2 = M.fmha_bwd(dout, q, k, v, out, lse, dlse, **extra)
    same = all(torch.equal(x, y) for x, y in zip(res, res2))
    fails += not same
    print(f"{name:40s} {' '.join(errs)} {'deterministic' if same else 'NONDETERMINISTIC'}", flush=True)


bf, fp, f32 = torch.bfloat16, torch.float16, torch.float32
run("d64 full", 2, 130, 257, 4, 4, 64, 64, bf)
run("d64 causal", 2, 257, 130, 4, 4, 64, 64, bf, causal=True)
run("d128 causal gqa", 2, 300, 300, 8, 2, 128, 128, bf, causal=True)
run("d128 fp16 window", 2, 200, 333, 4, 1, 128, 128, fp, window_size_left=37, window_size_right=5)
run("d96 ragged", 3, 150, 170, 4, 2, 96, 96, bf, ragged=True)
run("d192x128 causal", 2, 190, 190, 4, 4, 192, 128, bf, causal=True)
run("d256", 2, 100, 140, 4, 2, 256, 256, bf)
run("d256 causal fp16", 1, 257, 257, 2, 2, 256, 256, fp, causal=True)
run("d40x72 seqused", 3, 90, 120, 4, 2, 40, 72, bf, seqused=True)
run("d8", 2, 65, 63, 2, 1, 8, 8, fp)
run("softcap alibi sink lse", 2, 150, 170, 8, 2, 128, 128, bf, softcap=8.0, alibi=True, sink=True, lse_grad=True,
    causal=True)
run("chunk ragged sink", 3, 130, 130, 4, 4, 64, 64, fp, ragged=True, sink=True, attention_chunk=48)
run("fp32 fallback", 2, 70, 90, 4, 2, 64, 48, f32, causal=True)
run("d320 fallback", 1, 40, 50, 2, 1, 320, 320, bf)
run("fp32 softcap alibi", 2, 50, 60, 4, 2, 32, 32, f32, softcap=5.0, alibi=True)
print("FAILS", fails, flush=True)

if "--bench" in sys.argv:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def timeit(fn, iters=10):
        fn()
        torch.cuda.synchronize()
        st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        st.record()
        for _ in range(iters):
            fn()
        en.record()
        torch.cuda.synchronize()
        return st.elapsed_time(en) / iters / 1e3

    print("| bwd (TFLOP/s) | ours | flash | cudnn | ours/flash | ours/cudnn |")
    for D in (64, 128, 256):
        for S in (512, 2048, 8192):
            for causal in (False, True):
                B, H = 16384 // S, 2048 // D
                q = torch.randn(B, S, H, D, device=dev, dtype=bf, requires_grad=True)
                k = torch.randn(B, S, H, D, device=dev, dtype=bf, requires_grad=True)
                v = torch.randn(B, S, H, D, device=dev, dtype=bf, requires_grad=True)
                out, lse = M.fmha_fwd(q.detach(), k.detach(), v.detach(), causal=causal)
                dout = torch.randn_like(out)
                flops = 2.5 * 4 * B * H * S * S * D / (2 if causal else 1)
                t = timeit(lambda: M.fmha_bwd(dout, q.detach(), k.detach(), v.detach(), out, lse, causal=causal))
                row = [flops / t / 1e12]
                qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
                for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
                    try:
                        with sdpa_kernel(be):
                            o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                            do = dout.transpose(1, 2)
                            tt = timeit(lambda: torch.autograd.grad(o, (qt, kt, vt), do, retain_graph=True))
                        row.append(flops / tt / 1e12)
                    except Exception as e:  # noqa: BLE001
                        row.append(float("nan"))
                print(f"| D{D} S{S} {'causal' if causal else 'full'} | {row[0]:.1f} | {row[1]:.1f} | {row[2]:.1f} | "
                      f"{row[0] / row[1]:.2f} | {row[0] / row[2]:.2f} |", flush=True)
                del q, k, v, out, lse, dout, qt, kt, vt
sys.exit(1 if fails else 0)
