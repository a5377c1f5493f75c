"""Tests of the pure-PyTorch oracle (mate_ops/testing/) itself.

The oracle is checked against torch.nn.functional.scaled_dot_product_attention in
float64 with explicit masks, and against itself across layouts (ragged, paged,
split/combined, context parallel).  Run with:

    cd /work/main && PYTHONPATH=. python3 -m pytest -q tests/test_oracle.py
"""

import math

import pytest
import torch
import torch.nn.functional as F


# the oracle is pure PyTorch; conftest has imported mate_ops (registering the ops) already
import mate_ops.testing as mt  # noqa: E402
fmha_ref = mt.fmha_ref
combine_ref = mt.combine_ref

F64 = torch.float64
INF = math.inf
TOL = dict(atol=1e-10, rtol=1e-10)


def rnd(*shape, dtype=F64, gen=None):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


# ----------------------------------------------------------------------------- helpers
def naive_mask(sq, sk, causal=False, window=(-1, -1), chunk=0, cols=None):
    """Allowed[i, n] by double Python loop, straight from SEMANTICS 1 'Masks'."""
    left, right = window
    if causal:
        right = 0
    cols = list(range(sk)) if cols is None else cols
    m = torch.zeros(sq, len(cols), dtype=torch.bool)
    for i in range(sq):
        a = i + sk - sq
        for n, j in enumerate(cols):
            ok = 0 <= j < sk
            if left >= 0 and j < a - left:
                ok = False
            if right >= 0 and j > a + right:
                ok = False
            if chunk > 0:
                lo = (a // chunk) * chunk
                if not (lo <= j < lo + chunk):
                    ok = False
            m[i, n] = ok
    return m


def sdpa(q, k, v, mask=None, scale=None, add=None, gqa="enable"):
    """SDPA in the (B, S, H, D) layout; mask bool (Sq, Sk), add float (B|1, H|1, Sq, Sk)."""
    H, Hk = q.shape[2], k.shape[2]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if H != Hk and gqa == "repeat":
        kt = kt.repeat_interleave(H // Hk, dim=1)
        vt = vt.repeat_interleave(H // Hk, dim=1)
    attn = None
    if mask is not None:
        attn = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, -INF)
    if add is not None:
        attn = add if attn is None else attn + add
    o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=attn, scale=scale,
                                       enable_gqa=(H != Hk and gqa == "enable"))
    return o.transpose(1, 2)


def sdpa_lse(q, k, v, mask=None, scale=None, add=None):
    """lse (B, H, Sq) recovered from SDPA: append a key with score 0 whose value is a
    one-hot extra channel; that channel's output is 1 / (Z + 1), so lse = log(1/p - 1)."""
    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    k_aug = torch.cat([k, torch.zeros(B, 1, Hk, D, dtype=k.dtype)], dim=1)
    v_aug = torch.cat([v, torch.zeros(B, Sk, Hk, 1, dtype=v.dtype)], dim=3)
    extra = torch.zeros(B, 1, Hk, v.shape[3] + 1, dtype=v.dtype)
    extra[..., -1] = 1.0
    v_aug = torch.cat([v_aug, extra], dim=1)
    m = None if mask is None else torch.cat([mask, torch.ones(Sq, 1, dtype=torch.bool)], dim=1)
    a = None if add is None else torch.cat([add, torch.zeros(*add.shape[:-1], 1, dtype=add.dtype)], dim=-1)
    p = sdpa(q, k_aug, v_aug, mask=m, scale=scale, add=a)[..., -1]  # (B, Sq, H)
    return torch.log(1.0 / p - 1.0).transpose(1, 2)


def qkv(B, Sq, Sk, H, Hk, D, Dv, gen, dtype=F64):
    return (rnd(B, Sq, H, D, dtype=dtype, gen=gen), rnd(B, Sk, Hk, D, dtype=dtype, gen=gen),
            rnd(B, Sk, Hk, Dv, dtype=dtype, gen=gen))


def check_masked(out, lse, mask, q, k, v, **kw):
    """Rows with an allowed key match SDPA (out and lse); other rows are 0 / -inf."""
    ok_rows = mask.any(dim=1)
    ref = sdpa(q, k, v, mask=mask, **kw)
    ref_lse = sdpa_lse(q, k, v, mask=mask, **kw)
    torch.testing.assert_close(out[:, ok_rows], ref[:, ok_rows], **TOL)
    torch.testing.assert_close(lse[:, :, ok_rows], ref_lse[:, :, ok_rows].float(), atol=1e-5, rtol=1e-6)
    assert (out[:, ~ok_rows] == 0).all()
    assert (lse[:, :, ~ok_rows] == -INF).all()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()


# ----------------------------------------------------------------------------- dense
@pytest.mark.parametrize("Sq,Sk,D,Dv", [(5, 7, 16, 16), (1, 9, 8, 12), (6, 3, 32, 8)])
def test_dense_noncausal(gen, Sq, Sk, D, Dv):
    q, k, v = qkv(2, Sq, Sk, 3, 3, D, Dv, gen)
    out, lse = fmha_ref(q, k, v)
    assert out.shape == (2, Sq, 3, Dv) and out.dtype == F64
    assert lse.shape == (2, 3, Sq) and lse.dtype == torch.float32
    torch.testing.assert_close(out, sdpa(q, k, v), **TOL)
    torch.testing.assert_close(lse, sdpa_lse(q, k, v).float(), atol=1e-5, rtol=1e-6)
    # direct logsumexp as well
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1).float())


