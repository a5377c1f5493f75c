"""FlashAttention-3's ``hopper/flash_attn_interface.py`` surface on ``torch.ops.mate``.

A drop-in for ``from flash_attn_interface import ...``: the same function names, argument
names, argument order, defaults and return arities as FA3 (Dao-AILab/flash-attention,
``hopper/flash_attn_interface.py``). Every function delegates to
:mod:`mate_ops.mha_interface` (MATE's surface), which calls the ``torch.ops.mate`` ops; the
math is the contract of SEMANTICS §1-§2 (docs/semantics.md).

Training: :func:`flash_attn_func` and :func:`flash_attn_varlen_func` have an autograd
backward, as in FA3 (``torch.ops.mate.fmha_bwd``; CPU now, device kernels later; see
docs/semantics.md "Backward"): gradients w.r.t. q, k, v (GQA: summed over the group), with
causal / local / chunked masks and softcap. ``deterministic=True`` is honoured: the CPU
backward is always bitwise reproducible run to run. Paged K/V, ``qv`` and float8 inputs stay
forward-only: a backward through them raises naming the reason, never a silent None gradient.
FA3's :func:`flash_attn_with_kvcache` and :func:`flash_attn_combine` have no backward: a
backward through them raises ``NotImplementedError``.

Differences from FA3 that do not change results:

* ``get_scheduler_metadata`` returns mate's own layout (int32 ``(batch_size + 1,)``); pass it
  only to calls of this module with the same arguments, as with FA3.
* ``flash_attn_with_kvcache(..., return_softmax_lse=True)`` returns FA3's 4 values
  ``(out, lse, out_accum, lse_accum)`` in FA3's split-accumulator layouts, fp32
  ``out_accum (num_splits, B, H, Sq, Dv)`` / ``lse_accum (num_splits, B, H, Sq)`` (varlen q:
  ``(num_splits, H, total_q, Dv)`` / ``(num_splits, H, total_q)``). Splits are merged inside
  the op, so they always describe one split: ``num_splits = 1``, ``out_accum[0]`` = ``out``
  in fp32 and ``lse_accum[0]`` = ``lse`` (combining them gives ``(out, lse)`` back).
* A negative ``num_splits`` is FA3's heuristic (FA3 treats ``num_splits <= 0`` so); it is
  passed on as 0.
* ``flash_attn_combine``'s lse is a contiguous ``(B, Sq, H)`` tensor; FA3's is a transposed
  view of a ``(B, H, Sq)`` buffer. The values are the same.
"""
from typing import Optional, Union

import torch

from . import mha_interface as _mi

__all__ = [
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "get_scheduler_metadata",
    "flash_attn_combine",
]


