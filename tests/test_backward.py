"""Backward of the FMHA forward (torch.ops.mate.fmha_bwd, autograd of fmha_fwd).

- Gradients (q, k, v, learnable_sink, and through the returned lse) against autograd through
  the fp64 oracle, with FA3's rule: error <= 2x the error of the oracle run in the input
  precision + atol; over dense / ragged / padded layouts, GQA / MQA, D != Dv, causal, local
  windows, attention chunks, softcap, ALiBi, sinks, fp32 / fp16 / bf16.
- Unused positions (rows past seqused, ragged gaps) of q / k / v / dout are NaN-poisoned:
  nothing leaks, and their gradients are exactly 0.
- deterministic: bitwise-identical gradients run to run.
- Device (CUDA) backward, where this build has the kernel and a GPU is visible (else skipped):
  the tensor-core path over its head dims and lengths around the 64 x 64 tiles, softcap / ALiBi /
  sink / lse gradient, the CUDA-core fallback (fp32, other head dims, unaligned rows),
  deterministic=True (the op and the public wrappers), and a B 2 S 1024 case against SDPA math.
- Forward-only features raise at backward, naming the reason; bad fmha_bwd input raises.
- opcheck (autograd registration included), torch.compile (0 graph breaks), torch.export.
"""
import math

import pytest
import torch

import mate_ops  # noqa: F401
from mate_ops.flash_attn_interface import flash_attn_func
from mate_ops.mha_interface import flash_attn_varlen_func, flash_attn_with_kvcache
from mate_ops.testing import assert_close_fa3, fmha_ref, poison_, random_cu_seqlens, to_device_keeping_layout

MATE = torch.ops.mate
DEVICE_OPS = ("mate::fmha_bwd",)  # device tests run once a device has a backward kernel


def _randn(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype)


def _make_case(seed, dtype, *, B=2, H=4, Hk=2, D=32, Dv=32, lens_q=None, lens_k=None, ragged=False,
               seqused=False, causal=False, window=(-1, -1), chunk=0, softcap=0.0, sink=False, alibi=False,
               lse_grad=False):
    """Inputs with NaN in every unused position, op kwargs and oracle kwargs for one backward case."""
    gen = torch.Generator().manual_seed(seed)
    lens_q = lens_q or [int(x) for x in torch.randint(1, 90, (B,), generator=gen)]
    lens_k = lens_k or [int(x) for x in torch.randint(1, 120, (B,), generator=gen)]
    B = len(lens_q)
    kw = {}
    if ragged:  # ragged q and k, with a gap of unused rows at the end of each tensor
        cu_q, cu_k = random_cu_seqlens(lens_q), random_cu_seqlens(lens_k)
        q = _randn(gen, sum(lens_q) + 3, H, D, dtype=dtype)
        k = _randn(gen, sum(lens_k) + 2, Hk, D, dtype=dtype)
        v = _randn(gen, sum(lens_k) + 2, Hk, Dv, dtype=dtype)
        poison_(q[sum(lens_q):]), poison_(k[sum(lens_k):]), poison_(v[sum(lens_k):])
        kw.update(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k))
    else:
        q = _randn(gen, B, max(lens_q), H, D, dtype=dtype)
        k = _randn(gen, B, max(lens_k), Hk, D, dtype=dtype)
        v = _randn(gen, B, max(lens_k), Hk, Dv, dtype=dtype)
    if seqused:  # only a prefix of every sequence is real: the rest is NaN
        used_q = [max(0, x - int(torch.randint(0, 6, (1,), generator=gen))) for x in lens_q]
        used_k = [max(0, x - int(torch.randint(0, 6, (1,), generator=gen))) for x in lens_k]
        kw.update(seqused_q=torch.tensor(used_q, dtype=torch.int32), seqused_k=torch.tensor(used_k, dtype=torch.int32))
    else:
        used_q, used_k = lens_q, (lens_k if ragged else [max(lens_k)] * B)
        if not ragged:
            used_q = [max(lens_q)] * B
    for b in range(B):
        if ragged:
            q0, k0 = int(kw["cu_seqlens_q"][b]), int(kw["cu_seqlens_k"][b])
            poison_(q[q0 + used_q[b]:q0 + lens_q[b]])
            poison_(k[k0 + used_k[b]:k0 + lens_k[b]]), poison_(v[k0 + used_k[b]:k0 + lens_k[b]])
        else:
            poison_(q[b, used_q[b]:]), poison_(k[b, used_k[b]:]), poison_(v[b, used_k[b]:])
    opts = dict(causal=causal, attention_chunk=chunk, softcap=softcap)
    if sink:
        opts["learnable_sink"] = _randn(gen, H, dtype=torch.float32)
    if alibi:
        opts["alibi_slopes"] = torch.rand(B, H, generator=gen) * 0.3
    op_kw = dict(kw, window_size_left=window[0], window_size_right=window[1], **opts)
    ref_kw = {n: kw[n] for n in ("cu_seqlens_q", "cu_seqlens_k", "seqused_q", "seqused_k") if n in kw}
    ref_kw.update(window_size=window, **opts)
    # unused rows of out get NaN output gradients: the backward must not read them
    return dict(q=q, k=k, v=v, op_kw=op_kw, ref_kw=ref_kw, used_q=used_q, used_k=used_k, lens_q=lens_q,
                lens_k=lens_k, ragged=ragged, lse_grad=lse_grad, gen=gen)


def _unused_q_mask(c, shape):
    """True at query rows no sequence uses (rows past seqused_q, ragged gaps)."""
    m = torch.ones(shape[:-2], dtype=torch.bool)
    if c["ragged"]:
        cu = c["op_kw"]["cu_seqlens_q"]
        for b, u in enumerate(c["used_q"]):
            m[int(cu[b]):int(cu[b]) + u] = False
    else:
        for b, u in enumerate(c["used_q"]):
            m[b, :u] = False
    return m


def _unused_k_mask(c, shape):
    m = torch.ones(shape[:-2], dtype=torch.bool)
    if c["ragged"]:
        cu = c["op_kw"]["cu_seqlens_k"]
        for b, u in enumerate(c["used_k"]):
            m[int(cu[b]):int(cu[b]) + u] = False
    else:
        for b, u in enumerate(c["used_k"]):
            m[b, :u] = False
    return m


def _loss_weights(c, out, lse):
    """Output gradient (NaN at unused rows) and lse gradient (0 where lse is not finite)."""
    gen = c["gen"]
    g = _randn(gen, *out.shape, dtype=out.dtype)
    g[_unused_q_mask(c, out.shape)] = float("nan")
    gl = None
    if c["lse_grad"]:
        gl = _randn(gen, *lse.shape, dtype=torch.float32)
        gl = torch.where(torch.isfinite(lse), gl, torch.zeros_like(gl))
    return g, gl