def test_explicit_scale(gen):
    q, k, v = qkv(1, 4, 6, 2, 2, 16, 16, gen)
    out, lse = fmha_ref(q, k, v, softmax_scale=0.37)
    torch.testing.assert_close(out, sdpa(q, k, v, scale=0.37), **TOL)
    torch.testing.assert_close(lse, sdpa_lse(q, k, v, scale=0.37).float())


def test_causal_sq_lt_sk_bottom_right(gen):
    Sq, Sk = 4, 9
    q, k, v = qkv(2, Sq, Sk, 2, 2, 16, 16, gen)
    out, lse = fmha_ref(q, k, v, causal=True)
    mask = torch.ones(Sq, Sk, dtype=torch.bool).tril(diagonal=Sk - Sq)
    check_masked(out, lse, mask, q, k, v)
    # causal == window (-1, 0)
    out2, lse2 = fmha_ref(q, k, v, window_size=(-1, 0))
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


def test_causal_sq_gt_sk_first_rows_zero(gen):
    Sq, Sk = 7, 4
    q, k, v = qkv(2, Sq, Sk, 2, 2, 8, 8, gen)
    out, lse = fmha_ref(q, k, v, causal=True)
    mask = torch.ones(Sq, Sk, dtype=torch.bool).tril(diagonal=Sk - Sq)
    assert not mask[: Sq - Sk].any() and mask[Sq - Sk:].any(dim=1).all()
    check_masked(out, lse, mask, q, k, v)
    assert (out[:, : Sq - Sk] == 0).all() and (lse[:, :, : Sq - Sk] == -INF).all()


