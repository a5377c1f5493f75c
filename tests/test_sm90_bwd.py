"""The Hopper FMHA backward (csrc/musa/arch/sm90/fmha_bwd_sm90.cuh: TMA + wgmma dK/dV and dQ
kernels) against the fp64 oracle.

fmha_bwd takes the sm90 kernels by default on compute capability 9.0 for every call they serve
(every tile width: 64, 128, 192 x 128, 256); the checks run in a child process with
MATE_OPS_FMHA_BWD_PATH=sm90 (the route variable is read once per process, so the child's
environment is the one that counts), and this file is the child's script too (tests/sm90_child.py
holds the harness of both sides):

    python tests/test_sm90_bwd.py --device cuda [--only NAME ...] [--list]

Each case builds its inputs with tests/test_backward.py's _make_case (NaN in every unused
position: ragged gaps, rows past seqused), runs the forward (whatever path), then
torch.ops.mate.fmha_bwd directly, and compares dq, dk, dv (and dsink) with autograd through the
fp64 oracle by FA3's rule, as tests/test_backward.py does: no NaN anywhere, exact zeros at unused
positions (fmha_bwd allocates its outputs, so there is no buffer to poison; a leak of the NaN
inputs or an unwritten row shows there instead). On CUDA it also asks the profiler which kernels
ran, so a case the sm90 kernels declined (fmha_bwd_sm90_fits false) fails instead of passing on
the mma.sync path. ``--device cpu`` runs the same comparisons against the CPU op (a dry run of
this harness; no environment variable matters there).

Skipped without a compute capability 9.0 GPU or without the sm90 kernels in the build.
"""
import os
import sys
import zlib

import pytest
import torch

import sm90_child

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SM90_KERNELS = ("fmha_bwd_sm90_dkdv_kernel", "fmha_bwd_sm90_dq_kernel")
MARK = "@@sm90-bwd-case "  # result lines of the child: MARK + json


# ---------------------------------------------------------------- cases --------------------
# A case is a dict of plain values (its name is the pytest id and the --only key): _make_case's
# keyword arguments plus the dtype. Lengths cross the tiles' edges: 64-row steps and 128-key
# blocks of the dK/dV kernel, 128-row blocks and 64 / 128-key tiles of the dQ kernel (1, 63, 65,
# 130, 257, 300); at the wide widths also the 32-row steps (192 x 128) and the 48-row steps and
# 48-key dQ tiles (256) (31, 33, 47, 49, 97).

VARIANTS = {
    # dense MHA, full attention, Sq 130 < Sk 257
    "mha-dense-full": dict(H=4, Hk=4, lens_q=[130, 130], lens_k=[257, 257]),
    # GQA 8/2, ragged (with a gap), causal; a 1-row query, Sq < Sk and Sq > Sk (rows without keys)
    "gqa-ragged-causal": dict(H=8, Hk=2, ragged=True, causal=True, lens_q=[1, 65, 257], lens_k=[63, 130, 64]),
    # MQA, padded (seqused_q / seqused_k, NaN past them), local window (37, 5)
    "mqa-padded-window": dict(H=4, Hk=1, seqused=True, window=(37, 5), lens_q=[257, 63], lens_k=[65, 130]),
    # GQA 8/2, dense, causal + attention_chunk 48 (chunk borders inside tiles), Sq 257 > Sk 130
    "gqa-dense-chunk-causal": dict(H=8, Hk=2, causal=True, chunk=48, lens_q=[257], lens_k=[130]),
    # MHA, ragged, attention_chunk 64 (borders on the dQ kernel's 64-key tile borders)
    "mha-ragged-chunk": dict(H=2, Hk=2, ragged=True, chunk=64, lens_q=[63, 130], lens_k=[257, 65]),
}


