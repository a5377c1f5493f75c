"""mate_ops demo: exercises the ops (FMHA, kv-cache decode, combine, MLA, the backward),
compiles a small model with fullgraph=True and prints every result against the pure-PyTorch
oracle (mate_ops.testing).

    bash scripts/demo.sh            # set up + run (README)
    python3 examples/demo.py        # run only
    python3 examples/demo.py --device cuda
"""
import argparse

import torch

import mate_ops
from mate_ops import mha_interface as mi
from mate_ops import testing as T


def report(name, out, ref):
    err = (out.float().cpu() - ref.float()).abs().max().item()
    print(f"  {name:<44} max |ours - oracle| = {err:.2e}")
    return err


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    dev = ap.parse_args().device
    torch.manual_seed(0)
    bf16 = torch.bfloat16
    print(f"mate_ops {mate_ops.__version__}, torch {torch.__version__}, device {dev}")
    ops = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("mate::"))
    print(f"torch.ops.mate: {', '.join(ops)}")
    errors = []

    print("FMHA forward (bf16 vs fp64 oracle)")
    q, k, v = torch.randn(2, 128, 8, 64, dtype=bf16), torch.randn(2, 256, 2, 64, dtype=bf16), torch.randn(2, 256, 2, 64, dtype=bf16)
    out = mi.flash_attn_varlen_func(q.to(dev), k.to(dev), v.to(dev), causal=True)
    errors.append(report("dense causal GQA 8/2", out, T.fmha_ref(q, k, v, causal=True)[0]))

    lens_q, lens_k = [7, 100, 1], [50, 300, 33]
    cu_q, cu_k = T.random_cu_seqlens(lens_q), T.random_cu_seqlens(lens_k)
    qr, kr, vr = torch.randn(sum(lens_q), 8, 128, dtype=bf16), torch.randn(sum(lens_k), 8, 128, dtype=bf16), torch.randn(sum(lens_k), 8, 128, dtype=bf16)
    out, lse = mi.flash_attn_varlen_func(qr.to(dev), kr.to(dev), vr.to(dev), cu_q.to(dev), cu_k.to(dev), max(lens_q),
                                         max(lens_k), causal=True, window_size=(64, 0), return_softmax_lse=True)
    ref, ref_lse = T.fmha_ref(qr, kr, vr, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True, window_size=(64, 0))
    errors.append(report("varlen causal + sliding window 64", out, ref))
    errors.append(report("  its lse", lse, ref_lse))

    seqlens = [90, 300]
    kd, vd = torch.randn(2, 300, 4, 64, dtype=bf16), torch.randn(2, 300, 4, 64, dtype=bf16)
    kp, vp, pt = T.make_paged_kv(kd, vd, seqlens, page_size=16)
    qd = torch.randn(2, 1, 16, 64, dtype=bf16)
    used = torch.tensor(seqlens, dtype=torch.int32)
    out = mi.flash_attn_varlen_func(qd.to(dev), kp.to(dev), vp.to(dev), seqused_k=used.to(dev), page_table=pt.to(dev),
                                    num_splits=0, softcap=30.0)
    errors.append(report("paged decode (page 16), split-KV, softcap", out,
                         T.fmha_ref(qd, kp, vp, seqused_k=used, page_table=pt, softcap=30.0)[0]))

    sink = torch.randn(8)
    out = mi.flash_attn_varlen_func(q.to(dev), k.to(dev), v.to(dev), learnable_sink=sink.to(dev), num_splits=3)
    errors.append(report("learnable sink, 3 splits", out, T.fmha_ref(q, k, v, learnable_sink=sink)[0]))

    print("flash_attn_with_kvcache: paged cache, append 1 token with NeoX rotary, then attend")
    kd, vd = torch.randn(2, 128, 2, 64, dtype=bf16), torch.randn(2, 128, 2, 64, dtype=bf16)
    kc, vc, pt = T.make_paged_kv(kd, vd, [128, 128], page_size=16)
    lens = torch.tensor([40, 99], dtype=torch.int32)
    qn, kn, vn = torch.randn(2, 1, 8, 64, dtype=bf16), torch.randn(2, 1, 2, 64, dtype=bf16), torch.randn(2, 1, 2, 64, dtype=bf16)
    angle = torch.rand(256, 16, dtype=torch.float64) * 6.28
    cos, sin = angle.cos().to(bf16), angle.sin().to(bf16)
    kc_exp, vc_exp = T.kvcache_append_ref(kc, vc, kn, vn, lens, page_table=pt, rotary_cos=cos, rotary_sin=sin,
                                          rotary_interleaved=False)
    q_rot = T.rotary_ref(qn.flatten(0, 1), cos, sin, lens.tolist(), interleaved=False).view_as(qn)
    ref = T.fmha_ref(q_rot, kc_exp, vc_exp, seqused_k=lens + 1, page_table=pt, causal=True)[0]
    kc_d, vc_d = kc.to(dev), vc.to(dev)
    out = mi.flash_attn_with_kvcache(qn.to(dev), kc_d, vc_d, kn.to(dev), vn.to(dev), rotary_cos=cos.to(dev),
                                     rotary_sin=sin.to(dev), cache_seqlens=lens.to(dev), page_table=pt.to(dev),
                                     causal=True, rotary_interleaved=False)
    errors.append(report("decode step output", out, ref))
    errors.append(report("cache after the append", torch.nan_to_num(kc_d.float().cpu()), torch.nan_to_num(kc_exp.float())))

    print("flash_attn_combine")
    op, lp = torch.randn(4, 2, 3, 8, 64), torch.randn(4, 2, 3, 8)
    out, lse = mi.flash_attn_combine(op.to(dev), lp.to(dev))
    errors.append(report("combine of 4 splits", out, T.combine_ref(op, lp)[0]))

    print("MLA (FlashMLA-style calls): dense paged decode and sparse top-k over an FP8 cache")
    from mate_ops import flash_mla as fm
    from mate_ops.flashmla import quantize_k_cache
    lens = [150, 37]
    dense = torch.randn(2, 192, 1, 576, dtype=bf16)
    kc, _, table = T.make_paged_kv(dense, dense[..., :1], lens, 64)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    qm = torch.randn(2, 1, 16, 576, dtype=bf16)
    meta = fm.get_mla_metadata(seqlens.to(dev), 16, 1)
    out, _ = fm.flash_mla_with_kvcache(qm.to(dev), kc.to(dev), table.to(dev), seqlens.to(dev), 512, *meta, causal=True)
    errors.append(report("dense decode, 16 heads, latent 512 + rope 64", out,
                         T.mla_decode_ref(qm, kc, table, seqlens, 512, causal=True)[0]))
    fp8 = quantize_k_cache(torch.randn(4, 64, 1, 576, dtype=bf16), "v32")
    idx = torch.randint(-1, 4 * 64, (2, 1, 100), dtype=torch.int32)
    out, _ = fm.flash_mla_with_kvcache(qm.to(dev), fp8.to(dev), None, None, 512, None, None, is_fp8_kvcache=True,
                                       indices=idx.to(dev))
    errors.append(report("sparse top-100, FP8 V3.2 cache", out,
                         T.mla_decode_ref(qm, fp8, None, None, 512, is_fp8_kvcache=True, indices=idx)[0]))

    if dev == "cpu":  # the backward has a CPU kernel only so far
        print("backward: gradients of flash_attn_varlen_func (fp32) vs autograd through the fp64 oracle")
        q, k, v = (torch.randn(1, 50, h, 64, requires_grad=True) for h in (4, 2, 2))
        out = mi.flash_attn_varlen_func(q, k, v, causal=True, window_size=(16, 0))
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
        ref = T.fmha_ref(q64, k64, v64, causal=True, window_size=(16, 0))[0]
        ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
        for name, g, r in zip(("dq", "dk", "dv (GQA: summed over the group)"), grads, ref_grads):
            errors.append(report(name, g, r))

    print("torch.compile(fullgraph=True, dynamic=True) of a small attention block")

    class Block(torch.nn.Module):
        def __init__(self, dim=256, heads=4):
            super().__init__()
            self.heads, self.qkv, self.proj = heads, torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

        def forward(self, x, cu_seqlens, max_seqlen):
            q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).unbind(1)
            o = mi.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)
            return self.proj(o.flatten(-2))

    block = Block().to(dev).eval()
    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for lens in ([5, 60], [33, 2, 17], [128]):
            cu = T.random_cu_seqlens(lens)
            x = torch.randn(sum(lens), 256)
            got = compiled(x.to(dev), cu.to(dev), max(lens))
            q, k, v = block.qkv(x.to(dev)).cpu().unflatten(-1, (3, 4, -1)).unbind(1)
            ref = block.proj(T.fmha_ref(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)[0].float().flatten(-2).to(dev))
            errors.append(report(f"compiled block, lengths {lens}", got, ref))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    print(f"  graphs compiled for 3 different batches: {graphs} (no graph breaks, no recompiles)")

    worst = max(errors)
    print(f"worst error {worst:.2e}: {'OK' if worst < 5e-2 else 'TOO LARGE'}")
    return 0 if worst < 5e-2 else 1


if __name__ == "__main__":
    raise SystemExit(main())