def flash_attn_func(
    q,
    k,
    v,
    softmax_scale=None,
    causal=False,
    qv=None,
    q_descale=None,
    k_descale=None,
    v_descale=None,
    window_size=(-1, -1),
    attention_chunk=0,
    softcap=0.0,
    num_splits=1,
    pack_gqa=None,
    deterministic=False,
    sm_margin=0,
    return_attn_probs=False,
):
    """Dense attention, FA3 ``flash_attn_func`` (differentiable in q, k, v).

    Args:
        q: ``(B, Sq, H, D)``; k: ``(B, Sk, Hk, D)``; v: ``(B, Sk, Hk, Dv)``; ``H % Hk == 0``.
            fp16, bf16, fp32 or float8_e4m3fn (fp8 gives a bf16 ``out``).
        softmax_scale: default ``1/sqrt(D)``, or ``1/sqrt(D + Dv)`` when ``qv`` is given.
        causal: bottom-right aligned causal mask (the window ``(-1, 0)``).
        qv: ``(B, Sq, H, Dv)``; adds ``scale * <qv_i, v_j>`` to the scores.
        q_descale, k_descale, v_descale: fp32 ``(B, Hk)`` dequantization scales of fp8 inputs.
        window_size: ``(left, right)`` local window (a tuple, list or 2-element integer tensor),
            ``-1`` or ``None`` = unbounded on that side; ``None`` = no window. Anything else
            raises ``ValueError``.
        attention_chunk: ``c > 0`` restricts attention to keys of the query's chunk of c.
        softcap: ``softcap * tanh(s / softcap)`` when > 0.
        num_splits: 1 (default) = no split-KV, 0 = heuristic, n > 1 = n splits; never changes
            the result beyond fp32 rounding. ``pack_gqa`` is a hint too.
        deterministic: bitwise-reproducible gradients; the CPU backward always is.
        sm_margin: accepted for compatibility.
        return_attn_probs: also return the softmax lse (FA3 returns the lse, not probabilities).

    Returns:
        ``out`` ``(B, Sq, H, Dv)``, or ``(out, lse)`` with ``lse`` fp32 ``(B, H, Sq)`` (natural
        log; ``-inf`` for a query that sees no key, whose ``out`` row is 0).

    Backward: gradients w.r.t. q, k, v (and through the returned lse) via ``torch.ops.mate.fmha_bwd``.

    Raises:
        RuntimeError: at backward, for what stays forward-only (``qv``, float8 inputs), naming it.
    """
    return _mi.flash_attn_varlen_func(
        q, k, v,
        softmax_scale=softmax_scale,
        causal=causal,
        qv=qv,
        q_descale=q_descale,
        k_descale=k_descale,
        v_descale=v_descale,
        window_size=window_size,
        attention_chunk=attention_chunk,
        softcap=softcap,
        num_splits=_fa3_num_splits(num_splits),
        pack_gqa=pack_gqa,
        deterministic=deterministic,
        sm_margin=sm_margin,
        return_softmax_lse=return_attn_probs,
    )


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    seqused_q=None,
    seqused_k=None,
    softmax_scale=None,
    causal=False,
    qv=None,
    q_descale=None,
    k_descale=None,
    v_descale=None,
    window_size=(-1, -1),
    attention_chunk=0,
    softcap=0.0,
    num_splits=1,
    pack_gqa=None,
    deterministic=False,
    sm_margin=0,
    return_attn_probs=False,
):
    """Attention over packed variable-length sequences, FA3 ``flash_attn_varlen_func`` (differentiable in q, k, v).

    Args:
        q: ``(total_q, H, D)`` with ``cu_seqlens_q`` int32 ``(B+1,)`` (sequence b owns rows
            ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``); k/v: ``(total_k, Hk, D/Dv)`` with
            ``cu_seqlens_k``. Either cu_seqlens may be None, making that side dense ``(B, S, ...)``.
        max_seqlen_q, max_seqlen_k: the longest q/k sequence.
        seqused_q, seqused_k: int32 ``(B,)``: only the first ``seqused[b]`` rows of sequence b
            are real (query rows past it are written as 0, lse ``-inf``).
        softmax_scale, causal, qv, q_descale, k_descale, v_descale, window_size,
        attention_chunk, softcap, num_splits, pack_gqa, deterministic, sm_margin:
            as in :func:`flash_attn_func`.
        return_attn_probs: also return the softmax lse.

    Returns:
        ``out`` ``(total_q, H, Dv)``, or ``(out, lse)`` with ``lse`` fp32 ``(H, total_q)``.

    Backward: gradients w.r.t. q, k, v (and through the returned lse) via ``torch.ops.mate.fmha_bwd``.

    Raises:
        RuntimeError: at backward, for what stays forward-only (``qv``, float8 inputs), naming it.
    """
    return _mi.flash_attn_varlen_func(
        q, k, v,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        seqused_q=seqused_q,
        seqused_k=seqused_k,
        softmax_scale=softmax_scale,
        causal=causal,
        qv=qv,
        q_descale=q_descale,
        k_descale=k_descale,
        v_descale=v_descale,
        window_size=window_size,
        attention_chunk=attention_chunk,
        softcap=softcap,
        num_splits=_fa3_num_splits(num_splits),
        pack_gqa=pack_gqa,
        deterministic=deterministic,
        sm_margin=sm_margin,
        return_softmax_lse=return_attn_probs,
    )


