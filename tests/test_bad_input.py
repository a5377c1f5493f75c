"""Bad-input tests (SEMANTICS §6): every public op validates its arguments and rejects
bad ones with a Python exception that names the argument and what was expected; no
input, however wrong, may crash the process or write into the tensors it was given.

Layout: one table per op family (fmha_fwd / fmha_fwd_out / flash_attn_varlen_func,
fmha_combine / fmha_combine_out / flash_attn_combine, get_scheduler_metadata). Each row
takes a VALID baseline (``*_BASES``, each checked to succeed by its own test, so no table
passes vacuously), applies one mutation, and says which exception and message to expect.

Inputs that crash the process (SIGFPE / SIGSEGV) in some builds run in a subprocess
(``ISOLATED``), so one crash fails one test, not the run.

    cd /work/main && python3 -m pytest -q tests/test_bad_input.py
"""
import json
import math
import random
import subprocess
import sys
import textwrap

import pytest
import torch

import mate_ops
from mate_ops.mha_interface import flash_attn_combine, flash_attn_varlen_func, get_scheduler_metadata

OP = torch.ops.mate

BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
FP8, I32, I64 = torch.float8_e4m3fn, torch.int32, torch.int64

# Baseline sizes: batch, query/key lengths, heads, kv heads, head dim.
B, SQ, SK, H, HK, D = 2, 3, 5, 4, 2, 16
NUM_PAGES, PAGE = 6, 4  # paged baseline: 6 pages of 4 keys, 3 page-table columns (12 keys)
SENTINEL = 7.0  # fill value of out / lse given to *_out ops; a rejected call must leave it


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def dev(kw):
    """Device of a call's arguments (of its first tensor)."""
    return next(v.device for v in kw.values() if isinstance(v, torch.Tensor))


def rnd(device, *shape, dtype=BF16):
    return torch.randn(*shape, device=device).to(dtype)


def ints(device, vals, dtype=I32):
    return torch.tensor(vals, dtype=dtype, device=device)


def strided_last(t):
    """Same values, last-dimension stride 2."""
    return torch.stack([t, t], dim=-1)[..., 0]


def S(**vals):
    """Mutation: kw[key] = val(kw) for callables, else val. All values are computed from
    the unmutated kw before any is stored."""

    def mutate(kw):
        new = {key: (val(kw) if callable(val) else val) for key, val in vals.items()}
        kw.update(new)

    return mutate


def R(key, *shape, dtype=None):
    """Value maker: a fresh random tensor of `shape` (dtype defaults to that of kw[key])."""
    return lambda kw: rnd(dev(kw), *shape, dtype=dtype or kw[key].dtype)


def I(vals, dtype=I32):
    """Value maker: an int tensor (int32 by default) on the call's device."""
    return lambda kw: ints(dev(kw), vals, dtype)


def As(key, dtype):
    """Value maker: kw[key] converted to dtype."""
    return lambda kw: kw[key].to(dtype)


def Fn(key, fn):
    """Value maker: fn(kw[key])."""
    return lambda kw: fn(kw[key])


def with_entry(key, index, value):
    """Value maker: a copy of kw[key] with one entry replaced."""

    def make(kw):
        t = kw[key].clone()
        t[index] = value
        return t

    return make


def C(id, base, mutate, exc, match, call="op", values=False):
    """One table row. `values`: the check reads tensor data (ranges, monotonicity). §6
    makes those mandatory on the CPU reference only, so such rows are skipped elsewhere."""
    return pytest.param(base, mutate, exc, match, call, values, id=id)


def _snapshot(kw):
    return {k: v.clone() for k, v in kw.items() if isinstance(v, torch.Tensor)}


def _same(a, b):
    if a.dtype == FP8:
        a, b = a.float(), b.float()
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def _assert_untouched(kw, snap):
    for k, before in snap.items():
        assert _same(kw[k], before), f"rejected call modified its argument {k!r}"


def _expect_rejected(invoke, kw, exc, match, device, values):
    if values and device != "cpu":
        pytest.skip("data-dependent check: mandatory on the CPU reference only (SEMANTICS §6)")
    snap = _snapshot(kw)
    with pytest.raises(exc, match=match):
        invoke(kw)
    _assert_untouched(kw, snap)


# --------------------------------------------------------------------------------------
# FMHA forward: baselines (raw-op kwargs; every one is a valid call)
# --------------------------------------------------------------------------------------
def fmha_dense(d):
    return dict(q=rnd(d, B, SQ, H, D), k=rnd(d, B, SK, HK, D), v=rnd(d, B, SK, HK, D))


def fmha_ragged(d):  # two sequences: q rows 3 + 4 = 7, k rows 4 + 5 = 9
    return dict(q=rnd(d, 7, H, D), k=rnd(d, 9, HK, D), v=rnd(d, 9, HK, D),
                cu_seqlens_q=ints(d, [0, 3, 7]), cu_seqlens_k=ints(d, [0, 4, 9]),
                max_seqlen_q=4, max_seqlen_k=5)


def fmha_paged(d):  # sequence 0 uses 10 keys (3 pages), sequence 1 uses 7 (2 pages)
    return dict(q=rnd(d, B, SQ, H, D), k=rnd(d, NUM_PAGES, PAGE, HK, D),
                v=rnd(d, NUM_PAGES, PAGE, HK, D),
                page_table=ints(d, [[5, 0, 3], [1, 4, 2]]), seqused_k=ints(d, [10, 7]))


def fmha_padded(d):
    kw = fmha_dense(d)
    kw.update(seqused_q=ints(d, [3, 1]), seqused_k=ints(d, [4, 5]), cache_leftpad=ints(d, [1, 0]))
    return kw


def fmha_batch_idx(d):  # dense cache of 3 rows, read through cache_batch_idx
    kw = fmha_dense(d)
    kw.update(k=rnd(d, 3, SK, HK, D), v=rnd(d, 3, SK, HK, D), cache_batch_idx=ints(d, [2, 0]))
    return kw


def fmha_qv(d):  # v head dim 8, qv (B, SQ, H, 8)
    kw = fmha_dense(d)
    kw.update(v=rnd(d, B, SK, HK, 8), qv=rnd(d, B, SQ, H, 8))
    return kw


def fmha_fp8(d):
    return dict(q=rnd(d, B, SQ, H, D, dtype=FP8), k=rnd(d, B, SK, HK, D, dtype=FP8),
                v=rnd(d, B, SK, HK, D, dtype=FP8),
                q_descale=torch.rand(B, HK, device=d) + 0.5, k_descale=torch.rand(B, HK, device=d) + 0.5,
                v_descale=torch.rand(B, HK, device=d) + 0.5)


def fmha_sink(d):
    kw = fmha_dense(d)
    kw.update(learnable_sink=torch.randn(H, device=d))
    return kw


def fmha_cp(d):
    kw = fmha_dense(d)
    kw.update(cp_world_size=2, cp_rank=1, cp_tot_seqused_k=ints(d, [10, 9]))
    return kw


def fmha_sched(d):
    kw = fmha_dense(d)
    kw.update(scheduler_metadata=OP.get_scheduler_metadata(
        B, SQ, SK, H, HK, D, D, BF16, ints(d, [SK, SK]), num_splits=2))
    return kw


FMHA_BASES = dict(dense=fmha_dense, ragged=fmha_ragged, paged=fmha_paged, padded=fmha_padded,
                  batch_idx=fmha_batch_idx, qv=fmha_qv, fp8=fmha_fp8, sink=fmha_sink, cp=fmha_cp,
                  sched=fmha_sched)
# Bases whose arguments flash_attn_varlen_func takes (it has no cache_batch_idx / cache_leftpad).
FMHA_API_BASES = ("dense", "ragged", "paged", "qv", "fp8", "sink", "cp", "sched")


def fmha_build(base, call, device):
    """The valid call of `base`, shaped for `call` ("op" fmha_fwd, "out" fmha_fwd_out,
    "api" flash_attn_varlen_func)."""
    kw = FMHA_BASES[base](device)
    if call == "out":
        out, lse = OP.fmha_fwd(**kw)
        kw["out"] = torch.full_like(out, SENTINEL)
        kw["lse"] = torch.full_like(lse, SENTINEL)
    elif call == "api":
        assert base in FMHA_API_BASES, base
        kw["return_softmax_lse"] = True
    return kw


