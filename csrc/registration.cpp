// The one TORCH_LIBRARY(mate, m): every schema of torch.ops.mate.*, in one place.
// The op bodies (csrc/common/*_ops.cpp) are registered below for every dispatch key this
// build has kernels for; the kernels themselves fill the kernel table (csrc/common/
// kernel_table.h) from csrc/cpu_ref and csrc/musa. Fake kernels live in meta_kernels/.
//
// Rules (docs/design.md): lengths and sizes are SymInt; mutated arguments are annotated
// (a!); mutating ops return (); no returned tensor aliases an input. Never remove
// or reorder an argument once released: append new ones at the end with defaults.
// tests/test_schemas.py pins every string below.
#include <Python.h>
#include <torch/library.h>

#include "common/op_bodies.h"

// Importing mate_ops._C (a normal Python extension module) runs the registrations below.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

// Arguments shared by fmha_fwd, fmha_fwd_out and fmha_bwd after (q, k, v[, out, lse]).
#define MATE_FMHA_SCHEMA_ARGS                                                              \
  "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, "                                \
  "SymInt? max_seqlen_q=None, SymInt? max_seqlen_k=None, "                                \
  "Tensor? seqused_q=None, Tensor? seqused_k=None, Tensor? page_table=None, "            \
  "Tensor? cache_batch_idx=None, Tensor? cache_leftpad=None, Tensor? qv=None, "          \
  "Tensor? q_descale=None, Tensor? k_descale=None, Tensor? v_descale=None, "             \
  "float? softmax_scale=None, bool causal=False, int window_size_left=-1, "              \
  "int window_size_right=-1, Tensor? learnable_sink=None, int attention_chunk=0, "       \
  "float softcap=0.0, Tensor? scheduler_metadata=None, int num_splits=1, "               \
  "bool? pack_gqa=None, int cp_world_size=1, int cp_rank=0, Tensor? cp_tot_seqused_k=None"