def _grads(out, lse, g, gl, inputs):
    grads = [g, gl] if gl is not None else [g]
    outs = [out, lse] if gl is not None else [out]
    return torch.autograd.grad(outs, inputs, grads)


def _misaligned(t, how):
    """``t``'s values in a layout whose rows are not 16-byte aligned (last dim still contiguous):
    ``"offset"`` starts the data one element past an aligned allocation (strides stay dense),
    ``"padded"`` pads every row by one element (odd row strides)."""
    if how == "offset":
        x = torch.empty(t.numel() + 1, dtype=t.dtype)[1:].view(t.shape)
    elif how == "padded":
        x = torch.empty(*t.shape[:-1], t.shape[-1] + 1, dtype=t.dtype)[..., 1:]
    else:
        raise ValueError(how)
    return x.copy_(t)


def _on(device, t, how=None):
    """t (built on the CPU) on ``device``; with ``how`` in a misaligned layout (kept on the device)."""
    if how is None:
        return t.to(device)
    return to_device_keeping_layout(_misaligned(t, how), device)


def _dsink_formula(out, lse, dout, dlse, sink):
    """dsink_h = -sum_i exp(sink_h - lse_i) (dout_i . out_i - dlse_i) over the rows with a finite
    lse (docs/semantics.md, Backward), in fp64 from the given out / lse."""
    dout = torch.where(torch.isnan(dout), torch.zeros_like(dout), dout)
    delta = (dout.double() * out.double()).sum(-1).transpose(-1, -2)  # lse's layout (B, H, Sq) / (H, Tq)
    if dlse is not None:
        delta = delta - dlse.double()
    lse = lse.double()
    ok = torch.isfinite(lse)
    w = torch.exp(sink.detach().double().view(-1, 1) - torch.where(ok, lse, torch.zeros_like(lse)))
    w = torch.where(ok, w, torch.zeros_like(w))
    return -(w * delta).reshape(-1, *lse.shape[-2:]).sum(0).sum(-1)


