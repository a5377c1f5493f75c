"""MATE call forms from the compatibility issue, called the way a MATE (or FA3 / FlashMLA) user
calls them, checked against the oracle in mate_ops.testing (random inputs, poisoned out=)."""
import pytest
import torch

import mate_ops  # noqa: F401  (registers torch.ops.mate.*)
from mate_ops import flash_attn_interface as fa3
from mate_ops import flash_mla as FM
from mate_ops import flashmla
from mate_ops import mha_interface as mi
from mate_ops.testing import fmha_ref, kvcache_append_ref, mla_decode_ref, poison_, rotary_ref

ATOL = 2e-4  # fp32 inputs against the fp64 oracle


def _i32(xs, device=None):
    return torch.tensor(xs, dtype=torch.int32, device=device)


def _close(got, want, name, atol=ATOL):
    assert not torch.isnan(got).any(), f"{name} has NaN"
    torch.testing.assert_close(got.cpu().to(want.dtype), want, atol=atol, rtol=1e-3, msg=lambda m: f"{name}: {m}")


def _close_lse(got, want, name):
    got, want = got.cpu().double(), want.double()
    assert torch.equal(torch.isinf(got), torch.isinf(want)), f"{name}: infinities differ"
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], atol=ATOL, rtol=1e-3)


# ---------------------------------------------------------------- 1. attention_chunk rotates q per row
@pytest.mark.parametrize("interleaved", [True, False])
def test_kvcache_attention_chunk_rotary_not_causal_rotates_q_per_row(device, interleaved):
    B, Sq, H, Hk, D, Sk, chunk = 2, 3, 4, 2, 32, 24, 8
    lens = [5, 13]
    q = torch.randn(B, Sq, H, D)
    k_new, v_new = torch.randn(B, Sq, Hk, D), torch.randn(B, Sq, Hk, D)
    kc, vc = torch.randn(B, Sk, Hk, D), torch.randn(B, Sk, Hk, D)
    cos, sin = torch.randn(Sk, 8), torch.randn(Sk, 8)  # R = 16 rotated channels
    kc_d, vc_d = kc.clone().to(device), vc.clone().to(device)
    out, lse, *_ = mi.flash_attn_with_kvcache(
        q.to(device), kc_d, vc_d, k=k_new.to(device), v=v_new.to(device), rotary_cos=cos.to(device),
        rotary_sin=sin.to(device), cache_seqlens=_i32(lens, device), causal=False, window_size=(-1, -1),
        attention_chunk=chunk, rotary_interleaved=interleaved, return_softmax_lse=True)
    # FA3's is_local counts attention_chunk: q row t is rotated at cache_seqlens[b] + t
    q_rot = torch.stack([rotary_ref(q[b], cos, sin, [lens[b] + t for t in range(Sq)], interleaved)
                         for b in range(B)])
    kc_exp, vc_exp = kvcache_append_ref(kc, vc, k_new, v_new, lens, rotary_cos=cos, rotary_sin=sin,
                                        rotary_interleaved=interleaved)
    _close(kc_d, kc_exp, "k_cache")
    _close(vc_d, vc_exp, "v_cache")
    out_ref, lse_ref = fmha_ref(q_rot, kc_exp, vc_exp, seqused_k=_i32([n + Sq for n in lens]),
                                attention_chunk=chunk)
    _close(out, out_ref, "out")
    _close_lse(lse, lse_ref, "lse")


