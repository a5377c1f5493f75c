"""MATE's ``mate.mha_interface`` surface on ``torch.ops.mate``: same names, argument
orders, defaults and return values as Moore Threads' MATE.

Training: :func:`flash_attn_varlen_func` is differentiable in q, k, v and ``learnable_sink``
(``torch.ops.mate.fmha_bwd``, registered with ``torch.library.register_autograd`` in
``mate_ops/_autograd.py``; CPU now). Paged K/V, ``qv``, float8, context parallel and the
kv-cache decode step (:func:`flash_attn_with_kvcache`) are forward-only: a backward through
them raises naming the reason (csrc/common/autograd.cpp and fmha_bwd's checks).
"""
from typing import Optional, Sequence, Tuple, Union

import torch

from ._autograd import below_autograd
from ._common import OpCaller, check_backend, default_device, normalize_window

__all__ = ["flash_attn_varlen_func", "flash_attn_with_kvcache", "flash_attn_combine", "get_scheduler_metadata"]

_INT32_MAX = 2**31 - 1


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    seqused_q: Optional[torch.Tensor] = None,
    seqused_k: Optional[torch.Tensor] = None,
    page_table: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    qv: Optional[torch.Tensor] = None,
    q_descale: Optional[torch.Tensor] = None,
    k_descale: Optional[torch.Tensor] = None,
    v_descale: Optional[torch.Tensor] = None,
    window_size: Union[Sequence[int], None] = (-1, -1),
    learnable_sink: Optional[torch.Tensor] = None,
    attention_chunk: int = 0,
    softcap: float = 0.0,
    scheduler_metadata: Optional[torch.Tensor] = None,
    num_splits: int = 0,
    pack_gqa: Optional[bool] = None,
    deterministic: bool = False,
    sm_margin: int = 0,
    return_softmax_lse: bool = False,
    backend: str = "auto",
    cp_world_size: int = 1,
    cp_rank: int = 0,
    cp_tot_seqused_k: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
):
    """Flash attention forward over ragged, dense, padded or paged sequences (MATE signature).

    Layouts (SEMANTICS §1): with ``cu_seqlens_q`` (int32, ``(B+1,)``) q is ``(total_q, H, D)``;
    without it q is dense ``(B, Sq, H, D)``. k/v are ragged ``(total_k, Hk, D)`` with
    ``cu_seqlens_k``, paged ``(num_pages, page_size, Hk, D)`` with ``page_table`` (int32
    ``(B, max_pages)``; then ``seqused_k`` gives the key lengths), or dense ``(B, Sk, Hk, D)``.
    ``seqused_q``/``seqused_k`` (int32 ``(B,)``) mark only the first rows of a sequence as real.

    Args:
        softmax_scale: defaults to ``1/sqrt(D)``, or ``1/sqrt(D + Dv)`` when ``qv`` is given.
        causal / window_size / attention_chunk: bottom-right aligned masks; ``-1`` = unbounded.
            ``window_size`` is ``None`` or a ``(left, right)`` pair (tuple, list, 2-element
            tensor); ``None`` or a negative value on a side leaves that side unbounded.
        qv: ``(..., H, Dv)``; adds ``scale * <qv_i, v_j>`` to the scores.
        q_descale, k_descale, v_descale: fp32 ``(B, Hk)`` dequantization scales for float8 inputs.
        learnable_sink: ``(H,)`` one unscaled logit per head that joins only the softmax denominator.
        softcap: ``softcap * tanh(s / softcap)`` when > 0.
        scheduler_metadata: from :func:`get_scheduler_metadata`; never changes the result.
            MATE's MLA-through-MHA route passes a ``(workspace_tensor, bool)`` tuple: for a
            tuple or list, its first element that is an int32 ``(B + 1,)`` tensor (our layout)
            is used and everything else in it is ignored (MATE's workspaces have no meaning here).
        num_splits: 1 = no split-KV, 0 = heuristic, n > 1 = n key splits merged exactly as
            :func:`flash_attn_combine` does; negative (MATE's ``-1``) = do not split, as 1.
            ``pack_gqa`` is a hint too.
        deterministic: bitwise-reproducible gradients; the CPU backward always is (forward too).
        sm_margin: accepted for compatibility.
        return_softmax_lse: also return the natural-log lse, fp32 ``(B, H, Sq)`` or ``(H, total_q)``.
        backend: ``"auto"``, ``"mutlass"`` or ``"mubin"`` (MATE's MUSA kernel families); all
            compute the same result here. Anything else raises ``ValueError``.
        cp_world_size, cp_rank, cp_tot_seqused_k: context parallel; keys of this rank are the
            global keys ``j * cp_world_size + cp_rank``; ``cp_tot_seqused_k`` int32 ``(B,)``.
        out: optional output tensor, written in place and returned. Forward-only: with inputs
            that require grad (under grad mode) it raises ``ValueError``; call without ``out`` to train.

    Returns:
        ``out`` of shape ``q.shape[:-1] + (Dv,)`` (bf16 for float8 inputs), or ``(out, lse)``
        when ``return_softmax_lse``.
    """
    check_backend(backend)
    left, right = normalize_window(window_size)
    num_splits = mate_num_splits(num_splits)
    scheduler_metadata = mate_scheduler_metadata(scheduler_metadata, q, cu_seqlens_q)
    # the op arguments after q, k, v (and out, lse), in schema order
    values = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k, page_table, None, None,
              qv, q_descale, k_descale, v_descale, softmax_scale, causal, left, right, learnable_sink,
              attention_chunk or 0, softcap, scheduler_metadata, num_splits, pack_gqa, cp_world_size, cp_rank,
              cp_tot_seqused_k)
    if out is None:
        with below_autograd(q, k, v, qv, q_descale, k_descale, v_descale, learnable_sink):
            out, lse = _fmha_fwd((q, k, v), values)
    else:
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, learnable_sink)):
            # fmha_fwd_out writes the caller's tensor and has no backward: refuse rather than
            # hand back an output whose gradient would silently be missing
            raise ValueError("flash_attn_varlen_func(out=...) is forward-only (it writes into `out` in place): "
                             "call it without out to train, or under torch.no_grad()")
        ragged = cu_seqlens_q is not None
        if q.dim() != (3 if ragged else 4):
            raise ValueError(f"q must be {'(total_q, H, D) with cu_seqlens_q' if ragged else '(B, Sq, H, D)'}, "
                             f"got shape {tuple(q.shape)}")
        lse_shape = (q.shape[1], q.shape[0]) if ragged else (q.shape[0], q.shape[2], q.shape[1])
        lse = q.new_empty(lse_shape, dtype=torch.float32)
        _fmha_fwd_out((q, k, v, out, lse), values)
    return (out, lse) if return_softmax_lse else out


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: Optional[torch.Tensor] = None,
    v: Optional[torch.Tensor] = None,
    qv: Optional[torch.Tensor] = None,
    rotary_cos: Optional[torch.Tensor] = None,
    rotary_sin: Optional[torch.Tensor] = None,
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
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Union[Sequence[int], None] = (-1, -1),
    learnable_sink: Optional[torch.Tensor] = None,
    attention_chunk: int = 0,
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    scheduler_metadata: Optional[torch.Tensor] = None,
    num_splits: int = 0,
    pack_gqa: Optional[bool] = None,
    sm_margin: int = 0,
    return_softmax_lse: bool = False,
    cp_world_size: int = 1,
    cp_rank: int = 0,
    cp_tot_seqused_k: Optional[torch.Tensor] = None,
):
    """Attention against a kv cache, optionally appending new keys/values first (MATE signature).

    Steps (SEMANTICS §1, "Append and rotary"):

    1. With ``rotary_cos``/``rotary_sin`` (``(seqlen_ro, R/2)``, q's dtype, ``R % 16 == 0``,
       ``R <= D``; only together with ``k``/``v``), q is rotated: row t of sequence b at
       position ``off[b] + t`` when causal or local, else every row at ``off[b]``, where
       ``off = rotary_seqlens`` if given, else ``cache_seqlens``. ``rotary_interleaved``
       picks GPT-J pairs ``(2m, 2m+1)`` (True) or NeoX pairs ``(m, m + R/2)`` (False).
    2. With ``k``/``v`` (``(B, Snew, Hk, D)``, or packed ``(total_new, Hk, D)`` with
       ``cu_seqlens_k_new``), the new keys (rotated at ``off[b] + t``) and values are written
       in place into ``k_cache``/``v_cache`` at ``[cache_seqlens[b], cache_seqlens[b] + new_len)``
       of sequence b's cache row (``cache_batch_idx[b]`` or b; through ``page_table`` when paged).
    3. Attention of q over keys ``[cache_leftpad[b], cache_seqlens[b] + new_len)`` of the cache.

    Args:
        q: ``(B, Sq, H, D)``, or ``(total_q, H, D)`` with ``cu_seqlens_q`` and ``max_seqlen_q``.
        k_cache, v_cache: dense ``(B_cache, Sk, Hk, D/Dv)`` or paged ``(num_pages, page_size, Hk, D/Dv)``
            with ``page_table`` int32 ``(B, max_pages)``. Modified in place when ``k``/``v`` are given.
        cache_seqlens: int or int32 ``(B,)``: keys already in each cache row (absolute end index,
            counting left padding). Defaults to the full dense cache length.
        qv, q_descale, k_descale, v_descale, softmax_scale, causal, window_size, learnable_sink,
        attention_chunk, softcap, scheduler_metadata, num_splits, pack_gqa, cp_*: as in
            :func:`flash_attn_varlen_func` (a MATE ``(workspace, bool)`` ``scheduler_metadata``
            tuple and a negative ``num_splits`` included). ``num_splits=0`` (the default) picks
            splits by heuristic.
        sm_margin: accepted for compatibility.

    Returns:
        ``out`` (``q.shape[:-1] + (Dv,)``), or with ``return_softmax_lse`` what MATE returns:
        ``(out, lse, out_accum, lse_accum)``. We merge splits inside the op, so the two
        accumulators are empty tensors. MATE's MLA route (q head dim 64 with a 512-wide ``qv``)
        returns ``(out, lse)``.
    """
    left, right = normalize_window(window_size)
    num_splits = mate_num_splits(num_splits)
    scheduler_metadata = mate_scheduler_metadata(scheduler_metadata, q, cu_seqlens_q)
    if isinstance(cache_seqlens, int):
        batch = cu_seqlens_q.shape[0] - 1 if cu_seqlens_q is not None else q.shape[0]
        cache_seqlens = _int_seqlens(cache_seqlens, batch, q.device)
    # One op: append + rotary + attention, every check before the first write (fmha_fwd_kvcache).
    out, lse = _fmha_fwd_kvcache((q, k_cache, v_cache), (
        k, v, qv, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad, page_table, cu_seqlens_q,
        cu_seqlens_k_new, max_seqlen_q, rotary_seqlens, q_descale, k_descale, v_descale, softmax_scale, causal, left,
        right, learnable_sink, attention_chunk or 0, softcap, rotary_interleaved, scheduler_metadata, num_splits,
        pack_gqa, cp_world_size, cp_rank, cp_tot_seqused_k))
    if not return_softmax_lse:
        return out
    if qv is not None and q.shape[-1] == 64 and qv.shape[-1] == 512:
        return out, lse  # MATE's MLA route returns two values
    return out, lse, out.new_empty(0, dtype=torch.float32), lse.new_empty(0)


