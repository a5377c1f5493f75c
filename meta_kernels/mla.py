"""Fake kernels of the MLA family: get_mla_metadata, mla_decode, mla_sparse_prefill."""
import torch

from ._devices import same_device


def _num_workers(device: torch.device) -> int:
    """Workers get_mla_metadata schedules over, as the kernels define them: the CPU kernel's
    thread count, a GPU's multiprocessor count (csrc/musa/launch.cpp: mla_device_workers).
    Meta tensors follow the CPU rule (the meta kernel is the CPU body's shape logic)."""
    if device.type in ("cpu", "meta"):
        return torch.get_num_threads()
    backend = getattr(torch, device.type)  # torch.cuda, or torch.musa with torch_musa
    index = device.index if device.index is not None else backend.current_device()
    return backend.get_device_properties(index).multi_processor_count


@torch.library.register_fake("mate::get_mla_metadata")
@same_device
def get_mla_metadata_fake(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q=None,
                          is_fp8_kvcache=False, topk=None, extra_topk=None):
    # mla_num_parts of csrc/common/mla_params.h
    m_blocks = max(1, (num_q_tokens_per_head_k + 63) // 64)
    parts = max(1, _num_workers(cache_seqlens.device) // max(1, num_heads_k) // m_blocks)
    meta = cache_seqlens.new_empty((parts, 8), dtype=torch.int32)
    splits = cache_seqlens.new_empty((cache_seqlens.shape[0] + 1,), dtype=torch.int32)
    return meta, splits


@torch.library.register_fake("mate::mla_decode")
@same_device
def mla_decode_fake(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata=None,
                    num_splits=None, softmax_scale=None, causal=False, is_fp8_kvcache=False, indices=None,
                    attn_sink=None, extra_k_cache=None, extra_indices_in_kvcache=None, topk_length=None,
                    extra_topk_length=None):
    B, Sq, Hq, _ = q.shape
    out = q.new_empty((B, Sq, Hq, head_dim_v))
    lse = q.new_empty((B, Hq, Sq), dtype=torch.float32)
    return out, lse


@torch.library.register_fake("mate::mla_sparse_prefill")
@same_device
def mla_sparse_prefill_fake(q, kv, indices, sm_scale, d_v=512, attn_sink=None, topk_length=None):
    Sq, Hq, _ = q.shape
    out = q.new_empty((Sq, Hq, d_v))
    return out, q.new_empty((Sq, Hq), dtype=torch.float32), q.new_empty((Sq, Hq), dtype=torch.float32)
