"""The float8 dtypes this torch build knows (shared by the oracle, data and tolerance helpers)."""
import torch

_FP8_DTYPES = tuple(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)


def _is_fp8(dtype: torch.dtype) -> bool:
    return dtype in _FP8_DTYPES
