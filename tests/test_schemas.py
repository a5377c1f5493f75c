"""Pins the schema string of every op in the ``mate`` namespace (csrc/registration.cpp).

Schemas are public API: never remove or reorder arguments. Append new ones at the
end with defaults, then re-accept the pinned text with
``EXPECTTEST_ACCEPT=1 python3 -m pytest tests/test_schemas.py`` and review the diff.
"""
import expecttest
import torch

import mate_ops  # noqa: F401  (registers torch.ops.mate.*)


def mate_schemas() -> str:
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("mate::"))
    lines = []
    for qualname in names:
        name = qualname[len("mate::"):]
        lines.append(str(getattr(torch.ops.mate, name).default._schema))
    return "\n".join(lines)


class TestSchemas(expecttest.TestCase):
    def test_mate_schemas(self):
        # Schemas are public API: never remove or reorder arguments; append new ones
        # (with defaults) at the end, then re-accept with EXPECTTEST_ACCEPT=1.
        self.assertExpectedInline(mate_schemas(), """\
mate::fmha_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse=None, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, SymInt? max_seqlen_q=None, SymInt? max_seqlen_k=None, Tensor? seqused_q=None, Tensor? seqused_k=None, Tensor? page_table=None, Tensor? cache_batch_idx=None, Tensor? cache_leftpad=None, Tensor? qv=None, Tensor? q_descale=None, Tensor? k_descale=None, Tensor? v_descale=None, float? softmax_scale=None, bool causal=False, int window_size_left=-1, int window_size_right=-1, Tensor? learnable_sink=None, int attention_chunk=0, float softcap=0., Tensor? scheduler_metadata=None, int num_splits=1, bool? pack_gqa=None, int cp_world_size=1, int cp_rank=0, Tensor? cp_tot_seqused_k=None, Tensor? alibi_slopes=None, bool deterministic=False) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dsink)
mate::fmha_combine(Tensor out_partial, Tensor lse_partial, ScalarType? out_dtype=None) -> (Tensor out, Tensor lse)
mate::fmha_combine_out(Tensor out_partial, Tensor lse_partial, Tensor(a!) out, Tensor(b!) lse) -> ()
mate::fmha_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, SymInt? max_seqlen_q=None, SymInt? max_seqlen_k=None, Tensor? seqused_q=None, Tensor? seqused_k=None, Tensor? page_table=None, Tensor? cache_batch_idx=None, Tensor? cache_leftpad=None, Tensor? qv=None, Tensor? q_descale=None, Tensor? k_descale=None, Tensor? v_descale=None, float? softmax_scale=None, bool causal=False, int window_size_left=-1, int window_size_right=-1, Tensor? learnable_sink=None, int attention_chunk=0, float softcap=0., Tensor? scheduler_metadata=None, int num_splits=1, bool? pack_gqa=None, int cp_world_size=1, int cp_rank=0, Tensor? cp_tot_seqused_k=None, ScalarType? out_dtype=None, Tensor? alibi_slopes=None) -> (Tensor out, Tensor lse)
mate::fmha_fwd_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k=None, Tensor? v=None, Tensor? qv=None, Tensor? rotary_cos=None, Tensor? rotary_sin=None, Tensor? cache_seqlens=None, Tensor? cache_batch_idx=None, Tensor? cache_leftpad=None, Tensor? page_table=None, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k_new=None, SymInt? max_seqlen_q=None, Tensor? rotary_seqlens=None, Tensor? q_descale=None, Tensor? k_descale=None, Tensor? v_descale=None, float? softmax_scale=None, bool causal=False, int window_size_left=-1, int window_size_right=-1, Tensor? learnable_sink=None, int attention_chunk=0, float softcap=0., bool rotary_interleaved=True, Tensor? scheduler_metadata=None, int num_splits=0, bool? pack_gqa=None, int cp_world_size=1, int cp_rank=0, Tensor? cp_tot_seqused_k=None, ScalarType? out_dtype=None) -> (Tensor out, Tensor lse)
mate::fmha_fwd_out(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor(b!) lse, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, SymInt? max_seqlen_q=None, SymInt? max_seqlen_k=None, Tensor? seqused_q=None, Tensor? seqused_k=None, Tensor? page_table=None, Tensor? cache_batch_idx=None, Tensor? cache_leftpad=None, Tensor? qv=None, Tensor? q_descale=None, Tensor? k_descale=None, Tensor? v_descale=None, float? softmax_scale=None, bool causal=False, int window_size_left=-1, int window_size_right=-1, Tensor? learnable_sink=None, int attention_chunk=0, float softcap=0., Tensor? scheduler_metadata=None, int num_splits=1, bool? pack_gqa=None, int cp_world_size=1, int cp_rank=0, Tensor? cp_tot_seqused_k=None, Tensor? alibi_slopes=None) -> ()
mate::get_mla_metadata(Tensor cache_seqlens, SymInt num_q_tokens_per_head_k, SymInt num_heads_k, SymInt? num_heads_q=None, bool is_fp8_kvcache=False, SymInt? topk=None, SymInt? extra_topk=None) -> (Tensor tile_scheduler_metadata, Tensor num_splits)
mate::get_scheduler_metadata(SymInt batch_size, SymInt max_seqlen_q, SymInt max_seqlen_k, SymInt num_heads_q, SymInt num_heads_kv, SymInt headdim, SymInt headdim_v, ScalarType qkv_dtype, Tensor seqused_k, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, Tensor? cu_seqlens_k_new=None, Tensor? seqused_q=None, Tensor? cache_leftpad=None, SymInt? page_size=None, SymInt max_seqlen_k_new=0, bool causal=False, int window_size_left=-1, int window_size_right=-1, int attention_chunk=0, bool has_softcap=False, int num_splits=0, bool? pack_gqa=None, int sm_margin=0) -> Tensor
mate::kvcache_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor cache_seqlens, Tensor? cu_seqlens_k_new=None, Tensor? page_table=None, Tensor? cache_batch_idx=None, Tensor? rotary_cos=None, Tensor? rotary_sin=None, Tensor? rotary_seqlens=None, bool rotary_interleaved=True, Tensor? cache_leftpad=None) -> ()
mate::mla_decode(Tensor q, Tensor k_cache, Tensor? block_table, Tensor? cache_seqlens, SymInt head_dim_v, Tensor? tile_scheduler_metadata=None, Tensor? num_splits=None, float? softmax_scale=None, bool causal=False, bool is_fp8_kvcache=False, Tensor? indices=None, Tensor? attn_sink=None, Tensor? extra_k_cache=None, Tensor? extra_indices_in_kvcache=None, Tensor? topk_length=None, Tensor? extra_topk_length=None) -> (Tensor out, Tensor lse)
mate::mla_sparse_prefill(Tensor q, Tensor kv, Tensor indices, float sm_scale, SymInt d_v=512, Tensor? attn_sink=None, Tensor? topk_length=None) -> (Tensor out, Tensor max_logits, Tensor lse)
mate::rotary_embedding(Tensor x, Tensor cos, Tensor sin, Tensor seqlen_offsets, Tensor? cu_seqlens=None, SymInt? max_seqlen=None, bool interleaved=True, bool positions_per_row=True) -> Tensor""")
