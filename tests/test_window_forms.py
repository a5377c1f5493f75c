"""Every spelling of ``window_size`` that FA3/MATE users write, through every wrapper that takes it.

FA3's own tests build the window as a tuple, as a list (``torch.randint(...).tolist()``), or
keep a tensor; newer FlashAttention code writes ``(None, None)`` / ``(None, r)`` for an
unbounded side. All of them must mean the same ``(left, right)`` window (SEMANTICS §1,
"Masks"; ``mate_ops._common.normalize_window``):

- results are compared with the fp64 oracle (``mate_ops.testing.fmha_ref``, given the plain
  int window) under FA3's tolerance rule, and are bitwise equal to the call with the int tuple;
- ``out=`` buffers are poisoned first, so unwritten rows show up;
- malformed windows raise ``ValueError`` naming ``window_size`` from every wrapper.
"""
import numpy as np
import pytest
import torch

import mate_ops  # noqa: F401  (registers torch.ops.mate.*)
from mate_ops import flash_attn_interface as fa3
from mate_ops import metal_flash_sdpa as ms
from mate_ops import mha_interface as mi
from mate_ops import testing as T
from mate_ops._common import normalize_window

BF16 = torch.bfloat16
I32 = torch.int32

# (left, right) with -1 = unbounded, as the oracle takes them
WINDOWS = [(3, 1), (0, 0), (2, 5), (-1, 2), (4, -1), (-1, -1)]


def _forms(left, right):
    """(id, window_size) pairs that all spell the window (left, right)."""
    forms = [
        ("tuple", (left, right)),
        ("list", [left, right]),
        ("tensor", torch.tensor([left, right])),
        ("tensor_i32", torch.tensor([left, right], dtype=I32)),
        ("numpy", np.array([left, right])),
        ("0d_tensors", (torch.tensor(left), torch.tensor(right))),
    ]
    l_none = None if left < 0 else left
    r_none = None if right < 0 else right
    if (l_none, r_none) != (left, right):
        forms.append(("none_side", (l_none, r_none)))
    if left < 0 and right < 0:
        forms.append(("none", None))
    if left < 0 or right < 0:  # any negative value means unbounded
        forms.append(("neg_big", (-7 if left < 0 else left, -100 if right < 0 else right)))
    return forms


CASES = [pytest.param(w, form, id=f"{w[0]}_{w[1]}-{name}") for w in WINDOWS for name, form in _forms(*w)]


def _to(form, device):
    """Tensors inside a window form go to the test device (FA3 users may keep them there)."""
    if isinstance(form, torch.Tensor):
        return form.to(device)
    if isinstance(form, tuple) and any(isinstance(x, torch.Tensor) for x in form):
        return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in form)
    return form


def _rand(*shape, device):
    return torch.randn(*shape).to(BF16).to(device)


def _check(out, lse, q, k, v, window, **ref_kw):
    """out/lse against the fp64 oracle given the plain int window (FA3's tolerance rule)."""
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    ref_kw = {n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in ref_kw.items()}
    out_ref, lse_ref = T.fmha_ref(q, k, v, window_size=window, **ref_kw)
    out_low, _ = T.fmha_ref(q, k, v, window_size=window, compute_dtype=q.dtype, **ref_kw)
    T.assert_close_fa3(out.cpu(), out_ref, out_low, input_dtype=q.dtype)
    lse = lse.cpu()
    fin = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), fin), "lse: infinities differ from the oracle"
    torch.testing.assert_close(lse[fin], lse_ref[fin], atol=2e-3, rtol=1e-4)


def _same(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a.view(torch.int16) if a.dtype == BF16 else a, b.view(torch.int16) if b.dtype == BF16 else b)


@pytest.mark.parametrize("window,form", CASES)
def test_normalize_window_forms(window, form):
    assert normalize_window(form) == window