def fmha_invoke(call):
    return {"op": lambda kw: OP.fmha_fwd(**kw),
            "out": lambda kw: OP.fmha_fwd_out(**kw),
            "api": lambda kw: flash_attn_varlen_func(**kw)}[call]


_MUST_BE_FLOAT = r"q must be float32, float16, bfloat16 or float8_e4m3fn, got "
_OUT_DTYPE = r"out dtype must be float32, float16 or bfloat16, got "

FMHA_CASES = [
    # ---- dtypes
    C("q_int32", "dense", S(q=lambda kw: torch.randint(-3, 3, kw["q"].shape, dtype=I32, device=dev(kw))),
      RuntimeError, _MUST_BE_FLOAT + "Int"),
    C("q_k_v_float64", "dense", S(q=As("q", F64), k=As("k", F64), v=As("v", F64)),
      RuntimeError, _MUST_BE_FLOAT + "Double"),
    C("q_k_v_int64", "dense", S(q=As("q", I64), k=As("k", I64), v=As("v", I64)),
      RuntimeError, _MUST_BE_FLOAT + "Long"),
    C("k_dtype_ne_q", "dense", S(k=As("k", F32)), RuntimeError, r"k must have the dtype of q \(BFloat16\), got Float"),
    C("v_dtype_ne_q", "dense", S(v=As("v", F16)), RuntimeError, r"v must have the dtype of q \(BFloat16\), got Half"),
    C("fp8_v_bf16", "fp8", S(v=As("v", BF16)), RuntimeError,
      r"v must have the dtype of q \(Float8_e4m3fn\), got BFloat16"),
    C("out_dtype_int32", "dense", S(out_dtype=I32), RuntimeError, _OUT_DTYPE + "Int"),
    C("out_dtype_float8", "fp8", S(out_dtype=FP8), RuntimeError, _OUT_DTYPE + "Float8_e4m3fn"),
    C("out_dtype_float64", "dense", S(out_dtype=F64), RuntimeError, _OUT_DTYPE + "Double"),
    # ---- ranks and shape agreement
    C("q_rank3_dense", "dense", S(q=Fn("q", lambda t: t[0])), RuntimeError,
      r"q must be \(batch_size, seqlen_q, num_heads, head_dim\), got shape \[3, 4, 16\]"),
    C("q_rank5_dense", "dense", S(q=Fn("q", lambda t: t[None])), RuntimeError,
      r"q must be \(batch_size, seqlen_q, num_heads, head_dim\), got shape \[1, 2, 3, 4, 16\]"),
    C("q_rank4_ragged", "ragged", S(q=Fn("q", lambda t: t[None])), RuntimeError,
      r"q must be \(total_q, num_heads, head_dim\) when cu_seqlens_q is given, got shape \[1, 7, 4, 16\]"),
    C("k_rank3_dense", "dense", S(k=Fn("k", lambda t: t[0]), v=Fn("v", lambda t: t[0])), RuntimeError,
      r"k must be \(batch_size, seqlen_k, num_heads_k, head_dim\), got shape \[5, 2, 16\]"),
    C("k_rank4_ragged", "ragged", S(k=Fn("k", lambda t: t[None]), v=Fn("v", lambda t: t[None])), RuntimeError,
      r"k must be \(total_k, num_heads_k, head_dim\) when cu_seqlens_k is given, got shape \[1, 9, 2, 16\]"),
    C("k_rank3_paged", "paged", S(k=Fn("k", lambda t: t[0]), v=Fn("v", lambda t: t[0])), RuntimeError,
      r"k must be \(num_pages, page_size, num_heads_k, head_dim\) with page_table, got shape \[4, 2, 16\]"),
    C("v_rank3_dense", "dense", S(v=Fn("v", lambda t: t[0])), RuntimeError,
      r"v must match k in every dimension but the last: k \[2, 5, 2, 16\], v \[5, 2, 16\]"),
    C("v_seqlen_ne_k", "dense", S(v=R("v", B, SK + 1, HK, D)), RuntimeError,
      r"v must match k in every dimension but the last: k \[2, 5, 2, 16\], v \[2, 6, 2, 16\]"),
    C("v_heads_ne_k", "dense", S(v=R("v", B, SK, HK + 1, D)), RuntimeError,
      r"v must match k in every dimension but the last: k \[2, 5, 2, 16\], v \[2, 5, 3, 16\]"),
    C("v_pages_ne_k", "paged", S(v=R("v", NUM_PAGES - 1, PAGE, HK, D)), RuntimeError,
      r"v must match k in every dimension but the last: k \[6, 4, 2, 16\], v \[5, 4, 2, 16\]"),
    C("v_rows_ne_k_ragged", "ragged", S(v=R("v", 10, HK, D)), RuntimeError,
      r"v must match k in every dimension but the last: k \[9, 2, 16\], v \[10, 2, 16\]"),
    C("k_batch_ne_q", "dense", S(k=R("k", B + 1, SK, HK, D), v=R("v", B + 1, SK, HK, D)), RuntimeError,
      r"k must have batch_size \(2\) sequences, got 3"),
    # ---- heads and head dims
    C("heads_not_multiple_of_heads_k", "dense", S(k=R("k", B, SK, 3, D), v=R("v", B, SK, 3, D)), RuntimeError,
      r"num_heads \(4\) must be a multiple of num_heads_k \(3\)"),
    C("heads_k_gt_heads", "dense", S(k=R("k", B, SK, 8, D), v=R("v", B, SK, 8, D)), RuntimeError,
      r"num_heads \(4\) must be a multiple of num_heads_k \(8\)"),
    C("heads_k_zero", "dense", S(k=R("k", B, SK, 0, D), v=R("v", B, SK, 0, D)), RuntimeError,
      r"num_heads \(4\) must be a multiple of num_heads_k \(0\)"),
    C("head_dim_513", "dense", S(q=R("q", 1, 1, 1, 513), k=R("k", 1, 1, 1, 513), v=R("v", 1, 1, 1, 16)),
      RuntimeError, r"head_dim must be in \[1, 512\], got 513"),
    C("head_dim_0", "dense", S(q=R("q", B, SQ, H, 0), k=R("k", B, SK, HK, 0)), RuntimeError,
      r"head_dim must be in \[1, 512\], got 0"),
    C("head_dim_v_513", "dense", S(v=R("v", B, SK, HK, 513)), RuntimeError,
      r"head_dim_v \(v\.size\(-1\)\) must be in \[1, 512\], got 513"),
    C("k_head_dim_ne_q", "dense", S(k=R("k", B, SK, HK, 8)), RuntimeError,
      r"k head_dim \(8\) must equal q head_dim \(16\)"),
    # ---- contiguity of the last dimension
    C("q_last_dim_strided", "dense", S(q=Fn("q", strided_last)), RuntimeError,
      r"q must have a contiguous last dimension \(stride 1\), got stride 2"),
    C("q_last_dim_strided_ragged", "ragged", S(q=Fn("q", strided_last)), RuntimeError,
      r"q must have a contiguous last dimension \(stride 1\), got stride 2"),
    C("k_last_dim_strided", "dense", S(k=Fn("k", strided_last)), RuntimeError,
      r"k must have a contiguous last dimension \(stride 1\), got stride 2"),
    C("v_last_dim_strided", "paged", S(v=Fn("v", strided_last)), RuntimeError,
      r"v must have a contiguous last dimension \(stride 1\), got stride 2"),
    C("qv_last_dim_strided", "qv", S(qv=Fn("qv", strided_last)), RuntimeError,
      r"qv must have a contiguous last dimension \(stride 1\), got stride 2"),
    C("page_table_last_dim_strided", "paged", S(page_table=Fn("page_table", strided_last)), RuntimeError,
      r"page_table must have a contiguous last dimension \(stride 1\), got stride 2"),
    # ---- cu_seqlens: dtype, rank, length, contiguity
    C("cu_seqlens_q_int64", "ragged", S(cu_seqlens_q=As("cu_seqlens_q", I64)), RuntimeError,
      r"cu_seqlens_q must be int32, got Long"),
    C("cu_seqlens_k_int64", "ragged", S(cu_seqlens_k=As("cu_seqlens_k", I64)), RuntimeError,
      r"cu_seqlens_k must be int32, got Long"),
    C("cu_seqlens_k_float32", "ragged", S(cu_seqlens_k=As("cu_seqlens_k", F32)), RuntimeError,
      r"cu_seqlens_k must be int32, got Float"),
    C("cu_seqlens_q_2d", "ragged", S(cu_seqlens_q=Fn("cu_seqlens_q", lambda t: t[None])), RuntimeError,
      r"cu_seqlens_q must be 1-D \(batch_size \+ 1\), got shape \[1, 3\]"),
    C("cu_seqlens_q_0d", "ragged", S(cu_seqlens_q=I(7)), RuntimeError, r"cu_seqlens_q must be 1-D"),
    C("cu_seqlens_q_empty", "ragged", S(cu_seqlens_q=I([])), RuntimeError,
      r"cu_seqlens_q must have at least 1 entry"),
    C("cu_seqlens_q_longer_than_cu_seqlens_k", "ragged", S(cu_seqlens_q=I([0, 3, 5, 7])), RuntimeError,
      r"cu_seqlens_k must have 4 entries, got 3"),
    C("cu_seqlens_k_too_long", "ragged", S(cu_seqlens_k=I([0, 4, 9, 9])), RuntimeError,
      r"cu_seqlens_k must have 3 entries, got 4"),
    C("cu_seqlens_k_too_short", "ragged", S(cu_seqlens_k=I([0, 9])), RuntimeError,
      r"cu_seqlens_k must have 3 entries, got 2"),
    C("cu_seqlens_k_non_contiguous", "ragged", S(cu_seqlens_k=lambda kw: ints(dev(kw), [0, 0, 4, 0, 9, 0])[::2]),
      RuntimeError, r"cu_seqlens_k must be contiguous"),
    # ---- cu_seqlens: values
    C("cu_seqlens_q_decreasing", "ragged", S(cu_seqlens_q=I([0, 5, 3])), RuntimeError,
      r"cu_seqlens_q must be non-decreasing, but cu_seqlens_q\[2\] = 3 < cu_seqlens_q\[1\] = 5", values=True),
    C("cu_seqlens_k_decreasing", "ragged", S(cu_seqlens_k=I([0, 6, 2])), RuntimeError,
      r"cu_seqlens_k must be non-decreasing, but cu_seqlens_k\[2\] = 2 < cu_seqlens_k\[1\] = 6", values=True),
    C("cu_seqlens_q_negative_start", "ragged", S(cu_seqlens_q=I([-1, 3, 7])), RuntimeError,
      r"cu_seqlens_q\[0\] must be >= 0, got -1", values=True),
    C("cu_seqlens_q_end_beyond_rows", "ragged", S(cu_seqlens_q=I([0, 3, 8])), RuntimeError,
      r"cu_seqlens_q\[-1\] = 8 exceeds the 7 rows of its tensor", values=True),
    C("cu_seqlens_k_end_beyond_rows", "ragged", S(cu_seqlens_k=I([0, 4, 10])), RuntimeError,
      r"cu_seqlens_k\[-1\] = 10 exceeds the 9 rows of its tensor", values=True),
    C("cu_seqlens_k_end_int32_max", "ragged", S(cu_seqlens_k=I([0, 4, 2**31 - 1])), RuntimeError,
      r"cu_seqlens_k\[-1\] = 2147483647 exceeds the 9 rows of its tensor", values=True),
    # ---- page_table
    C("page_table_int64", "paged", S(page_table=As("page_table", I64)), RuntimeError,
      r"page_table must be a 2-D int32 tensor \(batch_size, max_num_pages\), got Long"),
    C("page_table_1d", "paged", S(page_table=Fn("page_table", lambda t: t.flatten())), RuntimeError,
      r"page_table must be a 2-D int32 tensor \(batch_size, max_num_pages\), got Int \[6\]"),
    C("page_table_wrong_rows", "paged", S(page_table=I([[5, 0, 3], [1, 4, 2], [0, 0, 0]])), RuntimeError,
      r"page_table must have batch_size \(2\) rows, got 3"),
    C("page_table_without_seqused_k", "paged", S(seqused_k=None), RuntimeError,
      r"seqused_k is required with page_table"),
    C("page_table_with_cu_seqlens_k", "paged", S(cu_seqlens_k=I([0, 10, 17])), RuntimeError,
      r"page_table and cu_seqlens_k cannot both be given"),
    C("page_table_entry_eq_num_pages", "paged", S(page_table=with_entry("page_table", (0, 1), NUM_PAGES)),
      RuntimeError, r"page_table\[0, 1\] = 6 is out of range \[0, 6\)", values=True),
    C("page_table_entry_negative", "paged", S(page_table=with_entry("page_table", (1, 0), -1)),
      RuntimeError, r"page_table\[1, 0\] = -1 is out of range \[0, 6\)", values=True),
    C("page_table_entry_int32_max", "paged", S(page_table=with_entry("page_table", (1, 1), 2**31 - 1)),
      RuntimeError, r"page_table\[1, 1\] = 2147483647 is out of range \[0, 6\)", values=True),
    C("page_table_entry_int32_min", "paged", S(page_table=with_entry("page_table", (0, 2), -(2**31))),
      RuntimeError, r"page_table\[0, 2\] = -2147483648 is out of range \[0, 6\)", values=True),
    # ---- seqused_q / seqused_k
    C("seqused_k_int64", "paged", S(seqused_k=As("seqused_k", I64)), RuntimeError,
      r"seqused_k must be int32, got Long"),
    C("seqused_k_wrong_length", "paged", S(seqused_k=I([10])), RuntimeError,
      r"seqused_k must have 2 entries, got 1"),
    C("seqused_k_beyond_capacity_dense", "dense", S(seqused_k=I([6, 2])), RuntimeError,
      r"seqused_k\[0\] = 6 must be in \[0, 5\] \(the key capacity of sequence 0\)", values=True),
    C("seqused_k_beyond_capacity_paged", "paged", S(seqused_k=I([10, 13])), RuntimeError,
      r"seqused_k\[1\] = 13 must be in \[0, 12\] \(the key capacity of sequence 1\)", values=True),
    # a ragged sequence may read keys past its own segment while they lie inside k (FA3)
    C("seqused_k_beyond_capacity_ragged", "ragged", S(seqused_k=I([5, 6])), RuntimeError,
      r"seqused_k\[1\] = 6 must be in \[0, 5\] \(the key capacity of sequence 1\)", values=True),
    C("seqused_k_negative", "dense", S(seqused_k=I([-1, 2])), RuntimeError,
      r"seqused_k\[0\] = -1 must be in \[0, 5\]", values=True),
    C("seqused_q_beyond_seqlen", "dense", S(seqused_q=I([3, 4])), RuntimeError,
      r"seqused_q\[1\] = 4 must be in \[0, 3\]", values=True),
    C("seqused_q_negative", "ragged", S(seqused_q=I([-2, 1])), RuntimeError,
      r"seqused_q\[0\] = -2 must be in \[0, 3\]", values=True),
    # ---- cache_batch_idx
    C("cache_batch_idx_int64", "batch_idx", S(cache_batch_idx=As("cache_batch_idx", I64)), RuntimeError,
      r"cache_batch_idx must be int32, got Long"),
    C("cache_batch_idx_wrong_length", "batch_idx", S(cache_batch_idx=I([2, 0, 1])), RuntimeError,
      r"cache_batch_idx must have 2 entries, got 3"),
    C("cache_batch_idx_out_of_range", "batch_idx", S(cache_batch_idx=I([2, 3])), RuntimeError,
      r"cache_batch_idx\[1\] = 3 is out of range \[0, 3\)", values=True),
    C("cache_batch_idx_negative", "batch_idx", S(cache_batch_idx=I([-1, 0])), RuntimeError,
      r"cache_batch_idx\[0\] = -1 is out of range \[0, 3\)", values=True),
    C("cache_batch_idx_paged_out_of_range", "paged", S(cache_batch_idx=I([0, 2])), RuntimeError,
      r"cache_batch_idx\[1\] = 2 is out of range \[0, 2\)", values=True),
    # ---- cache_leftpad
    C("cache_leftpad_int64", "padded", S(cache_leftpad=As("cache_leftpad", I64)), RuntimeError,
      r"cache_leftpad must be int32, got Long"),
    C("cache_leftpad_beyond_seqused_k", "padded", S(cache_leftpad=I([5, 0])), RuntimeError,
      r"cache_leftpad\[0\] = 5 must be in \[0, 4\]", values=True),
    C("cache_leftpad_negative", "padded", S(cache_leftpad=I([0, -1])), RuntimeError,
      r"cache_leftpad\[1\] = -1 must be in \[0, 5\]", values=True),
    # ---- qv
    C("qv_wrong_head_dim", "qv", S(qv=R("qv", B, SQ, H, 16)), RuntimeError,
      r"qv must have shape \[2, 3, 4, 8\] \(q's shape with head_dim_v\), got \[2, 3, 4, 16\]"),
    C("qv_wrong_seqlen", "qv", S(qv=R("qv", B, SQ + 1, H, 8)), RuntimeError,
      r"qv must have shape \[2, 3, 4, 8\] \(q's shape with head_dim_v\), got \[2, 4, 4, 8\]"),
    C("qv_wrong_dtype", "qv", S(qv=As("qv", F32)), RuntimeError,
      r"qv must have the dtype of q \(BFloat16\), got Float"),
    # ---- fp8 descales
    C("q_descale_on_bf16", "dense", S(q_descale=lambda kw: torch.ones(B, HK, device=dev(kw))), RuntimeError,
      r"q_descale is only used with float8_e4m3fn inputs, got q of dtype BFloat16"),
    C("k_descale_on_fp16", "dense",
      S(q=As("q", F16), k=As("k", F16), v=As("v", F16), k_descale=lambda kw: torch.ones(B, HK, device=dev(kw))),
      RuntimeError, r"k_descale is only used with float8_e4m3fn inputs, got q of dtype Half"),
    C("q_descale_wrong_shape", "fp8", S(q_descale=lambda kw: torch.ones(B, H, device=dev(kw))), RuntimeError,
      r"q_descale must have shape \(batch_size, num_heads_k\) = \(2, 2\), got \[2, 4\]"),
    C("k_descale_1d", "fp8", S(k_descale=lambda kw: torch.ones(B, device=dev(kw))), RuntimeError,
      r"k_descale must have shape \(batch_size, num_heads_k\) = \(2, 2\), got \[2\]"),
    C("v_descale_wrong_batch", "fp8", S(v_descale=lambda kw: torch.ones(1, HK, device=dev(kw))), RuntimeError,
      r"v_descale must have shape \(batch_size, num_heads_k\) = \(2, 2\), got \[1, 2\]"),
    C("v_descale_bf16", "fp8", S(v_descale=As("v_descale", BF16)), RuntimeError,
      r"v_descale must be float32, got BFloat16"),
    # ---- learnable_sink
    C("learnable_sink_wrong_length", "sink", S(learnable_sink=lambda kw: torch.randn(HK, device=dev(kw))),
      RuntimeError, r"learnable_sink must have shape \(num_heads,\) = \(4,\), got \[2\]"),
    C("learnable_sink_2d", "sink", S(learnable_sink=Fn("learnable_sink", lambda t: t[None])), RuntimeError,
      r"learnable_sink must have shape \(num_heads,\) = \(4,\), got \[1, 4\]"),
    C("learnable_sink_int", "sink", S(learnable_sink=I([0, 1, 2, 3])), RuntimeError,
      r"learnable_sink must be a floating tensor, got Int"),
    # ---- scalar options
    C("num_splits_-1", "dense", S(num_splits=-1), RuntimeError, r"num_splits must be in \[0, 256\], got -1"),
    C("num_splits_257", "dense", S(num_splits=257), RuntimeError, r"num_splits must be in \[0, 256\], got 257"),
    C("attention_chunk_negative", "dense", S(attention_chunk=-1), RuntimeError,
      r"attention_chunk must be in \[0, 2\^31 - 1\], got -1"),
    C("softcap_negative", "dense", S(softcap=-1.0), RuntimeError, r"softcap must be a finite value >= 0, got -1"),
    # ---- ALiBi slopes: fp32 (H,) or (B, H)
    C("alibi_slopes_bf16", "dense", S(alibi_slopes=lambda kw: torch.rand(H, dtype=BF16, device=dev(kw))),
      RuntimeError, r"alibi_slopes must be float32, got BFloat16"),
    C("alibi_slopes_wrong_heads", "dense", S(alibi_slopes=lambda kw: torch.rand(H + 1, device=dev(kw))),
      RuntimeError, r"alibi_slopes must have shape \(num_heads,\) or \(batch_size, num_heads\)"),
    C("alibi_slopes_3d", "dense", S(alibi_slopes=lambda kw: torch.rand(1, B, H, device=dev(kw))),
      RuntimeError, r"alibi_slopes must have shape \(num_heads,\) or \(batch_size, num_heads\)"),
    C("softcap_inf", "dense", S(softcap=math.inf), RuntimeError, r"softcap must be a finite value >= 0, got inf"),
    C("softcap_nan", "dense", S(softcap=math.nan), RuntimeError, r"softcap must be a finite value >= 0, got nan"),
    C("softmax_scale_nan", "dense", S(softmax_scale=math.nan), RuntimeError, r"softmax_scale must be finite"),
    C("softmax_scale_inf", "dense", S(softmax_scale=-math.inf), RuntimeError, r"softmax_scale must be finite"),
    C("window_left_-2", "dense", S(window_size_left=-2), RuntimeError,
      r"window_size_left \(-1 = unbounded\) must be in \[-1, 2\^31 - 1\], got -2"),
    C("window_right_-5", "dense", S(window_size_right=-5, causal=True), RuntimeError,
      r"window_size_right \(-1 = unbounded\) must be in \[-1, 2\^31 - 1\], got -5"),
    # ---- context parallel
    C("cp_rank_eq_world_size", "cp", S(cp_rank=2), RuntimeError, r"cp_rank must be in \[0, 2\), got 2"),
    C("cp_rank_negative", "cp", S(cp_rank=-1), RuntimeError, r"cp_rank must be in \[0, 2\^31 - 1\], got -1"),
    C("cp_rank_without_world", "dense", S(cp_rank=1), RuntimeError, r"cp_rank must be in \[0, 1\), got 1"),
    C("cp_world_size_0", "dense", S(cp_world_size=0), RuntimeError, r"cp_world_size must be in \[1, 2\^31 - 1\], got 0"),
    C("cp_without_tot_seqused_k", "cp", S(cp_tot_seqused_k=None), RuntimeError,
      r"cp_tot_seqused_k \(batch_size,\) is required when cp_world_size > 1"),
    C("cp_tot_seqused_k_cumulative_length", "cp", S(cp_tot_seqused_k=I([0, 10, 19])), RuntimeError,
      r"cp_tot_seqused_k must have 2 entries, got 3"),
    C("cp_tot_seqused_k_int64", "cp", S(cp_tot_seqused_k=As("cp_tot_seqused_k", I64)), RuntimeError,
      r"cp_tot_seqused_k must be int32, got Long"),
    C("cp_tot_seqused_k_negative", "cp", S(cp_tot_seqused_k=I([-1, 9])), RuntimeError,
      r"cp_tot_seqused_k\[0\] must be >= 0", values=True),
    # ---- scheduler_metadata
    C("scheduler_metadata_wrong_size", "sched", S(scheduler_metadata=I([1, 1])), RuntimeError,
      r"scheduler_metadata must have 3 entries, got 2"),
    C("scheduler_metadata_int64", "sched", S(scheduler_metadata=As("scheduler_metadata", I64)), RuntimeError,
      r"scheduler_metadata must be int32, got Long"),
    C("scheduler_metadata_zero_splits", "sched", S(scheduler_metadata=I([1, 0, 1])), RuntimeError,
      r"scheduler_metadata entry 1 = 0 is not a split count in \[1, 256\]", values=True),
    C("scheduler_metadata_huge_splits", "sched", S(scheduler_metadata=I([1, 1, 100000])), RuntimeError,
      r"scheduler_metadata entry 2 = 100000 is not a split count in \[1, 256\]", values=True),
    # ---- fmha_fwd_out: the caller's out / lse
    C("out_wrong_head_dim", "dense", S(out=lambda kw: torch.full((B, SQ, H, 8), SENTINEL, dtype=BF16, device=dev(kw))),
      RuntimeError, r"out must have shape \[2, 3, 4, 16\], got \[2, 3, 4, 8\]", call="out"),
    C("out_wrong_rank_ragged", "ragged", S(out=Fn("out", lambda t: t[None])), RuntimeError,
      r"out must have shape \[7, 4, 16\], got \[1, 7, 4, 16\]", call="out"),
    C("out_int32", "dense", S(out=As("out", I32)), RuntimeError, _OUT_DTYPE + "Int", call="out"),
    C("out_float64", "dense", S(out=As("out", F64)), RuntimeError, _OUT_DTYPE + "Double", call="out"),
    C("out_float8", "fp8", S(out=As("out", FP8)), RuntimeError, _OUT_DTYPE + "Float8_e4m3fn", call="out"),
    C("out_last_dim_strided", "dense", S(out=Fn("out", strided_last)), RuntimeError,
      r"out must have a contiguous last dimension \(stride 1\), got stride 2", call="out"),
    C("lse_transposed_dense", "dense", S(lse=Fn("lse", lambda t: t.transpose(1, 2).contiguous())), RuntimeError,
      r"lse must have shape \[2, 4, 3\], got \[2, 3, 4\]", call="out"),
    C("lse_transposed_ragged", "ragged", S(lse=Fn("lse", lambda t: t.t().contiguous())), RuntimeError,
      r"lse must have shape \[4, 7\], got \[7, 4\]", call="out"),
    C("lse_bf16", "dense", S(lse=As("lse", BF16)), RuntimeError, r"lse must be float32, got BFloat16", call="out"),
    C("out_page_table_garbage", "paged", S(page_table=with_entry("page_table", (0, 0), 99)), RuntimeError,
      r"page_table\[0, 0\] = 99 is out of range \[0, 6\)", call="out", values=True),
    # ---- flash_attn_varlen_func (Python API)
    C("api_backend_unknown", "dense", S(backend="cuda"), ValueError,
      r"backend must be one of \('auto', 'mutlass', 'mubin'\), got 'cuda'", call="api"),
    C("api_backend_wrong_case", "dense", S(backend="MUBIN"), ValueError,
      r"backend must be one of \('auto', 'mutlass', 'mubin'\), got 'MUBIN'", call="api"),
    C("api_window_size_len3", "dense", S(window_size=(1, 2, 3)), ValueError,
      r"window_size must be a \(left, right\) pair, got \(1, 2, 3\)", call="api"),
    C("api_window_size_len1", "dense", S(window_size=[4]), ValueError,
      r"window_size must be a \(left, right\) pair, got \[4\]", call="api"),
    C("api_window_size_int", "dense", S(window_size=4), (ValueError, TypeError),
      r"window_size must be a \(left, right\) pair", call="api"),
    C("api_num_splits_257", "dense", S(num_splits=257), RuntimeError,
      r"num_splits must be in \[0, 256\], got 257", call="api"),
    C("api_q_float64", "ragged", S(q=As("q", F64), k=As("k", F64), v=As("v", F64)), RuntimeError,
      _MUST_BE_FLOAT + "Double", call="api"),
    C("api_page_table_garbage", "paged", S(page_table=with_entry("page_table", (1, 1), -5)), RuntimeError,
      r"page_table\[1, 1\] = -5 is out of range \[0, 6\)", call="api", values=True),
    C("api_out_wrong_shape", "dense",
      S(out=lambda kw: torch.full((B, SQ, H, 8), SENTINEL, dtype=BF16, device=dev(kw))), RuntimeError,
      r"out must have shape \[2, 3, 4, 16\], got \[2, 3, 4, 8\]", call="api"),
    C("api_out_int32", "dense", S(out=lambda kw: torch.zeros(B, SQ, H, D, dtype=I32, device=dev(kw))), RuntimeError,
      _OUT_DTYPE + "Int", call="api"),
    C("api_out_with_rank2_q", "dense",
      S(q=Fn("q", lambda t: t[0, 0]), out=lambda kw: torch.zeros(H, D, dtype=BF16, device=dev(kw))), ValueError,
      r"q must be \(B, Sq, H, D\), got shape \(4, 16\)", call="api"),
]


