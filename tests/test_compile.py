"""Registration tests of torch.ops.mate.* (docs/design.md "Testing"):

- ``torch.library.opcheck`` on every op over representative argument sets (schema
  mutation/alias annotations, autograd registration, fake kernel vs real kernel,
  AOT dispatch with dynamic shapes);
- ``torch.compile(fullgraph=True, dynamic=True)`` of the MATE Python API with a
  compile counter: one graph across batch sizes and sequence lengths;
- inductor on a small nn.Module, on ``return_softmax_lse``, on ``out=`` (mutation)
  and on ``flash_attn_combine``;
- ``torch.export`` round trip and one AOTInductor package (CPU).

Shapes are small: the file runs in well under two minutes on 2 CPU cores.
"""
import math

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code
from torch.export import Dim

import mate_ops  # noqa: F401  (registers torch.ops.mate.* and the fake kernels)
from mate_ops.mha_interface import flash_attn_combine, flash_attn_varlen_func
from mate_ops.testing import (
    assert_close_fa3,
    combine_ref,
    fmha_ref,
    make_paged_kv,
    poison_,
    random_cu_seqlens,
)

FP8 = torch.float8_e4m3fn
MATE = torch.ops.mate


def _rand(*shape, dtype=torch.float32, device="cpu"):
    """Random normal values (never zeros), cast to ``dtype`` (fp8 included)."""
    return torch.randn(*shape, dtype=torch.float32, device=device).to(dtype)


