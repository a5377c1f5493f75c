"""MATE's ``mate.flashmla`` surface (FlashMLA-style MLA) on ``torch.ops.mate``: same names,
argument orders, defaults and return values.

MLA conventions (SEMANTICS §3) differ from FMHA's: lse is ``(B, Hq, Sq)`` and is ``+inf``
for a query with no key; ``attn_sink`` scales the output and is excluded from lse.
Forward only.
"""
from typing import Optional, Tuple

import torch

from . import mla_fp8
from ._common import default_device

__all__ = ["get_mla_metadata", "flash_mla_with_kvcache", "flash_mla_sparse_fwd",
           "quantize_k_cache", "dequantize_k_cache"]


def get_mla_metadata(
    cache_seqlens: Optional[torch.Tensor],
    num_q_tokens_per_head_k: int,
    num_heads_k: int,
    num_heads_q: Optional[int] = None,
    is_fp8_kvcache: bool = False,
    topk: Optional[int] = None,
    extra_topk: Optional[int] = None,
    q: Optional[torch.Tensor] = None,
    bs: Optional[int] = None,
    topk_length: Optional[torch.Tensor] = None,
    extra_topk_length: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Tile-scheduler metadata for :func:`flash_mla_with_kvcache` (MATE/FlashMLA signature).

    Args:
        cache_seqlens: int32 ``(B,)`` key lengths, or None (MATE's sparse decode, which is
            scheduled by ``topk``). With None the batch size is ``bs``, else ``q.shape[0]``;
            when neither is given the returned ``num_splits`` is a batch-less placeholder of
            shape ``(1,)`` on ``q``'s / ``topk_length``'s device (else the default device), which
            :func:`flash_mla_with_kvcache` accepts for any batch of a sparse (``indices``) call
            (scheduler metadata never changes the result).
        num_q_tokens_per_head_k: ``seqlen_q * num_heads_q // num_heads_k``.
        num_heads_k: kv heads (1 for MLA). The other arguments are accepted for compatibility
            (``topk``/``extra_topk`` size the work of sparse attention).

    Returns:
        ``(tile_scheduler_metadata int32 (num_parts, 8), num_splits int32 (B + 1,))``; the number
        of parts depends only on the arguments and the device's multiprocessor (CPU: thread)
        count. Passing them never changes the attention result.
    """
    if cache_seqlens is None:
        batch = bs if bs is not None else (q.shape[0] if q is not None else 0)
        device = default_device(q, topk_length, extra_topk_length)
        cache_seqlens = torch.zeros((batch,), dtype=torch.int32, device=device)
    return torch.ops.mate.get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q,
                                           is_fp8_kvcache, topk, extra_topk)


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: Optional[torch.Tensor],
    cache_seqlens: Optional[torch.Tensor],
    head_dim_v: int,
    tile_scheduler_metadata: Optional[torch.Tensor],
    num_splits: Optional[torch.Tensor],
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
    """MLA decode against a paged latent cache (MATE/FlashMLA signature).

    Args:
        q: ``(B, Sq, Hq, Dqk)``, Dqk 576 (512 latent + 64 rope) or 512.
        k_cache: ``(num_blocks, page_block_size, Hkv, Dqk)`` in q's dtype (a 3-D
            ``(num_blocks, page_block_size, Dqk)`` cache is read as ``Hkv = 1``; same for
            ``extra_k_cache``), or with
            ``is_fp8_kvcache`` a byte tensor in the V3.2 (656 B/token) or MODEL1 (584 B/token)
            layout (see :func:`quantize_k_cache`). V is the first ``head_dim_v`` channels of K.
        block_table, cache_seqlens: dense attention: token t of sequence b is at
            ``k_cache[block_table[b, t // P], t % P]``; ``causal`` is bottom-right aligned.
        indices: sparse attention, int32 ``(B, Sq, topk)`` (or ``(B, Sq, 1, topk)``, the form
            FlashMLA's and MATE's tests build; likewise ``extra_indices_in_kvcache``) global slots ``block * P + offset``;
            -1 or out-of-range slots are ignored; ``topk_length (B,)`` keeps the first entries.
            ``extra_k_cache`` + ``extra_indices_in_kvcache`` (+ ``extra_topk_length``) add keys
            from a second cache to the same softmax. Needs ``Hkv == 1``.
        attn_sink: fp32 ``(Hq,)``: output scaled by ``exp(lse) / (exp(lse) + exp(sink))``.
        softmax_scale: default ``1/sqrt(Dqk)``.

    Returns:
        ``(out (B, Sq, Hq, head_dim_v), lse fp32 (B, Hq, Sq))``; a query with no key gives
        out 0 and lse +inf.
    """
    k_cache, extra_k_cache, indices, extra_indices_in_kvcache = normalize_mla_forms(
        k_cache, extra_k_cache, indices, extra_indices_in_kvcache)
    if (indices is not None and isinstance(num_splits, torch.Tensor) and num_splits.dim() == 1
            and num_splits.shape[0] == 1 and q.dim() == 4 and q.shape[0] != 0):
        # the batch-less placeholder of get_mla_metadata(cache_seqlens=None): a hint only
        tile_scheduler_metadata, num_splits = None, None
    return torch.ops.mate.mla_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                                     num_splits, softmax_scale, causal, is_fp8_kvcache, indices, attn_sink,
                                     extra_k_cache, extra_indices_in_kvcache, topk_length, extra_topk_length)


def normalize_mla_forms(k_cache, extra_k_cache, indices, extra_indices_in_kvcache):
    """MATE/FlashMLA call forms of the decode tensors -> the op's forms.

    * A 3-D paged cache ``(num_blocks, page_block_size, head_dim)`` (num_heads_k dropped, as
      FlashInfer-style callers pass it) becomes ``(num_blocks, page_block_size, 1, head_dim)``.
    * Sparse indices ``(B, Sq, 1, topk)`` (num_heads_k = 1 kept, FlashMLA's and MATE's sparse
      tests) become ``(B, Sq, topk)``; a 4-D form whose dim 2 is not 1 raises ``ValueError``.
    """
    def cache(t):
        return t.unsqueeze(2) if isinstance(t, torch.Tensor) and t.dim() == 3 else t

    def idx(t, name):
        if isinstance(t, torch.Tensor) and t.dim() == 4:
            if t.shape[2] != 1:
                raise ValueError(f"{name} must be (batch, seqlen_q, topk) or (batch, seqlen_q, 1, topk) "
                                 f"(num_heads_k = 1), got shape {tuple(t.shape)}")
            return t.squeeze(2)
        return t
    return cache(k_cache), cache(extra_k_cache), idx(indices, "indices"), \
        idx(extra_indices_in_kvcache, "extra_indices_in_kvcache")


def flash_mla_sparse_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
    attn_sink: Optional[torch.Tensor] = None,
    topk_length: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse MLA prefill (MATE/FlashMLA signature).

    q ``(Sq, Hq, Dqk)``, kv ``(Skv, 1, Dqk)``, indices int32 ``(Sq, 1, topk)`` into kv rows
    (-1 / out of range ignored), ``topk_length (Sq,)``. Returns ``(out (Sq, Hq, d_v),
    max_logits fp32 (Sq, Hq), lse fp32 (Sq, Hq))`` with natural-log lse (+inf and max_logits
    -inf for a row with no valid index).
    """
    return torch.ops.mate.mla_sparse_prefill(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)


def quantize_k_cache(kv: torch.Tensor, layout: str = "v32") -> torch.Tensor:
    """Quantize a bf16 latent cache to an FP8 MLA layout.

    ``layout="v32"``: ``(num_blocks, P, 1, 576)`` -> uint8 ``(num_blocks, P, 1, 656)``
    (512 e4m3 values, 4 fp32 scales, 64 bf16 rope values per token).
    ``layout="model1"``: ``(num_blocks, P, 1, 512)`` -> a uint8 ``(num_blocks, P, 1, 584)`` block
    view (per block: P x [448 e4m3 + 64 bf16], then P x 8 scale bytes; block stride rounded up
    to a multiple of 576). Scales are powers of two rounded up from ``amax / 448``.
    The layouts are documented in :mod:`mate_ops.mla_fp8`.
    """
    if layout == "v32":
        return mla_fp8.quantize_mla_v32(kv)
    if layout == "model1":
        return mla_fp8.quantize_mla_model1(kv)
    raise ValueError(f"layout must be 'v32' or 'model1', got {layout!r}")


def dequantize_k_cache(cache: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_k_cache` (layout from the bytes per token: 656 or 584); fp32."""
    return mla_fp8.dequantize_mla(cache)
