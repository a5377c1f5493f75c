"""flash_attn_with_kvcache (kvcache_append + rotary_embedding + fmha_fwd) against the oracle.

A deterministic sample of the full parameter grid (layout x page size x batch index x left
padding x varlen q x packed new keys x rotary x masks x splits x dtype x qv/sink/softcap)
keeps CI fast while covering every axis. Cache slots that must never be read are poisoned
(NaN, or 448 for fp8), and the whole cache after the call must equal the expected cache:
bitwise without rotary, within one rounding with rotary.
"""
import itertools
import random

import pytest
import torch

from mate_ops import mha_interface as mi
from mate_ops import testing as T

FP8 = torch.float8_e4m3fn
B, H, HK, D, CAP = 3, 4, 2, 64, 96


def _bits(t):
    """A view that compares bitwise (NaN patterns included)."""
    return t.view(torch.uint8) if t.element_size() == 1 else t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _rand(*shape, dtype):
    x = torch.randn(*shape)
    return (x * 2).to(FP8) if dtype == FP8 else x.to(dtype)


def build_case(cfg, gen):
    dt = cfg["dtype"]
    rows = B + 2 if cfg["batch_idx"] else B
    q_lens = [1, 3, 2] if cfg["varlen_q"] else [cfg["sq"]] * B
    new_lens = ([2, 0, 5] if cfg["packed"] else [3] * B) if cfg["append"] else [0] * B
    cache_lens = [int(torch.randint(6, CAP - 6, (1,), generator=gen)) for _ in range(B)]
    leftpad = [min(int(torch.randint(0, 6, (1,), generator=gen)), cache_lens[b]) for b in range(B)] if cfg["leftpad"] else [0] * B
    idx = torch.randperm(rows, generator=gen)[:B].to(torch.int32) if cfg["batch_idx"] else None

    kd = _rand(rows, CAP, HK, D, dtype=dt)
    vd = _rand(rows, CAP, HK, D, dtype=dt)
    for b in range(B):  # poison what must never be read: before leftpad, after the new keys
        r = int(idx[b]) if idx is not None else b
        for t in list(range(leftpad[b])) + list(range(cache_lens[b] + new_lens[b], CAP)):
            T.poison_(kd[r, t])
            T.poison_(vd[r, t])
    case = dict(cache_lens=cache_lens, new_lens=new_lens, q_lens=q_lens, leftpad=leftpad, idx=idx)
    if cfg["page"]:
        kc, vc, pt = T.make_paged_kv(kd, vd, [CAP] * rows, cfg["page"], generator=gen)
        case.update(k_cache=kc, v_cache=vc, page_table=pt)
    else:
        case.update(k_cache=kd, v_cache=vd, page_table=None)
    if cfg["varlen_q"]:
        case["q"] = _rand(sum(q_lens), H, D, dtype=dt)
        case["cu_seqlens_q"] = T.random_cu_seqlens(q_lens)
    else:
        case["q"] = _rand(B, cfg["sq"], H, D, dtype=dt)
        case["cu_seqlens_q"] = None
    if cfg["append"]:
        if cfg["packed"]:
            case["k"], case["v"] = _rand(sum(new_lens), HK, D, dtype=dt), _rand(sum(new_lens), HK, D, dtype=dt)
            case["cu_seqlens_k_new"] = T.random_cu_seqlens(new_lens)
        else:
            case["k"], case["v"] = _rand(B, new_lens[0], HK, D, dtype=dt), _rand(B, new_lens[0], HK, D, dtype=dt)
            case["cu_seqlens_k_new"] = None
    if cfg["rotary"]:
        rdim = cfg["rotary_dim"]
        angle = torch.rand(CAP + 8, rdim // 2, generator=gen, dtype=torch.float64) * 6.28
        case["cos"], case["sin"] = angle.cos().to(dt), angle.sin().to(dt)
        case["rotary_seqlens"] = (torch.tensor(cache_lens, dtype=torch.int32) + 2) if cfg["rotary_seqlens"] else None
    return case


def run_case(cfg, device, seed):
    gen = torch.Generator().manual_seed(seed)
    c = build_case(cfg, gen)
    dt = cfg["dtype"]
    left, right = cfg["window"]
    causal = cfg["causal"]
    sink = torch.randn(H, generator=gen) if cfg["sink"] else None
    descales = {}
    if dt == FP8 and cfg.get("descale"):
        descales = {n: torch.rand(B, HK, generator=gen) + 0.5 for n in ("q_descale", "k_descale", "v_descale")}
    cache_lens_t = torch.tensor(c["cache_lens"], dtype=torch.int32)

    # ---- expected ----
    rot = dict(rotary_cos=c.get("cos"), rotary_sin=c.get("sin"), rotary_interleaved=cfg["rotary"] == "interleaved",
               rotary_seqlens=c.get("rotary_seqlens"))
    if cfg["append"]:
        kc_exp, vc_exp = T.kvcache_append_ref(c["k_cache"], c["v_cache"], c["k"], c["v"], c["cache_lens"],
                                              cu_seqlens_k_new=c["cu_seqlens_k_new"], page_table=c["page_table"],
                                              cache_batch_idx=c["idx"], **rot)
    else:
        kc_exp, vc_exp = c["k_cache"], c["v_cache"]
    q_exp = c["q"]
    if cfg["rotary"]:
        offs = (c["rotary_seqlens"] if c["rotary_seqlens"] is not None else cache_lens_t).tolist()
        # per row when the mask depends on the row: causal, local, or chunked (FA3's is_local)
        per_row = causal or left >= 0 or right >= 0 or cfg.get("chunk", 0) > 0
        rows, starts = [], [0] + list(itertools.accumulate(c["q_lens"]))
        for b in range(B):
            rows += [offs[b] + (t if per_row else 0) for t in range(c["q_lens"][b])]
        flat = q_exp if cfg["varlen_q"] else q_exp.flatten(0, 1)
        flat = T.rotary_ref(flat, c["cos"], c["sin"], rows, cfg["rotary"] == "interleaved")
        q_exp = flat if cfg["varlen_q"] else flat.view_as(q_exp)
    seqused = cache_lens_t + torch.tensor(c["new_lens"], dtype=torch.int32)
    ref_kw = dict(cu_seqlens_q=c["cu_seqlens_q"], seqused_k=seqused, page_table=c["page_table"],
                  cache_batch_idx=c["idx"], cache_leftpad=torch.tensor(c["leftpad"], dtype=torch.int32) if cfg["leftpad"] else None,
                  causal=causal, window_size=(left, right), learnable_sink=sink, softcap=cfg["softcap"],
                  attention_chunk=cfg.get("chunk", 0), **descales)
    out_ref, lse_ref = T.fmha_ref(q_exp, kc_exp, vc_exp, **ref_kw)
    out_low, _ = T.fmha_ref(q_exp, kc_exp, vc_exp, compute_dtype=dt, **ref_kw)

    # ---- ours ----
    dev = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    kc, vc = dev(c["k_cache"].clone()), dev(c["v_cache"].clone())
    cache_seqlens = c["cache_lens"][0] if cfg["int_seqlens"] else dev(cache_lens_t)
    res = mi.flash_attn_with_kvcache(
        dev(c["q"]), kc, vc, dev(c.get("k")), dev(c.get("v")), rotary_cos=dev(c.get("cos")), rotary_sin=dev(c.get("sin")),
        cache_seqlens=cache_seqlens, cache_batch_idx=dev(c["idx"]), cache_leftpad=dev(ref_kw["cache_leftpad"]),
        page_table=dev(c["page_table"]), cu_seqlens_q=dev(c["cu_seqlens_q"]), cu_seqlens_k_new=dev(c.get("cu_seqlens_k_new")),
        max_seqlen_q=max(c["q_lens"]), rotary_seqlens=dev(c.get("rotary_seqlens")), causal=causal, window_size=(left, right),
        learnable_sink=dev(sink), softcap=cfg["softcap"], rotary_interleaved=cfg["rotary"] == "interleaved",
        num_splits=cfg["num_splits"], return_softmax_lse=True, attention_chunk=cfg.get("chunk", 0),
        **{n: dev(t) for n, t in descales.items()})
    assert len(res) == 4
    out, lse = res[0], res[1]

    # caches: exactly the expected ones, appended slots and everything else
    kc, vc = kc.cpu(), vc.cpu()
    assert torch.equal(_bits(vc), _bits(vc_exp)), "v_cache differs from the expected cache"
    if cfg["rotary"]:
        assert torch.equal(torch.isnan(kc.float()), torch.isnan(kc_exp.float()))
        torch.testing.assert_close(kc.float(), kc_exp.float(), atol=1e-2, rtol=1e-2, equal_nan=True)
        # untouched slots stay bitwise identical
        changed = (_bits(kc) != _bits(kc_exp)).flatten(0, 1).any(-1).any(-1)
        assert changed.sum() <= sum(c["new_lens"]), "slots outside the appended ones changed"
    else:
        assert torch.equal(_bits(kc), _bits(kc_exp)), "k_cache differs from the expected cache"
    T.assert_close_fa3(out, out_ref, out_low, input_dtype=dt)
    T.assert_lse_close(lse, lse_ref, input_dtype=dt)


AXES = dict(
    dtype=[torch.bfloat16, torch.float16, torch.float32, FP8],
    page=[0, 1, 5, 16, 64],
    batch_idx=[False, True],
    leftpad=[False, True],
    varlen_q=[False, True],
    sq=[1, 4],
    append=[True, True, True, False],
    packed=[False, True],
    rotary=[None, "interleaved", "neox", "neox", "interleaved"],
    rotary_dim=[64, 32, 16],
    rotary_seqlens=[False, True],
    causal=[True, False],
    window=[(-1, -1), (24, 0), (8, 3)],
    chunk=[0, 16, 40],
    num_splits=[0, 1, 3],
    int_seqlens=[False, True],
    sink=[False, True],
    softcap=[0.0, 20.0],
    descale=[False, True],
)


def sample_grid(n, seed=1234):
    """n configurations: every value of every axis appears, the rest drawn at random."""
    rnd = random.Random(seed)
    configs = []
    longest = max(len(v) for v in AXES.values())
    for i in range(n):
        cfg = {k: (vals[i] if i < len(vals) else rnd.choice(vals)) for k, vals in AXES.items()} if i < longest else \
              {k: rnd.choice(vals) for k, vals in AXES.items()}
        # constraints of the API
        if cfg["dtype"] == FP8 or not cfg["append"]:
            cfg["rotary"] = None
        if not cfg["append"]:
            cfg["packed"] = False
        if cfg["int_seqlens"]:
            cfg["batch_idx"] = cfg["batch_idx"]  # fine: one length for every sequence
        configs.append(cfg)
    return configs


CONFIGS = sample_grid(56)


def _id(cfg):
    return "-".join(f"{k}={str(v).replace('torch.', '')}" for k, v in cfg.items() if v not in (False, None, 0, 0.0))


@pytest.mark.parametrize("i", range(len(CONFIGS)), ids=[_id(c) for c in CONFIGS])
def test_kvcache_grid(device, i):
    cfg = dict(CONFIGS[i])
    if cfg["int_seqlens"]:
        cfg["int_seqlens"] = False  # an int needs equal lengths: covered by test_int_cache_seqlens
    run_case(cfg, device, seed=i)


def test_int_cache_seqlens(device):
    kc, vc = torch.randn(2, 40, 2, 64), torch.randn(2, 40, 2, 64)
    q, k, v = torch.randn(2, 1, 4, 64), torch.randn(2, 1, 2, 64), torch.randn(2, 1, 2, 64)
    a = mi.flash_attn_with_kvcache(q.to(device), kc.clone().to(device), vc.clone().to(device), k.to(device), v.to(device),
                                   cache_seqlens=17, causal=True)
    b = mi.flash_attn_with_kvcache(q.to(device), kc.clone().to(device), vc.clone().to(device), k.to(device), v.to(device),
                                   cache_seqlens=torch.full((2,), 17, dtype=torch.int32, device=device), causal=True)
    assert torch.equal(a, b)


@pytest.mark.parametrize("page_size", [1, 16, 64, 7])
def test_paged_page_sizes_decode(device, page_size):
    cfg = dict(dtype=torch.bfloat16, page=page_size, batch_idx=False, leftpad=False, varlen_q=False, sq=1,
               append=True, packed=False, rotary="neox", rotary_dim=32, rotary_seqlens=False, causal=True,
               window=(-1, -1), num_splits=0, int_seqlens=False, sink=False, softcap=0.0)
    run_case(cfg, device, seed=page_size)


def test_scheduler_metadata_reused_across_decode_steps(device):
    kc, vc = torch.randn(2, 300, 2, 64).to(device), torch.randn(2, 300, 2, 64).to(device)
    lens = torch.tensor([100, 250], dtype=torch.int32, device=device)
    meta = mi.get_scheduler_metadata(2, 1, 300, 4, 2, 64, seqused_k=lens, causal=True)
    for step in range(3):
        q, k, v = torch.randn(2, 1, 4, 64).to(device), torch.randn(2, 1, 2, 64).to(device), torch.randn(2, 1, 2, 64).to(device)
        kc2, vc2 = kc.clone(), vc.clone()
        a = mi.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens + step, causal=True, scheduler_metadata=meta)
        b = mi.flash_attn_with_kvcache(q, kc2, vc2, k, v, cache_seqlens=lens + step, causal=True)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert torch.equal(kc, kc2)


