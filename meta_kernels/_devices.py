"""One rule every fake kernel applies first: all tensor arguments of an op live on one device.

A fake kernel also runs when a real call mixes a ``meta`` tensor with CPU/GPU tensors (the
dispatcher then picks the Meta key), so without this check such a call would "succeed" with
uninitialized outputs. The C++ op bodies check the same rule for real tensors.
"""
import functools
import inspect

import torch


def same_device(fake):
    """Decorates a fake kernel: raise, naming the argument, when tensors sit on different devices."""
    signature = inspect.signature(fake)

    @functools.wraps(fake)
    def checked(*args, **kwargs):
        first = None
        for name, value in signature.bind(*args, **kwargs).arguments.items():
            if isinstance(value, torch.Tensor):
                if first is None:
                    first = (name, value.device)
                elif value.device != first[1]:
                    raise RuntimeError(f"{name} must be on the same device as {first[0]} ({first[1]}), "
                                       f"got {value.device}")
        return fake(*args, **kwargs)

    return checked
