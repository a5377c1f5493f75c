"""Bad-input tests of the MLA family (SEMANTICS §3, §4, §6): ``torch.ops.mate.mla_decode`` /
``mate_ops.flashmla.flash_mla_with_kvcache``, ``get_mla_metadata``, ``mla_sparse_prefill`` /
``flash_mla_sparse_fwd`` and ``mate_ops.flashinfer.BatchMLAPagedAttentionWrapper``.

Same layout as tests/test_bad_input.py (whose helpers this file imports): one table per
entry point. Each row takes a VALID baseline (``*_BASES``, each checked to succeed by its
own test, so no table passes vacuously), applies one mutation, and names the exception and
a regex that must name the argument and what was expected. After every rejected call all
tensor arguments must be unchanged (§6: validation before touching memory). Rows whose
check reads tensor data (``values=True``: page-table / length / index ranges) are mandatory
on the CPU reference only and skipped elsewhere.

    cd /work/main && python3 -m pytest -q tests/test_mla_bad_input.py
"""
import pytest
import torch

import mate_ops  # noqa: F401  (registers torch.ops.mate.*)
from mate_ops import flashmla
from mate_ops.flashinfer import BatchMLAPagedAttentionWrapper
from mate_ops.testing import mla_decode_ref, mla_model1_block_stride, quantize_mla_model1, quantize_mla_v32

# Helpers of the FMHA bad-input table (tests/ is on sys.path under pytest's default
# "prepend" import mode). Only helpers are imported: importing test_* functions would
# collect them a second time here.
from test_bad_input import (  # noqa: E402

    C, I, R, S, As, Fn, _calls_used, _expect_rejected, _same, dev, ints, rnd, strided_last, with_entry,
)

DEVICE_OPS = ("mate::mla_decode", "mate::mla_sparse_prefill", "mate::get_mla_metadata")

OP = torch.ops.mate

BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
FP8, U8, I32, I64 = torch.float8_e4m3fn, torch.uint8, torch.int32, torch.int64

# Baseline sizes: batch, query rows, query heads, q/k head dim (512 latent + 64 rope), V dim.
B, SQ, HQ, DQK, DV = 2, 2, 4, 576, 512
NB, P = 6, 4                      # paged cache: 6 blocks of 4 tokens; 3 block-table columns
BLOCK_TABLE = [[5, 0, 3], [1, 4, 2]]
LENS = [10, 7]                    # sequence 0 reads 3 blocks, sequence 1 reads 2
TOPK, ETOPK = 5, 3                # sparse: indices per row into the cache / the extra cache
NB_X, P_X = 3, 8                  # the extra cache has its own page size
V32, MODEL1 = 656, 584            # FP8 bytes per token


def _idx(d, shape, num_slots):
    """int32 slot indices, mostly valid, with -1 and one out-of-range entry per row."""
    t = torch.randint(0, num_slots, shape, dtype=I32)
    t[..., 0] = -1
    t[..., -1] = num_slots + 5
    return t.to(d)


def _u8(d, *shape):
    return torch.randint(0, 256, shape, dtype=U8).to(d)


def _model1_strided(d, block_stride, token_stride=MODEL1, page=P, num_blocks=NB):
    """A MODEL1-shaped byte view with arbitrary strides over a big enough buffer."""
    n = (num_blocks - 1) * block_stride + (page - 1) * token_stride + MODEL1
    return torch.as_strided(_u8(d, n), (num_blocks, page, 1, MODEL1), (block_stride, token_stride, MODEL1, 1))


# --------------------------------------------------------------------------------------
# mla_decode / flash_mla_with_kvcache: baselines (raw-op kwargs; every one is valid)
# --------------------------------------------------------------------------------------
def dec_dense(d):
    return dict(q=rnd(d, B, SQ, HQ, DQK), k_cache=rnd(d, NB, P, 1, DQK), block_table=ints(d, BLOCK_TABLE),
                cache_seqlens=ints(d, LENS), head_dim_v=DV, causal=True)


def dec_meta(d):  # with the scheduler metadata of get_mla_metadata
    kw = dec_dense(d)
    meta, splits = OP.get_mla_metadata(kw["cache_seqlens"], SQ * HQ, 1)
    kw.update(tile_scheduler_metadata=meta, num_splits=splits)
    return kw


def dec_gqa(d):  # 4 query heads over 2 kv heads
    kw = dec_dense(d)
    kw.update(k_cache=rnd(d, NB, P, 2, DQK), causal=False)
    return kw


def dec_sparse(d):  # indices + topk_length + extra cache (own page size) + extra_topk_length + sink
    return dict(q=rnd(d, B, SQ, HQ, DQK), k_cache=rnd(d, NB, P, 1, DQK), block_table=None, cache_seqlens=None,
                head_dim_v=DV, indices=_idx(d, (B, SQ, TOPK), NB * P), topk_length=ints(d, [TOPK, 3]),
                extra_k_cache=rnd(d, NB_X, P_X, 1, DQK), extra_indices_in_kvcache=_idx(d, (B, SQ, ETOPK), NB_X * P_X),
                extra_topk_length=ints(d, [ETOPK, 1]), attn_sink=torch.randn(HQ, device=d))


def dec_v32(d):  # FP8 V3.2 cache, dense
    kw = dec_dense(d)
    kw.update(k_cache=quantize_mla_v32(rnd(d, NB, P, 1, DQK)), is_fp8_kvcache=True)
    return kw


def dec_v32_sparse(d):  # FP8 V3.2 caches (both), sparse
    kw = dec_sparse(d)
    kw.update(k_cache=quantize_mla_v32(kw["k_cache"]), extra_k_cache=quantize_mla_v32(kw["extra_k_cache"]),
              is_fp8_kvcache=True)
    return kw


def dec_model1(d):  # FP8 MODEL1 block view, q head dim 512 (448 latent + 64 rope)
    kw = dec_dense(d)
    kw.update(q=rnd(d, B, SQ, HQ, 512), k_cache=quantize_mla_model1(rnd(d, NB, P, 1, 512)), is_fp8_kvcache=True)
    return kw


def dec_v32_e4m3(d):  # the same bytes typed float8_e4m3fn (a 1-byte dtype: accepted)
    kw = dec_v32(d)
    kw["k_cache"] = kw["k_cache"].view(FP8)
    return kw


def dec_v32_int8(d):
    kw = dec_v32(d)
    kw["k_cache"] = kw["k_cache"].view(torch.int8)
    return kw


