"""A Hugging Face transformers attention backend running on ``torch.ops.mate.fmha_fwd``.

One line makes a model use it::

    import mate_ops.integrations.transformers  # registers attn_implementation="mate"
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="mate")

Importing this module registers two functions under the name ``"mate"``:

- an attention function in transformers' ``AttentionInterface``. It reads the layout
  transformers' attention modules use, ``(B, H, S, D)`` query/key/value, as strided views
  (no copy), and maps causal, sliding window, softcap, scaling, GQA and attention sinks
  (``s_aux``) onto the op's arguments;
- a mask function in ``AttentionMaskInterface``. Instead of a 4-D mask it returns, per
  sequence, three int32 numbers (a ``(3, B, 1, 1)`` tensor): the key left padding
  (``cache_leftpad``), the end of the real keys (``seqused_k``) and the number of real query
  rows (``seqused_q``). It is 4-D so that transformers treats it as a prepared mask and
  passes it through unchanged when a model builds its masks again (generate does that).
  They are computed with tensor operations only, so ``torch.compile(fullgraph=True)`` sees
  no data-dependent branch, and padded tokens are never copied out of the batch.

Supported: left or right padding (the real tokens of a row must be contiguous), dynamic,
static and sliding-window caches (dynamic and static), GQA/MQA, sinks, softcap, sliding
windows. Not supported (raises or is documented): masks with holes (packed sequences given
only through ``position_ids``, or a 2-D mask with zeros between real tokens), custom
``or``/``and`` mask overlays (e.g. bidirectional image-token blocks), dropout in training.
Training works (``fmha_fwd`` has a backward, ``fmha_bwd``; CPU for now), padding included.
"""
from typing import Callable, Optional

import torch

import mate_ops  # noqa: F401  registers torch.ops.mate.*
from mate_ops._autograd import below_autograd

try:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as e:  # transformers is an optional dependency
    raise ImportError("mate_ops.integrations.transformers needs the `transformers` package "
                      "(pip install transformers)") from e

NAME = "mate"


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def mate_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset: int = 0,
    mask_function: Optional[Callable] = None,
    attention_mask: Optional[torch.Tensor] = None,
    **kwargs,
) -> Optional[torch.Tensor]:
    """Mask function for transformers' ``AttentionMaskInterface`` (name ``"mate"``).

    Args follow transformers' mask interface: the 2-D padding mask ``attention_mask``
    ``(B, tokens seen)`` (True = real token), the query length and offset (``q_offset``: the
    cache length before this step, an int or a 0-d tensor for static caches) and the key
    window ``[kv_offset, kv_offset + kv_length)`` in absolute positions. ``mask_function``
    (causal, sliding window, ...) is not evaluated: the attention function applies the same
    pattern from the module's ``is_causal`` / ``sliding_window``.

    Returns:
        ``None`` when every key up to the last query is real (no padding, keys end at the
        last query), else an int32 tensor ``(3, B, 1, 1)``: ``[0]`` the key left padding,
        ``[1]`` the end of the real keys (both in positions of the key tensor the layer will
        see) and ``[2]`` the number of real query rows. Each is contiguous, as the op needs.

    Raises:
        ValueError: in eager mode, when a row's real tokens are not contiguous (a hole in
            the padding mask), which these lengths cannot describe.
    """
    # Patterns other than causal / sliding window / bidirectional (+ padding) cannot be told
    # from the mask callable; transformers' own flags say when one is present.
    if kwargs.get("use_vmap"):
        raise NotImplementedError("attn_implementation='mate' does not support custom or/and mask overlays "
                                  "(e.g. bidirectional image-token blocks); use 'sdpa' or 'eager' for this model")
    if "allow_is_bidirectional_skip" not in kwargs and kwargs.get("allow_is_causal_skip") is False and q_length > 1:
        raise NotImplementedError("attn_implementation='mate' does not support packed sequences given through "
                                  "position_ids, block masks or other causal masks that must be materialized; "
                                  "pass one padded row per sequence with an attention_mask")
    plain_end = isinstance(q_offset, int) and kv_offset + kv_length == q_offset + q_length
    if attention_mask is None and plain_end:
        return None
    device = attention_mask.device if attention_mask is not None else kwargs.get("device", "cpu")
    pos = torch.arange(kv_length, device=device) + kv_offset  # absolute position of each key slot
    # keys after the last query are not written yet (static caches are preallocated)
    valid = pos.unsqueeze(0) < (q_offset + q_length)
    if attention_mask is not None:
        m = attention_mask.to(device=device, dtype=torch.bool)
        missing = kv_offset + kv_length - m.shape[-1]
        if missing > 0:  # static caches: slots past the mask are not real
            m = torch.nn.functional.pad(m, (0, missing))
        valid = valid & m[:, kv_offset:kv_offset + kv_length]
    else:
        valid = valid.expand(batch_size, kv_length)
    vi = valid.to(torch.int32)
    any_real = valid.any(dim=1)
    left = torch.where(any_real, vi.argmax(dim=1), 0)  # first real key
    end = torch.where(any_real, kv_length - vi.flip(1).argmax(dim=1), 0)  # one past the last real key
    if not _is_compiling() and bool((vi.sum(dim=1) != end - left).any()):
        raise ValueError("attn_implementation='mate' needs each row's real tokens to be contiguous (left or "
                         "right padding); the attention_mask has a padded token between real ones")
    # the last real query row sits at key position end - 1 (bottom-right alignment)
    used_q = (end + kv_offset - q_offset).clamp(0, q_length)
    return torch.stack([left, end, used_q.to(end.dtype)]).to(torch.int32).view(3, batch_size, 1, 1)


