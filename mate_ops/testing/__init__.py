"""``mate_ops.testing``: the pure-PyTorch oracle of docs/semantics.md and the helpers tests use.

Not imported by ``import mate_ops``; import it explicitly (``from mate_ops.testing import
fmha_ref``). Every name below is also reachable as ``mate_ops.testing.<name>``.

- :mod:`.oracle` -- the reference implementations, independent of the compiled extension:
  :func:`fmha_ref`, :func:`rotary_ref`, :func:`kvcache_append_ref`, :func:`combine_ref`,
  :func:`mla_decode_ref`, :func:`mla_sparse_prefill_ref`, :func:`mla_paged_ref`.
- :mod:`.tolerance` -- :func:`assert_close_fa3` (FlashAttention-3's "2x the low-precision
  reference error" rule) and its :data:`DEFAULT_ATOL`.
- :mod:`.data` -- :func:`poison_`, :func:`random_seqlens`, :func:`random_cu_seqlens`,
  :func:`make_paged_kv`, :func:`to_device_keeping_layout`.
- The FP8 MLA cache format (:func:`quantize_mla_v32`, :func:`dequantize_mla_v32`,
  :func:`quantize_mla_model1`, :func:`dequantize_mla_model1`, :func:`mla_model1_block_stride`)
  is production code in :mod:`mate_ops.mla_fp8`; it is re-exported here because tests build
  caches with it and the oracle reads them with it.

Typical use::

    out_ref, lse_ref = fmha_ref(q, k, v, causal=True)                       # fp64
    out_low, _ = fmha_ref(q, k, v, causal=True, compute_dtype=q.dtype)      # input precision
    assert_close_fa3(out, out_ref, out_low)
"""
from ..mla_fp8 import (
    dequantize_mla_model1,
    dequantize_mla_v32,
    mla_model1_block_stride,
    quantize_mla_model1,
    quantize_mla_v32,
)
from .data import make_paged_kv, poison_, random_cu_seqlens, random_seqlens, to_device_keeping_layout
from .oracle import (
    combine_ref,
    fmha_ref,
    kvcache_append_ref,
    mla_decode_ref,
    mla_paged_ref,
    mla_sparse_prefill_ref,
    rotary_ref,
)
from .tolerance import DEFAULT_ATOL, assert_close_fa3, assert_lse_close

__all__ = [
    "fmha_ref",
    "combine_ref",
    "rotary_ref",
    "kvcache_append_ref",
    "assert_close_fa3",
    "assert_lse_close",
    "DEFAULT_ATOL",
    "poison_",
    "random_seqlens",
    "random_cu_seqlens",
    "make_paged_kv",
    "to_device_keeping_layout",
    "quantize_mla_v32",
    "dequantize_mla_v32",
    "quantize_mla_model1",
    "dequantize_mla_model1",
    "mla_model1_block_stride",
    "mla_decode_ref",
    "mla_sparse_prefill_ref",
    "mla_paged_ref",
]