# ---------------------------------------------------------------- 2. window_size sides given as None
@pytest.mark.parametrize("window,as_ints", [((None, None), (-1, -1)), ((None, 3), (-1, 3)), ((2, None), (2, -1))])
def test_window_none_sides_varlen_and_kvcache(device, window, as_ints):
    H, Hk, D = 4, 2, 32
    lq, lk = [5, 9], [11, 9]
    cu_q, cu_k = _i32([0, 5, 14]), _i32([0, 11, 20])
    q, k, v = torch.randn(14, H, D), torch.randn(20, Hk, D), torch.randn(20, Hk, D)
    out = poison_(torch.empty(14, H, D, device=device))
    res, lse = mi.flash_attn_varlen_func(q.to(device), k.to(device), v.to(device), cu_q.to(device),
                                         cu_k.to(device), max(lq), max(lk), window_size=window,
                                         return_softmax_lse=True, out=out)
    assert res is out
    out_ref, lse_ref = fmha_ref(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, window_size=as_ints)
    _close(out, out_ref, "varlen out")
    _close_lse(lse, lse_ref, "varlen lse")

    qd, kc, vc = torch.randn(2, 4, H, D), torch.randn(2, 16, Hk, D), torch.randn(2, 16, Hk, D)
    cs = _i32([7, 16])
    o2, l2, *_ = mi.flash_attn_with_kvcache(qd.to(device), kc.to(device), vc.to(device), cache_seqlens=cs.to(device),
                                            window_size=window, return_softmax_lse=True)
    o2_ref, l2_ref = fmha_ref(qd, kc, vc, seqused_k=cs, window_size=as_ints)
    _close(o2, o2_ref, "kvcache out")
    _close_lse(l2, l2_ref, "kvcache lse")


# ---------------------------------------------------------------- MLA helpers
def _need_mla_kernels(device):
    """Skip a device whose build has no MLA kernels (CUDA builds have them; see the README table)."""
    if device != "cpu":
        key = "CUDA" if device == "cuda" else "PrivateUse1"
        if not torch._C._dispatch_has_kernel_for_dispatch_key("mate::mla_decode", key):
            pytest.skip(f"no {device} kernel yet for mate::mla_decode")


def _mla_inputs(device, B=2, Sq=2, H=4, D=576, P=16, nb=6, topk=12):
    q = torch.randn(B, Sq, H, D, dtype=torch.bfloat16)
    kc = torch.randn(nb, P, 1, D, dtype=torch.bfloat16)
    idx = torch.randint(-1, nb * P, (B, Sq, topk), dtype=torch.int32)
    idx[0, 0, :3] = -1  # some invalid slots
    return q, kc, idx


def _mla_check(out, lse, ref):
    out_ref, lse_ref = ref
    _close(out.float(), out_ref.float(), "mla out", atol=2e-2)
    _close_lse(lse, lse_ref, "mla lse")


# ---------------------------------------------------------------- 3. get_mla_metadata(cache_seqlens=None)
@pytest.mark.parametrize("batch_hint", ["none", "bs", "q"])
def test_sparse_decode_with_metadata_from_no_cache_seqlens(device, batch_hint):
    _need_mla_kernels(device)
    q, kc, idx = _mla_inputs(device)
    B, Sq, H, _ = q.shape
    topk = idx.shape[-1]
    hint = {"none": {}, "bs": {"bs": B}, "q": {"q": q.to(device)}}[batch_hint]
    meta, splits = flashmla.get_mla_metadata(None, Sq * H, 1, num_heads_q=H, is_fp8_kvcache=False, topk=topk,
                                             **hint)
    assert meta.dtype == torch.int32 and splits.dtype == torch.int32
    assert splits.shape == ((1,) if batch_hint == "none" else (B + 1,))
    out, lse = flashmla.flash_mla_with_kvcache(q.to(device), kc.to(device), None, None, 512, meta.to(device),
                                               splits.to(device), indices=idx.to(device))
    _mla_check(out, lse, mla_decode_ref(q, kc, None, None, 512, indices=idx))


# ---------------------------------------------------------------- 4. (B, Sq, 1, topk) indices
@pytest.mark.parametrize("api", ["mate", "flashmla"])
def test_sparse_indices_with_heads_dim(device, api):
    _need_mla_kernels(device)
    q, kc, idx = _mla_inputs(device)
    ekc = torch.randn(3, 32, 1, 576, dtype=torch.bfloat16)
    eidx = torch.randint(-1, 3 * 32, (2, 2, 5), dtype=torch.int32)
    topk_len, etopk_len = _i32([10, 7]), _i32([5, 2])
    d = lambda t: t.to(device)  # noqa: E731
    kw = dict(indices=d(idx[:, :, None]), extra_k_cache=d(ekc), extra_indices_in_kvcache=d(eidx[:, :, None]),
              topk_length=d(topk_len), extra_topk_length=d(etopk_len))
    if api == "mate":
        out, lse = flashmla.flash_mla_with_kvcache(d(q), d(kc), None, None, 512, None, None, **kw)
    else:
        meta, _ = FM.get_mla_metadata()
        out, lse = FM.flash_mla_with_kvcache(d(q), d(kc), None, None, 512, meta, None, **kw)
    _mla_check(out, lse, mla_decode_ref(q, kc, None, None, 512, indices=idx, extra_k_cache=ekc,
                                        extra_indices_in_kvcache=eidx, topk_length=topk_len,
                                        extra_topk_length=etopk_len))


