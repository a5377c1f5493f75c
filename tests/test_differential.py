"""Property-based differential tests (hypothesis) of the public FMHA / kv-cache APIs against
the pure-PyTorch oracle (SEMANTICS §1, §2).

- ``mate_ops.mha_interface.flash_attn_varlen_func``: dense or ragged q (``cu_seqlens_q``,
  rows past the last sequence), dense / ragged (``cu_seqlens_k``) / paged (random page size,
  shuffled pages, NaN in every unused slot, spare page-table columns pointing at a NaN page) k/v, ``seqused_q`` / ``seqused_k``, GQA,
  ``D != Dv``, ``qv``, fp32/bf16/fp16, causal, window ``(left, right)`` with -1,
  ``attention_chunk``, ``softcap``, ``softmax_scale``, ``learnable_sink``, ``num_splits``
  0 / 1 / n, ``pack_gqa``, lse always returned; with ``out=`` into a NaN-poisoned buffer.
  Against ``mate_ops.testing.fmha_ref`` with FA3's tolerance rule (``assert_close_fa3``).
- ``mate_ops.mha_interface.flash_attn_with_kvcache``: dense or paged cache,
  ``cache_batch_idx``, ``cache_leftpad``, new k/v (batched or packed with
  ``cu_seqlens_k_new``) with rotary (interleaved or NeoX, partial rotary dim,
  ``rotary_seqlens``), int or tensor ``cache_seqlens``, causal / local / chunk, softcap,
  sink, splits. Against ``kvcache_append_ref`` + ``rotary_ref`` + ``fmha_ref``; the whole
  cache after the call is checked too (bitwise without rotary). Cache slots that must never
  be read (before the left padding, past the new keys) hold NaN.

Shapes are tiny (CPU). Every example draws its structure from hypothesis and its tensor
values from a torch generator seeded by a drawn integer, so a failure report (the drawn
dict is printed) reproduces exactly.

Profiles:
- default (normal suite): derandomized, a few hundred examples in all, no example database;
- ``differential_long`` (tests named ``*_long``): thousands of random examples, skipped
  unless ``--run-long-differential`` is given or ``MATE_DIFFERENTIAL_LONG=1`` is set;
  ``MATE_DIFFERENTIAL_EXAMPLES`` (default 2500) sets the examples per long test:

    PYTHONPATH=. python3 -m pytest -q tests/test_differential.py --run-long-differential
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mate_ops import mha_interface as mi
from mate_ops import testing as T

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

DEFAULT_FMHA_EXAMPLES = 150
DEFAULT_KVCACHE_EXAMPLES = 110
LONG_EXAMPLES = int(os.environ.get("MATE_DIFFERENTIAL_EXAMPLES", "2500"))

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=list(HealthCheck))


def _default(n):
    return settings(max_examples=n, derandomize=True, **_COMMON)


LONG = settings(max_examples=LONG_EXAMPLES, derandomize=False, **_COMMON)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def _randn(gen, *shape, dtype, mag=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float32) * mag).to(dtype)


def _bits(t):
    """A view that compares bitwise (NaN payloads included)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _cu(lengths):
    return T.random_cu_seqlens(lengths)


def _oracle(q, k, v, **kw):
    """(exact out in fp64, out dtype, lse, low-precision out) of the oracle.

    FA3's rule compares errors against the fp64 reference. The reference is NOT rounded to
    the output dtype here: on outputs of a few elements a value near a rounding midpoint
    would otherwise cost a whole bf16 ulp that the low-precision error (measured on the
    same few elements) need not cover. Against the exact value, out and the low-precision
    reference both pay their own final rounding, which keeps the rule meaningful on tiny
    shapes (found by hypothesis: a bf16 decode of 2 keys, out 1.59375 vs exact 1.5978059,
    rounded reference 1.6015625)."""
    exact, lse = T.fmha_ref(q, k, v, out_dtype=torch.float64, **kw)
    out_dtype = torch.bfloat16 if q.dtype == torch.float8_e4m3fn else q.dtype  # SEMANTICS §1
    low, _ = T.fmha_ref(q, k, v, compute_dtype=q.dtype, **kw)
    return exact, out_dtype, lse, low


