"""Regression tests for known defects (SEMANTICS §1, §6). Each test states the behaviour
the contract requires; some fail until the C++ / fake-kernel fixes land.

a. Page-id range checks whose page count overflows int32 (fmha_fwd's page_table check,
   mla_decode's block_table check): a clean RuntimeError naming the table, never a crash
   or std::bad_alloc. Each call runs in a subprocess, so a segfault fails one test only.
b. Mixed devices: an argument on the ``meta`` device next to CPU tensors must be rejected
   with an error that names the argument (today the fake kernel runs and returns tensors).
c. A rejected flash_attn_with_kvcache call with k/v given changes nothing: arguments that
   only the attention step checks must be rejected before the append writes the cache.
d. Error messages name the argument the caller passed (k_cache, cache_seqlens).

    cd /work/wt-tests && PYTHONPATH=. python3 -m pytest -q tests/test_defects.py
"""
import json
import math
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import mate_ops  # noqa: F401  (registers torch.ops.mate.*)
from mate_ops import mha_interface as mi

OP = torch.ops.mate
BF16, I32, I64 = torch.bfloat16, torch.int32, torch.int64


def _names(*parts):
    """Regex that matches when every part occurs somewhere in the message (any order)."""
    return "".join(f"(?=.*(?:{p}))" for p in parts)


def _word(name):
    """Regex for `name` as a whole identifier (``k`` does not match inside ``k_cache``)."""
    return rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])"


def _bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _i32(vals):
    return torch.tensor(vals, dtype=I32)


def _rnd(*shape, dtype=BF16):
    return torch.randn(*shape).to(dtype)


# ==========================================================================================
# a. page-id checks whose page count overflows int32: run in a subprocess
# ==========================================================================================
# The address space of the child is capped at 4 GiB: the defective MLA path grows a vector
# towards 2^31 entries before std::bad_alloc, which must not eat the machine's memory.
_PRELUDE = """
import resource
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
import json, torch, mate_ops
op, i32 = torch.ops.mate, torch.int32
P = (1 << 20) + 1
def report(**kw):
    print("RESULT " + json.dumps(kw), flush=True)
try:
    {stmt}
    report(ok=True)
except BaseException as e:
    report(ok=False, exc=type(e).__name__, msg=str(e).splitlines()[0] if str(e) else "")
"""

# (id, statement, regex the RuntimeError message must match)
# Sequence 0 has P * 2047 keys (or 2^31 - 1) in pages of P = 2^20 + 1 keys: the page count
# (start + len + P - 1) / P overflows int32, so a 32-bit check loop runs zero times and the
# kernel then reads page 10^9 (segfault) or reserves 2^31 key slots (std::bad_alloc).
OVERFLOW_CASES = [
    ("fmha_fwd_page_table",
     "op.fmha_fwd(torch.ones(1, 1, 1, 1), torch.ones(1, P, 1, 1), torch.ones(1, P, 1, 1), "
     "seqused_k=torch.tensor([P * 2047], dtype=i32), page_table=torch.full((1, 2047), 10**9, dtype=i32))",
     r"page_table"),
    ("fmha_fwd_out_page_table",
     "op.fmha_fwd_out(torch.ones(1, 1, 1, 1), torch.ones(1, P, 1, 1), torch.ones(1, P, 1, 1), "
     "torch.empty(1, 1, 1, 1), torch.empty(1, 1, 1), "
     "seqused_k=torch.tensor([P * 2047], dtype=i32), page_table=torch.full((1, 2047), 10**9, dtype=i32))",
     r"page_table"),
    ("flash_attn_varlen_func_page_table",
     "mate_ops.flash_attn_varlen_func(torch.ones(1, 1, 1, 1), torch.ones(1, P, 1, 1), torch.ones(1, P, 1, 1), "
     "seqused_k=torch.tensor([P * 2047], dtype=i32), page_table=torch.full((1, 2047), 10**9, dtype=i32))",
     r"page_table"),
    # attention over a paged cache without append: cache_seqlens is the key length
    ("flash_attn_with_kvcache_page_table",
     "mate_ops.flash_attn_with_kvcache(torch.ones(1, 1, 1, 1), torch.ones(1, P, 1, 1), torch.ones(1, P, 1, 1), "
     "cache_seqlens=torch.tensor([P * 2047], dtype=i32), page_table=torch.full((1, 2047), 10**9, dtype=i32))",
     r"page_table"),
    # the same through cache_batch_idx (page-table row 1 of 2)
    ("fmha_fwd_page_table_batch_idx",
     "op.fmha_fwd(torch.ones(1, 1, 1, 1), torch.ones(1, P, 1, 1), torch.ones(1, P, 1, 1), "
     "seqused_k=torch.tensor([P * 2047], dtype=i32), page_table=torch.full((2, 2047), 10**9, dtype=i32), "
     "cache_batch_idx=torch.tensor([1], dtype=i32))",
     r"page_table"),
    # MLA dense decode: (len + P - 1) / P with len = 2^31 - 1 (within max_blocks * P = 2^31 + 2048)
    ("mla_decode_block_table",
     "op.mla_decode(torch.ones(1, 1, 1, 1), torch.ones(1, P, 1, 1), torch.full((1, 2048), 10**9, dtype=i32), "
     "torch.tensor([2**31 - 1], dtype=i32), 1)",
     r"block_table"),
    ("mla_decode_block_table_len_pages_minus_one",
     "op.mla_decode(torch.ones(1, 1, 1, 1), torch.ones(1, P, 1, 1), torch.full((1, 2048), 10**9, dtype=i32), "
     "torch.tensor([2**31 - P + 1], dtype=i32), 1)",
     r"block_table"),
]


