"""Tests of the MLA part of the pure-PyTorch oracle (mate_ops/testing/) itself.

Covers the FP8 cache codecs (round trips, power-of-two scales, byte layout checked by
hand with ``struct``), ``mla_decode_ref`` (dense vs a direct formula and vs ``fmha_ref``,
sparse with duplicate/invalid indices, sinks, topk_length, the extra cache, FP8 caches),
``mla_sparse_prefill_ref`` (vs decode) and ``mla_paged_ref`` (vs decode). Run with:

    cd /work/main && python3 -m pytest -q tests/test_oracle_mla.py
"""

import math
import struct

import pytest
import torch



DEVICE_OPS = ("mate::mla_decode", "mate::mla_sparse_prefill", "mate::get_mla_metadata")

# the oracle is pure PyTorch; conftest has imported mate_ops (registering the ops) already
import mate_ops.testing as mt  # noqa: E402
INF = math.inf
F64 = torch.float64
BF16 = torch.bfloat16
TOL = dict(atol=1e-10, rtol=1e-10)


@pytest.fixture(autouse=True)
def _seed_mla():
    torch.manual_seed(1234)


def _e4m3_by_hand(byte: int) -> float:
    """Decode one float8_e4m3fn byte from its bits (bias 7, no inf, 0x7f/0xff NaN)."""
    sign = -1.0 if byte & 0x80 else 1.0
    e, m = (byte >> 3) & 0xF, byte & 0x7
    if e == 0xF and m == 0x7:
        return math.nan
    if e == 0:
        return sign * m / 8.0 * 2.0 ** -6
    return sign * (1.0 + m / 8.0) * 2.0 ** (e - 7)


def _bf16_bytes(x: float) -> bytes:
    """bfloat16 bytes (little-endian) of a value that is exactly a bf16."""
    return struct.pack("<f", x)[2:4]


def _rand_kv(nb, P, D, scale=1.0):
    return (torch.randn(nb, P, 1, D) * scale).to(BF16)


# ================================================================ codecs