def _compare(out, lse, ref, lse_ref, dtype, what):
    exact, out_dtype, _, out_low = ref
    assert out.dtype == out_dtype, f"{what}: out dtype {out.dtype} != {out_dtype}"
    assert tuple(out.shape) == tuple(exact.shape), f"{what}: out shape {tuple(out.shape)} != {tuple(exact.shape)}"
    T.assert_close_fa3(out, exact, out_low, input_dtype=dtype, name=f"{what} out")
    lse = lse.cpu()
    assert tuple(lse.shape) == tuple(lse_ref.shape), f"{what}: lse shape {tuple(lse.shape)} != {tuple(lse_ref.shape)}"
    assert lse.dtype == torch.float32
    assert not torch.isnan(lse).any(), f"{what}: NaN in lse"
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), finite), f"{what}: lse infinities differ from the oracle"
    assert torch.equal(lse[~finite], lse_ref[~finite]), f"{what}: lse infinities of the wrong sign"
    torch.testing.assert_close(lse[finite], lse_ref[finite], atol=2e-3, rtol=1e-4, msg=lambda m: f"{what} lse: {m}")


# strategies shared by both APIs
_windows = st.tuples(st.one_of(st.just(-1), st.integers(0, 8)), st.one_of(st.just(-1), st.integers(0, 8)))
_chunks = st.one_of(st.just(0), st.just(0), st.integers(1, 9))
_softcaps = st.one_of(st.just(0.0), st.just(0.0), st.sampled_from([0.5, 2.0, 7.5, 30.0]))
_splits = st.sampled_from([0, 1, 1, 2, 3, 5, 16])


def _length(hi):
    """A sequence length in [0, hi], 0 only about once in ten draws (hypothesis favours 0)."""
    return st.tuples(st.integers(0, 9), st.integers(1, hi)).map(lambda t: 0 if t[0] == 0 else t[1])


# ------------------------------------------------------------------------------------------
# flash_attn_varlen_func
# ------------------------------------------------------------------------------------------
@st.composite
def fmha_cases(draw):
    c = {}
    c["dtype"] = draw(st.sampled_from(list(DTYPES)))
    B = c["batch"] = draw(st.integers(1, 3))
    c["hk"] = draw(st.integers(1, 2))
    c["group"] = draw(st.sampled_from([1, 2, 3]))
    c["d"] = draw(st.sampled_from([8, 16, 24, 32, 64]))
    c["dv"] = draw(st.one_of(st.just(c["d"]), st.sampled_from([8, 16, 40])))
    c["qv"] = draw(st.booleans()) and draw(st.booleans())  # 1 in 4

    # queries
    c["q_layout"] = draw(st.sampled_from(["dense", "ragged"]))
    if c["q_layout"] == "dense":
        sq = draw(_length(6))
        c["q_lens"] = [sq] * B
        c["q_extra_rows"] = 0
    else:
        c["q_lens"] = draw(st.lists(_length(6), min_size=B, max_size=B))
        c["q_extra_rows"] = draw(st.sampled_from([0, 0, 0, 2]))  # rows that belong to no sequence
    c["seqused_q"] = None
    if draw(st.booleans()) and draw(st.booleans()):
        c["seqused_q"] = [draw(st.integers(0, n)) for n in c["q_lens"]]

    # keys
    c["k_layout"] = draw(st.sampled_from(["dense", "ragged", "paged", "paged"]))
    c["seqused_k"] = None
    if c["k_layout"] == "dense":
        sk = draw(_length(12))
        c["k_lens"] = [sk] * B
        if draw(st.booleans()):
            c["seqused_k"] = [draw(st.integers(0, sk)) for _ in range(B)]
    elif c["k_layout"] == "ragged":
        c["k_lens"] = draw(st.lists(_length(12), min_size=B, max_size=B))
        c["k_extra_rows"] = draw(st.sampled_from([0, 0, 3]))
        if draw(st.booleans()):
            # FA3: sequence b reads seqused_k[b] keys from cu_seqlens_k[b], possibly past its segment
            starts = [sum(c["k_lens"][:b]) for b in range(B)]
            total = sum(c["k_lens"]) + c["k_extra_rows"]
            c["seqused_k"] = [draw(st.integers(0, min(total - starts[b], c["k_lens"][b] + 3))) for b in range(B)]
    else:
        c["k_lens"] = draw(st.lists(_length(12), min_size=B, max_size=B))
        c["page_size"] = draw(st.integers(1, 6))
        c["spare_cols"] = draw(st.integers(0, 2))  # page-table columns past every sequence's pages

    # masks and options
    c["causal"] = draw(st.booleans())
    c["window"] = draw(st.one_of(st.just((-1, -1)), _windows))
    c["chunk"] = draw(_chunks)
    c["softcap"] = draw(_softcaps)
    c["sink"] = draw(st.booleans())
    c["softmax_scale"] = draw(st.one_of(st.none(), st.none(), st.sampled_from([0.05, 0.3, 1.0, 1.7])))
    c["num_splits"] = draw(_splits)
    c["pack_gqa"] = draw(st.sampled_from([None, False, True]))
    c["q_mag"] = draw(st.sampled_from([1.0, 1.0, 4.0]))
    c["use_out"] = draw(st.booleans())
    c["seed"] = draw(st.integers(0, 2**31 - 1))
    return c


