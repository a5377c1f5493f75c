"""DeepSeek FlashMLA's ``flash_mla`` surface (``flash_mla/flash_mla_interface.py``) on
``torch.ops.mate``.

A drop-in for ``from flash_mla import get_mla_metadata, flash_mla_with_kvcache,
flash_mla_sparse_fwd, FlashMLASchedMeta``: FlashMLA's names, argument names and order,
defaults and return values. Every call delegates to :mod:`mate_ops.flashmla` (MATE's
surface), whose math is SEMANTICS §3 (docs/semantics.md, "MLA"). Forward only.

Two metadata styles
-------------------
FlashMLA changed how the tile-scheduler metadata is made, and code written for either
version keeps working here:

* **Lazy (current FlashMLA).** ``sched_meta, _ = get_mla_metadata()`` returns
  ``(FlashMLASchedMeta(), None)``: an empty object that the first
  :func:`flash_mla_with_kvcache` call fills (it records the call's configuration in
  ``sched_meta.config`` and stores the scheduler tensors in
  ``sched_meta.tile_scheduler_metadata`` / ``sched_meta.num_splits``). Later calls with the
  same object are checked against the recorded configuration (batch size, ``s_q``, ``h_q``,
  page block size, ``h_k``, ``causal``, ``is_fp8_kvcache``, ``topk``, the extra cache's page
  block size and ``extra_topk``); a mismatch raises :class:`FlashMLASchedMetaMismatchError`
  (a ``ValueError`` that is also an ``AssertionError``, the type FlashMLA raises) naming
  every field that differs. Pass ``num_splits=None`` with it, as FlashMLA requires.
* **Tensors (older FlashMLA, and MATE).** ``tile_scheduler_metadata, num_splits =
  get_mla_metadata(cache_seqlens, s_q * h_q // h_k, h_k, h_q, is_fp8, topk)`` returns the
  int32 tensors ``(num_parts, 8)`` and ``(B + 1,)`` of
  :func:`mate_ops.flashmla.get_mla_metadata`; pass both to :func:`flash_mla_with_kvcache`.

How the styles are told apart:

* :func:`flash_mla_with_kvcache` does what FlashMLA's current code does: it looks at the
  *type* of ``tile_scheduler_metadata``. A :class:`FlashMLASchedMeta` is the lazy style
  (``num_splits`` must then be None); a tensor (or None) is the tensor style.
* :func:`get_mla_metadata`: FlashMLA's current version ignores its arguments ("kept to be
  compatible with the old interface") and always returns the lazy object. Here a call
  *with a ``cache_seqlens`` tensor* (first positional argument or ``cache_seqlens=``) is
  taken as the old interface and returns the tensors; any other call (no arguments, the
  current documented form) returns ``(FlashMLASchedMeta(), None)``. Both objects work with
  :func:`flash_mla_with_kvcache`, so code that passes the pair straight on behaves the same
  either way; only code that inspects the returned object after calling with arguments
  sees the difference. Such code can build the lazy object itself: ``FlashMLASchedMeta()``.

Reusing a lazy object when ``cache_seqlens`` / ``topk_length`` values change: FlashMLA
freezes the schedule made by the first call, so its docstring allows reuse only while
those values stay the same. Here the scheduler metadata is a hint that never changes the
result (SEMANTICS §3), so such reuse still gives the correct answer; the values are not
compared (that would need a device sync on every call).

Differences from FlashMLA (results are SEMANTICS §3 in every case)
-----------------------------------------------------------------
* More inputs are accepted: any page block size, dense caches in bf16/fp16/fp32, sparse
  attention with a non-FP8 cache, ``attn_sink`` with dense attention. FlashMLA asserts these
  away; the math is well defined, so they are allowed.
* :func:`flash_mla_sparse_fwd` returns a **natural-log** lse and ``max_logits`` in units of
  the scaled score, like current FlashMLA (its sm90 kernel stores ``log(L) + m * ln 2`` and
  its ``tests/ref.py`` compares against ``torch.logsumexp``). Older FlashMLA (e.g. commit
  323f076) documented a base-2 lse and base-2 ``max_logits``; multiply ours by
  ``log2(e)`` to get those.
* ``indexer_topk`` (newest FlashMLA): FlashMLA accepts 0, 512 or 2048 and only
  ``h_q == 64``; any ``0 <= indexer_topk <= topk`` and any ``h_q`` work here.
  ``lse_indexer`` is the natural-log lse over the valid entries among the first
  ``min(indexer_topk, topk_length[i])`` indices of row i (``+inf`` if there is none).
"""
import dataclasses
from typing import Optional, Tuple, Union