def dec_v32_block_sliced(d):  # every other block of a larger cache: tokens still contiguous
    kw = dec_v32(d)
    kw["k_cache"] = quantize_mla_v32(rnd(d, 2 * NB, P, 1, DQK))[::2]
    return kw


DECODE_BASES = dict(dense=dec_dense, meta=dec_meta, gqa=dec_gqa, sparse=dec_sparse, v32=dec_v32,
                    v32_sparse=dec_v32_sparse, model1=dec_model1, v32_e4m3=dec_v32_e4m3, v32_int8=dec_v32_int8,
                    v32_block_sliced=dec_v32_block_sliced)


def decode_build(base, call, device):
    kw = DECODE_BASES[base](device)
    if call == "api":  # flash_mla_with_kvcache takes the metadata pair positionally, no defaults
        kw.setdefault("tile_scheduler_metadata", None)
        kw.setdefault("num_splits", None)
    return kw


def decode_invoke(call):
    return {"op": lambda kw: OP.mla_decode(**kw), "api": lambda kw: flashmla.flash_mla_with_kvcache(**kw)}[call]


_Q_DTYPE = r"q must be bfloat16, float16 or float32, got "
_Q_RANK = r"q must be \(batch_size, seqlen_q, num_heads_q, head_dim\), got shape "
_NEED_INDICES = (r"topk_length, extra_k_cache, extra_indices_in_kvcache and extra_topk_length need indices "
                 r"\(sparse attention\)")
_BYTES = (r"must have 656 bytes per token \(V3\.2 layout, head_dim 576\) or 584 \(MODEL1 layout, head_dim 512\) "
          r"with is_fp8_kvcache, got ")
_MODEL1_VIEW = (r"k_cache must be a MODEL1 block view: stride\(1\) == 584 and a block stride >= page_block_size \* "
                r"584 that is a multiple of 576, got strides ")
_IDX_SHAPE = r"must have shape \(batch_size, seqlen_q, topk\) = \(2, 2, topk\), got "

