"""Autograd registrations: mate ops are forward-only for now. Their outputs stay
differentiable in the graph sense, but a backward through them raises a clear error
instead of PyTorch's silent "no autograd kernel" fallback (which would leave grads None)."""
import torch

_FORWARD_ONLY = ("fmha_fwd", "fmha_combine", "rotary_embedding", "mla_decode", "mla_sparse_prefill")


def _register(name):
    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise NotImplementedError(f"mate::{name} is forward-only: its backward is not implemented yet "
                                  "(run it under torch.no_grad() or torch.inference_mode())")

    torch.library.register_autograd(f"mate::{name}", backward, setup_context=setup_context)


for _name in _FORWARD_ONLY:
    _register(_name)