def _run_isolated(stmt):
    code = textwrap.dedent(_PRELUDE).format(stmt=stmt)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    rc = p.returncode
    assert rc == 0, (f"process died (exit status {rc}{' = signal ' + str(-rc) if rc < 0 else ''}) on: {stmt}\n"
                     f"stderr tail: {p.stderr[-600:]}")
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, f"no result printed; stderr tail: {p.stderr[-600:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("cid,stmt,regex", OVERFLOW_CASES, ids=[c[0] for c in OVERFLOW_CASES])
def test_page_count_overflow_is_a_clean_error(cid, stmt, regex):
    res = _run_isolated(stmt)
    assert not res["ok"], f"garbage page ids were accepted: {stmt}"
    assert res["exc"] == "RuntimeError" and re.search(regex, res["msg"]), (
        f"expected a RuntimeError naming {regex!r}, got {res['exc']}: {res['msg']}")


# ==========================================================================================
# b. an argument on the meta device next to CPU tensors
# ==========================================================================================
def fmha_dense():
    return dict(q=_rnd(2, 3, 4, 16), k=_rnd(2, 5, 2, 16), v=_rnd(2, 5, 2, 16))


def fmha_ragged():
    return dict(q=_rnd(7, 4, 16), k=_rnd(9, 2, 16), v=_rnd(9, 2, 16), cu_seqlens_q=_i32([0, 3, 7]),
                cu_seqlens_k=_i32([0, 4, 9]), max_seqlen_q=4, max_seqlen_k=5)


def fmha_paged():
    return dict(q=_rnd(2, 3, 4, 16), k=_rnd(6, 4, 2, 16), v=_rnd(6, 4, 2, 16),
                page_table=_i32([[5, 0, 3], [1, 4, 2]]), seqused_k=_i32([10, 7]))


def fmha_sink():
    return dict(fmha_dense(), learnable_sink=torch.randn(4))


def fmha_out():
    kw = fmha_dense()
    out, lse = OP.fmha_fwd(**kw)
    return dict(kw, out=torch.empty_like(out), lse=torch.empty_like(lse))


def append_dense():
    return dict(k_cache=_rnd(2, 8, 2, 32), v_cache=_rnd(2, 8, 2, 32), k=_rnd(2, 3, 2, 32), v=_rnd(2, 3, 2, 32),
                cache_seqlens=_i32([2, 5]))


def append_paged():
    return dict(k_cache=_rnd(6, 4, 2, 32), v_cache=_rnd(6, 4, 2, 32), k=_rnd(2, 3, 2, 32), v=_rnd(2, 3, 2, 32),
                cache_seqlens=_i32([6, 2]), page_table=_i32([[5, 0, 3], [1, 4, 2]]))


def _tables(rows=12, half=8):
    angle = torch.rand(rows, half, dtype=torch.float64) * 6.28
    return angle.cos().to(BF16), angle.sin().to(BF16)


def append_rotary():
    cos, sin = _tables()
    return dict(append_dense(), rotary_cos=cos, rotary_sin=sin)


def rope():
    cos, sin = _tables(rows=8)
    return dict(x=_rnd(2, 2, 4, 32), cos=cos, sin=sin, seqlen_offsets=_i32([0, 5]))


