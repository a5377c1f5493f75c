"""Drop-in compatibility modules: mate_ops.flash_mla (DeepSeek FlashMLA), mate_ops.metal_flash_sdpa
(Hugging Face kernels-community/metal-flash-sdpa) and mate_ops.compat (import aliases).

- signatures against tables of the originals, written here from their sources;
- calls written the way users of the originals write them, checked against mate_ops.testing
  (unused cache slots and output buffers poisoned with NaN);
- FlashMLA's two metadata styles, reuse of the lazy FlashMLASchedMeta and its mismatch error;
- the Metal API's in-place out, softcapping=1.0, float32, dropout error, ALiBi;
- compat aliases in a subprocess (this process's sys.modules is never touched);
- torch.compile(fullgraph=True) equal to eager.
"""
import importlib.util
import inspect
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from mate_ops import flash_mla as FM
from mate_ops import flashmla
from mate_ops import metal_flash_sdpa as MS
from mate_ops import testing as T


BF16 = torch.bfloat16
E = inspect.Parameter.empty
POS = inspect.Parameter.POSITIONAL_OR_KEYWORD

# ============================================================================ signatures
# Sources (read from the stored public repositories):
#  FlashMLA current: deepseek-ai/FlashMLA flash_mla/flash_mla_interface.py @02fe0d0 (the same
#    get_mla_metadata / flash_mla_with_kvcache / FlashMLASchedMeta as vLLM's vendored copy
#    vllm-project/vllm vllm/third_party/flashmla/flash_mla_interface.py @cb87027, whose
#    flash_mla_sparse_fwd lacks the trailing indexer_topk=0).
#  FlashMLA old: deepseek-ai/FlashMLA flash_mla/flash_mla_interface.py @323f076.
#  Metal: totokunda/metal-flash-sdpa torch-ext/metal_flash_sdpa/_custom_ops.py @b655436 (op schema
#    in torch-ext/torch_binding.cpp, README of the kernels-community package).
FLASHMLA_SIGS = {
    "get_mla_metadata": [("args", inspect.Parameter.VAR_POSITIONAL, E), ("kwargs", inspect.Parameter.VAR_KEYWORD, E)],
    "flash_mla_with_kvcache": [
        ("q", POS, E), ("k_cache", POS, E), ("block_table", POS, E), ("cache_seqlens", POS, E),
        ("head_dim_v", POS, E), ("tile_scheduler_metadata", POS, E), ("num_splits", POS, None),
        ("softmax_scale", POS, None), ("causal", POS, False), ("is_fp8_kvcache", POS, False),
        ("indices", POS, None), ("attn_sink", POS, None), ("extra_k_cache", POS, None),
        ("extra_indices_in_kvcache", POS, None), ("topk_length", POS, None), ("extra_topk_length", POS, None),
    ],
    "flash_mla_sparse_fwd": [
        ("q", POS, E), ("kv", POS, E), ("indices", POS, E), ("sm_scale", POS, E), ("d_v", POS, 512),
        ("attn_sink", POS, None), ("topk_length", POS, None), ("indexer_topk", POS, 0),
    ],
}
FLASHMLA_SCHED_META_FIELDS = [("have_initialized", False), ("config", None), ("tile_scheduler_metadata", None),
                              ("num_splits", None)]
FLASHMLA_CONFIG_FIELDS = ["b", "s_q", "h_q", "page_block_size", "h_k", "causal", "is_fp8_kvcache", "topk",
                          "extra_page_block_size", "extra_topk"]
# Old FlashMLA's metadata function: calls written against it must bind to the tensor style.
FLASHMLA_OLD_GET_MLA_METADATA = ["cache_seqlens", "num_q_tokens_per_head_k", "num_heads_k", "num_heads_q",
                                 "is_fp8_kvcache", "topk"]

METAL_SIGS = {
    "flash_attention_varlen": [
        ("out", POS, E), ("query", POS, E), ("key", POS, E), ("value", POS, E), ("cu_seqlens_q", POS, E),
        ("cu_seqlens_k", POS, E), ("max_seqlen_q", POS, E), ("max_seqlen_k", POS, E), ("do_causal", POS, False),
        ("scale", POS, None), ("softcapping", POS, 1.0),
    ],
    "flash_attn_varlen_func": [
        ("q", POS, E), ("k", POS, E), ("v", POS, E), ("cu_seqlens_q", POS, E), ("cu_seqlens_k", POS, E),
        ("max_seqlen_q", POS, E), ("max_seqlen_k", POS, E), ("dropout_p", POS, 0.0), ("softmax_scale", POS, None),
        ("causal", POS, False), ("window_size", POS, (-1, -1)), ("alibi_slopes", POS, None),
        ("deterministic", POS, False), ("return_attn_probs", POS, False),
    ],
}


