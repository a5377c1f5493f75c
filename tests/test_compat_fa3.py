"""FlashAttention-3 compatibility (``mate_ops.flash_attn_interface``).

(a) The signatures equal FA3's ``hopper/flash_attn_interface.py`` (names, order, defaults),
    written down here as a table.
(b) Calls written the way FA3 users and FA3's own tests write them (positional and keyword)
    agree with the oracle (``mate_ops.testing.fmha_ref`` + ``assert_close_fa3``), with FA3's
    return arities and kv-cache append semantics; forward-only behaviour under autograd.
(c) ``torch.library.opcheck`` of every ``torch.ops.mate`` call each wrapper makes, with the
    exact arguments the wrapper produced (captured by a TorchDispatchMode).
(d) ``torch.compile(fullgraph=True, dynamic=True)`` through every wrapper equals eager,
    ``flash_attn_with_kvcache`` with its default ``num_splits=0`` included.
"""
import inspect
import math

import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

import mate_ops  # noqa: F401  (registers torch.ops.mate.*)
from mate_ops import flash_attn_interface as fa3
from mate_ops import testing as T
from mate_ops.flash_attn_interface import (
    flash_attn_combine,
    flash_attn_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
    get_scheduler_metadata,
)
from test_compile import _opcheck

FP8 = torch.float8_e4m3fn
MATE = torch.ops.mate


def _rand(*shape, dtype=torch.bfloat16, device="cpu"):
    x = torch.randn(*shape)
    return ((x * 2).to(FP8) if dtype == FP8 else x.to(dtype)).to(device)


def _i32(values, device="cpu"):
    return torch.tensor(values, dtype=torch.int32, device=device)


def _cu(lengths, device="cpu"):
    return T.random_cu_seqlens(lengths).to(device)


def _bits(t):
    """A view that compares bitwise (NaN patterns and fp8 included)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _assert_same(a, b, what):
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
    assert torch.equal(_bits(a.contiguous()), _bits(b.contiguous())), f"{what} differs"


def _cpu(x):
    return tree_map_only(torch.Tensor, lambda t: t.cpu(), x)


def check_oracle(out, lse, q, k, v, **ref_kw):
    """out (and lse, if given) against the fp64 oracle with FA3's tolerance rule."""
    q, k, v, ref_kw = _cpu((q, k, v, ref_kw))
    out_ref, lse_ref = T.fmha_ref(q, k, v, **ref_kw)
    out_low, _ = T.fmha_ref(q, k, v, compute_dtype=q.dtype, **ref_kw)
    assert out.shape == out_ref.shape and out.dtype == out_ref.dtype, (out.shape, out_ref.shape, out.dtype)
    T.assert_close_fa3(out, out_ref, out_low, input_dtype=q.dtype)
    if lse is not None:
        assert lse.dtype == torch.float32, lse.dtype
        T.assert_lse_close(lse, lse_ref, input_dtype=q.dtype)


# ============================================================================ (a) signatures
# FA3 hopper/flash_attn_interface.py (Dao-AILab/flash-attention@c082294 / @01afd16), written
# out by hand: (name, default); REQ marks a parameter without a default. Every parameter is
# positional-or-keyword.
REQ = object()
FA3_SIGNATURES = {
    "flash_attn_func": [
        ("q", REQ), ("k", REQ), ("v", REQ), ("softmax_scale", None), ("causal", False), ("qv", None),
        ("q_descale", None), ("k_descale", None), ("v_descale", None), ("window_size", (-1, -1)),
        ("attention_chunk", 0), ("softcap", 0.0), ("num_splits", 1), ("pack_gqa", None),
        ("deterministic", False), ("sm_margin", 0), ("return_attn_probs", False),
    ],
    "flash_attn_varlen_func": [
        ("q", REQ), ("k", REQ), ("v", REQ), ("cu_seqlens_q", REQ), ("cu_seqlens_k", REQ),
        ("max_seqlen_q", REQ), ("max_seqlen_k", REQ), ("seqused_q", None), ("seqused_k", None),
        ("softmax_scale", None), ("causal", False), ("qv", None), ("q_descale", None),
        ("k_descale", None), ("v_descale", None), ("window_size", (-1, -1)), ("attention_chunk", 0),
        ("softcap", 0.0), ("num_splits", 1), ("pack_gqa", None), ("deterministic", False),
        ("sm_margin", 0), ("return_attn_probs", False),
    ],
    "flash_attn_combine": [
        ("out_partial", REQ), ("lse_partial", REQ), ("out", None), ("out_dtype", None),
    ],
    "flash_attn_with_kvcache": [
        ("q", REQ), ("k_cache", REQ), ("v_cache", REQ), ("k", None), ("v", None), ("qv", None),
        ("rotary_cos", None), ("rotary_sin", None), ("cache_seqlens", None), ("cache_batch_idx", None),
        ("cache_leftpad", None), ("page_table", None), ("cu_seqlens_q", None), ("cu_seqlens_k_new", None),
        ("max_seqlen_q", None), ("rotary_seqlens", None), ("q_descale", None), ("k_descale", None),
        ("v_descale", None), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
        ("attention_chunk", 0), ("softcap", 0.0), ("rotary_interleaved", True), ("scheduler_metadata", None),
        ("num_splits", 0), ("pack_gqa", None), ("sm_margin", 0), ("return_softmax_lse", False),
    ],
    "get_scheduler_metadata": [
        ("batch_size", REQ), ("max_seqlen_q", REQ), ("max_seqlen_k", REQ), ("num_heads_q", REQ),
        ("num_heads_kv", REQ), ("headdim", REQ), ("cache_seqlens", REQ), ("qkv_dtype", torch.bfloat16),
        ("headdim_v", None), ("cu_seqlens_q", None), ("cu_seqlens_k_new", None), ("cache_leftpad", None),
        ("page_size", None), ("max_seqlen_k_new", 0), ("causal", False), ("window_size", (-1, -1)),
        ("attention_chunk", 0), ("has_softcap", False), ("num_splits", 0), ("pack_gqa", None),
        ("sm_margin", 0),
    ],
}