def combine():
    return dict(out_partial=torch.randn(3, 2, 5, 4, 16), lse_partial=torch.randn(3, 2, 5, 4))


def combine_out():
    kw = combine()
    out, lse = OP.fmha_combine(**kw)
    return dict(kw, out=torch.empty_like(out), lse=torch.empty_like(lse))


def mla_dense():
    return dict(q=_rnd(2, 2, 4, 576), k_cache=_rnd(6, 4, 1, 576), block_table=_i32([[5, 0, 3], [1, 4, 2]]),
                cache_seqlens=_i32([10, 7]), head_dim_v=512, causal=True)


def mla_with_metadata():
    kw = mla_dense()
    meta, splits = OP.get_mla_metadata(kw["cache_seqlens"], 8, 1)
    return dict(kw, tile_scheduler_metadata=meta, num_splits=splits)


def mla_sparse():
    idx = torch.randint(0, 24, (2, 2, 5), dtype=I32)
    return dict(q=_rnd(2, 2, 4, 576), k_cache=_rnd(6, 4, 1, 576), block_table=None, cache_seqlens=None,
                head_dim_v=512, indices=idx, topk_length=_i32([5, 3]), attn_sink=torch.randn(4))


def mla_prefill():
    return dict(q=_rnd(3, 4, 64), kv=_rnd(10, 1, 64), indices=torch.randint(0, 10, (3, 1, 4), dtype=I32),
                sm_scale=0.125, d_v=32, topk_length=_i32([4, 2, 0]))


MIXED_BASES = dict(fmha_dense=(OP.fmha_fwd, fmha_dense), fmha_ragged=(OP.fmha_fwd, fmha_ragged),
                   fmha_paged=(OP.fmha_fwd, fmha_paged), fmha_sink=(OP.fmha_fwd, fmha_sink),
                   fmha_out=(OP.fmha_fwd_out, fmha_out), append_dense=(OP.kvcache_append, append_dense),
                   append_paged=(OP.kvcache_append, append_paged), append_rotary=(OP.kvcache_append, append_rotary),
                   rope=(OP.rotary_embedding, rope), combine=(OP.fmha_combine, combine),
                   combine_out=(OP.fmha_combine_out, combine_out), mla_dense=(OP.mla_decode, mla_dense),
                   mla_with_metadata=(OP.mla_decode, mla_with_metadata), mla_sparse=(OP.mla_decode, mla_sparse),
                   mla_prefill=(OP.mla_sparse_prefill, mla_prefill))

# (base, argument moved to meta, name the error must contain)
MIXED = [
    ("fmha_dense", "k", "k"), ("fmha_dense", "v", "v"), ("fmha_dense", "q", "q"),
    ("fmha_ragged", "cu_seqlens_q", "cu_seqlens_q"), ("fmha_ragged", "cu_seqlens_k", "cu_seqlens_k"),
    ("fmha_paged", "page_table", "page_table"), ("fmha_paged", "seqused_k", "seqused_k"),
    ("fmha_sink", "learnable_sink", "learnable_sink"),
    ("fmha_out", "out", "out"), ("fmha_out", "lse", "lse"), ("fmha_out", "q", "q"), ("fmha_out", "k", "k"),
    ("append_dense", "k_cache", "k_cache"), ("append_dense", "v_cache", "v_cache"), ("append_dense", "k", "k"),
    ("append_dense", "v", "v"), ("append_dense", "cache_seqlens", "cache_seqlens"),
    ("append_paged", "page_table", "page_table"), ("append_rotary", "rotary_cos", "rotary_cos"),
    ("rope", "x", "x"), ("rope", "cos", "cos"), ("rope", "sin", "sin"),
    ("rope", "seqlen_offsets", "seqlen_offsets"),
    ("combine", "out_partial", "out_partial"), ("combine", "lse_partial", "lse_partial"),
    ("combine_out", "out", "out"), ("combine_out", "lse", "lse"),
    ("mla_dense", "q", "q"), ("mla_dense", "k_cache", "k_cache"), ("mla_dense", "block_table", "block_table"),
    ("mla_dense", "cache_seqlens", "cache_seqlens"),
    # get_mla_metadata's schedule computed on the meta device, handed to a CPU decode
    ("mla_with_metadata", "tile_scheduler_metadata", "tile_scheduler_metadata"),
    ("mla_with_metadata", "num_splits", "num_splits"),
    ("mla_sparse", "indices", "indices"), ("mla_sparse", "topk_length", "topk_length"),
    ("mla_sparse", "attn_sink", "attn_sink"),
    ("mla_prefill", "q", "q"), ("mla_prefill", "kv", "kv"), ("mla_prefill", "indices", "indices"),
    ("mla_prefill", "topk_length", "topk_length"),
]


