"""Autograd of ``torch.ops.mate.fmha_fwd``: its backward is ``torch.ops.mate.fmha_bwd``.

Registered with ``torch.library.register_autograd`` (not in C++) so that ``torch.compile``
(AOTAutograd) traces forward and backward as two ops with fake kernels, without graph
breaks, and ``torch.export`` of a training step sees both. Differentiable inputs: q, k, v and
``learnable_sink``; a gradient flowing into the returned lse is honoured. Everything the
backward does not support (paged K/V, qv, fp8, context parallel, gradients of
``alibi_slopes`` or descales) raises at backward time with the reason, never a silent None.
"""
import contextlib

import torch

_FWD = torch.ops.mate.fmha_fwd.default
_BWD = torch.ops.mate.fmha_bwd.default
_FWD_NAMES = tuple(a.name for a in _FWD._schema.arguments)
# fmha_bwd's arguments after (dout, q, k, v, out, lse, dlse): the forward's options
_BWD_OPTIONS = tuple(a.name for a in _BWD._schema.arguments)[7:]
_DIFFERENTIABLE = {"q": 0, "k": 1, "v": 2, "learnable_sink": 3}  # -> index in fmha_bwd's returns


_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "musa": "PrivateUse1", "privateuseone": "PrivateUse1"}


def _check_backward_kernel(device: torch.device) -> None:
    """A clear error where this build has no fmha_bwd kernel for the device (e.g. a CPU-only
    build given CUDA tensors), instead of the dispatcher's generic message."""
    key = _DISPATCH_KEYS.get(device.type)
    if key is None or device.type == "meta" or torch._C._dispatch_has_kernel_for_dispatch_key("mate::fmha_bwd", key):
        return
    raise NotImplementedError(f"mate::fmha_fwd backward: this build has no {device.type} kernel for mate::fmha_bwd "
                              "(build mate_ops with that device's compiler to train on it)")


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # an unused lse gives dlse None: no zero tensor to read
    args = dict(zip(_FWD_NAMES, inputs))
    tensor_names = tuple(n for n, x in args.items() if isinstance(x, torch.Tensor))
    ctx.tensor_names = tensor_names
    ctx.options = {n: x for n, x in args.items() if not isinstance(x, torch.Tensor)}
    # Non-differentiable tensor inputs that require grad: raise at backward (no silent None).
    ctx.no_grad_for = tuple(n for n in tensor_names if n not in _DIFFERENTIABLE and args[n].requires_grad)
    out, lse = output
    ctx.save_for_backward(*(args[n] for n in tensor_names), out, lse)


def _backward(ctx, dout, dlse):
    if ctx.no_grad_for:
        raise NotImplementedError(
            f"mate::fmha_fwd backward: no gradient w.r.t. {', '.join(ctx.no_grad_for)} (only q, k, v and "
            "learnable_sink are differentiable); detach them")
    *saved, out, lse = ctx.saved_tensors
    _check_backward_kernel(out.device)
    args = dict(zip(ctx.tensor_names, saved))
    args.update(ctx.options)
    if dout is None:
        dout = torch.zeros_like(out)
    elif dout.numel() == 0:
        dout = torch.zeros_like(out, memory_format=torch.contiguous_format)  # stride-0 empty grads stay stride 0
    elif dout.stride(-1) != 1:
        dout = dout.contiguous()  # e.g. the expanded gradient of out.sum()
    kwargs = {n: args[n] for n in _BWD_OPTIONS if args.get(n) is not None}
    grads = _BWD(dout, args["q"], args["k"], args["v"], out, lse, dlse, **kwargs)
    result = []
    for name in _FWD_NAMES:
        i = _DIFFERENTIABLE.get(name)
        if i is None or name not in args or not isinstance(args[name], torch.Tensor):
            result.append(None)
        elif name == "learnable_sink":
            result.append(grads[3].to(args[name].dtype))
        else:
            result.append(grads[i])
    return tuple(result)


torch.library.register_autograd("mate::fmha_fwd", _backward, setup_context=_setup_context)


_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch >= 2.6 (2.7: present)


def below_autograd(*tensors):
    """A context for an eager ``fmha_fwd`` call that needs no autograd graph.

    A Python autograd kernel (``register_autograd``) costs every call through the dispatcher
    about 9 µs on the CPU even when nothing requires grad. When grad mode is off or no given
    tensor requires grad (pass every floating tensor argument of the call), and we are not
    being traced by torch.compile / torch.export, the op may run below the Autograd key:
    the result is the same, without that cost. Otherwise a no-op context (the normal path,
    with the backward).
    """
    if torch.compiler.is_compiling() or _is_exporting():
        return contextlib.nullcontext()
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return contextlib.nullcontext()
    return torch._C._AutoDispatchBelowAutograd()