def _spell(default):
    """Exact spelling of a default: repr tells 0 from 0.0 from False, and (-1, -1) from [-1, -1]."""
    return "<required>" if default is REQ or default is inspect.Parameter.empty else repr(default)


@pytest.mark.parametrize("name", list(FA3_SIGNATURES))
def test_signature_matches_fa3(name):
    params = list(inspect.signature(getattr(fa3, name)).parameters.values())
    ours = [(p.name, _spell(p.default)) for p in params]
    theirs = [(n, _spell(d)) for n, d in FA3_SIGNATURES[name]]
    assert ours == theirs
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)


def test_public_surface_and_docstrings():
    assert sorted(fa3.__all__) == sorted(FA3_SIGNATURES)
    for name in FA3_SIGNATURES:
        assert inspect.getdoc(getattr(fa3, name)), f"{name} has no docstring"
    for name in ("flash_attn_func", "flash_attn_varlen_func"):  # FA3 has a backward for these: so do we
        doc = inspect.getdoc(getattr(fa3, name))
        assert "backward" in doc.lower() and "forward only" not in doc.lower(), name
    for name in ("flash_attn_with_kvcache", "flash_attn_combine"):  # no backward in FA3 either
        assert "NotImplementedError" in inspect.getdoc(getattr(fa3, name)), name


# ============================================================================ (b) FA3-style calls
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_func_positional_and_keyword(device, dtype, causal):
    q, k, v = _rand(2, 37, 4, 64, dtype=dtype), _rand(2, 53, 2, 64, dtype=dtype), _rand(2, 53, 2, 64, dtype=dtype)
    qd, kd, vd = q.to(device), k.to(device), v.to(device)
    out = flash_attn_func(qd, kd, vd, None, causal)  # softmax_scale, causal positional
    assert isinstance(out, torch.Tensor)
    res = flash_attn_func(qd, kd, vd, causal=causal, return_attn_probs=True)
    assert isinstance(res, tuple) and len(res) == 2
    _assert_same(res[0], out, "out (return_attn_probs)")
    check_oracle(res[0], res[1], q, k, v, causal=causal)
    assert res[1].shape == (2, 4, 37)


def test_func_all_positional(device):
    q, k, v = _rand(2, 40, 4, 64), _rand(2, 70, 2, 64), _rand(2, 70, 2, 64)
    q_, k_, v_ = q.to(device), k.to(device), v.to(device)
    # q, k, v, softmax_scale, causal, qv, q/k/v_descale, window_size, attention_chunk, softcap, num_splits,
    # pack_gqa, deterministic, sm_margin, return_attn_probs
    res = flash_attn_func(q_, k_, v_, 0.2, True, None, None, None, None, (12, 0), 32, 8.0, 1, None, False, 0, True)
    assert len(res) == 2
    check_oracle(res[0], res[1], q, k, v, softmax_scale=0.2, causal=True, window_size=(12, 0), attention_chunk=32,
                 softcap=8.0)


