"""Registration tests of the MLA family (SEMANTICS §3, §4; docs/design.md "Testing"):

- ``torch.library.opcheck`` of ``get_mla_metadata``, ``mla_decode`` (dense bf16 causal with
  scheduler metadata, dense GQA Hkv=2, sparse with topk_length + extra cache + attn_sink,
  FP8 V3.2 sparse, FP8 MODEL1 dense) and ``mla_sparse_prefill`` (with and without
  attn_sink / topk_length). FP8 caches are uint8 tensors, so the standard opcheck applies;
  the one exception is the MODEL1 cache, which is a *non-dense* strided view (block stride
  rounded up to a multiple of 576): opcheck's test_aot_dispatch_dynamic clones every input
  (``torch.clone`` of a non-dense view is contiguous, which is no longer a MODEL1 view and
  is rejected), so that case runs the other three opcheck utils and checks AOT dispatch
  separately through a flat byte buffer viewed inside the compiled function;
- ``torch.compile(fullgraph=True, dynamic=True)`` with a compile counter, one graph over
  >= 4 calls with different batch sizes and cache lengths, results bitwise equal to eager
  (and close to the fp64 oracle): a FlashMLA decode step (get_mla_metadata +
  flash_mla_with_kvcache), ``BatchMLAPagedAttentionWrapper.run`` after ``plan`` (plan outside
  the compiled function), ``flash_mla_sparse_fwd`` and an FP8 MODEL1 decode;
- ``torch.export.export`` round trip of a module calling flash_mla_with_kvcache.

Small shapes: the file runs in well under a minute on 2 CPU cores.

    cd /work/main && python3 -m pytest -q tests/test_mla_compile.py
"""
import pytest
import torch
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend
from torch._dynamo.utils import counters
from torch.export import Dim

import mate_ops  # noqa: F401  (registers torch.ops.mate.* and the fake kernels)
from mate_ops.flashinfer import BatchMLAPagedAttentionWrapper
from mate_ops.flashmla import flash_mla_sparse_fwd, flash_mla_with_kvcache, get_mla_metadata
from mate_ops.testing import (
    assert_close_fa3,
    make_paged_kv,
    mla_decode_ref,
    mla_model1_block_stride,
    mla_paged_ref,
    mla_sparse_prefill_ref,
    quantize_mla_model1,
    quantize_mla_v32,
)
from test_compile import _NO_SCHEMA_UTILS, _opcheck  # noqa: E402  (tests/ is on sys.path)


DEVICE_OPS = ("mate::mla_decode", "mate::mla_sparse_prefill", "mate::get_mla_metadata")

MATE = torch.ops.mate
BF16, F16, I32 = torch.bfloat16, torch.float16, torch.int32
DQK, DV = 576, 512  # latent 512 + rope 64; V = the first 512 channels


def _rand(*shape, dtype=BF16, device="cpu"):
    return torch.randn(*shape, dtype=torch.float32, device=device).to(dtype)


def _i32(values, device):
    return torch.tensor(values, dtype=I32, device=device)


def _paged_latent(lens, page, heads_k=1, dqk=DQK, dtype=BF16, device="cpu"):
    """A paged latent cache holding ``lens[b]`` keys of sequence b (pages randomly
    permuted, unused slots NaN-poisoned) and its block table."""
    dense = _rand(len(lens), max(lens), heads_k, dqk, dtype=dtype, device=device)
    cache, _, block_table = make_paged_kv(dense, dense, lens, page)
    return cache, block_table


def _indices(batch, seqlen_q, topk, num_slots, device):
    """int32 (B, Sq, topk) slots, mostly valid, with -1 and out-of-range entries mixed in."""
    idx = torch.randint(0, num_slots, (batch, seqlen_q, topk), dtype=I32)
    idx[..., 0] = -1
    if topk > 2:
        idx[..., 2] = num_slots + 3  # out of range: ignored
    return idx.to(device)


def _model1_flat(cache):
    """The flat byte buffer under a MODEL1 view (what a compiled graph can take as input)."""
    n = cache.shape[0] * cache.stride(0)
    assert cache.storage_offset() == 0 and cache.untyped_storage().nbytes() == n
    return torch.as_strided(cache, (n,), (1,), 0)