DECODE_CASES = [
    # ---- FP8 caches
    C("fp8_600_bytes_per_token", "v32", S(k_cache=lambda kw: _u8(dev(kw), NB, P, 1, 600)), RuntimeError,
      "k_cache " + _BYTES + "600"),
    C("fp8_576_bytes_per_token", "v32", S(k_cache=lambda kw: _u8(dev(kw), NB, P, 1, 576)), RuntimeError,
      "k_cache " + _BYTES + "576"),
    C("fp8_v32_with_q_head_dim_512", "v32", S(q=R("q", B, SQ, HQ, 512)), RuntimeError,
      r"an FP8 V3\.2 cache \(656 bytes per token\) needs q head_dim 576, got 512"),
    C("fp8_model1_with_q_head_dim_576", "model1", S(q=R("q", B, SQ, HQ, DQK)), RuntimeError,
      r"an FP8 MODEL1 cache \(584 bytes per token\) needs q head_dim 512, got 576"),
    C("fp8_num_heads_k_2", "v32", S(k_cache=lambda kw: _u8(dev(kw), NB, P, 2, V32)), RuntimeError,
      r"k_cache must have num_heads_k == 1 with is_fp8_kvcache, got 2"),
    C("fp8_flag_with_bf16_cache", "dense", S(is_fp8_kvcache=True), RuntimeError,
      r"k_cache must be a 1-byte dtype \(uint8, int8 or float8_e4m3fn\) with is_fp8_kvcache, got BFloat16"),
    C("fp8_flag_with_fp16_656_cache", "v32", S(k_cache=R("k_cache", NB, P, 1, V32, dtype=F16)), RuntimeError,
      r"k_cache must be a 1-byte dtype \(uint8, int8 or float8_e4m3fn\) with is_fp8_kvcache, got Half"),
    C("fp8_cache_without_flag", "v32", S(is_fp8_kvcache=False), RuntimeError,
      r"k_cache must have the dtype of q \(BFloat16\) unless is_fp8_kvcache, got Byte"),
    C("fp8_v32_token_stride_sliced", "v32",
      S(k_cache=lambda kw: quantize_mla_v32(rnd(dev(kw), NB, 2 * P, 1, DQK))[:, ::2]), RuntimeError,
      r"k_cache must store the tokens of a block contiguously \(stride\(1\) == 656 bytes\), got 1312"),
    C("fp8_v32_last_dim_strided", "v32", S(k_cache=Fn("k_cache", strided_last)), RuntimeError,
      r"k_cache must have a contiguous last dimension"),
    C("fp8_model1_made_contiguous", "model1", S(k_cache=Fn("k_cache", lambda t: t.contiguous())), RuntimeError,
      _MODEL1_VIEW + r"\[2336, 584, 584, 1\]"),
    C("fp8_model1_block_stride_not_multiple_of_576", "model1",
      S(k_cache=lambda kw: _model1_strided(dev(kw), 2344)), RuntimeError, _MODEL1_VIEW + r"\[2344, 584, 584, 1\]"),
    C("fp8_model1_block_stride_too_small", "model1",
      S(k_cache=lambda kw: _model1_strided(dev(kw), 1728)), RuntimeError, _MODEL1_VIEW + r"\[1728, 584, 584, 1\]"),
    C("fp8_model1_token_stride_sliced", "model1", S(k_cache=Fn("k_cache", lambda t: t[:, ::2])), RuntimeError,
      _MODEL1_VIEW + r"\[2880, 1168, 584, 1\]"),
    C("fp8_extra_cache_600_bytes", "v32_sparse", S(extra_k_cache=lambda kw: _u8(dev(kw), NB_X, P_X, 1, 600)),
      RuntimeError, "extra_k_cache " + _BYTES + "600"),
    C("fp8_extra_cache_bf16", "v32_sparse", S(extra_k_cache=R("k_cache", NB_X, P_X, 1, DQK, dtype=BF16)),
      RuntimeError, r"extra_k_cache must be a 1-byte dtype \(uint8, int8 or float8_e4m3fn\) with is_fp8_kvcache"),
    # ---- sparse (indices)
    C("sparse_num_heads_k_2", "sparse", S(k_cache=R("k_cache", NB, P, 2, DQK)), RuntimeError,
      r"sparse attention \(indices\) needs num_heads_k == 1, got 2"),
    C("indices_int64", "sparse", S(indices=As("indices", I64)), RuntimeError, r"indices must be int32, got Long"),
    C("indices_rank2", "sparse", S(indices=Fn("indices", lambda t: t.reshape(B, -1))), RuntimeError,
      "indices " + _IDX_SHAPE + r"\[2, 10\]"),
    C("indices_rank4", "sparse", S(indices=Fn("indices", lambda t: t[..., None])), RuntimeError,
      "indices " + _IDX_SHAPE + r"\[2, 2, 5, 1\]"),
    C("indices_wrong_batch", "sparse", S(indices=lambda kw: _idx(dev(kw), (3, SQ, TOPK), NB * P)), RuntimeError,
      "indices " + _IDX_SHAPE + r"\[3, 2, 5\]"),
    C("indices_wrong_seqlen_q", "sparse", S(indices=lambda kw: _idx(dev(kw), (B, 1, TOPK), NB * P)), RuntimeError,
      "indices " + _IDX_SHAPE + r"\[2, 1, 5\]"),
    C("indices_last_dim_strided", "sparse", S(indices=Fn("indices", strided_last)), RuntimeError,
      r"indices must have a contiguous last dimension"),
    C("causal_with_indices", "sparse", S(causal=True), RuntimeError,
      r"causal is not supported with indices"),
    C("topk_length_int64", "sparse", S(topk_length=As("topk_length", I64)), RuntimeError,
      r"topk_length must be int32, got Long"),
    C("topk_length_3_entries", "sparse", S(topk_length=I([1, 2, 3])), RuntimeError,
      r"topk_length must have 2 entries, got 3"),
    C("topk_length_2d", "sparse", S(topk_length=I([[1, 2]])), RuntimeError, r"topk_length must be 1-D, got shape"),
    # topk_length entries outside [0, topk] (the oracle, mate_ops.testing, rejects them: "a kernel
    # would read past the index row"); an index range, so checked on the CPU reference (§6)
    C("topk_length_above_topk", "sparse", S(topk_length=I([TOPK + 1, 3])), RuntimeError,
      r"topk_length\[0\].*6.*\[0, 5\]", values=True),
    C("topk_length_negative", "sparse", S(topk_length=I([TOPK, -1])), RuntimeError,
      r"topk_length\[1\].*-1.*\[0, 5\]", values=True),
    C("extra_k_cache_without_extra_indices", "sparse", S(extra_indices_in_kvcache=None, extra_topk_length=None),
      RuntimeError, r"extra_k_cache and extra_indices_in_kvcache must be given together"),
    C("extra_indices_without_extra_k_cache", "sparse", S(extra_k_cache=None), RuntimeError,
      r"extra_k_cache and extra_indices_in_kvcache must be given together"),
    C("extra_topk_length_without_extra_k_cache", "sparse", S(extra_k_cache=None, extra_indices_in_kvcache=None),
      RuntimeError, r"extra_topk_length needs extra_k_cache"),
    C("extra_k_cache_fp16", "sparse", S(extra_k_cache=As("extra_k_cache", F16)), RuntimeError,
      r"extra_k_cache must have the dtype of q \(BFloat16\) unless is_fp8_kvcache, got Half"),
    C("extra_k_cache_num_heads_k_2", "sparse", S(extra_k_cache=R("extra_k_cache", NB_X, P_X, 2, DQK)),
      RuntimeError, r"extra_k_cache needs num_heads_k == 1"),
    C("extra_k_cache_head_dim_512", "sparse", S(extra_k_cache=R("extra_k_cache", NB_X, P_X, 1, 512)), RuntimeError,
      r"extra_k_cache head_dim \(512\) must equal q's head_dim \(576\)"),
    C("extra_k_cache_rank3", "sparse", S(extra_k_cache=Fn("extra_k_cache", lambda t: t[:, :, 0])), RuntimeError,
      r"extra_k_cache must be \(num_blocks, page_block_size, num_heads_k, head_dim\), got shape \[3, 8, 576\]"),
    C("extra_indices_wrong_batch", "sparse",
      S(extra_indices_in_kvcache=lambda kw: _idx(dev(kw), (1, SQ, ETOPK), NB_X * P_X)), RuntimeError,
      "extra_indices_in_kvcache " + _IDX_SHAPE + r"\[1, 2, 3\]"),
    C("extra_indices_int64", "sparse", S(extra_indices_in_kvcache=As("extra_indices_in_kvcache", I64)),
      RuntimeError, r"extra_indices_in_kvcache must be int32, got Long"),
    C("extra_topk_length_1_entry", "sparse", S(extra_topk_length=I([1])), RuntimeError,
      r"extra_topk_length must have 2 entries, got 1"),
    # ---- head dims
    C("head_dim_v_above_dqk", "dense", S(head_dim_v=DQK + 1), RuntimeError,
      r"head_dim_v must be in \[1, head_dim of q \(576\)\], got 577"),
    C("head_dim_v_0", "dense", S(head_dim_v=0), RuntimeError,
      r"head_dim_v must be in \[1, head_dim of q \(576\)\], got 0"),
    C("head_dim_v_negative", "sparse", S(head_dim_v=-512), RuntimeError,
      r"head_dim_v must be in \[1, head_dim of q \(576\)\], got -512"),
    C("q_head_dim_1025", "dense", S(q=R("q", B, SQ, HQ, 1025), k_cache=R("k_cache", NB, P, 1, 1025)), RuntimeError,
      r"q head_dim must be in \[1, 1024\], got 1025"),
    # ---- q
    C("q_rank3", "dense", S(q=Fn("q", lambda t: t[0])), RuntimeError, _Q_RANK + r"\[2, 4, 576\]"),
    C("q_rank5", "sparse", S(q=Fn("q", lambda t: t[None])), RuntimeError, _Q_RANK + r"\[1, 2, 2, 4, 576\]"),
    C("q_rank0", "dense", S(q=lambda kw: torch.ones((), dtype=BF16, device=dev(kw))), RuntimeError, r"\bq must"),
    # the metadata checks run before q's: a malformed q must still be reported as such
    C("q_rank0_with_metadata", "meta", S(q=lambda kw: torch.ones((), dtype=BF16, device=dev(kw))), RuntimeError,
      r"\bq must"),
    C("q_rank3_with_metadata", "meta", S(q=R("q", 3, HQ, DQK)), RuntimeError, _Q_RANK + r"\[3, 4, 576\]"),
    C("q_int32", "dense", S(q=lambda kw: torch.ones(B, SQ, HQ, DQK, dtype=I32, device=dev(kw))), RuntimeError,
      _Q_DTYPE + "Int"),
    C("q_float64", "dense", S(q=As("q", F64), k_cache=As("k_cache", F64)), RuntimeError, _Q_DTYPE + "Double"),
    C("q_float8", "v32", S(q=As("q", FP8)), RuntimeError, _Q_DTYPE + "Float8_e4m3fn"),
    C("q_last_dim_strided", "dense", S(q=Fn("q", strided_last)), RuntimeError,
      r"q must have a contiguous last dimension \(stride 1\), got stride 2"),
    C("num_heads_q_not_multiple_of_num_heads_k", "gqa", S(q=R("q", B, SQ, 3, DQK)), RuntimeError,
      r"num_heads_q \(3\) must be a positive multiple of num_heads_k \(2\)"),
    C("num_heads_k_3_dense", "dense", S(k_cache=R("k_cache", NB, P, 3, DQK)), RuntimeError,
      r"num_heads_q \(4\) must be a positive multiple of num_heads_k \(3\)"),
    # ---- k_cache (non-fp8)
    C("k_cache_fp16_q_bf16", "dense", S(k_cache=As("k_cache", F16)), RuntimeError,
      r"k_cache must have the dtype of q \(BFloat16\) unless is_fp8_kvcache, got Half"),
    C("k_cache_fp32_q_bf16", "sparse", S(k_cache=As("k_cache", F32)), RuntimeError,
      r"k_cache must have the dtype of q \(BFloat16\) unless is_fp8_kvcache, got Float"),
    C("k_cache_bf16_q_fp16", "dense", S(q=As("q", F16)), RuntimeError,
      r"k_cache must have the dtype of q \(Half\) unless is_fp8_kvcache, got BFloat16"),
    C("k_cache_rank3", "dense", S(k_cache=Fn("k_cache", lambda t: t[:, :, 0])), RuntimeError,
      r"k_cache must be \(num_blocks, page_block_size, num_heads_k, head_dim\), got shape \[6, 4, 576\]"),
    C("k_cache_head_dim_512", "dense", S(k_cache=R("k_cache", NB, P, 1, 512)), RuntimeError,
      r"k_cache head_dim \(512\) must equal q's head_dim \(576\)"),
    C("k_cache_page_size_0", "dense", S(k_cache=R("k_cache", NB, 0, 1, DQK)), RuntimeError,
      r"k_cache must have page_block_size >= 1"),
    C("k_cache_last_dim_strided", "dense", S(k_cache=Fn("k_cache", strided_last)), RuntimeError,
      r"k_cache must have a contiguous last dimension"),
    # ---- dense: block_table / cache_seqlens
    C("dense_without_block_table", "dense", S(block_table=None), RuntimeError,
      r"block_table and cache_seqlens are required without indices"),
    C("dense_without_cache_seqlens", "dense", S(cache_seqlens=None), RuntimeError,
      r"block_table and cache_seqlens are required without indices"),
    C("block_table_int64", "dense", S(block_table=As("block_table", I64)), RuntimeError,
      r"block_table must be int32 \(batch_size, max_num_blocks\) = \(2, \.\.\.\), got Long \[2, 3\]"),
    C("block_table_1d", "dense", S(block_table=Fn("block_table", lambda t: t.reshape(-1))), RuntimeError,
      r"block_table must be int32 \(batch_size, max_num_blocks\) = \(2, \.\.\.\), got Int \[6\]"),
    C("block_table_3_rows", "dense", S(block_table=I([[5, 0, 3], [1, 4, 2], [0, 0, 0]])), RuntimeError,
      r"block_table must be int32 \(batch_size, max_num_blocks\) = \(2, \.\.\.\), got Int \[3, 3\]"),
    C("block_table_last_dim_strided", "dense", S(block_table=Fn("block_table", strided_last)), RuntimeError,
      r"block_table must have a contiguous last dimension \(stride 1\), got stride 2"),
    C("block_table_entry_num_blocks", "dense", S(block_table=with_entry("block_table", (0, 2), NB)), RuntimeError,
      r"block_table\[0, 2\] = 6 is out of range \[0, 6\)", values=True),
    C("block_table_entry_negative", "dense", S(block_table=with_entry("block_table", (1, 1), -1)), RuntimeError,
      r"block_table\[1, 1\] = -1 is out of range \[0, 6\)", values=True),
    C("block_table_entry_int_max", "meta", S(block_table=with_entry("block_table", (1, 0), 2**31 - 1)),
      RuntimeError, r"block_table\[1, 0\] = 2147483647 is out of range \[0, 6\)", values=True),
    C("block_table_out_of_range_fp8", "model1", S(block_table=with_entry("block_table", (0, 0), 99)), RuntimeError,
      r"block_table\[0, 0\] = 99 is out of range \[0, 6\)", values=True),
    C("cache_seqlens_beyond_table", "dense", S(cache_seqlens=I([13, 7])), RuntimeError,
      r"cache_seqlens\[0\] = 13 must be in \[0, max_num_blocks \* page_block_size = 12\]", values=True),
    C("cache_seqlens_negative", "dense", S(cache_seqlens=I([10, -1])), RuntimeError,
      r"cache_seqlens\[1\] = -1 must be in \[0, max_num_blocks \* page_block_size = 12\]", values=True),
    C("cache_seqlens_int_max", "gqa", S(cache_seqlens=I([2**31 - 1, 7])), RuntimeError,
      r"cache_seqlens\[0\] = 2147483647 must be in \[0, max_num_blocks \* page_block_size = 12\]", values=True),
    C("cache_seqlens_int64", "dense", S(cache_seqlens=As("cache_seqlens", I64)), RuntimeError,
      r"cache_seqlens must be int32, got Long"),
    C("cache_seqlens_3_entries", "dense", S(cache_seqlens=I([10, 7, 1])), RuntimeError,
      r"cache_seqlens must have 2 entries, got 3"),
    C("topk_length_without_indices", "dense", S(topk_length=I([3, 3])), RuntimeError, _NEED_INDICES),
    C("extra_k_cache_without_indices", "dense", S(extra_k_cache=R("k_cache", NB_X, P_X, 1, DQK)), RuntimeError,
      _NEED_INDICES),
    C("extra_indices_without_indices", "dense",
      S(extra_indices_in_kvcache=lambda kw: _idx(dev(kw), (B, SQ, ETOPK), 24)), RuntimeError, _NEED_INDICES),
    C("extra_topk_length_without_indices", "dense", S(extra_topk_length=I([1, 1])), RuntimeError, _NEED_INDICES),
    # ---- attn_sink, softmax_scale
    C("attn_sink_5_heads", "dense", S(attn_sink=lambda kw: torch.randn(5, device=dev(kw))), RuntimeError,
      r"attn_sink must have shape \(num_heads_q,\) = \(4,\), got \[5\]"),
    C("attn_sink_2d", "sparse", S(attn_sink=Fn("attn_sink", lambda t: t[None])), RuntimeError,
      r"attn_sink must have shape \(num_heads_q,\) = \(4,\), got \[1, 4\]"),
    C("attn_sink_int32", "sparse", S(attn_sink=As("attn_sink", I32)), RuntimeError,
      r"attn_sink must be a floating tensor"),
    C("softmax_scale_nan", "dense", S(softmax_scale=float("nan")), RuntimeError, r"softmax_scale must be finite"),
    C("softmax_scale_inf", "sparse", S(softmax_scale=float("inf")), RuntimeError, r"softmax_scale must be finite"),
    # ---- tile_scheduler_metadata / num_splits
    C("tile_scheduler_metadata_7_cols", "meta", S(tile_scheduler_metadata=Fn("tile_scheduler_metadata",
                                                                              lambda t: t[:, :7].contiguous())),
      RuntimeError, r"tile_scheduler_metadata must be int32 \(num_parts, 8\) from get_mla_metadata, got \[\d+, 7\]"),
    C("tile_scheduler_metadata_1d", "meta", S(tile_scheduler_metadata=Fn("tile_scheduler_metadata",
                                                                          lambda t: t.reshape(-1))),
      RuntimeError, r"tile_scheduler_metadata must be int32 \(num_parts, 8\) from get_mla_metadata, got \[\d+\]"),
    C("tile_scheduler_metadata_int64", "meta", S(tile_scheduler_metadata=As("tile_scheduler_metadata", I64)),
      RuntimeError, r"tile_scheduler_metadata must be int32 \(num_parts, 8\) from get_mla_metadata"),
    C("num_splits_batch_entries", "meta", S(num_splits=Fn("num_splits", lambda t: t[:B].contiguous())),
      RuntimeError, r"num_splits must be int32 \(batch_size \+ 1,\) from get_mla_metadata, got \[2\]"),
    C("num_splits_2d", "meta", S(num_splits=Fn("num_splits", lambda t: t[None])), RuntimeError,
      r"num_splits must be int32 \(batch_size \+ 1,\) from get_mla_metadata, got \[1, 3\]"),
    C("num_splits_int64", "meta", S(num_splits=As("num_splits", I64)), RuntimeError,
      r"num_splits must be int32 \(batch_size \+ 1,\) from get_mla_metadata"),
    # ---- the Python API forwards to the same checks
    C("api_fp8_600_bytes_per_token", "v32", S(k_cache=lambda kw: _u8(dev(kw), NB, P, 1, 600)), RuntimeError,
      "k_cache " + _BYTES + "600", call="api"),
    C("api_indices_int64", "sparse", S(indices=As("indices", I64)), RuntimeError,
      r"indices must be int32, got Long", call="api"),
    C("api_dense_without_block_table", "meta", S(block_table=None), RuntimeError,
      r"block_table and cache_seqlens are required without indices", call="api"),
    C("api_head_dim_v_above_dqk", "model1", S(head_dim_v=513), RuntimeError,
      r"head_dim_v must be in \[1, head_dim of q \(512\)\], got 513", call="api"),
    C("api_block_table_out_of_range", "dense", S(block_table=with_entry("block_table", (1, 1), 77)), RuntimeError,
      r"block_table\[1, 1\] = 77 is out of range \[0, 6\)", call="api", values=True),
]