@pytest.mark.parametrize("feature", ["qv", "softcap", "local", "chunk", "splits", "pack_gqa", "fp8"])
def test_func_features(device, feature):
    q, k, v = _rand(2, 30, 4, 64), _rand(2, 150, 2, 64), _rand(2, 150, 2, 64)
    kw = {}
    if feature == "qv":  # default scale 1/sqrt(D + Dv)
        v = _rand(2, 150, 2, 32)
        kw = dict(qv=_rand(2, 30, 4, 32), causal=True)
    elif feature == "softcap":
        q = q * 4
        kw = dict(softcap=15.0, causal=True)
    elif feature == "local":
        kw = dict(window_size=(20, 5))
    elif feature == "chunk":
        kw = dict(attention_chunk=48, causal=True)
    elif feature == "splits":
        kw = dict(num_splits=3, causal=True)
    elif feature == "pack_gqa":
        kw = dict(pack_gqa=True, causal=True, deterministic=True, sm_margin=4)
    elif feature == "fp8":
        q, k, v = _rand(2, 30, 4, 64, dtype=FP8), _rand(2, 150, 2, 64, dtype=FP8), _rand(2, 150, 2, 64, dtype=FP8)
        kw = dict(q_descale=torch.rand(2, 2) + 0.5, k_descale=torch.rand(2, 2) + 0.5, v_descale=torch.rand(2, 2) + 0.5,
                  causal=True)
    dev = tree_map_only(torch.Tensor, lambda t: t.to(device), kw)
    out, lse = flash_attn_func(q.to(device), k.to(device), v.to(device), return_attn_probs=True, **dev)
    if feature == "fp8":
        assert out.dtype == torch.bfloat16
    ref_kw = {n: kw[n] for n in kw if n not in ("num_splits", "pack_gqa", "deterministic", "sm_margin")}
    check_oracle(out, lse, q, k, v, **ref_kw)
    if feature == "splits":  # a hint: same result as no split, up to fp32 rounding
        one = flash_attn_func(q.to(device), k.to(device), v.to(device), causal=True)
        torch.testing.assert_close(out, one, atol=1e-2, rtol=1e-2)