@pytest.mark.parametrize("name", ["indices", "extra_indices_in_kvcache"])
def test_sparse_indices_4d_with_several_heads_raises(device, name):
    _need_mla_kernels(device)
    q, kc, idx = _mla_inputs(device)
    kw = dict(indices=idx.to(device), extra_k_cache=kc.to(device), extra_indices_in_kvcache=idx.to(device))
    kw[name] = torch.stack([idx, idx], 2).to(device)
    with pytest.raises(ValueError, match=name):
        flashmla.flash_mla_with_kvcache(q.to(device), kc.to(device), None, None, 512, None, None, **kw)


# ---------------------------------------------------------------- 6. 3-D paged MLA caches
@pytest.mark.parametrize("api", ["mate", "flashmla"])
def test_three_dim_mla_cache_dense_and_sparse(device, api):
    _need_mla_kernels(device)
    q, kc, idx = _mla_inputs(device)
    B = q.shape[0]
    table = torch.randperm(kc.shape[0], dtype=torch.int32)[:B * 3].reshape(B, 3)
    cs = _i32([40, 17])
    d = lambda t: t.to(device)  # noqa: E731
    if api == "mate":
        call = lambda *a, **kw: flashmla.flash_mla_with_kvcache(*a, None, None, **kw)  # noqa: E731
    else:
        call = lambda *a, **kw: FM.flash_mla_with_kvcache(*a, FM.get_mla_metadata()[0], None, **kw)  # noqa: E731
    out, lse = call(d(q), d(kc[:, :, 0]), d(table), d(cs), 512, causal=True)
    _mla_check(out, lse, mla_decode_ref(q, kc, table, cs, 512, causal=True))
    ekc = torch.randn(2, 16, 1, 576, dtype=torch.bfloat16)
    eidx = torch.randint(0, 32, (2, 2, 4), dtype=torch.int32)
    out, lse = call(d(q), d(kc[:, :, 0]), None, None, 512, indices=d(idx), extra_k_cache=d(ekc[:, :, 0]),
                    extra_indices_in_kvcache=d(eidx))
    _mla_check(out, lse, mla_decode_ref(q, kc, None, None, 512, indices=idx, extra_k_cache=ekc,
                                        extra_indices_in_kvcache=eidx))


# ---------------------------------------------------------------- 5. num_splits=-1 ("do not split")
def test_num_splits_minus_one(device):
    H, Hk, D = 4, 2, 32
    cu_q, cu_k = _i32([0, 3, 8]), _i32([0, 30, 37])
    q, k, v = torch.randn(8, H, D), torch.randn(37, Hk, D), torch.randn(37, Hk, D)
    out_ref, lse_ref = fmha_ref(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True)
    out = poison_(torch.empty(8, H, D, device=device))
    _, lse = mi.flash_attn_varlen_func(q.to(device), k.to(device), v.to(device), cu_q.to(device), cu_k.to(device),
                                       5, 30, causal=True, num_splits=-1, return_softmax_lse=True, out=out)
    _close(out, out_ref, "varlen out")
    _close_lse(lse, lse_ref, "varlen lse")
    o3 = fa3.flash_attn_varlen_func(q.to(device), k.to(device), v.to(device), cu_q.to(device), cu_k.to(device),
                                    5, 30, causal=True, num_splits=-1)
    _close(o3, out_ref, "fa3 varlen out")

    qd, kc, vc = torch.randn(2, 1, H, D), torch.randn(2, 64, Hk, D), torch.randn(2, 64, Hk, D)
    cs = _i32([64, 21])
    meta = mi.get_scheduler_metadata(2, 1, 64, H, Hk, D, seqused_k=cs.to(device), qkv_dtype=torch.float32,
                                     num_splits=-1)
    assert meta.dtype == torch.int32 and meta.shape == (3,)
    ref = fmha_ref(qd, kc, vc, seqused_k=cs)
    for md in (None, meta):
        o, l, *_ = mi.flash_attn_with_kvcache(qd.to(device), kc.to(device), vc.to(device), cache_seqlens=cs.to(device),
                                              num_splits=-1, scheduler_metadata=md, return_softmax_lse=True)
        _close(o, ref[0], "kvcache out")
        _close_lse(l, ref[1], "kvcache lse")
    o, l, *_ = fa3.flash_attn_with_kvcache(qd.to(device), kc.to(device), vc.to(device), cache_seqlens=cs.to(device),
                                           num_splits=-1, return_softmax_lse=True)
    _close(o, ref[0], "fa3 kvcache out")


