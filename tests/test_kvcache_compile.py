"""Registration and compile tests of the kv-cache ops (SEMANTICS §1 "Append and rotary"):

- ``torch.library.opcheck`` of ``mate::kvcache_append`` (dense / paged caches, packed new
  keys, cache_batch_idx, rotary GPT-J / NeoX with rotary_dim < head_dim, rotary_seqlens, fp8)
  and ``mate::rotary_embedding`` (dense / ragged, positions per row or not, fp16/bf16/fp32),
  test_schema included (it catches undeclared mutation) wherever torch can run it;
- a decode step through ``flash_attn_with_kvcache`` under ``torch.compile(fullgraph=True,
  dynamic=True)``: one graph over steps with different batch sizes and cache lengths, outputs
  and caches equal to eager (dense caches and a persistent paged pool);
- the inductor code of that step appends into the caller's cache buffers (no clone/copy);
- ``torch.export`` of a decode module that mutates its cache inputs, round trip equal to eager;
- ``return_softmax_lse=True`` arity (4 values; 2 on the MLA route) eager and compiled.
"""
import re

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code
from torch.export import Dim

import mate_ops  # noqa: F401  (registers torch.ops.mate.* and the fake kernels)
from mate_ops.mha_interface import flash_attn_with_kvcache
from mate_ops.testing import kvcache_append_ref, make_paged_kv, poison_, random_cu_seqlens, rotary_ref
from test_compile import _opcheck

FP8 = torch.float8_e4m3fn
MATE = torch.ops.mate


def _rand(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=torch.float32, device=device).to(dtype)


def _i32(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


def _cu(lengths, device):
    return random_cu_seqlens(lengths).to(device)


def _tables(rows, rotary_dim, dtype, device):
    angle = torch.rand(rows, rotary_dim // 2, dtype=torch.float64) * 6.28
    return angle.cos().to(dtype).to(device), angle.sin().to(dtype).to(device)


def _bits(t):
    """A view that compares bitwise (NaN patterns and fp8 included)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _assert_same(a, b, what):
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
    assert torch.equal(_bits(a), _bits(b)), f"{what} differs (max abs diff {(a.float() - b.float()).abs().nan_to_num(0).max()})"


# ============================================================================ opcheck: kvcache_append
# Each builder returns (args, kwargs) for torch.ops.mate.kvcache_append on `device`. Cache slots
# that are not written are random (dense) or poisoned NaN (paged, from make_paged_kv).
HK, D, DV = 2, 32, 16


def _append_dense(device, dtype=torch.float32, snew=2):
    kc, vc = _rand(3, 12, HK, D, dtype=dtype, device=device), _rand(3, 12, HK, DV, dtype=dtype, device=device)
    k, v = _rand(3, snew, HK, D, dtype=dtype, device=device), _rand(3, snew, HK, DV, dtype=dtype, device=device)
    return [kc, vc, k, v, _i32([3, 0, 12 - snew], device)], {}


def _append_paged(device, page_size, dtype=torch.float32, lens=(5, 0, 17), snew=3):
    cap = 24
    kd, vd = _rand(len(lens), cap, HK, D, dtype=dtype), _rand(len(lens), cap, HK, DV, dtype=dtype)
    kc, vc, pt = make_paged_kv(kd, vd, [cap] * len(lens), page_size)  # every sequence owns cap slots
    k, v = _rand(len(lens), snew, HK, D, dtype=dtype), _rand(len(lens), snew, HK, DV, dtype=dtype)
    return [t.to(device) for t in (kc, vc, k, v)] + [_i32(list(lens), device)], dict(page_table=pt.to(device))


def _packed(args, kwargs, device, new_lens=(4, 0, 2)):
    kc, vc, _, _, cs = args
    k = _rand(sum(new_lens), HK, D, dtype=kc.dtype, device=device)
    v = _rand(sum(new_lens), HK, DV, dtype=kc.dtype, device=device)
    return [kc, vc, k, v, cs], dict(kwargs, cu_seqlens_k_new=_cu(list(new_lens), device))


def _batch_idx(device, paged, dtype=torch.float32, page_size=4):
    if paged:  # page-table rows picked by cache_batch_idx
        (kc, vc, k, v, cs), kw = _append_paged(device, page_size, dtype, lens=(5, 0, 17, 9, 1))
        return [kc, vc, k[:3], v[:3], cs[:3]], dict(kw, cache_batch_idx=_i32([4, 1, 2], device))
    kc, vc = _rand(5, 12, HK, D, dtype=dtype, device=device), _rand(5, 12, HK, DV, dtype=dtype, device=device)
    k, v = _rand(3, 2, HK, D, dtype=dtype, device=device), _rand(3, 2, HK, DV, dtype=dtype, device=device)
    return [kc, vc, k, v, _i32([3, 0, 10], device)], dict(cache_batch_idx=_i32([4, 0, 2], device))


def _rotary(args, kwargs, device, rotary_dim, interleaved, rotary_seqlens=None):
    cos, sin = _tables(40, rotary_dim, args[0].dtype, device)
    kw = dict(kwargs, rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved)
    if rotary_seqlens is not None:
        kw["rotary_seqlens"] = _i32(rotary_seqlens, device)
    return args, kw


APPEND_CASES = {
    "dense_fp32": lambda d: _append_dense(d),
    "dense_fp16_snew1": lambda d: _append_dense(d, torch.float16, snew=1),
    "dense_bf16": lambda d: _append_dense(d, torch.bfloat16),
    "paged_p1_bf16": lambda d: _append_paged(d, 1, torch.bfloat16),
    "paged_p16": lambda d: _append_paged(d, 16),  # sequence 2 crosses the page boundary at 16
    "paged_p16_fp16": lambda d: _append_paged(d, 16, torch.float16, lens=(14, 3, 0)),
    "packed_dense": lambda d: _packed(*_append_dense(d), d),
    "packed_paged_p16": lambda d: _packed(*_append_paged(d, 16), d, new_lens=(7, 0, 5)),
    "batch_idx_dense": lambda d: _batch_idx(d, paged=False),
    "batch_idx_paged": lambda d: _batch_idx(d, paged=True),
    "rotary_gptj_r16_fp32": lambda d: _rotary(*_append_dense(d), d, 16, True),
    "rotary_neox_r16_fp16": lambda d: _rotary(*_append_dense(d, torch.float16), d, 16, False),
    "rotary_neox_r32_bf16_paged_p1": lambda d: _rotary(*_append_paged(d, 1, torch.bfloat16), d, 32, False),
    "rotary_gptj_r16_paged_p16_seqlens": lambda d: _rotary(*_append_paged(d, 16), d, 16, True,
                                                           rotary_seqlens=[0, 30, 2]),
    "rotary_neox_r16_packed_seqlens": lambda d: _rotary(*_packed(*_append_dense(d), d), d, 16, False,
                                                        rotary_seqlens=[7, 1, 30]),
    "rotary_gptj_batch_idx_paged": lambda d: _rotary(*_batch_idx(d, paged=True), d, 16, True),
    "fp8_dense": lambda d: _append_dense(d, FP8),
    "fp8_paged_p16_packed": lambda d: _packed(*_append_paged(d, 16, FP8), d),
    "fp8_batch_idx_paged_p1": lambda d: _batch_idx(d, paged=True, dtype=FP8, page_size=1),
}


@pytest.mark.parametrize("case", list(APPEND_CASES))
def test_opcheck_kvcache_append(device, case):
    args, kwargs = APPEND_CASES[case](device)
    # the op really appends: the caches after the call are the oracle's (rotary within rounding)
    kc_exp, vc_exp = kvcache_append_ref(*[t.cpu() for t in args[:4]], args[4].tolist(),
                                        **{n: (t.cpu() if isinstance(t, torch.Tensor) else t)
                                           for n, t in kwargs.items()})
    kc, vc = args[0].clone(), args[1].clone()
    MATE.kvcache_append(kc, vc, *args[2:], **kwargs)
    _assert_same(vc.cpu(), vc_exp, "v_cache")
    if "rotary_cos" in kwargs:
        torch.testing.assert_close(kc.cpu().float(), kc_exp.float(), atol=1e-2, rtol=1e-2, equal_nan=True)
    else:
        _assert_same(kc.cpu(), kc_exp, "k_cache")
    # test_schema (undeclared mutation / aliasing), fake kernel, autograd registration, AOT
    # dispatch (functionalization of the (a!) caches) with dynamic shapes; fp8 inputs go
    # through test_compile._opcheck's bitwise stand-in for test_schema (no fp8 allclose).
    _opcheck(MATE.kvcache_append.default, args, kwargs)


def test_opcheck_kvcache_append_mutation_is_declared(device):
    """Guard for the guard: the schema marks exactly the two caches as mutated, and
    test_schema really runs (and passes) for a non-fp8 case."""
    schema = MATE.kvcache_append.default._schema
    written = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert written == ["k_cache", "v_cache"], written
    assert [r for r in schema.returns] == []
    args, kwargs = _rotary(*_append_dense(device), device, 16, False)
    torch.library.opcheck(MATE.kvcache_append.default, args, kwargs, test_utils=("test_schema",))


# ============================================================================ opcheck: rotary_embedding
def _rotary_case(device, dtype, ragged, per_row, interleaved, rotary_dim):
    heads, hd = 3, 32
    cos, sin = _tables(48, rotary_dim, dtype, device)
    if ragged:
        lens = [3, 0, 5, 2]
        x = _rand(sum(lens), heads, hd, dtype=dtype, device=device)
        return (x, cos, sin, _i32([0, 7, 40, 11], device)), dict(
            cu_seqlens=_cu(lens, device), max_seqlen=max(lens), interleaved=interleaved, positions_per_row=per_row)
    x = _rand(2, 5, heads, hd, dtype=dtype, device=device)
    return (x, cos, sin, _i32([4, 43], device)), dict(interleaved=interleaved, positions_per_row=per_row)


def _rotary_expected(args, kwargs):
    """rotary_embedding through the oracle (row positions of SEMANTICS §1)."""
    x, cos, sin, offs = [t.cpu() for t in args]
    per_row, inter = kwargs["positions_per_row"], kwargs["interleaved"]
    if "cu_seqlens" in kwargs:
        cu = kwargs["cu_seqlens"].tolist()
        pos = [int(offs[b]) + ((r - cu[b]) if per_row else 0) for b in range(len(cu) - 1) for r in range(cu[b], cu[b + 1])]
        return rotary_ref(x, cos, sin, pos, inter)
    bsz, s = x.shape[:2]
    pos = [int(offs[b]) + (t if per_row else 0) for b in range(bsz) for t in range(s)]
    return rotary_ref(x.flatten(0, 1), cos, sin, pos, inter).view_as(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("per_row", [True, False], ids=["per_row", "one_pos"])
@pytest.mark.parametrize("layout", ["dense", "ragged"])
@pytest.mark.parametrize("interleaved,rotary_dim", [(True, 16), (False, 16), (False, 32)],
                         ids=["gptj_r16", "neox_r16", "neox_r32"])
def test_opcheck_rotary_embedding(device, dtype, per_row, layout, interleaved, rotary_dim):
    args, kwargs = _rotary_case(device, dtype, layout == "ragged", per_row, interleaved, rotary_dim)
    x_before = args[0].clone()
    out = MATE.rotary_embedding(*args, **kwargs)
    _assert_same(args[0], x_before, "x (must not be mutated)")
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out.cpu(), _rotary_expected(args, kwargs), **tol)
    _opcheck(MATE.rotary_embedding.default, args, kwargs)


# ============================================================================ decode step under compile
H, ROT = 4, 16  # query heads, rotary dim (< D = 32)
ROT_ROWS = 80  # rows of the cos/sin tables (positions 0..79)


def step(q, k_cache, v_cache, k_new, v_new, cache_seqlens, page_table, cos, sin):
    """One decode step: rotate q and the new keys, append k/v in place, causal attention."""
    return flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, rotary_cos=cos, rotary_sin=sin,
                                   cache_seqlens=cache_seqlens, page_table=page_table, causal=True,
                                   rotary_interleaved=False)


# Dense steps: (batch, cache capacity, cache_seqlens). Fresh caches each step. The first step's
# sizes are all distinct from each other and from H, HK, D, ROT/2, ROT_ROWS (no duck-sized
# symbols), none is 0 or 1 (no specialization). Lengths include an empty and a full cache.
DENSE_STEPS = [
    (3, 40, [0, 17, 39]),
    (5, 24, [23, 0, 4, 11, 9]),
    (2, 56, [55, 30]),
    (6, 33, [1, 2, 32, 0, 16, 8]),
]


def _dense_step_inputs(device, bsz, cap, lens, snew=1, dtype=torch.float32):
    kc, vc = _rand(bsz, cap, HK, D, dtype=dtype, device=device), _rand(bsz, cap, HK, D, dtype=dtype, device=device)
    for b, n in enumerate(lens):  # slots past the appended keys are never read: poison them
        poison_(kc[b, n + snew:])
        poison_(vc[b, n + snew:])
    q = _rand(bsz, snew, H, D, dtype=dtype, device=device)
    k, v = _rand(bsz, snew, HK, D, dtype=dtype, device=device), _rand(bsz, snew, HK, D, dtype=dtype, device=device)
    return q, kc, vc, k, v, _i32(lens, device)


class PagedPool:
    """A persistent paged kv pool of N_SEQ sequences (page size P, MAX_PAGES pages each, randomly
    permuted pages + one poisoned spare). Each step serves a different subset of the sequences,
    appends SNEW tokens to each and grows their lengths; slots past a sequence's length are NaN."""

    N_SEQ, P, MAX_PAGES, SNEW = 7, 16, 4, 3
    # active sequences per step (batch sizes 5, 2, 6, 3, 4): first batch distinct from every size
    STEPS = [[0, 2, 3, 5, 6], [1, 4], [0, 1, 2, 3, 4, 6], [5, 2, 0], [6, 3, 1, 4]]

    def __init__(self, device, gen):
        cap = self.P * self.MAX_PAGES
        kd, vd = torch.randn(self.N_SEQ, cap, HK, D), torch.randn(self.N_SEQ, cap, HK, D)
        self.k, self.v, self.page_table = make_paged_kv(kd, vd, [cap] * self.N_SEQ, self.P, generator=gen)
        self.lens = [int(x) for x in torch.randint(0, 40, (self.N_SEQ,), generator=gen)]
        self.lens[3] = 0  # an empty sequence
        for n in range(self.N_SEQ):
            for t in range(self.lens[n], cap):
                page = int(self.page_table[n, t // self.P])
                poison_(self.k[page, t % self.P])
                poison_(self.v[page, t % self.P])
        self.k, self.v, self.page_table = self.k.to(device), self.v.to(device), self.page_table.to(device)
        self.device = device

    def step_inputs(self, active):
        bsz, s = len(active), self.SNEW
        q = _rand(bsz, s, H, D, device=self.device)
        k, v = _rand(bsz, s, HK, D, device=self.device), _rand(bsz, s, HK, D, device=self.device)
        cs = _i32([self.lens[n] for n in active], self.device)
        pt = self.page_table[torch.tensor(active, device=self.device)].contiguous()
        return q, k, v, cs, pt

    def advance(self, active):
        for n in active:
            self.lens[n] += self.SNEW


@pytest.mark.parametrize("layout", ["dense", "paged"])
def test_compile_decode_step_one_graph(device, layout):
    """fullgraph + dynamic: one compile over steps with different batch sizes and cache lengths;
    outputs and caches after every step equal an eager run on separate clones of the caches."""
    torch._dynamo.reset()
    cnt = CompileCounter()
    compiled = torch.compile(step, backend=cnt, fullgraph=True, dynamic=True)
    cos, sin = _tables(ROT_ROWS, ROT, torch.float32, device)
    n_steps = 0
    if layout == "dense":
        for bsz, cap, lens in DENSE_STEPS:
            q, kc, vc, k, v, cs = _dense_step_inputs(device, bsz, cap, lens)
            kc_e, vc_e = kc.clone(), vc.clone()
            kc_exp, vc_exp = kvcache_append_ref(kc.cpu(), vc.cpu(), k.cpu(), v.cpu(), lens, rotary_cos=cos.cpu(),
                                                rotary_sin=sin.cpu(), rotary_interleaved=False)
            ptr = kc.data_ptr()
            out = compiled(q, kc, vc, k, v, cs, None, cos, sin)
            out_e = step(q, kc_e, vc_e, k, v, cs, None, cos, sin)
            assert kc.data_ptr() == ptr
            _assert_same(out, out_e, f"out (batch {bsz}, cache {cap})")
            assert torch.isfinite(out).all(), "read a poisoned cache slot"
            _assert_same(kc, kc_e, "k_cache")
            _assert_same(vc, vc_e, "v_cache")
            _assert_same(vc.cpu(), vc_exp, "v_cache vs oracle")
            torch.testing.assert_close(kc.cpu(), kc_exp, atol=1e-5, rtol=1e-5, equal_nan=True)
            n_steps += 1
    else:
        pool = PagedPool(device, torch.Generator().manual_seed(7))
        k_e, v_e = pool.k.clone(), pool.v.clone()  # the eager run's own pool
        for active in pool.STEPS:
            q, k, v, cs, pt = pool.step_inputs(active)
            ptr = pool.k.data_ptr()
            out = compiled(q, pool.k, pool.v, k, v, cs, pt, cos, sin)
            out_e = step(q, k_e, v_e, k, v, cs, pt, cos, sin)
            assert pool.k.data_ptr() == ptr
            _assert_same(out, out_e, f"out (batch {len(active)})")
            assert torch.isfinite(out).all(), "read a poisoned cache slot"
            _assert_same(pool.k, k_e, "k pool")  # cumulative: every earlier append is still there
            _assert_same(pool.v, v_e, "v pool")
            pool.advance(active)
            n_steps += 1
    assert n_steps >= 4
    assert cnt.frame_count == 1, f"expected 1 compile over {n_steps} steps, got {cnt.frame_count}"
    assert cnt.op_count >= 1  # fmha_fwd_kvcache: append + rotary + attention in one op


# ============================================================================ inductor: no cache copy
# An allocation in inductor's wrapper code: empty_strided_cpu((s0*s1, ), (1, ), ...), empty_strided_cuda(...).
_ALLOC = re.compile(r"\b(empty_strided\w*|empty|zeros|ones|full|new_empty\w*)\(\(([^()]*)\)")


def _call_body(code):
    """The lines of the generated ``call`` (the wrapper that launches the kernels)."""
    lines = code.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"\s*def call\(", line))
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].strip() and len(lines[i]) - len(lines[i].lstrip()) <= indent), len(lines))
    return lines[start:end]


def _numel(shape):
    """sympy product of a shape tuple as printed in the wrapper, e.g. ``s26, s56*2, 32``."""
    import sympy
    dims = [d for d in shape.replace(" ", "").split(",") if d]
    out = sympy.Integer(1)
    for d in dims:
        out *= sympy.sympify(d)
    return sympy.expand(out)


def _assert_appends_in_place(code):
    """The generated wrapper appends straight into the graph inputs that are the caches (and
    attends over them in the same op, fmha_fwd_kvcache), and never clones, copies or allocates a cache-sized buffer (a clone
    of a cache shows up as a flat allocation of the cache's numel plus a copy kernel)."""
    body = _call_body(code)
    text = "\n".join(body)
    unpack = next(line for line in body if re.search(r"=\s*args\s*$", line))
    inputs = set(re.findall(r"\w+", unpack.split("=")[0]))
    # the decode step is one op (append + rotary + attention): it writes the caches it attends over
    steps = [line.strip() for line in body if "torch.ops.mate.fmha_fwd_kvcache.default(" in line]
    assert len(steps) == 1, "\n".join(steps) or text
    m = re.search(r"torch\.ops\.mate\.fmha_fwd_kvcache\.default\((\w+), (\w+), (\w+),", steps[0])
    assert m and m.group(2) in inputs and m.group(3) in inputs and m.group(2) != m.group(3), \
        f"fmha_fwd_kvcache does not write into the cache inputs ({sorted(inputs)}) directly:\n{text}"
    k_buf, v_buf = m.group(2), m.group(3)
    for bad in ("copy_", "clone", "as_strided_scatter", "auto_functionalized", "slice_scatter"):
        assert bad not in text, f"generated code has {bad!r}:\n{text}"
    for buf in (k_buf, v_buf):
        size = re.search(rf"assert_size_stride\({buf}, \(([^()]*)\)", text)
        assert size, f"no size assert of {buf}:\n{text}"
        cache_numel = _numel(size.group(1))
        for kind, shape in _ALLOC.findall(text):
            numel = _numel(shape)
            assert not (cache_numel.free_symbols and cache_numel.free_symbols <= numel.free_symbols) \
                and numel != cache_numel, \
                f"generated code allocates a buffer as large as {buf} ({size.group(1)}): {kind}(({shape}), ...):\n{text}"
    # the mutated inputs are not outputs of the graph (nothing is copied back to them either)
    ret = [line.strip() for line in body if line.strip().startswith("return ")]
    assert ret and k_buf not in ret[-1] and v_buf not in ret[-1], ret


@pytest.mark.parametrize("layout", ["dense", "paged"])
def test_inductor_appends_into_caller_cache(device, layout):
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    cos, sin = _tables(ROT_ROWS, ROT, torch.float32, device)
    if layout == "dense":
        runs = []
        for bsz, cap, lens in DENSE_STEPS:
            q, kc, vc, k, v, cs = _dense_step_inputs(device, bsz, cap, lens)
            runs.append(((q, kc, vc, k, v, cs, None, cos, sin), lens))
    else:
        pool = PagedPool(device, torch.Generator().manual_seed(3))
        runs = []
        for active in pool.STEPS:  # the same pool object every step
            q, k, v, cs, pt = pool.step_inputs(active)
            runs.append(((q, pool.k, pool.v, k, v, cs, pt, cos, sin), [pool.lens[n] for n in active]))
            pool.advance(active)
    for i, (args, lens) in enumerate(runs):
        q, kc, vc, k, v, cs, pt = args[:7]
        kc_e, vc_e = kc.clone(), vc.clone()
        out_e = step(q, kc_e, vc_e, k, v, cs, pt, cos, sin)
        k_obj, v_obj, kptr, vptr = kc, vc, kc.data_ptr(), vc.data_ptr()
        if i == 0:  # run_and_get_code resets dynamo: only on the first call
            out, codes = run_and_get_code(compiled, *args)
            assert len(codes) == 1, f"expected one generated module, got {len(codes)}"
            _assert_appends_in_place(codes[0])
        else:
            out = compiled(*args)
        # the caller's own tensor objects hold the new keys and values, in the same storage
        assert args[1] is k_obj and args[2] is v_obj
        assert kc.data_ptr() == kptr and vc.data_ptr() == vptr
        _assert_same(out, out_e, f"out (step {i})")
        _assert_same(kc, kc_e, f"k_cache (step {i})")
        _assert_same(vc, vc_e, f"v_cache (step {i})")
        snew = k.shape[1]
        for b in range(k.shape[0]):  # the appended slots are the new (rotated) keys, not poison
            for t in range(snew):
                pos = lens[b] + t
                if pt is None:
                    slot_k, slot_v = kc[b, pos], vc[b, pos]
                else:
                    page = int(pt[b, pos // kc.shape[1]])
                    slot_k, slot_v = kc[page, pos % kc.shape[1]], vc[page, pos % kc.shape[1]]
                _assert_same(slot_v, v[b, t], f"v_cache slot ({b}, {pos})")
                assert torch.isfinite(slot_k).all() and torch.equal(slot_k[:, ROT:], k[b, t, :, ROT:]), \
                    f"k_cache slot ({b}, {pos}) does not hold the new key"
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


# ============================================================================ export
class DecodeStep(torch.nn.Module):
    """A decode block: q/k/v projections of the new token, rotary + append + attention, output
    projection. The caches are inputs that the exported program mutates."""

    def __init__(self, embed=48, rotary_interleaved=True):
        super().__init__()
        self.q = torch.nn.Linear(embed, H * D)
        self.kv = torch.nn.Linear(embed, 2 * HK * D)
        self.o = torch.nn.Linear(H * D, embed)
        self.interleaved = rotary_interleaved

    def forward(self, x, k_cache, v_cache, cache_seqlens, cos, sin):
        bsz, s = x.shape[0], x.shape[1]
        q = self.q(x).view(bsz, s, H, D)
        k, v = self.kv(x).view(bsz, s, 2 * HK, D).split([HK, HK], dim=2)
        # k and v are strided views of one projection (only their last dim is contiguous)
        out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=cos,
                                      rotary_sin=sin, cache_seqlens=cache_seqlens, causal=True,
                                      rotary_interleaved=self.interleaved)
        return self.o(out.reshape(bsz, s, H * D))


def _export_inputs(device, bsz, cap, lens, embed=48):
    x = _rand(bsz, 1, embed, device=device)
    kc, vc = _rand(bsz, cap, HK, D, device=device), _rand(bsz, cap, HK, D, device=device)
    return x, kc, vc, _i32(lens, device)


def _append_nodes(ep):
    return [n for n in ep.graph.nodes if n.op == "call_function" and n.target == MATE.fmha_fwd_kvcache.default]


def _functional_append_nodes(ep):
    hop = torch.ops.higher_order.auto_functionalized_v2
    return [n for n in ep.graph.nodes if n.op == "call_function" and n.target is hop
            and n.args[0] == MATE.fmha_fwd_kvcache.default]


def test_export_decode_step_mutates_caches(device):
    model = DecodeStep().to(device).eval()
    cos, sin = _tables(ROT_ROWS, ROT, torch.float32, device)
    batch, cache = Dim("batch", min=2, max=64), Dim("cache", min=2, max=ROT_ROWS - 1)
    x, kc, vc, cs = _export_inputs(device, *DENSE_STEPS[0])
    dynamic_shapes = ({0: batch}, {0: batch, 1: cache}, {0: batch, 1: cache}, {0: batch}, None, None)
    with torch.no_grad():
        exported = torch.export.export(model, (x, kc.clone(), vc.clone(), cs, cos, sin),
                                       dynamic_shapes=dynamic_shapes)
    # export's (non-functional) IR calls the mutating op on the cache placeholders themselves
    (node,) = _append_nodes(exported)
    assert [a.name for a in node.args[1:3]] == ["k_cache", "v_cache"], node.format_node()
    # the functional IR (what AOTInductor / other backends see) records the input mutations
    functional = exported.run_decompositions({})
    sig = functional.graph_signature
    assert set(sig.user_inputs_to_mutate.values()) == {"k_cache", "v_cache"}, sig
    assert len(_functional_append_nodes(functional)) == 1 and not _append_nodes(functional)

    modules = {"export": exported.module(), "run_decompositions": functional.module()}
    with torch.no_grad():
        for bsz, cap, lens in DENSE_STEPS:
            x, kc, vc, cs = _export_inputs(device, bsz, cap, lens)
            kc_before, vc_before = kc.clone(), vc.clone()
            kc_e, vc_e = kc.clone(), vc.clone()
            out_e = model(x, kc_e, vc_e, cs, cos, sin)
            assert not torch.equal(kc_e[0, lens[0]], kc_before[0, lens[0]]), "nothing was appended"
            for name, module in modules.items():
                # export's module gets the caller's tensors themselves, the other fresh copies
                k_run, v_run = (kc, vc) if name == "export" else (kc_before.clone(), vc_before.clone())
                kptr, vptr = k_run.data_ptr(), v_run.data_ptr()
                out = module(x, k_run, v_run, cs, cos, sin)
                torch.testing.assert_close(out, out_e, rtol=1e-6, atol=1e-6, msg=f"{name}: out (batch {bsz})")
                assert k_run.data_ptr() == kptr and v_run.data_ptr() == vptr
                _assert_same(k_run, kc_e, f"{name}: k_cache after the exported step (batch {bsz})")
                _assert_same(v_run, vc_e, f"{name}: v_cache after the exported step (batch {bsz})")


class DecodeWithBufferCache(torch.nn.Module):
    """The same step with the caches as registered buffers (a model that owns its kv cache)."""

    def __init__(self, bsz, cap):
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(bsz, cap, HK, D))
        self.register_buffer("v_cache", torch.zeros(bsz, cap, HK, D))

    def forward(self, q, k, v, cache_seqlens, cos, sin):
        return flash_attn_with_kvcache(q, self.k_cache, self.v_cache, k, v, rotary_cos=cos, rotary_sin=sin,
                                       cache_seqlens=cache_seqlens, causal=True, rotary_interleaved=False)


def test_export_decode_step_buffer_cache(device):
    bsz, cap = 3, 20
    cos, sin = _tables(ROT_ROWS, ROT, torch.float32, device)
    eager = DecodeWithBufferCache(bsz, cap).to(device)
    example = (_rand(bsz, 1, H, D, device=device), _rand(bsz, 1, HK, D, device=device),
               _rand(bsz, 1, HK, D, device=device), _i32([0, 0, 0], device), cos, sin)
    exported = torch.export.export(DecodeWithBufferCache(bsz, cap).to(device), example)
    (node,) = _append_nodes(exported)
    assert [a.name for a in node.args[1:3]] == ["b_k_cache", "b_v_cache"], node.format_node()
    functional = exported.run_decompositions({})
    assert set(functional.graph_signature.buffers_to_mutate.values()) == {"k_cache", "v_cache"}, \
        functional.graph_signature
    assert len(_functional_append_nodes(functional)) == 1
    modules = {"export": exported.module(), "run_decompositions": functional.module()}
    for module in modules.values():
        module.load_state_dict(eager.state_dict())
    lens = [0, 5, 11]
    for t in range(4):  # successive tokens grow the buffer caches
        q, k, v = _rand(bsz, 1, H, D, device=device), _rand(bsz, 1, HK, D, device=device), \
            _rand(bsz, 1, HK, D, device=device)
        cs = _i32([n + t for n in lens], device)
        out_e = eager(q, k, v, cs, cos, sin)
        for name, module in modules.items():
            kptr = module.k_cache.data_ptr()
            out = module(q, k, v, cs, cos, sin)
            assert module.k_cache.data_ptr() == kptr, f"{name}: the k_cache buffer was replaced"
            _assert_same(out, out_e, f"{name}: out (token {t})")
            _assert_same(module.k_cache, eager.k_cache, f"{name}: k_cache buffer (token {t})")
            _assert_same(module.v_cache, eager.v_cache, f"{name}: v_cache buffer (token {t})")
    assert int((eager.v_cache.abs().sum((-1, -2)) != 0).sum()) == 4 * bsz


# ============================================================================ return_softmax_lse arity
def _fa3_route(device):
    q, kc, vc, k, v, cs = _dense_step_inputs(device, 3, 40, [0, 17, 38], snew=2)
    cos, sin = _tables(ROT_ROWS, ROT, torch.float32, device)
    return (q, kc, vc, k, v), dict(rotary_cos=cos, rotary_sin=sin, cache_seqlens=cs, causal=True)


def _mla_route(device):
    """MATE's MLA route: q head dim 64 (rope) + qv 512 (latent); paged caches kpe / ckv."""
    bsz, hq, p = 2, 4, 8
    kd, vd = torch.randn(bsz, 32, 1, 64), torch.randn(bsz, 32, 1, 512)
    kc, vc, pt = make_paged_kv(kd, vd, [32, 32], p)
    q, qv = _rand(bsz, 1, hq, 64, device=device), _rand(bsz, 1, hq, 512, device=device)
    k, v = _rand(bsz, 1, 1, 64, device=device), _rand(bsz, 1, 1, 512, device=device)
    return (q, kc.to(device), vc.to(device), k, v), dict(qv=qv, cache_seqlens=_i32([9, 30], device),
                                                         page_table=pt.to(device), causal=True)


@pytest.mark.parametrize("route,arity", [("fa3", 4), ("mla", 2)])
def test_return_softmax_lse_arity_compiled(device, route, arity):
    torch._dynamo.reset()
    (q, kc, vc, k, v), kw = (_fa3_route if route == "fa3" else _mla_route)(device)

    def fn(q, kc, vc, k, v):
        return flash_attn_with_kvcache(q, kc, vc, k, v, return_softmax_lse=True, **kw)

    kc_e, vc_e = kc.clone(), vc.clone()
    res_e = fn(q, kc_e, vc_e, k, v)
    res = torch.compile(fn, fullgraph=True, dynamic=True)(q, kc, vc, k, v)
    assert isinstance(res, tuple) and isinstance(res_e, tuple)
    assert len(res_e) == arity and len(res) == arity, (len(res_e), len(res))
    out, lse = res[0], res[1]
    bsz, sq, hq = q.shape[:3]
    assert out.shape == (bsz, sq, hq, vc.shape[-1]) and lse.shape == (bsz, hq, sq) and lse.dtype == torch.float32
    if arity == 4:  # MATE's (out, lse, out_accum, lse_accum): the accumulators are empty fp32
        for extra in res[2:]:
            assert extra.numel() == 0 and extra.dtype == torch.float32
    for a, b, name in zip(res, res_e, ("out", "lse", "out_accum", "lse_accum")):
        _assert_same(a, b, name)
    assert torch.isfinite(lse).all()
    _assert_same(kc, kc_e, "k_cache")
    _assert_same(vc, vc_e, "v_cache")