def _run_case(c, dtype, device="cpu", layouts=None):
    """Our gradients on ``device`` against the fp64 oracle's (on the CPU), FA3's rule.

    ``layouts`` maps "q" / "k" / "v" / "dout" to a :func:`_misaligned` layout (device
    fallback paths for unaligned rows)."""
    layouts = layouts or {}
    names = ["q", "k", "v"] + (["learnable_sink"] if "learnable_sink" in c["op_kw"] else [])
    base = {"q": c["q"], "k": c["k"], "v": c["v"], "learnable_sink": c["op_kw"].get("learnable_sink")}

    def leaves(cast=None):
        return {n: base[n].detach().to(cast or base[n].dtype).requires_grad_() for n in names}

    ours = {n: _on(device, base[n].detach(), layouts.get(n)).requires_grad_() for n in names}
    op_kw = {n: (_on(device, x) if isinstance(x, torch.Tensor) else x) for n, x in c["op_kw"].items()}
    op_kw["learnable_sink"] = ours.get("learnable_sink")
    out, lse = MATE.fmha_fwd(ours["q"], ours["k"], ours["v"], **op_kw)
    g, gl = _loss_weights(c, out.cpu(), lse.cpu())
    got = _grads(out, lse, _on(device, g, layouts.get("dout")), _on(device, gl) if gl is not None else None,
                 [ours[n] for n in names])

    def oracle(compute_dtype, cast):
        x = leaves(cast)
        kw = dict(c["ref_kw"], learnable_sink=x.get("learnable_sink"))
        o, l = fmha_ref(x["q"], x["k"], x["v"], compute_dtype=compute_dtype, **kw)
        o = torch.where(_unused_q_mask(c, o.shape)[..., None, None], torch.zeros_like(o), o)
        gg = torch.where(torch.isnan(g), torch.zeros_like(g), g).to(o.dtype)
        glr = gl.to(l.dtype) if gl is not None else None
        return _grads(o, l, gg, glr, [x[n] for n in names]), o, l

    ref, _, _ = oracle(torch.float64, torch.float64)
    lowp, out_lowp, lse_lowp = oracle(dtype, None)
    for n, a, r, lp in zip(names, got, ref, lowp):
        a = a.cpu()
        if n == "learnable_sink":
            # dsink sums delta_i = dout_i . out_i over every row, with out rounded to its dtype (the
            # contract, as FA's dot(dO, O)); autograd through the oracle never sees that rounding, so
            # the low-precision bound also takes the contract's formula on the oracle's rounded out
            alt = _dsink_formula(out_lowp, lse_lowp, g, gl, base[n])
            if (alt - r).abs().max() > (lp.double() - r).abs().max():
                lp = alt
        assert a.dtype == base[n].dtype and a.shape == base[n].shape, n
        assert not torch.isnan(a).any(), f"d{n} has NaN (a poisoned position leaked)"
        if n == "q":
            assert (a[_unused_q_mask(c, a.shape)] == 0).all(), "dq of unused rows must be 0"
        elif n in ("k", "v"):
            assert (a[_unused_k_mask(c, a.shape)] == 0).all(), f"d{n} of unused keys must be 0"
        assert_close_fa3(a.double(), r, lp.double(), name=f"d{n}", input_dtype=dtype)


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CASES = {
    "dense_mha": (F32, dict(H=4, Hk=4)),
    "dense_gqa_causal_multi_tile": (BF16, dict(B=1, H=6, Hk=2, D=64, Dv=32, lens_q=[150], lens_k=[300],
                                                causal=True)),
    "mqa_long_keys_chunked_dq": (F32, dict(B=1, H=3, Hk=1, D=16, Dv=24, lens_q=[70], lens_k=[600],
                                           window=(250, 40))),
    "varlen_mqa_window": (F16, dict(B=3, H=4, Hk=1, D=32, Dv=16, ragged=True, window=(20, 5),
                                    lens_q=[33, 0, 61], lens_k=[40, 7, 90])),
    "padded_softcap_causal": (BF16, dict(B=3, seqused=True, softcap=5.0, causal=True)),
    "varlen_chunk_sink_lse": (F32, dict(B=3, ragged=True, chunk=16, sink=True, lse_grad=True)),
    "alibi_causal_sq_gt_sk": (F32, dict(B=2, lens_q=[50, 41], lens_k=[20, 33], causal=True, alibi=True,
                                        lse_grad=True)),
    "ragged_seqused_sink_window": (F16, dict(B=2, ragged=True, seqused=True, sink=True, window=(9, -1))),
    "empty_rows_sink_bf16": (BF16, dict(B=2, H=4, Hk=2, lens_q=[40, 30], lens_k=[10, 25], causal=True,
                                        sink=True, lse_grad=True)),
    "everything_gqa4": (BF16, dict(B=2, H=8, Hk=2, D=128, Dv=64, seqused=True, window=(30, 10), softcap=8.0,
                                   alibi=True, sink=True)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_grads_vs_oracle(device, name):
    dtype, spec = CASES[name]
    _run_case(_make_case(sum(map(ord, name)), dtype, **spec), dtype, device)


@pytest.mark.parametrize("seed", range(4))
def test_grads_random(device, seed):
    """Random shapes / masks / dtypes / layouts."""
    gen = torch.Generator().manual_seed(1000 + seed)
    pick = lambda xs: xs[int(torch.randint(0, len(xs), (1,), generator=gen))]  # noqa: E731
    Hk = pick([1, 2, 3])
    spec = dict(B=pick([1, 2, 3]), Hk=Hk, H=Hk * pick([1, 2, 4]), D=pick([8, 32, 40, 64]), Dv=pick([8, 32, 48]),
                ragged=pick([False, True]), seqused=pick([False, True]), causal=pick([False, True]),
                window=pick([(-1, -1), (17, 3), (-1, 40)]), chunk=pick([0, 0, 24]), softcap=pick([0.0, 4.0]),
                sink=pick([False, True]), alibi=pick([False, True]), lse_grad=pick([False, True]))
    dtype = pick([F32, F16, BF16])
    _run_case(_make_case(seed, dtype, **spec), dtype, device)


def _vs_oracle(inputs, make_inputs_for_op, loss, kw, rtol=1e-5):
    """Gradients of loss(fmha_fwd(...)) against the fp64 oracle's, relative to their size."""
    got = torch.autograd.grad(loss(*MATE.fmha_fwd(*make_inputs_for_op(inputs), **kw)), inputs)
    x64 = [x.detach().double().requires_grad_() for x in inputs]
    ref_kw = {n: (x64[-1] if n == "learnable_sink" else v) for n, v in kw.items()}
    ref = torch.autograd.grad(loss(*fmha_ref(*make_inputs_for_op(x64), **ref_kw)), x64)
    for a, r in zip(got, ref):
        assert a.shape == r.shape and not torch.isnan(a).any()
        assert (a.double() - r).abs().max() <= rtol * max(1.0, r.abs().max().item()), (a, r)


def test_edge_shapes():
    """Empty batches, a sequence without keys (sink + lse gradient), expanded (stride-0) k,
    head dims 256 / 512."""
    def dense(x):
        return x[:3]

    xs = [torch.randn(*sh, requires_grad=True) for sh in ((1, 9, 2, 256), (1, 11, 1, 256), (1, 11, 1, 512))]
    _vs_oracle(xs, dense, lambda o, lse: o.square().sum(), dict(causal=True))
    xs = [torch.randn(*sh, requires_grad=True) for sh in ((0, 3, 2, 8), (0, 4, 2, 8), (0, 4, 2, 8))]
    out, _ = MATE.fmha_fwd(*xs, causal=True)
    assert [g.shape for g in torch.autograd.grad(out.sum(), xs)] == [x.shape for x in xs]
    q, k, v = (torch.randn(2, 3 + i, 2, 8, requires_grad=True) for i in range(3))
    sink = torch.randn(2, requires_grad=True)
    _vs_oracle([q, k, k.detach().clone().requires_grad_(), sink], dense,
               lambda o, lse: o.sum() + lse.sum(), dict(seqused_k=torch.tensor([0, 2], dtype=torch.int32),
                                                        learnable_sink=sink))
    kb = torch.randn(1, 1, 2, 8, requires_grad=True)
    _vs_oracle([torch.randn(1, 5, 2, 8, requires_grad=True), kb, torch.randn(1, 6, 2, 8, requires_grad=True)],
               lambda x: (x[0], x[1].expand(1, 6, 2, 8), x[2]), lambda o, lse: o.square().sum(), {})
    q, k, v = (torch.randn(0, 2, 8, requires_grad=True) for _ in range(3))
    cu = torch.zeros(1, dtype=torch.int32)
    out, _ = MATE.fmha_fwd(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu)
    assert [g.shape for g in torch.autograd.grad(out.sum(), (q, k, v))] == [q.shape] * 3


def test_out_dtype_differs_from_inputs():
    """fmha_fwd's out_dtype: the output gradient arrives in out's dtype."""
    gen = torch.Generator().manual_seed(9)
    q, k, v = (_randn(gen, 2, 19, 2, 16, dtype=F32).requires_grad_() for _ in range(3))
    out, _ = MATE.fmha_fwd(q, k, v, causal=True, out_dtype=BF16)
    assert out.dtype == BF16
    got = torch.autograd.grad(out.float().sum(), (q, k, v))
    ref = torch.autograd.grad(fmha_ref(q.double(), k.double(), v.double(), causal=True)[0].sum(), (q, k, v))
    for a, r in zip(got, ref):
        assert a.dtype == F32
        torch.testing.assert_close(a, r, atol=3e-2, rtol=3e-2)


def test_deterministic_bitwise():
    """deterministic=True: gradients are bitwise identical run to run (also with the key-chunked
    dq path, taken when batch * kv heads cannot fill the threads)."""
    gen = torch.Generator().manual_seed(7)
    q = _randn(gen, 1, 200, 4, 32, dtype=BF16).requires_grad_()
    k = _randn(gen, 1, 700, 1, 32, dtype=BF16).requires_grad_()
    v = _randn(gen, 1, 700, 1, 32, dtype=BF16).requires_grad_()
    g = _randn(gen, 1, 200, 4, 32, dtype=BF16)
    runs = [torch.autograd.grad(flash_attn_func(q, k, v, causal=True, deterministic=True), (q, k, v), g)
            for _ in range(3)]
    for r in runs[1:]:
        for a, b in zip(runs[0], r):
            assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["ragged_q_dense_k", "dense_q_ragged_k"])
def test_mixed_layouts(device, layout):
    """One side ragged (cu_seqlens), the other dense: gradients against the fp64 oracle (fp32
    on the CPU; bf16 on a device, its tensor-core path). Ragged rows past the last segment are
    NaN and get gradient 0."""
    dtype = F32 if device == "cpu" else BF16
    gen = torch.Generator().manual_seed(11 if layout == "ragged_q_dense_k" else 12)
    B, H, Hk, D = 2, 4, 2, 64
    lens = [37, 70]
    cu = torch.tensor([0, 37, 107], dtype=torch.int32)
    if layout == "ragged_q_dense_k":
        q = _randn(gen, 110, H, D, dtype=dtype)
        q[107:] = float("nan")
        k, v = _randn(gen, B, 90, Hk, D, dtype=dtype), _randn(gen, B, 90, Hk, D, dtype=dtype)
        kw = dict(cu_seqlens_q=cu, max_seqlen_q=max(lens), causal=True)
    else:
        q = _randn(gen, B, 50, H, D, dtype=dtype)
        k, v = _randn(gen, 110, Hk, D, dtype=dtype), _randn(gen, 110, Hk, D, dtype=dtype)
        k[107:], v[107:] = float("nan"), float("nan")
        kw = dict(cu_seqlens_k=cu, max_seqlen_k=max(lens), window_size_left=30, window_size_right=4)
    dout = _randn(gen, *q.shape, dtype=dtype)
    dev_kw = {n: (x.to(device) if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}
    leaves = [x.to(device).requires_grad_() for x in (q, k, v)]
    win = (kw.pop("window_size_left", -1), kw.pop("window_size_right", -1))
    out, _ = MATE.fmha_fwd(*leaves, **dev_kw)
    got = torch.autograd.grad(out, leaves, dout.to(device))
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref_kw = {n: x for n, x in kw.items() if not n.startswith("max_seqlen")}
    ref_out, _ = fmha_ref(*ref_leaves, window_size=win, **ref_kw)
    used = ~torch.isnan(ref_out)
    ref = torch.autograd.grad(ref_out, ref_leaves, torch.where(used, dout.double(), 0.0))
    for name, a, r, x in zip("qkv", got, ref, (q, k, v)):
        a, r = a.cpu().double(), torch.nan_to_num(r)
        unused = torch.isnan(x)
        assert (a[unused] == 0).all(), f"d{name}: unused positions must get 0"
        err = (a - r).abs().max().item() / r.abs().max().item()
        assert err < (1e-4 if dtype == F32 else 2e-2), (name, err)


# ------------------------------------------------------------------ through the public APIs
def test_public_apis_grad():
    """FA3 flash_attn_func / flash_attn_varlen_func and MATE flash_attn_varlen_func (with a sink) train."""
    gen = torch.Generator().manual_seed(3)
    q = _randn(gen, 2, 20, 4, 16, dtype=F32).requires_grad_()
    k = _randn(gen, 2, 24, 2, 16, dtype=F32).requires_grad_()
    v = _randn(gen, 2, 24, 2, 16, dtype=F32).requires_grad_()
    sink = _randn(gen, 4, dtype=F32).requires_grad_()
    from mate_ops.flash_attn_interface import flash_attn_varlen_func as fa3_varlen
    cu_q = torch.tensor([0, 20, 40], dtype=torch.int32)
    cu_k = torch.tensor([0, 24, 48], dtype=torch.int32)
    outs = {
        "fa3_func": lambda: flash_attn_func(q, k, v, causal=True),
        "fa3_varlen": lambda: fa3_varlen(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, 20, 24,
                                         causal=True).view(2, 20, 4, 16),
        "mate_varlen": lambda: flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k,
                                                      20, 24, causal=True).view(2, 20, 4, 16),
    }
    ref = torch.autograd.grad(fmha_ref(q.double(), k.double(), v.double(), causal=True)[0].sum(), (q, k, v))
    for name, fn in outs.items():
        got = torch.autograd.grad(fn().sum(), (q, k, v))
        for a, r in zip(got, ref):
            torch.testing.assert_close(a, r, atol=2e-5, rtol=1e-4, msg=name)
    out = flash_attn_varlen_func(q, k, v, learnable_sink=sink, window_size=(5, 0))
    (dsink,) = torch.autograd.grad(out.sum(), sink)
    o2, _ = fmha_ref(q.double(), k.double(), v.double(), learnable_sink=sink.double(), window_size=(5, 0))
    torch.testing.assert_close(dsink, torch.autograd.grad(o2.sum(), sink)[0], atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------ forward-only at backward
def _fwd_only_calls():
    gen = torch.Generator().manual_seed(5)
    q = _randn(gen, 2, 6, 2, 16, dtype=F32)
    k = _randn(gen, 2, 8, 2, 16, dtype=F32)
    v = _randn(gen, 2, 8, 2, 16, dtype=F32)
    pt = torch.tensor([[1, 0], [3, 2]], dtype=torch.int32)
    used = torch.tensor([8, 7], dtype=torch.int32)
    kp, vp = k.reshape(4, 4, 2, 16), v.reshape(4, 4, 2, 16)
    fp8 = torch.float8_e4m3fn
    return {
        "paged": (lambda qq: flash_attn_varlen_func(qq, kp, vp, page_table=pt, seqused_k=used), "paged K/V"),
        "qv": (lambda qq: flash_attn_varlen_func(qq, k, v, qv=torch.randn(2, 6, 2, 16)), "qv is forward-only"),
        "fp8": (lambda qq: MATE.fmha_fwd(qq.to(fp8), k.to(fp8), v.to(fp8))[0], None),
        "kvcache": (lambda qq: flash_attn_with_kvcache(qq, k, v, cache_seqlens=5), "kv-cache"),
        "context_parallel": (lambda qq: flash_attn_varlen_func(
            qq, k, v, cp_world_size=2, cp_rank=1, cp_tot_seqused_k=torch.tensor([16, 15], dtype=torch.int32)),
            "context parallel"),
        "alibi_grad": (lambda qq: MATE.fmha_fwd(qq, k, v, alibi_slopes=torch.rand(2).requires_grad_())[0],
                       "alibi_slopes"),
        "cache_batch_idx": (lambda qq: MATE.fmha_fwd(qq, k, v, cache_batch_idx=torch.tensor([1, 0], dtype=torch.int32))[0],
                            "cache_batch_idx"),
    }, q


@pytest.mark.parametrize("name", ["paged", "qv", "fp8", "kvcache", "context_parallel", "alibi_grad",
                                  "cache_batch_idx"])
def test_forward_only_raises_at_backward(name):
    calls, q = _fwd_only_calls()
    fn, reason = calls[name]
    qq = q.detach().requires_grad_()
    if name == "fp8":  # a float8 leaf cannot require grad: the op's backward rejects fp8 directly
        with pytest.raises(RuntimeError, match="float8_e4m3fn inputs are forward-only"):
            x = q.to(torch.float8_e4m3fn)
            out, lse = MATE.fmha_fwd(x, x, x)
            MATE.fmha_bwd(out, x, x, x, out, lse)
        return
    out = fn(qq)
    with pytest.raises((RuntimeError, NotImplementedError), match=reason):
        torch.autograd.grad(out.float().sum(), qq)


def test_out_argument_is_forward_only():
    q = torch.randn(1, 4, 2, 8, requires_grad=True)
    k, v = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="forward-only"):
        flash_attn_varlen_func(q, k, v, out=torch.empty(1, 4, 2, 8))
    with torch.no_grad():
        flash_attn_varlen_func(q, k, v, out=torch.empty(1, 4, 2, 8))


# ------------------------------------------------------------------ bad input to fmha_bwd
def _bwd_args():
    gen = torch.Generator().manual_seed(11)
    q = _randn(gen, 2, 5, 4, 16, dtype=F32)
    k = _randn(gen, 2, 7, 2, 16, dtype=F32)
    v = _randn(gen, 2, 7, 2, 8, dtype=F32)
    out, lse = MATE.fmha_fwd(q, k, v)
    return dict(dout=torch.randn_like(out), q=q, k=k, v=v, out=out, lse=lse)


BAD_BWD = [
    ("dout_shape", lambda a: a.update(dout=a["dout"][:, :4]), "dout must have the shape of out"),
    ("dout_dtype", lambda a: a.update(dout=a["dout"].half()), "dout must have the dtype of out"),
    ("dout_last_dim", lambda a: a.update(dout=a["dout"].transpose(-1, -2).contiguous().transpose(-1, -2)),
     "dout"),
    ("out_shape", lambda a: a.update(out=a["out"][:, :, :2]), "out must have shape"),
    ("out_dtype", lambda a: a.update(out=a["out"].double(), dout=a["dout"].double()), "out dtype must be"),
    ("lse_shape", lambda a: a.update(lse=a["lse"][:, :, :3]), "lse must have shape"),
    ("lse_dtype", lambda a: a.update(lse=a["lse"].double()), "lse must be float32"),
    ("dlse_shape", lambda a: a.update(dlse=torch.zeros(2, 4)), "dlse must have the shape of lse"),
    ("dlse_int", lambda a: a.update(dlse=torch.zeros(2, 4, 5, dtype=torch.int32)), "dlse must be a floating"),
    ("k_heads", lambda a: a.update(k=torch.randn(2, 7, 3, 16), v=torch.randn(2, 7, 3, 8)), "multiple of num_heads_k"),
    ("v_len", lambda a: a.update(v=torch.randn(2, 6, 2, 8)), "v must match k"),
    ("q_dtype", lambda a: a.update(q=a["q"].double()), "q must be float32"),
    ("page_table", lambda a: a.update(page_table=torch.zeros(2, 1, dtype=torch.int32)), "paged K/V"),
    ("qv", lambda a: a.update(qv=torch.randn(2, 5, 4, 8)), "qv is forward-only"),
    ("cp", lambda a: a.update(cp_world_size=2, cp_tot_seqused_k=torch.tensor([7, 7], dtype=torch.int32)),
     "context parallel"),
    ("seqused_k_range", lambda a: a.update(seqused_k=torch.tensor([9, 1], dtype=torch.int32)), "seqused_k\\[0\\]"),
    ("sink_shape", lambda a: a.update(learnable_sink=torch.zeros(3)), "learnable_sink must have shape"),
]


@pytest.mark.parametrize("name,mutate,match", BAD_BWD, ids=[b[0] for b in BAD_BWD])
def test_bwd_bad_input(name, mutate, match):
    a = _bwd_args()
    mutate(a)
    kw = {n: a.pop(n) for n in list(a) if n not in ("dout", "q", "k", "v", "out", "lse")}
    with pytest.raises(RuntimeError, match=match):
        MATE.fmha_bwd(a["dout"], a["q"], a["k"], a["v"], a["out"], a["lse"], **kw)


def test_bwd_ragged_seqused_past_segment():
    """The forward lets a ragged sequence read keys past its cu_seqlens_k segment; the backward
    cannot give such keys one owner and says so."""
    q = torch.randn(6, 2, 16)
    k, v = torch.randn(10, 2, 16), torch.randn(10, 2, 16)
    cu_q = torch.tensor([0, 3, 6], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 8], dtype=torch.int32)
    used = torch.tensor([6, 2], dtype=torch.int32)
    out, lse = MATE.fmha_fwd(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_k=used)
    with pytest.raises(RuntimeError, match="cu_seqlens_k segment"):
        MATE.fmha_bwd(out, q, k, v, out, lse, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_k=used)