def _cases():
    cases = []

    def add(name, dtype="bf16", **spec):
        spec.setdefault("D", 128)
        spec.setdefault("Dv", spec["D"])
        cases.append(dict(name=name, dtype=dtype, **spec))

    for d in (128, 64):
        for dt in DTYPES:
            for vname, spec in VARIANTS.items():
                add(f"{vname}-d{d}-{dt}", dtype=dt, D=d, **spec)
    # one row, one key; one row, many keys; many rows, one key (dense, causal: rows without keys)
    for lq, lk in ((1, 1), (1, 300), (300, 1)):
        add(f"tiny-{lq}x{lk}-causal", H=2, Hk=1, causal=True, lens_q=[lq], lens_k=[lk])
    # longer sequences: many steps per kv block and many key tiles per dQ block
    add("long-gqa-causal-d128", H=8, Hk=2, causal=True, lens_q=[1000], lens_k=[1000])
    add("long-mha-full-d64-fp16", dtype="fp16", D=64, H=2, Hk=2, lens_q=[700, 300], lens_k=[300, 700])
    add("long-window-d128", H=4, Hk=2, window=(200, 0), lens_q=[1000], lens_k=[1000])
    # head dims between and below the tile widths pad up inside the kernels (TMA reads the
    # missing channels as zeros; the padding channels of dq / dk / dv are never stored); D != Dv
    for d, dv in ((96, 96), (40, 72), (8, 8), (64, 32), (128, 64), (72, 128)):
        add(f"widths-d{d}x{dv}-gqa-ragged-causal", D=d, Dv=dv, H=8, Hk=2, ragged=True, causal=True,
            lens_q=[1, 65, 257], lens_k=[63, 130, 64])
    # the wide tile widths: 192 x 128 (one pass on 32-row steps) and 256 (a dV pass and a dK pass
    # in separate blocks, 48-row steps, 48-key dQ tiles); every variant in bf16, two in fp16
    for d, dv, tag in ((192, 128, "d192x128"), (256, 256, "d256")):
        for vname, spec in VARIANTS.items():
            add(f"{vname}-{tag}-bf16", D=d, Dv=dv, **spec)
        for vname in ("gqa-ragged-causal", "mqa-padded-window"):
            add(f"{vname}-{tag}-fp16", dtype="fp16", D=d, Dv=dv, **VARIANTS[vname])
        # lengths around the wide steps' and tiles' edges (32 / 48 rows, 48 keys)
        add(f"wide-edges-{tag}-gqa-ragged", D=d, Dv=dv, H=6, Hk=2, ragged=True, lens_q=[31, 33, 49, 97],
            lens_k=[47, 49, 96, 33])
        add(f"wide-edges-{tag}-mha-window", D=d, Dv=dv, H=4, Hk=4, window=(40, 7),
            lens_q=[97, 47], lens_k=[49, 130])
        add(f"long-gqa-causal-{tag}", D=d, Dv=dv, H=8, Hk=2, causal=True, lens_q=[1000], lens_k=[1000])
    # wide head dims that pad up: to 192 x 128 (160 x 96, 184 x 120, 136 x 64) and to 256 (192 x 192,
    # 136 x 136, 256 x 128, 96 x 256, 200 x 8)
    for d, dv in ((160, 96), (184, 120), (136, 64), (192, 192), (136, 136), (256, 128), (96, 256), (200, 8)):
        add(f"widths-d{d}x{dv}-gqa-ragged-causal", D=d, Dv=dv, H=8, Hk=2, ragged=True, causal=True,
            lens_q=[1, 65, 257], lens_k=[63, 130, 64])
    # the sink gradient (step 1) and the lse gradient (delta) with the sm90 steps 2 and 3
    add("sink-lse-grad-rows-without-keys", H=8, Hk=2, causal=True, sink=True, lse_grad=True, lens_q=[257, 130],
        lens_k=[63, 65])
    add("lse-grad-ragged-empty-keys", H=4, Hk=2, ragged=True, lse_grad=True, lens_q=[130, 1, 63], lens_k=[65, 257, 0])
    add("sink-ragged-chunk-fp16", dtype="fp16", D=64, H=4, Hk=1, ragged=True, chunk=64, sink=True,
        lens_q=[130, 63], lens_k=[130, 257])
    # the ScoreMod instantiation: softcap, ALiBi
    add("softcap-gqa-causal", H=8, Hk=2, causal=True, softcap=5.0, lens_q=[130, 65], lens_k=[257, 63])
    add("alibi-ragged-window", H=4, Hk=2, ragged=True, alibi=True, window=(37, 5), lens_q=[65, 130],
        lens_k=[257, 130])
    add("alibi-causal-sq-gt-sk-d64", D=64, H=8, Hk=2, causal=True, alibi=True, lens_q=[257], lens_k=[130])
    add("everything", H=8, Hk=2, seqused=True, window=(37, 5), softcap=5.0, alibi=True, sink=True, lse_grad=True,
        lens_q=[130, 257], lens_k=[257, 65])
    # the ScoreMod instantiation and the sink / lse gradients at the wide widths
    add("softcap-gqa-causal-d192x128", D=192, Dv=128, H=8, Hk=2, causal=True, softcap=5.0, lens_q=[130, 65],
        lens_k=[257, 63])
    add("alibi-ragged-window-d256-fp16", dtype="fp16", D=256, H=4, Hk=2, ragged=True, alibi=True, window=(37, 5),
        lens_q=[65, 130], lens_k=[257, 130])
    add("softcap-mqa-chunk-d256", D=256, H=4, Hk=1, softcap=5.0, chunk=48, lens_q=[97, 257], lens_k=[130, 49])
    add("alibi-causal-sq-gt-sk-d192x128", D=192, Dv=128, H=8, Hk=2, causal=True, alibi=True, lens_q=[257],
        lens_k=[130])
    for d, dv, tag in ((192, 128, "d192x128"), (256, 256, "d256")):
        add(f"everything-{tag}", D=d, Dv=dv, H=8, Hk=2, seqused=True, window=(37, 5), softcap=5.0, alibi=True,
            sink=True, lse_grad=True, lens_q=[130, 257], lens_k=[257, 65])
        add(f"sink-lse-grad-rows-without-keys-{tag}", D=d, Dv=dv, H=8, Hk=2, causal=True, sink=True, lse_grad=True,
            lens_q=[257, 130], lens_k=[63, 65])
    return cases