def _sig(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("module,table", [(FM, FLASHMLA_SIGS), (MS, METAL_SIGS)], ids=["flash_mla", "metal"])
def test_signatures_match_originals(module, table):
    for name, expected in table.items():
        assert _sig(getattr(module, name)) == expected, name
        assert name in module.__all__


def test_flashmla_sched_meta_fields():
    import dataclasses

    meta = FM.FlashMLASchedMeta()
    assert [(f.name, getattr(meta, f.name)) for f in dataclasses.fields(meta)] == FLASHMLA_SCHED_META_FIELDS
    assert [f.name for f in dataclasses.fields(FM.FlashMLASchedMeta.Config)] == FLASHMLA_CONFIG_FIELDS
    # the old tensor-style metadata call binds positionally to MATE's signature
    assert list(inspect.signature(flashmla.get_mla_metadata).parameters)[:6] == FLASHMLA_OLD_GET_MLA_METADATA


# ============================================================================ FlashMLA decode
def paged_cache(lens, P, D=576, Hkv=1):
    dense = torch.randn(len(lens), max(lens + [1]), Hkv, D, dtype=BF16)
    kc, _, table = T.make_paged_kv(dense, dense[..., :1], lens, P)  # unused slots are NaN
    return kc, table


def check_mla(out, lse, ref, low):
    T.assert_close_fa3(out, ref[0], low[0])
    assert lse.shape == ref[1].shape and lse.dtype == torch.float32
    lse = lse.cpu()
    inf = torch.isinf(ref[1])
    assert torch.equal(lse[inf], ref[1][inf])
    torch.testing.assert_close(lse[~inf], ref[1][~inf], atol=2e-3, rtol=1e-4)


def dense_case(lens=(150, 0, 37), Sq=2, Hq=16, P=64, seed=0):
    torch.manual_seed(seed)
    kc, table = paged_cache(list(lens), P)
    q = torch.randn(len(lens), Sq, Hq, 576, dtype=BF16)
    return q, kc, table, torch.tensor(lens, dtype=torch.int32)


def dense_ref(q, kc, table, sl, causal):
    return (T.mla_decode_ref(q, kc, table, sl, 512, causal=causal),
            T.mla_decode_ref(q, kc, table, sl, 512, causal=causal, compute_dtype=BF16))


@pytest.mark.parametrize("causal", [False, True])
def test_flashmla_lazy_style_readme_loop(device, causal):
    if device != "cpu" and not torch._C._dispatch_has_kernel_for_dispatch_key(
            "mate::mla_decode", "CUDA" if device == "cuda" else "PrivateUse1"):
        pytest.skip(f"no {device} kernel yet for the MLA ops")
    """Current FlashMLA: sched_meta, _ = get_mla_metadata(); reused across layers and steps."""
    q, kc, table, sl = dense_case()

    def dev(*ts):
        return [t.to(device) for t in ts]

    sched_meta, none = FM.get_mla_metadata()
    assert isinstance(sched_meta, FM.FlashMLASchedMeta) and none is None and not sched_meta.have_initialized
    out, lse = FM.flash_mla_with_kvcache(*dev(q, kc, table, sl), 512, sched_meta, None, causal=causal)
    check_mla(out, lse, *dense_ref(q, kc, table, sl, causal))
    cfg = sched_meta.config
    assert sched_meta.have_initialized
    assert (cfg.b, cfg.s_q, cfg.h_q, cfg.page_block_size, cfg.h_k) == (3, 2, 16, 64, 1)
    assert cfg.causal == causal and not cfg.is_fp8_kvcache and cfg.topk is None and cfg.extra_topk is None
    assert sched_meta.tile_scheduler_metadata.dtype == torch.int32 and sched_meta.num_splits.shape == (4,)
    meta_t = sched_meta.tile_scheduler_metadata
    # later "layers": same configuration, other tensors; keyword form as in FlashMLA's tests
    for _layer in range(2):
        q2 = torch.randn_like(q)
        kc2, table2 = paged_cache([150, 0, 37], 64)
        d_q2, d_kc2, d_table2, d_sl = dev(q2, kc2, table2, sl)
        out2, lse2 = FM.flash_mla_with_kvcache(q=d_q2, k_cache=d_kc2, block_table=d_table2, cache_seqlens=d_sl,
                                               head_dim_v=512, tile_scheduler_metadata=sched_meta, num_splits=None,
                                               softmax_scale=0.05, causal=causal)
        ref = (T.mla_decode_ref(q2, kc2, table2, sl, 512, causal=causal, softmax_scale=0.05),
               T.mla_decode_ref(q2, kc2, table2, sl, 512, causal=causal, softmax_scale=0.05, compute_dtype=BF16))
        check_mla(out2, lse2, *ref)
    assert sched_meta.tile_scheduler_metadata is meta_t  # filled once
    # next decode step: cache_seqlens grew (FlashMLA asks for a new object; ours stays correct)
    sl3 = torch.tensor([151, 1, 38], dtype=torch.int32)
    kc3, table3 = paged_cache([151, 1, 38], 64)
    out3, lse3 = FM.flash_mla_with_kvcache(*dev(q, kc3, table3, sl3), 512, sched_meta, causal=causal)
    check_mla(out3, lse3, *dense_ref(q, kc3, table3, sl3, causal))


@pytest.mark.parametrize("call", ["positional", "keyword", "mate_extras"])
def test_flashmla_tensor_style(call):
    """Older FlashMLA / MATE: tile_scheduler_metadata, num_splits = get_mla_metadata(cache_seqlens, ...)."""
    q, kc, table, sl = dense_case()
    B, Sq, Hq, _ = q.shape
    if call == "positional":
        md = FM.get_mla_metadata(sl, Sq * Hq // 1, 1)
    elif call == "keyword":
        md = FM.get_mla_metadata(cache_seqlens=sl, num_q_tokens_per_head_k=Sq * Hq, num_heads_k=1, num_heads_q=Hq,
                                 is_fp8_kvcache=False, topk=None)
    else:
        md = FM.get_mla_metadata(sl, Sq * Hq, 1, Hq, False, None, None, q=q, bs=B)
    tile_md, num_splits = md
    assert isinstance(tile_md, torch.Tensor) and tile_md.dtype == torch.int32 and tile_md.shape[1] == 8
    assert num_splits.dtype == torch.int32 and num_splits.shape == (B + 1,)
    out, lse = FM.flash_mla_with_kvcache(q, kc, table, sl, 512, tile_md, num_splits, None, True)  # causal positional
    check_mla(out, lse, *dense_ref(q, kc, table, sl, True))
    out_lazy, lse_lazy = FM.flash_mla_with_kvcache(q, kc, table, sl, 512, FM.get_mla_metadata()[0], causal=True)
    assert torch.equal(out, out_lazy) and torch.equal(lse, lse_lazy)
    # metadata is optional in MATE's API: None/None gives the same result
    out_n, _ = FM.flash_mla_with_kvcache(q, kc, table, sl, 512, None, None, causal=True)
    assert torch.equal(out, out_n)


def test_flashmla_get_mla_metadata_style_rule():
    sl = torch.tensor([5, 9], dtype=torch.int32)
    assert isinstance(FM.get_mla_metadata()[0], FM.FlashMLASchedMeta)
    assert isinstance(FM.get_mla_metadata(sl, 16, 1)[0], torch.Tensor)
    assert isinstance(FM.get_mla_metadata(cache_seqlens=sl, num_q_tokens_per_head_k=16, num_heads_k=1)[0],
                      torch.Tensor)
    # arguments without a cache_seqlens tensor are ignored, as current FlashMLA ignores all arguments
    meta, none = FM.get_mla_metadata(num_heads_k=1)
    assert isinstance(meta, FM.FlashMLASchedMeta) and none is None
    assert FM.get_mla_metadata()[0] is not FM.get_mla_metadata()[0]  # a fresh object each call


def _mismatch_variants():
    base = dict(lens=[40, 7], Sq=1, Hq=8, P=16)
    return [
        ("b", dict(base, lens=[40, 7, 3]), {}),
        ("s_q", dict(base, Sq=2), {}),
        ("h_q", dict(base, Hq=16), {}),
        ("page_block_size", dict(base, P=32), {}),
        ("causal", base, dict(causal=True)),
    ]


@pytest.mark.parametrize("field,case,kw", _mismatch_variants(), ids=[v[0] for v in _mismatch_variants()])
def test_flashmla_lazy_mismatch_raises(field, case, kw):
    q, kc, table, sl = dense_case(tuple(case["lens"]), case["Sq"], case["Hq"], case["P"])
    q0, kc0, table0, sl0 = dense_case((40, 7), 1, 8, 16)
    meta, _ = FM.get_mla_metadata()
    FM.flash_mla_with_kvcache(q0, kc0, table0, sl0, 512, meta, None)
    with pytest.raises(FM.FlashMLASchedMetaMismatchError, match=field) as ei:
        FM.flash_mla_with_kvcache(q, kc, table, sl, 512, meta, None, **kw)
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, AssertionError)  # FlashMLA asserts
    assert "first call" in str(ei.value) and "get_mla_metadata()" in str(ei.value)


def test_flashmla_lazy_sparse_fp8_and_mismatch():
    """Sparse FP8 decode (DeepSeek V3.2 layout) with the lazy object; topk/extra_topk are recorded."""
    torch.manual_seed(1)
    B, Sq, Hq, P, nb = 2, 1, 16, 64, 5
    cache = flashmla.quantize_k_cache(torch.randn(nb, P, 1, 576, dtype=BF16), "v32")
    extra = flashmla.quantize_k_cache(torch.randn(3, 16, 1, 576, dtype=BF16), "v32")
    q = torch.randn(B, Sq, Hq, 576, dtype=BF16)
    idx = torch.randint(-1, nb * P, (B, Sq, 128), dtype=torch.int32)
    idx[1, 0] = -1  # no valid key: out 0, lse +inf
    kw = dict(indices=idx, attn_sink=torch.randn(Hq), topk_length=torch.tensor([128, 50], dtype=torch.int32),
              extra_k_cache=extra, extra_indices_in_kvcache=torch.randint(-1, 48, (B, Sq, 8), dtype=torch.int32))
    kw["extra_indices_in_kvcache"][1, 0] = -1
    meta, _ = FM.get_mla_metadata()
    out, lse = FM.flash_mla_with_kvcache(q, cache, None, None, 512, meta, None, is_fp8_kvcache=True, **kw)
    ref = T.mla_decode_ref(q, cache, None, None, 512, is_fp8_kvcache=True, **kw)
    low = T.mla_decode_ref(q, cache, None, None, 512, is_fp8_kvcache=True, compute_dtype=BF16, **kw)
    check_mla(out, lse, ref, low)
    assert (out[1, 0] == 0).all() and torch.isposinf(lse[1, :, 0]).all()
    assert (meta.config.topk, meta.config.extra_topk, meta.config.extra_page_block_size) == (128, 8, 16)
    assert meta.config.is_fp8_kvcache and meta.tile_scheduler_metadata is not None
    out2, _ = FM.flash_mla_with_kvcache(q, cache, None, None, 512, meta, None, is_fp8_kvcache=True, **kw)
    assert torch.equal(out, out2)
    with pytest.raises(FM.FlashMLASchedMetaMismatchError, match="topk"):
        FM.flash_mla_with_kvcache(q, cache, None, None, 512, meta, None, is_fp8_kvcache=True,
                                  **dict(kw, indices=idx[..., :64].contiguous(), topk_length=None))
    with pytest.raises(FM.FlashMLASchedMetaMismatchError, match="is_fp8_kvcache"):
        FM.flash_mla_with_kvcache(q, flashmla.dequantize_k_cache(cache).to(BF16), None, None, 512, meta, None,
                                  **dict(kw, extra_k_cache=flashmla.dequantize_k_cache(extra).to(BF16)))


def test_flashmla_bad_metadata_arguments():
    q, kc, table, sl = dense_case((20, 3), 1, 8, 16)
    meta, _ = FM.get_mla_metadata()
    md = FM.get_mla_metadata(sl, 8, 1)
    with pytest.raises(ValueError, match="num_splits must be None"):
        FM.flash_mla_with_kvcache(q, kc, table, sl, 512, meta, md[1])
    with pytest.raises(TypeError, match="tile_scheduler_metadata"):
        FM.flash_mla_with_kvcache(q, kc, table, sl, 512, "metadata", None)
    # a rejected first call leaves the lazy object unused
    with pytest.raises((RuntimeError, ValueError)):
        FM.flash_mla_with_kvcache(q, kc, table, sl.to(torch.int64), 512, meta, None)
    assert not meta.have_initialized and meta.config is None
    FM.flash_mla_with_kvcache(q, kc, table, sl, 512, meta, None)
    assert meta.have_initialized


# ============================================================================ FlashMLA sparse prefill
def test_flashmla_sparse_prefill_natural_lse_and_indexer():
    torch.manual_seed(2)
    Sq, Hq, Skv, topk, scale = 23, 16, 200, 96, 0.06
    q = torch.randn(Sq, Hq, 576, dtype=BF16)
    kv = torch.randn(Skv, 1, 576, dtype=BF16)
    idx = torch.randint(-1, Skv + 4, (Sq, 1, topk), dtype=torch.int32)
    idx[4] = -1
    tl = torch.randint(0, topk + 1, (Sq,), dtype=torch.int32)
    tl[0] = topk
    sink = torch.randn(Hq)
    res = FM.flash_mla_sparse_fwd(q, kv, idx, scale, 512, sink, tl)
    assert len(res) == 3
    out, max_logits, lse = res
    ref = T.mla_sparse_prefill_ref(q, kv, idx, scale, 512, attn_sink=sink, topk_length=tl)
    low = T.mla_sparse_prefill_ref(q, kv, idx, scale, 512, attn_sink=sink, topk_length=tl, compute_dtype=BF16)
    check_mla(out, lse, (ref[0], ref[2]), (low[0], low[2]))
    torch.testing.assert_close(max_logits, ref[1], atol=1e-3, rtol=1e-4)
    # the base is natural: row 0 (all topk entries) equals torch.logsumexp of the scaled scores
    valid = [int(s) for s in idx[0, 0] if 0 <= s < Skv]
    s0 = scale * (q[0].double() @ kv[valid, 0].double().T)
    torch.testing.assert_close(lse[0].double(), torch.logsumexp(s0, -1), atol=2e-3, rtol=1e-5)
    torch.testing.assert_close(max_logits[0].double(), s0.max(-1).values, atol=2e-3, rtol=1e-5)
    # indexer_topk: lse over the first indexer_topk entries (and within topk_length)
    out4, ml4, lse4, lse_idx = FM.flash_mla_sparse_fwd(q, kv, idx, scale, 512, sink, tl, indexer_topk=32)
    assert torch.equal(out4, out) and torch.equal(lse4, lse) and torch.equal(ml4, max_logits)
    ref_idx = T.mla_sparse_prefill_ref(q, kv, idx[..., :32].contiguous(), scale, 512,
                                       topk_length=torch.clamp(tl, max=32))[2]
    inf = torch.isinf(ref_idx)
    assert torch.equal(lse_idx[inf], ref_idx[inf])
    torch.testing.assert_close(lse_idx[~inf], ref_idx[~inf], atol=2e-3, rtol=1e-4)
    with pytest.raises(ValueError, match="indexer_topk"):
        FM.flash_mla_sparse_fwd(q, kv, idx, scale, indexer_topk=topk + 1)


# ============================================================================ Metal flash SDPA
def ragged(q_lens, k_lens, H, Hk, D, dtype, Dv=None):
    cq, ck = T.random_cu_seqlens(q_lens), T.random_cu_seqlens(k_lens)
    q = torch.randn(sum(q_lens), H, D, dtype=dtype)
    k = torch.randn(sum(k_lens), Hk, D, dtype=dtype)
    v = torch.randn(sum(k_lens), Hk, Dv or D, dtype=dtype)
    return q, k, v, cq, ck


def ref_pair(q, k, v, cq, ck, **kw):
    return (T.fmha_ref(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, **kw),
            T.fmha_ref(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, compute_dtype=q.dtype, **kw))


# q longer than k in the last sequence: under causal its first rows see no key (out 0)
LENS = ([5, 1, 17, 9], [12, 30, 17, 4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("H,Hk,D,Dv", [(4, 4, 64, 64), (6, 2, 128, 128), (4, 1, 32, 48)])
def test_metal_flash_attention_varlen_inplace(device, dtype, causal, H, Hk, D, Dv):
    q, k, v, cq, ck = ragged(*LENS, H, Hk, D, dtype, Dv)
    out = T.poison_(torch.empty(q.shape[0], H, Dv, dtype=dtype, device=device))
    ptr = out.data_ptr()
    args = [t.to(device) for t in (q, k, v, cq, ck)]
    ret = MS.flash_attention_varlen(out, *args, max(LENS[0]), max(LENS[1]), causal, D ** -0.5, 1.0)
    assert ret is None and out.data_ptr() == ptr
    out = out.cpu()
    ref, low = ref_pair(q, k, v, cq, ck, causal=causal)
    T.assert_close_fa3(out, ref[0], low[0])
    if causal:
        assert (out[sum(LENS[0][:3]):sum(LENS[0][:3]) + 5] == 0).all()  # Sq - Sk = 5 rows without a key


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_metal_softcapping(dtype):
    q, k, v, cq, ck = ragged(*LENS, 4, 2, 64, dtype)
    q = q * 4  # large scores, so a softcap of 2 matters
    mq, mk = max(LENS[0]), max(LENS[1])

    def run(softcapping, **kw):
        out = T.poison_(torch.empty_like(q))
        MS.flash_attention_varlen(out, q, k, v, cq, ck, mq, mk, True, 0.125, softcapping, **kw)
        return out

    none = run(1.0)
    ref, low = ref_pair(q, k, v, cq, ck, causal=True, softmax_scale=0.125)
    T.assert_close_fa3(none, ref[0], low[0])
    assert torch.equal(run(0.0), none)  # 0.0 also means none
    default = T.poison_(torch.empty_like(q))
    MS.flash_attention_varlen(default, q, k, v, cq, ck, mq, mk, do_causal=True, scale=0.125)  # default softcapping
    assert torch.equal(default, none)
    capped = run(2.0)
    ref, low = ref_pair(q, k, v, cq, ck, causal=True, softmax_scale=0.125, softcap=2.0)
    T.assert_close_fa3(capped, ref[0], low[0])
    assert not torch.allclose(capped.float(), none.float(), atol=1e-2)
    with pytest.raises(ValueError, match="softcapping"):
        run(-1.0)
    # the default scale is 1/sqrt(head_dim)
    dflt = T.poison_(torch.empty_like(q))
    MS.flash_attention_varlen(dflt, q, k, v, cq, ck, mq, mk)
    ref, low = ref_pair(q, k, v, cq, ck)
    T.assert_close_fa3(dflt, ref[0], low[0])


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("causal", [False, True])
def test_metal_flash_attn_varlen_func(device, dtype, causal):
    q, k, v, cq, ck = ragged(*LENS, 6, 3, 64, dtype)
    args = [t.to(device) for t in (q, k, v, cq, ck)]
    out = MS.flash_attn_varlen_func(*args, max(LENS[0]), max(LENS[1]), 0.0, None, causal).cpu()
    ref, low = ref_pair(q, k, v, cq, ck, causal=causal)
    assert out.dtype == dtype and out.shape == q.shape
    T.assert_close_fa3(out, ref[0], low[0])
    res = MS.flash_attn_varlen_func(*args, max(LENS[0]), max(LENS[1]), softmax_scale=0.2, causal=causal,
                                    window_size=(3, 1), deterministic=True, return_attn_probs=True)
    assert isinstance(res, tuple) and len(res) == 3 and res[2] is None  # FA2: (out, softmax_lse, S_dmask)
    res = (res[0].cpu(), res[1].cpu(), None)
    ref, low = ref_pair(q, k, v, cq, ck, causal=causal, softmax_scale=0.2, window_size=(3, 1))
    T.assert_close_fa3(res[0], ref[0], low[0])
    assert res[1].shape == (6, q.shape[0]) and res[1].dtype == torch.float32
    T.assert_close_fa3(res[1], ref[1], low[1], name="lse", input_dtype=torch.float32)


def test_metal_dropout_rejected():
    q, k, v, cq, ck = ragged([3], [4], 2, 2, 32, torch.float32)
    with pytest.raises(ValueError, match="dropout_p"):
        MS.flash_attn_varlen_func(q, k, v, cq, ck, 3, 4, 0.1)
    with pytest.raises(ValueError, match="dropout_p"):
        MS.flash_attn_varlen_func(q, k, v, cq, ck, 3, 4, dropout_p=0.5)


def alibi_reference(q, k, v, cq, ck, slopes, scale, causal):
    """Pure torch: s = scale * q.k - slope_h * |i + Sk - Sq - j| (FA2), causal bottom-right; fp64."""
    H, G = q.shape[1], q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape[0], H, v.shape[-1], dtype=torch.float64)
    lse = torch.full((H, q.shape[0]), -math.inf, dtype=torch.float64)
    for b in range(cq.numel() - 1):
        q0, q1, k0, k1 = int(cq[b]), int(cq[b + 1]), int(ck[b]), int(ck[b + 1])
        sq, sk = q1 - q0, k1 - k0
        qb = q[q0:q1].double().transpose(0, 1)  # (H, sq, D)
        kb = k[k0:k1].double().repeat_interleave(G, 1).transpose(0, 1)
        vb = v[k0:k1].double().repeat_interleave(G, 1).transpose(0, 1)
        s = scale * qb @ kb.transpose(1, 2)  # (H, sq, sk)
        a = torch.arange(sq).view(sq, 1) + sk - sq
        j = torch.arange(sk).view(1, sk)
        sl = (slopes[b] if slopes.dim() == 2 else slopes).double().view(H, 1, 1)
        s = s - sl * (a - j).abs().double()
        if causal:
            s = s.masked_fill(j > a, -math.inf)
        l = torch.logsumexp(s, -1)  # (H, sq)
        p = torch.exp(s - l.unsqueeze(-1)).nan_to_num(0.0)
        out[q0:q1] = (p @ vb).transpose(0, 1)
        lse[:, q0:q1] = l
    return out, lse


@pytest.mark.parametrize("slopes_shape", ["H", "BH"])
@pytest.mark.parametrize("causal", [False, True])
def test_metal_alibi(slopes_shape, causal):
    q, k, v, cq, ck = ragged([4, 9, 6], [11, 9, 3], 4, 2, 32, torch.float32)
    B = 3
    slopes = torch.rand(4) if slopes_shape == "H" else torch.rand(B, 4)
    out, lse, _ = MS.flash_attn_varlen_func(q, k, v, cq, ck, 9, 11, softmax_scale=0.3, causal=causal,
                                            alibi_slopes=slopes, return_attn_probs=True)
    ref_out, ref_lse = alibi_reference(q, k, v, cq, ck, slopes, 0.3, causal)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=1e-5)
    inf = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), inf)
    torch.testing.assert_close(lse.double()[~inf], ref_lse[~inf], atol=2e-5, rtol=1e-5)
    # the bias matters (not silently dropped)
    plain = MS.flash_attn_varlen_func(q, k, v, cq, ck, 9, 11, softmax_scale=0.3, causal=causal)
    assert not torch.allclose(plain, out, atol=1e-3)


