"""Bad-input tests of the kv-cache family (SEMANTICS §1 "Append and rotary", §6 "Bad input"):
``torch.ops.mate.kvcache_append``, ``torch.ops.mate.rotary_embedding`` and
``mate_ops.mha_interface.flash_attn_with_kvcache``.

Same layout as tests/test_bad_input.py (whose helpers this file imports): one table per
entry point. Each row takes a VALID baseline (``*_BASES``, each checked to succeed by its
own test, so no table passes vacuously), applies one mutation, and says which exception
and message to expect. After every rejected call, every tensor argument, the caches above
all, must be bitwise unchanged: validation happens before any write (§6).

Also here:
- duplicate ``cache_batch_idx`` entries: "undefined which write wins, but no crash": every
  written slot holds one of its candidate writes (bitwise), nothing else changes;
- a fuzz of 200 garbage page tables / cache_seqlens / cache_batch_idx for kvcache_append,
  in a subprocess (a crash fails one test, not the run): invalid inputs raise RuntimeError
  and leave the caches alone, valid ones succeed and write exactly the expected slots.

    cd /work/main && python3 -m pytest -q tests/test_kvcache_bad_input.py
"""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

import mate_ops  # noqa: F401  (registers torch.ops.mate.*)
from mate_ops import testing as T
from mate_ops.mha_interface import flash_attn_with_kvcache

# Helpers of the FMHA bad-input table (tests/ is on sys.path under pytest's default
# "prepend" import mode). Only helpers are imported: importing test_* functions would
# collect them a second time here.
from test_bad_input import (  # noqa: E402
    C, I, R, S, As, Fn, _assert_untouched, _expect_rejected, _snapshot, dev, ints, rnd,
    strided_last, with_entry,
)

OP = torch.ops.mate

BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
FP8, I32, I64 = torch.float8_e4m3fn, torch.int32, torch.int64

# Baseline sizes: batch, new keys per sequence, query rows, heads, kv heads, head dim.
B, SNEW, SQ, H, HK, D = 2, 3, 2, 4, 2, 32
CAP = 8                      # dense cache: keys per cache row
NUM_PAGES, PAGE = 6, 4       # paged cache: 6 pages of 4 keys; 3 page-table columns = 12 keys
ROT_ROWS, RDIM = 12, 16      # rotary tables (ROT_ROWS, RDIM / 2); RDIM < D: partial rotary


def _names(*parts):
    """Regex that matches when every part occurs somewhere in the message (any order)."""
    return "".join(f"(?=.*(?:{p}))" for p in parts)