# --------------------------------------------------------------------------------------
# flash_attn_combine
# --------------------------------------------------------------------------------------
NSPLIT = 3


def combine_dense(d):
    return dict(out_partial=torch.randn(NSPLIT, B, 5, H, D, device=d), lse_partial=torch.randn(NSPLIT, B, 5, H, device=d))


def combine_varlen(d):
    return dict(out_partial=torch.randn(NSPLIT, 7, H, D, device=d), lse_partial=torch.randn(NSPLIT, 7, H, device=d))


COMBINE_BASES = dict(dense=combine_dense, varlen=combine_varlen)


def combine_build(base, call, device):
    kw = COMBINE_BASES[base](device)
    if call == "out":
        out, lse = OP.fmha_combine(**kw)
        kw["out"] = torch.full_like(out, SENTINEL)
        kw["lse"] = torch.full_like(lse, SENTINEL)
    return kw


def combine_invoke(call):
    return {"op": lambda kw: OP.fmha_combine(**kw),
            "out": lambda kw: OP.fmha_combine_out(**kw),
            "api": lambda kw: flash_attn_combine(**kw)}[call]


def _op_rank_msg(shape):
    return (r"out_partial must be \(num_splits, batch, seqlen, num_heads, head_dim\) or "
            r"\(num_splits, total_q, num_heads, head_dim\), got shape " + shape)


