"""Argument normalization shared by the public Python APIs (written once)."""
from typing import Optional, Sequence, Tuple, Union

import torch

_BACKENDS = ("auto", "mutlass", "mubin")


def normalize_window(window_size: Union[Sequence[int], None]) -> Tuple[int, int]:
    """MATE/FA3 ``window_size``: a ``(left, right)`` pair, ``-1`` (or ``None``) = unbounded."""
    if window_size is None:
        return -1, -1
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ValueError(f"window_size must be a (left, right) pair, got {window_size!r}")
    left, right = (int(w) for w in window_size)
    # any negative side means unbounded (FA3 treats every negative value so)
    return max(left, -1), max(right, -1)


def check_backend(backend: str) -> None:
    """MATE's ``backend`` picks a MUSA kernel family; every value computes the same result here."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")


def fp8_out_dtype(q: torch.Tensor) -> torch.dtype:
    """Output dtype of an attention call: bf16 for float8 inputs, else the input dtype."""
    return torch.bfloat16 if q.dtype == torch.float8_e4m3fn else q.dtype


def default_device(*tensors: Optional[torch.Tensor]) -> torch.device:
    """Device of the first given tensor, else the current accelerator, else the CPU."""
    for t in tensors:
        if t is not None:
            return t.device
    acc = getattr(torch, "accelerator", None)
    if acc is not None and acc.is_available():
        return acc.current_accelerator()
    return torch.device("cpu")