def _model1_view(flat, num_blocks, page):
    stride = mla_model1_block_stride(page)
    return torch.as_strided(flat, (num_blocks, page, 1, 584), (stride, 584, 584, 1))


# ============================================================================ opcheck
def _meta_basic(device):
    return (_i32([10, 7, 33], device), 8, 1), {}


def _meta_sparse_fp8(device):
    return (_i32([300, 0], device), 64, 1), dict(num_heads_q=64, is_fp8_kvcache=True, topk=128, extra_topk=64)


def _meta_gqa_many_q_tokens(device):  # m_blocks = 3: fewer parts
    return (_i32([5, 129, 64, 1], device), 130, 2), dict(num_heads_q=8)


META_CASES = {"basic": _meta_basic, "sparse_fp8": _meta_sparse_fp8, "gqa_many_q_tokens": _meta_gqa_many_q_tokens}


@pytest.mark.parametrize("case", list(META_CASES))
def test_opcheck_get_mla_metadata(device, case):
    args, kwargs = META_CASES[case](device)
    _opcheck(MATE.get_mla_metadata.default, args, kwargs)


def _dec_dense_bf16_causal(device):  # with the scheduler metadata of get_mla_metadata
    lens = [10, 7]
    k_cache, block_table = _paged_latent(lens, 4, device=device)
    q = _rand(2, 3, 4, DQK, device=device)
    cache_seqlens = _i32(lens, device)
    meta, splits = MATE.get_mla_metadata(cache_seqlens, 3 * 4, 1)
    return (q, k_cache, block_table, cache_seqlens, DV, meta, splits), dict(causal=True)


def _dec_dense_gqa_hkv2(device):  # Hq 4 over Hkv 2, fp16, explicit scale, non-causal
    lens = [9, 14]
    k_cache, block_table = _paged_latent(lens, 8, heads_k=2, dtype=F16, device=device)
    q = _rand(2, 2, 4, DQK, dtype=F16, device=device)
    return (q, k_cache, block_table, _i32(lens, device), DV), dict(softmax_scale=0.05)


def _dec_sparse_extra_sink(device):
    q = _rand(2, 2, 4, DQK, device=device)
    k_cache = _rand(6, 4, 1, DQK, device=device)
    extra = _rand(3, 8, 1, DQK, device=device)  # its own page size
    return (q, k_cache, None, None, DV), dict(
        indices=_indices(2, 2, 6, 24, device), topk_length=_i32([6, 3], device),
        attn_sink=torch.randn(4, device=device), extra_k_cache=extra,
        extra_indices_in_kvcache=_indices(2, 2, 4, 24, device), extra_topk_length=_i32([4, 0], device))


def _dec_fp8_v32_sparse(device):
    q = _rand(2, 2, 4, DQK, device=device)
    k_cache = quantize_mla_v32(_rand(5, 4, 1, DQK, device=device))
    assert k_cache.dtype == torch.uint8
    return (q, k_cache, None, None, DV), dict(
        is_fp8_kvcache=True, indices=_indices(2, 2, 5, 20, device), topk_length=_i32([5, 4], device),
        attn_sink=torch.randn(4, device=device))


def _dec_fp8_model1_dense(device):
    lens = [10, 5]
    kv, block_table = _paged_latent(lens, 4, dqk=512, device=device)
    kv = torch.nan_to_num(kv)  # the quantizer refuses non-finite values (the poisoned slots)
    k_cache = quantize_mla_model1(kv)
    q = _rand(2, 2, 4, 512, device=device)
    return (q, k_cache, block_table, _i32(lens, device), DV), dict(is_fp8_kvcache=True, causal=True)


DECODE_CASES = {
    "dense_bf16_causal_metadata": _dec_dense_bf16_causal,
    "dense_gqa_hkv2_fp16": _dec_dense_gqa_hkv2,
    "sparse_topk_length_extra_sink": _dec_sparse_extra_sink,
    "fp8_v32_sparse": _dec_fp8_v32_sparse,
}


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_opcheck_mla_decode(device, case):
    args, kwargs = DECODE_CASES[case](device)
    _opcheck(MATE.mla_decode.default, args, kwargs)