# --------------------------------------------------------------------------------------
# get_mla_metadata
# --------------------------------------------------------------------------------------
def meta_base(d):
    return dict(cache_seqlens=ints(d, LENS), num_q_tokens_per_head_k=SQ * HQ, num_heads_k=1)


def meta_sparse(d):
    kw = meta_base(d)
    kw.update(num_heads_q=HQ, is_fp8_kvcache=True, topk=128, extra_topk=64)
    return kw


META_BASES = dict(base=meta_base, sparse=meta_sparse)


def meta_build(base, call, device):
    return META_BASES[base](device)


def meta_invoke(call):
    return {"op": lambda kw: OP.get_mla_metadata(**kw), "api": lambda kw: flashmla.get_mla_metadata(**kw)}[call]


_META_CS = r"cache_seqlens must be a 1-D int32 tensor \(batch_size,\), got "

META_CASES = [
    C("cache_seqlens_int64", "base", S(cache_seqlens=As("cache_seqlens", I64)), RuntimeError, _META_CS + r"Long \[2\]"),
    C("cache_seqlens_float", "base", S(cache_seqlens=As("cache_seqlens", F32)), RuntimeError, _META_CS + r"Float \[2\]"),
    C("cache_seqlens_2d", "base", S(cache_seqlens=Fn("cache_seqlens", lambda t: t[None])), RuntimeError,
      _META_CS + r"Int \[1, 2\]"),
    C("cache_seqlens_0d", "base", S(cache_seqlens=Fn("cache_seqlens", lambda t: t[0])), RuntimeError,
      _META_CS + r"Int \[\]"),
    C("num_heads_k_0", "base", S(num_heads_k=0), RuntimeError, r"num_heads_k must be in \[1, 2\^31 - 1\], got 0"),
    C("num_heads_k_negative", "sparse", S(num_heads_k=-1), RuntimeError,
      r"num_heads_k must be in \[1, 2\^31 - 1\], got -1"),
    C("num_heads_k_2pow31", "base", S(num_heads_k=2**31), RuntimeError,
      r"num_heads_k must be in \[1, 2\^31 - 1\], got 2147483648"),
    C("num_q_tokens_per_head_k_0", "base", S(num_q_tokens_per_head_k=0), RuntimeError,
      r"num_q_tokens_per_head_k must be in \[1, 2\^31 - 1\], got 0"),
    C("num_q_tokens_per_head_k_2pow32", "sparse", S(num_q_tokens_per_head_k=2**32), RuntimeError,
      r"num_q_tokens_per_head_k must be in \[1, 2\^31 - 1\], got 4294967296"),
    # a negative number of top-k keys is meaningless (it is silently taken as "1 block")
    C("topk_negative", "sparse", S(topk=-5), RuntimeError, r"\btopk\b.*-5"),
    C("api_cache_seqlens_int64", "base", S(cache_seqlens=As("cache_seqlens", I64)), RuntimeError,
      _META_CS + r"Long \[2\]", call="api"),
    C("api_num_heads_k_0", "sparse", S(num_heads_k=0), RuntimeError,
      r"num_heads_k must be in \[1, 2\^31 - 1\], got 0", call="api"),
]