def _bits(t):
    """A view that compares bitwise."""
    return t.view(torch.uint8) if t.element_size() == 1 else t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _tables(d, rows=ROT_ROWS, half=RDIM // 2, dtype=BF16):
    angle = torch.rand(rows, half, dtype=F64) * 6.28
    return angle.cos().to(dtype).to(d), angle.sin().to(dtype).to(d)


# --------------------------------------------------------------------------------------
# kvcache_append: baselines (raw-op kwargs; every one is a valid call)
# --------------------------------------------------------------------------------------
def app_dense(d, dtype=BF16):
    # sequence 0 writes cache row 0 keys [2, 5), sequence 1 writes row 1 keys [5, 8) (full)
    return dict(k_cache=rnd(d, B, CAP, HK, D, dtype=dtype), v_cache=rnd(d, B, CAP, HK, D, dtype=dtype),
                k=rnd(d, B, SNEW, HK, D, dtype=dtype), v=rnd(d, B, SNEW, HK, D, dtype=dtype),
                cache_seqlens=ints(d, [2, 5]))


def app_paged(d):
    # row 0 (pages 5, 0, 3) writes keys [6, 9) -> columns 1, 2 (pages 0, 3);
    # row 1 (pages 1, 4, 2) writes keys [2, 5) -> columns 0, 1 (pages 1, 4).
    # Never written: column 0 of row 0 (page 5) and column 2 of row 1 (page 2).
    return dict(k_cache=rnd(d, NUM_PAGES, PAGE, HK, D), v_cache=rnd(d, NUM_PAGES, PAGE, HK, D),
                k=rnd(d, B, SNEW, HK, D), v=rnd(d, B, SNEW, HK, D),
                cache_seqlens=ints(d, [6, 2]), page_table=ints(d, [[5, 0, 3], [1, 4, 2]]))


def app_packed(d):  # new lengths 2 and 3: row 0 keys [3, 5), row 1 keys [1, 4)
    return dict(k_cache=rnd(d, B, CAP, HK, D), v_cache=rnd(d, B, CAP, HK, D),
                k=rnd(d, 5, HK, D), v=rnd(d, 5, HK, D),
                cache_seqlens=ints(d, [3, 1]), cu_seqlens_k_new=ints(d, [0, 2, 5]))


def app_rotary(d):  # keys rotated at [2, 5) and [5, 8) of 12 table rows
    kw = app_dense(d)
    kw["rotary_cos"], kw["rotary_sin"] = _tables(d)
    return kw


def app_rotary_seqlens(d):  # rotary positions [0, 3) and [9, 12) (the last table row)
    kw = app_rotary(d)
    kw.update(rotary_seqlens=ints(d, [0, 9]), rotary_interleaved=False)
    return kw


def app_rotary_paged(d):
    kw = app_paged(d)
    kw["rotary_cos"], kw["rotary_sin"] = _tables(d)
    return kw


def app_batch_idx(d):  # a dense cache of 3 rows: sequence 0 -> row 2, sequence 1 -> row 0
    kw = app_dense(d)
    kw.update(k_cache=rnd(d, 3, CAP, HK, D), v_cache=rnd(d, 3, CAP, HK, D), cache_batch_idx=ints(d, [2, 0]))
    return kw


def app_paged_batch_idx(d):  # a page table of 3 rows: sequence 0 -> row 2, sequence 1 -> row 1
    kw = app_paged(d)
    kw.update(page_table=ints(d, [[5, 0, 3], [1, 4, 2], [2, 3, 5]]), cache_batch_idx=ints(d, [2, 1]))
    return kw


def app_fp8(d):
    return app_dense(d, dtype=FP8)


APPEND_BASES = dict(dense=app_dense, paged=app_paged, packed=app_packed, rotary=app_rotary,
                    rotary_seqlens=app_rotary_seqlens, rotary_paged=app_rotary_paged, batch_idx=app_batch_idx,
                    paged_batch_idx=app_paged_batch_idx, fp8=app_fp8)


def append_build(base, call, device):
    return APPEND_BASES[base](device)


def append_invoke(call):
    return lambda kw: OP.kvcache_append(**kw)


def append_ref(kw):
    """Expected (k_cache, v_cache) after a valid kvcache_append call (the oracle)."""
    return T.kvcache_append_ref(
        kw["k_cache"], kw["v_cache"], kw["k"], kw["v"], kw["cache_seqlens"].tolist(),
        cu_seqlens_k_new=kw.get("cu_seqlens_k_new"), page_table=kw.get("page_table"),
        cache_batch_idx=kw.get("cache_batch_idx"), rotary_cos=kw.get("rotary_cos"),
        rotary_sin=kw.get("rotary_sin"),
        rotary_seqlens=kw["rotary_seqlens"].tolist() if kw.get("rotary_seqlens") is not None else None,
        rotary_interleaved=kw.get("rotary_interleaved", True))


_ROT_FP8_TABLES = (r"rotary_cos and rotary_sin must share one dtype of float32, float16 or bfloat16 with float8 {}, "
                   r"got Float8_e4m3fn and Float8_e4m3fn")


_APP_DTYPE = r"k_cache must be float32, float16, bfloat16 or float8_e4m3fn, got "
_SHARE = r"k_cache, v_cache, k and v must share one dtype, got "
_V_CACHE = r"v_cache must match k_cache in every dimension but the last: k_cache "
_K_HEADS = r"k must have \(num_heads_k, head_dim\) = \(2, 32\) of k_cache in its last two dimensions, got "
_CONTIG = r" must have a contiguous last dimension \(stride 1\), got stride 2"
_PT_TYPE = r"page_table must be a 2-D int32 tensor \(batch_size, max_num_pages\), got "
_ROT_DIM = r"rotary_dim \(2 \* rotary_cos\.size\(1\) = {}\) must be a positive multiple of 16 and at most head_dim \(32\)"
_ROT_DTYPE = r"rotary_cos and rotary_sin must have the dtype of {} \({}\), got {} and {}"
_ROT_SHAPE = r"rotary_cos and rotary_sin must both be 2-D \(seqlen_ro, rotary_dim / 2\), got "
_OOR = r"page_table\[{}, {}\] = {} is out of range \[0, 6\)"


def _overflow(n, b, start, cap):
    return rf"appending {n} keys at cache_seqlens\[{b}\] = {start} overflows the cache of {cap} keys per sequence"


APPEND_CASES = [
    # ---- dtypes
    C("caches_and_new_float64", "dense", S(k_cache=As("k_cache", F64), v_cache=As("v_cache", F64),
                                            k=As("k", F64), v=As("v", F64)), RuntimeError, _APP_DTYPE + "Double"),
    C("k_cache_int32", "dense", S(k_cache=As("k_cache", I32)), RuntimeError, _APP_DTYPE + "Int"),
    C("k_float32_cache_bf16", "dense", S(k=As("k", F32)), RuntimeError,
      _SHARE + r"BFloat16, BFloat16, Float and BFloat16"),
    C("v_float16_cache_bf16", "paged", S(v=As("v", F16)), RuntimeError,
      _SHARE + r"BFloat16, BFloat16, BFloat16 and Half"),
    C("v_cache_float32", "dense", S(v_cache=As("v_cache", F32)), RuntimeError,
      _SHARE + r"BFloat16, Float, BFloat16 and BFloat16"),
    C("k_and_v_bf16_into_fp8_cache", "fp8", S(k=As("k", BF16), v=As("v", BF16)), RuntimeError,
      _SHARE + r"Float8_e4m3fn, Float8_e4m3fn, BFloat16 and BFloat16"),
    C("fp8_k_into_bf16_cache", "dense", S(k=As("k", FP8)), RuntimeError,
      _SHARE + r"BFloat16, BFloat16, Float8_e4m3fn and BFloat16"),
    # ---- cache shapes
    C("k_cache_rank3", "dense", S(k_cache=Fn("k_cache", lambda t: t[0])), RuntimeError,
      r"k_cache must be \(batch_size_cache, seqlen_cache, num_heads_k, head_dim\) or paged "
      r"\(num_pages, page_size, num_heads_k, head_dim\), got shape \[8, 2, 32\]"),
    C("v_cache_rank3", "dense", S(v_cache=Fn("v_cache", lambda t: t[0])), RuntimeError,
      _V_CACHE + r"\[2, 8, 2, 32\], v_cache \[8, 2, 32\]"),
    C("v_cache_longer", "dense", S(v_cache=R("v_cache", B, CAP + 1, HK, D)), RuntimeError,
      _V_CACHE + r"\[2, 8, 2, 32\], v_cache \[2, 9, 2, 32\]"),
    C("v_cache_more_heads", "dense", S(v_cache=R("v_cache", B, CAP, HK + 1, D)), RuntimeError,
      _V_CACHE + r"\[2, 8, 2, 32\], v_cache \[2, 8, 3, 32\]"),
    C("v_cache_fewer_pages", "paged", S(v_cache=R("v_cache", NUM_PAGES - 1, PAGE, HK, D)), RuntimeError,
      _V_CACHE + r"\[6, 4, 2, 32\], v_cache \[5, 4, 2, 32\]"),
    C("v_cache_other_page_size", "paged", S(v_cache=R("v_cache", NUM_PAGES, PAGE * 2, HK, D)), RuntimeError,
      _V_CACHE + r"\[6, 4, 2, 32\], v_cache \[6, 8, 2, 32\]"),
    C("v_cache_head_dim_ne_v", "dense", S(v_cache=R("v_cache", B, CAP, HK, 16)), RuntimeError,
      r"v head_dim \(32\) must equal v_cache's \(16\)"),
    C("k_cache_rows_ne_batch", "dense", S(k_cache=R("k_cache", 3, CAP, HK, D), v_cache=R("v_cache", 3, CAP, HK, D)),
      RuntimeError, r"k_cache must have batch_size \(2\) rows, got 3 \(pass cache_batch_idx to index a larger cache\)"),
    # ---- new k / v shapes
    C("k_rank3_dense", "dense", S(k=Fn("k", lambda t: t[0]), v=Fn("v", lambda t: t[0])), RuntimeError,
      r"k must be \(batch_size, seqlen_new, num_heads_k, head_dim\), got shape \[3, 2, 32\]"),
    C("k_rank4_packed", "packed", S(k=Fn("k", lambda t: t[None]), v=Fn("v", lambda t: t[None])), RuntimeError,
      r"k must be \(total_k_new, num_heads_k, head_dim\) with cu_seqlens_k_new, got shape \[1, 5, 2, 32\]"),
    C("v_seqlen_ne_k", "dense", S(v=R("v", B, SNEW + 1, HK, D)), RuntimeError,
      r"v must match k in every dimension but the last: k \[2, 3, 2, 32\], v \[2, 4, 2, 32\]"),
    C("v_rows_ne_k_packed", "packed", S(v=R("v", 4, HK, D)), RuntimeError,
      r"v must match k in every dimension but the last: k \[5, 2, 32\], v \[4, 2, 32\]"),
    C("k_batch_ne_cache_seqlens", "dense", S(k=R("k", B + 1, SNEW, HK, D), v=R("v", B + 1, SNEW, HK, D)),
      RuntimeError, r"cache_seqlens must have shape \(batch_size,\) = \(3,\), got \[2\]"),
    C("k_fewer_heads_than_cache", "dense", S(k=R("k", B, SNEW, 1, D), v=R("v", B, SNEW, 1, D)), RuntimeError,
      _K_HEADS + r"\[2, 3, 1, 32\]"),
    C("k_more_heads_than_cache_paged", "paged", S(k=R("k", B, SNEW, 4, D), v=R("v", B, SNEW, 4, D)), RuntimeError,
      _K_HEADS + r"\[2, 3, 4, 32\]"),
    C("k_head_dim_ne_cache", "dense", S(k=R("k", B, SNEW, HK, 16)), RuntimeError, _K_HEADS + r"\[2, 3, 2, 16\]"),
    C("k_head_dim_ne_cache_packed", "packed", S(k=R("k", 5, HK, 64)), RuntimeError, _K_HEADS + r"\[5, 2, 64\]"),
    C("v_head_dim_ne_cache", "dense", S(v=R("v", B, SNEW, HK, 16)), RuntimeError,
      r"v head_dim \(16\) must equal v_cache's \(32\)"),
    # ---- contiguity of the last dimension
    C("k_cache_last_dim_strided", "dense", S(k_cache=Fn("k_cache", strided_last)), RuntimeError, "k_cache" + _CONTIG),
    C("v_cache_last_dim_strided", "paged", S(v_cache=Fn("v_cache", strided_last)), RuntimeError, "v_cache" + _CONTIG),
    C("k_last_dim_strided", "dense", S(k=Fn("k", strided_last)), RuntimeError, r"^k" + _CONTIG),
    C("v_last_dim_strided_packed", "packed", S(v=Fn("v", strided_last)), RuntimeError, r"^v" + _CONTIG),
    C("page_table_last_dim_strided", "paged", S(page_table=Fn("page_table", strided_last)), RuntimeError,
      "page_table" + _CONTIG),
    C("rotary_cos_last_dim_strided", "rotary", S(rotary_cos=Fn("rotary_cos", strided_last)), RuntimeError,
      "rotary_cos" + _CONTIG),
    C("rotary_sin_last_dim_strided", "rotary", S(rotary_sin=Fn("rotary_sin", strided_last)), RuntimeError,
      "rotary_sin" + _CONTIG),
    # ---- cache_seqlens: dtype, rank, length, contiguity
    C("cache_seqlens_int64", "dense", S(cache_seqlens=As("cache_seqlens", I64)), RuntimeError,
      r"cache_seqlens must be int32, got Long"),
    C("cache_seqlens_float32", "paged", S(cache_seqlens=As("cache_seqlens", F32)), RuntimeError,
      r"cache_seqlens must be int32, got Float"),
    C("cache_seqlens_2d", "dense", S(cache_seqlens=Fn("cache_seqlens", lambda t: t[None])), RuntimeError,
      r"cache_seqlens must have shape \(batch_size,\) = \(2,\), got \[1, 2\]"),
    C("cache_seqlens_0d", "dense", S(cache_seqlens=I(2)), RuntimeError,
      r"cache_seqlens must have shape \(batch_size,\) = \(2,\), got \[\]"),
    C("cache_seqlens_non_contiguous", "dense", S(cache_seqlens=lambda kw: ints(dev(kw), [2, 0, 5, 0])[::2]),
      RuntimeError, r"cache_seqlens must be contiguous"),
    # The batch size of the raw op is cache_seqlens.size(0); a wrong length must be blamed on
    # cache_seqlens (or at least say that the expected batch size comes from it).
    C("cache_seqlens_too_long_dense", "dense", S(cache_seqlens=I([2, 5, 0])), RuntimeError,
      _names("cache_seqlens", r"\b3\b", r"\b2\b")),
    C("cache_seqlens_too_short_dense", "dense", S(cache_seqlens=I([2])), RuntimeError,
      _names("cache_seqlens", r"\b1\b", r"\b2\b")),
    C("cache_seqlens_too_long_paged", "paged", S(cache_seqlens=I([6, 2, 0])), RuntimeError,
      _names("cache_seqlens", r"\b3\b", r"\b2\b")),
    C("cache_seqlens_too_long_packed", "packed", S(cache_seqlens=I([3, 1, 0])), RuntimeError,
      _names("cache_seqlens", r"\b3\b")),
    # ---- cache_seqlens: values (negative, overflowing the cache)
    C("cache_seqlens_negative", "dense", S(cache_seqlens=I([2, -1])), RuntimeError,
      r"cache_seqlens\[1\] = -1 must be >= 0", values=True),
    C("cache_seqlens_int32_min", "paged", S(cache_seqlens=I([-(2**31), 2])), RuntimeError,
      r"cache_seqlens\[0\] = -2147483648 must be >= 0", values=True),
    C("new_keys_overflow_dense", "dense", S(cache_seqlens=I([6, 5])), RuntimeError, _overflow(3, 0, 6, 8), values=True),
    C("new_keys_overflow_dense_by_one", "dense", S(cache_seqlens=I([2, 6])), RuntimeError, _overflow(3, 1, 6, 8),
      values=True),
    C("new_keys_overflow_int32_max", "dense", S(cache_seqlens=I([2**31 - 1, 0])), RuntimeError,
      _overflow(3, 0, 2147483647, 8), values=True),
    C("new_keys_overflow_paged", "paged", S(cache_seqlens=I([10, 2])), RuntimeError, _overflow(3, 0, 10, 12),
      values=True),
    C("new_keys_overflow_paged_batch_idx", "paged_batch_idx", S(cache_seqlens=I([6, 11])), RuntimeError,
      _overflow(3, 1, 11, 12), values=True),
    C("new_keys_overflow_packed", "packed", S(cache_seqlens=I([3, 6])), RuntimeError, _overflow(3, 1, 6, 8),
      values=True),
    C("new_keys_overflow_batch_idx", "batch_idx", S(cache_seqlens=I([7, 0])), RuntimeError, _overflow(3, 0, 7, 8),
      values=True),
    # ---- cu_seqlens_k_new
    C("cu_seqlens_k_new_int64", "packed", S(cu_seqlens_k_new=As("cu_seqlens_k_new", I64)), RuntimeError,
      r"cu_seqlens_k_new must be int32, got Long"),
    C("cu_seqlens_k_new_2d", "packed", S(cu_seqlens_k_new=Fn("cu_seqlens_k_new", lambda t: t[None])), RuntimeError,
      r"cu_seqlens_k_new must be 1-D \(batch_size \+ 1,\), got shape \[1, 3\]"),
    C("cu_seqlens_k_new_too_short", "packed", S(cu_seqlens_k_new=I([0, 5])), RuntimeError,
      r"cache_seqlens must have shape \(batch_size,\) = \(1,\), got \[2\]"),
    C("cu_seqlens_k_new_too_long", "packed", S(cu_seqlens_k_new=I([0, 2, 4, 5])), RuntimeError,
      r"cache_seqlens must have shape \(batch_size,\) = \(3,\), got \[2\]"),
    C("cu_seqlens_k_new_decreasing", "packed", S(cu_seqlens_k_new=I([0, 4, 2])), RuntimeError,
      r"cu_seqlens_k_new must be non-decreasing", values=True),
    C("cu_seqlens_k_new_negative_start", "packed", S(cu_seqlens_k_new=I([-1, 2, 5])), RuntimeError,
      r"cu_seqlens_k_new\[0\] must be >= 0", values=True),
    # new keys past the 5 rows of the packed k/v: reading them is out of bounds
    C("cu_seqlens_k_new_end_beyond_rows", "packed", S(cu_seqlens_k_new=I([0, 2, 6])), RuntimeError,
      _names("cu_seqlens_k_new", r"\b6\b", r"\b5\b"), values=True),
    # (far beyond the rows: test_no_crash_isolated[append_packed_new_keys_far_beyond_k])
    # ---- page_table: dtype, rank, rows
    C("page_table_int64", "paged", S(page_table=As("page_table", I64)), RuntimeError, _PT_TYPE + r"Long \[2, 3\]"),
    C("page_table_float32", "paged", S(page_table=As("page_table", F32)), RuntimeError, _PT_TYPE + r"Float \[2, 3\]"),
    C("page_table_1d", "paged", S(page_table=Fn("page_table", lambda t: t.flatten())), RuntimeError,
      _PT_TYPE + r"Int \[6\]"),
    C("page_table_3d", "paged", S(page_table=Fn("page_table", lambda t: t[None])), RuntimeError,
      _PT_TYPE + r"Int \[1, 2, 3\]"),
    C("page_table_wrong_rows", "paged", S(page_table=I([[5, 0, 3], [1, 4, 2], [0, 0, 0]])), RuntimeError,
      r"page_table must have batch_size \(2\) rows, got 3"),
    # ---- page_table: entries of the written pages out of range
    C("page_table_written_entry_negative", "paged", S(page_table=with_entry("page_table", (0, 1), -1)),
      RuntimeError, _OOR.format(0, 1, -1), values=True),
    C("page_table_written_entry_eq_num_pages", "paged", S(page_table=with_entry("page_table", (1, 0), NUM_PAGES)),
      RuntimeError, _OOR.format(1, 0, 6), values=True),
    C("page_table_written_entry_last_page", "paged", S(page_table=with_entry("page_table", (0, 2), 7)),
      RuntimeError, _OOR.format(0, 2, 7), values=True),
    C("page_table_written_entry_int32_max", "paged", S(page_table=with_entry("page_table", (1, 1), 2**31 - 1)),
      RuntimeError, _OOR.format(1, 1, 2147483647), values=True),
    C("page_table_written_entry_int32_min", "paged", S(page_table=with_entry("page_table", (1, 1), -(2**31))),
      RuntimeError, _OOR.format(1, 1, -2147483648), values=True),
    C("page_table_written_entry_via_batch_idx", "paged_batch_idx",
      S(page_table=with_entry("page_table", (2, 2), 6)), RuntimeError, _OOR.format(2, 2, 6), values=True),
    C("page_table_written_entry_rotary", "rotary_paged", S(page_table=with_entry("page_table", (1, 0), -7)),
      RuntimeError, _OOR.format(1, 0, -7), values=True),
    # ---- cache_batch_idx
    C("cache_batch_idx_int64", "batch_idx", S(cache_batch_idx=As("cache_batch_idx", I64)), RuntimeError,
      r"cache_batch_idx must be int32, got Long"),
    C("cache_batch_idx_wrong_length", "batch_idx", S(cache_batch_idx=I([2, 0, 1])), RuntimeError,
      r"cache_batch_idx must have 2 entries, got 3"),
    C("cache_batch_idx_2d", "batch_idx", S(cache_batch_idx=Fn("cache_batch_idx", lambda t: t[None])), RuntimeError,
      r"cache_batch_idx must be 1-D, got shape \[1, 2\]"),
    C("cache_batch_idx_eq_rows", "batch_idx", S(cache_batch_idx=I([2, 3])), RuntimeError,
      r"cache_batch_idx\[1\] = 3 is out of range \[0, 3\)", values=True),
    C("cache_batch_idx_negative", "batch_idx", S(cache_batch_idx=I([-1, 0])), RuntimeError,
      r"cache_batch_idx\[0\] = -1 is out of range \[0, 3\)", values=True),
    C("cache_batch_idx_int32_max", "batch_idx", S(cache_batch_idx=I([0, 2**31 - 1])), RuntimeError,
      r"cache_batch_idx\[1\] = 2147483647 is out of range \[0, 3\)", values=True),
    C("cache_batch_idx_on_dense_cache_of_batch_rows", "dense", S(cache_batch_idx=I([1, 2])), RuntimeError,
      r"cache_batch_idx\[1\] = 2 is out of range \[0, 2\)", values=True),
    C("cache_batch_idx_paged_out_of_range", "paged_batch_idx", S(cache_batch_idx=I([3, 1])), RuntimeError,
      r"cache_batch_idx\[0\] = 3 is out of range \[0, 3\)", values=True),
    C("cache_batch_idx_paged_negative", "paged", S(cache_batch_idx=I([0, -2])), RuntimeError,
      r"cache_batch_idx\[1\] = -2 is out of range \[0, 2\)", values=True),
    # ---- rotary: presence, shape, dtype
    C("rotary_cos_without_sin", "rotary", S(rotary_sin=None), RuntimeError,
      r"rotary_cos and rotary_sin must be given together"),
    C("rotary_sin_without_cos", "rotary", S(rotary_cos=None), RuntimeError,
      r"rotary_cos and rotary_sin must be given together"),
    C("rotary_dim_8", "rotary", S(rotary_cos=R("rotary_cos", ROT_ROWS, 4), rotary_sin=R("rotary_sin", ROT_ROWS, 4)),
      RuntimeError, _ROT_DIM.format(8)),
    C("rotary_dim_24", "rotary", S(rotary_cos=R("rotary_cos", ROT_ROWS, 12), rotary_sin=R("rotary_sin", ROT_ROWS, 12)),
      RuntimeError, _ROT_DIM.format(24)),
    C("rotary_dim_gt_head_dim", "rotary",
      S(rotary_cos=R("rotary_cos", ROT_ROWS, 24), rotary_sin=R("rotary_sin", ROT_ROWS, 24)), RuntimeError,
      _ROT_DIM.format(48)),
    C("rotary_dim_0", "rotary", S(rotary_cos=R("rotary_cos", ROT_ROWS, 0), rotary_sin=R("rotary_sin", ROT_ROWS, 0)),
      RuntimeError, _ROT_DIM.format(0)),
    C("rotary_cos_float32", "rotary", S(rotary_cos=As("rotary_cos", F32)), RuntimeError,
      _ROT_DTYPE.format("k", "BFloat16", "Float", "BFloat16")),
    C("rotary_cos_sin_float16", "rotary", S(rotary_cos=As("rotary_cos", F16), rotary_sin=As("rotary_sin", F16)),
      RuntimeError, _ROT_DTYPE.format("k", "BFloat16", "Half", "Half")),
    C("rotary_sin_float32_paged", "rotary_paged", S(rotary_sin=As("rotary_sin", F32)), RuntimeError,
      _ROT_DTYPE.format("k", "BFloat16", "BFloat16", "Float")),
    C("rotary_sin_fewer_rows", "rotary", S(rotary_sin=R("rotary_sin", ROT_ROWS - 1, RDIM // 2)), RuntimeError,
      _ROT_SHAPE + r"\[12, 8\] and \[11, 8\]"),
    C("rotary_sin_wider", "rotary", S(rotary_sin=R("rotary_sin", ROT_ROWS, RDIM)), RuntimeError,
      _ROT_SHAPE + r"\[12, 8\] and \[12, 16\]"),
    C("rotary_cos_sin_1d", "rotary", S(rotary_cos=Fn("rotary_cos", lambda t: t[0]),
                                       rotary_sin=Fn("rotary_sin", lambda t: t[0])), RuntimeError,
      _ROT_SHAPE + r"\[8\] and \[8\]"),
    C("rotary_cos_sin_3d", "rotary", S(rotary_cos=Fn("rotary_cos", lambda t: t[None]),
                                       rotary_sin=Fn("rotary_sin", lambda t: t[None])), RuntimeError,
      _ROT_SHAPE + r"\[1, 12, 8\] and \[1, 12, 8\]"),
    # float8 k with bf16 tables is legal (FA3's fp8 kv-cache calls); float8 tables are not
    C("rotary_with_fp8_tables", "fp8",
      S(rotary_cos=lambda kw: _tables(dev(kw), dtype=FP8)[0], rotary_sin=lambda kw: _tables(dev(kw), dtype=FP8)[1]),
      RuntimeError, _ROT_FP8_TABLES.format("k")),
    # ---- rotary: tables shorter than the positions of the new keys
    C("rotary_tables_short_for_new_keys", "rotary", S(rotary_cos=Fn("rotary_cos", lambda t: t[:7].contiguous()),
                                                      rotary_sin=Fn("rotary_sin", lambda t: t[:7].contiguous())),
      RuntimeError, r"rotary_cos/rotary_sin have 7 positions, but sequence 1 rotates new keys at positions \[5, 8\)",
      values=True),
    C("rotary_tables_empty", "rotary", S(rotary_cos=Fn("rotary_cos", lambda t: t[:0]),
                                         rotary_sin=Fn("rotary_sin", lambda t: t[:0])),
      RuntimeError, r"rotary_cos/rotary_sin have 0 positions, but sequence 0 rotates new keys at positions \[2, 5\)",
      values=True),
    C("rotary_tables_short_paged", "rotary_paged", S(rotary_cos=Fn("rotary_cos", lambda t: t[:8].contiguous()),
                                                     rotary_sin=Fn("rotary_sin", lambda t: t[:8].contiguous())),
      RuntimeError, r"rotary_cos/rotary_sin have 8 positions, but sequence 0 rotates new keys at positions \[6, 9\)",
      values=True),
    C("rotary_seqlens_beyond_tables", "rotary_seqlens", S(rotary_seqlens=I([0, 10])), RuntimeError,
      r"rotary_cos/rotary_sin have 12 positions, but sequence 1 rotates new keys at positions \[10, 13\)",
      values=True),
    C("rotary_seqlens_negative", "rotary_seqlens", S(rotary_seqlens=I([-1, 0])), RuntimeError,
      r"rotary_cos/rotary_sin have 12 positions, but sequence 0 rotates new keys at positions \[-1, 2\)",
      values=True),
    C("rotary_seqlens_int64", "rotary_seqlens", S(rotary_seqlens=As("rotary_seqlens", I64)), RuntimeError,
      r"rotary_seqlens must be int32, got Long"),
    C("rotary_seqlens_wrong_length", "rotary_seqlens", S(rotary_seqlens=I([0, 9, 0])), RuntimeError,
      r"rotary_seqlens must have 2 entries, got 3"),
]


# --------------------------------------------------------------------------------------
# rotary_embedding (the q side): baselines and table
# --------------------------------------------------------------------------------------
def rope_dense(d):  # every row t of sequence b at seqlen_offsets[b] + t: positions [0, 2) and [5, 7)
    cos, sin = _tables(d, rows=8)
    return dict(x=rnd(d, B, SQ, H, D), cos=cos, sin=sin, seqlen_offsets=ints(d, [0, 5]), positions_per_row=True)


def rope_one_position(d):  # every row of sequence b at seqlen_offsets[b]: positions 0 and 7 (last row)
    kw = rope_dense(d)
    kw.update(seqlen_offsets=ints(d, [0, 7]), positions_per_row=False, interleaved=False)
    return kw


def rope_ragged(d):  # 2 + 3 rows at positions [1, 3) and [5, 8)
    cos, sin = _tables(d, rows=8)
    return dict(x=rnd(d, 5, H, D), cos=cos, sin=sin, seqlen_offsets=ints(d, [1, 5]),
                cu_seqlens=ints(d, [0, 2, 5]), max_seqlen=3)


ROPE_BASES = dict(dense=rope_dense, one_position=rope_one_position, ragged=rope_ragged)


def rope_build(base, call, device):
    return ROPE_BASES[base](device)


def rope_invoke(call):
    return lambda kw: OP.rotary_embedding(**kw)


def _rope_pos(n, b, pos):
    return rf"rotary_cos/rotary_sin have {n} positions, but sequence {b} needs position {pos}"


ROPE_CASES = [
    C("x_int32", "dense", S(x=lambda kw: torch.randint(-3, 3, kw["x"].shape, dtype=I32, device=dev(kw))),
      RuntimeError, r"x must be float32, float16, bfloat16 or float8_e4m3fn, got Int"),
    C("x_float64", "dense", S(x=As("x", F64), cos=As("cos", F64), sin=As("sin", F64)), RuntimeError,
      r"x must be float32, float16, bfloat16 or float8_e4m3fn, got Double"),
    # float8 x rotates with fp32/fp16/bf16 tables (tested against the oracle); fp8 tables are refused
    C("x_fp8", "dense", S(x=As("x", FP8), cos=As("cos", FP8), sin=As("sin", FP8)), RuntimeError,
      _ROT_FP8_TABLES.format("x")),
    C("cos_float32", "dense", S(cos=As("cos", F32)), RuntimeError, _ROT_DTYPE.format("x", "BFloat16", "Float", "BFloat16")),
    C("x_float16_tables_bf16", "ragged", S(x=As("x", F16)), RuntimeError,
      _ROT_DTYPE.format("x", "Half", "BFloat16", "BFloat16")),
    C("sin_more_rows", "dense", S(sin=R("sin", 9, RDIM // 2)), RuntimeError, _ROT_SHAPE + r"\[8, 8\] and \[9, 8\]"),
    C("cos_narrower", "one_position", S(cos=R("cos", 8, 4)), RuntimeError, _ROT_SHAPE + r"\[8, 4\] and \[8, 8\]"),
    C("rotary_dim_8", "dense", S(cos=R("cos", 8, 4), sin=R("sin", 8, 4)), RuntimeError, _ROT_DIM.format(8)),
    C("rotary_dim_40", "ragged", S(cos=R("cos", 8, 20), sin=R("sin", 8, 20)), RuntimeError, _ROT_DIM.format(40)),
    C("rotary_dim_gt_head_dim", "dense", S(cos=R("cos", 8, 32), sin=R("sin", 8, 32)), RuntimeError,
      _ROT_DIM.format(64)),
    C("x_rank3_without_cu_seqlens", "dense", S(x=Fn("x", lambda t: t[0])), RuntimeError,
      r"x must be \(batch_size, seqlen, num_heads, head_dim\), got shape \[2, 4, 32\]"),
    C("x_rank4_with_cu_seqlens", "ragged", S(x=Fn("x", lambda t: t[None])), RuntimeError,
      r"x must be \(total, num_heads, head_dim\) with cu_seqlens, got shape \[1, 5, 4, 32\]"),
    C("x_last_dim_strided", "dense", S(x=Fn("x", strided_last)), RuntimeError, r"^x" + _CONTIG),
    C("cos_last_dim_strided", "ragged", S(cos=Fn("cos", strided_last)), RuntimeError, "rotary_cos" + _CONTIG),
    C("seqlen_offsets_int64", "dense", S(seqlen_offsets=As("seqlen_offsets", I64)), RuntimeError,
      r"seqlen_offsets must be int32, got Long"),
    C("seqlen_offsets_wrong_length", "ragged", S(seqlen_offsets=I([1, 5, 0])), RuntimeError,
      r"seqlen_offsets must have 2 entries, got 3"),
    C("cu_seqlens_int64", "ragged", S(cu_seqlens=As("cu_seqlens", I64)), RuntimeError,
      r"cu_seqlens must be int32, got Long"),
    C("cu_seqlens_2d", "ragged", S(cu_seqlens=Fn("cu_seqlens", lambda t: t[None])), RuntimeError,
      r"cu_seqlens must be 1-D \(batch_size \+ 1\)"),
    # positions beyond the tables
    C("positions_per_row_beyond_tables", "dense", S(seqlen_offsets=I([0, 7])), RuntimeError, _rope_pos(8, 1, 8),
      values=True),
    C("positions_per_row_beyond_tables_ragged", "ragged", S(seqlen_offsets=I([7, 5])), RuntimeError,
      _rope_pos(8, 0, 8), values=True),
    C("one_position_beyond_tables", "one_position", S(seqlen_offsets=I([8, 0])), RuntimeError, _rope_pos(8, 0, 8),
      values=True),
    # rows at positions -1 and 0: the error must blame the negative offset, not the tables
    C("seqlen_offsets_negative", "dense", S(seqlen_offsets=I([-1, 0])), RuntimeError,
      _names("seqlen_offsets", r"-1\b"), values=True),
    C("seqlen_offsets_int32_max", "one_position", S(seqlen_offsets=I([0, 2**31 - 1])), RuntimeError,
      _rope_pos(8, 1, 2147483647), values=True),
    C("cu_seqlens_end_beyond_rows", "ragged", S(cu_seqlens=I([0, 2, 6])), RuntimeError,
      r"cu_seqlens must be non-decreasing and within the 5 rows of x", values=True),
    C("cu_seqlens_decreasing", "ragged", S(cu_seqlens=I([0, 4, 3])), RuntimeError,
      r"cu_seqlens must be non-decreasing and within the 5 rows of x", values=True),
    C("cu_seqlens_negative_start", "ragged", S(cu_seqlens=I([-1, 2, 5])), RuntimeError,
      r"cu_seqlens must be non-decreasing and within the 5 rows of x", values=True),
]


# --------------------------------------------------------------------------------------
# flash_attn_with_kvcache (Python API): baselines and table
# --------------------------------------------------------------------------------------
def _with_q(kw, d, causal=False):
    kw = dict(kw)
    kw.update(q=rnd(d, B, SQ, H, D, dtype=kw["k_cache"].dtype), causal=causal, return_softmax_lse=True)
    return kw


def api_dense(d):
    return _with_q(app_dense(d), d)


def api_paged(d):
    return _with_q(app_paged(d), d)


def api_packed(d):
    return _with_q(app_packed(d), d)


def api_batch_idx(d):
    return _with_q(app_batch_idx(d), d)


def api_rotary(d):  # causal: q rows at positions [2, 4) and [5, 7); new keys at [2, 5) and [5, 8)
    return _with_q(app_rotary(d), d, causal=True)


def api_rotary_paged(d):  # not causal: every q row of sequence b at cache_seqlens[b]
    return _with_q(app_rotary_paged(d), d)


def api_no_append(d):  # attention over the cache as it is (no k / v)
    kw = _with_q(app_dense(d), d)
    del kw["k"], kw["v"]
    return kw


def api_fp8(d):
    return _with_q(app_fp8(d), d)


API_BASES = dict(dense=api_dense, paged=api_paged, packed=api_packed, batch_idx=api_batch_idx, rotary=api_rotary,
                 rotary_paged=api_rotary_paged, no_append=api_no_append, fp8=api_fp8)


def api_build(base, call, device):
    return API_BASES[base](device)


def api_invoke(call):
    return lambda kw: flash_attn_with_kvcache(**kw)


def A(id, base, mutate, exc, match, values=False):
    return C(id, base, mutate, exc, match, call="api", values=values)


API_CASES = [
    # ---- argument combinations (checked by the fmha_fwd_kvcache op before any write)
    A("rotary_without_k_v", "no_append", S(rotary_cos=lambda kw: _tables(dev(kw))[0],
                                           rotary_sin=lambda kw: _tables(dev(kw))[1]), RuntimeError,
      r"rotary_cos/rotary_sin are only used when appending new keys: pass k and v too"),
    A("rotary_sin_only_without_k_v", "no_append", S(rotary_sin=lambda kw: _tables(dev(kw))[1]), RuntimeError,
      r"rotary_cos and rotary_sin must be given together|rotary_cos/rotary_sin are only used when appending"),
    A("rotary_cos_without_sin", "rotary", S(rotary_sin=None), RuntimeError,
      r"rotary_cos and rotary_sin must be given together"),
    A("rotary_sin_without_cos", "rotary_paged", S(rotary_cos=None), RuntimeError,
      r"rotary_cos and rotary_sin must be given together"),
    A("k_without_v", "dense", S(v=None), RuntimeError, r"k and v must be given together"),
    A("v_without_k", "paged", S(k=None), RuntimeError, r"k and v must be given together"),
    A("paged_without_cache_seqlens", "paged", S(cache_seqlens=None), RuntimeError,
      r"cache_seqlens is required with page_table"),
    A("paged_no_append_without_cache_seqlens", "paged", S(cache_seqlens=None, k=None, v=None), RuntimeError,
      r"cache_seqlens is required with page_table"),
    A("append_without_cache_seqlens", "dense", S(cache_seqlens=None), RuntimeError,
      r"cache_seqlens is required when appending k/v"),
    # ---- rotary through the API
    A("rotary_dim_8", "rotary", S(rotary_cos=R("rotary_cos", ROT_ROWS, 4), rotary_sin=R("rotary_sin", ROT_ROWS, 4)),
      RuntimeError, _ROT_DIM.format(8)),
    A("rotary_dim_gt_head_dim", "rotary_paged",
      S(rotary_cos=R("rotary_cos", ROT_ROWS, 24), rotary_sin=R("rotary_sin", ROT_ROWS, 24)), RuntimeError,
      _ROT_DIM.format(48)),
    A("rotary_cos_float32", "rotary", S(rotary_cos=As("rotary_cos", F32), rotary_sin=As("rotary_sin", F32)),
      RuntimeError, _ROT_DTYPE.format(r"\w+", "BFloat16", "Float", "Float")),
    A("rotary_cos_sin_shapes_differ", "rotary", S(rotary_sin=R("rotary_sin", ROT_ROWS - 2, RDIM // 2)), RuntimeError,
      _ROT_SHAPE + r"\[12, 8\] and \[10, 8\]"),
    # tables long enough for q (positions [5, 7)) but not for the new keys ([5, 8))
    A("rotary_tables_short_for_new_keys", "rotary", S(rotary_cos=Fn("rotary_cos", lambda t: t[:7].contiguous()),
                                                      rotary_sin=Fn("rotary_sin", lambda t: t[:7].contiguous())),
      RuntimeError, r"rotary_cos/rotary_sin have 7 positions, but sequence 1 rotates new keys at positions \[5, 8\)",
      values=True),
    # causal q of 4 rows rotated at positions_per_row [5, 9), beyond the 8 table rows
    A("rotary_tables_short_for_q_rows", "rotary",
      S(q=R("q", B, 4, H, D), rotary_cos=Fn("rotary_cos", lambda t: t[:8].contiguous()),
        rotary_sin=Fn("rotary_sin", lambda t: t[:8].contiguous())),
      RuntimeError, _rope_pos(8, 1, 8), values=True),
    A("rotary_seqlens_beyond_tables", "rotary", S(rotary_seqlens=I([0, 10])), RuntimeError,
      r"rotary_cos/rotary_sin have 12 positions, but sequence 1 ", values=True),
    # ---- cache_seqlens
    A("cache_seqlens_int64", "dense", S(cache_seqlens=As("cache_seqlens", I64)), RuntimeError,
      r"cache_seqlens must be int32, got Long"),
    # with rotary, cache_seqlens is first handed to rotary_embedding as its seqlen_offsets:
    # the error must still name the argument the caller passed
    A("cache_seqlens_int64_rotary", "rotary", S(cache_seqlens=As("cache_seqlens", I64)), RuntimeError,
      r"cache_seqlens must be int32, got Long"),
    A("cache_seqlens_wrong_length", "dense", S(cache_seqlens=I([2, 5, 0])), RuntimeError,
      _names("cache_seqlens", r"\b3\b", r"\b2\b")),
    A("cache_seqlens_wrong_length_rotary", "rotary", S(cache_seqlens=I([2, 5, 0])), RuntimeError,
      _names("cache_seqlens", r"\b3\b", r"\b2\b")),
    A("cache_seqlens_2d", "paged", S(cache_seqlens=Fn("cache_seqlens", lambda t: t[None])), RuntimeError,
      r"cache_seqlens must be 1-D, got shape \[1, 2\]"),
    A("cache_seqlens_negative", "dense", S(cache_seqlens=I([2, -1])), RuntimeError,
      r"cache_seqlens\[1\] = -1 must be >= 0", values=True),
    A("cache_seqlens_negative_int", "paged", S(cache_seqlens=-3), RuntimeError,
      r"cache_seqlens\[0\] = -3 must be >= 0", values=True),
    A("cache_seqlens_negative_rotary", "rotary", S(cache_seqlens=I([-2, 5])), RuntimeError,
      r"cache_seqlens\[0\] = -2 must be >= 0", values=True),
    A("new_keys_overflow_dense", "dense", S(cache_seqlens=I([6, 5])), RuntimeError, _overflow(3, 0, 6, 8),
      values=True),
    A("new_keys_overflow_dense_int", "dense", S(cache_seqlens=6), RuntimeError, _overflow(3, 0, 6, 8), values=True),
    A("new_keys_overflow_paged", "paged", S(cache_seqlens=I([6, 10])), RuntimeError, _overflow(3, 1, 10, 12),
      values=True),
    A("new_keys_overflow_packed", "packed", S(cache_seqlens=I([7, 1])), RuntimeError, _overflow(2, 0, 7, 8),
      values=True),
    A("new_keys_overflow_rotary", "rotary", S(cache_seqlens=I([6, 5])), RuntimeError,
      _overflow(3, 0, 6, 8), values=True),
    # ---- cu_seqlens_k_new
    A("cu_seqlens_k_new_wrong_length", "packed", S(cu_seqlens_k_new=I([0, 5])), RuntimeError,
      r"cache_seqlens must have shape \(batch_size,\) = \(1,\), got \[2\]"),
    A("cu_seqlens_k_new_decreasing", "packed", S(cu_seqlens_k_new=I([0, 4, 2])), RuntimeError,
      r"cu_seqlens_k_new must be non-decreasing", values=True),
    A("cu_seqlens_k_new_end_beyond_rows", "packed", S(cu_seqlens_k_new=I([0, 3, 6])), RuntimeError,
      _names("cu_seqlens_k_new", r"\b6\b", r"\b5\b"), values=True),
    # ---- page_table / cache_batch_idx
    A("page_table_int64", "paged", S(page_table=As("page_table", I64)), RuntimeError, _PT_TYPE + r"Long \[2, 3\]"),
    A("page_table_1d", "paged", S(page_table=Fn("page_table", lambda t: t.flatten())), RuntimeError,
      _PT_TYPE + r"Int \[6\]"),
    A("page_table_written_entry_negative", "paged", S(page_table=with_entry("page_table", (0, 2), -1)),
      RuntimeError, _OOR.format(0, 2, -1), values=True),
    A("page_table_written_entry_eq_num_pages", "rotary_paged", S(page_table=with_entry("page_table", (1, 1), 6)),
      RuntimeError, _OOR.format(1, 1, 6), values=True),
    # a page that is read by the attention but not written by the append (row 0, column 0):
    # rejected by the attention step, which must not come after the append has written
    A("page_table_read_entry_out_of_range", "paged", S(page_table=with_entry("page_table", (0, 0), 6)),
      RuntimeError, _OOR.format(0, 0, 6), values=True),
    A("cache_batch_idx_out_of_range", "batch_idx", S(cache_batch_idx=I([3, 0])), RuntimeError,
      r"cache_batch_idx\[0\] = 3 is out of range \[0, 3\)", values=True),
    A("cache_batch_idx_negative", "batch_idx", S(cache_batch_idx=I([2, -1])), RuntimeError,
      r"cache_batch_idx\[1\] = -1 is out of range \[0, 3\)", values=True),
    # ---- new k / v against the caches
    A("k_heads_ne_cache", "dense", S(k=R("k", B, SNEW, 1, D), v=R("v", B, SNEW, 1, D)), RuntimeError,
      _K_HEADS + r"\[2, 3, 1, 32\]"),
    A("k_head_dim_ne_cache", "paged", S(k=R("k", B, SNEW, HK, 16)), RuntimeError, _K_HEADS + r"\[2, 3, 2, 16\]"),
    A("v_cache_shape_mismatch", "dense", S(v_cache=R("v_cache", B, CAP - 1, HK, D)), RuntimeError,
      _V_CACHE + r"\[2, 8, 2, 32\], v_cache \[2, 7, 2, 32\]"),
    A("k_float32_cache_bf16", "dense", S(k=As("k", F32)), RuntimeError, _SHARE + r"BFloat16, BFloat16, Float and BFloat16"),
    A("v_fp8_cache_bf16", "rotary", S(v=As("v", FP8)), RuntimeError,
      _SHARE + r"BFloat16, BFloat16, BFloat16 and Float8_e4m3fn"),
    A("k_cache_last_dim_strided", "dense", S(k_cache=Fn("k_cache", strided_last)), RuntimeError, "k_cache" + _CONTIG),
    A("v_last_dim_strided", "packed", S(v=Fn("v", strided_last)), RuntimeError, r"^v" + _CONTIG),
    # ---- q is bad but k / v are fine: the attention step rejects q; the append must not
    # have written by then (validate everything before any write, SEMANTICS §6)
    A("q_heads_not_multiple_of_cache_heads", "dense", S(q=R("q", B, SQ, 3, D)), RuntimeError,
      r"num_heads \(3\) must be a multiple of num_heads_k \(2\)"),
    A("q_head_dim_ne_cache", "paged", S(q=R("q", B, SQ, H, 16)), RuntimeError,
      r"k_cache head_dim \(32\) must equal q head_dim \(16\)"),
    A("q_float16_cache_bf16", "packed", S(q=As("q", F16)), RuntimeError,
      r"k_cache must have the dtype of q \(Half\), got BFloat16"),
    A("q_batch_ne_cache_seqlens", "dense", S(q=R("q", B + 1, SQ, H, D)), RuntimeError,
      _names(r"cache_seqlens|\bq\b|\bk\b", r"\b3\b", r"\b2\b")),
    A("cache_leftpad_beyond_keys", "dense", S(cache_leftpad=I([0, 9])), RuntimeError,
      r"cache_leftpad\[1\] = 9 must be in \[0, 8\]", values=True),
    A("num_splits_257", "dense", S(num_splits=257), RuntimeError, r"num_splits must be in \[0, 256\], got 257"),
]

FAMILIES = {
    "append": (APPEND_CASES, append_build, append_invoke),
    "rope": (ROPE_CASES, rope_build, rope_invoke),
    "api": (API_CASES, api_build, api_invoke),
}


# --------------------------------------------------------------------------------------
# baselines succeed (so no table passes vacuously)
# --------------------------------------------------------------------------------------
def _assert_caches(kc, vc, ref_k, ref_v, rotary):
    if rotary:  # the oracle rotates in fp64 and rounds once; the kernel in fp32
        torch.testing.assert_close(kc, ref_k, atol=1e-2, rtol=1e-2)
    else:
        assert torch.equal(_bits(kc), _bits(ref_k)), "k_cache differs from the oracle"
    assert torch.equal(_bits(vc), _bits(ref_v)), "v_cache differs from the oracle"


@pytest.mark.parametrize("base", list(APPEND_BASES))
def test_append_baseline_succeeds(base, device):
    kw = append_build(base, "op", device)
    ref_k, ref_v = append_ref(kw)
    before = kw["k_cache"].clone()
    assert OP.kvcache_append(**kw) is None
    _assert_caches(kw["k_cache"], kw["v_cache"], ref_k, ref_v, "rotary_cos" in kw)
    assert not torch.equal(_bits(kw["k_cache"]), _bits(before)), "the baseline must really write"


@pytest.mark.parametrize("base", list(ROPE_BASES))
def test_rope_baseline_succeeds(base, device):
    kw = rope_build(base, "op", device)
    out = OP.rotary_embedding(**kw)
    x, cos, sin = kw["x"], kw["cos"], kw["sin"]
    offs = kw["seqlen_offsets"].tolist()
    if "cu_seqlens" in kw:
        cu = kw["cu_seqlens"].tolist()
        pos = [offs[b] + t for b in range(len(offs)) for t in range(cu[b + 1] - cu[b])]
        rows = x
    else:
        per_row = kw.get("positions_per_row", True)
        pos = [offs[b] + (t if per_row else 0) for b in range(x.shape[0]) for t in range(x.shape[1])]
        rows = x.reshape(-1, *x.shape[2:])
    ref = T.rotary_ref(rows.cpu(), cos.cpu(), sin.cpu(), pos, kw.get("interleaved", True)).reshape(x.shape)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("base", list(API_BASES))
def test_api_baseline_succeeds(base, device):
    kw = api_build(base, "api", device)
    appends = kw.get("k") is not None
    ref_k, ref_v = append_ref(kw) if appends else (kw["k_cache"].clone(), kw["v_cache"].clone())
    res = flash_attn_with_kvcache(**kw)
    assert len(res) == 4
    out, lse = res[0], res[1]
    assert out.shape == kw["q"].shape
    assert out.float().isfinite().all() and lse.isfinite().all()
    _assert_caches(kw["k_cache"], kw["v_cache"], ref_k, ref_v, "rotary_cos" in kw)


def test_tables_cover_every_family():
    for name, (cases, _, _) in FAMILIES.items():
        assert len(cases) >= 25, name
        ids = [p.id for p in cases]
        assert len(ids) == len(set(ids)), f"duplicate ids in {name}"
        used = {p.values[0] for p in cases}
        bases = {"append": APPEND_BASES, "rope": ROPE_BASES, "api": API_BASES}[name]
        assert used <= set(bases), used - set(bases)


# --------------------------------------------------------------------------------------
# the tables: the expected exception and message, and every argument (caches included)
# bitwise unchanged afterwards
# --------------------------------------------------------------------------------------
def _run_case(family, base, mutate, exc, match, call, values, device):
    _, build, invoke = FAMILIES[family]
    kw = build(base, call, device)
    mutate(kw)
    _expect_rejected(invoke(call), kw, exc, match, device, values)


@pytest.mark.parametrize("base,mutate,exc,match,call,values", APPEND_CASES)
def test_kvcache_append_bad_input(base, mutate, exc, match, call, values, device):
    _run_case("append", base, mutate, exc, match, call, values, device)


@pytest.mark.parametrize("base,mutate,exc,match,call,values", ROPE_CASES)
def test_rotary_embedding_bad_input(base, mutate, exc, match, call, values, device):
    _run_case("rope", base, mutate, exc, match, call, values, device)


@pytest.mark.parametrize("base,mutate,exc,match,call,values", API_CASES)
def test_flash_attn_with_kvcache_bad_input(base, mutate, exc, match, call, values, device):
    _run_case("api", base, mutate, exc, match, call, values, device)


def test_garbage_in_unwritten_page_table_columns(device):
    """Only the pages an append writes are its business: garbage in columns it does not
    touch is either accepted (and then the written slots are exactly right) or rejected with
    a page_table error, with the caches unchanged."""
    if device != "cpu":
        pytest.skip("page-table ranges are checked on the CPU reference (SEMANTICS §6)")
    kw = append_build("paged", "op", device)
    kw["page_table"][0, 0] = -1       # row 0 writes columns 1, 2 only
    kw["page_table"][1, 2] = 2**31 - 1  # row 1 writes columns 0, 1 only
    ref_k, ref_v = append_ref(kw)
    snap = _snapshot(kw)
    try:
        OP.kvcache_append(**kw)
    except RuntimeError as e:
        assert "page_table" in str(e), str(e)
        _assert_untouched(kw, snap)
        return
    _assert_caches(kw["k_cache"], kw["v_cache"], ref_k, ref_v, False)


@pytest.mark.parametrize("start", [0, 65535, 2**31 - 1])
def test_paged_capacity_beyond_int32_not_wrapped(start, device):
    """A page table of 32768 columns of 65536-key pages holds 2^31 keys per sequence. A valid
    append (here of one key, mapped to page 0) must succeed, or be refused with an error that
    says the capacity exceeds int32; never judged against a capacity wrapped to 32 bits."""
    if device != "cpu":
        pytest.skip("capacity checks read cache_seqlens (CPU reference, SEMANTICS §6)")
    page, cols = 65536, 32768  # k_cache 1 MiB, page_table 128 KiB
    kc = torch.zeros(1, page, 1, 8, dtype=BF16, device=device)
    vc = torch.zeros_like(kc)
    k = torch.ones(1, 1, 1, 8, dtype=BF16, device=device)
    pt = torch.zeros(1, cols, dtype=I32, device=device)
    try:
        OP.kvcache_append(kc, vc, k, k * 2, ints(device, [start]), page_table=pt)
    except RuntimeError as e:
        assert "2^31" in str(e) or "int32" in str(e), f"valid append rejected with a wrapped capacity: {e}"
        assert not kc.any() and not vc.any()
        return
    slot = start % page
    assert kc[0, slot].float().eq(1).all() and vc[0, slot].float().eq(2).all()
    assert int(kc.float().ne(0).sum()) == 8 and int(vc.float().ne(0).sum()) == 8


# --------------------------------------------------------------------------------------
# device mismatch (needs a second device with mate kernels)
# --------------------------------------------------------------------------------------
APPEND_MISMATCH = [
    ("dense", "v_cache", "k_cache"), ("dense", "k", "k_cache"), ("dense", "v", "k_cache"),
    ("dense", "cache_seqlens", "k_cache"), ("packed", "cu_seqlens_k_new", "k_cache"),
    ("paged", "page_table", "k_cache"), ("batch_idx", "cache_batch_idx", "k_cache"),
    ("rotary", "rotary_cos", "k"), ("rotary", "rotary_sin", "k"), ("rotary_seqlens", "rotary_seqlens", "k_cache"),
]


@pytest.mark.parametrize("base,name,ref", APPEND_MISMATCH)
def test_kvcache_append_device_mismatch(base, name, ref, device):
    if device == "cpu":
        pytest.skip("needs an accelerator with mate kernels (argument on the CPU, the caches on the device)")
    kw = append_build(base, "op", device)
    kw[name] = kw[name].cpu()
    _expect_rejected(append_invoke("op"), kw, RuntimeError, rf"{name} must be on the same device as {ref}",
                     device, False)


@pytest.mark.parametrize("base,name", [("dense", "cos"), ("dense", "sin"), ("dense", "seqlen_offsets"),
                                       ("ragged", "cu_seqlens")])
def test_rotary_embedding_device_mismatch(base, name, device):
    if device == "cpu":
        pytest.skip("needs an accelerator with mate kernels")
    kw = rope_build(base, "op", device)
    kw[name] = kw[name].cpu()
    label = {"cos": "rotary_cos", "sin": "rotary_sin"}.get(name, name)
    with pytest.raises(RuntimeError, match=rf"{label} must be on the same device as x"):
        OP.rotary_embedding(**kw)


@pytest.mark.parametrize("base,name", [("dense", "k"), ("paged", "page_table"), ("rotary", "rotary_cos"),
                                       ("dense", "cache_seqlens")])
def test_flash_attn_with_kvcache_device_mismatch(base, name, device):
    if device == "cpu":
        pytest.skip("needs an accelerator with mate kernels")
    kw = api_build(base, "api", device)
    kw[name] = kw[name].cpu()
    _expect_rejected(api_invoke("api"), kw, RuntimeError, rf"{name} must be on the same device as", device, False)


# --------------------------------------------------------------------------------------
# inputs that may crash the process: each runs in its own subprocess
# --------------------------------------------------------------------------------------
_PRELUDE = """
import json, torch, mate_ops
op, d = torch.ops.mate, {device!r}
bf, i32 = torch.bfloat16, torch.int32
def report(**kw):
    print("RESULT " + json.dumps(kw), flush=True)
try:
    {stmt}
    report(ok=True)
except Exception as e:
    report(ok=False, exc=type(e).__name__, msg=str(e).splitlines()[0] if str(e) else "")
"""

# (id, statement, regex): the statement must raise RuntimeError matching regex, not crash.
ISOLATED = [
    # packed new keys: 1 row of k, but cu_seqlens_k_new claims 2^22 - 1 rows for sequence 1
    # (the paged cache holds them all: 2^22 columns of 1-key pages, every one page 0)
    ("append_packed_new_keys_far_beyond_k",
     "op.kvcache_append(torch.zeros(1, 1, 1, 16, dtype=bf, device=d), torch.zeros(1, 1, 1, 16, dtype=bf, device=d), "
     "torch.ones(1, 1, 16, dtype=bf, device=d), torch.ones(1, 1, 16, dtype=bf, device=d), "
     "torch.zeros(2, dtype=i32, device=d), cu_seqlens_k_new=torch.tensor([0, 1, 1 << 22], dtype=i32, device=d), "
     "page_table=torch.zeros(2, 1 << 22, dtype=i32, device=d))",
     r"cu_seqlens_k_new"),
    # the same through the API (dense q of one row per sequence)
    ("api_packed_new_keys_far_beyond_k",
     "mate_ops.flash_attn_with_kvcache(torch.ones(2, 1, 1, 16, dtype=bf, device=d), "
     "torch.zeros(1, 1, 1, 16, dtype=bf, device=d), torch.zeros(1, 1, 1, 16, dtype=bf, device=d), "
     "torch.ones(1, 1, 16, dtype=bf, device=d), torch.ones(1, 1, 16, dtype=bf, device=d), "
     "cache_seqlens=torch.zeros(2, dtype=i32, device=d), "
     "cu_seqlens_k_new=torch.tensor([0, 1, 1 << 22], dtype=i32, device=d), "
     "page_table=torch.zeros(2, 1 << 22, dtype=i32, device=d))",
     r"cu_seqlens_k_new"),
]


@pytest.mark.parametrize("cid,stmt,regex", ISOLATED, ids=[c[0] for c in ISOLATED])
def test_no_crash_isolated(cid, stmt, regex, device):
    import re

    if device != "cpu":
        pytest.skip("data-dependent check: mandatory on the CPU reference only (SEMANTICS §6)")
    code = textwrap.dedent(_PRELUDE).format(device=device, stmt=stmt)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    rc = p.returncode
    assert rc == 0, (f"process crashed (exit status {rc}{' = signal ' + str(-rc) if rc < 0 else ''}) "
                     f"on: {stmt}\nstderr tail: {p.stderr[-500:]}")
    res = json.loads([l for l in p.stdout.splitlines() if l.startswith("RESULT ")][-1][len("RESULT "):])
    assert not res["ok"], f"expected RuntimeError matching {regex!r}, call succeeded: {stmt}"
    assert res["exc"] == "RuntimeError" and re.search(regex, res["msg"]), (
        f"expected RuntimeError matching {regex!r}, got {res['exc']}: {res['msg']}")


# --------------------------------------------------------------------------------------
# duplicate cache_batch_idx: undefined which write wins, but no crash, and every written
# slot holds one of its candidate writes, bitwise; nothing else changes
# --------------------------------------------------------------------------------------
def _slots(layout, page_table, row, start, n):
    """Cache slots (index tuples into dim 0, 1) of positions [start, start + n) of `row`."""
    if layout == "dense":
        return [(row, p) for p in range(start, start + n)]
    return [(int(page_table[row, p // PAGE]), p % PAGE) for p in range(start, start + n)]


@pytest.mark.parametrize("layout", ["dense", "paged"])
@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense_new", "packed_new"])
def test_duplicate_cache_batch_idx(layout, rotary, packed, device):
    nb = 4
    idx = [1, 1, 0, 1]                 # rows 1 three times, row 0 once; row 2 never
    starts = [2, 3, 0, 3]              # overlapping ranges in row 1: [2, 5), [3, 6), [3, 6)
    lens = [3, 3, 3, 3] if not packed else [3, 2, 3, 1]
    if layout == "dense":
        kc, vc = rnd(device, 3, CAP, HK, D), rnd(device, 3, CAP, HK, D)
        pt = None
    else:
        kc, vc = rnd(device, NUM_PAGES, PAGE, HK, D), rnd(device, NUM_PAGES, PAGE, HK, D)
        pt = ints(device, [[5, 2, 0], [1, 4, 3], [0, 0, 0]])
    if packed:
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        k, v = rnd(device, cu[-1], HK, D), rnd(device, cu[-1], HK, D)
        seg = lambda t, b: t[cu[b]:cu[b + 1]]  # noqa: E731
    else:
        k, v = rnd(device, nb, SNEW, HK, D), rnd(device, nb, SNEW, HK, D)
        seg = lambda t, b: t[b:b + 1]  # noqa: E731
    extra = {}
    if rotary:
        extra["rotary_cos"], extra["rotary_sin"] = _tables(device)
    kc0, vc0 = kc.clone(), vc.clone()

    # candidate writes: each sequence appended alone (same kernel, same values), on a copy
    cands = {}  # slot -> list of (k, v) slot contents
    for b in range(nb):
        ck, cv = kc0.clone(), vc0.clone()
        one = dict(cache_seqlens=ints(device, [starts[b]]), cache_batch_idx=ints(device, [idx[b]]), page_table=pt)
        if packed:
            one["cu_seqlens_k_new"] = ints(device, [0, lens[b]])
        OP.kvcache_append(ck, cv, seg(k, b), seg(v, b), **one, **extra)
        for s in _slots(layout, pt, idx[b], starts[b], lens[b]):
            cands.setdefault(s, []).append((ck[s].clone(), cv[s].clone()))

    kw = dict(cache_seqlens=ints(device, starts), cache_batch_idx=ints(device, idx), page_table=pt)
    if packed:
        kw["cu_seqlens_k_new"] = ints(device, cu)
    OP.kvcache_append(kc, vc, k, v, **kw, **extra)  # completes, no crash

    assert any(len(c) > 1 for c in cands.values()), "the test must have overlapping writes"
    for s, options in cands.items():
        if device == "cpu":  # one thread writes a whole key: a slot holds one candidate
            assert any(torch.equal(_bits(kc[s]), _bits(ok)) for ok, _ in options), f"k_cache slot {s}: no candidate"
            assert any(torch.equal(_bits(vc[s]), _bits(ov)) for _, ov in options), f"v_cache slot {s}: no candidate"
        else:  # device threads race per element (documented): each element comes from some candidate
            for got, which in ((kc[s], 0), (vc[s], 1)):
                match = torch.zeros_like(_bits(got), dtype=torch.bool)
                for opt in options:
                    match |= _bits(got) == _bits(opt[which])
                assert match.all(), f"cache slot {s}: an element matches no candidate write"
    untouched = torch.ones(kc.shape[:2], dtype=torch.bool)
    for s in cands:
        untouched[s] = False
    untouched = untouched.to(device)
    assert torch.equal(_bits(kc[untouched]), _bits(kc0[untouched])), "k_cache changed outside the written slots"
    assert torch.equal(_bits(vc[untouched]), _bits(vc0[untouched])), "v_cache changed outside the written slots"


@pytest.mark.parametrize("layout", ["dense", "paged"])
def test_duplicate_cache_batch_idx_api_completes(layout, device):
    kw = api_build("batch_idx" if layout == "dense" else "paged", "api", device)
    if layout == "dense":
        kw["cache_batch_idx"] = ints(device, [1, 1])
    else:
        kw["cache_batch_idx"] = ints(device, [0, 0])
        kw["cache_seqlens"] = ints(device, [6, 5])
    before_k = kw["k_cache"].clone()
    out, lse, *_ = flash_attn_with_kvcache(**kw)
    assert out.float().isfinite().all() and not lse.isnan().any()
    assert not torch.equal(_bits(kw["k_cache"]), _bits(before_k))


# --------------------------------------------------------------------------------------
# fuzz: garbage page tables / cache_seqlens / cache_batch_idx never crash kvcache_append
# --------------------------------------------------------------------------------------
_FUZZ = r'''
import json, random, sys, torch, mate_ops
from mate_ops import testing as T
op = torch.ops.mate
rng = random.Random(20240611)
torch.manual_seed(7)
GARBAGE = [-1, -2, -(2**31), 2**31 - 1, 2**31 - 2, 2**30, 1000, 65536]

def bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])

def emit(**kw):
    print(json.dumps(kw), flush=True)

for trial in range(NTRIALS):
    paged = rng.random() < 0.6
    packed = rng.random() < 0.3
    bsz = rng.randint(1, 3)
    hk, d = rng.choice([1, 2]), rng.choice([8, 16])
    dtype = rng.choice([torch.bfloat16, torch.float16, torch.float32])
    lens = [rng.choice([0, 1, 2, 3, 4]) for _ in range(bsz)] if packed else [rng.randint(0, 4)] * bsz
    use_idx = rng.random() < 0.4
    rows = bsz + (rng.randint(0, 2) if use_idx else 0)
    if paged:
        page, pages, cols = rng.randint(1, 5), rng.randint(1, 6), rng.randint(1, 4)
        kc = torch.randn(pages, page, hk, d).to(dtype)
        table = [[rng.randrange(pages) for _ in range(cols)] for _ in range(rows)]
        mode = rng.random()
        if mode < 0.2:  # all garbage
            table = [[rng.choice([rng.randrange(pages), rng.choice(GARBAGE), pages, rng.randint(-(2**31), 2**31 - 1)])
                      for _ in range(cols)] for _ in range(rows)]
        elif mode < 0.6:  # a few bad entries, written or not
            for _ in range(rng.randint(1, 3)):
                table[rng.randrange(rows)][rng.randrange(cols)] = rng.choice(GARBAGE + [pages, pages + 1])
        pt = torch.tensor(table, dtype=torch.int32)
        cap = page * cols
    else:
        cap = rng.randint(0, 8)
        kc = torch.randn(rows, cap, hk, d).to(dtype)
        pt = None
    vc = torch.randn_like(kc.float()).to(dtype)
    seqlens = [rng.randint(0, max(cap - lens[b], 0)) for b in range(bsz)]
    for b in range(bsz):
        if rng.random() < 0.15:
            seqlens[b] = rng.choice(GARBAGE + [cap - lens[b] + 1, cap + 1, -1])
    idx = None
    if use_idx:
        idx = [rng.randrange(rows) for _ in range(bsz)]
        for b in range(bsz):
            if rng.random() < 0.15:
                idx[b] = rng.choice(GARBAGE + [rows, -1])
    if packed:
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        k, v = torch.randn(cu[-1], hk, d).to(dtype), torch.randn(cu[-1], hk, d).to(dtype)
    else:
        k, v = torch.randn(bsz, lens[0], hk, d).to(dtype), torch.randn(bsz, lens[0], hk, d).to(dtype)

    # validity by SEMANTICS §1/§6 and docs/semantics.md (kvcache_append checks the whole page range)
    valid = True
    for b in range(bsz):
        s, n = seqlens[b], lens[b]
        row = idx[b] if idx is not None else b
        if s < 0 or s + n > cap or not (0 <= row < rows):
            valid = False
            continue
        if paged:  # every page of the sequence after the append (the attention reads them all)
            for p in range(0, s + n):
                if not (0 <= table[row][p // page] < pages):
                    valid = False
    desc = dict(trial=trial, paged=paged, packed=packed, cap=cap, rows=rows, lens=lens, cache_seqlens=seqlens,
                cache_batch_idx=idx, page_table=table if paged else None, num_pages=pages if paged else None,
                dtype=str(dtype), valid=valid)
    emit(start=desc)
    kc0, vc0 = kc.clone(), vc.clone()
    kw = dict(page_table=pt, cache_batch_idx=None if idx is None else torch.tensor(idx, dtype=torch.int32))
    if packed:
        kw["cu_seqlens_k_new"] = torch.tensor(cu, dtype=torch.int32)
    try:
        op.kvcache_append(kc, vc, k, v, torch.tensor(seqlens, dtype=torch.int32), **kw)
        outcome, msg = "ok", ""
    except Exception as e:
        outcome, msg = type(e).__name__, str(e).splitlines()[0] if str(e) else ""
    problems = []
    if outcome != "ok":
        if not (torch.equal(bits(kc), bits(kc0)) and torch.equal(bits(vc), bits(vc0))):
            problems.append("rejected call modified the caches")
    elif valid:
        # every written slot holds one of its candidate writes; nothing else changed
        cand = {}
        for b in range(bsz):
            row = idx[b] if idx is not None else b
            for t in range(lens[b]):
                pos = seqlens[b] + t
                slot = (table[row][pos // page], pos % page) if paged else (row, pos)
                src = (cu[b] + t,) if packed else (b, t)
                cand.setdefault(slot, []).append((k[src], v[src]))
        touched = torch.zeros(kc.shape[:2], dtype=torch.bool)
        for slot, options in cand.items():
            touched[slot] = True
            if not any(torch.equal(bits(kc[slot]), bits(a)) and torch.equal(bits(vc[slot]), bits(c)) for a, c in options):
                problems.append(f"slot {slot} holds none of its candidate writes")
        if not (torch.equal(bits(kc[~touched]), bits(kc0[~touched])) and torch.equal(bits(vc[~touched]), bits(vc0[~touched]))):
            problems.append("a slot outside the written ones changed")
    emit(end=dict(trial=trial, outcome=outcome, msg=msg, problems=problems))
emit(done=True)
'''

FUZZ_TRIALS = 200


@pytest.fixture(scope="module")
def fuzz_run():
    code = _FUZZ.replace("NTRIALS", str(FUZZ_TRIALS))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout, p.stderr


def test_garbage_append_indices_never_crash(device, fuzz_run):
    if device != "cpu":
        pytest.skip("page-table / cache_seqlens ranges are checked on the CPU reference (SEMANTICS §6)")
    rc, stdout, stderr = fuzz_run
    lines = [json.loads(l) for l in stdout.splitlines() if l.startswith("{")]
    starts = [l["start"] for l in lines if "start" in l]
    ends = {l["end"]["trial"]: l["end"] for l in lines if "end" in l}
    assert rc == 0, (f"process crashed (exit status {rc}{' = signal ' + str(-rc) if rc < 0 else ''}) on trial "
                     f"{starts[-1] if starts else '?'}\nstderr tail: {stderr[-800:]}")
    assert any("done" in l for l in lines) and len(ends) == FUZZ_TRIALS, stderr[-800:]
    failures = []
    n_valid = n_invalid = 0
    for s in starts:
        e = ends[s["trial"]]
        if s["valid"]:
            n_valid += 1
            if e["outcome"] != "ok":
                failures.append(f"valid input rejected ({e['outcome']}: {e['msg']}): {s}")
        else:
            n_invalid += 1
            if e["outcome"] == "ok":
                failures.append(f"invalid input silently accepted: {s}")
            elif e["outcome"] != "RuntimeError" or not any(
                    w in e["msg"] for w in ("cache_seqlens", "page_table", "cache_batch_idx")):
                failures.append(f"unclear rejection ({e['outcome']}: {e['msg']}): {s}")
        failures += [f"{p}: {s}" for p in e["problems"]]
    assert not failures, "\n".join(failures[:10]) + (f"\n... {len(failures)} in all" if len(failures) > 10 else "")
    assert n_valid >= 20 and n_invalid >= 100, (n_valid, n_invalid)


# --------------------------------------------------------------------------------------
# every row of the kvcache_append and flash_attn_with_kvcache tables again: the call
# raises and both caches are BITWISE unchanged (the table tests compare with torch.equal,
# which cannot tell -0.0 from 0.0 nor see NaN payloads; a rejected call must not have
# written a single bit, SEMANTICS §6)
# --------------------------------------------------------------------------------------
def _raw_bits(t):
    """Bitwise view for any element size (the table's caches include float64 ones)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


_CACHE_ROWS = [pytest.param(fam, *p.values, id=f"{fam}-{p.id}")
               for fam, cases in (("append", APPEND_CASES), ("api", API_CASES)) for p in cases]


@pytest.mark.parametrize("family,base,mutate,exc,match,call,values", _CACHE_ROWS)
def test_rejected_calls_leave_caches_bitwise_unchanged(family, base, mutate, exc, match, call, values, device):
    if values and device != "cpu":
        pytest.skip("data-dependent check: mandatory on the CPU reference only (SEMANTICS §6)")
    _, build, invoke = FAMILIES[family]
    kw = build(base, call, device)
    mutate(kw)
    caches = {n: kw[n] for n in ("k_cache", "v_cache") if isinstance(kw.get(n), torch.Tensor)}
    before = {n: t.clone() for n, t in caches.items()}
    with pytest.raises(exc):
        invoke(call)(kw)
    for n, t in caches.items():
        assert t.shape == before[n].shape and torch.equal(_raw_bits(t), _raw_bits(before[n])), \
            f"the rejected call wrote {n} (k given: {kw.get('k') is not None})"