# ------------------------------------------------------------------ opcheck / compile / export
def _opcheck_cases():
    gen = torch.Generator().manual_seed(2)
    q = _randn(gen, 2, 5, 4, 16, dtype=F32).requires_grad_()
    k = _randn(gen, 2, 7, 2, 16, dtype=F32).requires_grad_()
    v = _randn(gen, 2, 7, 2, 8, dtype=F32).requires_grad_()
    sink = _randn(gen, 4, dtype=F32).requires_grad_()
    qr = _randn(gen, 9, 4, 16, dtype=BF16).requires_grad_()
    kr = _randn(gen, 11, 2, 16, dtype=BF16).requires_grad_()
    vr = _randn(gen, 11, 2, 16, dtype=BF16).requires_grad_()
    cu_q = torch.tensor([0, 4, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 11], dtype=torch.int32)
    return {
        "dense_sink_causal": ((q, k, v), dict(causal=True, learnable_sink=sink, softcap=3.0)),
        "varlen_window_bf16": ((qr, kr, vr), dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=5,
                                                  max_seqlen_k=6, window_size_left=2, window_size_right=1)),
    }


@pytest.mark.parametrize("name", ["dense_sink_causal", "varlen_window_bf16"])
def test_opcheck_fwd_with_autograd_and_bwd(name):
    args, kw = _opcheck_cases()[name]
    torch.library.opcheck(MATE.fmha_fwd.default, args, kw)
    out, lse = MATE.fmha_fwd(*[a.detach() for a in args], **{n: (x.detach() if isinstance(x, torch.Tensor) else x)
                                                            for n, x in kw.items()})
    bwd_args = (torch.randn_like(out), *[a.detach() for a in args], out, lse, torch.randn_like(lse))
    bwd_kw = {n: (x.detach() if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}
    torch.library.opcheck(MATE.fmha_bwd.default, bwd_args, bwd_kw)


@pytest.mark.parametrize("name", ["dense_sink_causal", "varlen_window_bf16"])
def test_cuda_opcheck_bwd(cuda, name):
    """opcheck of fmha_fwd (with its autograd) and fmha_bwd on the CUDA kernels."""
    args, kw = _opcheck_cases()[name]
    on = lambda x: x.detach().to(cuda).requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x  # noqa: E731
    args, kw = [on(a) for a in args], {n: on(x) for n, x in kw.items()}
    torch.library.opcheck(MATE.fmha_fwd.default, args, kw)
    out, lse = MATE.fmha_fwd(*[a.detach() for a in args], **{n: (x.detach() if isinstance(x, torch.Tensor) else x)
                                                            for n, x in kw.items()})
    bwd_args = (torch.randn_like(out), *[a.detach() for a in args], out, lse, torch.randn_like(lse))
    bwd_kw = {n: (x.detach() if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}
    torch.library.opcheck(MATE.fmha_bwd.default, bwd_args, bwd_kw)


def _attn_block(q, k, v, sink):
    out = flash_attn_varlen_func(q, k, v, causal=True, learnable_sink=sink, softcap=10.0)
    return out.float().square().mean()


def test_compile_forward_backward_no_graph_breaks():
    from torch._dynamo.testing import CompileCounterWithBackend
    gen = torch.Generator().manual_seed(4)
    q, k, v = (_randn(gen, 2, 33, 4, 32, dtype=F32).requires_grad_() for _ in range(3))
    sink = _randn(gen, 4, dtype=F32).requires_grad_()
    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_attn_block, backend=cnt, fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v, sink), (q, k, v, sink))
    ref = torch.autograd.grad(_attn_block(q, k, v, sink), (q, k, v, sink))
    assert cnt.frame_count == 1
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r)
    torch._dynamo.reset()
    inductor = torch.compile(_attn_block, fullgraph=True)
    for a, r in zip(torch.autograd.grad(inductor(q, k, v, sink), (q, k, v, sink)), ref):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-4)