TORCH_LIBRARY(mate, m) {
  // FMHA forward (SEMANTICS §1): dense / ragged / padded / paged, GQA, qv, fp8,
  // masks, softcap, sink, splits, context parallel, ALiBi (FA2: -slope * |i + Sk - Sq - j|
  // added to the scaled, soft-capped score). Returns (out, lse).
  m.def("fmha_fwd(Tensor q, Tensor k, Tensor v, " MATE_FMHA_SCHEMA_ARGS
        ", ScalarType? out_dtype=None, Tensor? alibi_slopes=None) -> (Tensor out, Tensor lse)");
  // The same, writing into the caller's out and lse.
  m.def("fmha_fwd_out(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor(b!) lse, "
        MATE_FMHA_SCHEMA_ARGS ", Tensor? alibi_slopes=None) -> ()");
  // FMHA backward (docs/semantics.md, "Backward"): the gradients of fmha_fwd's (out, lse)
  // w.r.t. q, k, v and learnable_sink, from the saved out and lse; the forward's options follow
  // in fmha_fwd's order. dlse: the gradient flowing into lse (None = 0). dsink is (H,) fp32 when
  // learnable_sink is given, else empty. Paged K/V, cache_batch_idx, qv, fp8 and context
  // parallel are forward-only and raise.
  m.def("fmha_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse=None, "
        MATE_FMHA_SCHEMA_ARGS ", Tensor? alibi_slopes=None, bool deterministic=False) "
        "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dsink)");
  // Split-KV combine (SEMANTICS §2).
  m.def("fmha_combine(Tensor out_partial, Tensor lse_partial, ScalarType? out_dtype=None) "
        "-> (Tensor out, Tensor lse)");
  m.def("fmha_combine_out(Tensor out_partial, Tensor lse_partial, Tensor(a!) out, "
        "Tensor(b!) lse) -> ()");
  // KV cache (SEMANTICS §1 "Append and rotary"): writes new keys/values in place at
  // [cache_seqlens[b], cache_seqlens[b] + new_len[b]) of a dense or paged cache; keys are
  // rotated at rotary_seqlens (or cache_seqlens) + t when rotary tables are given.
  // cache_leftpad is only validated (0 <= leftpad <= cache_seqlens + new keys), so that the attention
  // that follows cannot reject it after the cache was written.
  m.def("kvcache_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, "
        "Tensor cache_seqlens, Tensor? cu_seqlens_k_new=None, Tensor? page_table=None, "
        "Tensor? cache_batch_idx=None, Tensor? rotary_cos=None, Tensor? rotary_sin=None, "
        "Tensor? rotary_seqlens=None, bool rotary_interleaved=True, Tensor? cache_leftpad=None) -> ()");
  // Rotary embedding of q: row t of sequence b at seqlen_offsets[b] + t (positions_per_row)
  // or every row at seqlen_offsets[b].
  m.def("rotary_embedding(Tensor x, Tensor cos, Tensor sin, Tensor seqlen_offsets, "
        "Tensor? cu_seqlens=None, SymInt? max_seqlen=None, bool interleaved=True, "
        "bool positions_per_row=True) -> Tensor");
  // MLA (SEMANTICS §3). Metadata: (num_parts, 8) int32 schedule + (batch_size + 1,) int32
  // cumulative splits; num_parts depends only on arguments and the device's worker count.
  m.def("get_mla_metadata(Tensor cache_seqlens, SymInt num_q_tokens_per_head_k, SymInt num_heads_k, "
        "SymInt? num_heads_q=None, bool is_fp8_kvcache=False, SymInt? topk=None, SymInt? extra_topk=None) "
        "-> (Tensor tile_scheduler_metadata, Tensor num_splits)");
  // MLA decode: dense (block_table + cache_seqlens, causal) or sparse (indices [+ extra cache]);
  // bf16/fp16 or FP8 (V3.2 656 B, MODEL1 584 B per token) caches; attn_sink. lse (B, Hq, Sq).
  m.def("mla_decode(Tensor q, Tensor k_cache, Tensor? block_table, Tensor? cache_seqlens, "
        "SymInt head_dim_v, Tensor? tile_scheduler_metadata=None, Tensor? num_splits=None, "
        "float? softmax_scale=None, bool causal=False, bool is_fp8_kvcache=False, Tensor? indices=None, "
        "Tensor? attn_sink=None, Tensor? extra_k_cache=None, Tensor? extra_indices_in_kvcache=None, "
        "Tensor? topk_length=None, Tensor? extra_topk_length=None) -> (Tensor out, Tensor lse)");
  // Sparse MLA prefill: q (Sq, Hq, Dqk), kv (Skv, 1, Dqk), indices (Sq, 1, topk).
  m.def("mla_sparse_prefill(Tensor q, Tensor kv, Tensor indices, float sm_scale, SymInt d_v=512, "
        "Tensor? attn_sink=None, Tensor? topk_length=None) -> (Tensor out, Tensor max_logits, Tensor lse)");
  // The decode step of flash_attn_with_kvcache in one op (SEMANTICS §1 "Append and rotary"):
  // with k/v, new keys (rotated when rotary tables are given) and values are written into the
  // caches at cache_seqlens; q is rotated (per row when causal / local / chunked); then attention
  // over keys [cache_leftpad, cache_seqlens + new keys). Everything is validated before the
  // first write. cache_seqlens None = the whole dense cache.
  m.def("fmha_fwd_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k=None, Tensor? v=None, "
        "Tensor? qv=None, Tensor? rotary_cos=None, Tensor? rotary_sin=None, Tensor? cache_seqlens=None, "
        "Tensor? cache_batch_idx=None, Tensor? cache_leftpad=None, Tensor? page_table=None, "
        "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k_new=None, SymInt? max_seqlen_q=None, "
        "Tensor? rotary_seqlens=None, Tensor? q_descale=None, Tensor? k_descale=None, Tensor? v_descale=None, "
        "float? softmax_scale=None, bool causal=False, int window_size_left=-1, int window_size_right=-1, "
        "Tensor? learnable_sink=None, int attention_chunk=0, float softcap=0.0, bool rotary_interleaved=True, "
        "Tensor? scheduler_metadata=None, int num_splits=0, bool? pack_gqa=None, int cp_world_size=1, "
        "int cp_rank=0, Tensor? cp_tot_seqused_k=None, ScalarType? out_dtype=None) -> (Tensor out, Tensor lse)");
  // Scheduler metadata: int32 (batch_size + 1,), reusable across calls with the same arguments.
  m.def("get_scheduler_metadata(SymInt batch_size, SymInt max_seqlen_q, SymInt max_seqlen_k, "
        "SymInt num_heads_q, SymInt num_heads_kv, SymInt headdim, SymInt headdim_v, "
        "ScalarType qkv_dtype, Tensor seqused_k, Tensor? cu_seqlens_q=None, "
        "Tensor? cu_seqlens_k=None, Tensor? cu_seqlens_k_new=None, Tensor? seqused_q=None, "
        "Tensor? cache_leftpad=None, SymInt? page_size=None, SymInt max_seqlen_k_new=0, "
        "bool causal=False, int window_size_left=-1, int window_size_right=-1, "
        "int attention_chunk=0, bool has_softcap=False, int num_splits=0, bool? pack_gqa=None, "
        "int sm_margin=0) -> Tensor");
}

// The op bodies, per dispatch key: one line per op family a backend has kernels for.
TORCH_LIBRARY_IMPL(mate, CPU, m) {
  mate::register_fmha_ops(m);
  mate::register_fmha_bwd_ops(m);
  mate::register_kvcache_ops(m);
  mate::register_mla_ops(m);
}

#if defined(MATE_WITH_CUDA) || defined(MATE_WITH_MUSA)
#if defined(MATE_WITH_MUSA)
TORCH_LIBRARY_IMPL(mate, PrivateUse1, m) {
#else
TORCH_LIBRARY_IMPL(mate, CUDA, m) {
#endif
  mate::register_fmha_ops(m);
  mate::register_fmha_bwd_ops(m);
  mate::register_kvcache_ops(m);
  mate::register_mla_ops(m);
}
#endif

TORCH_LIBRARY_IMPL(mate, Autograd, m) { mate::register_forward_only_autograd(m); }