_COMBINE_OUT_DTYPE = r"out_dtype must be float32, float16 or bfloat16, got "

COMBINE_CASES = [
    C("out_partial_bf16", "dense", S(out_partial=As("out_partial", BF16)), RuntimeError,
      r"out_partial must be float32, got BFloat16"),
    C("out_partial_fp16_varlen", "varlen", S(out_partial=As("out_partial", F16)), RuntimeError,
      r"out_partial must be float32, got Half"),
    C("out_partial_float64", "dense", S(out_partial=As("out_partial", F64)), RuntimeError,
      r"out_partial must be float32, got Double"),
    C("lse_partial_float64", "dense", S(lse_partial=As("lse_partial", F64)), RuntimeError,
      r"lse_partial must be float32, got Double"),
    C("lse_partial_bf16", "varlen", S(lse_partial=As("lse_partial", BF16)), RuntimeError,
      r"lse_partial must be float32, got BFloat16"),
    C("out_partial_rank3", "dense", S(out_partial=R("out_partial", NSPLIT, 10, D), lse_partial=R("lse_partial", NSPLIT, 10)),
      RuntimeError, _op_rank_msg(r"\[3, 10, 16\]")),
    C("out_partial_rank6", "dense", S(out_partial=Fn("out_partial", lambda t: t[None])), RuntimeError,
      _op_rank_msg(r"\[1, 3, 2, 5, 4, 16\]")),
    C("lse_partial_wrong_heads", "dense", S(lse_partial=R("lse_partial", NSPLIT, B, 5, H - 1)), RuntimeError,
      r"lse_partial must have shape \[3, 2, 5, 4\] \(out_partial without head_dim\), got \[3, 2, 5, 3\]"),
    C("lse_partial_wrong_splits", "dense", S(lse_partial=R("lse_partial", NSPLIT - 1, B, 5, H)), RuntimeError,
      r"lse_partial must have shape \[3, 2, 5, 4\] \(out_partial without head_dim\), got \[2, 2, 5, 4\]"),
    C("lse_partial_with_head_dim", "dense", S(lse_partial=R("lse_partial", NSPLIT, B, 5, H, D)), RuntimeError,
      r"lse_partial must have shape \[3, 2, 5, 4\] \(out_partial without head_dim\), got \[3, 2, 5, 4, 16\]"),
    C("lse_partial_transposed_varlen", "varlen", S(lse_partial=R("lse_partial", NSPLIT, H, 7)), RuntimeError,
      r"lse_partial must have shape \[3, 7, 4\] \(out_partial without head_dim\), got \[3, 4, 7\]"),
    C("splits_257", "dense", S(out_partial=R("out_partial", 257, 1, 1, 1, 4), lse_partial=R("lse_partial", 257, 1, 1, 1)),
      RuntimeError, r"num_splits \(out_partial\.size\(0\)\) must be in \[1, 256\], got 257"),
    C("splits_0", "varlen", S(out_partial=R("out_partial", 0, 7, H, D), lse_partial=R("lse_partial", 0, 7, H)),
      RuntimeError, r"num_splits \(out_partial\.size\(0\)\) must be in \[1, 256\], got 0"),
    C("head_dim_0", "dense", S(out_partial=R("out_partial", NSPLIT, B, 5, H, 0)), RuntimeError,
      r"head_dim must be in \[1, 512\], got 0"),
    C("head_dim_513", "varlen", S(out_partial=R("out_partial", NSPLIT, 7, H, 513)), RuntimeError,
      r"head_dim must be in \[1, 512\], got 513"),
    C("out_dtype_int32", "dense", S(out_dtype=I32), RuntimeError, _COMBINE_OUT_DTYPE + "Int"),
    C("out_dtype_float8", "dense", S(out_dtype=FP8), RuntimeError, _COMBINE_OUT_DTYPE + "Float8_e4m3fn"),
    C("out_dtype_float64", "varlen", S(out_dtype=F64), RuntimeError, _COMBINE_OUT_DTYPE + "Double"),
    C("out_dtype_bool", "dense", S(out_dtype=torch.bool), RuntimeError, _COMBINE_OUT_DTYPE + "Bool"),
    # fmha_combine_out
    C("out_wrong_head_dim", "dense", S(out=lambda kw: torch.full((B, 5, H, 8), SENTINEL, device=dev(kw))),
      RuntimeError, r"out must have shape \[2, 5, 4, 16\], got \[2, 5, 4, 8\]", call="out"),
    C("out_wrong_rank_varlen", "varlen", S(out=Fn("out", lambda t: t[None])), RuntimeError,
      r"out must have shape \[7, 4, 16\], got \[1, 7, 4, 16\]", call="out"),
    C("out_int32", "dense", S(out=As("out", I32)), RuntimeError, r"out(_dtype)? must be float32, float16 or bfloat16, got Int",
      call="out"),
    C("out_float8", "dense", S(out=As("out", FP8)), RuntimeError,
      r"out(_dtype)? must be float32, float16 or bfloat16, got Float8_e4m3fn", call="out"),
    C("out_non_contiguous", "dense", S(out=Fn("out", lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2))),
      RuntimeError, r"out must be contiguous", call="out"),
    C("lse_wrong_shape", "dense", S(lse=Fn("lse", lambda t: t.transpose(1, 2).contiguous())), RuntimeError,
      r"lse must have shape \[2, 5, 4\], got \[2, 4, 5\]", call="out"),
    C("lse_bf16", "varlen", S(lse=As("lse", BF16)), RuntimeError, r"lse must be a contiguous float32 tensor", call="out"),
    C("lse_non_contiguous", "dense", S(lse=Fn("lse", lambda t: t.transpose(1, 2).contiguous().transpose(1, 2))),
      RuntimeError, r"lse must be a contiguous float32 tensor", call="out"),
    # flash_attn_combine (Python API)
    C("api_out_wrong_shape", "dense", S(out=lambda kw: torch.zeros(B, 5, H, 8, device=dev(kw))), RuntimeError,
      r"out must have shape \[2, 5, 4, 16\], got \[2, 5, 4, 8\]", call="api"),
    C("api_out_dtype_mismatch", "dense",
      S(out=lambda kw: torch.zeros(B, 5, H, D, device=dev(kw)), out_dtype=F16), ValueError,
      r"out has dtype torch\.float32 but out_dtype is torch\.float16", call="api"),
    C("api_out_dtype_float8", "varlen", S(out_dtype=FP8), RuntimeError, _COMBINE_OUT_DTYPE + "Float8_e4m3fn",
      call="api"),
    C("api_out_dtype_int32", "dense", S(out_dtype=I32), RuntimeError, _COMBINE_OUT_DTYPE + "Int", call="api"),
    C("api_out_partial_bf16", "dense", S(out_partial=As("out_partial", BF16)), RuntimeError,
      r"out_partial must be float32, got BFloat16", call="api"),
    C("api_splits_257", "varlen", S(out_partial=R("out_partial", 257, 1, 1, 4), lse_partial=R("lse_partial", 257, 1, 1)),
      RuntimeError, r"num_splits \(out_partial\.size\(0\)\) must be in \[1, 256\], got 257", call="api"),
]