def build_fmha(c):
    gen = torch.Generator().manual_seed(c["seed"])
    dt = DTYPES[c["dtype"]]
    B, hk, d, dv = c["batch"], c["hk"], c["d"], c["dv"]
    h = hk * c["group"]
    kw = {}
    if c["q_layout"] == "dense":
        q = _randn(gen, B, c["q_lens"][0], h, d, dtype=dt, mag=c["q_mag"])
        qv = _randn(gen, B, c["q_lens"][0], h, dv, dtype=dt) if c["qv"] else None
    else:
        tq = sum(c["q_lens"]) + c["q_extra_rows"]
        q = _randn(gen, tq, h, d, dtype=dt, mag=c["q_mag"])
        qv = _randn(gen, tq, h, dv, dtype=dt) if c["qv"] else None
        kw["cu_seqlens_q"] = _cu(c["q_lens"])
        kw["max_seqlen_q"] = max(c["q_lens"])
    if c["seqused_q"] is not None:
        kw["seqused_q"] = torch.tensor(c["seqused_q"], dtype=torch.int32)
    if c["k_layout"] == "dense":
        k = _randn(gen, B, c["k_lens"][0], hk, d, dtype=dt)
        v = _randn(gen, B, c["k_lens"][0], hk, dv, dtype=dt)
    elif c["k_layout"] == "ragged":
        tk = sum(c["k_lens"]) + c["k_extra_rows"]
        k, v = _randn(gen, tk, hk, d, dtype=dt), _randn(gen, tk, hk, dv, dtype=dt)
        kw["cu_seqlens_k"] = _cu(c["k_lens"])
        kw["max_seqlen_k"] = max(c["k_lens"])
    else:
        cap = max(c["k_lens"] + [1])
        kd, vd = _randn(gen, B, cap, hk, d, dtype=dt), _randn(gen, B, cap, hk, dv, dtype=dt)
        k, v, pt = T.make_paged_kv(kd, vd, c["k_lens"], c["page_size"], generator=gen)
        if c["spare_cols"]:  # extra columns point at the poisoned spare page (valid id, NaN content)
            P = c["page_size"]
            used = {int(x) for b in range(B) for x in pt[b, :(c["k_lens"][b] + P - 1) // P]}
            spare = next(i for i in range(k.shape[0]) if i not in used)
            pt = torch.cat([pt, torch.full((B, c["spare_cols"]), spare, dtype=torch.int32)], dim=1)
        kw["page_table"] = pt
        kw["seqused_k"] = torch.tensor(c["k_lens"], dtype=torch.int32)
    if c["seqused_k"] is not None:
        kw["seqused_k"] = torch.tensor(c["seqused_k"], dtype=torch.int32)
    if qv is not None:
        kw["qv"] = qv
    if c["sink"]:
        kw["learnable_sink"] = torch.randn(h, generator=gen) * 2
    kw.update(causal=c["causal"], window_size=c["window"], attention_chunk=c["chunk"], softcap=c["softcap"],
              softmax_scale=c["softmax_scale"])
    return q, k, v, kw


def check_fmha_case(c):
    q, k, v, kw = build_fmha(c)
    dt = q.dtype
    ref_kw = {n: x for n, x in kw.items() if n not in ("max_seqlen_q", "max_seqlen_k")}
    ref = _oracle(q, k, v, **ref_kw)
    lse_ref = ref[2]
    opts = dict(kw, num_splits=c["num_splits"], pack_gqa=c["pack_gqa"], return_softmax_lse=True)
    out, lse = mi.flash_attn_varlen_func(q, k, v, **opts)
    _compare(out, lse, ref, lse_ref, dt, "flash_attn_varlen_func")
    if c["use_out"]:
        buf = T.poison_(torch.empty(ref[0].shape, dtype=ref[1]))
        out2, lse2 = mi.flash_attn_varlen_func(q, k, v, out=buf, **opts)
        assert out2.data_ptr() == buf.data_ptr(), "out= was not returned"
        _compare(out2, lse2, ref, lse_ref, dt, "flash_attn_varlen_func(out=)")


@_default(DEFAULT_FMHA_EXAMPLES)
@given(fmha_cases())
def test_flash_attn_varlen_func_matches_oracle(c):
    check_fmha_case(c)


@pytest.mark.differential_long
@LONG
@given(fmha_cases())
def test_flash_attn_varlen_func_matches_oracle_long(c):
    check_fmha_case(c)


# ------------------------------------------------------------------------------------------
# flash_attn_with_kvcache
# ------------------------------------------------------------------------------------------
@st.composite
def kvcache_cases(draw):
    c = {}
    c["dtype"] = draw(st.sampled_from(list(DTYPES)))
    B = c["batch"] = draw(st.integers(1, 3))
    c["hk"] = draw(st.integers(1, 2))
    c["group"] = draw(st.sampled_from([1, 2, 3]))
    c["d"] = draw(st.sampled_from([16, 32, 48, 64]))
    c["dv"] = draw(st.one_of(st.just(c["d"]), st.sampled_from([8, 16, 40])))
    c["page_size"] = draw(st.sampled_from([0, 0, 1, 2, 3, 4, 5, 7]))  # 0: dense cache
    c["cap"] = draw(st.integers(1, 20))  # keys per cache row
    c["extra_rows"] = draw(st.sampled_from([0, 0, 1, 2]))
    c["batch_idx"] = draw(st.booleans())

    c["append"] = draw(st.sampled_from(["none", "dense", "dense", "packed", "packed"]))
    if c["append"] == "dense":
        n = draw(_length(min(4, c["cap"])))
        c["new_lens"] = [n] * B
    elif c["append"] == "packed":
        c["new_lens"] = [draw(_length(min(4, c["cap"]))) for _ in range(B)]
    else:
        c["new_lens"] = [0] * B
    c["int_seqlens"] = draw(st.booleans()) and draw(st.booleans())
    if c["int_seqlens"]:
        s = draw(st.integers(0, c["cap"] - max(c["new_lens"])))
        c["cache_lens"] = [s] * B
    else:
        c["cache_lens"] = [draw(st.integers(0, c["cap"] - n)) for n in c["new_lens"]]
    c["leftpad"] = None
    if draw(st.booleans()):
        c["leftpad"] = [draw(st.integers(0, s + n)) for s, n in zip(c["cache_lens"], c["new_lens"])]

    c["q_layout"] = draw(st.sampled_from(["dense", "dense", "ragged"]))
    if c["q_layout"] == "dense":
        c["q_lens"] = [draw(st.integers(1, 4))] * B
    else:
        c["q_lens"] = [draw(_length(4)) for _ in range(B)]

    c["rotary"] = None
    if c["append"] != "none":
        c["rotary"] = draw(st.sampled_from([None, "interleaved", "neox"]))
    if c["rotary"]:
        c["rotary_dim"] = draw(st.sampled_from([r for r in (16, 32, 48, 64) if r <= c["d"]]))
        c["rotary_seqlens"] = None
        if draw(st.booleans()):
            c["rotary_seqlens"] = [draw(st.integers(0, 12)) for _ in range(B)]

    c["causal"] = draw(st.booleans())
    c["window"] = draw(st.one_of(st.just((-1, -1)), _windows))
    c["chunk"] = draw(_chunks)
    c["softcap"] = draw(_softcaps)
    c["sink"] = draw(st.booleans())
    c["num_splits"] = draw(_splits)
    c["seed"] = draw(st.integers(0, 2**31 - 1))
    return c


def check_kvcache_case(c):
    gen = torch.Generator().manual_seed(c["seed"])
    dt = DTYPES[c["dtype"]]
    B, hk, d, dv, cap = c["batch"], c["hk"], c["d"], c["dv"], c["cap"]
    h = hk * c["group"]
    rows = B + c["extra_rows"] if c["batch_idx"] else B
    idx = torch.randperm(rows, generator=gen)[:B].to(torch.int32) if c["batch_idx"] else None
    cache_lens, new_lens = c["cache_lens"], c["new_lens"]
    leftpad = c["leftpad"] or [0] * B

    # the cache: slots that must never be read (before leftpad, past the last new key) and the
    # slots the append must overwrite hold NaN
    kd, vd = _randn(gen, rows, cap, hk, d, dtype=dt), _randn(gen, rows, cap, hk, dv, dtype=dt)
    for b in range(B):
        r = int(idx[b]) if idx is not None else b
        for t in range(cap):
            if t < leftpad[b] or t >= cache_lens[b]:
                T.poison_(kd[r, t])
                T.poison_(vd[r, t])
    if c["page_size"]:
        k_cache, v_cache, page_table = T.make_paged_kv(kd, vd, [cap] * rows, c["page_size"], generator=gen)
    else:
        k_cache, v_cache, page_table = kd, vd, None

    if c["q_layout"] == "dense":
        q = _randn(gen, B, c["q_lens"][0], h, d, dtype=dt)
        cu_q = None
    else:
        q = _randn(gen, sum(c["q_lens"]), h, d, dtype=dt)
        cu_q = _cu(c["q_lens"])
    k_new = v_new = cu_new = None
    if c["append"] == "dense":
        k_new, v_new = _randn(gen, B, new_lens[0], hk, d, dtype=dt), _randn(gen, B, new_lens[0], hk, dv, dtype=dt)
    elif c["append"] == "packed":
        k_new, v_new = _randn(gen, sum(new_lens), hk, d, dtype=dt), _randn(gen, sum(new_lens), hk, dv, dtype=dt)
        cu_new = _cu(new_lens)
    cos = sin = rot_lens = None
    if c["rotary"]:
        need = max(max(cache_lens) + max(new_lens), max(c["rotary_seqlens"] or [0]) + max(max(new_lens), max(c["q_lens"])))
        angle = torch.rand(need + max(c["q_lens"]) + 2, c["rotary_dim"] // 2, generator=gen, dtype=torch.float64) * 6.28
        cos, sin = angle.cos().to(dt), angle.sin().to(dt)
        if c["rotary_seqlens"] is not None:
            rot_lens = torch.tensor(c["rotary_seqlens"], dtype=torch.int32)
    sink = torch.randn(h, generator=gen) * 2 if c["sink"] else None
    cache_lens_t = torch.tensor(cache_lens, dtype=torch.int32)
    leftpad_t = torch.tensor(c["leftpad"], dtype=torch.int32) if c["leftpad"] is not None else None
    left, right = c["window"]
    interleaved = c["rotary"] == "interleaved"

    # ---- expected: caches after the append, rotated q, attention over the new caches
    if c["append"] != "none":
        kc_exp, vc_exp = T.kvcache_append_ref(k_cache, v_cache, k_new, v_new, cache_lens, cu_seqlens_k_new=cu_new,
                                              page_table=page_table, cache_batch_idx=idx, rotary_cos=cos,
                                              rotary_sin=sin, rotary_seqlens=c.get("rotary_seqlens"),
                                              rotary_interleaved=interleaved)
    else:
        kc_exp, vc_exp = k_cache, v_cache
    q_exp = q
    if c["rotary"]:
        offs = c["rotary_seqlens"] if c["rotary_seqlens"] is not None else cache_lens
        # per row when the mask depends on the row: causal, local or chunked (FA3's is_local)
        per_row = c["causal"] or left >= 0 or right >= 0 or c["chunk"] > 0
        positions = [offs[b] + (t if per_row else 0) for b in range(B) for t in range(c["q_lens"][b])]
        flat = q if cu_q is not None else q.flatten(0, 1)
        flat = T.rotary_ref(flat, cos, sin, positions, interleaved)
        q_exp = flat if cu_q is not None else flat.view_as(q)
    seqused = cache_lens_t + torch.tensor(new_lens, dtype=torch.int32)
    ref_kw = dict(cu_seqlens_q=cu_q, seqused_k=seqused, page_table=page_table, cache_batch_idx=idx,
                  cache_leftpad=leftpad_t, causal=c["causal"], window_size=(left, right), learnable_sink=sink,
                  softcap=c["softcap"], attention_chunk=c["chunk"])
    ref = _oracle(q_exp, kc_exp, vc_exp, **ref_kw)
    lse_ref = ref[2]

    # ---- ours
    kc, vc = k_cache.clone(), v_cache.clone()
    res = mi.flash_attn_with_kvcache(
        q, kc, vc, k_new, v_new, rotary_cos=cos, rotary_sin=sin,
        cache_seqlens=cache_lens[0] if c["int_seqlens"] else cache_lens_t, cache_batch_idx=idx,
        cache_leftpad=leftpad_t, page_table=page_table, cu_seqlens_q=cu_q, cu_seqlens_k_new=cu_new,
        max_seqlen_q=max(c["q_lens"]), rotary_seqlens=rot_lens, causal=c["causal"], window_size=(left, right),
        learnable_sink=sink, attention_chunk=c["chunk"], softcap=c["softcap"], rotary_interleaved=interleaved,
        num_splits=c["num_splits"], return_softmax_lse=True)
    assert len(res) == 4, f"flash_attn_with_kvcache returned {len(res)} values, MATE returns 4"
    out, lse = res[0], res[1]

    # the caches: exactly the expected ones (appended slots and everything else)
    assert torch.equal(_bits(vc), _bits(vc_exp)), "v_cache differs from the expected cache"
    if c["rotary"]:
        assert torch.equal(torch.isnan(kc.float()), torch.isnan(kc_exp.float())), "k_cache: NaN pattern differs"
        torch.testing.assert_close(kc.float(), kc_exp.float(), atol=1e-2, rtol=1e-2, equal_nan=True)
        changed = (_bits(kc) != _bits(kc_exp)).flatten(0, 1).any(-1).any(-1)
        assert int(changed.sum()) <= sum(new_lens), "k_cache slots outside the appended ones changed"
    else:
        assert torch.equal(_bits(kc), _bits(kc_exp)), "k_cache differs from the expected cache"
    _compare(out, lse, ref, lse_ref, dt, "flash_attn_with_kvcache")


@_default(DEFAULT_KVCACHE_EXAMPLES)
@given(kvcache_cases())
def test_flash_attn_with_kvcache_matches_oracle(c):
    check_kvcache_case(c)


@pytest.mark.differential_long
@LONG
@given(kvcache_cases())
def test_flash_attn_with_kvcache_matches_oracle_long(c):
    check_kvcache_case(c)