# ---------------------------------------------------------------- 7. (workspace, bool) scheduler_metadata
def test_scheduler_metadata_tuple_forms(device):
    H, Hk, D = 4, 2, 32
    qd, kc, vc = torch.randn(2, 2, H, D), torch.randn(2, 40, Hk, D), torch.randn(2, 40, Hk, D)
    cs = _i32([40, 9])
    ref = fmha_ref(qd, kc, vc, seqused_k=cs, causal=True)
    ours = mi.get_scheduler_metadata(2, 2, 40, H, Hk, D, seqused_k=cs.to(device), qkv_dtype=torch.float32,
                                     causal=True)
    workspace = torch.zeros(1024, dtype=torch.uint8, device=device)  # MATE's MLA route workspace
    for md in ((workspace, True), [workspace, False], (ours, True), (workspace, ours)):
        o, l, *_ = mi.flash_attn_with_kvcache(qd.to(device), kc.to(device), vc.to(device), cache_seqlens=cs.to(device),
                                              causal=True, scheduler_metadata=md, return_softmax_lse=True)
        _close(o, ref[0], f"kvcache out {type(md).__name__}")
        _close_lse(l, ref[1], "kvcache lse")
    cu_q, cu_k = _i32([0, 2, 4]), _i32([0, 40, 49])
    q, k, v = qd.reshape(4, H, D), torch.cat([kc[0], kc[1, :9]]), torch.cat([vc[0], vc[1, :9]])
    out = poison_(torch.empty(4, H, D, device=device))
    mi.flash_attn_varlen_func(q.to(device), k.to(device), v.to(device), cu_q.to(device), cu_k.to(device), 2, 40,
                              causal=True, scheduler_metadata=(workspace, True), out=out)
    _close(out, ref[0].reshape(4, H, D), "varlen out")


# ---------------------------------------------------------------- 8. FA3's split accumulators
@pytest.mark.parametrize("varlen", [False, True])
def test_fa3_kvcache_accumulators_filled(device, varlen):
    H, Hk, D = 4, 2, 32
    kc, vc = torch.randn(2, 24, Hk, D), torch.randn(2, 24, Hk, D)
    cs = _i32([24, 10])
    if varlen:
        q, cu_q = torch.randn(5, H, D), _i32([0, 2, 5])
        kw = dict(cu_seqlens_q=cu_q.to(device), max_seqlen_q=3)
        ref = fmha_ref(q, kc, vc, cu_seqlens_q=cu_q, seqused_k=cs, causal=True)
    else:
        q, kw = torch.randn(2, 3, H, D), {}
        ref = fmha_ref(q, kc, vc, seqused_k=cs, causal=True)
    out, lse, out_accum, lse_accum = fa3.flash_attn_with_kvcache(
        q.to(device), kc.to(device), vc.to(device), cache_seqlens=cs.to(device), causal=True,
        return_softmax_lse=True, **kw)
    _close(out, ref[0], "out")
    _close_lse(lse, ref[1], "lse")
    assert out_accum.dtype == torch.float32 and lse_accum.dtype == torch.float32
    # FA3 layouts: (num_splits, B, H, Sq, Dv) / (num_splits, B, H, Sq); varlen (num_splits, H, total_q, Dv)
    assert out_accum.shape == (1,) + tuple(ref[0].transpose(-3, -2).shape)
    assert lse_accum.shape == (1,) + tuple(ref[1].shape)
    _close(out_accum[0], ref[0].transpose(-3, -2), "out_accum")
    _close_lse(lse_accum[0], ref[1], "lse_accum")