def flash_attn_combine(out_partial, lse_partial, out=None, out_dtype=None):
    """Merge split-KV partial results, FA3 ``flash_attn_combine`` (SEMANTICS §2).

    Args:
        out_partial: fp32 ``(num_splits, B, Sq, H, Dv)`` (or ``(num_splits, total_q, H, Dv)``).
        lse_partial: fp32 ``(num_splits, B, Sq, H)`` (or ``(num_splits, total_q, H)``), natural
            log. Any strides (FA3 requires ``stride(-2) == 1``).
        out: optional ``(B, Sq, H, Dv)`` output, written in place and returned.
        out_dtype: fp32, fp16 or bf16; defaults to ``out.dtype`` if given, else fp32
            (``out_partial``'s dtype, as in FA3).

    Returns:
        ``(out, lse)``: ``lse = logsumexp_s lse_partial[s]``, ``out = sum_s exp(lse_partial[s] -
        lse) * out_partial[s]``; a split whose lse is -inf or NaN weighs 0, and a row with no
        live split gives out 0, lse -inf. ``lse`` is fp32 ``(B, Sq, H)``, contiguous (FA3's is
        a transposed view of ``(B, H, Sq)``; same values).

    Raises:
        NotImplementedError: on a backward through the result (FA3 has no backward here either).
    """
    return _mi.flash_attn_combine(out_partial, lse_partial, out=out, out_dtype=out_dtype)


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    qv=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens: Optional[Union[int, torch.Tensor]] = None,
    cache_batch_idx: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    page_table: Optional[torch.Tensor] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k_new: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    rotary_seqlens: Optional[torch.Tensor] = None,
    q_descale: Optional[torch.Tensor] = None,
    k_descale: Optional[torch.Tensor] = None,
    v_descale: Optional[torch.Tensor] = None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    attention_chunk=0,
    softcap=0.0,
    rotary_interleaved=True,
    scheduler_metadata=None,
    num_splits=0,
    pack_gqa=None,
    sm_margin=0,
    return_softmax_lse=False,
):
    """Attention against a kv cache, optionally appending new keys first; FA3 ``flash_attn_with_kvcache``.

    With ``k``/``v`` given, the new keys (rotated when ``rotary_cos``/``rotary_sin`` are given)
    and values are written IN PLACE into ``k_cache``/``v_cache`` at positions
    ``[cache_seqlens[b], cache_seqlens[b] + new_len)`` of sequence b's cache row
    (``cache_batch_idx[b]`` or b; through ``page_table`` when paged), and attention then runs
    over keys ``[cache_leftpad[b], cache_seqlens[b] + new_len)``. q is rotated at
    ``off[b] + t`` (row t) when causal or local, else every row at ``off[b]``, with
    ``off = rotary_seqlens`` if given, else ``cache_seqlens`` (SEMANTICS §1, "Append and rotary").

    Args:
        q: ``(B, Sq, H, D)``, or ``(total_q, H, D)`` with ``cu_seqlens_q`` and ``max_seqlen_q``.
        k_cache, v_cache: dense ``(B_cache, Sk, Hk, D/Dv)``, or paged ``(num_pages, page_size,
            Hk, D/Dv)`` with ``page_table`` int32 ``(B, max_pages)``.
        k, v: new keys/values ``(B, Snew, Hk, D/Dv)``, or ``(total_new, Hk, D/Dv)`` with
            ``cu_seqlens_k_new``. Given together or not at all.
        qv: ``(..., H, Dv)`` extra query against v; default scale becomes ``1/sqrt(D + Dv)``.
        rotary_cos, rotary_sin: ``(seqlen_ro, R/2)`` in q's dtype, ``R % 16 == 0``, ``R <= D``;
            ``rotary_interleaved`` selects GPT-J pairs (True) or NeoX pairs (False).
        cache_seqlens: int or int32 ``(B,)``: the absolute end of sequence b's cached keys
            (counting left padding); an int is expanded to every sequence.
        cache_batch_idx, cache_leftpad, rotary_seqlens: int32 ``(B,)``.
        q_descale, k_descale, v_descale, softmax_scale, causal, window_size, attention_chunk,
        softcap, pack_gqa: as in :func:`flash_attn_func`.
        scheduler_metadata: from :func:`get_scheduler_metadata` with the same arguments.
        num_splits: 0 (default) = heuristic, 1 = no split, n > 1 = n splits (merged in the op).
        sm_margin: accepted for compatibility.
        return_softmax_lse: return FA3's 4 values instead of ``out``.

    Returns:
        ``out`` (``q.shape[:-1] + (Dv,)``), or ``(out, lse, out_accum, lse_accum)`` with ``lse``
        fp32 ``(B, H, Sq)`` (``(H, total_q)`` with ``cu_seqlens_q``); ``out_accum`` fp32
        ``(1, B, H, Sq, Dv)`` (``(1, H, total_q, Dv)``) and ``lse_accum`` fp32 ``(1, B, H, Sq)``
        (``(1, H, total_q)``): FA3's accumulator layouts holding the single merged split.

    Raises:
        NotImplementedError: on a backward through the result (FA3 has no backward here either).
    """
    res = _mi.flash_attn_with_kvcache(
        q, k_cache, v_cache,
        k=k,
        v=v,
        qv=qv,
        rotary_cos=rotary_cos,
        rotary_sin=rotary_sin,
        cache_seqlens=cache_seqlens,
        cache_batch_idx=cache_batch_idx,
        cache_leftpad=cache_leftpad,
        page_table=page_table,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k_new=cu_seqlens_k_new,
        max_seqlen_q=max_seqlen_q,
        rotary_seqlens=rotary_seqlens,
        q_descale=q_descale,
        k_descale=k_descale,
        v_descale=v_descale,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=window_size,
        attention_chunk=attention_chunk,
        softcap=softcap,
        rotary_interleaved=rotary_interleaved,
        scheduler_metadata=scheduler_metadata,
        num_splits=_fa3_num_splits(num_splits),
        pack_gqa=pack_gqa,
        sm_margin=sm_margin,
        return_softmax_lse=return_softmax_lse,
    )
    if not return_softmax_lse:
        return res
    # FA3 always returns 4 values (MATE's MLA route, q dim 64 + qv dim 512, returns 2).
    out, lse = res[0], res[1]
    # FA3's accumulator layouts, one split: (1, B, H, Sq, Dv) / (1, B, H, Sq), or varlen
    # (1, H, total_q, Dv) / (1, H, total_q); out is (..., Sq, H, Dv) with Sq, H at dims -3, -2.
    out_accum = out.transpose(-3, -2).to(torch.float32, copy=True).contiguous().unsqueeze(0)
    lse_accum = lse.to(torch.float32, copy=True).unsqueeze(0)
    return out, lse, out_accum, lse_accum