# ============================================================================ compat aliases (subprocess)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_py(code, tmp_path):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), capture_output=True, text=True,
                         timeout=120, env=env)
    assert res.returncode == 0, f"subprocess failed:\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    return res.stdout


def test_compat_flash_mla_alias_and_conflicts(tmp_path):
    before = set(sys.modules)
    out = run_py("""
        import sys, types, warnings, importlib
        import mate_ops, mate_ops.compat as compat
        assert "flash_mla" not in sys.modules, "import mate_ops must not install aliases"
        try:
            import flash_mla
            raise SystemExit("flash_mla importable before install_aliases")
        except ModuleNotFoundError:
            pass

        installed = compat.install_aliases(names=["flash_mla"])
        assert installed == {"flash_mla": "mate_ops.flash_mla",
                             "flash_mla.flash_mla_interface": "mate_ops.flash_mla"}, installed
        import flash_mla
        import mate_ops.flash_mla
        assert flash_mla is mate_ops.flash_mla
        from flash_mla import get_mla_metadata, flash_mla_with_kvcache, flash_mla_sparse_fwd, FlashMLASchedMeta
        from flash_mla.flash_mla_interface import FlashMLASchedMeta as M2
        assert M2 is FlashMLASchedMeta and isinstance(get_mla_metadata()[0], FlashMLASchedMeta)
        assert compat.install_aliases(names=["flash_mla"])["flash_mla"] == "mate_ops.flash_mla"  # idempotent
        compat.uninstall_aliases()
        assert "flash_mla" not in sys.modules and "flash_mla.flash_mla_interface" not in sys.modules
        try:
            importlib.import_module("flash_mla")
            raise SystemExit("flash_mla still importable after uninstall_aliases")
        except ModuleNotFoundError:
            pass
        compat.uninstall_aliases()  # no-op

        # an already imported module of that name: refuse (nothing installed), or shadow + restore
        real = types.ModuleType("flash_mla"); sys.modules["flash_mla"] = real
        try:
            compat.install_aliases(names=["flash_mla"])
            raise SystemExit("no conflict error")
        except compat.AliasConflictError as e:
            assert isinstance(e, ImportError) and "already imported" in str(e) and "force=True" in str(e), e
        assert sys.modules["flash_mla"] is real and "flash_mla.flash_mla_interface" not in sys.modules
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            compat.install_aliases(force=True, names=["flash_mla"])
        assert any("shadows" in str(x.message) for x in w), [str(x.message) for x in w]
        assert sys.modules["flash_mla"] is mate_ops.flash_mla
        compat.uninstall_aliases()
        assert sys.modules["flash_mla"] is real
        del sys.modules["flash_mla"]

        # an importable (not yet imported) real package on sys.path: refused without importing it
        import os, tempfile
        d = tempfile.mkdtemp()
        with open(os.path.join(d, "flash_mla.py"), "w") as f:
            f.write("import sys; sys.stderr.write('REAL IMPORTED'); raise SystemExit(3)\\n")
        sys.path.insert(0, d)
        try:
            compat.install_aliases(names=["flash_mla"])
            raise SystemExit("no conflict error for importable module")
        except compat.AliasConflictError as e:
            assert "importable" in str(e), e
        assert "flash_mla" not in sys.modules
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compat.install_aliases(force=True, names=["flash_mla"])
        import flash_mla as fm2
        assert fm2 is mate_ops.flash_mla
        compat.uninstall_aliases()
        try:
            compat.install_aliases(names=["nope"])
            raise SystemExit("unknown name accepted")
        except ValueError:
            pass
        print("OK")
    """, tmp_path)
    assert "OK" in out
    assert not {"flash_mla", "flash_mla.flash_mla_interface", "flash_attn_interface"} & (set(sys.modules) - before)
    assert "flash_mla" not in sys.modules and "flash_attn_interface" not in sys.modules