# --------------------------------------------------------------------------------------
# get_scheduler_metadata
# --------------------------------------------------------------------------------------
def sched_base(d):
    return dict(batch_size=B, max_seqlen_q=SQ, max_seqlen_k=200, num_heads_q=H, num_heads_kv=HK, headdim=D,
                headdim_v=D, qkv_dtype=BF16, seqused_k=ints(d, [200, 100]))


SCHED_BASES = dict(base=sched_base)


def sched_build(base, call, device):
    kw = SCHED_BASES[base](device)
    if call == "api":
        del kw["headdim_v"]  # the API defaults it to headdim
    return kw


def sched_invoke(call):
    return {"op": lambda kw: OP.get_scheduler_metadata(**kw),
            "api": lambda kw: get_scheduler_metadata(**kw)}[call]


_HD = r"headdim and headdim_v must be in \[1, 512\], got "
_SEQUSED = r"seqused_k \(cache_seqlens\) must be an int32 tensor of shape \(batch_size,\) = \(2,\), got "

SCHED_CASES = [
    C("heads_not_multiple", "base", S(num_heads_kv=3), RuntimeError,
      r"num_heads_q \(4\) must be a multiple of num_heads_kv \(3\)"),
    C("heads_kv_gt_heads_q", "base", S(num_heads_kv=8), RuntimeError,
      r"num_heads_q \(4\) must be a multiple of num_heads_kv \(8\)"),
    C("heads_kv_0", "base", S(num_heads_kv=0), RuntimeError, r"num_heads_kv must be in \[1, 2\^31 - 1\], got 0"),
    C("headdim_0", "base", S(headdim=0), RuntimeError, _HD + "0 and 16"),
    C("headdim_513", "base", S(headdim=513), RuntimeError, _HD + "513 and 16"),
    C("headdim_v_0", "base", S(headdim_v=0), RuntimeError, _HD + "16 and 0"),
    C("headdim_v_1024", "base", S(headdim_v=1024), RuntimeError, _HD + "16 and 1024"),
    C("seqused_k_int64", "base", S(seqused_k=As("seqused_k", I64)), RuntimeError, _SEQUSED + r"Long \[2\]"),
    C("seqused_k_float32", "base", S(seqused_k=As("seqused_k", F32)), RuntimeError, _SEQUSED + r"Float \[2\]"),
    C("seqused_k_too_short", "base", S(seqused_k=I([200])), RuntimeError, _SEQUSED + r"Int \[1\]"),
    C("seqused_k_too_long", "base", S(seqused_k=I([200, 100, 5])), RuntimeError, _SEQUSED + r"Int \[3\]"),
    C("seqused_k_2d", "base", S(seqused_k=Fn("seqused_k", lambda t: t[None])), RuntimeError, _SEQUSED + r"Int \[1, 2\]"),
    C("num_splits_-1", "base", S(num_splits=-1), RuntimeError, r"num_splits must be in \[0, 256\], got -1"),
    C("num_splits_257", "base", S(num_splits=257), RuntimeError, r"num_splits must be in \[0, 256\], got 257"),
    C("batch_size_-1", "base", S(batch_size=-1), RuntimeError, r"batch_size must be in \[0, 2\^31 - 1\], got -1"),
    C("max_seqlen_q_-1", "base", S(max_seqlen_q=-1), RuntimeError,
      r"max_seqlen_q must be in \[0, 2\^31 - 1\], got -1"),
    C("max_seqlen_k_new_-1", "base", S(max_seqlen_k_new=-1), RuntimeError,
      r"max_seqlen_k_new must be in \[0, 2\^31 - 1\], got -1"),
    # get_scheduler_metadata (Python API)
    C("api_heads_not_multiple", "base", S(num_heads_kv=3), RuntimeError,
      r"num_heads_q \(4\) must be a multiple of num_heads_kv \(3\)", call="api"),
    C("api_headdim_0", "base", S(headdim=0), RuntimeError, _HD + "0 and 0", call="api"),
    C("api_headdim_600", "base", S(headdim=600), RuntimeError, _HD + "600 and 600", call="api"),
    C("api_seqused_k_int64", "base", S(seqused_k=As("seqused_k", I64)), RuntimeError, _SEQUSED + r"Long \[2\]",
      call="api"),
    C("api_seqused_k_wrong_length", "base", S(seqused_k=I([1, 2, 3])), RuntimeError, _SEQUSED + r"Int \[3\]",
      call="api"),
    # api_num_splits_-1 removed: MATE's num_splits=-1 ("do not split") is accepted by the Python API
    # (mapped to 1; tests/test_mate_forms.py); the raw op rows above keep rejecting -1.
    C("api_num_splits_257", "base", S(num_splits=257), RuntimeError, r"num_splits must be in \[0, 256\], got 257",
      call="api"),
    C("api_window_size_len3", "base", S(window_size=(0, 1, 2)), ValueError,
      r"window_size must be a \(left, right\) pair, got \(0, 1, 2\)", call="api"),
    C("api_batch_size_-1_without_seqused_k", "base", S(batch_size=-1, seqused_k=None), ValueError,
      r"batch_size and max_seqlen_k must be >= 0, got -1 and 200", call="api"),
]