def test_varlen_positional_seqused(device):
    """FA3 order: seqused_q / seqused_k are the 8th / 9th positional, then softmax_scale, causal."""
    lq, lk = [5, 0, 33, 12], [17, 9, 40, 1]
    used_q, used_k = [3, 0, 33, 7], [10, 9, 25, 1]
    q, k, v = _rand(sum(lq), 6, 64), _rand(sum(lk), 3, 64), _rand(sum(lk), 3, 64)
    cu_q, cu_k, su_q, su_k = _cu(lq), _cu(lk), _i32(used_q), _i32(used_k)
    d = device
    out = flash_attn_varlen_func(q.to(d), k.to(d), v.to(d), cu_q.to(d), cu_k.to(d), max(lq), max(lk),
                                 su_q.to(d), su_k.to(d), 0.15, True)
    assert isinstance(out, torch.Tensor) and out.shape == (sum(lq), 6, 64)
    res = flash_attn_varlen_func(q.to(d), k.to(d), v.to(d), cu_q.to(d), cu_k.to(d), max(lq), max(lk),
                                 su_q.to(d), su_k.to(d), 0.15, True, return_attn_probs=True)
    assert len(res) == 2 and res[1].shape == (6, sum(lq))
    _assert_same(res[0], out, "out")
    check_oracle(res[0], res[1], q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_q=su_q, seqused_k=su_k,
                 softmax_scale=0.15, causal=True)
    # rows past seqused_q are 0
    assert (out[cu_q[0] + 3:cu_q[1]].float() == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_keyword_like_fa3_tests(device, causal):
    """hopper/test_flash_attn.py's call: positional cu_seqlens/max_seqlen, keywords after."""
    lq, lk = [9, 1, 40], [30, 7, 64]
    q, k, v = _rand(sum(lq), 4, 64), _rand(sum(lk), 2, 64), _rand(sum(lk), 2, 48)
    qv = _rand(sum(lq), 4, 48)
    cu_q, cu_k = _cu(lq), _cu(lk)
    d = device
    out, lse = flash_attn_varlen_func(
        q.to(d), k.to(d), v.to(d), cu_q.to(d), cu_k.to(d), max(lq), max(lk),
        seqused_q=None, seqused_k=None, causal=causal, qv=qv.to(d), q_descale=None, k_descale=None,
        v_descale=None, window_size=(16, -1), attention_chunk=0, softcap=0.0, pack_gqa=None, num_splits=0,
        return_attn_probs=True)
    check_oracle(out, lse, q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=causal, qv=qv, window_size=(16, -1))


# ---------------------------------------------------------------------------- kv cache
B, H, HK, D, CAP, ROT = 3, 4, 2, 32, 48, 16

KV_CASES = {
    #              layout   rotary         leftpad batch_idx varlen_q packed  window    sched  int_seqlens
    "dense":       ("dense", None,          False,  False,    False,   False,  (-1, -1), False, False),
    "dense_int":   ("dense", None,          False,  False,    False,   False,  (-1, -1), False, True),
    "paged_neox":  (8,       "neox",        True,   False,    False,   False,  (-1, -1), True,  False),
    "paged_p1":    (1,       "interleaved", False,  False,    True,    True,   (10, 0),  False, False),
    "batch_idx":   ("dense", "interleaved", True,   True,     True,    True,   (-1, -1), True,  False),
    "no_append":   (5,       None,          False,  False,    False,   False,  (6, 2),   True,  False),
}


def _kv_case(name, gen):
    layout, rotary, leftpad, batch_idx, varlen_q, packed, window, sched, int_seqlens = KV_CASES[name]
    append = name != "no_append"
    rows = B + 2 if batch_idx else B
    q_lens = [2, 1, 3] if varlen_q else [2] * B
    new_lens = ([2, 0, 3] if packed else [2] * B) if append else [0] * B
    cache_lens = [20] * B if int_seqlens else [int(x) for x in torch.randint(4, CAP - 6, (B,), generator=gen)]
    pads = torch.randint(0, 4, (B,), generator=gen)
    pad = [min(int(x), cache_lens[b]) for b, x in enumerate(pads)] if leftpad else None
    idx = torch.randperm(rows, generator=gen)[:B].to(torch.int32) if batch_idx else None
    kd, vd = _rand(rows, CAP, HK, D), _rand(rows, CAP, HK, D)
    c = dict(causal=name != "no_append", window=window, rotary=rotary, sched=sched, q_lens=q_lens, new_lens=new_lens,
             cache_lens=cache_lens, int_seqlens=int_seqlens,
             cache_leftpad=_i32(pad) if pad is not None else None, cache_batch_idx=idx)
    if layout == "dense":
        c.update(k_cache=kd, v_cache=vd, page_table=None)
    else:
        c["k_cache"], c["v_cache"], c["page_table"] = T.make_paged_kv(kd, vd, [CAP] * rows, layout, generator=gen)
    c["q"] = _rand(sum(q_lens), H, D) if varlen_q else _rand(B, q_lens[0], H, D)
    c["cu_seqlens_q"] = _cu(q_lens) if varlen_q else None
    c["k"] = c["v"] = c["cu_seqlens_k_new"] = None
    if append:
        shape = (sum(new_lens), HK, D) if packed else (B, new_lens[0], HK, D)
        c["k"], c["v"] = _rand(*shape), _rand(*shape)
        c["cu_seqlens_k_new"] = _cu(new_lens) if packed else None
    c["cos"] = c["sin"] = None
    if rotary:
        angle = torch.rand(CAP + 4, ROT // 2, generator=gen, dtype=torch.float64) * 6.28
        c["cos"], c["sin"] = angle.cos().to(torch.bfloat16), angle.sin().to(torch.bfloat16)
    return c


def _kv_expected(c):
    """Caches after the call and the oracle's (out, lse) (SEMANTICS §1 "Append and rotary")."""
    inter = c["rotary"] == "interleaved"
    kc, vc = c["k_cache"], c["v_cache"]
    if c["k"] is not None:
        kc, vc = T.kvcache_append_ref(kc, vc, c["k"], c["v"], c["cache_lens"], cu_seqlens_k_new=c["cu_seqlens_k_new"],
                                      page_table=c["page_table"], cache_batch_idx=c["cache_batch_idx"],
                                      rotary_cos=c["cos"], rotary_sin=c["sin"], rotary_interleaved=inter)
    q = c["q"]
    if c["rotary"]:
        per_row = c["causal"] or c["window"] != (-1, -1)
        pos = [c["cache_lens"][b] + (t if per_row else 0) for b in range(B) for t in range(c["q_lens"][b])]
        flat = T.rotary_ref(q if q.dim() == 3 else q.flatten(0, 1), c["cos"], c["sin"], pos, inter)
        q = flat if q.dim() == 3 else flat.view_as(q)
    seqused = _i32([c["cache_lens"][b] + c["new_lens"][b] for b in range(B)])
    ref_kw = dict(cu_seqlens_q=c["cu_seqlens_q"], seqused_k=seqused, page_table=c["page_table"],
                  cache_batch_idx=c["cache_batch_idx"], cache_leftpad=c["cache_leftpad"], causal=c["causal"],
                  window_size=c["window"])
    return kc, vc, q, ref_kw


@pytest.mark.parametrize("name", list(KV_CASES))
def test_with_kvcache_like_fa3_tests(device, name):
    c = _kv_case(name, torch.Generator().manual_seed(len(name)))
    kc_exp, vc_exp, q_rot, ref_kw = _kv_expected(c)
    dev = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    k_cache, v_cache = dev(c["k_cache"].clone()), dev(c["v_cache"].clone())
    cache_seqlens = c["cache_lens"][0] if c["int_seqlens"] else _i32(c["cache_lens"], device)
    max_q = max(c["q_lens"])
    scheduler_metadata = None
    if c["sched"]:  # hopper/test_flash_attn.py::test_flash_attn_kvcache's call, positional head
        scheduler_metadata = get_scheduler_metadata(
            B, max_q, CAP, H, HK, D, cache_seqlens, torch.bfloat16, headdim_v=D,
            cu_seqlens_q=dev(c["cu_seqlens_q"]), cu_seqlens_k_new=dev(c["cu_seqlens_k_new"]),
            cache_leftpad=dev(c["cache_leftpad"]), max_seqlen_k_new=max(c["new_lens"]),
            page_size=None if c["page_table"] is None else c["k_cache"].shape[1],
            causal=c["causal"], window_size=c["window"], attention_chunk=0, num_splits=0)
        assert scheduler_metadata.dtype == torch.int32
    # FA3's test: out, lse, *rest = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, qv=..., rotary_cos=...)
    out, lse, *rest = flash_attn_with_kvcache(
        dev(c["q"]), k_cache, v_cache, dev(c["k"]), dev(c["v"]), qv=None,
        rotary_cos=dev(c["cos"]), rotary_sin=dev(c["sin"]), cache_seqlens=cache_seqlens,
        cache_batch_idx=dev(c["cache_batch_idx"]), cache_leftpad=dev(c["cache_leftpad"]),
        page_table=dev(c["page_table"]), cu_seqlens_q=dev(c["cu_seqlens_q"]),
        cu_seqlens_k_new=dev(c["cu_seqlens_k_new"]), max_seqlen_q=max_q, rotary_seqlens=None,
        causal=c["causal"], window_size=c["window"], attention_chunk=0,
        rotary_interleaved=c["rotary"] == "interleaved", scheduler_metadata=scheduler_metadata,
        num_splits=0, return_softmax_lse=True)
    # FA3's accumulator layouts holding the one merged split (issue: they were empty)
    out_accum, lse_accum = rest
    assert out_accum.dtype == torch.float32 and lse_accum.dtype == torch.float32
    assert out_accum.shape == (1,) + tuple(out.transpose(-3, -2).shape) and lse_accum.shape == (1,) + tuple(lse.shape)
    torch.testing.assert_close(out_accum[0], out.transpose(-3, -2).float())
    torch.testing.assert_close(lse_accum[0], lse)
    # append semantics: the caller's caches now hold exactly the expected caches
    if c["rotary"]:
        torch.testing.assert_close(k_cache.cpu(), kc_exp, atol=1e-2, rtol=1e-2, equal_nan=True)
        changed = (_bits(k_cache.cpu()) != _bits(kc_exp)).flatten(0, 1).any(-1).any(-1)
        assert int(changed.sum()) <= sum(c["new_lens"]), "cache slots outside the appended ones changed"
    else:
        _assert_same(k_cache.cpu(), kc_exp, "k_cache")
    _assert_same(v_cache.cpu(), vc_exp, "v_cache")
    check_oracle(out, lse, q_rot, kc_exp, vc_exp, **ref_kw)
    # the default return is out alone; no second append happens without k/v
    again = flash_attn_with_kvcache(dev(c["q"]) if not c["rotary"] else dev(q_rot), k_cache, v_cache,
                                    cache_seqlens=dev(ref_kw["seqused_k"]), cache_batch_idx=dev(c["cache_batch_idx"]),
                                    cache_leftpad=dev(c["cache_leftpad"]), page_table=dev(c["page_table"]),
                                    cu_seqlens_q=dev(c["cu_seqlens_q"]), max_seqlen_q=max_q, causal=c["causal"],
                                    window_size=c["window"])
    assert isinstance(again, torch.Tensor)
    torch.testing.assert_close(again, out, atol=1e-2, rtol=1e-2)


def test_with_kvcache_arity_is_fa3s_on_mla_shapes(device):
    """FA3 returns 4 values for every call; MATE's MLA route (q dim 64 + qv dim 512) returns 2 in
    mate_ops.mha_interface, the FA3 surface still returns 4."""
    q, qv = _rand(2, 1, 4, 64, device=device), _rand(2, 1, 4, 512, device=device)
    kc, vc = _rand(2, 16, 1, 64, device=device), _rand(2, 16, 1, 512, device=device)
    res = flash_attn_with_kvcache(q, kc, vc, qv=qv, cache_seqlens=_i32([9, 16], device), causal=True,
                                  return_softmax_lse=True)
    assert len(res) == 4 and res[2].shape == (1, 2, 4, 1, 512) and res[3].shape == (1, 2, 4, 1)
    torch.testing.assert_close(res[2][0], res[0].transpose(1, 2).float())
    torch.testing.assert_close(res[3][0], res[1])
    check_oracle(res[0], res[1], q, kc, vc, qv=qv, seqused_k=_i32([9, 16]), causal=True)


def test_combine_fa3_layout(device):
    """FA3's test_flash_attn_combine: lse_partial (splits, b, s, h) seqlen-contiguous view."""
    splits, b, s, h, dv = 4, 2, 7, 3, 16
    out_partial = torch.randn(splits, b, s, h, dv, device=device)
    lse_partial = (torch.randn(splits, b, h, s, device=device) * 3).transpose(-1, -2)  # stride(-2) == 1
    lse_partial[1, :, 0] = -math.inf
    out_ref, lse_ref = T.combine_ref(out_partial.cpu(), lse_partial.cpu())
    for out_dtype in (None, torch.bfloat16):
        out, lse = flash_attn_combine(out_partial, lse_partial, out_dtype=out_dtype)
        assert out.dtype == (out_dtype or torch.float32) and out.shape == (b, s, h, dv) and lse.shape == (b, s, h)
        tol = 1e-5 if out_dtype is None else 1e-2
        torch.testing.assert_close(out.float().cpu(), out_ref, atol=tol, rtol=tol)
        torch.testing.assert_close(lse.cpu(), lse_ref, atol=1e-5, rtol=1e-5)
    buf = T.poison_(torch.empty(b, s, h, dv, device=device))
    out, lse = flash_attn_combine(out_partial, lse_partial, buf)  # out positional
    assert out is buf
    torch.testing.assert_close(buf.cpu(), out_ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- forward only
def _grad_calls(device):
    q, k, v = _rand(1, 5, 2, 16, device=device), _rand(1, 7, 2, 16, device=device), _rand(1, 7, 2, 16, device=device)
    cu = _cu([5], device)
    return {
        "flash_attn_func": lambda q, k, v: flash_attn_func(q, k, v, causal=True),
        "flash_attn_varlen_func": lambda q, k, v: flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 5, 7),
        "flash_attn_with_kvcache": lambda q, k, v: flash_attn_with_kvcache(q, k, v, cache_seqlens=6),
        "flash_attn_combine": lambda q, k, v: flash_attn_combine(q.float()[None], q.float()[None, ..., 0])[0],
    }, (q, k, v)


@pytest.mark.parametrize("name", ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache",
                                  "flash_attn_combine"])
def test_grad_or_forward_only(device, name):
    """flash_attn_func / flash_attn_varlen_func train (FA3 has their backward; gradients are checked
    in tests/test_backward.py); the kv-cache and combine calls are forward-only and raise at backward."""
    calls, (q, k, v) = _grad_calls(device)
    fn = calls[name]
    out = fn(q.detach().requires_grad_(), k, v)
    if name in ("flash_attn_func", "flash_attn_varlen_func"):
        if device != "cpu" and not torch._C._dispatch_has_kernel_for_dispatch_key(
                "mate::fmha_bwd", "CUDA" if device == "cuda" else "PrivateUse1"):
            pytest.skip(f"no {device} backward kernel yet")
        qg = q.detach().requires_grad_()
        (dq,) = torch.autograd.grad(fn(qg, k, v).float().sum(), qg)
        assert dq.shape == q.shape and torch.isfinite(dq).all() and dq.abs().sum() > 0
    else:
        with pytest.raises(NotImplementedError, match="forward-only"):
            out.float().sum().backward()
    with torch.no_grad():  # inference: nothing requires grad
        assert not fn(q.detach().requires_grad_(), k, v).requires_grad
    with torch.inference_mode():
        assert not fn(q, k, v).requires_grad
    assert not fn(q, k, v).requires_grad
    assert not fn(q, k, v).requires_grad


# ============================================================================ (c) opcheck through the wrappers
class CaptureMateOps(TorchDispatchMode):
    """Records every torch.ops.mate call with a snapshot (clone) of its arguments taken before it runs,
    so a mutating op (kvcache_append) is replayed on the caches it actually saw."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "mate":
            args_c, kwargs_c = tree_map_only(torch.Tensor, lambda t: t.clone(), (args, kwargs))
            self.calls.append((func, args_c, kwargs_c))
        return func(*args, **kwargs)


def _wrapper_call(case, device):
    """(function of no argument calling one FA3 wrapper, the mate ops it must reach)."""
    d = device
    if case == "func_gqa_causal_lse":
        q, k, v = _rand(2, 5, 4, 16, device=d), _rand(2, 9, 2, 16, device=d), _rand(2, 9, 2, 16, device=d)
        return lambda: flash_attn_func(q, k, v, None, True, return_attn_probs=True), ["fmha_fwd"]
    if case == "func_qv_softcap_window_chunk":
        q, k, v = _rand(2, 5, 4, 16, device=d), _rand(2, 9, 2, 16, device=d), _rand(2, 9, 2, 8, device=d)
        qv = _rand(2, 5, 4, 8, device=d)
        return lambda: flash_attn_func(q, k, v, qv=qv, softcap=3.0, window_size=(4, 1), attention_chunk=6), ["fmha_fwd"]
    if case == "func_fp8_descale":
        q, k, v = (_rand(2, 5, 2, 16, dtype=FP8, device=d) for _ in range(3))
        ds = [torch.rand(2, 2, device=d) + 0.5 for _ in range(3)]
        return lambda: flash_attn_func(q, k, v, None, True, None, *ds), ["fmha_fwd"]
    if case == "varlen_seqused_splits":
        lq, lk = [3, 5, 0], [130, 6, 2]
        q, k, v = _rand(sum(lq), 4, 16, device=d), _rand(sum(lk), 2, 16, device=d), _rand(sum(lk), 2, 16, device=d)
        cu_q, cu_k, su_q, su_k = _cu(lq, d), _cu(lk, d), _i32([2, 5, 0], d), _i32([129, 6, 1], d)
        return (lambda: flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 130, su_q, su_k, causal=True, num_splits=3,
                                               return_attn_probs=True), ["fmha_fwd"])
    if case == "kvcache_paged_rotary_sched":
        kd, vd = _rand(2, 24, 2, 16), _rand(2, 24, 2, 16)
        kc, vc, pt = (t.to(d) for t in T.make_paged_kv(kd, vd, [24, 24], 5))
        q, k, v = _rand(2, 2, 4, 16, device=d), _rand(2, 2, 2, 16, device=d), _rand(2, 2, 2, 16, device=d)
        cos, sin = torch.rand(40, 8, device=d).bfloat16(), torch.rand(40, 8, device=d).bfloat16()
        cs, pad = _i32([7, 15], d), _i32([2, 0], d)
        meta = get_scheduler_metadata(2, 2, 24, 4, 2, 16, cs, max_seqlen_k_new=2, page_size=5, causal=True,
                                      cache_leftpad=pad)

        def call():
            return flash_attn_with_kvcache(q, kc, vc, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=cs,
                                           cache_leftpad=pad, page_table=pt, causal=True, scheduler_metadata=meta,
                                           return_softmax_lse=True)
        return call, ["fmha_fwd_kvcache"]
    if case == "kvcache_varlen_batch_idx":
        kc, vc = _rand(4, 20, 1, 16, device=d), _rand(4, 20, 1, 16, device=d)
        q, k, v = _rand(5, 2, 16, device=d), _rand(3, 1, 16, device=d), _rand(3, 1, 16, device=d)
        cu_q, cu_new, idx = _cu([2, 3], d), _cu([1, 2], d), _i32([3, 1], d)
        cs = _i32([4, 11], d)
        return (lambda: flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=cs, cache_batch_idx=idx,
                                                cu_seqlens_q=cu_q, cu_seqlens_k_new=cu_new, max_seqlen_q=3,
                                                causal=True),
                ["fmha_fwd_kvcache"])
    if case == "combine":
        op, lp = torch.randn(3, 2, 4, 2, 8, device=d), torch.randn(3, 2, 4, 2, device=d)
        return lambda: flash_attn_combine(op, lp, out_dtype=torch.bfloat16), ["fmha_combine"]
    if case == "combine_out":
        op, lp = torch.randn(3, 2, 4, 2, 8, device=d), torch.randn(3, 2, 4, 2, device=d)
        buf = torch.empty(2, 4, 2, 8, dtype=torch.float16, device=d)
        return lambda: flash_attn_combine(op, lp, buf), ["fmha_combine_out"]
    if case == "scheduler_metadata":
        cs = _i32([40, 7, 23], d)
        return (lambda: get_scheduler_metadata(3, 4, 40, 4, 2, 16, cs, torch.float16, 8, causal=True,
                                               window_size=(8, 0), num_splits=2, sm_margin=2),
                ["get_scheduler_metadata"])
    raise KeyError(case)


OPCHECK_CASES = ["func_gqa_causal_lse", "func_qv_softcap_window_chunk", "func_fp8_descale", "varlen_seqused_splits",
                 "kvcache_paged_rotary_sched", "kvcache_varlen_batch_idx", "combine", "combine_out",
                 "scheduler_metadata"]


# What selected op arguments must be for some cases (FA3 name -> op argument, FA3 defaults).
MAPPED_ARGS = {
    "func_gqa_causal_lse": dict(causal=True, softmax_scale=None, num_splits=1, window_size_left=-1,
                                window_size_right=-1, cu_seqlens_q=None),
    "func_qv_softcap_window_chunk": dict(softcap=3.0, window_size_left=4, window_size_right=1, attention_chunk=6),
    "varlen_seqused_splits": dict(seqused_q=[2, 5, 0], seqused_k=[129, 6, 1], max_seqlen_q=5, max_seqlen_k=130,
                                  causal=True, num_splits=3),
    # one op: the keys end at cache_seqlens + the new keys inside it
    "kvcache_paged_rotary_sched": dict(num_splits=0, causal=True, cache_seqlens=[7, 15], cache_leftpad=[2, 0]),
    "scheduler_metadata": dict(seqused_k=[40, 7, 23], qkv_dtype=torch.float16, headdim_v=8, causal=True,
                               window_size_left=8, window_size_right=0, num_splits=2, sm_margin=2),
}


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck_through_wrapper(device, case):
    call, expected_ops = _wrapper_call(case, device)
    mode = CaptureMateOps()
    with mode:
        call()
    reached = [func._schema.name.split("::")[1] for func, _, _ in mode.calls]
    # (the kv-cache case builds its scheduler metadata before the mode is entered)
    assert reached == expected_ops, reached
    # the FA3 arguments land in the right op arguments (FA3 defaults included)
    func, args, kwargs = mode.calls[-1]
    schema_args = func._schema.arguments  # trailing arguments equal to their default are not passed
    named = {a.name: a.default_value for a in schema_args if a.has_default_value()}
    named.update(zip([a.name for a in schema_args], args), **kwargs)
    for arg, want in MAPPED_ARGS.get(case, {}).items():
        got = named[arg]
        ok = torch.equal(got.cpu(), _i32(want)) if isinstance(got, torch.Tensor) else got == want
        assert ok, f"{func._schema.name}: {arg} = {got!r}, expected {want!r}"
    for func, args, kwargs in mode.calls:
        _opcheck(func, args, kwargs)


# ============================================================================ (d) torch.compile through the wrappers
def _compiled_equal_eager(fn, inputs_per_call, mutated=()):
    """Compile fn (fullgraph, dynamic) once; each call equals eager bitwise, caches included.
    ``mutated``: indices of inputs the call mutates (eager runs on clones of them)."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)  # inductor
    for inputs in inputs_per_call:
        eager_in = [x.clone() if i in mutated else x for i, x in enumerate(inputs)]
        res_e = fn(*eager_in)
        res = compiled(*inputs)
        res_e = res_e if isinstance(res_e, tuple) else (res_e,)
        res = res if isinstance(res, tuple) else (res,)
        assert len(res) == len(res_e)
        for i, (a, b) in enumerate(zip(res, res_e)):
            _assert_same(a, b, f"result {i}")
        for i in mutated:
            _assert_same(inputs[i], eager_in[i], f"mutated input {i}")
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 1, f"expected one graph over {len(inputs_per_call)} shapes, got {graphs}"


def test_compile_flash_attn_func(device):
    def fn(q, k, v, qv):
        return flash_attn_func(q, k, v, None, True, qv, window_size=(9, -1), return_attn_probs=True)

    # first call: every size distinct (no duck-sized symbols), none 0 or 1
    calls = [(_rand(b, s, 4, 16, device=device), _rand(b, sk, 2, 16, device=device), _rand(b, sk, 2, 8, device=device),
              _rand(b, s, 4, 8, device=device)) for b, s, sk in ((3, 5, 11), (2, 7, 13), (4, 3, 17))]
    _compiled_equal_eager(fn, calls)


def test_compile_flash_attn_varlen_func(device):
    def fn(q, k, v, cu_q, cu_k, mq, mk, su_q, su_k):
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, su_q, su_k, None, True, return_attn_probs=True)

    calls = []
    for lq, lk in (([3, 7, 2, 9, 4], [4, 11, 8, 10, 13]), ([2, 7, 4], [5, 7, 11]), ([6, 3, 2, 5], [6, 8, 2, 5])):
        calls.append((_rand(sum(lq), 4, 16, device=device), _rand(sum(lk), 2, 16, device=device),
                      _rand(sum(lk), 2, 16, device=device), _cu(lq, device), _cu(lk, device), max(lq), max(lk),
                      _i32([max(x - 1, 0) for x in lq], device), _i32(lk, device)))
    _compiled_equal_eager(fn, calls)


