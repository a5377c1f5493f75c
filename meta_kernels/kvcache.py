"""Fake kernels of the kv-cache family: kvcache_append (mutates the caches, returns
nothing) and rotary_embedding (a new tensor shaped like its input)."""
import torch

from ._devices import same_device


@torch.library.register_fake("mate::kvcache_append")
@same_device
def kvcache_append_fake(k_cache, v_cache, k, v, cache_seqlens, cu_seqlens_k_new=None, page_table=None,
                        cache_batch_idx=None, rotary_cos=None, rotary_sin=None, rotary_seqlens=None,
                        rotary_interleaved=True, cache_leftpad=None):
    return None


@torch.library.register_fake("mate::rotary_embedding")
@same_device
def rotary_embedding_fake(x, cos, sin, seqlen_offsets, cu_seqlens=None, max_seqlen=None, interleaved=True,
                          positions_per_row=True):
    return torch.empty_like(x, memory_format=torch.contiguous_format)