# --------------------------------------------------------------------------------------
# mla_sparse_prefill / flash_mla_sparse_fwd
# --------------------------------------------------------------------------------------
SQP, SKV, PTOPK = 3, 9, 4  # prefill: query rows, kv rows, indices per row


def pre_base(d):
    return dict(q=rnd(d, SQP, HQ, DQK), kv=rnd(d, SKV, 1, DQK), indices=_idx(d, (SQP, 1, PTOPK), SKV),
                sm_scale=0.05, d_v=DV)


def pre_sink(d):
    kw = pre_base(d)
    kw.update(attn_sink=torch.randn(HQ, device=d), topk_length=ints(d, [PTOPK, 0, 2]))
    return kw


PREFILL_BASES = dict(base=pre_base, sink=pre_sink)


def prefill_build(base, call, device):
    return PREFILL_BASES[base](device)


def prefill_invoke(call):
    return {"op": lambda kw: OP.mla_sparse_prefill(**kw), "api": lambda kw: flashmla.flash_mla_sparse_fwd(**kw)}[call]


_PRE_IDX = r"indices must have shape \(seqlen_q, num_heads_kv=1, topk\) = \(3, 1, topk\), got "

PREFILL_CASES = [
    C("q_rank4", "base", S(q=Fn("q", lambda t: t[None])), RuntimeError,
      r"q must be \(seqlen_q, num_heads_q, head_dim\), got shape \[1, 3, 4, 576\]"),
    C("q_rank2", "sink", S(q=Fn("q", lambda t: t[0])), RuntimeError,
      r"q must be \(seqlen_q, num_heads_q, head_dim\), got shape \[4, 576\]"),
    C("q_int32", "base", S(q=lambda kw: torch.ones(SQP, HQ, DQK, dtype=I32, device=dev(kw))), RuntimeError,
      _Q_DTYPE + "Int"),
    C("q_last_dim_strided", "base", S(q=Fn("q", strided_last)), RuntimeError,
      r"q must have a contiguous last dimension \(stride 1\), got stride 2"),
    C("kv_rank4", "base", S(kv=Fn("kv", lambda t: t[None])), RuntimeError,
      r"kv must be \(seqlen_kv, num_heads_kv, head_dim\), got shape \[1, 9, 1, 576\]"),
    C("kv_rank2", "base", S(kv=Fn("kv", lambda t: t[:, 0])), RuntimeError,
      r"kv must be \(seqlen_kv, num_heads_kv, head_dim\), got shape \[9, 576\]"),
    C("kv_heads_2", "base", S(kv=R("kv", SKV, 2, DQK)), RuntimeError, r"kv must have num_heads_kv == 1, got 2"),
    C("kv_0_rows", "base", S(kv=R("kv", 0, 1, DQK)), RuntimeError, r"kv must hold at least one row"),
    C("indices_kv_heads_2", "base", S(indices=lambda kw: _idx(dev(kw), (SQP, 2, PTOPK), SKV)), RuntimeError,
      _PRE_IDX + r"\[3, 2, 4\]"),
    C("indices_wrong_seqlen_q", "base", S(indices=lambda kw: _idx(dev(kw), (SQP + 1, 1, PTOPK), SKV)), RuntimeError,
      _PRE_IDX + r"\[4, 1, 4\]"),
    C("indices_rank2", "sink", S(indices=Fn("indices", lambda t: t[:, 0])), RuntimeError, _PRE_IDX + r"\[3, 4\]"),
    C("indices_int64", "base", S(indices=As("indices", I64)), RuntimeError, r"indices must be int32, got Long"),
    C("topk_length_2_entries", "sink", S(topk_length=I([1, 2])), RuntimeError,
      r"topk_length must have 3 entries, got 2"),
    C("topk_length_int64", "sink", S(topk_length=As("topk_length", I64)), RuntimeError,
      r"topk_length must be int32, got Long"),
    C("topk_length_above_topk", "sink", S(topk_length=I([PTOPK, PTOPK + 3, 0])), RuntimeError,
      r"topk_length\[1\].*7.*\[0, 4\]", values=True),
    C("attn_sink_3_heads", "sink", S(attn_sink=lambda kw: torch.randn(3, device=dev(kw))), RuntimeError,
      r"attn_sink must have shape \(num_heads_q,\) = \(4,\), got \[3\]"),
    # the prefill's own argument names (kv, d_v, sm_scale), not mla_decode's (k_cache, head_dim_v,
    # softmax_scale), must appear in its messages
    C("kv_fp16_q_bf16", "base", S(kv=As("kv", F16)), RuntimeError, r"\bkv\b.*dtype of q"),
    C("kv_head_dim_512", "base", S(kv=R("kv", SKV, 1, 512)), RuntimeError, r"\bkv\b.*head_dim.*\b576\b"),
    C("d_v_above_dqk", "base", S(d_v=DQK + 1), RuntimeError, r"\bd_v\b.*\b576\b.*577"),
    C("sm_scale_nan", "base", S(sm_scale=float("nan")), RuntimeError, r"\bsm_scale\b.*finite"),
    C("api_q_rank4", "sink", S(q=Fn("q", lambda t: t[None])), RuntimeError,
      r"q must be \(seqlen_q, num_heads_q, head_dim\), got shape \[1, 3, 4, 576\]", call="api"),
    C("api_kv_heads_2", "base", S(kv=R("kv", SKV, 2, DQK)), RuntimeError,
      r"kv must have num_heads_kv == 1, got 2", call="api"),
    C("api_indices_kv_heads_2", "sink", S(indices=lambda kw: _idx(dev(kw), (SQP, 2, PTOPK), SKV)), RuntimeError,
      _PRE_IDX + r"\[3, 2, 4\]", call="api"),
]