_fmha_fwd = OpCaller(torch.ops.mate.fmha_fwd.default, 3)
_fmha_fwd_out = OpCaller(torch.ops.mate.fmha_fwd_out.default, 5)
_fmha_fwd_kvcache = OpCaller(torch.ops.mate.fmha_fwd_kvcache.default, 3)


def mate_num_splits(num_splits):
    """MATE's ``num_splits``: a negative value (MATE documents ``-1``) means "do not split" = 1."""
    if isinstance(num_splits, int) and not isinstance(num_splits, bool) and num_splits < 0:
        return 1
    return num_splits


def mate_scheduler_metadata(scheduler_metadata, q: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor]):
    """MATE's ``scheduler_metadata`` forms -> ours (a hint that never changes the result).

    A tensor or None passes through (the op validates it). A tuple or list (MATE's MLA route
    passes ``(workspace_tensor, bool)``) yields its first int32 ``(batch + 1,)`` tensor, our
    :func:`get_scheduler_metadata` layout, or None when it holds none (batch from
    ``cu_seqlens_q``, else ``q.shape[0]``).
    """
    if not isinstance(scheduler_metadata, (tuple, list)):
        return scheduler_metadata
    if cu_seqlens_q is not None and cu_seqlens_q.dim() == 1:
        batch = cu_seqlens_q.shape[0] - 1
    elif q.dim() >= 1:
        batch = q.shape[0]
    else:
        return None
    for item in scheduler_metadata:
        if (isinstance(item, torch.Tensor) and item.dtype == torch.int32 and item.dim() == 1
                and item.shape[0] == batch + 1):
            return item
    return None