class _TinyAttn(torch.nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.sink = torch.nn.Parameter(torch.zeros(heads))

    def forward(self, x):
        B, S, C = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, C // self.heads).unbind(2)
        return flash_attn_varlen_func(q, k, v, causal=True, learnable_sink=self.sink).reshape(B, S, C)


def test_export_training_step():
    """torch.export of the model keeps fmha_fwd, and the exported module trains: its gradients
    (fmha_bwd) equal eager's."""
    torch.manual_seed(0)
    model = _TinyAttn()
    x = torch.randn(2, 12, 32)
    ep = torch.export.export(model, (x,))
    assert any(n.target is MATE.fmha_fwd.default for n in ep.graph.nodes if n.op == "call_function")
    mod = ep.module()
    loss = mod(x).square().mean()
    grads = torch.autograd.grad(loss, list(mod.parameters()))
    ref = torch.autograd.grad(model(x).square().mean(), list(model.parameters()))
    assert len(grads) == len(ref)
    for a, r in zip(grads, ref):
        torch.testing.assert_close(a, r)


# ------------------------------------------------------------------ device (CUDA) backward
# The device backward has a tensor-core path (bf16 / fp16, D and Dv multiples of 8 up to 256;
# 64-row query tiles x 64-key tiles) and a CUDA-core fallback (fp32, other head dims, unaligned
# rows). These cases run only where this build has a CUDA kernel for mate::fmha_bwd and a GPU
# is visible; elsewhere (CI) they skip. Oracle and comparisons run on the CPU.
def _cuda_bwd_skip_reason():
    if not torch._C._dispatch_has_kernel_for_dispatch_key("mate::fmha_bwd", "CUDA"):
        return "this build has no cuda kernel for mate::fmha_bwd"
    if not torch.cuda.is_available():
        return "this build has CUDA kernels for mate::fmha_bwd but no GPU is visible"
    return None


@pytest.fixture
def cuda():
    """"cuda", or a skip naming why the CUDA backward cannot run here."""
    reason = _cuda_bwd_skip_reason()
    if reason:
        pytest.skip(reason)
    return "cuda"


# Lengths cross the 64-row / 64-key tile edges (1, 63, 65, 130, 257), with Sq < Sk and Sq > Sk.
TILE_DIMS = [(64, 64), (96, 96), (128, 128), (192, 128), (256, 256), (40, 72), (8, 8)]
TILE_VARIANTS = {
    # dense MHA, full attention, Sq 130 < Sk 257
    "mha_dense": dict(H=4, Hk=4, lens_q=[130, 130], lens_k=[257, 257]),
    # GQA 8/2, ragged (with a gap), causal; a 1-row query, Sq < Sk and Sq > Sk (rows without keys)
    "gqa_ragged_causal": dict(H=8, Hk=2, ragged=True, causal=True, lens_q=[1, 65, 257], lens_k=[63, 130, 64]),
    # MQA, padded (seqused_q / seqused_k, NaN past them), local window (37, 5)
    "mqa_padded_window": dict(H=4, Hk=1, seqused=True, window=(37, 5), lens_q=[257, 63], lens_k=[65, 130]),
    # GQA 8/2, dense, causal + attention_chunk 48 (chunk borders inside tiles), Sq 257 > Sk 130
    "gqa_dense_chunk_causal": dict(H=8, Hk=2, causal=True, chunk=48, lens_q=[257], lens_k=[130]),
    # MHA, ragged, attention_chunk 64 (chunk borders on tile borders), no causal
    "mha_ragged_chunk": dict(H=2, Hk=2, ragged=True, chunk=64, lens_q=[63, 130], lens_k=[257, 65]),
}


@pytest.mark.parametrize("variant", sorted(TILE_VARIANTS))
@pytest.mark.parametrize("dims", TILE_DIMS, ids=[f"D{d}_Dv{dv}" for d, dv in TILE_DIMS])
@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
def test_cuda_tensor_core_tiles(cuda, dtype, dims, variant):
    """The tensor-core path: every (D, Dv) it serves x MHA / GQA / MQA x full / causal / local /
    chunked x dense / ragged / padded, with lengths around the tile edges; NaN in unused positions."""
    D, Dv = dims
    spec = dict(TILE_VARIANTS[variant], D=D, Dv=Dv)
    _run_case(_make_case(sum(map(ord, variant)) + D + 7 * Dv, dtype, **spec), dtype, cuda)


# bf16, D 128, GQA: the score modifiers and the lse gradient on the tensor-core path
CUDA_FEATURE_CASES = {
    "softcap_gqa_causal": dict(H=8, Hk=2, causal=True, softcap=5.0, lens_q=[130, 65], lens_k=[257, 63]),
    "alibi_ragged_window": dict(H=4, Hk=2, ragged=True, alibi=True, window=(37, 5), lens_q=[65, 130],
                                lens_k=[257, 130]),
    "alibi_causal_sq_gt_sk": dict(H=8, Hk=2, causal=True, alibi=True, lens_q=[257], lens_k=[130]),
    "sink_padded_causal": dict(H=8, Hk=2, seqused=True, causal=True, sink=True, lens_q=[65, 257],
                               lens_k=[257, 130]),
    "sink_ragged_chunk": dict(H=4, Hk=1, ragged=True, chunk=64, sink=True, lens_q=[130, 63], lens_k=[130, 257]),
    "lse_grad_ragged_empty_keys": dict(H=4, Hk=2, ragged=True, lse_grad=True, lens_q=[130, 1, 63],
                                       lens_k=[65, 257, 0]),
    # rows without keys (Sq > Sk, causal): lse = sink, their gradient comes through dlse and dsink
    "sink_lse_grad_rows_without_keys": dict(H=8, Hk=2, causal=True, sink=True, lse_grad=True, lens_q=[257, 130],
                                            lens_k=[63, 65]),
    "everything": dict(H=8, Hk=2, seqused=True, window=(37, 5), softcap=5.0, alibi=True, sink=True,
                       lse_grad=True, lens_q=[130, 257], lens_k=[257, 65]),
}


@pytest.mark.parametrize("name", sorted(CUDA_FEATURE_CASES))
def test_cuda_features_bf16_d128(cuda, name):
    spec = dict(CUDA_FEATURE_CASES[name], D=128, Dv=128)
    _run_case(_make_case(sum(map(ord, name)), BF16, **spec), BF16, cuda)


# The CUDA-core fallback: fp32, head dims the tensor-core path does not serve, unaligned rows.
CUDA_FALLBACK_CASES = {
    "fp32_gqa_ragged_causal": (F32, dict(H=8, Hk=2, D=64, Dv=64, ragged=True, causal=True, lens_q=[65, 257, 1],
                                         lens_k=[130, 63, 64]), None),
    "fp32_odd_dims_padded_window": (F32, dict(H=4, Hk=1, D=40, Dv=24, seqused=True, window=(37, 5), sink=True,
                                              lens_q=[130, 65], lens_k=[257, 63]), None),
    "fp32_d256_softcap_alibi_lse": (F32, dict(B=1, H=4, Hk=4, D=256, Dv=256, causal=True, softcap=5.0, alibi=True,
                                              lse_grad=True, lens_q=[130], lens_k=[257]), None),
    "fp16_d320": (F16, dict(H=4, Hk=2, D=320, Dv=320, causal=True, lens_q=[130, 130], lens_k=[65, 65]), None),
    "fp16_d320_dv64_ragged": (F16, dict(H=4, Hk=1, D=320, Dv=64, ragged=True, window=(37, 5), lens_q=[65, 130],
                                        lens_k=[257, 63]), None),
    "bf16_d264_padded": (BF16, dict(H=2, Hk=1, D=264, Dv=264, seqused=True, causal=True, lens_q=[65, 130],
                                    lens_k=[130, 257]), None),
    "fp16_dv36_sink": (F16, dict(H=8, Hk=2, D=64, Dv=36, causal=True, sink=True, lens_q=[130, 130],
                                 lens_k=[257, 257]), None),
    "bf16_d20_dv128_chunk": (BF16, dict(H=4, Hk=4, D=20, Dv=128, ragged=True, chunk=48, lens_q=[257, 63],
                                        lens_k=[130, 65]), None),
    # rows 2 bytes past a 16-byte boundary (q only), dense strides
    "unaligned_q_offset_bf16_d128": (BF16, dict(H=8, Hk=2, D=128, Dv=128, causal=True, lens_q=[130, 130],
                                                lens_k=[257, 257]), dict(q="offset")),
    # odd row strides for k and v, offset dout, ragged GQA
    "unaligned_kv_padded_fp16_d64": (F16, dict(H=4, Hk=2, D=64, Dv=64, ragged=True, window=(37, 5),
                                               lens_q=[65, 130], lens_k=[130, 257]),
                                     dict(k="padded", v="padded", dout="offset")),
    # everything misaligned, D 256 / Dv 256
    "unaligned_all_bf16_d256": (BF16, dict(B=1, H=2, Hk=1, D=256, Dv=256, causal=True, sink=True,
                                           lens_q=[130], lens_k=[130]),
                                dict(q="padded", k="offset", v="padded", dout="padded")),
}


@pytest.mark.parametrize("name", sorted(CUDA_FALLBACK_CASES))
def test_cuda_fallback(cuda, name):
    """The CUDA-core fallback is right too: fp32, D 320 / 264 / 20, Dv 36, unaligned rows."""
    dtype, spec, layouts = CUDA_FALLBACK_CASES[name]
    _run_case(_make_case(sum(map(ord, name)), dtype, **spec), dtype, cuda, layouts)


def _det_case(device, dtype=BF16, B=2, S=640, Sk=640, H=8, Hk=2, D=128, sink=True):
    gen = torch.Generator().manual_seed(21)
    q = _randn(gen, B, S, H, D, dtype=dtype).to(device)
    k = _randn(gen, B, Sk, Hk, D, dtype=dtype).to(device)
    v = _randn(gen, B, Sk, Hk, D, dtype=dtype).to(device)
    dout = _randn(gen, B, S, H, D, dtype=dtype).to(device)
    s = _randn(gen, H, dtype=F32).to(device) if sink else None
    return q, k, v, dout, s


def _assert_bitwise_runs(runs):
    for r in runs[1:]:
        for i, (a, b) in enumerate(zip(runs[0], r)):
            assert torch.equal(a, b), f"gradient {i} differs between runs with deterministic=True"


def test_cuda_deterministic_op(cuda):
    """fmha_bwd(..., deterministic=True): dq / dk / dv / dsink bitwise identical run to run
    (GQA 8/2, causal, 640 keys: many key tiles add into every dq row, 4 query heads into each kv head)."""
    q, k, v, dout, sink = _det_case(cuda)
    out, lse = MATE.fmha_fwd(q, k, v, causal=True, learnable_sink=sink)
    runs = [MATE.fmha_bwd(dout, q, k, v, out, lse, causal=True, learnable_sink=sink, deterministic=True)
            for _ in range(3)]
    assert all(torch.isfinite(g).all() for g in runs[0])
    _assert_bitwise_runs(runs)


def test_cuda_deterministic_public_api(cuda):
    """deterministic=True through the public wrappers (FA3 flash_attn_func; MATE's
    flash_attn_varlen_func, ragged, with a sink): bitwise-identical gradients run to run."""
    q, k, v, dout, sink = _det_case(cuda)
    q, k, v, sink = (x.requires_grad_() for x in (q, k, v, sink))
    runs = [torch.autograd.grad(flash_attn_func(q, k, v, causal=True, deterministic=True), (q, k, v), dout)
            for _ in range(3)]
    _assert_bitwise_runs(runs)
    B, S, H, D = q.shape
    cu = torch.arange(0, B * S + 1, S, dtype=torch.int32, device=cuda)
    cu_q = torch.tensor([0, 300, 2 * S], dtype=torch.int32, device=cuda)  # uneven lengths
    flat = lambda x: x.flatten(0, 1)  # noqa: E731
    runs = [torch.autograd.grad(flash_attn_varlen_func(flat(q), flat(k), flat(v), cu_q, cu, 2 * S - 300, S,
                                                       causal=True, learnable_sink=sink, deterministic=True),
                                (q, k, v, sink), flat(dout)) for _ in range(3)]
    _assert_bitwise_runs(runs)


def _sdpa_grads(q, k, v, dout, causal, backend):
    """Gradients of torch SDPA (inputs (B, S, H, D), transposed to SDPA's (B, H, S, D))."""
    from torch.nn.attention import sdpa_kernel
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    with sdpa_kernel(backend):
        out = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in leaves),
                                                               is_causal=causal)
    return torch.autograd.grad(out.transpose(1, 2), leaves, dout)