def test_opcheck_mla_decode_fp8_model1(device):
    """MODEL1: every opcheck util but test_aot_dispatch_dynamic, whose input clones turn the
    non-dense block view into a contiguous (invalid) cache; AOT dispatch with dynamic shapes
    is checked by compiling over the flat buffer instead."""
    args, kwargs = _dec_fp8_model1_dense(device)
    k_cache = args[1]
    assert not k_cache.is_contiguous() and k_cache.stride(0) == mla_model1_block_stride(4)
    torch.library.opcheck(MATE.mla_decode.default, args, kwargs,
                          test_utils=("test_schema",) + _NO_SCHEMA_UTILS[:2])
    # what test_aot_dispatch_dynamic would check, with a dense graph input
    q, _, block_table, cache_seqlens, dv = args

    def f(q, flat, block_table, cache_seqlens):
        cache = _model1_view(flat, k_cache.shape[0], 4)
        return MATE.mla_decode(q, cache, block_table, cache_seqlens, dv, **kwargs)

    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, backend=cnt, fullgraph=True, dynamic=True)
    flat = _model1_flat(k_cache)
    out, lse = compiled(q, flat, block_table, cache_seqlens)
    out_e, lse_e = MATE.mla_decode(*args, **kwargs)
    torch.testing.assert_close(out, out_e, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse_e, rtol=0, atol=0)
    assert cnt.frame_count == 1


def _pre_plain(device):
    q = _rand(5, 4, DQK, device=device)
    kv = _rand(11, 1, DQK, device=device)
    return (q, kv, _indices(5, 1, 6, 11, device).view(5, 1, 6), 0.06, DV), {}


def _pre_sink_topk_length(device):
    (q, kv, idx, scale, dv), _ = _pre_plain(device)
    return (q, kv, idx, scale, dv), dict(attn_sink=torch.randn(4, device=device),
                                         topk_length=_i32([6, 0, 3, 1, 5], device))


def _pre_dv_small_fp16(device):
    q = _rand(3, 2, 64, dtype=F16, device=device)
    kv = _rand(7, 1, 64, dtype=F16, device=device)
    return (q, kv, _indices(3, 1, 4, 7, device), 0.125, 32), {}


PREFILL_CASES = {"plain": _pre_plain, "sink_topk_length": _pre_sink_topk_length, "dv32_fp16": _pre_dv_small_fp16}


@pytest.mark.parametrize("case", list(PREFILL_CASES))
def test_opcheck_mla_sparse_prefill(device, case):
    args, kwargs = PREFILL_CASES[case](device)
    _opcheck(MATE.mla_sparse_prefill.default, args, kwargs)


# ============================================================================ torch.compile
# First call: every size distinct (B 3, Sq 2, Hq 4, max_blocks 5, num_blocks 8, P 16, D 576),
# so no accidental duck-sized symbols; no later batch has size 0 or 1 (0/1 specialization).
DECODE_BATCHES = [
    [13, 70, 7],
    [40, 3, 99, 17, 64],
    [120, 33],
    [5, 16, 80, 2, 31, 47],
]
PAGE, SQ, HQ = 16, 2, 4


def _decode_inputs(lens, device):
    k_cache, block_table = _paged_latent(lens, PAGE, device=device)
    return _rand(len(lens), SQ, HQ, DQK, device=device), k_cache, block_table, _i32(lens, device)


def _flashmla_step(q, k_cache, block_table, cache_seqlens):
    """One FlashMLA decode step: metadata, then attention (what a model's decode loop runs)."""
    heads_k = k_cache.shape[2]
    meta, splits = get_mla_metadata(cache_seqlens, q.shape[1] * q.shape[2] // heads_k, heads_k)
    return flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, DV, meta, splits, causal=True)