# --------------------------------------------------------------------------------------
# BatchMLAPagedAttentionWrapper (plan + run)
# --------------------------------------------------------------------------------------
FI_QLENS, FI_PAGES = [2, 3], [[5, 0, 3], [1, 4]]  # sequence 0: 2 queries, 3 pages; sequence 1: 3, 2
FI_TQ = sum(FI_QLENS)
_RUN_KEYS = ("q_nope", "q_pe", "ckv_cache", "kpe_cache")


def fi_base(d):
    """plan() and run() arguments in one dict ("_plan": whether plan() is called)."""
    return dict(qo_indptr=ints(d, [0, 2, 5]), kv_indptr=ints(d, [0, 3, 5]), kv_indices=ints(d, [5, 0, 3, 1, 4]),
                kv_len_arr=ints(d, LENS), num_heads=HQ, head_dim_ckv=512, head_dim_kpe=64, page_size=P,
                causal=True, sm_scale=0.05, q_data_type=BF16, kv_data_type=BF16,
                q_nope=rnd(d, FI_TQ, HQ, 512), q_pe=rnd(d, FI_TQ, HQ, 64), ckv_cache=rnd(d, NB, P, 512),
                kpe_cache=rnd(d, NB, P, 64), _plan=True)


FI_BASES = dict(base=fi_base)