import torch

from . import flashmla as _fm

__all__ = [
    "FlashMLASchedMeta",
    "FlashMLASchedMetaMismatchError",
    "get_mla_metadata",
    "flash_mla_with_kvcache",
    "flash_mla_sparse_fwd",
]


class FlashMLASchedMetaMismatchError(ValueError, AssertionError):
    """A :class:`FlashMLASchedMeta` reused with a configuration other than its first call's.

    A ``ValueError`` (how mate_ops reports bad arguments) that is also an ``AssertionError``
    (what FlashMLA raises for the same mistake), so either ``except`` clause catches it.
    """


@dataclasses.dataclass
class FlashMLASchedMeta:
    """Lazily filled tile-scheduler metadata (FlashMLA's current interface).

    Returned empty by ``get_mla_metadata()``; the first :func:`flash_mla_with_kvcache` call
    that receives it sets ``have_initialized``, records ``config`` and stores the scheduler
    tensors; later calls are checked against ``config``.
    """

    @dataclasses.dataclass
    class Config:
        """The configuration of the first call that used a :class:`FlashMLASchedMeta`."""

        b: int
        s_q: int
        h_q: int
        page_block_size: int
        h_k: int
        causal: bool
        is_fp8_kvcache: bool
        topk: Optional[int]
        extra_page_block_size: Optional[int]
        extra_topk: Optional[int]

    have_initialized: bool = False
    config: Optional[Config] = None
    tile_scheduler_metadata: Optional[torch.Tensor] = None  # int32 (num_parts, 8)
    num_splits: Optional[torch.Tensor] = None  # int32 (B + 1,)


_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(FlashMLASchedMeta.Config))


def get_mla_metadata(*args, **kwargs):
    """Tile-scheduler metadata for :func:`flash_mla_with_kvcache`, in either FlashMLA style.

    * ``get_mla_metadata()`` (current FlashMLA): returns ``(FlashMLASchedMeta(), None)``, an
      empty object the first :func:`flash_mla_with_kvcache` call fills. Only the first
      element is useful; pass ``num_splits=None``.
    * ``get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k,
      num_heads_q=None, is_fp8_kvcache=False, topk=None, ...)`` (older FlashMLA / MATE; told
      apart by the ``cache_seqlens`` tensor): returns ``(tile_scheduler_metadata int32
      (num_parts, 8), num_splits int32 (B + 1,))`` from
      :func:`mate_ops.flashmla.get_mla_metadata`, which also takes MATE's extra arguments.

    Any other call (arguments without a ``cache_seqlens`` tensor) returns the lazy object
    and ignores its arguments, as current FlashMLA does.
    """
    cache_seqlens = args[0] if args else kwargs.get("cache_seqlens")
    if isinstance(cache_seqlens, torch.Tensor):
        return _fm.get_mla_metadata(*args, **kwargs)
    return FlashMLASchedMeta(), None


def _call_config(q, k_cache, causal, is_fp8_kvcache, indices, extra_k_cache, extra_indices_in_kvcache):
    if q.dim() != 4:
        raise ValueError(f"q must be (batch_size, seq_len_q, num_heads_q, head_dim), got shape {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be (num_blocks, page_block_size, num_heads_k, head_dim), got shape "
                         f"{tuple(k_cache.shape)}")
    return FlashMLASchedMeta.Config(
        b=q.shape[0],
        s_q=q.shape[1],
        h_q=q.shape[2],
        page_block_size=k_cache.shape[1],
        h_k=k_cache.shape[2],
        causal=bool(causal),
        is_fp8_kvcache=bool(is_fp8_kvcache),
        topk=indices.shape[-1] if indices is not None else None,
        extra_page_block_size=extra_k_cache.shape[1] if extra_k_cache is not None else None,
        extra_topk=extra_indices_in_kvcache.shape[-1] if extra_indices_in_kvcache is not None else None,
    )


def _check_config(recorded: "FlashMLASchedMeta.Config", now: "FlashMLASchedMeta.Config") -> None:
    diffs = [f"{name}: first call {getattr(recorded, name)!r}, this call {getattr(now, name)!r}"
             for name in _CONFIG_FIELDS if getattr(recorded, name) != getattr(now, name)]
    if diffs:
        raise FlashMLASchedMetaMismatchError(
            "flash_mla_with_kvcache: this FlashMLASchedMeta was initialized by a call with a different "
            "configuration (" + "; ".join(diffs) + "). Use one FlashMLASchedMeta per configuration: get a "
            "new one from get_mla_metadata() for these arguments.")