# ----------------------------------------------------------------------------- FA3 dense
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window,form", CASES)
def test_fa3_flash_attn_func(window, form, causal, device):
    B, Sq, Sk, H, Hk, D = 2, 5, 9, 4, 2, 32
    q, k, v = _rand(B, Sq, H, D, device=device), _rand(B, Sk, Hk, D, device=device), _rand(B, Sk, Hk, D, device=device)
    out, lse = fa3.flash_attn_func(q, k, v, causal=causal, window_size=_to(form, device), return_attn_probs=True)
    _check(out, lse, q, k, v, window, causal=causal)
    out_int, lse_int = fa3.flash_attn_func(q, k, v, causal=causal, window_size=window, return_attn_probs=True)
    _same(out, out_int)
    _same(lse, lse_int)


# ----------------------------------------------------------------------------- FA3 varlen
@pytest.mark.parametrize("window,form", CASES)
def test_fa3_flash_attn_varlen_func(window, form, device):
    H, Hk, D = 4, 1, 16
    q_lens, k_lens = T.random_seqlens(3, 6, 1), T.random_seqlens(3, 10, 1)
    cu_q, cu_k = T.random_cu_seqlens(q_lens).to(device), T.random_cu_seqlens(k_lens).to(device)
    q = _rand(sum(q_lens), H, D, device=device)
    k, v = _rand(sum(k_lens), Hk, D, device=device), _rand(sum(k_lens), Hk, D, device=device)
    # positional up to max_seqlen_k, window as FA3's tests pass it (keyword)
    out, lse = fa3.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(q_lens), max(k_lens),
                                          window_size=_to(form, device), return_attn_probs=True)
    _check(out, lse, q, k, v, window, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    out_int = fa3.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), window_size=window)
    _same(out, out_int)


# ----------------------------------------------------------------------------- MATE varlen, out=
@pytest.mark.parametrize("window,form", CASES)
def test_mate_flash_attn_varlen_func_out(window, form, device):
    H, Hk, D, Dv = 6, 3, 16, 8
    q_lens, k_lens = T.random_seqlens(2, 7, 1), T.random_seqlens(2, 9, 0)
    cu_q, cu_k = T.random_cu_seqlens(q_lens).to(device), T.random_cu_seqlens(k_lens).to(device)
    q = _rand(sum(q_lens), H, D, device=device)
    k, v = _rand(sum(k_lens), Hk, D, device=device), _rand(sum(k_lens), Hk, Dv, device=device)
    out = T.poison_(torch.empty(sum(q_lens), H, Dv, dtype=BF16, device=device))
    res, lse = mi.flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(q_lens),
                                         max_seqlen_k=max(k_lens), window_size=_to(form, device),
                                         return_softmax_lse=True, out=out)
    assert res.data_ptr() == out.data_ptr()
    _check(out, lse, q, k, v, window, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    out_int = mi.flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(q_lens),
                                        max_seqlen_k=max(k_lens), window_size=window)
    _same(out, out_int)


# ----------------------------------------------------------------------------- FA3 kv cache, metal, metadata
@pytest.mark.parametrize("window,form", [c for c in CASES if c.id.split("-")[1] in ("list", "tensor", "none_side")])
def test_fa3_flash_attn_with_kvcache(window, form, device):
    B, Sq, Sk, H, Hk, D = 2, 3, 12, 4, 2, 16
    q = _rand(B, Sq, H, D, device=device)
    k_cache, v_cache = _rand(B, Sk, Hk, D, device=device), _rand(B, Sk, Hk, D, device=device)
    seqlens = torch.tensor([7, 12], dtype=I32, device=device)
    out, lse, *_ = fa3.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens,
                                               window_size=_to(form, device), return_softmax_lse=True)
    _check(out, lse, q, k_cache, v_cache, window, seqused_k=seqlens)