def fi_build(base, call, device):
    return FI_BASES[base](device)


def fi_invoke(call):
    def invoke(kw):
        w = BatchMLAPagedAttentionWrapper(torch.empty(16, dtype=U8, device=dev(kw)))
        if kw["_plan"]:
            w.plan(**{k: v for k, v in kw.items() if k not in _RUN_KEYS and k != "_plan"})
        return w.run(*(kw[k] for k in _RUN_KEYS), return_lse=True)

    return invoke


_SAME_BATCH = r"qo_indptr \(3\), kv_indptr \(\d\) and kv_len_arr \(\d\) must describe the same batch"

FI_CASES = [
    C("run_before_plan", "base", S(_plan=False), RuntimeError, r"call plan\(\) before run\(\)", call="fi"),
    C("kv_indptr_4_entries", "base", S(kv_indptr=I([0, 3, 5, 5])), ValueError,
      _SAME_BATCH + r": B \+ 1, B \+ 1 and B entries", call="fi"),
    C("kv_len_arr_3_entries", "base", S(kv_len_arr=I([10, 7, 1])), ValueError, _SAME_BATCH, call="fi"),
    C("qo_indptr_2_entries", "base", S(qo_indptr=I([0, 5])), ValueError,
      r"qo_indptr \(2\), kv_indptr \(3\) and kv_len_arr \(2\) must describe the same batch", call="fi"),
    C("kv_len_beyond_pages", "base", S(kv_len_arr=I([10, 9])), ValueError,
      r"kv_len_arr\[1\] = 9 needs more than the 2 pages of size 4 given to sequence 1", call="fi"),
    C("kv_len_beyond_pages_first", "base", S(kv_len_arr=I([13, 7])), ValueError,
      r"kv_len_arr\[0\] = 13 needs more than the 3 pages of size 4 given to sequence 0", call="fi"),
    C("page_size_0", "base", S(page_size=0), ValueError, r"page_size must be >= 1, got 0", call="fi"),
    # errors that plan() can see, reported by plan() with its own argument names
    C("kv_len_arr_negative", "base", S(kv_len_arr=I([-3, 7])), ValueError, r"kv_len_arr entries must be >= 0", call="fi"),
    C("qo_indptr_decreasing", "base", S(qo_indptr=I([0, 3, 2])), ValueError, r"qo_indptr", call="fi"),
    # errors only run() can see, reported with the wrapper's argument names (not fmha_fwd's)
    C("kv_indices_out_of_range", "base", S(kv_indices=I([5, 0, 3, 1, 9])), ValueError,
      r"kv_indices.*\b9\b.*out of range", call="fi", values=True),
    C("qo_indptr_beyond_queries", "base", S(qo_indptr=I([0, 2, 7])), ValueError,
      r"qo_indptr.*\b7\b.*\b5\b", call="fi"),
    C("q_nope_fp16", "base", S(q_nope=As("q_nope", F16)), ValueError, r"\bq_nope\b", call="fi"),
    C("ckv_cache_fp16", "base", S(ckv_cache=As("ckv_cache", F16)), ValueError, r"\bckv_cache\b", call="fi"),
    C("kpe_cache_5_pages", "base", S(kpe_cache=R("kpe_cache", NB - 1, P, 64)), ValueError,
      r"\bkpe_cache\b", call="fi"),
    C("q_pe_4_rows", "base", S(q_pe=R("q_pe", FI_TQ - 1, HQ, 64)), ValueError, r"\bq_pe\b", call="fi"),
    # run() with tensors that contradict the plan: must not silently compute something else
    C("run_heads_differ_from_plan", "base", S(q_nope=R("q_nope", FI_TQ, 2 * HQ, 512), q_pe=R("q_pe", FI_TQ, 2 * HQ, 64)),
      ValueError, r"num_heads", call="fi"),
    C("run_page_size_differs_from_plan", "base",
      S(ckv_cache=R("ckv_cache", NB, 2 * P, 512), kpe_cache=R("kpe_cache", NB, 2 * P, 64)), ValueError,
      r"page_size", call="fi"),
    C("run_head_dim_ckv_differs_from_plan", "base",
      S(q_nope=R("q_nope", FI_TQ, HQ, 256), ckv_cache=R("ckv_cache", NB, P, 256)), ValueError,
      r"head_dim_ckv", call="fi"),
]


FAMILIES = {
    "decode": (DECODE_CASES, decode_build, decode_invoke),
    "metadata": (META_CASES, meta_build, meta_invoke),
    "prefill": (PREFILL_CASES, prefill_build, prefill_invoke),
    "flashinfer": (FI_CASES, fi_build, fi_invoke),
}


# --------------------------------------------------------------------------------------
# baselines succeed (so no table passes vacuously)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("base,call", sorted(set(_calls_used(DECODE_CASES) + [(b, c) for b in DECODE_BASES
                                                                               for c in ("op", "api")])))