@pytest.mark.parametrize("base", list(MIXED_BASES))
def test_mixed_device_baselines_succeed(base):
    op, build = MIXED_BASES[base]
    op(**build())


@pytest.mark.parametrize("base,name,label", MIXED, ids=[f"{b}-{n}" for b, n, _ in MIXED])
def test_meta_argument_next_to_cpu_tensors_rejected(base, name, label):
    op, build = MIXED_BASES[base]
    kw = build()
    kw[name] = kw[name].to("meta")
    cpu_before = {n: t.clone() for n, t in kw.items() if isinstance(t, torch.Tensor) and t.device.type == "cpu"}
    with pytest.raises((RuntimeError, ValueError), match=_word(label)):
        op(**kw)
    for n, before in cpu_before.items():  # in-place ops (append, *_out) must not have written
        assert torch.equal(_bits(kw[n]), _bits(before)), f"rejected call modified {n}"


def test_get_mla_metadata_on_meta_matches_cpu_shapes():
    """get_mla_metadata has a single tensor argument: on meta it is a valid fake call whose
    shapes must equal the CPU call's (they depend on arguments only, SEMANTICS §3)."""
    lens = _i32([10, 7, 3])
    meta, splits = OP.get_mla_metadata(lens.to("meta"), 8, 1)
    cmeta, csplits = OP.get_mla_metadata(lens, 8, 1)
    assert meta.device.type == "meta" and splits.device.type == "meta"
    assert meta.shape == cmeta.shape and splits.shape == csplits.shape
    assert meta.dtype == cmeta.dtype == I32 and splits.dtype == csplits.dtype == I32


# ==========================================================================================
# c. flash_attn_with_kvcache with k/v: a call rejected by the attention step changes nothing
# ==========================================================================================
B, SQ, H, HK, D, CAP = 2, 2, 4, 2, 32, 8


def api_dense():
    return dict(q=_rnd(B, SQ, H, D), k_cache=_rnd(B, CAP, HK, D), v_cache=_rnd(B, CAP, HK, D),
                k=_rnd(B, 3, HK, D), v=_rnd(B, 3, HK, D), cache_seqlens=_i32([2, 5]), causal=True)


def api_paged():
    kw = api_dense()
    kw.update(k_cache=_rnd(6, 4, HK, D), v_cache=_rnd(6, 4, HK, D), cache_seqlens=_i32([6, 2]),
              page_table=_i32([[5, 0, 3], [1, 4, 2]]))
    return kw


def api_rotary():
    cos, sin = _tables()
    return dict(api_dense(), rotary_cos=cos, rotary_sin=sin, rotary_interleaved=False)


def api_packed():  # packed new keys (2 + 3), ragged q (1 + 2 rows)
    kw = api_dense()
    kw.update(q=_rnd(3, H, D), cu_seqlens_q=_i32([0, 1, 3]), max_seqlen_q=2, k=_rnd(5, HK, D), v=_rnd(5, HK, D),
              cu_seqlens_k_new=_i32([0, 2, 5]), cache_seqlens=_i32([3, 1]))
    return kw


API_BASES = dict(dense=api_dense, paged=api_paged, rotary=api_rotary, packed=api_packed)


def _ragged_q(cu, max_seqlen_q):
    def mutate(kw):
        kw.update(q=_rnd(max(cu), H, D), cu_seqlens_q=_i32(cu), max_seqlen_q=max_seqlen_q)
    return mutate


def _set(**vals):
    def mutate(kw):
        kw.update({n: (v(kw) if callable(v) else v) for n, v in vals.items()})
    return mutate