def _i32(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


def _cu(lengths, device):
    return random_cu_seqlens(lengths).to(device)


# ============================================================================ opcheck

# opcheck's test_schema runs the op under torch._subclasses.schema_check_mode.SchemaCheckMode,
# whose has_mutated() compares every input before/after with torch.allclose; allclose has no
# float8_e4m3fn kernel (NotImplementedError: "mul_cpu_reduced_float" not implemented for
# 'Float8_e4m3fn'), so test_schema errors on any fp8 input after our op has run correctly
# (a PyTorch limitation, not a mate one). For fp8 inputs we run the other three opcheck
# utils and check test_schema's promises (no undeclared mutation, no aliasing) bitwise.
_NO_SCHEMA_UTILS = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _tensors(args, kwargs):
    return [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]


def _bits(t):
    return t.detach().clone().view(torch.uint8) if t.element_size() == 1 else t.detach().clone()


def _check_schema_bitwise(op, args, kwargs):
    """What test_schema checks, without allclose: only (a!) arguments change (bitwise) and
    no returned tensor aliases an input."""
    schema = op._schema
    mutable = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    named = dict(zip([a.name for a in schema.arguments], args))
    named.update(kwargs)
    before = {n: _bits(t) for n, t in named.items() if isinstance(t, torch.Tensor)}
    result = op(*args, **kwargs)
    for n, t in named.items():
        if isinstance(t, torch.Tensor) and n not in mutable:
            assert torch.equal(_bits(t), before[n]), f"{schema.name}: argument {n} was mutated"
    outs = result if isinstance(result, (tuple, list)) else [result]
    for o in outs:
        if isinstance(o, torch.Tensor):
            for n, t in named.items():
                if isinstance(t, torch.Tensor):
                    assert not torch._C._overlaps(o, t), f"{schema.name}: an output aliases {n}"


def _opcheck(op, args, kwargs=None):
    kwargs = kwargs or {}
    if any(t.dtype == FP8 for t in _tensors(args, kwargs)):
        _check_schema_bitwise(op, args, kwargs)
        torch.library.opcheck(op, args, kwargs, test_utils=_NO_SCHEMA_UTILS)
    else:
        torch.library.opcheck(op, args, kwargs)


# Each builder returns (args, kwargs) for torch.ops.mate.fmha_fwd on `device`.


def _fwd_dense(device):
    q = _rand(2, 5, 4, 16, device=device)
    k = _rand(2, 7, 4, 16, device=device)
    v = _rand(2, 7, 4, 16, device=device)
    return (q, k, v), {}


def _fwd_dense_gqa_fp16(device):  # GQA (H=4, Hk=2) and head_dim_v != head_dim
    q = _rand(2, 5, 4, 16, dtype=torch.float16, device=device)
    k = _rand(2, 7, 2, 16, dtype=torch.float16, device=device)
    v = _rand(2, 7, 2, 8, dtype=torch.float16, device=device)
    return (q, k, v), {}


def _fwd_varlen_bf16(device):  # ragged q and k with cu_seqlens, one empty q sequence
    lq, lk = [3, 5, 0, 2], [4, 6, 2, 5]
    q = _rand(sum(lq), 4, 16, dtype=torch.bfloat16, device=device)
    k = _rand(sum(lk), 2, 16, dtype=torch.bfloat16, device=device)
    v = _rand(sum(lk), 2, 16, dtype=torch.bfloat16, device=device)
    return (q, k, v), dict(cu_seqlens_q=_cu(lq, device), cu_seqlens_k=_cu(lk, device),
                           max_seqlen_q=max(lq), max_seqlen_k=max(lk), causal=True)


def _fwd_paged(device):  # paged k/v (page_table + seqused_k), ragged q, GQA
    lq, lk = [3, 2], [7, 10]
    k_dense = _rand(2, 10, 2, 16, device=device)
    v_dense = _rand(2, 10, 2, 16, device=device)
    k, v, page_table = make_paged_kv(k_dense, v_dense, lk, page_size=4)
    q = _rand(sum(lq), 4, 16, device=device)
    return (q, k, v), dict(cu_seqlens_q=_cu(lq, device), max_seqlen_q=max(lq),
                           seqused_k=_i32(lk, device), page_table=page_table, causal=True)


def _fwd_causal_window(device):
    (q, k, v), _ = _fwd_dense(device)
    return (q, k, v), dict(causal=True, window_size_left=2)


def _fwd_local_window(device):
    (q, k, v), _ = _fwd_dense(device)
    return (q, k, v), dict(window_size_left=3, window_size_right=1)


def _fwd_softcap_bf16(device):
    q = _rand(2, 5, 4, 16, dtype=torch.bfloat16, device=device) * 4
    k = _rand(2, 7, 4, 16, dtype=torch.bfloat16, device=device)
    v = _rand(2, 7, 4, 16, dtype=torch.bfloat16, device=device)
    return (q, k, v), dict(softcap=2.5, softmax_scale=0.5)


def _fwd_learnable_sink(device):
    (q, k, v), _ = _fwd_dense(device)
    return (q, k, v), dict(learnable_sink=_rand(4, device=device), causal=True)


def _fwd_qv_fp16(device):
    q = _rand(2, 5, 4, 16, dtype=torch.float16, device=device)
    k = _rand(2, 7, 2, 16, dtype=torch.float16, device=device)
    v = _rand(2, 7, 2, 8, dtype=torch.float16, device=device)
    qv = _rand(2, 5, 4, 8, dtype=torch.float16, device=device)
    return (q, k, v), dict(qv=qv)


def _fwd_num_splits3(device):  # 300 keys = 3 key blocks of 128, so 3 splits really happen
    lq, lk = [3, 2], [300, 40]
    q = _rand(sum(lq), 2, 8, device=device)
    k = _rand(sum(lk), 1, 8, device=device)
    v = _rand(sum(lk), 1, 8, device=device)
    return (q, k, v), dict(cu_seqlens_q=_cu(lq, device), cu_seqlens_k=_cu(lk, device),
                           max_seqlen_q=max(lq), max_seqlen_k=max(lk), num_splits=3)


def _fwd_fp8_descale(device):
    q = _rand(2, 5, 4, 16, dtype=FP8, device=device)
    k = _rand(2, 7, 2, 16, dtype=FP8, device=device)
    v = _rand(2, 7, 2, 16, dtype=FP8, device=device)
    d = [torch.rand(2, 2, device=device) + 0.5 for _ in range(3)]
    return (q, k, v), dict(q_descale=d[0], k_descale=d[1], v_descale=d[2], causal=True)


def _fwd_cache_batch_idx(device):  # cache rows, leftpad, seqused_q/k, attention_chunk
    q = _rand(2, 5, 4, 16, device=device)
    k = _rand(3, 9, 2, 16, device=device)
    v = _rand(3, 9, 2, 16, device=device)
    return (q, k, v), dict(cache_batch_idx=_i32([2, 0], device), cache_leftpad=_i32([1, 2], device),
                           seqused_k=_i32([7, 9], device), seqused_q=_i32([5, 3], device),
                           attention_chunk=4, causal=True)


def _fwd_scheduler_metadata(device):
    (q, k, v), kw = _fwd_varlen_bf16(device)
    meta = MATE.get_scheduler_metadata(4, kw["max_seqlen_q"], kw["max_seqlen_k"], 4, 2, 16, 16,
                                       torch.bfloat16, _i32([4, 6, 2, 5], device),
                                       cu_seqlens_q=kw["cu_seqlens_q"],
                                       cu_seqlens_k=kw["cu_seqlens_k"], causal=True)
    return (q, k, v), dict(kw, scheduler_metadata=meta, num_splits=0)


def _fwd_context_parallel(device):
    (q, k, v), _ = _fwd_dense(device)
    return (q, k, v), dict(cp_world_size=2, cp_rank=1, cp_tot_seqused_k=_i32([13, 14], device),
                           causal=True)


def _fwd_out_dtype(device):
    (q, k, v), _ = _fwd_dense(device)
    return (q, k, v), dict(out_dtype=torch.bfloat16)


FWD_CASES = {
    "dense_fp32": _fwd_dense,
    "dense_gqa_fp16_dv8": _fwd_dense_gqa_fp16,
    "varlen_bf16_causal": _fwd_varlen_bf16,
    "paged_seqused_k": _fwd_paged,
    "causal_window": _fwd_causal_window,
    "local_window": _fwd_local_window,
    "softcap_bf16": _fwd_softcap_bf16,
    "learnable_sink": _fwd_learnable_sink,
    "qv_fp16": _fwd_qv_fp16,
    "num_splits3": _fwd_num_splits3,
    "fp8_descale": _fwd_fp8_descale,
    "cache_batch_idx_leftpad_chunk": _fwd_cache_batch_idx,
    "scheduler_metadata": _fwd_scheduler_metadata,
    "context_parallel": _fwd_context_parallel,
    "out_dtype_bf16": _fwd_out_dtype,
}

# fmha_fwd_out reuses these (it has no out_dtype: the dtype of `out` decides).
FWD_OUT_CASES = [name for name in FWD_CASES if name != "out_dtype_bf16"]


@pytest.mark.parametrize("case", list(FWD_CASES))
def test_opcheck_fmha_fwd(device, case):
    args, kwargs = FWD_CASES[case](device)
    _opcheck(MATE.fmha_fwd.default, args, kwargs)


@pytest.mark.parametrize("case", FWD_OUT_CASES)
def test_opcheck_fmha_fwd_out(device, case):
    (q, k, v), kwargs = FWD_CASES[case](device)
    out_ref, lse_ref = MATE.fmha_fwd(q, k, v, **kwargs)
    out = poison_(torch.empty_like(out_ref))
    lse = poison_(torch.empty_like(lse_ref))
    _opcheck(MATE.fmha_fwd_out.default, (q, k, v, out, lse), kwargs)


def _combine_inputs(device, shape, num_splits=3, dead_splits=False):
    """fp32 partials (S, *shape, Dv) and lse (S, *shape); optionally -inf / NaN splits."""
    out_partial = _rand(num_splits, *shape, 8, device=device)
    lse_partial = _rand(num_splits, *shape, device=device) * 3
    if dead_splits:
        lse_partial[0, ..., 0] = -math.inf  # one split of some rows is empty
        lse_partial[1, ..., 1] = float("nan")
        lse_partial[:, ..., 2] = -math.inf  # every split of some rows is empty
        out_partial[0, ..., 0, :] = float("nan")  # garbage under a dead split weighs 0
    return out_partial, lse_partial


COMBINE_CASES = {
    "dense": dict(shape=(2, 5, 4)),
    "varlen": dict(shape=(7, 4)),
    "one_split": dict(shape=(2, 5, 4), num_splits=1),
    "dead_splits": dict(shape=(2, 5, 4), dead_splits=True),
}


@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(COMBINE_CASES))
def test_opcheck_fmha_combine(device, case, out_dtype):
    out_partial, lse_partial = _combine_inputs(device, **COMBINE_CASES[case])
    _opcheck(MATE.fmha_combine.default, (out_partial, lse_partial, out_dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(COMBINE_CASES))
def test_opcheck_fmha_combine_out(device, case, dtype):
    out_partial, lse_partial = _combine_inputs(device, **COMBINE_CASES[case])
    out = poison_(torch.empty(out_partial.shape[1:], dtype=dtype, device=device))
    lse = poison_(torch.empty(lse_partial.shape[1:], dtype=torch.float32, device=device))
    _opcheck(MATE.fmha_combine_out.default, (out_partial, lse_partial, out, lse))


def _sched_basic(device):
    return (3, 5, 40, 4, 2, 16, 16, torch.bfloat16, _i32([40, 7, 23], device)), {}


def _sched_varlen(device):
    return (3, 5, 40, 4, 2, 16, 8, torch.float16, _i32([40, 7, 23], device)), dict(
        cu_seqlens_q=_cu([5, 2, 4], device), cu_seqlens_k=_cu([40, 7, 23], device),
        seqused_q=_i32([5, 1, 4], device), causal=True, window_size_left=8)


def _sched_paged_kvcache(device):
    return (2, 1, 300, 8, 1, 64, 64, FP8, _i32([300, 129], device)), dict(
        cache_leftpad=_i32([3, 0], device), cu_seqlens_k_new=_cu([2, 1], device), page_size=16,
        max_seqlen_k_new=2, has_softcap=True, attention_chunk=64, pack_gqa=True)


def _sched_num_splits3(device):
    return (2, 4, 400, 2, 2, 32, 32, torch.float32, _i32([400, 250], device)), dict(
        num_splits=3, causal=True, sm_margin=4)


SCHED_CASES = {
    "basic": _sched_basic,
    "varlen_window": _sched_varlen,
    "paged_kvcache_fp8": _sched_paged_kvcache,
    "num_splits3": _sched_num_splits3,
}


@pytest.mark.parametrize("case", list(SCHED_CASES))
def test_opcheck_get_scheduler_metadata(device, case):
    args, kwargs = SCHED_CASES[case](device)
    _opcheck(MATE.get_scheduler_metadata.default, args, kwargs)


# ============================================================================ torch.compile
# Distinct sizes everywhere in the first batch (no accidental duck-sized symbols, no 0/1
# specialization): total_q, total_k, B + 1, max_seqlen_q/k, H, Hk, D all differ.
VARLEN_BATCHES = [
    ([3, 5], [4, 6]),
    ([2, 7, 4], [5, 7, 9]),
    ([6, 3, 2, 5], [6, 8, 2, 5]),
    ([9, 4, 3, 2, 8], [9, 4, 6, 3, 8]),
]
H, HK, D = 4, 2, 16


def _varlen_inputs(lq, lk, device, dtype=torch.float32):
    q = _rand(sum(lq), H, D, dtype=dtype, device=device)
    k = _rand(sum(lk), HK, D, dtype=dtype, device=device)
    v = _rand(sum(lk), HK, D, dtype=dtype, device=device)
    return q, k, v, _cu(lq, device), _cu(lk, device), max(lq), max(lk)


def _check_against_oracle(out, q, k, v, cu_q, cu_k, lse=None, **kw):
    out_ref, lse_ref = fmha_ref(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **kw)
    out_low, lse_low = fmha_ref(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                compute_dtype=q.dtype, **kw)
    assert_close_fa3(out, out_ref, out_low)
    if lse is not None:
        assert_close_fa3(lse, lse_ref, lse_low, name="lse", input_dtype=q.dtype)


def test_compile_varlen_dynamic_no_recompile(device):
    torch._dynamo.reset()
    cnt = CompileCounter()

    @torch.compile(backend=cnt, fullgraph=True, dynamic=True)
    def attn(q, k, v, cu_q, cu_k, max_q, max_k):
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)

    for lq, lk in VARLEN_BATCHES:
        q, k, v, cu_q, cu_k, max_q, max_k = _varlen_inputs(lq, lk, device)
        out = attn(q, k, v, cu_q, cu_k, max_q, max_k)
        eager = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)
        torch.testing.assert_close(out, eager, rtol=0, atol=0)
        _check_against_oracle(out, q, k, v, cu_q, cu_k, causal=True)
    assert cnt.frame_count == 1, f"expected 1 compile over {len(VARLEN_BATCHES)} batches, got {cnt.frame_count}"
    assert cnt.op_count >= 1