def test_decode_baseline_succeeds(base, call, device):
    kw = decode_build(base, call, device)
    out, lse = decode_invoke(call)(kw)
    q = kw["q"]
    assert out.shape == (*q.shape[:-1], kw["head_dim_v"]) and out.dtype == q.dtype
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == F32
    assert out.float().isfinite().all() and not lse.isnan().any()
    if base in ("dense", "sparse", "model1"):  # and it is the right answer
        ref_kw = {k: v for k, v in kw.items() if k not in ("tile_scheduler_metadata", "num_splits")}
        out_ref, lse_ref = mla_decode_ref(**ref_kw)
        torch.testing.assert_close(out.float(), out_ref.float(), atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(lse, lse_ref, atol=1e-2, rtol=1e-3)


@pytest.mark.parametrize("base,call", sorted(set(_calls_used(META_CASES) + [(b, c) for b in META_BASES
                                                                             for c in ("op", "api")])))
def test_metadata_baseline_succeeds(base, call, device):
    kw = meta_build(base, call, device)
    meta, splits = meta_invoke(call)(kw)
    assert meta.dtype == I32 and meta.dim() == 2 and meta.shape[1] == 8
    assert splits.dtype == I32 and splits.shape == (B + 1,)


@pytest.mark.parametrize("base,call", sorted(set(_calls_used(PREFILL_CASES) + [(b, c) for b in PREFILL_BASES
                                                                                for c in ("op", "api")])))
def test_prefill_baseline_succeeds(base, call, device):
    kw = prefill_build(base, call, device)
    out, max_logits, lse = prefill_invoke(call)(kw)
    assert out.shape == (SQP, HQ, DV) and max_logits.shape == lse.shape == (SQP, HQ)
    assert out.float().isfinite().all() and not lse.isnan().any()


def test_flashinfer_baseline_succeeds(device):
    kw = fi_build("base", "fi", device)
    out, lse = fi_invoke("fi")(kw)
    assert out.shape == (FI_TQ, HQ, 512) and lse.shape == (FI_TQ, HQ)
    assert out.float().isfinite().all() and lse.isfinite().all()


def test_unread_block_table_entries_may_be_garbage(device):
    """Entries past a sequence's last block are never read, so they are not checked (the
    FMHA page-table rule): sequence 1 (7 keys) reads 2 of its 3 columns."""
    kw = dec_dense(device)
    ref = OP.mla_decode(**kw)
    kw["block_table"] = with_entry("block_table", (1, 2), 2**31 - 1)(kw)
    for a, b in zip(OP.mla_decode(**kw), ref):
        assert _same(a, b)


def test_tables_cover_every_family_and_call():
    for name, (cases, _, _) in FAMILIES.items():
        assert len(cases) >= 10, name
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


@pytest.mark.parametrize("base,mutate,exc,match,call,values", DECODE_CASES)
def test_mla_decode_bad_input(base, mutate, exc, match, call, values, device):
    _run_case("decode", base, mutate, exc, match, call, values, device)


@pytest.mark.parametrize("base,mutate,exc,match,call,values", META_CASES)
def test_get_mla_metadata_bad_input(base, mutate, exc, match, call, values, device):
    _run_case("metadata", base, mutate, exc, match, call, values, device)


@pytest.mark.parametrize("base,mutate,exc,match,call,values", PREFILL_CASES)
def test_mla_sparse_prefill_bad_input(base, mutate, exc, match, call, values, device):
    _run_case("prefill", base, mutate, exc, match, call, values, device)


@pytest.mark.parametrize("base,mutate,exc,match,call,values", FI_CASES)
def test_flashinfer_mla_bad_input(base, mutate, exc, match, call, values, device):
    _run_case("flashinfer", base, mutate, exc, match, call, values, device)


# --------------------------------------------------------------------------------------
# the process is still fine after every bad call
# --------------------------------------------------------------------------------------
def _valid_calls(device):
    torch.manual_seed(42)
    return [OP.mla_decode(**dec_dense(device)), OP.mla_decode(**dec_v32_sparse(device)),
            OP.mla_decode(**dec_model1(device)), OP.mla_sparse_prefill(**pre_sink(device)),
            OP.get_mla_metadata(**meta_sparse(device))]


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
            n += 1
    after = _valid_calls(device)
    for x, y in zip(ref, after):
        for a, b in zip(x, y):
            assert _same(a, b), "a valid MLA call gives a different result after the bad calls"
    assert n > 100


# --------------------------------------------------------------------------------------
# BatchMLAPagedAttentionWrapper.run(out=, lse=): wrong buffers are rejected up front with a
# ValueError naming the buffer and the expected shape/dtype, and are left untouched
# --------------------------------------------------------------------------------------
_FI_BAD_BUFFERS = [
    ("out", lambda d: torch.empty(FI_TQ, HQ, 511, dtype=BF16, device=d),
     rf"out must have shape \({FI_TQ}, {HQ}, 512\) \(q_nope rows, num_heads, head_dim_ckv\), "
     rf"got \({FI_TQ}, {HQ}, 511\)"),
    ("out", lambda d: torch.empty(FI_TQ + 1, HQ, 512, dtype=BF16, device=d),
     rf"out must have shape \({FI_TQ}, {HQ}, 512\) .*got \({FI_TQ + 1}, {HQ}, 512\)"),
    ("out", lambda d: torch.empty(FI_TQ, HQ * 512, dtype=BF16, device=d),
     rf"out must have shape \({FI_TQ}, {HQ}, 512\) .*got \({FI_TQ}, {HQ * 512}\)"),
    ("out", lambda d: torch.empty(FI_TQ, HQ, 512, dtype=torch.float32, device=d),
     r"out must have dtype torch.bfloat16 \(q_nope dtype\), got torch.float32"),
    ("lse", lambda d: torch.empty(HQ, FI_TQ, dtype=torch.float32, device=d),
     rf"lse must have shape \({FI_TQ}, {HQ}\) \(q_nope rows, num_heads\), got \({HQ}, {FI_TQ}\)"),
    ("lse", lambda d: torch.empty(FI_TQ, HQ, dtype=BF16, device=d),
     r"lse must have dtype torch.float32, got torch.bfloat16"),
]


@pytest.mark.parametrize("name,make,match", _FI_BAD_BUFFERS,
                         ids=[f"{n}_{i}" for i, (n, _, _) in enumerate(_FI_BAD_BUFFERS)])
def test_flashinfer_run_rejects_bad_out_lse(name, make, match, device):
    kw = fi_build("base", "fi", device)
    w = BatchMLAPagedAttentionWrapper(torch.empty(16, dtype=U8, device=device))
    w.plan(**{k: v for k, v in kw.items() if k not in _RUN_KEYS and k != "_plan"})
    buf = make(device)
    buf.fill_(7)
    with pytest.raises(ValueError, match=match):
        w.run(*(kw[k] for k in _RUN_KEYS), return_lse=True, **{name: buf})
    assert (buf == 7).all(), f"a rejected {name} buffer was written"
    # the right buffers are accepted and written in place
    out = torch.full((FI_TQ, HQ, 512), float("nan"), dtype=BF16, device=device)
    lse = torch.full((FI_TQ, HQ), float("nan"), dtype=torch.float32, device=device)
    o, l = w.run(*(kw[k] for k in _RUN_KEYS), out=out, lse=lse, return_lse=True)
    assert o.data_ptr() == out.data_ptr() and l.data_ptr() == lse.data_ptr()
    assert out.float().isfinite().all() and lse.isfinite().all()