FAMILIES = {
    "fmha": (FMHA_CASES, fmha_build, fmha_invoke),
    "combine": (COMBINE_CASES, combine_build, combine_invoke),
    "scheduler": (SCHED_CASES, sched_build, sched_invoke),
}


# --------------------------------------------------------------------------------------
# baselines succeed (so no table passes vacuously)
# --------------------------------------------------------------------------------------
def _calls_used(cases):
    return sorted({(p.values[0], p.values[4]) for p in cases})


@pytest.mark.parametrize("base,call", _calls_used(FMHA_CASES) + [(b, "op") for b in FMHA_BASES]
                         + [(b, "api") for b in FMHA_API_BASES])
def test_fmha_baseline_succeeds(base, call, device):
    kw = fmha_build(base, call, device)
    res = fmha_invoke(call)(kw)
    out, lse = (kw["out"], kw["lse"]) if call == "out" else res
    q, v = kw["q"], kw["v"]
    assert out.shape == (*q.shape[:-1], v.shape[-1])
    assert out.float().isfinite().all()
    assert not lse.isnan().any()
    if call == "out":  # really written, and equal to the allocating op
        ref_out, ref_lse = OP.fmha_fwd(**{k: t for k, t in kw.items() if k not in ("out", "lse")})
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(lse, ref_lse)