def _attention_lowp_grads(q, k, v, dout, causal):
    """FA3's attention_ref(upcast=False) and its autograd: matmuls in the input dtype, softmax in
    fp32, P rounded to the input dtype before P @ V (the "oracle in input precision")."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    qq, kk, vv = leaves
    Sq, Sk = q.shape[1], k.shape[1]
    s = torch.einsum("bqhd,bkhd->bhqk", qq, kk).float() / math.sqrt(q.shape[-1])
    if causal:
        keep = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril(Sk - Sq)
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1).to(q.dtype)
    out = torch.einsum("bhqk,bkhd->bqhd", p, vv)
    return torch.autograd.grad(out, leaves, dout)


def _vs_sdpa_math(device, B, S, H, D, causal, dtype=BF16, monkeypatch=None):
    """Our gradients (FA3 flash_attn_func) against torch SDPA's math backend in fp32 on the same
    tensors, FA3's rule (the bound from attention_ref in the input precision)."""
    from torch.nn.attention import SDPBackend
    gen = torch.Generator().manual_seed(31)
    q, k, v, dout = (_randn(gen, B, S, H, D, dtype=dtype).to(device) for _ in range(4))
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    got = torch.autograd.grad(flash_attn_func(*leaves, causal=causal), leaves, dout)
    if monkeypatch is not None:  # an fp32 reference: no TF32 matmuls
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    ref = _sdpa_grads(q.float(), k.float(), v.float(), dout.float(), causal, SDPBackend.MATH)
    lowp = _attention_lowp_grads(q, k, v, dout, causal)
    for n, a, r, lp in zip("qkv", got, ref, lowp):
        assert a.dtype == dtype and a.shape == r.shape
        assert_close_fa3(a, r, lp, name=f"d{n}", input_dtype=dtype)