HAS_FAI = importlib.util.find_spec("mate_ops.flash_attn_interface") is not None


def test_compat_install_all_defaults(tmp_path):
    """install_aliases() with no arguments: flash_mla always; flash_attn_interface when the module exists."""
    out = run_py("""
        import sys, warnings
        import mate_ops.compat as compat
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            installed = compat.install_aliases()
        import flash_mla, mate_ops.flash_mla
        assert flash_mla is mate_ops.flash_mla
        print("FAI" if "flash_attn_interface" in installed else "NOFAI", [str(x.message) for x in w])
        compat.uninstall_aliases()
        assert "flash_mla" not in sys.modules and "flash_attn_interface" not in sys.modules
        print("OK")
    """, tmp_path)
    assert "OK" in out
    assert ("FAI" in out) == HAS_FAI, out


@pytest.mark.skipif(not HAS_FAI, reason="mate_ops/flash_attn_interface.py does not exist yet (written in parallel); "
                                        "only its alias assertion is skipped")
def test_compat_flash_attn_interface_alias(tmp_path):
    out = run_py("""
        import sys
        import mate_ops.compat as compat
        assert "flash_attn_interface" not in sys.modules
        compat.install_aliases(names=["flash_attn_interface"])
        import flash_attn_interface, mate_ops.flash_attn_interface
        assert flash_attn_interface is mate_ops.flash_attn_interface
        from flash_attn_interface import flash_attn_varlen_func, flash_attn_with_kvcache
        compat.uninstall_aliases()
        assert "flash_attn_interface" not in sys.modules
        print("OK")
    """, tmp_path)
    assert "OK" in out