CASES = _cases()
CASE_NAMES = [c["name"] for c in CASES]
assert len(set(CASE_NAMES)) == len(CASE_NAMES)


def _helpers():
    """tests/test_backward.py's case builder and masks (this file also runs as a script)."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import test_backward  # noqa: PLC0415
    return test_backward


def run_case(spec, device):
    """Compare fmha_bwd on `device` with the oracle; raises AssertionError on a mismatch.
    Returns the kernel route seen: "sm90", "other" or "unknown" (no profiler data)."""
    from mate_ops.testing import assert_close_fa3, fmha_ref
    TB = _helpers()
    dtype = DTYPES[spec["dtype"]]
    kw = {k: v for k, v in spec.items() if k not in ("name", "dtype")}
    c = TB._make_case(zlib.crc32(spec["name"].encode()), dtype, **kw)
    mate = torch.ops.mate

    dev = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    op_kw = {n: dev(x) for n, x in c["op_kw"].items()}
    q, k, v = dev(c["q"]), dev(c["k"]), dev(c["v"])
    with torch.no_grad():
        out, lse = mate.fmha_fwd(q, k, v, **op_kw)
    g, gl = TB._loss_weights(c, out.cpu(), lse.cpu())
    dout, dlse = dev(g), dev(gl)
    bwd = lambda: mate.fmha_bwd(dout, q, k, v, out, lse, dlse, **op_kw)  # noqa: E731
    dq, dk, dv, dsink = bwd()

    # autograd through the oracle, in fp64 and in the input precision (FA3's rule)
    names = ["q", "k", "v"] + (["learnable_sink"] if "learnable_sink" in c["op_kw"] else [])
    base = {"q": c["q"], "k": c["k"], "v": c["v"], "learnable_sink": c["op_kw"].get("learnable_sink")}

    def oracle(compute_dtype, cast):
        x = {n: base[n].detach().to(cast or base[n].dtype).requires_grad_() for n in names}
        o, l = fmha_ref(x["q"], x["k"], x["v"], compute_dtype=compute_dtype,
                        **dict(c["ref_kw"], learnable_sink=x.get("learnable_sink")))
        o = torch.where(TB._unused_q_mask(c, o.shape)[..., None, None], torch.zeros_like(o), o)
        gg = torch.where(torch.isnan(g), torch.zeros_like(g), g).to(o.dtype)
        outs, grads = ([o, l], [gg, gl.to(l.dtype)]) if gl is not None else ([o], [gg])
        return torch.autograd.grad(outs, [x[n] for n in names], grads), o, l

    ref, _, _ = oracle(torch.float64, torch.float64)
    lowp, out_lowp, lse_lowp = oracle(dtype, None)
    got = {"q": dq, "k": dk, "v": dv, "learnable_sink": dsink}
    for n, r, lp in zip(names, ref, lowp):
        a = got[n].cpu()
        assert a.dtype == base[n].dtype and a.shape == base[n].shape, f"d{n}: {a.dtype} {tuple(a.shape)}"
        assert not torch.isnan(a).any(), f"d{n} has NaN (a poisoned position leaked)"
        if n == "q":
            assert (a[TB._unused_q_mask(c, a.shape)] == 0).all(), "dq of unused rows must be 0"
        elif n in ("k", "v"):
            assert (a[TB._unused_k_mask(c, a.shape)] == 0).all(), f"d{n} of unused keys must be 0"
        if n == "learnable_sink":  # test_backward.py's bound for dsink (delta uses the rounded out)
            alt = TB._dsink_formula(out_lowp, lse_lowp, g, gl, base[n])
            if (alt - r).abs().max() > (lp.double() - r).abs().max():
                lp = alt
        assert_close_fa3(a.double(), r, lp.double(), name=f"d{n}", input_dtype=dtype)

    return sm90_child.route_seen(bwd, device, SM90_KERNELS)  # both kernels must run


# ---------------------------------------------------------------- pytest side -------------

# only the pytest side skips: the script runs wherever it is pointed (--device cpu included)
_SKIP = (sm90_child.skip_reason("mate::fmha_bwd", SM90_KERNELS, "sm90 backward kernels")
         if __name__ != "__main__" else None)
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")


# every case, in one child run
sm90_results = sm90_child.child_results_fixture(__file__, MARK, {"MATE_OPS_FMHA_BWD_PATH": "sm90"})


@pytest.mark.parametrize("name", CASE_NAMES)
def test_sm90_bwd_case(sm90_results, name):
    res = sm90_child.case_result(sm90_results, name)
    assert res["ok"], res["error"]
    assert res["route"] != "other", f"{name}: fmha_bwd did not run {' and '.join(SM90_KERNELS)} " \
                                    "(fmha_bwd_sm90_fits declined it?)"


def test_sm90_bwd_child_exit(sm90_results):
    results, proc = sm90_results
    assert proc.returncode == 0 or any(not r["ok"] for r in results.values()), proc.stderr[-3000:]


if __name__ == "__main__":
    sys.exit(sm90_child.main(CASES, run_case, MARK, __doc__.splitlines()[0]))