@pytest.mark.parametrize("with_metadata", [False, True])
def test_compile_flash_attn_with_kvcache(device, with_metadata):
    """A decode step with the default num_splits=0 (heuristic), rotary, in-place append and FA3's
    4-value return; optionally get_scheduler_metadata inside the compiled region."""

    def step(q, k_cache, v_cache, k, v, cache_seqlens, cos, sin):
        meta = None
        if with_metadata:
            meta = get_scheduler_metadata(q.shape[0], q.shape[1], k_cache.shape[1], q.shape[2], k_cache.shape[2],
                                          q.shape[3], cache_seqlens, q.dtype, max_seqlen_k_new=k.shape[1],
                                          causal=True)
        return flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin,
                                       cache_seqlens=cache_seqlens, causal=True, rotary_interleaved=False,
                                       scheduler_metadata=meta, return_softmax_lse=True)

    cos, sin = torch.rand(80, 8, device=device), torch.rand(80, 8, device=device)
    calls = []
    for bsz, cap, lens in ((3, 40, [0, 17, 37]), (5, 24, [21, 0, 4, 11, 9]), (2, 56, [53, 30])):
        calls.append((_rand(bsz, 1, H, 16, dtype=torch.float32, device=device),
                      _rand(bsz, cap, HK, 16, dtype=torch.float32, device=device),
                      _rand(bsz, cap, HK, 16, dtype=torch.float32, device=device),
                      _rand(bsz, 1, HK, 16, dtype=torch.float32, device=device),
                      _rand(bsz, 1, HK, 16, dtype=torch.float32, device=device), _i32(lens, device), cos, sin))
    _compiled_equal_eager(step, calls, mutated=(1, 2))


def test_compile_flash_attn_combine(device):
    def fn(out_partial, lse_partial):
        return flash_attn_combine(out_partial, lse_partial, None, torch.bfloat16)

    calls = [(torch.randn(s, b, sq, 4, 8, device=device), torch.randn(s, b, 4, sq, device=device).transpose(-1, -2))
             for s, b, sq in ((3, 2, 5), (2, 4, 7), (5, 3, 2))]  # first call: sizes 3, 2, 5, 4 (heads), 8
    _compiled_equal_eager(fn, calls)