def _check_decode_oracle(out, lse, q, k_cache, block_table, cache_seqlens, **kw):
    out_ref, lse_ref = mla_decode_ref(q, k_cache, block_table, cache_seqlens, DV, **kw)
    out_low, lse_low = mla_decode_ref(q, k_cache, block_table, cache_seqlens, DV, compute_dtype=q.dtype, **kw)
    assert_close_fa3(out, out_ref, out_low)
    assert_close_fa3(lse, lse_ref, lse_low, name="lse", input_dtype=torch.float32)


def test_compile_flashmla_decode_dynamic_no_recompile(device):
    torch._dynamo.reset()
    cnt = CompileCounter()
    step = torch.compile(_flashmla_step, backend=cnt, fullgraph=True, dynamic=True)
    for i, lens in enumerate(DECODE_BATCHES):
        q, k_cache, block_table, cache_seqlens = _decode_inputs(lens, device)
        out, lse = step(q, k_cache, block_table, cache_seqlens)
        out_e, lse_e = _flashmla_step(q, k_cache, block_table, cache_seqlens)
        assert out.shape == (len(lens), SQ, HQ, DV) and lse.shape == (len(lens), HQ, SQ)
        torch.testing.assert_close(out, out_e, rtol=0, atol=0)
        torch.testing.assert_close(lse, lse_e, rtol=0, atol=0)
        if i < 2:
            _check_decode_oracle(out, lse, q, k_cache, block_table, cache_seqlens, causal=True)
    assert cnt.frame_count == 1, f"expected 1 compile over {len(DECODE_BATCHES)} batches, got {cnt.frame_count}"
    assert cnt.op_count >= 2  # get_mla_metadata + mla_decode in the graph


def test_compile_flashmla_decode_inductor(device):
    """The same step under inductor (one graph, equal to eager)."""
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(_flashmla_step, fullgraph=True, dynamic=True)
    for lens in DECODE_BATCHES[:3]:
        inputs = _decode_inputs(lens, device)
        out, lse = step(*inputs)
        out_e, lse_e = _flashmla_step(*inputs)
        torch.testing.assert_close(out, out_e, rtol=0, atol=0)
        torch.testing.assert_close(lse, lse_e, rtol=0, atol=0)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


# FP8 MODEL1 decode: the graph takes the flat byte buffer and views it (see the module doc).
def test_compile_flashmla_fp8_model1_dynamic_no_recompile(device):
    def step(q, flat, block_table, cache_seqlens, num_blocks):
        cache = _model1_view(flat, num_blocks, 4)
        meta, splits = get_mla_metadata(cache_seqlens, q.shape[1] * q.shape[2], 1, is_fp8_kvcache=True)
        return flash_mla_with_kvcache(q, cache, block_table, cache_seqlens, DV, meta, splits,
                                      causal=True, is_fp8_kvcache=True)

    torch._dynamo.reset()
    cnt = CompileCounter()
    compiled = torch.compile(step, backend=cnt, fullgraph=True, dynamic=True)
    for lens in ([13, 6, 22], [9, 30], [4, 17, 8, 25]):
        kv, block_table = _paged_latent(lens, 4, dqk=512, device=device)
        cache = quantize_mla_model1(torch.nan_to_num(kv))
        q = _rand(len(lens), SQ, HQ, 512, device=device)
        cs = _i32(lens, device)
        args = (q, _model1_flat(cache), block_table, cs, cache.shape[0])
        out, lse = compiled(*args)
        out_e, lse_e = step(*args)
        torch.testing.assert_close(out, out_e, rtol=0, atol=0)
        torch.testing.assert_close(lse, lse_e, rtol=0, atol=0)
    assert cnt.frame_count == 1, cnt.frame_count


# FlashInfer wrapper: plan outside, run inside the compiled function. Per batch: query rows
# per sequence, key lengths. First plan: every size distinct (B 3, B + 1 4, max_pages 5,
# max_seqlen_q 6, H 7, pages 8, total_q 9, P 16), so no accidental duck-sized symbols.
FI_BATCHES = [
    ([2, 1, 6], [13, 70, 7]),
    ([1, 3, 2, 2, 5], [40, 3, 99, 17, 64]),
    ([6, 2], [120, 33]),
    ([1, 1, 2, 3, 1, 2], [5, 16, 80, 2, 31, 47]),
]
FI_H = 7


