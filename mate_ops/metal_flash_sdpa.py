"""The Metal flash SDPA kernels' Python surface (Hugging Face ``kernels-community/metal-flash-sdpa``,
package ``metal_flash_sdpa``) on ``torch.ops.mate``; SEMANTICS §5.

Two functions, with the original's names, argument names, order and defaults:

* :func:`flash_attention_varlen` ``(out, query, key, value, cu_seqlens_q, cu_seqlens_k,
  max_seqlen_q, max_seqlen_k, do_causal=False, scale=None, softcapping=1.0) -> None``
  writes ``out`` in place through ``torch.ops.mate.fmha_fwd_out`` (a mutating op, so
  ``torch.compile`` keeps the in-place write).
* :func:`flash_attn_varlen_func`: FlashAttention-2's varlen function in FA2's argument order
  (``dropout_p`` third after ``max_seqlen_k``), through ``torch.ops.mate.fmha_fwd``.

Ragged layout only: q/out ``(total_q, H, D)``, k/v ``(total_k, Hk, D/Dv)``, int32
``cu_seqlens_q`` / ``cu_seqlens_k`` ``(B + 1,)``; GQA when ``H % Hk == 0``. float32, float16
and bfloat16 inputs all work (float32 as in the Metal kernels). Forward only.

Decisions (where the original is silent or does something else):

* ``softcapping``: the Metal API's value ``1.0`` means "no softcap". ``0.0`` is also taken as
  "none" (FlashAttention's convention; the Metal kernel would divide by zero); any other
  positive value ``c`` applies SEMANTICS §1's ``c * tanh(s / c)`` to the scaled score;
  negative values raise ``ValueError``. (The Metal kernel applies its tanh to the score
  already multiplied by ``log2(e)``, which is not ``c * tanh(s / c)``; we compute the
  documented softcap, not that.)
* Causal masks are bottom-right aligned for every ``Sq``/``Sk`` (SEMANTICS §1, FA2 >= 2.1).
  The Metal kernel aligns bottom-right only when ``Sq < Sk`` and top-left when ``Sq > Sk``;
  there the first ``Sq - Sk`` rows see no key here and are written as 0.
* Head dims: any ``1..512`` (Metal: 32, 64, 72, 80, 96, 128, 256), and ``Dv`` may differ from
  ``D`` (``out`` must then be ``(total_q, H, Dv)``).
* :func:`flash_attn_varlen_func` supports what the Metal wrapper rejects with
  ``NotImplementedError``: ``window_size`` (FA2's local attention, -1 = unbounded),
  ``alibi_slopes`` (when this build's ``torch.ops.mate.fmha_fwd`` has an ``alibi_slopes``
  argument: fp32 ``(H,)`` or ``(B, H)``, FA2's bias ``-slope * |i + Sk - Sq - j|`` added to
  the scaled score; otherwise ``NotImplementedError`` naming ``alibi_slopes``) and
  ``return_attn_probs=True``, which returns FA2's 3-tuple ``(out, softmax_lse, S_dmask)`` as
  ``(out, lse, None)``: lse is fp32 ``(H, total_q)`` natural log, and ``S_dmask`` (FA2 only
  fills it when ``dropout_p > 0``, for testing) is None because dropout is not supported.
* ``dropout_p`` other than 0.0 raises ``ValueError`` (the Metal wrapper raises
  ``NotImplementedError`` for ``dropout_p > 0``). ``deterministic`` is accepted: the forward
  is deterministic.
"""
from typing import Optional, Sequence, Tuple, Union

import torch

from ._common import normalize_window

__all__ = ["flash_attention_varlen", "flash_attn_varlen_func"]


def _metal_softcap(softcapping: float) -> float:
    """The Metal API's ``softcapping`` (1.0 = none) as mate's ``softcap`` (0.0 = none)."""
    c = float(softcapping)
    if c == 1.0 or c == 0.0:
        return 0.0
    if not c > 0.0:  # negative or NaN
        raise ValueError(f"softcapping must be > 0 (1.0 means no softcapping), got {softcapping}")
    return c


def _check_ragged(query: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor) -> None:
    if query.dim() != 3:
        raise ValueError(f"query must be (total_q, num_heads, head_dim), got shape {tuple(query.shape)}")
    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise ValueError("cu_seqlens_q and cu_seqlens_k are required (int32, (batch_size + 1,))")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same size, got {tuple(cu_seqlens_q.shape)} "
                         f"and {tuple(cu_seqlens_k.shape)}")


def flash_attention_varlen(
    out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    do_causal: bool = False,
    scale: Optional[float] = None,
    softcapping: float = 1.0,
) -> None:
    """Variable-length attention written into ``out`` (Metal flash SDPA signature).

    Args:
        out: ``(total_q, num_heads, head_dim_v)``, written in place (its dtype is the output dtype).
        query: ``(total_q, num_heads, head_dim)``; key/value: ``(total_k, num_heads_kv, head_dim / head_dim_v)``.
        cu_seqlens_q, cu_seqlens_k: int32 ``(batch_size + 1,)`` cumulative lengths.
        max_seqlen_q, max_seqlen_k: accepted hints.
        do_causal: bottom-right aligned causal mask.
        scale: score scale, default ``1/sqrt(head_dim)``.
        softcapping: ``1.0`` (default) = no softcap; ``c > 0`` applies ``c * tanh(s / c)``.

    Returns:
        None (like the original); the result is in ``out``.
    """
    _check_ragged(query, cu_seqlens_q, cu_seqlens_k)
    lse = torch.empty((query.shape[1], query.shape[0]), dtype=torch.float32, device=query.device)
    torch.ops.mate.fmha_fwd_out(
        query, key, value, out, lse,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        softmax_scale=scale,
        causal=bool(do_causal),
        softcap=_metal_softcap(softcapping),
    )
    return None


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Union[Sequence[int], None] = (-1, -1),
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, None]]:
    """FlashAttention-2's ``flash_attn_varlen_func`` (argument order of the Metal wrapper / FA2).

    Args:
        q: ``(total_q, H, D)``; k/v: ``(total_k, Hk, D / Dv)``; cu_seqlens_*: int32 ``(B + 1,)``.
        max_seqlen_q, max_seqlen_k: accepted hints.
        dropout_p: must be 0.0 (``ValueError`` otherwise).
        softmax_scale: default ``1/sqrt(D)``.
        causal, window_size: bottom-right aligned causal / local masks (-1 = unbounded side).
        alibi_slopes: fp32 ``(H,)`` or ``(B, H)``: bias ``-slope * |i + Sk - Sq - j|`` on the
            scaled score; ``NotImplementedError`` if this build's op has no ``alibi_slopes``.
        deterministic: accepted (the forward is deterministic).
        return_attn_probs: return ``(out, softmax_lse, None)`` instead of ``out``.

    Returns:
        ``out (total_q, H, Dv)`` in q's dtype, or ``(out, lse fp32 (H, total_q), None)``.
    """
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p must be 0.0: mate_ops attention has no dropout (forward inference only), "
                         f"got dropout_p={dropout_p}")
    _check_ragged(q, cu_seqlens_q, cu_seqlens_k)
    left, right = normalize_window(window_size)
    extra = {} if alibi_slopes is None else {"alibi_slopes": alibi_slopes}
    out, lse = torch.ops.mate.fmha_fwd(
        q, k, v,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size_left=left,
        window_size_right=right,
        **extra,
    )
    if return_attn_probs:
        return out, lse, None
    return out