def test_cuda_vs_sdpa_math_b2_s1024(cuda, monkeypatch):
    """A realistic size: B 2, S 1024, H 8, D 128, bf16, causal, against SDPA math in fp32."""
    _vs_sdpa_math(cuda, 2, 1024, 8, 128, causal=True, monkeypatch=monkeypatch)


def test_cuda_broadcast_output_grads(cuda):
    """Output gradients as autograd hands them over: dout broadcast from a (Dv,) weight (strides
    (0, 0, 0, 1): every row aliases one row) and dlse of lse.sum() (all strides 0)."""
    gen = torch.Generator().manual_seed(41)
    q = _randn(gen, 2, 130, 8, 128, dtype=BF16)
    k = _randn(gen, 2, 257, 2, 128, dtype=BF16)
    v = _randn(gen, 2, 257, 2, 128, dtype=BF16)
    w = _randn(gen, 128, dtype=BF16)

    def grads(x, compute_dtype=None):
        if compute_dtype is None:
            out, lse = MATE.fmha_fwd(*x, causal=True)
        else:
            out, lse = fmha_ref(*x, causal=True, compute_dtype=compute_dtype)
        gw = w.to(device=out.device, dtype=out.dtype).expand(out.shape)
        return torch.autograd.grad([out, lse], x, [gw, torch.ones((), device=lse.device).expand(lse.shape)])

    got = grads([t.to(cuda).requires_grad_() for t in (q, k, v)])
    ref = grads([t.double().requires_grad_() for t in (q, k, v)], torch.float64)
    lowp = grads([t.clone().requires_grad_() for t in (q, k, v)], BF16)
    for n, a, r, lp in zip("qkv", got, ref, lowp):
        assert_close_fa3(a.cpu().double(), r, lp.double(), name=f"d{n}", input_dtype=BF16)


