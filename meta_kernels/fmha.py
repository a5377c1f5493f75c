"""Fake kernels of the FMHA family: fmha_fwd(_out), fmha_fwd_kvcache, fmha_combine(_out),
get_scheduler_metadata.

Every defaulted schema argument has its default here too: the dispatcher strips
trailing defaults before calling a fake kernel.
"""
import torch

from ._devices import same_device

from mate_ops._common import fp8_out_dtype


def _out_dtype(q, out_dtype):
    return out_dtype if out_dtype is not None else fp8_out_dtype(q)


@torch.library.register_fake("mate::fmha_fwd")
@same_device
def fmha_fwd_fake(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                  max_seqlen_k=None, seqused_q=None, seqused_k=None, page_table=None,
                  cache_batch_idx=None, cache_leftpad=None, qv=None, q_descale=None,
                  k_descale=None, v_descale=None, softmax_scale=None, causal=False,
                  window_size_left=-1, window_size_right=-1, learnable_sink=None,
                  attention_chunk=0, softcap=0.0, scheduler_metadata=None, num_splits=1,
                  pack_gqa=None, cp_world_size=1, cp_rank=0, cp_tot_seqused_k=None,
                  out_dtype=None, alibi_slopes=None):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=_out_dtype(q, out_dtype))
    if cu_seqlens_q is not None:  # ragged: lse (H, Tq)
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    else:  # dense: lse (B, H, Sq)
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return out, lse


@torch.library.register_fake("mate::fmha_fwd_out")
@same_device
def fmha_fwd_out_fake(q, k, v, out, lse, cu_seqlens_q=None, cu_seqlens_k=None,
                      max_seqlen_q=None, max_seqlen_k=None, seqused_q=None, seqused_k=None,
                      page_table=None, cache_batch_idx=None, cache_leftpad=None, qv=None,
                      q_descale=None, k_descale=None, v_descale=None, softmax_scale=None,
                      causal=False, window_size_left=-1, window_size_right=-1,
                      learnable_sink=None, attention_chunk=0, softcap=0.0,
                      scheduler_metadata=None, num_splits=1, pack_gqa=None, cp_world_size=1,
                      cp_rank=0, cp_tot_seqused_k=None, alibi_slopes=None):
    return None


@torch.library.register_fake("mate::fmha_fwd_kvcache")
@same_device
def fmha_fwd_kvcache_fake(q, k_cache, v_cache, k=None, v=None, qv=None, rotary_cos=None, rotary_sin=None,
                          cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, page_table=None,
                          cu_seqlens_q=None, cu_seqlens_k_new=None, max_seqlen_q=None, rotary_seqlens=None,
                          q_descale=None, k_descale=None, v_descale=None, softmax_scale=None, causal=False,
                          window_size_left=-1, window_size_right=-1, learnable_sink=None, attention_chunk=0,
                          softcap=0.0, rotary_interleaved=True, scheduler_metadata=None, num_splits=0,
                          pack_gqa=None, cp_world_size=1, cp_rank=0, cp_tot_seqused_k=None, out_dtype=None):
    # the caches are mutated in place (schema (a!)); the outputs are those of fmha_fwd
    return fmha_fwd_fake(q, k_cache, v_cache, cu_seqlens_q=cu_seqlens_q, out_dtype=out_dtype)


@torch.library.register_fake("mate::fmha_combine")
@same_device
def fmha_combine_fake(out_partial, lse_partial, out_dtype=None):
    out = out_partial.new_empty(out_partial.shape[1:],
                                dtype=out_dtype if out_dtype is not None else torch.float32)
    lse = lse_partial.new_empty(lse_partial.shape[1:], dtype=torch.float32)
    return out, lse


@torch.library.register_fake("mate::fmha_combine_out")
@same_device
def fmha_combine_out_fake(out_partial, lse_partial, out, lse):
    return None


@torch.library.register_fake("mate::get_scheduler_metadata")
@same_device
def get_scheduler_metadata_fake(batch_size, max_seqlen_q, max_seqlen_k, num_heads_q, num_heads_kv,
                                headdim, headdim_v, qkv_dtype, seqused_k, cu_seqlens_q=None,
                                cu_seqlens_k=None, cu_seqlens_k_new=None, seqused_q=None,
                                cache_leftpad=None, page_size=None, max_seqlen_k_new=0,
                                causal=False, window_size_left=-1, window_size_right=-1,
                                attention_chunk=0, has_softcap=False, num_splits=0, pack_gqa=None,
                                sm_margin=0):
    # Layout of csrc/common/scheduler.h: (batch_size + 1,) int32.
    return seqused_k.new_empty((batch_size + 1,), dtype=torch.int32)


@torch.library.register_fake("mate::fmha_bwd")
@same_device
def fmha_bwd_fake(dout, q, k, v, out, lse, dlse=None, cu_seqlens_q=None, cu_seqlens_k=None,
                  max_seqlen_q=None, max_seqlen_k=None, seqused_q=None, seqused_k=None,
                  page_table=None, cache_batch_idx=None, cache_leftpad=None, qv=None,
                  q_descale=None, k_descale=None, v_descale=None, softmax_scale=None,
                  causal=False, window_size_left=-1, window_size_right=-1,
                  learnable_sink=None, attention_chunk=0, softcap=0.0,
                  scheduler_metadata=None, num_splits=1, pack_gqa=None, cp_world_size=1,
                  cp_rank=0, cp_tot_seqused_k=None, alibi_slopes=None, deterministic=False):
    # dq / dk / dv: the shapes and dtypes of q / k / v; dsink (H,) fp32 with a sink, else (0,)
    dsink = q.new_empty((q.shape[-2] if learnable_sink is not None else 0,), dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsink
