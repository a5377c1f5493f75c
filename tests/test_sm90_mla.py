"""The Hopper MLA decode kernel (csrc/musa/arch/sm90/mla_decode_sm90.cu: TMA + wgmma) against the
fp64 oracle of mate_ops.testing, on random inputs with NaN-poisoned unused cache slots and outputs.

The kernel is the default on a compute capability 9.0 GPU for the dense bf16 decode calls it
serves (mla_sm90_fits: head dims 576 / 512, page size a multiple of 64, Hq / Hkv a multiple of
16) with at least 64 query rows per kv head; MATE_OPS_MLA_PATH=sm80 opts out, =sm90 sends every
call it serves (what these checks use). The variable is read once per process, so the checks run
in a child process with MATE_OPS_MLA_PATH=sm90 set (whatever the parent's environment says),
and this file is the child's script too (tests/sm90_child.py holds the harness of both sides):

    python tests/test_sm90_mla.py --device cuda [--only NAME ...] [--list]

Each case runs torch.ops.mate.mla_decode twice and compares both with the oracle the way
tests/test_mla.py does (FA3's rule for out, lse within 2e-3 with identical infinities), and the two
runs bitwise with each other (a race in the kernel's shared-memory exchanges would show). The op
allocates its outputs, so "poisoned outputs" means the allocator is primed first: blocks of the
sizes the op allocates (out, lse, the schedule and the split partials) are filled with 0xff bytes
(NaN in bf16 and fp32) and freed right before the call, so the caching allocator hands those
bytes to the op and a row the kernel fails to write reads NaN (best effort: it relies on the
caching allocator's best-fit reuse). On CUDA the profiler must also show a kernel with
``mla_sm90`` in its name (so a case mla_sm90_fits declined fails instead of passing on the
mma.sync path), and every case checks that the device schedule does what the case is named for
(``split``: some sequence is cut over several parts and merged by mla_combine_kernel;
``unsplit``: none is). ``--device cpu`` runs the same case construction and comparisons against
the CPU op, and the split labels against a nominal 132-SM H200 (a dry run of this harness).

Skipped without a compute capability 9.0 GPU or without the sm90 kernels in the build.
"""
import math
import sys
import zlib

import pytest
import torch

import sm90_child

BF16 = torch.bfloat16
SM90_KERNEL = "mla_sm90"
MARK = "@@sm90-mla-case "  # result lines of the child: MARK + json
H200_SMS = 132             # the split labels' multiprocessor count off the GPU


# ---------------------------------------------------------------- cases --------------------
# A case is a dict of plain values (its name is the pytest id and the --only key); build() turns
# it into tensors. Lengths cross the 64-key tile edges (1, 63, 65, 1000) and the pages' edges.

def _cases():
    cases = []

    def add(name, **spec):
        spec.setdefault("hq", 16)
        spec.setdefault("hkv", 1)
        spec.setdefault("sq", 1)
        spec.setdefault("page", 64)
        spec.setdefault("causal", spec["sq"] > 1)
        cases.append(dict(name=name, **spec))

    # mixed lengths of one batch: on an H200 every one of these is split (few key blocks, many parts)
    for hq in (16, 64, 128):
        for sq in (1, 2):
            add(f"split-hq{hq}-sq{sq}{'-causal' if sq > 1 else ''}", hq=hq, sq=sq, lens=[1, 63, 65, 1000],
                expect="split")
    # one long sequence over many parts
    add("split-one-long-hq128", hq=128, lens=[3000], expect="split")
    add("split-one-long-hq64-sq2-causal", hq=64, sq=2, lens=[2000], expect="split")
    # many short sequences: each part covers several whole sequences (Q reloaded per sequence)
    for hq, sq, page in ((16, 1, 64), (128, 1, 128), (64, 2, 64), (128, 2, 256)):
        add(f"unsplit-hq{hq}-sq{sq}-page{page}", hq=hq, sq=sq, page=page, batch=300, max_len=64,
            expect="unsplit")
    # page sizes: tiles inside larger pages, lengths crossing page edges
    for page in (128, 256):
        for hq, sq in ((16, 1), (128, 2)):
            add(f"page{page}-hq{hq}-sq{sq}", hq=hq, sq=sq, page=page, lens=[1, 63, 65, 1000, 130, 257])
    # zero-length caches (out 0, lse +inf); Sq 2 causal with one key (row 0 sees none)
    add("empty-and-one-key-sq2-causal", hq=16, sq=2, lens=[0, 1, 0, 65])
    add("empty-hq128", hq=128, lens=[0, 0, 70])
    # 4 queries x 16 heads fill one 64-row block; 3 queries x 64 heads span row blocks
    add("sq4-hq16-causal", hq=16, sq=4, lens=[1, 3, 63, 65, 200])
    add("sq3-hq64-causal", hq=64, sq=3, lens=[2, 64, 129, 700])
    add("sq2-hq64-full", hq=64, sq=2, causal=False, lens=[1, 63, 65, 500])
    # two kv heads (G = 16 each)
    add("gqa-hq32-hkv2", hq=32, hkv=2, lens=[1, 65, 400])
    add("gqa-hq64-hkv2-sq2-causal", hq=64, hkv=2, sq=2, lens=[5, 100, 1000])
    # an explicit scale
    add("scale-0.05-hq128", hq=128, lens=[65, 1000], scale=0.05)
    return cases


CASES = _cases()
CASE_NAMES = [c["name"] for c in CASES]
assert len(set(CASE_NAMES)) == len(CASE_NAMES)


def build(spec):
    """(q, k_cache, block_table, cache_seqlens, kwargs) of a case, on the CPU."""
    from mate_ops import testing as T
    gen = torch.Generator().manual_seed(zlib.crc32(spec["name"].encode()))
    if "lens" in spec:
        lens = list(spec["lens"])
    else:
        lens = [int(x) for x in torch.randint(1, spec["max_len"] + 1, (spec["batch"],), generator=gen)]
    b, hq, hkv, sq = len(lens), spec["hq"], spec["hkv"], spec["sq"]
    dense = torch.randn(b, max(lens + [1]), hkv, 576, generator=gen).to(BF16)
    # the page pool is shuffled; every slot not holding a token is NaN
    kc, _, table = T.make_paged_kv(dense, dense[..., :1], lens, spec["page"], generator=gen)
    q = torch.randn(b, sq, hq, 576, generator=gen).to(BF16)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    kw = dict(causal=spec["causal"])
    if "scale" in spec:
        kw["softmax_scale"] = spec["scale"]
    return q, kc, table, seqlens, kw


# ---- the device schedule (mla_params.h: mla_schedule; mla_kernels.cu: mla_fast_parts) -------