class TinyAttention(torch.nn.Module):
    """Token-packed attention block: qkv projection, varlen causal attention, out projection."""

    def __init__(self, embed=32, heads=H, heads_k=HK):
        super().__init__()
        self.heads, self.heads_k, self.head_dim = heads, heads_k, embed // heads
        self.qkv = torch.nn.Linear(embed, (heads + 2 * heads_k) * self.head_dim)
        self.proj = torch.nn.Linear(heads * self.head_dim, embed)

    def forward(self, x, cu_seqlens, max_seqlen):
        t = x.shape[0]
        qkv = self.qkv(x).view(t, self.heads + 2 * self.heads_k, self.head_dim)
        q, k, v = qkv.split([self.heads, self.heads_k, self.heads_k], dim=1)
        o = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                   causal=True)
        return self.proj(o.reshape(t, -1))


def test_compile_module_inductor(device):
    torch._dynamo.reset()
    counters.clear()
    model = TinyAttention().to(device).eval()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for lengths in ([3, 6], [5, 2, 7], [4, 9, 2, 6]):
            x = _rand(sum(lengths), 32, device=device)
            cu = _cu(lengths, device)
            out = compiled(x, cu, max(lengths))
            torch.testing.assert_close(out, model(x, cu, max(lengths)), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_compile_return_softmax_lse(device):
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, dynamic=True)
    def attn(q, k, v, cu_q, cu_k, max_q, max_k):
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=True,
                                      window_size=(3, -1), return_softmax_lse=True)

    for lq, lk in VARLEN_BATCHES[:2]:
        q, k, v, cu_q, cu_k, max_q, max_k = _varlen_inputs(lq, lk, device, dtype=torch.bfloat16)
        out, lse = attn(q, k, v, cu_q, cu_k, max_q, max_k)
        out_e, lse_e = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=True,
                                              window_size=(3, -1), return_softmax_lse=True)
        assert lse.shape == (H, q.shape[0]) and lse.dtype == torch.float32
        torch.testing.assert_close(out, out_e, rtol=0, atol=0)
        torch.testing.assert_close(lse, lse_e, rtol=0, atol=0)
        _check_against_oracle(out, q, k, v, cu_q, cu_k, lse=lse, causal=True, window_size=(3, -1))