def _lazy_metadata(q, cache_seqlens, config, topk_length):
    """The scheduler tensors for the first call of a lazy FlashMLASchedMeta."""
    lengths = cache_seqlens
    if config.topk is not None:  # sparse: each query attends to at most topk (+ extra_topk) keys
        if topk_length is not None:
            lengths = topk_length
        else:
            lengths = torch.full((config.b,), config.topk, dtype=torch.int32, device=q.device)
    if lengths is None:
        return None, None  # dense call without cache_seqlens: the op reports it
    n_tokens = max(1, config.s_q * config.h_q // max(1, config.h_k))
    return torch.ops.mate.get_mla_metadata(lengths, n_tokens, max(1, config.h_k), config.h_q,
                                           config.is_fp8_kvcache, config.topk, config.extra_topk)


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: Optional[torch.Tensor],
    cache_seqlens: Optional[torch.Tensor],
    head_dim_v: int,
    tile_scheduler_metadata: Union[FlashMLASchedMeta, torch.Tensor, None],
    num_splits: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: Optional[torch.Tensor] = None,
    attn_sink: Optional[torch.Tensor] = None,
    extra_k_cache: Optional[torch.Tensor] = None,
    extra_indices_in_kvcache: Optional[torch.Tensor] = None,
    topk_length: Optional[torch.Tensor] = None,
    extra_topk_length: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """MLA decode against a paged latent cache (FlashMLA signature; SEMANTICS §3).

    Args:
        q: ``(batch_size, seq_len_q, num_heads_q, head_dim)``, head_dim 576 or 512.
        k_cache: ``(num_blocks, page_block_size, num_heads_k, head_dim)`` (a 3-D cache without
            the ``num_heads_k`` dim is read as ``num_heads_k = 1``); with
            ``is_fp8_kvcache`` a byte cache in the V3.2 (656 B/token) or MODEL1 (584 B/token)
            layout. V is the first ``head_dim_v`` channels of K.
        block_table, cache_seqlens: dense attention (int32 ``(B, max_blocks)`` / ``(B,)``);
            unused (may be None) with ``indices``.
        head_dim_v: 512 for DeepSeek's models.
        tile_scheduler_metadata: a :class:`FlashMLASchedMeta` from ``get_mla_metadata()``
            (filled by the first call, checked by later ones; ``num_splits`` must be None), or
            the tensor from ``get_mla_metadata(cache_seqlens, ...)`` (or None).
        num_splits: None with a :class:`FlashMLASchedMeta`; otherwise the second tensor of
            ``get_mla_metadata(cache_seqlens, ...)`` (or None).
        softmax_scale: default ``1/sqrt(head_dim)``.
        causal: bottom-right aligned; dense attention only.
        indices: int32 ``(B, seq_len_q, topk)`` (or ``(B, seq_len_q, 1, topk)``) slots
            ``block * page_block_size + offset`` (sparse attention); -1 / out-of-range slots are ignored.
        attn_sink: fp32 ``(num_heads_q,)``: output scaled by ``exp(lse) / (exp(lse) + exp(sink))``;
            the returned lse excludes it.
        extra_k_cache, extra_indices_in_kvcache: keys of a second cache joining the softmax.
        topk_length, extra_topk_length: int32 ``(B,)``: only the first entries of each index row.

    Returns:
        ``(out (B, seq_len_q, num_heads_q, head_dim_v), softmax_lse fp32 (B, num_heads_q,
        seq_len_q))``, natural-log lse; a query with no key gives out 0 and lse +inf.

    Raises:
        FlashMLASchedMetaMismatchError: a :class:`FlashMLASchedMeta` reused with another
            configuration.
    """
    # 3-D caches and (B, s_q, 1, topk) indices, as mate_ops.flashmla accepts them
    k_cache, extra_k_cache, indices, extra_indices_in_kvcache = _fm.normalize_mla_forms(
        k_cache, extra_k_cache, indices, extra_indices_in_kvcache)
    lazy = isinstance(tile_scheduler_metadata, FlashMLASchedMeta)
    if lazy:
        sched_meta = tile_scheduler_metadata
        if num_splits is not None:
            raise ValueError("num_splits must be None when tile_scheduler_metadata is a FlashMLASchedMeta "
                             "(from get_mla_metadata()); pass the tensor pair of get_mla_metadata(cache_seqlens, "
                             "...) to use num_splits")
        config = _call_config(q, k_cache, causal, is_fp8_kvcache, indices, extra_k_cache, extra_indices_in_kvcache)
        if sched_meta.have_initialized:
            if sched_meta.config is None:
                raise ValueError("tile_scheduler_metadata: FlashMLASchedMeta has have_initialized=True but no config")
            _check_config(sched_meta.config, config)
            meta, splits = sched_meta.tile_scheduler_metadata, sched_meta.num_splits
        else:
            meta, splits = _lazy_metadata(q, cache_seqlens, config, topk_length)
    else:
        if tile_scheduler_metadata is not None and not isinstance(tile_scheduler_metadata, torch.Tensor):
            raise TypeError("tile_scheduler_metadata must be a FlashMLASchedMeta (from get_mla_metadata()), a "
                            "tensor (from get_mla_metadata(cache_seqlens, ...)) or None, got "
                            f"{type(tile_scheduler_metadata).__name__}")
        if num_splits is not None and not isinstance(num_splits, torch.Tensor):
            raise TypeError(f"num_splits must be a tensor or None, got {type(num_splits).__name__}")
        meta, splits = tile_scheduler_metadata, num_splits

    out, lse = _fm.flash_mla_with_kvcache(
        q, k_cache, block_table, cache_seqlens, head_dim_v, meta, splits,
        softmax_scale=softmax_scale, causal=causal, is_fp8_kvcache=is_fp8_kvcache, indices=indices,
        attn_sink=attn_sink, extra_k_cache=extra_k_cache, extra_indices_in_kvcache=extra_indices_in_kvcache,
        topk_length=topk_length, extra_topk_length=extra_topk_length)

    if lazy and not sched_meta.have_initialized:
        # Committed only after a successful call, so a rejected first call leaves the object unused.
        sched_meta.config = config
        sched_meta.tile_scheduler_metadata = meta
        sched_meta.num_splits = splits
        sched_meta.have_initialized = True
    return out, lse


def flash_mla_sparse_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
    attn_sink: Optional[torch.Tensor] = None,
    topk_length: Optional[torch.Tensor] = None,
    indexer_topk: int = 0,
) -> Union[Tuple[torch.Tensor, torch.Tensor, torch.Tensor],
           Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Sparse MLA prefill (FlashMLA signature; SEMANTICS §3, "Sparse prefill").

    Args:
        q: ``(s_q, h_q, d_qk)``; kv: ``(s_kv, 1, d_qk)``.
        indices: int32 ``(s_q, 1, topk)`` rows of kv; -1 or values ``>= s_kv`` are ignored.
        sm_scale: score scale; d_v: value width (the first ``d_v`` channels of kv).
        attn_sink: fp32 ``(h_q,)``: output scaled by ``exp(lse) / (exp(lse) + exp(sink))``;
            no effect on lse / max_logits.
        topk_length: int32 ``(s_q,)``: row i uses ``indices[i, :, :topk_length[i]]``.
        indexer_topk: if > 0, also return ``lse_indexer``, the lse over the first
            ``indexer_topk`` entries of each index row (see the module docstring).

    Returns:
        ``(out (s_q, h_q, d_v), max_logits fp32 (s_q, h_q), lse fp32 (s_q, h_q))``, plus
        ``lse_indexer fp32 (s_q, h_q)`` when ``indexer_topk > 0``. lse is a **natural** log
        (current FlashMLA; older FlashMLA documented base 2) and ``max_logits`` the largest
        scaled score; a row with no valid index gives out 0, lse +inf, max_logits -inf.
    """
    out, max_logits, lse = _fm.flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)
    if indexer_topk == 0:
        return out, max_logits, lse
    topk = indices.shape[-1]
    if not 0 < indexer_topk <= topk:
        raise ValueError(f"indexer_topk must be in [0, topk={topk}], got {indexer_topk}")
    first = indices[..., :indexer_topk].contiguous()
    first_len = None if topk_length is None else torch.clamp(topk_length, max=indexer_topk)
    _, _, lse_indexer = _fm.flash_mla_sparse_fwd(q, kv, first, sm_scale, d_v, None, first_len)
    return out, max_logits, lse, lse_indexer
