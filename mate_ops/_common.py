"""Argument normalization shared by the public Python APIs (written once)."""
import operator
from collections.abc import Mapping
from typing import Optional, Sequence, Tuple, Union

import torch

_BACKENDS = ("auto", "mutlass", "mubin")


def normalize_window(window_size: Union[Sequence[Optional[int]], torch.Tensor, None]) -> Tuple[int, int]:
    """FA3/MATE ``window_size`` -> ``(left, right)`` Python ints, ``-1`` meaning unbounded.

    Accepted forms (SEMANTICS §1, "Masks"):

    * ``None``: no window, ``(-1, -1)``;
    * any two-element sequence ``(left, right)``: a tuple, a list, a 1-D torch tensor or
      numpy array of 2 integers, or a sequence of 0-d integer tensors / numpy integers;
    * ``None`` (or any negative value) on one side: unbounded on that side, returned as ``-1``.

    Raises:
        ValueError: naming ``window_size``, for anything else: a wrong number of elements, a
            scalar, a mapping, a string, or a side that is not an integer (floats, even 2.0,
            and bools are rejected, as FA3's ``int`` arguments reject them).
    """
    if window_size is None:
        return -1, -1
    if type(window_size) is tuple and len(window_size) == 2:  # the common form, fast (eager decode loops)
        left, right = window_size
        if type(left) is int and type(right) is int:
            return (left if left >= 0 else -1), (right if right >= 0 else -1)
    pair_msg = f"window_size must be a (left, right) pair, got {window_size!r}"
    if isinstance(window_size, (str, bytes, Mapping)):
        raise ValueError(pair_msg)
    if isinstance(window_size, torch.Tensor):
        if window_size.dim() != 1 or window_size.numel() != 2:
            raise ValueError(f"{pair_msg} (a tensor window_size must have shape (2,), got "
                             f"{tuple(window_size.shape)})")
        if window_size.is_floating_point() or window_size.is_complex() or window_size.dtype == torch.bool:
            raise ValueError(f"window_size must hold integers, got a {window_size.dtype} tensor {window_size!r}")
        sides = [int(x) for x in window_size.detach().cpu().tolist()]
    else:
        try:
            sides = list(window_size)
        except TypeError:
            raise ValueError(pair_msg) from None
        if len(sides) != 2:
            raise ValueError(pair_msg)
    return _window_side(sides[0], "left", window_size), _window_side(sides[1], "right", window_size)


def _window_side(value, side: str, window_size) -> int:
    """One side of a window: None or negative -> -1 (unbounded), else the non-negative int."""
    if value is None:
        return -1
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise ValueError(f"window_size {side} must be an integer or None, got {value!r} in {window_size!r}")
    try:
        v = operator.index(value)  # int, numpy integers, 0-d integer tensors; not floats
    except TypeError:
        raise ValueError(f"window_size {side} must be an integer or None, got {value!r} "
                         f"in {window_size!r}") from None
    # any negative side means unbounded (FA3 treats every negative value so)
    return max(int(v), -1)


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


class OpCaller:
    """Calls one mate op passing only the arguments that differ from its schema defaults.

    Converting an argument costs the op's Python binding time even when it is None or a
    default; an eager decode step passes ~30 of them, most at their defaults. The names and
    defaults come from the op's schema, so no argument list is restated here. ``call(*leading,
    values)``: ``leading`` are the first schema arguments (always passed), ``values`` the rest in
    schema order.
    """

    def __init__(self, op, num_leading: int):
        self.op = op
        args = op._schema.arguments
        self.names = tuple(a.name for a in args[num_leading:])
        self.defaults = tuple(a.default_value if a.has_default_value() else None for a in args[num_leading:])

    def __call__(self, leading, values):
        kwargs = {}
        for name, value, default in zip(self.names, values, self.defaults):
            if value is not default and (default is None or value != default):
                kwargs[name] = value
        return self.op(*leading, **kwargs)