def test_compile_out_mutation(device):
    """out= under inductor: written in place (same storage), equal to eager."""
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, dynamic=True)
    def attn(q, k, v, cu_q, cu_k, max_q, max_k, out):
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, out=out)

    for i, (lq, lk) in enumerate(VARLEN_BATCHES[:2]):
        q, k, v, cu_q, cu_k, max_q, max_k = _varlen_inputs(lq, lk, device)
        out = poison_(torch.empty_like(q))
        ptr = out.data_ptr()
        if i == 0:  # inductor re-inplaces the functionalized op: no copy of `out`
            res, (code, *_) = run_and_get_code(attn, q, k, v, cu_q, cu_k, max_q, max_k, out)
            assert "mate.fmha_fwd_out.default(" in code and "copy_" not in code, code
        else:
            res = attn(q, k, v, cu_q, cu_k, max_q, max_k, out)
        assert res is out
        assert out.data_ptr() == ptr
        eager = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)
        torch.testing.assert_close(out, eager, rtol=0, atol=0)
        _check_against_oracle(out, q, k, v, cu_q, cu_k, causal=True)


def test_compile_combine(device):
    torch._dynamo.reset()
    counters.clear()

    @torch.compile(fullgraph=True, dynamic=True)
    def combine(out_partial, lse_partial):
        return flash_attn_combine(out_partial, lse_partial, out_dtype=torch.bfloat16)

    @torch.compile(fullgraph=True, dynamic=True)
    def combine_out(out_partial, lse_partial, out):
        return flash_attn_combine(out_partial, lse_partial, out=out)

    for i, (shape, splits) in enumerate((((2, 5, 4), 3), ((3, 6, 7), 2), ((4, 9), 5))):
        out_partial, lse_partial = _combine_inputs(device, shape, splits, dead_splits=True)
        out_ref, lse_ref = combine_ref(out_partial, lse_partial, out_dtype=torch.float32)

        # out= (mutation): re-inplaced by inductor, no copy of `out`. run_and_get_code
        # resets dynamo, so it only runs on the very first call.
        buf = poison_(torch.empty(out_partial.shape[1:], device=device))
        if i == 0:
            (res, lse2), (code, *_) = run_and_get_code(combine_out, out_partial, lse_partial, buf)
            assert "mate.fmha_combine_out.default(" in code and "copy_" not in code, code
        else:
            res, lse2 = combine_out(out_partial, lse_partial, buf)
        assert res is buf
        torch.testing.assert_close(buf, out_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse2, lse_ref, rtol=1e-5, atol=1e-5)

        out, lse = combine(out_partial, lse_partial)
        out_e, lse_e = flash_attn_combine(out_partial, lse_partial, out_dtype=torch.bfloat16)
        assert out.dtype == torch.bfloat16 and out.shape == out_partial.shape[1:]
        torch.testing.assert_close(out, out_e, rtol=0, atol=0)
        torch.testing.assert_close(lse, lse_e, rtol=0, atol=0)
        torch.testing.assert_close(out.float(), out_ref, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(lse, lse_ref, rtol=1e-5, atol=1e-5)
    # one graph each for combine and combine_out (the 4-D varlen layout is a new rank:
    # dynamic=True covers sizes, not ranks, so each function compiles once more for it)
    assert counters["stats"]["unique_graphs"] == 4, dict(counters["stats"])


# ============================================================================ export / AOTI
class VarlenBlock(torch.nn.Module):
    """A Linear projection around the varlen API (what export / AOTInductor see)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(H * D, 24)

    def forward(self, q, k, v, cu_q, cu_k, max_q, max_k):
        o = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)
        return self.proj(o.reshape(q.shape[0], -1))


def _export_varlen_block(device):
    model = VarlenBlock().to(device).eval()
    example = _varlen_inputs(*VARLEN_BATCHES[0], device)
    total_q, total_k, batch1 = Dim("total_q", min=2), Dim("total_k", min=2), Dim("batch1", min=2)
    dynamic_shapes = ({0: total_q}, {0: total_k}, {0: total_k}, {0: batch1}, {0: batch1},
                      Dim.DYNAMIC, Dim.DYNAMIC)
    exported = torch.export.export(model, example, dynamic_shapes=dynamic_shapes)
    return model, exported


def test_export_round_trip(device):
    model, exported = _export_varlen_block(device)
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert MATE.fmha_fwd.default in targets, targets
    module = exported.module()
    with torch.no_grad():
        for lq, lk in VARLEN_BATCHES:
            inputs = _varlen_inputs(lq, lk, device)
            torch.testing.assert_close(module(*inputs), model(*inputs), rtol=0, atol=0)


def test_aoti_compile_and_package(tmp_path):
    """One AOTInductor build (CPU): the package calls torch.ops.mate.fmha_fwd, which is
    registered in this process because mate_ops is imported."""
    model, exported = _export_varlen_block("cpu")
    path = torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "varlen.pt2"))
    loaded = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        for lq, lk in VARLEN_BATCHES[:3]:
            inputs = _varlen_inputs(lq, lk, "cpu")
            torch.testing.assert_close(loaded(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)