def schedule_splits(lens, rows, hkv, sms):
    """Is some sequence cut over several parts by the sm90 route's schedule on `sms` SMs?"""
    blocks_per_part = math.ceil(rows / 64) * hkv
    parts = max(1, sms // max(1, blocks_per_part))
    blocks = [max(1, math.ceil(max(0, n) / 64)) for n in lens]
    per_part = max(1, math.ceil(sum(blocks) / parts))
    owner = []  # the parts each sequence's blocks fall in: global block g -> part g // per_part
    g = 0
    for n in blocks:
        owner.append({(g + i) // per_part for i in range(n)})
        g += n
    return any(len(o) > 1 for o in owner)


def _prime_allocator(device, byte_sizes):
    """Free NaN-filled (0xff bytes) blocks of these sizes, so the next allocations of the same
    sizes get their bytes from the caching allocator (see the module docstring)."""
    if device == "cpu":
        return
    blocks = [torch.full((n,), 0xFF, dtype=torch.uint8, device=device) for n in byte_sizes if n > 0]
    del blocks


def _op_allocations(spec, b, lens, sms):
    """Byte sizes of the op's allocations, in its order: out, lse, schedule, partials."""
    hq, sq, hkv = spec["hq"], spec["sq"], spec["hkv"]
    rows = sq * hq // hkv
    parts = max(1, sms // max(1, math.ceil(rows / 64) * hkv))
    rows_all = sq * hq
    return [b * sq * hq * 512 * 2, b * hq * sq * 4, (parts * 8 + b + 1) * 4, 2 * parts * rows_all * (512 + 2) * 4]


def run_case(spec, device):
    """Compare the op on `device` with the oracle; raises AssertionError on a mismatch.
    Returns the kernel route seen: "sm90", "other" or "unknown" (no profiler data)."""
    from mate_ops import testing as T
    q, kc, table, seqlens, kw = build(spec)
    lens = seqlens.tolist()
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else H200_SMS
    if "expect" in spec:
        split = schedule_splits(lens, spec["sq"] * spec["hq"] // spec["hkv"], spec["hkv"], sms)
        assert split == (spec["expect"] == "split"), (
            f"the schedule on {sms} SMs {'splits' if split else 'does not split'} this '{spec['expect']}' case")
    ref_out, ref_lse = T.mla_decode_ref(q, kc, table, seqlens, 512, **kw)
    low_out, _ = T.mla_decode_ref(q, kc, table, seqlens, 512, compute_dtype=BF16, **kw)

    qd, kd, td, sd = q.to(device), kc.to(device), table.to(device), seqlens.to(device)
    call = lambda: torch.ops.mate.mla_decode(qd, kd, td, sd, 512, None, None, kw.get("softmax_scale"),  # noqa: E731
                                             kw["causal"])
    sizes = _op_allocations(spec, len(lens), lens, sms)
    results = []
    for _ in range(2):
        _prime_allocator(device, sizes)
        out, lse = call()
        results.append((out, lse))
    for i, (out, lse) in enumerate(results):
        assert out.dtype == BF16 and out.shape == ref_out.shape, f"run {i}: out {out.dtype} {tuple(out.shape)}"
        T.assert_close_fa3(out, ref_out, low_out, input_dtype=BF16, name=f"run {i} out")
        lse = lse.cpu()
        assert lse.shape == ref_lse.shape, f"run {i}: lse shape {tuple(lse.shape)}"
        inf = torch.isinf(ref_lse)
        assert torch.equal(torch.isinf(lse), inf) and torch.equal(lse[inf], ref_lse[inf]), (
            f"run {i}: lse infinities differ (a query with no key has lse +inf)")
        torch.testing.assert_close(lse[~inf], ref_lse[~inf], atol=2e-3, rtol=1e-4,
                                   msg=lambda m, i=i: f"run {i} lse: {m}")
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1]), \
        "two runs of the same call differ"
    return sm90_child.route_seen(call, device, [SM90_KERNEL])


# ---------------------------------------------------------------- pytest side -------------

# only the pytest side skips: the script runs wherever it is pointed (--device cpu included).
# The build is searched for the kernel's full symbol; SM90_KERNEL is the part the profiler's
# names are matched on.
_SKIP = (sm90_child.skip_reason("mate::mla_decode", ["mla_sm90_kernel"], "sm90 MLA kernel")
         if __name__ != "__main__" else None)
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")


# every case, in one child run
sm90_results = sm90_child.child_results_fixture(__file__, MARK, {"MATE_OPS_MLA_PATH": "sm90"})


@pytest.mark.parametrize("name", CASE_NAMES)
def test_sm90_mla_case(sm90_results, name):
    res = sm90_child.case_result(sm90_results, name)
    assert res["ok"], res["error"]
    assert res["route"] != "other", f"{name}: mla_decode did not run {SM90_KERNEL} (mla_sm90_fits declined it?)"


def test_sm90_mla_child_exit(sm90_results):
    results, proc = sm90_results
    assert proc.returncode == 0 or any(not r["ok"] for r in results.values()), proc.stderr[-3000:]


if __name__ == "__main__":
    sys.exit(sm90_child.main(CASES, run_case, MARK, __doc__.splitlines()[0]))