@pytest.mark.parametrize("causal", [False, True])
def test_gqa(gen, causal):
    Sq, Sk, H, Hk = 5, 8, 6, 2
    q, k, v = qkv(2, Sq, Sk, H, Hk, 16, 8, gen)
    out, lse = fmha_ref(q, k, v, causal=causal)
    mask = torch.ones(Sq, Sk, dtype=torch.bool)
    if causal:
        mask = mask.tril(diagonal=Sk - Sq)
    torch.testing.assert_close(out, sdpa(q, k, v, mask=mask, gqa="enable"), **TOL)
    torch.testing.assert_close(out, sdpa(q, k, v, mask=mask, gqa="repeat"), **TOL)
    torch.testing.assert_close(lse, sdpa_lse(q, k, v, mask=mask).float())
    # head h must use kv head h // G: same as the MHA oracle on repeated kv
    out_r, lse_r = fmha_ref(q, k.repeat_interleave(H // Hk, 2), v.repeat_interleave(H // Hk, 2), causal=causal)
    torch.testing.assert_close(out, out_r, **TOL)
    torch.testing.assert_close(lse, lse_r)


@pytest.mark.parametrize("Sq,Sk", [(5, 11), (9, 4), (6, 6)])
@pytest.mark.parametrize("causal,window,chunk", [
    (False, (2, 1), 0), (False, (3, -1), 0), (False, (-1, 2), 0), (True, (2, -1), 0),
    (True, (1, 5), 0), (False, (0, 0), 0), (True, (-1, -1), 4), (False, (-1, -1), 3),
    (False, (2, 2), 4), (True, (3, -1), 2),
])
def test_windows_and_chunks(gen, Sq, Sk, causal, window, chunk):
    q, k, v = qkv(1, Sq, Sk, 2, 1, 8, 8, gen)
    out, lse = fmha_ref(q, k, v, causal=causal, window_size=window, attention_chunk=chunk)
    mask = naive_mask(Sq, Sk, causal, window, chunk)
    check_masked(out, lse, mask, q, k, v)


def test_causal_window_sets_right_zero(gen):
    q, k, v = qkv(1, 5, 8, 2, 2, 8, 8, gen)
    a = fmha_ref(q, k, v, causal=True, window_size=(2, 3))
    b = fmha_ref(q, k, v, window_size=(2, 0))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_softcap(gen):
    Sq, Sk, D, cap = 5, 7, 16, 1.5
    q, k, v = qkv(2, Sq, Sk, 2, 2, D, D, gen)
    q = q * 3  # make the cap matter
    out, lse = fmha_ref(q, k, v, softcap=cap, causal=True)
    raw = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    add = cap * torch.tanh(raw / cap) - raw  # SDPA adds this to its own raw scores
    mask = torch.ones(Sq, Sk, dtype=torch.bool).tril(diagonal=Sk - Sq)
    torch.testing.assert_close(out, sdpa(q, k, v, mask=mask, add=add), **TOL)
    torch.testing.assert_close(lse, sdpa_lse(q, k, v, mask=mask, add=add).float())
    out0, _ = fmha_ref(q, k, v, causal=True)
    assert (out - out0).abs().max() > 1e-3


def test_qv(gen):
    B, Sq, Sk, H, Hk, D, Dv = 2, 4, 6, 4, 2, 16, 8
    q, k, v = qkv(B, Sq, Sk, H, Hk, D, Dv, gen)
    qv = rnd(B, Sq, H, Dv, gen=gen)
    out, lse = fmha_ref(q, k, v, qv=qv, causal=True)
    # s = scale * (<q,k> + <qv,v>) = scale * <[q,qv], [k,v]>, default scale 1/sqrt(D+Dv)
    qc, kc = torch.cat([q, qv], -1), torch.cat([k, v], -1)
    mask = torch.ones(Sq, Sk, dtype=torch.bool).tril(diagonal=Sk - Sq)
    torch.testing.assert_close(out, sdpa(qc, kc, v, mask=mask, scale=1 / math.sqrt(D + Dv)), **TOL)
    torch.testing.assert_close(lse, sdpa_lse(qc, kc, v, mask=mask, scale=1 / math.sqrt(D + Dv)).float())


# ----------------------------------------------------------------------------- sink
def test_sink_formula(gen):
    B, Sq, Sk, H, Hk, D = 2, 5, 7, 4, 2, 16
    q, k, v = qkv(B, Sq, Sk, H, Hk, D, D, gen)
    sink = rnd(H, gen=gen)
    out, lse = fmha_ref(q, k, v, learnable_sink=sink, causal=True)
    mask = torch.ones(Sq, Sk, dtype=torch.bool).tril(diagonal=Sk - Sq)
    # SDPA with an extra zero key / zero value whose (unscaled) score is sink[h]
    k_aug = torch.cat([k, torch.zeros(B, 1, Hk, D, dtype=F64)], 1)
    v_aug = torch.cat([v, torch.zeros(B, 1, Hk, D, dtype=F64)], 1)
    m_aug = torch.cat([mask, torch.ones(Sq, 1, dtype=torch.bool)], 1)
    add = torch.zeros(1, H, Sq, Sk + 1, dtype=F64)
    add[..., -1] = sink.view(H, 1)
    torch.testing.assert_close(out, sdpa(q, k_aug, v_aug, mask=m_aug, add=add), **TOL)
    _, lse0 = fmha_ref(q, k, v, causal=True)
    torch.testing.assert_close(lse, torch.logaddexp(lse0.double(), sink.view(1, H, 1)).float())
    # sink is NOT multiplied by the softmax scale
    out_s, _ = fmha_ref(q, k, v, learnable_sink=sink, causal=True, softmax_scale=0.05)
    add2 = add.clone()
    k2 = torch.cat([k, torch.zeros(B, 1, Hk, D, dtype=F64)], 1)
    torch.testing.assert_close(out_s, sdpa(q, k2, v_aug, mask=m_aug, add=add2, scale=0.05), **TOL)


def test_sink_fully_masked_row(gen):
    Sq, Sk, H = 6, 3, 2
    q, k, v = qkv(1, Sq, Sk, H, H, 8, 8, gen)
    sink = torch.tensor([0.3, -1.2], dtype=torch.float32)
    out, lse = fmha_ref(q, k, v, learnable_sink=sink, causal=True)
    assert (out[:, : Sq - Sk] == 0).all()
    torch.testing.assert_close(lse[0, :, : Sq - Sk], sink.view(H, 1).expand(H, Sq - Sk))
    # empty key set with a sink
    out, lse = fmha_ref(q, k, v, learnable_sink=sink, seqused_k=torch.tensor([0], dtype=torch.int32))
    assert (out == 0).all()
    torch.testing.assert_close(lse[0], sink.view(H, 1).expand(H, Sq))


def test_empty_keys(gen):
    q, k, v = qkv(2, 3, 4, 2, 2, 8, 8, gen)
    out, lse = fmha_ref(q, k, v, seqused_k=torch.tensor([0, 4], dtype=torch.int32))
    assert (out[0] == 0).all() and (lse[0] == -INF).all()
    torch.testing.assert_close(out[1:], fmha_ref(q[1:], k[1:], v[1:])[0], **TOL)
    out, lse = fmha_ref(q, k[:, :0], v[:, :0])
    assert (out == 0).all() and (lse == -INF).all()


# ----------------------------------------------------------------------------- padded / leftpad
def test_seqused_and_leftpad_dense(gen):
    B, Sq, Sk, H = 3, 6, 10, 2
    q, k, v = qkv(B, Sq, Sk, H, H, 8, 8, gen)
    used_q = torch.tensor([6, 2, 0], dtype=torch.int32)
    used_k = torch.tensor([10, 7, 5], dtype=torch.int32)
    leftpad = torch.tensor([3, 0, 2], dtype=torch.int32)
    for kw in [dict(causal=True), dict(window_size=(2, 1)), dict(attention_chunk=3, causal=True)]:
        out, lse = fmha_ref(q, k, v, seqused_q=used_q, seqused_k=used_k, cache_leftpad=leftpad, **kw)
        for b in range(B):
            sq, lo, hi = int(used_q[b]), int(leftpad[b]), int(used_k[b])
            o_b, l_b = fmha_ref(q[b:b + 1, :sq], k[b:b + 1, lo:hi], v[b:b + 1, lo:hi], **kw)
            torch.testing.assert_close(out[b:b + 1, :sq], o_b, **TOL)
            torch.testing.assert_close(lse[b:b + 1, :, :sq], l_b)
            assert (out[b, sq:] == 0).all() and (lse[b, :, sq:] == -INF).all()
    # leftpad without seqused_k: keys [leftpad, Sk)
    out, _ = fmha_ref(q, k, v, cache_leftpad=leftpad, causal=True)
    for b in range(B):
        lo = int(leftpad[b])
        torch.testing.assert_close(out[b:b + 1], fmha_ref(q[b:b + 1], k[b:b + 1, lo:], v[b:b + 1, lo:],
                                                          causal=True)[0], **TOL)


def test_cache_batch_idx_dense(gen):
    q, _, _ = qkv(2, 3, 5, 2, 2, 8, 8, gen)
    kc, vc = rnd(4, 5, 2, 8, gen=gen), rnd(4, 5, 2, 8, gen=gen)
    idx = torch.tensor([3, 1], dtype=torch.int32)
    out, lse = fmha_ref(q, kc, vc, cache_batch_idx=idx, causal=True)
    o2, l2 = fmha_ref(q, kc[idx.long()], vc[idx.long()], causal=True)
    assert torch.equal(out, o2) and torch.equal(lse, l2)


# ----------------------------------------------------------------------------- ragged
@pytest.mark.parametrize("causal", [False, True])
def test_ragged_equals_per_sequence_dense(gen, causal):
    H, Hk, D, Dv = 4, 2, 16, 8
    lq, lk = [3, 0, 5, 1], [4, 2, 6, 0]
    cuq, cuk = mt.random_cu_seqlens(lq), mt.random_cu_seqlens(lk)
    assert cuq.dtype == torch.int32 and cuq.tolist() == [0, 3, 3, 8, 9]
    q = rnd(sum(lq) + 2, H, D, gen=gen)  # 2 trailing rows owned by no sequence
    k, v = rnd(sum(lk), Hk, D, gen=gen), rnd(sum(lk), Hk, Dv, gen=gen)
    out, lse = fmha_ref(q, k, v, cu_seqlens_q=cuq, cu_seqlens_k=cuk, causal=causal)
    assert out.shape == (q.shape[0], H, Dv) and lse.shape == (H, q.shape[0])
    for b in range(4):
        qs, ks = slice(cuq[b], cuq[b + 1]), slice(cuk[b], cuk[b + 1])
        o_b, l_b = fmha_ref(q[qs][None], k[ks][None], v[ks][None], causal=causal)
        torch.testing.assert_close(out[qs], o_b[0], **TOL)
        torch.testing.assert_close(lse[:, qs], l_b[0])
        if lk[b] > 0 and lq[b] > 0 and not causal:
            torch.testing.assert_close(out[qs], sdpa(q[qs][None], k[ks][None], v[ks][None])[0], **TOL)
    assert (out[-2:] == 0).all() and (lse[:, -2:] == -INF).all()
    # seqused on top of cu_seqlens
    uq, uk = torch.tensor([2, 0, 5, 1], dtype=torch.int32), torch.tensor([3, 1, 6, 0], dtype=torch.int32)
    out, lse = fmha_ref(q, k, v, cu_seqlens_q=cuq, cu_seqlens_k=cuk, seqused_q=uq, seqused_k=uk, causal=causal)
    for b in range(4):
        q0, k0 = int(cuq[b]), int(cuk[b])
        o_b, l_b = fmha_ref(q[q0:q0 + uq[b]][None], k[k0:k0 + uk[b]][None], v[k0:k0 + uk[b]][None], causal=causal)
        torch.testing.assert_close(out[q0:q0 + uq[b]], o_b[0], **TOL)
        torch.testing.assert_close(lse[:, q0:q0 + uq[b]], l_b[0])
        assert (out[q0 + uq[b]:cuq[b + 1]] == 0).all()
        assert (lse[:, q0 + uq[b]:cuq[b + 1]] == -INF).all()


# ----------------------------------------------------------------------------- paged
@pytest.mark.parametrize("page_size", [1, 3, 4, 16])
def test_paged_equals_dense(gen, page_size):
    B, Sq, Sk, H, Hk, D = 3, 4, 11, 4, 2, 8
    q, k, v = qkv(B, Sq, Sk, H, Hk, D, D, gen)
    seqlens = [11, 5, 1]
    kp, vp, pt = mt.make_paged_kv(k, v, seqlens, page_size, generator=gen)
    assert pt.dtype == torch.int32 and kp.shape[1:] == (page_size, Hk, D)
    used = torch.tensor(seqlens, dtype=torch.int32)
    for kw in [dict(), dict(causal=True), dict(window_size=(3, 0), attention_chunk=4)]:
        out, lse = fmha_ref(q, kp, vp, page_table=pt, seqused_k=used, **kw)
        o2, l2 = fmha_ref(q, k, v, seqused_k=used, **kw)
        torch.testing.assert_close(out, o2, **TOL)
        torch.testing.assert_close(lse, l2)
        assert not torch.isnan(out).any()
    # cache_batch_idx remaps page-table rows; leftpad skips tokens
    idx = torch.tensor([2, 0, 1], dtype=torch.int32)
    lp = torch.tensor([1, 0, 4], dtype=torch.int32)
    used2 = used[idx.long()]
    out, lse = fmha_ref(q, kp, vp, page_table=pt, seqused_k=used2, cache_batch_idx=idx,
                        cache_leftpad=lp.clamp(max=used2), causal=True)
    o2, l2 = fmha_ref(q, k, v, seqused_k=used2, cache_batch_idx=idx, cache_leftpad=lp.clamp(max=used2),
                      causal=True)
    torch.testing.assert_close(out, o2, **TOL)
    torch.testing.assert_close(lse, l2)


def test_paged_requires_seqused_k(gen):
    q, k, v = qkv(1, 2, 4, 1, 1, 8, 8, gen)
    kp, vp, pt = mt.make_paged_kv(k, v, [4], 2, generator=gen)
    with pytest.raises(ValueError):
        fmha_ref(q, kp, vp, page_table=pt)


# ----------------------------------------------------------------------------- combine / cp
def test_combine_two_key_halves(gen):
    B, Sq, Sk, H, D = 2, 5, 9, 3, 8
    q, k, v = qkv(B, Sq, Sk, H, H, D, D, gen)
    out, lse = fmha_ref(q, k, v)
    parts = [fmha_ref(q, k[:, s], v[:, s], out_dtype=torch.float32) for s in (slice(0, 4), slice(4, Sk))]
    o_p = torch.stack([p[0] for p in parts])  # (2, B, Sq, H, D)
    l_p = torch.stack([p[1].transpose(1, 2) for p in parts])  # (2, B, Sq, H)
    o_c, l_c = combine_ref(o_p, l_p)
    assert o_c.dtype == torch.float32 and o_c.shape == (B, Sq, H, D) and l_c.shape == (B, Sq, H)
    torch.testing.assert_close(o_c, out.float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(l_c, lse.transpose(1, 2))
    o_c64, _ = combine_ref(o_p, l_p, out_dtype=F64)
    assert o_c64.dtype == F64


def test_combine_varlen_and_edge_cases():
    S, T, H, Dv = 3, 4, 2, 5
    o = torch.randn(S, T, H, Dv)
    lse = torch.randn(S, T, H)
    lse[:, 0, 0] = -INF  # every split empty
    lse[1, 1, 1] = -INF
    o[1, 1, 1] = float("nan")  # garbage in an empty split must not leak
    lse[2, 2, 0] = float("nan")
    o[2, 2, 0] = float("nan")
    out, l = combine_ref(o, lse)
    assert out.shape == (T, H, Dv) and l.shape == (T, H)
    assert not torch.isnan(out).any() and not torch.isnan(l).any()
    assert (out[0, 0] == 0).all() and l[0, 0] == -INF
    live = ~(torch.isnan(lse) | (lse == -INF))
    for t in range(T):
        for h in range(H):
            ss = [s for s in range(S) if live[s, t, h]]
            if not ss:
                continue
            ls = torch.stack([lse[s, t, h].double() for s in ss])
            tot = torch.logsumexp(ls, 0)
            exp = sum(torch.exp(lse[s, t, h].double() - tot) * o[s, t, h].double() for s in ss)
            torch.testing.assert_close(out[t, h].double(), exp, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(l[t, h].double(), tot, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("W", [2, 3])
@pytest.mark.parametrize("kw", [dict(causal=True), dict(window_size=(4, 1)), dict(),
                                dict(causal=True, attention_chunk=4)])
def test_context_parallel_combines_to_full(gen, W, kw):
    B, Sq, Sk, H, Hk, D = 2, 5, 13, 4, 2, 8
    q, k, v = qkv(B, Sq, Sk, H, Hk, D, D, gen)
    out, lse = fmha_ref(q, k, v, **kw)
    tot = torch.full((B,), Sk, dtype=torch.int32)
    parts = []
    for r in range(W):
        k_r, v_r = k[:, r::W], v[:, r::W]  # local key j on rank r is global j*W + r
        parts.append(fmha_ref(q, k_r, v_r, cp_world_size=W, cp_rank=r, cp_tot_seqused_k=tot,
                              out_dtype=torch.float64, **kw))
    o_c, l_c = combine_ref(torch.stack([p[0] for p in parts]), torch.stack([p[1].transpose(1, 2) for p in parts]))
    torch.testing.assert_close(o_c, out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(l_c, lse.transpose(1, 2))


def test_cp_tot_seqused_k_shape_checked(gen):
    q, k, v = qkv(2, 3, 4, 1, 1, 8, 8, gen)
    with pytest.raises(ValueError, match="cp_tot_seqused_k"):
        fmha_ref(q, k, v, cp_world_size=2, cp_rank=0, cp_tot_seqused_k=torch.tensor([0, 8, 16], dtype=torch.int32))
    with pytest.raises(ValueError, match="cp_tot_seqused_k"):
        fmha_ref(q, k, v, cp_world_size=2, cp_rank=0)


# ----------------------------------------------------------------------------- fp8 / low precision
def test_fp8_descale(gen):
    B, Sq, Sk, H, Hk, D = 2, 4, 6, 4, 2, 16
    fp8 = torch.float8_e4m3fn
    q8, k8, v8 = (rnd(*s, gen=gen).to(fp8) for s in [(B, Sq, H, D), (B, Sk, Hk, D), (B, Sk, Hk, D)])
    qd, kd, vd = (torch.rand(B, Hk, generator=gen) * 2 + 0.1 for _ in range(3))
    out, lse = fmha_ref(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd, causal=True)
    assert out.dtype == torch.bfloat16
    G = H // Hk
    qe = q8.double() * qd.double().repeat_interleave(G, 1)[:, None, :, None]
    ke = k8.double() * kd.double()[:, None, :, None]
    ve = v8.double() * vd.double()[:, None, :, None]
    mask = torch.ones(Sq, Sk, dtype=torch.bool).tril(diagonal=Sk - Sq)
    torch.testing.assert_close(out, sdpa(qe, ke, ve, mask=mask).bfloat16())
    torch.testing.assert_close(lse, sdpa_lse(qe, ke, ve, mask=mask).float())
    # missing descale = 1
    o1, _ = fmha_ref(q8, k8, v8, out_dtype=F64)
    torch.testing.assert_close(o1, sdpa(q8.double(), k8.double(), v8.double()), **TOL)
    # the fp8 low-precision reference is close but not identical
    out_lp, _ = fmha_ref(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd, causal=True,
                         compute_dtype=fp8)
    assert out_lp.dtype == torch.bfloat16
    err = (out_lp.double() - out.double()).abs().max()
    assert 0 < err < 0.2
    mt.assert_close_fa3(out, out, out_lp, input_dtype=fp8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_reference_and_tolerance(gen, dtype):
    q, k, v = qkv(2, 6, 9, 4, 2, 32, 32, gen, dtype=dtype)
    out_ref, lse_ref = fmha_ref(q, k, v, causal=True, out_dtype=F64)
    out_lp, lse_lp = fmha_ref(q, k, v, causal=True, compute_dtype=dtype, out_dtype=F64)
    out_def, _ = fmha_ref(q, k, v, causal=True)
    assert out_def.dtype == dtype
    err = (out_lp - out_ref).abs().max()
    assert err < (1e-5 if dtype == torch.float32 else 5e-2)
    if dtype != torch.float32:
        assert err > 0  # really computed in low precision
    # the oracle's own rounded output passes; a shifted one fails; NaN fails
    mt.assert_close_fa3(out_ref.to(dtype), out_ref, out_lp)
    mt.assert_close_fa3(lse_ref, lse_ref, lse_lp, name="lse")
    bad = out_ref.to(dtype).clone()
    bad[1, 3, 2, 5] += 0.5
    with pytest.raises(AssertionError, match=r"\(1, 3, 2, 5\)"):
        mt.assert_close_fa3(bad, out_ref, out_lp)
    bad = out_ref.to(dtype).clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(AssertionError, match="NaN"):
        mt.assert_close_fa3(bad, out_ref, out_lp)


def test_assert_close_fa3_inf_handling():
    ref = torch.tensor([-INF, 1.0, 2.0], dtype=F64)
    low = torch.tensor([-INF, 1.001, 2.0], dtype=F64)
    mt.assert_close_fa3(torch.tensor([-INF, 1.0, 2.0019], dtype=F64), ref, low, atol=0.0)
    with pytest.raises(AssertionError):
        mt.assert_close_fa3(torch.tensor([0.0, 1.0, 2.0], dtype=F64), ref, low, atol=0.0)  # -inf expected
    with pytest.raises(AssertionError, match="allowed"):
        mt.assert_close_fa3(torch.tensor([-INF, 1.0, 2.003], dtype=F64), ref, low, atol=0.0)
    assert mt.DEFAULT_ATOL[torch.float32] == 1e-5 and mt.DEFAULT_ATOL[torch.bfloat16] == 2e-3
    assert mt.DEFAULT_ATOL[torch.float8_e4m3fn] == 5e-2


# ----------------------------------------------------------------------------- helpers
def test_poison_and_paged_helper(gen):
    t = torch.zeros(3, dtype=torch.bfloat16)
    assert mt.poison_(t) is t and torch.isnan(t).all()
    i = torch.zeros(2, dtype=torch.int32)
    mt.poison_(i)
    assert (i == torch.iinfo(torch.int32).max).all()
    f8 = torch.zeros(2, dtype=torch.float8_e4m3fn)
    mt.poison_(f8)
    assert (f8.float() == 448).all()

    k, v = rnd(2, 7, 1, 4, gen=gen), rnd(2, 7, 1, 3, gen=gen)
    kp, vp, pt = mt.make_paged_kv(k, v, [7, 2], 3, generator=gen)
    assert kp.shape == (3 + 1 + 1, 3, 1, 4) and vp.shape == (5, 3, 1, 3) and pt.shape == (2, 3)
    for b, n in enumerate([7, 2]):
        for t in range(n):
            assert torch.equal(kp[pt[b, t // 3], t % 3], k[b, t])
            assert torch.equal(vp[pt[b, t // 3], t % 3], v[b, t])
    used = {(int(pt[b, t // 3]), t % 3) for b, n in enumerate([7, 2]) for t in range(n)}
    for p in range(kp.shape[0]):
        for s in range(3):
            if (p, s) not in used:
                assert torch.isnan(kp[p, s]).all() and torch.isnan(vp[p, s]).all()
    assert len(set(pt.flatten().tolist())) == 5  # distinct pages + one spare poisoned page

    lens = mt.random_seqlens(5, 9, 2, generator=gen)
    assert len(lens) == 5 and all(2 <= x <= 9 for x in lens)
    assert mt.random_cu_seqlens(torch.tensor(lens)).tolist()[-1] == sum(lens)