def _fi_problem(qlens, klens, device):
    num_pages_each = [(k + PAGE - 1) // PAGE for k in klens]
    num_pages = sum(num_pages_each) + 1
    perm = torch.randperm(num_pages)
    kv_indices = perm[: sum(num_pages_each)].to(I32)
    qo_indptr = torch.tensor([0] + qlens, dtype=I32).cumsum(0).to(I32)
    kv_indptr = torch.tensor([0] + num_pages_each, dtype=I32).cumsum(0).to(I32)
    tq = sum(qlens)
    tensors = dict(q_nope=_rand(tq, FI_H, 512, device=device), q_pe=_rand(tq, FI_H, 64, device=device),
                   ckv_cache=_rand(num_pages, PAGE, 512, device=device),
                   kpe_cache=_rand(num_pages, PAGE, 64, device=device))
    plan = dict(qo_indptr=qo_indptr.to(device), kv_indptr=kv_indptr.to(device), kv_indices=kv_indices.to(device),
                kv_len_arr=_i32(klens, device))
    return tensors, plan


def _fi_plan(wrapper, plan):
    wrapper.plan(plan["qo_indptr"], plan["kv_indptr"], plan["kv_indices"], plan["kv_len_arr"], FI_H, 512, 64,
                 PAGE, True, 0.07, BF16, BF16)


class _WrapperRunner(torch.nn.Module):
    """A model layer holding the wrapper as an attribute (how serving code keeps it)."""

    def __init__(self, wrapper):
        super().__init__()
        self.wrapper = wrapper

    def forward(self, q_nope, q_pe, ckv_cache, kpe_cache):
        return self.wrapper.run(q_nope, q_pe, ckv_cache, kpe_cache, return_lse=True)


def _compile_flashinfer_runs(batches, device, holder):
    """plan() outside, run() inside one compiled function (the wrapper reached through a
    closure, or as an nn.Module attribute), for each batch; returns the number of compiles."""
    torch._dynamo.reset()
    wrapper = BatchMLAPagedAttentionWrapper(torch.empty(16, dtype=torch.uint8, device=device))
    cnt = CompileCounter()
    if holder == "closure":
        @torch.compile(backend=cnt, fullgraph=True, dynamic=True)
        def run(q_nope, q_pe, ckv_cache, kpe_cache):
            return wrapper.run(q_nope, q_pe, ckv_cache, kpe_cache, return_lse=True)
    else:
        run = torch.compile(_WrapperRunner(wrapper), backend=cnt, fullgraph=True, dynamic=True)

    for i, (qlens, klens) in enumerate(batches):
        t, plan = _fi_problem(qlens, klens, device)
        _fi_plan(wrapper, plan)
        out, lse = run(**t)
        out_e, lse_e = wrapper.run(**t, return_lse=True)
        torch.testing.assert_close(out, out_e, rtol=0, atol=0)
        torch.testing.assert_close(lse, lse_e, rtol=0, atol=0)
        if i < 2:
            args = (t["q_nope"], t["q_pe"], t["ckv_cache"], t["kpe_cache"], plan["qo_indptr"], plan["kv_indptr"],
                    plan["kv_indices"], plan["kv_len_arr"], 0.07, True)
            out_ref, lse_ref = mla_paged_ref(*args)
            out_low, lse_low = mla_paged_ref(*args, compute_dtype=BF16)
            assert_close_fa3(out, out_ref, out_low)
            assert_close_fa3(lse, lse_ref, lse_low, name="lse", input_dtype=torch.float32)
    return cnt.frame_count


@pytest.mark.parametrize("holder", ["closure", "module_attr"])
def test_compile_flashinfer_run_after_plan_no_recompile(device, holder):
    """Plans of different batch sizes, key lengths, page counts and max query lengths: one
    graph. (The plan keeps max_seqlen_q as a Python int; read through an nn.Module attribute,
    dynamo specializes it, so every new max query length would recompile.)"""
    frames = _compile_flashinfer_runs(FI_BATCHES, device, holder)
    max_q = [max(q) for q, _ in FI_BATCHES]
    assert frames == 1, (f"expected 1 compile over {len(FI_BATCHES)} plans, got {frames} "
                         f"(plans' max query lengths {max_q})")


@pytest.mark.parametrize("holder", ["closure", "module_attr"])
def test_compile_flashinfer_run_after_plan_same_max_qlen(device, holder):
    """The same with every plan's max query length equal (6): separates the max_seqlen_q
    specialization from the tensor sizes, which are all dynamic."""
    batches = [(q if max(q) == 6 else q[:-1] + [6], k) for q, k in FI_BATCHES]
    assert len({max(q) for q, _ in batches}) == 1
    assert _compile_flashinfer_runs(batches, device, holder) == 1


# Sparse prefill. First call: Sq 5, Hq 4 (fixed), Skv 11, topk 6, D 576 all distinct.
PREFILL_BATCHES = [(5, 11, 6), (9, 30, 7), (3, 8, 12), (14, 40, 3)]


def test_compile_flash_mla_sparse_fwd_no_recompile(device):
    torch._dynamo.reset()
    cnt = CompileCounter()

    def prefill(q, kv, indices, attn_sink, topk_length):
        return flash_mla_sparse_fwd(q, kv, indices, 0.05, DV, attn_sink=attn_sink, topk_length=topk_length)

    compiled = torch.compile(prefill, backend=cnt, fullgraph=True, dynamic=True)
    for i, (sq, skv, topk) in enumerate(PREFILL_BATCHES):
        q, kv = _rand(sq, 4, DQK, device=device), _rand(skv, 1, DQK, device=device)
        indices = _indices(sq, 1, topk, skv, device)
        sink = torch.randn(4, device=device)
        topk_length = torch.randint(0, topk + 1, (sq,), dtype=I32).to(device)
        res = compiled(q, kv, indices, sink, topk_length)
        res_e = prefill(q, kv, indices, sink, topk_length)
        for a, b in zip(res, res_e):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        if i == 0:
            ref = mla_sparse_prefill_ref(q, kv, indices, 0.05, DV, attn_sink=sink, topk_length=topk_length)
            low = mla_sparse_prefill_ref(q, kv, indices, 0.05, DV, attn_sink=sink, topk_length=topk_length,
                                         compute_dtype=BF16)
            for name, a, r, lo in zip(("out", "max_logits", "lse"), res, ref, low):
                assert_close_fa3(a, r, lo, name=name, input_dtype=torch.float32 if name != "out" else None)
    assert cnt.frame_count == 1, cnt.frame_count


# ============================================================================ export
class MlaDecodeBlock(torch.nn.Module):
    """q projection -> FlashMLA decode (metadata included) -> output projection."""

    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(32, HQ * DQK, dtype=BF16)
        self.o_proj = torch.nn.Linear(HQ * DV, 16, dtype=BF16)

    def forward(self, x, k_cache, block_table, cache_seqlens):
        b, s = x.shape[0], x.shape[1]
        q = self.q_proj(x).view(b, s, HQ, DQK)
        out, lse = _flashmla_step(q, k_cache, block_table, cache_seqlens)
        return self.o_proj(out.reshape(b, s, HQ * DV)), lse


def test_export_flash_mla_with_kvcache_round_trip(device):
    model = MlaDecodeBlock().to(device).eval()

    def inputs(lens):
        q, k_cache, block_table, cache_seqlens = _decode_inputs(lens, device)
        return _rand(len(lens), SQ, 32, device=device), k_cache, block_table, cache_seqlens

    batch, blocks, max_blocks = Dim("batch", min=2), Dim("num_blocks", min=2), Dim("max_blocks", min=2)
    dynamic_shapes = ({0: batch}, {0: blocks}, {0: batch, 1: max_blocks}, {0: batch})
    with torch.no_grad():
        exported = torch.export.export(model, inputs(DECODE_BATCHES[0]), dynamic_shapes=dynamic_shapes)
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert MATE.mla_decode.default in targets and MATE.get_mla_metadata.default in targets, targets
    module = exported.module()
    with torch.no_grad():
        for lens in DECODE_BATCHES:
            args = inputs(lens)
            got, want = module(*args), model(*args)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