def mate_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    is_causal: Optional[bool] = None,
    s_aux: Optional[torch.Tensor] = None,
    **kwargs,
):
    """Attention function for transformers' ``AttentionInterface`` (name ``"mate"``).

    Args:
        module: the calling attention module (``is_causal`` is read from it when not passed).
        query, key, value: ``(B, H, Sq, D)``, ``(B, Hk, Sk, D)``, ``(B, Hk, Sk, Dv)``; any
            strides with a contiguous last dim (key/value are usually cache views).
        attention_mask: what :func:`mate_mask` returned (``None`` or ``(3, B, 1, 1)`` int32
            lengths).
        dropout: must be 0 in training mode (attention dropout is not implemented).
        scaling: softmax scale (default ``1/sqrt(D)``).
        sliding_window: transformers' window ``w`` (a key is seen when ``q - k < w``), i.e. our
            ``window_size_left = w - 1``.
        softcap: logit softcap ``c * tanh(s / c)``; ``None`` or 0 means none.
        is_causal: overrides ``module.is_causal``.
        s_aux: learnable attention sink per query head (gpt-oss), joining the softmax
            denominator only.

    Returns:
        ``(out (B, Sq, H, Dv), None)``: transformers' layout; there are no attention weights.
    """
    if dropout and module.training:
        raise NotImplementedError("attn_implementation='mate' does not implement attention dropout "
                                  f"(got dropout={dropout} in training mode)")
    if attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.shape[0] != 3
                                       or attention_mask.shape[2:] != (1, 1)
                                       or attention_mask.dtype != torch.int32):
        raise ValueError("attn_implementation='mate' got an attention_mask of shape "
                         f"{tuple(attention_mask.shape)} ({attention_mask.dtype}), not the (3, B, 1, 1) int32 lengths of its own mask function; "
                         "a prepared 4-D mask cannot be used with it")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    left = right = -1
    if sliding_window is not None and sliding_window > 0:
        left = sliding_window - 1
        right = -1 if causal else sliding_window - 1
    kw = {}
    if attention_mask is not None:
        lengths = attention_mask.view(3, -1)
        kw.update(cache_leftpad=lengths[0], seqused_k=lengths[1], seqused_q=lengths[2])
    if s_aux is not None:
        kw["learnable_sink"] = s_aux
    if softcap:
        kw["softcap"] = float(softcap)
    # (B, H, S, D) -> (B, S, H, D) views; the op takes any strides with a contiguous last dim
    with below_autograd(query, key, value, s_aux):  # inference: skip the autograd kernel's cost
        out, _ = torch.ops.mate.fmha_fwd(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
            softmax_scale=scaling, causal=bool(causal), window_size_left=left, window_size_right=right, **kw)
    return out, None


def register(name: str = NAME) -> str:
    """Register the attention and mask functions under ``name`` (idempotent); returns ``name``.

    Importing this module already registers ``"mate"``; call this for another name.
    """
    AttentionInterface.register(name, mate_attention_forward)
    AttentionMaskInterface.register(name, mate_mask)
    return name


register()