def _check_roundtrip(x, deq, group, n_latent, scales):
    """|deq - x| within e4m3 rounding, rope exact; scales minimal powers of two."""
    x = x.double()
    deq = deq.double()
    nb, P = x.shape[0], x.shape[1]
    lat = x[..., :n_latent].reshape(nb, P, n_latent // group, group)
    dl = deq[..., :n_latent].reshape(nb, P, n_latent // group, group)
    sc = scales.double().reshape(nb, P, n_latent // group, 1)
    # e4m3: 3 mantissa bits -> relative half-ulp 2^-4; subnormal spacing 2^-9 -> half 2^-10
    bound = torch.maximum(lat.abs() * 2.0 ** -4, sc * 2.0 ** -10)
    assert ((dl - lat).abs() <= bound).all()
    assert torch.equal(deq[..., n_latent:], x[..., n_latent:])  # rope is stored as is
    # scales are powers of two, minimal: amax / scale in (224, 448], amax 0 -> 1
    m, _ = torch.frexp(scales.double())
    assert (m == 0.5).all()
    amax = lat.abs().amax(dim=-1, keepdim=True)
    r = amax / sc
    assert ((r <= 448) & ((r > 224) | (amax == 0))).all()
    assert (sc[amax == 0] == 1).all()


def _v32_scales(cache):
    b = cache.view(torch.uint8).reshape(-1, 656)[:, 512:528].contiguous()
    return torch.tensor([struct.unpack("<4f", bytes(row.tolist())) for row in b]).reshape(
        cache.shape[0], cache.shape[1], 4)


@pytest.mark.parametrize("P", [64, 3])
def test_v32_roundtrip_and_layout(P):
    kv = _rand_kv(2, P, 576, scale=3.0)
    kv[0, 0, 0, 128:256] = 0  # an all-zero group -> scale 1
    kv[1, 1, 0, :128] *= 1e4  # a large group
    cache = mt.quantize_mla_v32(kv)
    assert cache.dtype == torch.uint8 and cache.shape == (2, P, 1, 656) and cache.is_contiguous()
    deq = mt.dequantize_mla_v32(cache)
    assert deq.dtype == torch.float32 and deq.shape == (2, P, 1, 576)
    scales = _v32_scales(cache)
    _check_roundtrip(kv.squeeze(2), deq.squeeze(2), 128, 512, scales)
    assert scales[0, 0, 1] == 1.0

    # byte layout by hand: token (1, 1)
    raw = bytes(cache[1, 1, 0].tolist())
    sc = struct.unpack("<4f", raw[512:528])
    for c in (0, 5, 127, 128, 300, 511):
        assert deq[1, 1, 0, c].item() == _e4m3_by_hand(raw[c]) * sc[c // 128]
    for r in (0, 17, 63):
        assert raw[528 + 2 * r: 530 + 2 * r] == _bf16_bytes(kv[1, 1, 0, 512 + r].item())

    # any 1-byte dtype reads the same
    assert torch.equal(mt.dequantize_mla_v32(cache.view(torch.float8_e4m3fn)), deq)
    assert torch.equal(mt.dequantize_mla_v32(cache.view(torch.int8)), deq)


def test_v32_exact_values_and_extremes():
    kv = torch.zeros(1, 4, 1, 576)
    kv[0, 0, 0, :128] = 448.0  # amax exactly 448 -> scale 1
    kv[0, 1, 0, :128] = 448.0 * 2.0 ** -20  # exact power-of-two multiple -> scale 2^-20
    kv[0, 2, 0, 0] = 450.0  # just above 448 (exact in bf16) -> scale 2 (never 1, which would overflow)
    kv[0, 3, 0, :512] = torch.tensor([1.0, -0.5, 0.125, 3.0]).repeat(128)  # exact in e4m3
    kv = kv.to(BF16)
    cache = mt.quantize_mla_v32(kv)
    sc = _v32_scales(cache)
    assert sc[0, 0, 0] == 1.0 and sc[0, 1, 0] == 2.0 ** -20 and sc[0, 2, 0] == 2.0
    assert (sc[0, 0, 1:] == 1.0).all()  # zero groups
    deq = mt.dequantize_mla_v32(cache)
    assert torch.equal(deq[0, 0], kv[0, 0].float())
    assert torch.equal(deq[0, 1], kv[0, 1].float())
    assert torch.equal(deq[0, 3], kv[0, 3].float())
    assert torch.isfinite(deq).all()
    with pytest.raises(ValueError):
        mt.quantize_mla_v32(torch.full((1, 1, 1, 576), INF).to(BF16))
    with pytest.raises(ValueError):
        mt.quantize_mla_v32(torch.zeros(1, 1, 1, 512).to(BF16))


@pytest.mark.parametrize("P", [64, 1, 5, 72])
def test_model1_roundtrip_and_layout(P):
    nb = 3
    kv = _rand_kv(nb, P, 512, scale=2.0)
    kv[2, 0, 0, 64:128] = 0  # zero group -> e = 127
    cache = mt.quantize_mla_model1(kv)
    stride = mt.mla_model1_block_stride(P)
    assert stride % 576 == 0 and P * 584 <= stride < P * 584 + 576
    assert cache.dtype == torch.uint8 and cache.shape == (nb, P, 1, 584)
    assert cache.stride() == (stride, 584, 584, 1)
    assert cache.untyped_storage().nbytes() == nb * stride
    deq = mt.dequantize_mla_model1(cache)
    assert deq.dtype == torch.float32 and deq.shape == (nb, P, 1, 512)

    flat = torch.frombuffer(bytearray(bytes(cache.untyped_storage())), dtype=torch.uint8)
    blocks = flat.reshape(nb, stride)
    exps = blocks[:, P * 576: P * 584].reshape(nb, P, 8)
    assert (exps[..., 7] == 0).all()  # pad byte
    assert (blocks[:, P * 584:] == 0).all()  # block padding
    scales = torch.pow(2.0, exps[..., :7].double() - 127)
    _check_roundtrip(kv.squeeze(2), deq.squeeze(2), 64, 448, scales)
    assert exps[2, 0, 1] == 127

    # byte layout by hand: token t of block 1
    t = P - 1
    tok = bytes(blocks[1, 576 * t: 576 * (t + 1)].tolist())
    e = blocks[1, 576 * P + 8 * t: 576 * P + 8 * t + 7].tolist()
    for c in (0, 63, 64, 200, 447):
        assert deq[1, t, 0, c].item() == _e4m3_by_hand(tok[c]) * 2.0 ** (e[c // 64] - 127)
    for r in (0, 31, 63):
        assert tok[448 + 2 * r: 450 + 2 * r] == _bf16_bytes(kv[1, t, 0, 448 + r].item())

    # a sub-range of blocks (storage offset) and another 1-byte dtype read the same
    if nb > 1:
        assert torch.equal(mt.dequantize_mla_model1(cache.view(torch.float8_e4m3fn)[1:]), deq[1:])


def test_model1_exact_values():
    kv = torch.zeros(2, 2, 1, 512)
    kv[0, 0, 0, :64] = 448.0 * 2.0 ** 5
    kv[0, 1, 0, :448] = torch.tensor([2.0, -0.25, 0.0, 7.0]).repeat(112)
    kv = kv.to(BF16)
    cache = mt.quantize_mla_model1(kv)
    deq = mt.dequantize_mla_model1(cache)
    assert torch.equal(deq, kv.float())
    stride = mt.mla_model1_block_stride(2)
    raw = bytes(cache.untyped_storage())
    assert raw[2 * 576] == 127 + 5  # block 0, token 0, group 0
    assert raw[2 * 576 + 1] == 127  # zero group
    assert raw[stride + 2 * 576: stride + 2 * 576 + 7] == bytes([127] * 7)  # all-zero block 1


# ================================================================ dense decode


def _direct_decode(q, keys_per_b, dv, scale, causal, G):
    """Textbook formula, one (b, i, h) at a time: softmax(scale q.k) @ v over allowed keys."""
    B, Sq, H, _ = q.shape
    out = torch.zeros(B, Sq, H, dv, dtype=F64)
    lse = torch.full((B, H, Sq), INF, dtype=F64)
    for b in range(B):
        k = keys_per_b[b].double()  # (Sk, Hk, D)
        Sk = k.shape[0]
        for i in range(Sq):
            hi = i + Sk - Sq if causal else Sk - 1
            if hi < 0 or Sk == 0:
                continue
            for h in range(H):
                kk = k[: hi + 1, h // G]
                s = scale * (kk @ q[b, i, h].double())
                m = s.max()
                w = torch.exp(s - m)
                out[b, i, h] = (w / w.sum()) @ kk[:, :dv]
                lse[b, h, i] = m + torch.log(w.sum())
    return out, lse


def _scatter_paged(dense_list, P, Hk, D, dtype=BF16):
    """Store per-sequence keys into shuffled pages; unused slots get NaN."""
    n_pages = [(x.shape[0] + P - 1) // P for x in dense_list]
    total = sum(n_pages) + 1
    perm = torch.randperm(total).tolist()
    cache = torch.full((total, P, Hk, D), math.nan, dtype=dtype)
    bt = torch.full((len(dense_list), max(n_pages + [1])), perm[-1], dtype=torch.int32)
    nxt = 0
    for b, x in enumerate(dense_list):
        for p in range(n_pages[b]):
            pg = perm[nxt]
            nxt += 1
            bt[b, p] = pg
            chunk = x[p * P:(p + 1) * P]
            cache[pg, : chunk.shape[0]] = chunk
    return cache, bt


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("P,Hk,H", [(64, 1, 4), (5, 2, 4), (1, 1, 2)])
def test_dense_decode_vs_direct(causal, P, Hk, H):
    D, dv, Sq = 576, 512, 3
    lens = [7, 0, 2, 70]  # 0 keys; 2 < Sq (causal rows without keys)
    keys = [torch.randn(n, Hk, D).to(BF16) for n in lens]
    cache, bt = _scatter_paged(keys, P, Hk, D)
    q = torch.randn(len(lens), Sq, H, D).to(BF16)
    sl = torch.tensor(lens, dtype=torch.int32)
    out, lse = mt.mla_decode_ref(q, cache, bt, sl, dv, causal=causal)
    assert out.dtype == BF16 and out.shape == (4, Sq, H, dv)
    assert lse.dtype == torch.float32 and lse.shape == (4, H, Sq)
    o64, l64 = mt.mla_decode_ref(q, cache, bt, sl, dv, causal=causal)  # deterministic
    assert torch.equal(out, o64) and torch.equal(lse, l64)

    ref_o, ref_l = _direct_decode(q, keys, dv, 1 / math.sqrt(D), causal, H // Hk)
    torch.testing.assert_close(out.double(), ref_o.to(BF16).double(), atol=1e-2, rtol=0)
    torch.testing.assert_close(lse.double(), ref_l.float().double(), atol=1e-5, rtol=1e-6)
    # no key: out 0, lse +inf
    assert (out[1] == 0).all() and (lse[1] == INF).all()
    if causal:
        assert (out[2, 0] == 0).all() and (lse[2, :, 0] == INF).all()
        assert (lse[2, :, 1:] < INF).all()

    # the fp32-output fp64 pipeline matches the direct formula tightly (q float64)
    o_d, l_d = mt.mla_decode_ref(q.double(), cache.double(), bt, sl, dv, causal=causal)
    torch.testing.assert_close(o_d, ref_o, **TOL)
    torch.testing.assert_close(l_d.double(), ref_l.float().double(), atol=1e-5, rtol=0)

    # same thing through fmha_ref (paged, seqused_k), whose lse is -inf for empty rows
    kp, vp = cache, cache[..., :dv]
    fo, fl = mt.fmha_ref(q.double(), kp.double(), vp.double(), page_table=bt, seqused_k=sl, causal=causal)
    torch.testing.assert_close(o_d, fo, **TOL)
    torch.testing.assert_close(l_d, torch.where(fl == -INF, torch.full_like(fl, INF), fl))


def test_dense_decode_scale_and_sink():
    D, dv = 576, 512
    keys = [torch.randn(9, 1, D).to(BF16)]
    cache, bt = _scatter_paged(keys, 4, 1, D)
    q = torch.randn(1, 2, 3, D).to(BF16)
    sl = torch.tensor([9], dtype=torch.int32)
    o, l = mt.mla_decode_ref(q.double(), cache, bt, sl, dv, softmax_scale=0.1)
    ref_o, ref_l = _direct_decode(q, keys, dv, 0.1, False, 3)
    torch.testing.assert_close(o, ref_o, **TOL)
    sink = torch.tensor([0.5, -INF, INF])
    os_, ls = mt.mla_decode_ref(q.double(), cache, bt, sl, dv, softmax_scale=0.1, attn_sink=sink)
    assert torch.equal(ls, l)  # lse excludes the sink
    f = torch.sigmoid(l.double() - sink.double().view(1, 3, 1))  # exp(l) / (exp(l) + exp(sink))
    # (f is computed from the fp32-rounded lse, the oracle uses its fp64 lse)
    torch.testing.assert_close(os_, o * f.transpose(1, 2).unsqueeze(-1), atol=1e-7, rtol=1e-6)
    assert torch.equal(os_[:, :, 1], o[:, :, 1]) and (os_[:, :, 2] == 0).all()


def test_dense_decode_rejects():
    q = torch.randn(1, 1, 2, 576).to(BF16)
    cache = torch.randn(2, 4, 1, 576).to(BF16)
    bt = torch.tensor([[0, 1]], dtype=torch.int32)
    with pytest.raises(ValueError):  # more keys than the block table holds
        mt.mla_decode_ref(q, cache, bt, torch.tensor([9], dtype=torch.int32), 512)
    with pytest.raises(ValueError):  # block id out of range
        mt.mla_decode_ref(q, cache, torch.tensor([[0, 5]], dtype=torch.int32),
                          torch.tensor([8], dtype=torch.int32), 512)
    with pytest.raises(ValueError):  # causal sparse
        mt.mla_decode_ref(q, cache, None, None, 512, causal=True, indices=torch.zeros(1, 1, 2, dtype=torch.int32))
    with pytest.raises(ValueError):  # bf16 cache passed as fp8
        mt.mla_decode_ref(q, cache, bt, torch.tensor([8], dtype=torch.int32), 512, is_fp8_kvcache=True)


# ================================================================ sparse decode


def _sparse_setup(B=2, Sq=2, H=4, nb=3, P=8, D=576, topk=6):
    cache = torch.randn(nb, P, 1, D).to(BF16)
    q = torch.randn(B, Sq, H, D).to(BF16)
    idx = torch.randint(0, nb * P, (B, Sq, topk), dtype=torch.int32)
    return q, cache, idx


def _decode_over_slots(q_row, flat_keys, slots, dv, scale):
    """Direct formula for one query row (H, D) over an explicit key list (duplicates kept)."""
    k = flat_keys[torch.tensor(slots, dtype=torch.long)].double()  # (n, D)
    s = scale * (q_row.double() @ k.T)  # (H, n)
    l = torch.logsumexp(s, -1)
    return torch.exp(s - l.unsqueeze(-1)) @ k[:, :dv], l


def test_sparse_decode_vs_direct_with_duplicates_and_invalid():
    q, cache, idx = _sparse_setup()
    nb, P, D = cache.shape[0], cache.shape[1], cache.shape[3]
    idx[0, 0] = torch.tensor([3, 3, 3, -1, nb * P, 7])  # duplicates, -1, one past the end
    idx[0, 1] = torch.tensor([-5, 2, 10 ** 6, 2, 0, -1])  # other negatives are invalid too
    idx[1, 0] = -1  # no valid key
    out, lse = mt.mla_decode_ref(q, cache, None, None, 512, indices=idx)
    flat = cache.reshape(nb * P, D)
    scale = 1 / math.sqrt(D)
    for b in range(2):
        for i in range(2):
            slots = [s for s in idx[b, i].tolist() if 0 <= s < nb * P]
            if not slots:
                assert (out[b, i] == 0).all() and (lse[b, :, i] == INF).all()
                continue
            o, l = _decode_over_slots(q[b, i], flat, slots, 512, scale)
            torch.testing.assert_close(out[b, i].double(), o.to(BF16).double(), atol=1e-2, rtol=0)
            torch.testing.assert_close(lse[b, :, i].double(), l.float().double(), atol=1e-5, rtol=0)
    # a key listed 3 times == the key once with its logit raised by log(3)
    s = scale * (q[0, 0].double() @ flat[[3, 7]].double().T)
    s[:, 0] += math.log(3)
    l3 = torch.logsumexp(s, -1)
    torch.testing.assert_close(lse[0, :, 0].double(), l3.float().double(), atol=1e-5, rtol=0)
    # sparse over all slots of a sequence == dense decode over the same tokens
    bt = torch.tensor([[2, 0, 1]], dtype=torch.int32)
    order = [2 * P + t for t in range(P)] + list(range(P)) + [P + t for t in range(5)]
    sp_o, sp_l = mt.mla_decode_ref(q[:1, :1].double(), cache, None, None, 512,
                                   indices=torch.tensor([[order]], dtype=torch.int32))
    de_o, de_l = mt.mla_decode_ref(q[:1, :1].double(), cache, bt, torch.tensor([len(order)], dtype=torch.int32), 512)
    torch.testing.assert_close(sp_o, de_o, **TOL)
    torch.testing.assert_close(sp_l, de_l, **TOL)


def test_sparse_decode_sink_edge_cases():
    q, cache, idx = _sparse_setup(H=4)
    idx[1, 1] = -1  # an empty row
    base_o, base_l = mt.mla_decode_ref(q.double(), cache, None, None, 512, indices=idx)
    sink = torch.tensor([INF, -INF, 0.3, -2.0], dtype=torch.float32)
    o, l = mt.mla_decode_ref(q.double(), cache, None, None, 512, indices=idx, attn_sink=sink)
    assert torch.equal(l, base_l)  # lse excludes the sink
    assert (o[..., 0, :] == 0).all()  # +inf -> 0
    assert torch.equal(o[..., 1, :], base_o[..., 1, :])  # -inf -> unchanged
    for h in (2, 3):
        f = torch.exp(base_l[:, h].double()) / (torch.exp(base_l[:, h].double()) + math.exp(sink[h].item()))
        f = torch.where(base_l[:, h] == INF, torch.zeros_like(f), f)  # empty rows stay 0
        torch.testing.assert_close(o[..., h, :], base_o[..., h, :] * f.unsqueeze(-1), atol=1e-7, rtol=1e-6)
    assert (o[1, 1] == 0).all() and (l[1, :, 1] == INF).all()
    assert not torch.isnan(o).any()


def test_sparse_decode_topk_length():
    q, cache, idx = _sparse_setup(B=3, topk=8)
    tl = torch.tensor([8, 3, 0], dtype=torch.int32)
    o, l = mt.mla_decode_ref(q.double(), cache, None, None, 512, indices=idx, topk_length=tl)
    for b in range(3):
        n = int(tl[b])
        if n == 0:
            assert (o[b] == 0).all() and (l[b] == INF).all()
            continue
        ob, lb = mt.mla_decode_ref(q[b:b + 1].double(), cache, None, None, 512, indices=idx[b:b + 1, :, :n])
        torch.testing.assert_close(o[b:b + 1], ob, **TOL)
        torch.testing.assert_close(l[b:b + 1], lb, **TOL)
    # entries past topk_length are ignored even if they are garbage
    idx2 = idx.clone()
    idx2[1, :, 3:] = 10 ** 6
    o2, l2 = mt.mla_decode_ref(q.double(), cache, None, None, 512, indices=idx2, topk_length=tl)
    assert torch.equal(o2, o) and torch.equal(l2, l)
    with pytest.raises(ValueError):
        mt.mla_decode_ref(q, cache, None, None, 512, indices=idx,
                          topk_length=torch.tensor([9, 1, 1], dtype=torch.int32))


@pytest.mark.parametrize("fp8", [False, True])
def test_sparse_decode_extra_cache_equals_concatenation(fp8):
    B, Sq, H, D = 2, 2, 4, 576
    nb, P, nbx, Px = 3, 8, 2, 4
    main = torch.randn(nb, P, 1, D).to(BF16)
    extra = torch.randn(nbx, Px, 1, D).to(BF16)
    q = torch.randn(B, Sq, H, D).to(BF16)
    idx = torch.randint(-1, nb * P, (B, Sq, 5), dtype=torch.int32)
    xidx = torch.randint(-1, nbx * Px + 2, (B, Sq, 3), dtype=torch.int32)
    xidx[0, 0] = torch.tensor([1, 1, nbx * Px])  # duplicate + invalid
    tl = torch.tensor([5, 2], dtype=torch.int32)
    xtl = torch.tensor([1, 3], dtype=torch.int32)
    # one combined cache with page size 4: main's tokens first, then extra's
    both = torch.cat([main.reshape(-1, 1, D), extra.reshape(-1, 1, D)]).reshape(-1, Px, 1, D)
    comb = []
    for b in range(B):
        rows = []
        for i in range(Sq):
            r = [s for s in idx[b, i, : tl[b]].tolist()]
            r += [(s + nb * P) if 0 <= s < nbx * Px else -1 for s in xidx[b, i, : xtl[b]].tolist()]
            rows.append(r + [-1] * (8 - len(r)))
        comb.append(rows)
    comb = torch.tensor(comb, dtype=torch.int32)
    if fp8:
        main_c, extra_c, both_c = mt.quantize_mla_v32(main), mt.quantize_mla_v32(extra), mt.quantize_mla_v32(both)
    else:
        main_c, extra_c, both_c = main, extra, both
    o, l = mt.mla_decode_ref(q, main_c, None, None, 512, is_fp8_kvcache=fp8, indices=idx, topk_length=tl,
                             extra_k_cache=extra_c, extra_indices_in_kvcache=xidx, extra_topk_length=xtl)
    oc, lc = mt.mla_decode_ref(q, both_c, None, None, 512, is_fp8_kvcache=fp8, indices=comb)
    torch.testing.assert_close(o.double(), oc.double(), atol=1e-2, rtol=0)
    torch.testing.assert_close(l, lc, atol=1e-5, rtol=1e-6)
    # fp64 queries: equal to rounding
    o, l = mt.mla_decode_ref(q.double(), main_c, None, None, 512, is_fp8_kvcache=fp8, indices=idx, topk_length=tl,
                             extra_k_cache=extra_c, extra_indices_in_kvcache=xidx, extra_topk_length=xtl)
    oc, lc = mt.mla_decode_ref(q.double(), both_c, None, None, 512, is_fp8_kvcache=fp8, indices=comb)
    torch.testing.assert_close(o, oc, **TOL)
    torch.testing.assert_close(l, lc, **TOL)


# ================================================================ fp8 caches


@pytest.mark.parametrize("layout", ["v32", "model1"])
@pytest.mark.parametrize("sparse", [False, True])
def test_fp8_decode_equals_dequantized_cache(layout, sparse):
    D = 576 if layout == "v32" else 512
    quant = mt.quantize_mla_v32 if layout == "v32" else mt.quantize_mla_model1
    deq = mt.dequantize_mla_v32 if layout == "v32" else mt.dequantize_mla_model1
    nb, P, B, Sq, H = 4, 64 if layout == "model1" else 16, 2, 2, 4
    kv = torch.randn(nb, P, 1, D).to(BF16)
    cache = quant(kv)
    kvf = deq(cache)  # float32, exact dequantized values
    q = torch.randn(B, Sq, H, D).to(BF16)
    if sparse:
        idx = torch.randint(-1, nb * P, (B, Sq, 16), dtype=torch.int32)
        kw = dict(indices=idx)
        args = (None, None)
    else:
        kw = dict(causal=True)
        args = (torch.tensor([[3, 1], [0, 2]], dtype=torch.int32), torch.tensor([P + 5, 2 * P], dtype=torch.int32))
    o, l = mt.mla_decode_ref(q, cache, *args, 512, is_fp8_kvcache=True, **kw)
    o2, l2 = mt.mla_decode_ref(q, kvf, *args, 512, **kw)
    assert o.dtype == BF16
    assert torch.equal(o, o2) and torch.equal(l, l2)
    # and close to the unquantized cache
    o3, _ = mt.mla_decode_ref(q, kv, *args, 512, **kw)
    assert (o.double() - o3.double()).abs().max() < 0.25


# ================================================================ sparse prefill


def test_sparse_prefill_vs_decode():
    Sq, H, D, Skv, topk, P = 5, 4, 576, 24, 7, 8
    q = torch.randn(Sq, H, D).to(BF16)
    kv = torch.randn(Skv, 1, D).to(BF16)
    idx = torch.randint(0, Skv, (Sq, 1, topk), dtype=torch.int32)
    idx[0, 0, :3] = torch.tensor([-1, Skv, 4])
    idx[1, 0, :] = -1  # no valid key
    idx[2, 0, :] = 6  # all duplicates
    tl = torch.tensor([7, 7, 4, 0, 2], dtype=torch.int32)
    sink = torch.tensor([INF, -INF, 1.0, -0.5])
    scale = 0.07
    for kw in (dict(), dict(topk_length=tl), dict(attn_sink=sink), dict(topk_length=tl, attn_sink=sink)):
        o, m, l = mt.mla_sparse_prefill_ref(q.double(), kv, idx, scale, 512, **kw)
        assert o.shape == (Sq, H, 512) and m.shape == (Sq, H) and l.shape == (Sq, H)
        assert m.dtype == torch.float32 and l.dtype == torch.float32
        dkw = dict(attn_sink=kw.get("attn_sink"), topk_length=kw.get("topk_length"))
        od, ld = mt.mla_decode_ref(q.double().unsqueeze(1), kv.reshape(Skv // P, P, 1, D), None, None, 512,
                                   softmax_scale=scale, indices=idx, **dkw)  # B = Sq, one row each
        torch.testing.assert_close(o, od[:, 0], **TOL)
        torch.testing.assert_close(l, ld[:, :, 0], **TOL)
        assert (o[1] == 0).all() and (l[1] == INF).all() and (m[1] == -INF).all()
    # max_logits and lse by hand
    o, m, l = mt.mla_sparse_prefill_ref(q, kv, idx, scale, 512, topk_length=tl)
    assert o.dtype == BF16
    for i in range(Sq):
        slots = [s for s in idx[i, 0, : tl[i]].tolist() if 0 <= s < Skv]
        if not slots:
            assert (m[i] == -INF).all() and (l[i] == INF).all() and (o[i] == 0).all()
            continue
        s = scale * (q[i].double() @ kv[slots, 0].double().T)  # (H, n)
        torch.testing.assert_close(m[i].double(), s.max(-1).values.float().double(), atol=1e-6, rtol=0)
        torch.testing.assert_close(l[i].double(), torch.logsumexp(s, -1).float().double(), atol=1e-6, rtol=0)


# ================================================================ FlashInfer wrapper


@pytest.mark.parametrize("causal", [False, True])
def test_flashinfer_ref_vs_decode(causal):
    H, P, Dc, Dp = 4, 4, 512, 64
    qo_lens, kv_lens = [3, 3, 3], [9, 1, 0]
    pages_needed = [(n + P - 1) // P for n in kv_lens]
    n_pages = sum(pages_needed) + 2
    perm = torch.randperm(n_pages).tolist()
    ckv = torch.randn(n_pages, P, Dc).to(BF16)
    kpe = torch.randn(n_pages, P, Dp).to(BF16)
    kv_indices, kv_indptr, bt = [], [0], torch.zeros(3, 3, dtype=torch.int32)
    for b, n in enumerate(pages_needed):
        pg = [perm.pop() for _ in range(n)]
        kv_indices += pg
        kv_indptr.append(len(kv_indices))
        bt[b, :n] = torch.tensor(pg, dtype=torch.int32)
    Tq = sum(qo_lens) + 1  # one trailing row that belongs to no sequence
    q_nope = torch.randn(Tq, H, Dc).to(BF16)
    q_pe = torch.randn(Tq, H, Dp).to(BF16)
    qo_indptr = torch.tensor([0, 3, 6, 9], dtype=torch.int32)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    args = (q_nope.double(), q_pe.double(), ckv, kpe, qo_indptr, i32(kv_indptr), i32(kv_indices), i32(kv_lens), 0.05,
            causal)
    o, l2 = mt.mla_paged_ref(*args)
    _, le = mt.mla_paged_ref(*args, return_lse_base2=False)
    assert o.shape == (Tq, H, Dc) and l2.shape == (Tq, H) and l2.dtype == torch.float32
    torch.testing.assert_close(l2.double(), (le.double() / math.log(2)).float().double(), atol=1e-6, rtol=0)
    # FlashMLA layout: one cache of [ckv | kpe], q = [q_nope | q_pe], B = 3, Sq = 3
    k_cache = torch.cat([ckv, kpe], dim=-1).unsqueeze(2)
    q = torch.cat([q_nope[:9], q_pe[:9]], dim=-1).reshape(3, 3, H, Dc + Dp)
    od, ld = mt.mla_decode_ref(q.double(), k_cache, bt, i32(kv_lens), Dc, softmax_scale=0.05, causal=causal)
    torch.testing.assert_close(o[:9], od.reshape(9, H, Dc), **TOL)
    ld = ld.transpose(1, 2).reshape(9, H)
    ld = torch.where(ld == INF, torch.full_like(ld, -INF), ld)  # FlashMLA +inf vs FlashInfer -inf
    torch.testing.assert_close(le[:9], ld, **TOL)
    # empty rows: seq 2 (no keys), seq 1 rows 0..1 under causal, the trailing row
    assert (o[6:] == 0).all() and (le[6:] == -INF).all() and (l2[6:] == -INF).all()
    if causal:
        assert (o[3:5] == 0).all() and (le[3:5] == -INF).all() and torch.isfinite(le[5]).all()
    # the output dtype follows q_nope
    ob, _ = mt.mla_paged_ref(q_nope, q_pe, *args[2:])
    assert ob.dtype == BF16


# ================================================================ low precision mode


def test_low_precision_mode_is_close():
    q, cache, idx = _sparse_setup()
    ref_o, ref_l = mt.mla_decode_ref(q, cache, None, None, 512, indices=idx)
    lo_o, lo_l = mt.mla_decode_ref(q, cache, None, None, 512, indices=idx, compute_dtype=BF16)
    assert lo_o.dtype == BF16
    assert (lo_o.double() - ref_o.double()).abs().max() < 3e-2
    assert (lo_l - ref_l).abs().max() < 5e-2
    mt.assert_close_fa3(ref_o, ref_o, lo_o)