@pytest.mark.parametrize("base,call", _calls_used(COMBINE_CASES) + [(b, c) for b in COMBINE_BASES for c in ("op", "api")])
def test_combine_baseline_succeeds(base, call, device):
    kw = combine_build(base, call, device)
    res = combine_invoke(call)(kw)
    out, lse = (kw["out"], kw["lse"]) if call == "out" else res
    assert out.shape == kw["out_partial"].shape[1:] and lse.shape == kw["lse_partial"].shape[1:]
    assert out.isfinite().all() and lse.isfinite().all()


@pytest.mark.parametrize("call", ["op", "api"])
def test_scheduler_baseline_succeeds(call, device):
    kw = sched_build("base", call, device)
    meta = sched_invoke(call)(kw)
    assert meta.dtype == I32 and meta.shape == (B + 1,)
    # reusable: the metadata is accepted by fmha_fwd with the same problem
    q, k = rnd(device, B, SQ, H, D), rnd(device, B, 200, HK, D)
    OP.fmha_fwd(q, k, k, seqused_k=kw["seqused_k"], scheduler_metadata=meta)


def test_tables_cover_every_family_and_call():
    for name, (cases, _, _) in FAMILIES.items():
        assert len(cases) >= 15, name
        ids = [p.id for p in cases]
        assert len(ids) == len(set(ids)), f"duplicate ids in {name}"


# --------------------------------------------------------------------------------------
# the tables
# --------------------------------------------------------------------------------------
def _run_case(family, base, mutate, exc, match, call, values, device):
    _, build, invoke = FAMILIES[family]
    kw = build(base, call, device)
    mutate(kw)
    _expect_rejected(invoke(call), kw, exc, match, device, values)


@pytest.mark.parametrize("base,mutate,exc,match,call,values", FMHA_CASES)
def test_fmha_fwd_bad_input(base, mutate, exc, match, call, values, device):
    _run_case("fmha", base, mutate, exc, match, call, values, device)


@pytest.mark.parametrize("base,mutate,exc,match,call,values", COMBINE_CASES)
def test_fmha_combine_bad_input(base, mutate, exc, match, call, values, device):
    _run_case("combine", base, mutate, exc, match, call, values, device)


@pytest.mark.parametrize("base,mutate,exc,match,call,values", SCHED_CASES)
def test_scheduler_metadata_bad_input(base, mutate, exc, match, call, values, device):
    _run_case("scheduler", base, mutate, exc, match, call, values, device)


# --------------------------------------------------------------------------------------
# device mismatch (needs a second device with mate kernels)
# --------------------------------------------------------------------------------------
MISMATCH = [
    ("dense", "k", "fmha"), ("dense", "v", "fmha"), ("ragged", "cu_seqlens_q", "fmha"),
    ("ragged", "cu_seqlens_k", "fmha"), ("paged", "page_table", "fmha"), ("paged", "seqused_k", "fmha"),
    ("qv", "qv", "fmha"), ("fp8", "q_descale", "fmha"), ("sink", "learnable_sink", "fmha"),
    ("cp", "cp_tot_seqused_k", "fmha"), ("batch_idx", "cache_batch_idx", "fmha"),
]


@pytest.mark.parametrize("base,name,family", MISMATCH)
def test_fmha_device_mismatch(base, name, family, device):
    if device == "cpu":
        pytest.skip("needs an accelerator with mate kernels (argument on the CPU, q on the device)")
    kw = fmha_build(base, "op", device)
    kw[name] = kw[name].cpu()
    with pytest.raises(RuntimeError, match=rf"{name} must be on the same device as q"):
        OP.fmha_fwd(**kw)


def test_fmha_out_and_combine_device_mismatch(device):
    if device == "cpu":
        pytest.skip("needs an accelerator with mate kernels")
    kw = fmha_build("dense", "out", device)
    kw["out"] = kw["out"].cpu()
    with pytest.raises(RuntimeError, match=r"out must be on the device of q"):
        OP.fmha_fwd_out(**kw)
    kw = combine_build("dense", "op", device)
    kw["lse_partial"] = kw["lse_partial"].cpu()
    with pytest.raises(RuntimeError, match=r"lse_partial must be on the device of out_partial"):
        OP.fmha_combine(**kw)


# --------------------------------------------------------------------------------------
# integer options past int32: rejected, or exact (a window / chunk that large masks nothing)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,value", [
    ("attention_chunk", 2**32 + 3),
    ("window_size_left", 2**32 + 1),
    ("window_size_right", 2**32 + 1),
])
def test_fmha_huge_int_options_not_truncated(name, value, device):
    kw = fmha_build("dense", "op", device)
    ref_out, ref_lse = OP.fmha_fwd(**kw)  # a window / chunk of >= 2**32 keys masks nothing here
    try:
        out, lse = OP.fmha_fwd(**kw, **{name: value})
    except RuntimeError as e:
        assert name.split("_size")[0] in str(e), f"error does not name {name}: {e}"
        return
    torch.testing.assert_close(out, ref_out, msg=f"{name}={value} was silently truncated to 32 bits")
    torch.testing.assert_close(lse, ref_lse)


# --------------------------------------------------------------------------------------
# inputs that crash the process: each runs in its own subprocess
# --------------------------------------------------------------------------------------
_PRELUDE = """
import json, torch, mate_ops
op, d = torch.ops.mate, {device!r}
def report(**kw):
    print("RESULT " + json.dumps(kw))
try:
    r = ({expr})
    if isinstance(r, tuple):
        r = r[0]
    report(ok=True, shape=list(r.shape), dtype=str(r.dtype))
except Exception as e:
    report(ok=False, exc=type(e).__name__, msg=str(e).splitlines()[0] if str(e) else "")
"""

# (id, expression, rule): rule "raise:<regex>" = must raise RuntimeError matching <regex>;
# "noraise-or:<regex>" = may return, or raise RuntimeError matching <regex>; never crash.
ISOLATED = [
    ("scheduler_batch_size_0",
     "op.get_scheduler_metadata(0, 1, 1000, 4, 2, 16, 16, torch.bfloat16, torch.zeros(0, dtype=torch.int32, device=d))",
     "noraise-or:batch_size"),
    ("scheduler_num_heads_q_0",
     "op.get_scheduler_metadata(2, 1, 1000, 0, 2, 16, 16, torch.bfloat16, torch.full((2,), 1000, dtype=torch.int32, device=d))",
     "noraise-or:num_heads_q"),
    ("scheduler_api_batch_size_0",
     "mate_ops.get_scheduler_metadata(0, 1, 1000, 4, 2, 16, seqused_k=torch.zeros(0, dtype=torch.int32, device=d))",
     "noraise-or:batch_size"),
    ("scheduler_num_heads_beyond_int32",
     "op.get_scheduler_metadata(1, 1, 1000, 2**33, 2**32, 16, 16, torch.bfloat16, torch.full((1,), 1000, dtype=torch.int32, device=d))",
     "raise:num_heads"),
    ("fmha_zero_query_heads",
     "op.fmha_fwd(torch.randn(1, 4, 0, 16, device=d), torch.randn(1, 5, 1, 16, device=d), torch.randn(1, 5, 1, 16, device=d))",
     "noraise-or:num_heads"),
    ("fmha_api_zero_query_heads",
     "mate_ops.flash_attn_varlen_func(torch.randn(1, 4, 0, 16, device=d), torch.randn(1, 300, 1, 16, device=d), "
     "torch.randn(1, 300, 1, 16, device=d))",
     "noraise-or:num_heads"),
    ("fmha_cp_world_size_beyond_int32",
     "op.fmha_fwd(torch.randn(1, 4, 2, 16, device=d), torch.randn(1, 5, 1, 16, device=d), torch.randn(1, 5, 1, 16, device=d), "
     "cp_world_size=2**32, cp_rank=0, cp_tot_seqused_k=torch.tensor([10], dtype=torch.int32, device=d))",
     "raise:cp_world_size"),
]


