"""mate::fmha_fwd_kvcache, the decode step as one op (append + rotary + attention).

- opcheck (schema with the (a!) caches, fake kernel, autograd registration, AOT dispatch)
  on dense / paged / packed-new-keys / rotary calls, results against the oracle;
- float8 q / k / v with bf16 or fp16 rotary tables, written the way FlashAttention-3's own
  kv-cache tests call it: rotation in fp32, stored as float8, against the oracle;
- the q rotation rule: per row when causal, local or chunked (FA3's is_local), else every
  row at the sequence offset.
"""
import pytest
import torch

import mate_ops  # noqa: F401
from mate_ops import flash_attn_interface as fa3
from mate_ops.testing import fmha_ref, kvcache_append_ref, make_paged_kv, rotary_ref
from test_compile import _opcheck

OP = torch.ops.mate.fmha_fwd_kvcache.default
FP8 = torch.float8_e4m3fn


def _i32(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


def _tables(rows, rdim, dtype, device):
    angle = torch.rand(rows, rdim // 2, device=device) * 6.28
    return angle.cos().to(dtype), angle.sin().to(dtype)


def _case(kind, device, dtype=torch.bfloat16):
    """(args, kwargs) of one fmha_fwd_kvcache call; B=2, Hq=4, Hk=2, D=32."""
    B, H, HK, D, cap = 2, 4, 2, 32, 24
    q = torch.randn(B, 2, H, D, device=device).to(dtype)
    kc, vc = torch.randn(B, cap, HK, D, device=device).to(dtype), torch.randn(B, cap, HK, D, device=device).to(dtype)
    k, v = torch.randn(B, 2, HK, D, device=device).to(dtype), torch.randn(B, 2, HK, D, device=device).to(dtype)
    kw = dict(k=k, v=v, cache_seqlens=_i32([5, 17], device), causal=True)
    if kind == "paged":
        kc, vc, pt = (t.to(device) for t in make_paged_kv(kc.cpu(), vc.cpu(), [cap, cap], 5))
        kw["page_table"] = pt
    elif kind == "packed":
        kw.update(k=k.flatten(0, 1)[:3], v=v.flatten(0, 1)[:3], cu_seqlens_k_new=_i32([0, 1, 3], device))
    elif kind == "rotary":
        cos, sin = _tables(40, 16, dtype, device)
        kw.update(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=False, window_size_left=6)
    elif kind == "no_append":
        kw = dict(cache_seqlens=_i32([5, 17], device), softcap=4.0)
    return (q, kc, vc), kw


def _reference(args, kw):
    """Append with the oracle, rotate q with the oracle's row positions, attend with the oracle."""
    q, kc, vc = (t.cpu() for t in args)
    lens = kw["cache_seqlens"].cpu().tolist()
    pt = kw.get("page_table")
    cu_new = kw.get("cu_seqlens_k_new")
    if "k" in kw:
        kc, vc = kvcache_append_ref(kc, vc, kw["k"].cpu(), kw["v"].cpu(), lens, page_table=None if pt is None else pt.cpu(),
                                    cu_seqlens_k_new=None if cu_new is None else cu_new.cpu(),
                                    rotary_cos=None if "rotary_cos" not in kw else kw["rotary_cos"].cpu(),
                                    rotary_sin=None if "rotary_sin" not in kw else kw["rotary_sin"].cpu(),
                                    rotary_interleaved=kw.get("rotary_interleaved", True))
        new = (cu_new.diff().cpu().tolist() if cu_new is not None else [kw["k"].shape[1]] * q.shape[0])
    else:
        new = [0] * q.shape[0]
    if "rotary_cos" in kw:
        per_row = kw.get("causal") or kw.get("window_size_left", -1) >= 0 or kw.get("attention_chunk", 0) > 0
        pos = [lens[b] + (t if per_row else 0) for b in range(q.shape[0]) for t in range(q.shape[1])]
        q = rotary_ref(q.flatten(0, 1), kw["rotary_cos"].cpu(), kw["rotary_sin"].cpu(), pos,
                       kw.get("rotary_interleaved", True)).view_as(q)
    used = torch.tensor([a + n for a, n in zip(lens, new)], dtype=torch.int32)
    window = (kw.get("window_size_left", -1), kw.get("window_size_right", -1))
    out, lse = fmha_ref(q, kc, vc, seqused_k=used, page_table=None if pt is None else pt.cpu(),
                        causal=kw.get("causal", False), window_size=window, softcap=kw.get("softcap", 0.0),
                        )
    return out, lse, kc, vc


@pytest.mark.parametrize("kind", ["dense", "paged", "packed", "rotary", "no_append"])
def test_fmha_fwd_kvcache_against_oracle_and_opcheck(device, kind):
    args, kw = _case(kind, device)
    ref_out, ref_lse, ref_kc, ref_vc = _reference(args, kw)
    q, kc, vc = args
    out, lse = OP(q, kc, vc, **kw)
    torch.testing.assert_close(out.float().cpu(), ref_out.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.cpu(), ref_lse.float(), atol=1e-2, rtol=1e-2)
    # (unused pool slots are NaN-poisoned by make_paged_kv)
    torch.testing.assert_close(kc.float().cpu(), ref_kc.float(), atol=1e-2, rtol=1e-2, equal_nan=True)
    torch.testing.assert_close(vc.cpu(), ref_vc, atol=0, rtol=0, equal_nan=True)
    args, kw = _case(kind, device)
    _opcheck(OP, args, kw)


@pytest.mark.parametrize("table_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("interleaved", [True, False])
def test_fp8_inputs_with_bf16_rotary_tables(device, table_dtype, interleaved):
    """FA3's fp8 kv-cache call: q/k/v and caches float8_e4m3fn, rotary tables in bf16/fp16."""
    B, H, HK, D, cap, R = 2, 4, 2, 64, 32, 32
    q = (torch.randn(B, 1, H, D, device=device) * 2).to(FP8)
    k_cache = (torch.randn(B, cap, HK, D, device=device) * 2).to(FP8)
    v_cache = (torch.randn(B, cap, HK, D, device=device) * 2).to(FP8)
    k, v = (torch.randn(B, 1, HK, D, device=device) * 2).to(FP8), (torch.randn(B, 1, HK, D, device=device) * 2).to(FP8)
    cos, sin = _tables(cap, R, table_dtype, device)
    lens = _i32([9, 30], device)
    kc_ref, vc_ref = kvcache_append_ref(k_cache.cpu(), v_cache.cpu(), k.cpu(), v.cpu(), lens.tolist(),
                                        rotary_cos=cos.cpu(), rotary_sin=sin.cpu(), rotary_interleaved=interleaved)
    q_rot = rotary_ref(q.cpu().flatten(0, 1), cos.cpu(), sin.cpu(), lens.tolist(), interleaved).view_as(q)
    out = fa3.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=lens,
                                      causal=True, rotary_interleaved=interleaved)
    assert out.dtype == torch.bfloat16
    # the cache holds the rotated keys in fp8: the kernel rotates in fp32 and rounds once, the
    # oracle in fp64: they may differ by one fp8 step on rare ties
    got, want = k_cache.cpu().float(), kc_ref.float()
    step = want.abs().clamp(min=2.0**-6) / 8
    assert ((got - want).abs() <= step + 1e-6).all()
    assert ((got != want).float().mean() < 0.01), "more than rare rounding ties differ"
    assert torch.equal(v_cache.cpu().view(torch.uint8), vc_ref.view(torch.uint8))
    ref, _ = fmha_ref(q_rot, k_cache.cpu(), v_cache.cpu(), seqused_k=(lens + 1).cpu(), causal=True)
    torch.testing.assert_close(out.float().cpu(), ref.float(), atol=6e-2, rtol=6e-2)


def test_rotary_op_rotates_fp8(device):
    """rotary_embedding itself: float8 x with fp32 tables, stored float8."""
    x = (torch.randn(2, 3, 2, 32, device=device) * 3).to(FP8)
    cos, sin = _tables(8, 32, torch.float32, device)
    offsets = _i32([1, 4], device)
    out = torch.ops.mate.rotary_embedding(x, cos, sin, offsets)
    pos = [o + t for o in offsets.tolist() for t in range(3)]
    ref = rotary_ref(x.cpu().flatten(0, 1), cos.cpu(), sin.cpu(), pos).view_as(x)
    assert out.dtype == FP8
    diff = (out.cpu().float() - ref.float()).abs()
    assert (diff <= ref.float().abs().clamp(min=2.0**-6) / 8 + 1e-6).all()