def _int_seqlens(n: int, batch: int, device: torch.device) -> torch.Tensor:
    """An int ``cache_seqlens`` as the int32 ``(batch,)`` tensor the op takes."""
    if not -(2**31) <= n <= 2**31 - 1:  # the op itself rejects negative lengths, naming the sequence
        raise ValueError(f"cache_seqlens must fit in int32 (key positions are int32), got {n}")
    return torch.full((batch,), n, dtype=torch.int32, device=device)


def flash_attn_combine(
    out_partial: torch.Tensor,
    lse_partial: torch.Tensor,
    out: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge split-KV partial results (SEMANTICS §2; MATE/FA3 signature).

    Args:
        out_partial: fp32 ``(num_splits, B, Sq, H, Dv)`` (or varlen ``(num_splits, total_q, H, Dv)``).
        lse_partial: fp32 ``(num_splits, B, Sq, H)`` (or ``(num_splits, total_q, H)``), natural log.
        out: optional output ``(B, Sq, H, Dv)``, written in place.
        out_dtype: output dtype (fp32, fp16 or bf16); defaults to ``out.dtype`` or fp32.

    Returns:
        ``(out, lse)``: ``out = sum_s exp(lse_s - lse) * out_s`` with ``lse = logsumexp_s lse_s``;
        splits whose lse is -inf or NaN weigh 0; all -inf gives 0 / -inf. lse is fp32 ``(B, Sq, H)``.
    """
    if out is None:
        return torch.ops.mate.fmha_combine(out_partial, lse_partial, out_dtype)
    if out_dtype is not None and out.dtype != out_dtype:
        raise ValueError(f"out has dtype {out.dtype} but out_dtype is {out_dtype}")
    lse = lse_partial.new_empty(lse_partial.shape[1:])
    torch.ops.mate.fmha_combine_out(out_partial, lse_partial, out, lse)
    return out, lse


def get_scheduler_metadata(
    batch_size: int,
    max_seqlen_q: int,
    max_seqlen_k: int,
    num_heads_q: int,
    num_heads_kv: int,
    headdim: int,
    seqused_q: Optional[torch.Tensor] = None,
    seqused_k: Optional[torch.Tensor] = None,
    qkv_dtype: torch.dtype = torch.bfloat16,
    headdim_v: Optional[int] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    cu_seqlens_k_new: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    page_size: Optional[int] = None,
    max_seqlen_k_new: int = 0,
    causal: bool = False,
    window_size: Union[Sequence[int], None] = (-1, -1),
    attention_chunk: int = 0,
    has_softcap: bool = False,
    num_splits: int = 0,
    pack_gqa: Optional[bool] = None,
    has_qv: bool = False,
    mp_margin: int = 0,
) -> torch.Tensor:
    """Scheduling metadata for later attention calls with the same arguments (MATE signature).

    ``seqused_k`` holds the key (cache) lengths, int32 ``(B,)``; when omitted every sequence is
    taken to have ``max_seqlen_k`` keys. Returns an int32 tensor of shape ``(batch_size + 1,)``
    (entry 0: the split count, entry ``1 + b``: splits of sequence b), on the device of the
    given tensors. Its size depends only on ``batch_size``; passing it to an attention call gives
    the same result as not passing it. ``has_qv`` and ``mp_margin`` are accepted for compatibility.
    A negative ``num_splits`` (MATE's ``-1``, "do not split") is taken as 1.
    """
    num_splits = mate_num_splits(num_splits)
    device = default_device(seqused_k, seqused_q, cu_seqlens_q, cu_seqlens_k, cu_seqlens_k_new)
    if seqused_k is None:
        if batch_size < 0 or max_seqlen_k < 0:
            raise ValueError(f"batch_size and max_seqlen_k must be >= 0, got {batch_size} and {max_seqlen_k}")
        if max_seqlen_k > _INT32_MAX:
            # checked here: the int32 seqused_k built from it below would fail with torch's
            # "value cannot be converted to type int without overflow"
            raise ValueError(f"max_seqlen_k must be in [0, 2^31 - 1] (key lengths are int32), got {max_seqlen_k}")
        seqused_k = torch.full((batch_size,), max_seqlen_k, dtype=torch.int32, device=device)
    left, right = normalize_window(window_size)
    return torch.ops.mate.get_scheduler_metadata(
        batch_size,
        max_seqlen_q,
        max_seqlen_k,
        num_heads_q,
        num_heads_kv,
        headdim,
        headdim_v if headdim_v is not None else headdim,
        qkv_dtype,
        seqused_k,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        cu_seqlens_k_new=cu_seqlens_k_new,
        seqused_q=seqused_q,
        cache_leftpad=cache_leftpad,
        page_size=page_size,
        max_seqlen_k_new=max_seqlen_k_new,
        causal=causal,
        window_size_left=left,
        window_size_right=right,
        attention_chunk=attention_chunk,
        has_softcap=has_softcap,
        num_splits=num_splits,
        pack_gqa=pack_gqa,
        sm_margin=mp_margin,
    )