@pytest.fixture(scope="module")
def isolated_results():
    """Runs every ISOLATED case (per device) in its own subprocess, all at once."""
    cache = {}

    def get(device):
        if device not in cache:
            procs = {}
            for cid, expr, _ in ISOLATED:
                code = textwrap.dedent(_PRELUDE).format(device=device, expr=expr)
                procs[cid] = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True)
            res = {}
            for cid, p in procs.items():
                try:
                    stdout, stderr = p.communicate(timeout=120)
                except subprocess.TimeoutExpired:
                    p.kill()
                    stdout, stderr = p.communicate()
                res[cid] = (p.returncode, stdout, stderr)
            cache[device] = res
        return cache[device]

    return get


@pytest.mark.parametrize("cid,expr,rule", ISOLATED, ids=[c[0] for c in ISOLATED])
def test_no_crash_isolated(cid, expr, rule, device, isolated_results):
    import re

    rc, stdout, stderr = isolated_results(device)[cid]
    assert rc == 0, (f"process crashed (exit status {rc}{' = signal ' + str(-rc) if rc < 0 else ''}) "
                     f"on: {expr}\nstderr tail: {stderr[-500:]}")
    line = [l for l in stdout.splitlines() if l.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    kind, regex = rule.split(":", 1)
    if res["ok"]:
        assert kind == "noraise-or", f"expected RuntimeError naming {regex!r}, call succeeded: {expr}"
        return
    assert res["exc"] == "RuntimeError" and re.search(regex, res["msg"]), (
        f"expected RuntimeError matching {regex!r}, got {res['exc']}: {res['msg']}")


# --------------------------------------------------------------------------------------
# the process is still fine after every bad call
# --------------------------------------------------------------------------------------
def _valid_calls(device):
    g = torch.Generator().manual_seed(42)

    def r(*shape, dtype=BF16):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    q, k, v = r(B, SQ, H, D), r(B, SK, HK, D), r(B, SK, HK, D)
    kp, vp = r(NUM_PAGES, PAGE, HK, D), r(NUM_PAGES, PAGE, HK, D)
    pt, sk = ints(device, [[5, 0, 3], [1, 4, 2]]), ints(device, [10, 7])
    op_, lp = r(NSPLIT, B, 5, H, D, dtype=F32), r(NSPLIT, B, 5, H, dtype=F32)
    return [
        OP.fmha_fwd(q, k, v, causal=True),
        OP.fmha_fwd(q, kp, vp, page_table=pt, seqused_k=sk, num_splits=2),
        OP.fmha_combine(op_, lp),
        (OP.get_scheduler_metadata(B, SQ, 200, H, HK, D, D, BF16, ints(device, [200, 100]), num_splits=2),),
    ]


def _check_same(before, after, after_what):
    for x, y in zip(before, after):
        for a, b in zip(x, y):
            assert _same(a, b), f"a valid call gives a different result after {after_what}"


def test_process_fine_after_every_bad_call(device):
    ref = _valid_calls(device)
    n = 0
    for family, (cases, build, invoke) in FAMILIES.items():
        for p in cases:
            base, mutate, _exc, _match, call, values = p.values
            if values and device != "cpu":
                continue
            kw = build(base, call, device)
            mutate(kw)
            try:
                invoke(call)(kw)
            except Exception:  # noqa: BLE001  (the tables check the exception itself)
                pass
            _check_same(ref, _valid_calls(device), f"{family}[{p.id}]")
            n += 1
    assert n > 100


# --------------------------------------------------------------------------------------
# garbage page tables never crash: each raises RuntimeError
# --------------------------------------------------------------------------------------
def _random_paged_problem(rng, device):
    bsz, page, pages, cols = rng.randint(1, 3), rng.randint(1, 5), rng.randint(1, 6), rng.randint(1, 4)
    hk, g, d = rng.choice([1, 2]), rng.choice([1, 2]), rng.choice([8, 16])
    seqused = [rng.randint(1, page * cols) for _ in range(bsz)]
    kw = dict(q=rnd(device, bsz, rng.randint(1, 3), hk * g, d), k=rnd(device, pages, page, hk, d),
              v=rnd(device, pages, page, hk, d), seqused_k=ints(device, seqused),
              causal=rng.random() < 0.5, num_splits=rng.choice([0, 1, 2]))
    rows = bsz
    if rng.random() < 0.3:  # a page table of more rows, read through cache_batch_idx
        rows = bsz + rng.randint(1, 2)
        kw["cache_batch_idx"] = ints(device, [rng.randrange(rows) for _ in range(bsz)])
    if rng.random() < 0.3:
        kw["cache_leftpad"] = ints(device, [rng.randint(0, s - 1) for s in seqused])
    return kw, rows, cols, pages, page, seqused


_GARBAGE = [-1, -2, -(2**31), 2**31 - 1, 2**30, 1000]


def test_garbage_page_tables_never_crash(device):
    if device != "cpu":
        pytest.skip("page-table ranges are checked on the CPU reference (SEMANTICS §6)")
    rng = random.Random(1234)
    rejected = accepted = 0
    for trial in range(300):
        kw, rows, cols, pages, page, seqused = _random_paged_problem(rng, device)
        # random entries, mostly out of range; then force one entry that is read to be out of range
        table = [[rng.choice([rng.randrange(pages), rng.choice(_GARBAGE), pages + rng.randint(0, 5),
                              rng.randint(-(2**31), 2**31 - 1)]) for _ in range(cols)] for _ in range(rows)]
        b = rng.randrange(len(seqused))
        row = int(kw["cache_batch_idx"][b]) if "cache_batch_idx" in kw else b
        start = int(kw["cache_leftpad"][b]) if "cache_leftpad" in kw else 0
        first, last = start // page, (seqused[b] - 1) // page  # pages holding keys [start, seqused)
        table[row][rng.randint(first, last)] = rng.choice(_GARBAGE + [pages, pages + 1])
        kw["page_table"] = ints(device, table)
        with pytest.raises(RuntimeError, match=r"page_table\[\d+, \d+\] = -?\d+ is out of range \[0, \d+\)"):
            OP.fmha_fwd(**kw)
        rejected += 1
        # the same problem with an in-range table is accepted (the check is not over-eager)
        if trial % 10 == 0:
            kw["page_table"] = ints(device, [[rng.randrange(pages) for _ in range(cols)] for _ in range(rows)])
            out, lse = OP.fmha_fwd(**kw)
            assert out.float().isfinite().all()
            accepted += 1
    assert rejected == 300 and accepted == 30


# --------------------------------------------------------------------------------------
# get_scheduler_metadata without seqused_k: max_seqlen_k becomes an int32 key length, so a
# value past int32 is a clear ValueError (not torch's "cannot be converted ... without overflow")
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_seqlen_k", [2**31, 2**31 + 5, 2**40])
def test_scheduler_metadata_max_seqlen_k_beyond_int32(max_seqlen_k):
    with pytest.raises(ValueError, match=rf"max_seqlen_k must be in \[0, 2\^31 - 1\] \(key lengths are int32\), "
                                         rf"got {max_seqlen_k}$"):
        get_scheduler_metadata(2, 4, max_seqlen_k, 4, 4, 64)


def test_scheduler_metadata_max_seqlen_k_int32_max_accepted():
    meta = get_scheduler_metadata(2, 4, 2**31 - 1, 4, 4, 64, num_splits=1)
    assert meta.dtype == torch.int32 and tuple(meta.shape) == (3,)