def test_mla_route_matches_mla_decode(device):
    """MATE's MLA route: q (64, rope) + qv (512, latent) against kpe / ckv caches equals MLA
    decode (SEMANTICS §3): scores over [ckv | kpe] (576 dims), values = ckv, scale 1/sqrt(576)."""
    Bm, Sq, Hq, P, npages = 2, 2, 16, 64, 6
    lens = [100, 257]
    ckv = torch.randn(npages, P, 1, 512, dtype=torch.bfloat16)
    kpe = torch.randn(npages, P, 1, 64, dtype=torch.bfloat16)
    pt = torch.tensor([[3, 0, 5, 5, 5], [1, 2, 4, 5, 0]], dtype=torch.int32)
    q_pe = torch.randn(Bm, Sq, Hq, 64, dtype=torch.bfloat16)
    q_nope = torch.randn(Bm, Sq, Hq, 512, dtype=torch.bfloat16)
    cache_seqlens = torch.tensor(lens, dtype=torch.int32)
    dev = lambda t: t.to(device)  # noqa: E731
    out, lse = mi.flash_attn_with_kvcache(dev(q_pe), dev(kpe), dev(ckv), qv=dev(q_nope), cache_seqlens=dev(cache_seqlens),
                                          page_table=dev(pt), causal=True, return_softmax_lse=True)
    # MLA decode written out directly: one latent key per token, K = [ckv | kpe], V = ckv
    for b in range(Bm):
        toks = torch.cat([torch.cat([ckv[pt[b, i // P], i % P, 0], kpe[pt[b, i // P], i % P, 0]])[None] for i in range(lens[b])])
        K = toks.double()                                       # (Sk, 576)
        Q = torch.cat([q_nope[b], q_pe[b]], -1).double()        # (Sq, Hq, 576)
        s = torch.einsum("qhd,kd->hqk", Q, K) / 576 ** 0.5
        i = torch.arange(Sq)[:, None] + lens[b] - Sq
        s = s.masked_fill(torch.arange(lens[b])[None] > i, float("-inf"))
        ref = torch.einsum("hqk,kd->qhd", s.softmax(-1), K[:, :512])
        torch.testing.assert_close(out[b].cpu().double(), ref, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(lse[b].cpu().double(), s.logsumexp(-1), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("page", [0, 16])
def test_fp8_cache_with_descales(device, page):
    """FP8 caches with q/k/v descales, appended and attended through flash_attn_with_kvcache."""
    cfg = dict(dtype=FP8, page=page, batch_idx=False, leftpad=False, varlen_q=False, sq=2, append=True, packed=False,
               rotary=None, rotary_dim=64, rotary_seqlens=False, causal=True, window=(-1, -1), chunk=0, num_splits=0,
               int_seqlens=False, sink=False, softcap=0.0, descale=True)
    run_case(cfg, device, seed=7 + page)