# (id, mutation, regex the error must match)
ATTENTION_ONLY = [
    ("qv_wrong_head_dim", _set(qv=lambda kw: _rnd(*kw["q"].shape[:-1], 16)), _word("qv")),
    ("qv_wrong_rows", _set(qv=lambda kw: _rnd(kw["q"].shape[0] + 1, *kw["q"].shape[1:])), _word("qv")),
    ("q_descale_on_bf16", _set(q_descale=torch.ones(B, HK)), _word("q_descale")),
    ("softcap_inf", _set(softcap=math.inf), _word("softcap")),
    ("softcap_nan", _set(softcap=math.nan), _word("softcap")),
    ("softmax_scale_inf", _set(softmax_scale=math.inf), _word("softmax_scale")),
    ("softmax_scale_neg_inf", _set(softmax_scale=-math.inf), _word("softmax_scale")),
    ("softmax_scale_nan", _set(softmax_scale=math.nan), _word("softmax_scale")),
    ("cp_world_size_2_without_cp_tot_seqused_k", _set(cp_world_size=2, cp_rank=1), _word("cp_tot_seqused_k")),
    ("cp_rank_out_of_range", _set(cp_world_size=2, cp_rank=2, cp_tot_seqused_k=_i32([20, 20])), _word("cp_rank")),
    ("scheduler_metadata_wrong_size", _set(scheduler_metadata=torch.ones(B + 3, dtype=I32)),
     _word("scheduler_metadata")),
    ("learnable_sink_int32", _set(learnable_sink=torch.ones(H, dtype=I32)), _word("learnable_sink")),
    ("learnable_sink_int64", _set(learnable_sink=torch.ones(H, dtype=I64)), _word("learnable_sink")),
    ("max_seqlen_q_negative", _ragged_q([0, 2, 4], -1), _word("max_seqlen_q")),
    ("cu_seqlens_q_decreasing", _ragged_q([0, 3, 2], 3), _word("cu_seqlens_q")),
    ("cu_seqlens_q_beyond_q_rows", lambda kw: kw.update(q=_rnd(3, H, D), cu_seqlens_q=_i32([0, 2, 5]),
                                                         max_seqlen_q=3), _word("cu_seqlens_q")),
]


@pytest.mark.parametrize("base", list(API_BASES))
def test_api_baselines_succeed_and_append(base):
    kw = API_BASES[base]()
    before = kw["k_cache"].clone()
    out = mi.flash_attn_with_kvcache(**kw)
    assert out.float().isfinite().all()
    assert not torch.equal(_bits(kw["k_cache"]), _bits(before)), "the baseline must write the cache"


@pytest.mark.parametrize("base", ["dense", "paged", "rotary"])
@pytest.mark.parametrize("cid,mutate,regex", ATTENTION_ONLY, ids=[c[0] for c in ATTENTION_ONLY])
def test_rejected_append_changes_nothing(cid, mutate, regex, base):
    kw = API_BASES[base]()
    mutate(kw)
    before = {n: t.clone() for n, t in kw.items() if isinstance(t, torch.Tensor)}
    with pytest.raises((RuntimeError, ValueError), match=regex):
        mi.flash_attn_with_kvcache(**kw)
    for n in ("k_cache", "v_cache"):
        assert torch.equal(_bits(kw[n]), _bits(before[n])), f"the rejected call wrote {n}"
    for n, t in before.items():
        assert torch.equal(_bits(kw[n]), _bits(t)), f"the rejected call modified {n}"


# ==========================================================================================
# d. messages name the argument the caller passed
# ==========================================================================================
_K_CACHE_LAYOUT = _names(_word("k_cache"), r"4-D|\(\w+, \w+, num_heads_k, head_dim\)")


@pytest.mark.parametrize("append", [True, False], ids=["append", "no_append"])
@pytest.mark.parametrize("base", ["dense", "paged"])
def test_k_cache_rank3_message(append, base):
    kw = API_BASES[base]()
    if not append:
        del kw["k"], kw["v"]
    kw["k_cache"] = kw["k_cache"][0]
    with pytest.raises((RuntimeError, ValueError), match=_K_CACHE_LAYOUT) as info:
        mi.flash_attn_with_kvcache(**kw)
    assert "(?)" not in str(info.value)


@pytest.mark.parametrize("append", [True, False], ids=["append", "no_append"])
@pytest.mark.parametrize("base", ["dense", "paged", "rotary"])
def test_int64_cache_seqlens_named_cache_seqlens(append, base):
    if base == "rotary" and not append:
        pytest.skip("rotary needs k/v")
    kw = API_BASES[base]()
    if not append:
        del kw["k"], kw["v"]
    kw["cache_seqlens"] = kw["cache_seqlens"].to(I64)
    with pytest.raises((RuntimeError, ValueError), match=_names(_word("cache_seqlens"), r"int32")) as info:
        mi.flash_attn_with_kvcache(**kw)
    assert "seqused_k" not in str(info.value), f"reported under the internal name: {info.value}"
