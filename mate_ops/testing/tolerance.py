"""FlashAttention-3's tolerance rule for comparing a kernel against the oracle.

:func:`assert_close_fa3` passes iff the kernel's error against the fp64 oracle is at most
twice the error of the oracle run in the input precision, plus a small ``atol``
(:data:`DEFAULT_ATOL`).
"""
import math
from typing import Optional

import torch

from ._dtypes import _FP8_DTYPES

Tensor = torch.Tensor

__all__ = ["assert_close_fa3", "assert_lse_close", "DEFAULT_ATOL"]

#: Default absolute tolerance of :func:`assert_close_fa3`, keyed by the dtype of
#: the *inputs* that produced the output under test (FA3's test-suite values).
#: FP8 inputs produce bf16 outputs, so pass ``input_dtype=torch.float8_e4m3fn``
#: (or an explicit ``atol``) for fp8-derived outputs.
DEFAULT_ATOL = {
    torch.float64: 1e-5,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 2e-3,
}
for _d in _FP8_DTYPES:
    DEFAULT_ATOL[_d] = 5e-2
del _d


def assert_close_fa3(
    out: Tensor,
    out_ref: Tensor,
    out_lowp: Tensor,
    *,
    atol: Optional[float] = None,
    name: str = "out",
    input_dtype: Optional[torch.dtype] = None,
) -> None:
    """FlashAttention-3's tolerance rule.

    Passes iff ``max|out - out_ref| <= 2 * max|out_lowp - out_ref| + atol`` where
    ``out_ref`` is the fp64 oracle and ``out_lowp`` the oracle run in the input
    precision (``fmha_ref(..., compute_dtype=<input dtype>)``).

    ``atol`` defaults to ``DEFAULT_ATOL[input_dtype or out.dtype]``: 1e-5 for
    float32 (and float64), 2e-3 for float16/bfloat16, 5e-2 for fp8-derived
    outputs (pass ``input_dtype=torch.float8_e4m3fn``, since FP8 inputs give
    bf16 outputs).

    Positions where ``out_ref`` and ``out`` are the same infinity (e.g. lse -inf
    of an empty row) are ignored; any NaN in ``out`` fails.  Raises
    ``AssertionError`` naming the max error, the allowed bound and the index of
    the worst element.
    """
    if out.shape != out_ref.shape or out_lowp.shape != out_ref.shape:
        raise AssertionError(
            f"{name}: shape mismatch: out {tuple(out.shape)}, out_ref {tuple(out_ref.shape)}, "
            f"out_lowp {tuple(out_lowp.shape)}")
    if atol is None:
        key = input_dtype if input_dtype is not None else out.dtype
        if key not in DEFAULT_ATOL:
            raise ValueError(f"no default atol for dtype {key}; pass atol=")
        atol = DEFAULT_ATOL[key]
    o = out.detach().cpu().to(torch.float64)
    ref = out_ref.detach().cpu().to(torch.float64)
    low = out_lowp.detach().cpu().to(torch.float64)

    nan_pos = torch.isnan(o)
    if nan_pos.any():
        idx = tuple(int(x) for x in nan_pos.nonzero()[0].tolist())
        raise AssertionError(f"{name}: NaN in output ({int(nan_pos.sum())} elements), first at index {idx}")

    same_inf = torch.isinf(ref) & (o == ref)
    compare = ~same_inf
    if not compare.any():
        return

    err = torch.where(compare, (o - ref).abs(), torch.zeros_like(o))
    err = torch.where(torch.isnan(err), torch.full_like(err, math.inf), err)
    max_err = float(err.max())
    if math.isinf(max_err):
        flat = int(torch.argmax(err.reshape(-1)))
        idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(flat), err.shape))
        raise AssertionError(
            f"{name}: max abs error inf; worst at index {idx}: out={o[idx].item()!r}, "
            f"ref={ref[idx].item()!r}")
    low_err = torch.where(compare, (low - ref).abs(), torch.zeros_like(low))
    if torch.isnan(low_err).any() or torch.isinf(low_err).any():
        bad = ~torch.isfinite(low_err)
        idx = tuple(int(x) for x in bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{name}: the low-precision reference differs non-finitely from out_ref at {idx} "
            f"(out_lowp={low[idx].item()}, out_ref={ref[idx].item()}); cannot derive a bound")
    bound = 2.0 * float(low_err.max()) + float(atol)
    if not max_err <= bound:
        flat = int(torch.argmax(err.reshape(-1)))
        idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(flat), err.shape))
        raise AssertionError(
            f"{name}: max abs error {max_err:.6g} > allowed {bound:.6g} "
            f"(= 2 * lowp error {float(low_err.max()):.6g} + atol {atol:.3g}); "
            f"worst at index {idx}: out={o[idx].item()!r}, ref={ref[idx].item()!r}, "
            f"lowp={low[idx].item()!r}")


def assert_lse_close(lse: Tensor, lse_ref: Tensor, *, input_dtype: Optional[torch.dtype] = None,
                     name: str = "lse") -> None:
    """Compares a kernel's log-sum-exp with the fp64 oracle's.

    The infinities (rows without keys: ``-inf``) must match exactly and no NaN may appear; the
    finite values must agree to ``atol=2e-3, rtol=1e-4``, or for fp8 inputs
    (``input_dtype=torch.float8_e4m3fn``) ``rtol=2e-3``: fp8 tensor cores (Hopper's fp8 wgmma)
    add up their products with fewer mantissa bits than fp32, so the scores carry a relative
    error that grows with their magnitude (measured on the H200: at most 7e-4 of lse with
    scores up to ~150; FA3's fp8 low-precision reference is off by 2-4e-3 of lse there).
    Raises ``AssertionError`` naming ``name``.
    """
    lse = lse.detach().cpu()
    lse_ref = lse_ref.detach().cpu()
    if lse.shape != lse_ref.shape:
        raise AssertionError(f"{name}: shape {tuple(lse.shape)} != {tuple(lse_ref.shape)}")
    if torch.isnan(lse).any():
        raise AssertionError(f"{name}: NaN")
    finite = torch.isfinite(lse_ref)
    if not torch.equal(torch.isfinite(lse), finite) or not torch.equal(lse[~finite], lse_ref[~finite].to(lse.dtype)):
        raise AssertionError(f"{name}: infinities differ from the oracle")
    rtol = 2e-3 if input_dtype in _FP8_DTYPES else 1e-4
    torch.testing.assert_close(lse[finite], lse_ref[finite].to(lse.dtype), atol=2e-3, rtol=rtol,
                               msg=lambda m: f"{name}: {m}")