@pytest.mark.parametrize("window,form", [c for c in CASES if c.id.split("-")[1] in ("list", "tensor", "none_side")])
def test_metal_flash_attn_varlen_func(window, form, device):
    H, D = 2, 16
    q_lens, k_lens = [3, 5], [6, 4]
    cu_q, cu_k = T.random_cu_seqlens(q_lens).to(device), T.random_cu_seqlens(k_lens).to(device)
    q = _rand(sum(q_lens), H, D, device=device)
    k, v = _rand(sum(k_lens), H, D, device=device), _rand(sum(k_lens), H, D, device=device)
    out, lse, _ = ms.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(q_lens), max(k_lens),
                                            window_size=_to(form, device), return_attn_probs=True)
    _check(out, lse, q, k, v, window, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


@pytest.mark.parametrize("window,form", [c for c in CASES if c.id.split("-")[1] in ("list", "tensor", "none_side")])
def test_get_scheduler_metadata(window, form, device):
    seqlens = torch.tensor([5, 40, 17], dtype=I32, device=device)
    args = (3, 2, 40, 4, 2, 64)
    ours = mi.get_scheduler_metadata(*args, seqused_k=seqlens, window_size=_to(form, device))
    assert torch.equal(ours, mi.get_scheduler_metadata(*args, seqused_k=seqlens, window_size=window))
    fa = fa3.get_scheduler_metadata(*args, seqlens, window_size=_to(form, device))
    assert torch.equal(fa, fa3.get_scheduler_metadata(*args, seqlens, window_size=window))


# ----------------------------------------------------------------------------- malformed windows
BAD = [
    ("len3", (1, 2, 3), r"window_size must be a \(left, right\) pair, got \(1, 2, 3\)"),
    ("len1", [4], r"window_size must be a \(left, right\) pair, got \[4\]"),
    ("empty", (), r"window_size must be a \(left, right\) pair, got \(\)"),
    ("scalar", 4, r"window_size must be a \(left, right\) pair, got 4"),
    ("string", "ab", r"window_size must be a \(left, right\) pair"),
    ("dict", {0: 1, 1: 2}, r"window_size must be a \(left, right\) pair"),
    ("tensor_len3", torch.tensor([1, 2, 3]), r"window_size must be a \(left, right\) pair.*shape \(2,\)"),
    ("tensor_2d", torch.tensor([[1, 2]]), r"window_size must be a \(left, right\) pair.*got \(1, 2\)"),
    ("float", (1.5, 2), r"window_size left must be an integer or None, got 1.5"),
    ("float_integral", (2, 3.0), r"window_size right must be an integer or None, got 3.0"),
    ("float_tensor", torch.tensor([1.0, 2.0]), r"window_size must hold integers, got a torch.float32 tensor"),
    ("bool", (True, 0), r"window_size left must be an integer or None, got True"),
    ("str_side", (1, "2"), r"window_size right must be an integer or None, got '2'"),
    ("numpy_float", np.array([1.0, 2.0]), r"window_size left must be an integer or None"),
]


def _bad_calls(device):
    q, k, v = _rand(1, 3, 2, 16, device=device), _rand(1, 4, 2, 16, device=device), _rand(1, 4, 2, 16, device=device)
    qr, kr, vr = q[0], k[0], v[0]
    cu_q, cu_k = torch.tensor([0, 3], dtype=I32, device=device), torch.tensor([0, 4], dtype=I32, device=device)
    seqlens = torch.tensor([4], dtype=I32, device=device)
    return {
        "fa3_func": lambda w: fa3.flash_attn_func(q, k, v, window_size=w),
        "fa3_varlen": lambda w: fa3.flash_attn_varlen_func(qr, kr, vr, cu_q, cu_k, 3, 4, window_size=w),
        "fa3_kvcache": lambda w: fa3.flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, window_size=w),
        "fa3_metadata": lambda w: fa3.get_scheduler_metadata(1, 3, 4, 2, 2, 16, seqlens, window_size=w),
        "mate_varlen": lambda w: mi.flash_attn_varlen_func(qr, kr, vr, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                                           max_seqlen_q=3, max_seqlen_k=4, window_size=w),
        "mate_metadata": lambda w: mi.get_scheduler_metadata(1, 3, 4, 2, 2, 16, seqused_k=seqlens, window_size=w),
        "metal_varlen": lambda w: ms.flash_attn_varlen_func(qr, kr, vr, cu_q, cu_k, 3, 4, window_size=w),
    }


@pytest.mark.parametrize("form,match", [pytest.param(f, m, id=i) for i, f, m in BAD])
def test_malformed_window_raises_value_error(form, match, device):
    for name, call in _bad_calls(device).items():
        with pytest.raises(ValueError, match=match):
            call(_to(form, device))