def test_cuda_empty_batches_with_sink(cuda):
    """No query rows at all (dense batch 0; ragged with every sequence empty) with a learnable
    sink: the gradients have the inputs' shapes and dsink is exactly 0 (not left unwritten)."""
    sink = torch.randn(4, device=cuda)
    for shapes, kw in [
        (((0, 5, 4, 64), (0, 7, 2, 64), (0, 7, 2, 64)), {}),
        (((3, 4, 64), (6, 2, 64), (6, 2, 64)),
         dict(cu_seqlens_q=torch.zeros(3, dtype=torch.int32, device=cuda),
              cu_seqlens_k=torch.tensor([0, 2, 6], dtype=torch.int32, device=cuda), max_seqlen_q=0, max_seqlen_k=4)),
    ]:
        for dtype in (BF16, F32):
            q, k, v = (torch.randn(s, device=cuda).to(dtype) for s in shapes)
            out, lse = MATE.fmha_fwd(q, k, v, learnable_sink=sink, **kw)
            dq, dk, dv, dsink = MATE.fmha_bwd(torch.randn_like(out), q, k, v, out, lse, learnable_sink=sink, **kw)
            assert (dq.shape, dk.shape, dv.shape, dsink.shape) == (q.shape, k.shape, v.shape, sink.shape)
            assert all((x == 0).all() for x in (dq, dk, dv, dsink)), dsink