# ============================================================================ torch.compile
def _decode_step_tensors(q, kc, table, sl):
    md, splits = FM.get_mla_metadata(sl, q.shape[1] * q.shape[2] // kc.shape[2], kc.shape[2])
    return FM.flash_mla_with_kvcache(q, kc, table, sl, 512, md, splits, causal=True)


def _decode_step_lazy(q, kc, table, sl, sched_meta):
    return FM.flash_mla_with_kvcache(q, kc, table, sl, 512, sched_meta, None, causal=True)


def _decode_step_lazy_inside(q, kc, table, sl):
    sched_meta, _ = FM.get_mla_metadata()
    return FM.flash_mla_with_kvcache(q, kc, table, sl, 512, sched_meta, None, causal=True)


@pytest.mark.parametrize("style", ["tensors", "lazy", "lazy_inside"])
def test_compile_flash_mla_with_kvcache(style):
    torch._dynamo.reset()
    cnt = CompileCounter()
    q, kc, table, sl = dense_case((70, 5, 33), 2, 8, 16)
    if style == "tensors":
        fn, extra = _decode_step_tensors, ()
    elif style == "lazy":
        fn, extra = _decode_step_lazy, (FM.FlashMLASchedMeta(),)
    else:
        fn, extra = _decode_step_lazy_inside, ()
    compiled = torch.compile(fn, backend=cnt, fullgraph=True)
    out, lse = compiled(q, kc, table, sl, *extra)
    if style == "lazy":
        meta = extra[0]
        assert meta.have_initialized and isinstance(meta.tile_scheduler_metadata, torch.Tensor)
        assert meta.config.causal and meta.config.b == 3
        out2, lse2 = compiled(q, kc, table, sl, meta)  # reuse of the filled object, compiled
        assert torch.equal(out2, out) and torch.equal(lse2, lse)
        eager_meta = FM.FlashMLASchedMeta()
        out_e, lse_e = fn(q, kc, table, sl, eager_meta)
    else:
        out_e, lse_e = fn(q, kc, table, sl)
    assert torch.equal(out, out_e) and torch.equal(lse, lse_e)
    check_mla(out, lse, *dense_ref(q, kc, table, sl, True))
    # one graph per metadata state: the lazy object compiles once unfilled and once filled
    assert cnt.frame_count == (2 if style == "lazy" else 1), cnt.frame_count


def _metal_step(out, q, k, v, cq, ck, mq, mk):
    MS.flash_attention_varlen(out, q, k, v, cq, ck, mq, mk, True, None, 1.0)
    return out


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_metal_inplace(backend):
    torch._dynamo.reset()
    q, k, v, cq, ck = ragged(*LENS, 4, 2, 64, torch.float32)
    out = T.poison_(torch.empty_like(q))
    ptr = out.data_ptr()
    compiled = torch.compile(_metal_step, backend=backend, fullgraph=True)
    ret = compiled(out, q, k, v, cq, ck, max(LENS[0]), max(LENS[1]))
    assert out.data_ptr() == ptr and ret.data_ptr() == ptr  # written into the caller's tensor
    eager = T.poison_(torch.empty_like(q))
    _metal_step(eager, q, k, v, cq, ck, max(LENS[0]), max(LENS[1]))
    assert torch.equal(out, eager)
    assert not torch.isnan(out).any()


def test_compile_metal_varlen_func_alibi():
    torch._dynamo.reset()
    q, k, v, cq, ck = ragged([4, 9], [11, 9], 4, 2, 32, torch.float32)
    slopes = torch.rand(4)

    def f(q, k, v, cq, ck):
        return MS.flash_attn_varlen_func(q, k, v, cq, ck, 9, 11, causal=True, alibi_slopes=slopes,
                                         return_attn_probs=True)[:2]

    out, lse = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, cq, ck)
    out_e, lse_e = f(q, k, v, cq, ck)
    assert torch.equal(out, out_e) and torch.equal(lse, lse_e)