def _fa3_num_splits(num_splits):
    """FA3 treats ``num_splits <= 0`` as "pick by heuristic"; mate's heuristic value is 0."""
    if isinstance(num_splits, int) and not isinstance(num_splits, bool) and num_splits < 0:
        return 0
    return num_splits


def get_scheduler_metadata(
    batch_size,
    max_seqlen_q,
    max_seqlen_k,
    num_heads_q,
    num_heads_kv,
    headdim,
    cache_seqlens: torch.Tensor,
    qkv_dtype=torch.bfloat16,
    headdim_v=None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k_new: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    page_size: Optional[int] = None,
    max_seqlen_k_new=0,
    causal=False,
    window_size=(-1, -1),
    attention_chunk=0,
    has_softcap=False,
    num_splits=0,
    pack_gqa=None,
    sm_margin=0,
):
    """Scheduling metadata for :func:`flash_attn_with_kvcache`, FA3 ``get_scheduler_metadata``.

    Args:
        batch_size, max_seqlen_q, max_seqlen_k, num_heads_q, num_heads_kv, headdim: the shapes
            of the later attention call (``max_seqlen_k``: the longest cache).
        cache_seqlens: int32 ``(B,)`` key lengths of the cache (required, as in FA3).
        qkv_dtype, headdim_v (default ``headdim``), cu_seqlens_q, cu_seqlens_k_new,
        cache_leftpad, page_size, max_seqlen_k_new, causal, window_size, attention_chunk,
        has_softcap, num_splits, pack_gqa, sm_margin: the arguments of the later call.

    Returns:
        An int32 tensor on ``cache_seqlens``' device whose size depends only on the arguments
        (mate's layout ``(batch_size + 1,)``, not FA3's). Passing it as ``scheduler_metadata``
        to a call with the same arguments gives the same result as not passing it.
    """
    return _mi.get_scheduler_metadata(
        batch_size,
        max_seqlen_q,
        max_seqlen_k,
        num_heads_q,
        num_heads_kv,
        headdim,
        seqused_k=cache_seqlens,
        qkv_dtype=qkv_dtype,
        headdim_v=headdim_v,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k_new=cu_seqlens_k_new,
        cache_leftpad=cache_leftpad,
        page_size=page_size,
        max_seqlen_k_new=max_seqlen_k_new,
        causal=causal,
        window_size=window_size,
        attention_chunk=attention_chunk,
        has_softcap=has_softcap,
        num_splits=_fa3_num_splits(num_splits),
        pack_gqa=pack_gqa,
        mp_margin=sm_margin,
    )
