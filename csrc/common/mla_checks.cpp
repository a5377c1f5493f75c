#include "mla_checks.h"

#include <cmath>

#include "check_utils.h"
#include "fmha_checks.h"

namespace mate {
namespace {

// A paged latent cache (num_blocks, P, Hkv, last) of q's dtype, or FP8 bytes when is_fp8.
MlaCache make_cache(const at::Tensor& c, const at::Tensor& q, bool is_fp8, const char* name) {
  TORCH_CHECK(c.dim() == 4, name, " must be (num_blocks, page_block_size, num_heads_k, head_dim), got shape ",
              c.sizes());
  check_same_device(c, q, name);
  TORCH_CHECK(c.stride(-1) == 1 || c.size(-1) <= 1, name, " must have a contiguous last dimension");
  TORCH_CHECK(c.size(1) >= 1, name, " must have page_block_size >= 1");
  MlaCache m;
  const int64_t es = c.element_size();
  m.base = static_cast<const uint8_t*>(c.data_ptr());
  m.block_stride = c.stride(0) * es;
  m.token_stride = c.stride(1) * es;
  m.head_stride = c.stride(2) * es;
  m.page_size = static_cast<int>(c.size(1));
  m.num_blocks = static_cast<int>(c.size(0));
  const int64_t dqk = q.size(-1), last = c.size(-1), P = c.size(1);
  if (!is_fp8) {
    TORCH_CHECK(c.scalar_type() == q.scalar_type(), name, " must have the dtype of q (", q.scalar_type(),
                ") unless is_fp8_kvcache, got ", c.scalar_type());
    TORCH_CHECK(last == dqk, name, " head_dim (", last, ") must equal q's head_dim (", dqk, ")");
    m.format = q.scalar_type() == at::kBFloat16 ? MlaCacheFormat::kBFloat16
               : q.scalar_type() == at::kHalf   ? MlaCacheFormat::kFloat16
                                                : MlaCacheFormat::kFloat32;
    return m;
  }
  TORCH_CHECK(es == 1, name, " must be a 1-byte dtype (uint8, int8 or float8_e4m3fn) with is_fp8_kvcache, got ",
              c.scalar_type());
  TORCH_CHECK(c.size(2) == 1, name, " must have num_heads_k == 1 with is_fp8_kvcache, got ", c.size(2));
  if (last == kMlaV32TokenBytes) {
    TORCH_CHECK(dqk == 576, "an FP8 V3.2 cache (656 bytes per token) needs q head_dim 576, got ", dqk);
    TORCH_CHECK(c.stride(1) == kMlaV32TokenBytes, name,
                " must store the tokens of a block contiguously (stride(1) == 656 bytes), got ", c.stride(1));
    m.format = MlaCacheFormat::kFp8V32;
  } else if (last == kMlaModel1TokenBytes) {
    TORCH_CHECK(dqk == 512, "an FP8 MODEL1 cache (584 bytes per token) needs q head_dim 512, got ", dqk);
    TORCH_CHECK(c.stride(1) == kMlaModel1TokenBytes && c.stride(0) >= P * kMlaModel1TokenBytes &&
                    c.stride(0) % kMlaModel1DataBytes == 0,
                name, " must be a MODEL1 block view: stride(1) == 584 and a block stride >= page_block_size * 584 "
                "that is a multiple of 576, got strides ", c.strides());
    m.format = MlaCacheFormat::kFp8Model1;
  } else {
    TORCH_CHECK(false, name, " must have 656 bytes per token (V3.2 layout, head_dim 576) or 584 (MODEL1 "
                "layout, head_dim 512) with is_fp8_kvcache, got ", last);
  }
  return m;
}

// int32 (B, Sq, k) index tensor -> pointer, strides, k.
void check_indices(const at::Tensor& t, const char* name, int64_t batch, int64_t seqlen_q, const at::Tensor& q,
                   const int32_t*& ptr, int64_t& sb, int64_t& sr, int& k) {
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 3 && t.size(0) == batch && t.size(1) == seqlen_q, name,
              " must have shape (batch_size, seqlen_q, topk) = (", batch, ", ", seqlen_q, ", topk), got ", t.sizes());
  TORCH_CHECK(t.stride(2) == 1 || t.size(2) <= 1, name, " must have a contiguous last dimension");
  check_same_device(t, q, name);
  check_int_range(t.size(2), 0, "topk");
  ptr = t.data_ptr<int32_t>();
  sb = t.stride(0);
  sr = t.stride(1);
  k = static_cast<int>(t.size(2));
}

void check_q(const at::Tensor& q) {
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kBFloat16 || dt == at::kHalf || dt == at::kFloat, "q must be bfloat16, float16 or float32, got ",
              dt);
  check_last_dim_contiguous(q, "q");
}

void check_sink(MlaProblem& prob, const std::optional<at::Tensor>& attn_sink, const at::Tensor& q, int64_t heads_q) {
  if (!attn_sink) return;
  TORCH_CHECK(attn_sink->dim() == 1 && attn_sink->size(0) == heads_q, "attn_sink must have shape (num_heads_q,) = (",
              heads_q, ",), got ", attn_sink->sizes());
  TORCH_CHECK(at::isFloatingType(attn_sink->scalar_type()), "attn_sink must be a floating tensor");
  check_same_device(*attn_sink, q, "attn_sink");
  prob.sink_f32 = attn_sink->to(at::kFloat).contiguous();
  prob.params.attn_sink = prob.sink_f32.data_ptr<float>();
}

}  // namespace

MlaProblem check_mla_decode_inputs(
    const at::Tensor& q, const at::Tensor& k_cache, const std::optional<at::Tensor>& block_table,
    const std::optional<at::Tensor>& cache_seqlens, int64_t head_dim_v, std::optional<double> softmax_scale,
    bool causal, bool is_fp8_kvcache, const std::optional<at::Tensor>& indices,
    const std::optional<at::Tensor>& attn_sink, const std::optional<at::Tensor>& extra_k_cache,
    const std::optional<at::Tensor>& extra_indices_in_kvcache, const std::optional<at::Tensor>& topk_length,
    const std::optional<at::Tensor>& extra_topk_length) {
  MlaProblem prob;
  MlaParams& p = prob.params;
  check_q(q);
  TORCH_CHECK(q.dim() == 4, "q must be (batch_size, seqlen_q, num_heads_q, head_dim), got shape ", q.sizes());
  const int64_t batch = q.size(0), seqlen_q = q.size(1), heads_q = q.size(2), dqk = q.size(3);
  TORCH_CHECK(dqk >= 1 && dqk <= 1024, "q head_dim must be in [1, 1024], got ", dqk);
  TORCH_CHECK(head_dim_v >= 1 && head_dim_v <= dqk, "head_dim_v must be in [1, head_dim of q (", dqk, ")], got ",
              head_dim_v);
  p.cache = make_cache(k_cache, q, is_fp8_kvcache, "k_cache");
  const int64_t heads_kv = k_cache.size(2);
  TORCH_CHECK(heads_kv >= 1 && heads_q >= 1 && heads_q % heads_kv == 0, "num_heads_q (", heads_q,
              ") must be a positive multiple of num_heads_k (", heads_kv, ")");
  const bool sparse = indices.has_value();
  if (sparse) {
    TORCH_CHECK(heads_kv == 1, "sparse attention (indices) needs num_heads_k == 1, got ", heads_kv);
    TORCH_CHECK(!causal, "causal is not supported with indices (sparse attention masks through the indices)");
    check_indices(*indices, "indices", batch, seqlen_q, q, p.indices, p.indices_batch_stride, p.indices_row_stride,
                  p.topk);
    check_int32_vector(topk_length, "topk_length", batch, q);
    p.topk_length = int_ptr(topk_length);
    TORCH_CHECK(extra_k_cache.has_value() == extra_indices_in_kvcache.has_value(),
                "extra_k_cache and extra_indices_in_kvcache must be given together");
    if (extra_k_cache) {
      p.extra = make_cache(*extra_k_cache, q, is_fp8_kvcache, "extra_k_cache");
      TORCH_CHECK(extra_k_cache->size(2) == 1, "extra_k_cache needs num_heads_k == 1");
      check_indices(*extra_indices_in_kvcache, "extra_indices_in_kvcache", batch, seqlen_q, q, p.extra_indices,
                    p.extra_batch_stride, p.extra_row_stride, p.extra_topk);
      check_int32_vector(extra_topk_length, "extra_topk_length", batch, q);
      p.extra_topk_length = int_ptr(extra_topk_length);
    } else {
      TORCH_CHECK(!extra_topk_length, "extra_topk_length needs extra_k_cache");
    }
  } else {
    TORCH_CHECK(!extra_k_cache && !extra_indices_in_kvcache && !topk_length && !extra_topk_length,
                "topk_length, extra_k_cache, extra_indices_in_kvcache and extra_topk_length need indices "
                "(sparse attention)");
    TORCH_CHECK(block_table && cache_seqlens, "block_table and cache_seqlens are required without indices");
    const auto& bt = *block_table;
    TORCH_CHECK(bt.scalar_type() == at::kInt && bt.dim() == 2 && bt.size(0) == batch,
                "block_table must be int32 (batch_size, max_num_blocks) = (", batch, ", ...), got ", bt.scalar_type(),
                " ", bt.sizes());
    check_last_dim_contiguous(bt, "block_table");
    check_same_device(bt, q, "block_table");
    check_int32_vector(cache_seqlens, "cache_seqlens", batch, q);
    p.block_table = bt.data_ptr<int32_t>();
    p.block_table_stride = bt.stride(0);
    p.max_blocks = static_cast<int>(bt.size(1));
    p.cache_seqlens = cache_seqlens->data_ptr<int32_t>();
  }
  check_sink(prob, attn_sink, q, heads_q);
  if (softmax_scale) TORCH_CHECK(std::isfinite(*softmax_scale), "softmax_scale must be finite");

  p.q = q.data_ptr();
  p.q_batch_stride = q.stride(0);
  p.q_row_stride = q.stride(1);
  p.q_head_stride = q.stride(2);
  p.batch = static_cast<int>(batch);
  p.seqlen_q = static_cast<int>(seqlen_q);
  p.heads_q = static_cast<int>(heads_q);
  p.heads_kv = static_cast<int>(heads_kv);
  p.head_dim = static_cast<int>(dqk);
  p.head_dim_v = static_cast<int>(head_dim_v);
  p.softmax_scale = static_cast<float>(softmax_scale.value_or(1.0 / std::sqrt(static_cast<double>(dqk))));
  p.causal = causal;
  p.q_dtype = to_dtype(q.scalar_type());
  p.out_dtype = p.q_dtype;
  prob.out_dtype = q.scalar_type();
  prob.out_shape = {batch, seqlen_q, heads_q, head_dim_v};
  prob.lse_shape = {batch, heads_q, seqlen_q};
  return prob;
}

MlaProblem check_mla_sparse_prefill_inputs(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& indices,
                                           double sm_scale, int64_t d_v, const std::optional<at::Tensor>& attn_sink,
                                           const std::optional<at::Tensor>& topk_length) {
  check_q(q);
  TORCH_CHECK(q.dim() == 3, "q must be (seqlen_q, num_heads_q, head_dim), got shape ", q.sizes());
  TORCH_CHECK(kv.dim() == 3, "kv must be (seqlen_kv, num_heads_kv, head_dim), got shape ", kv.sizes());
  TORCH_CHECK(kv.size(1) == 1, "kv must have num_heads_kv == 1, got ", kv.size(1));
  TORCH_CHECK(indices.dim() == 3 && indices.size(0) == q.size(0) && indices.size(1) == 1,
              "indices must have shape (seqlen_q, num_heads_kv=1, topk) = (", q.size(0), ", 1, topk), got ",
              indices.sizes());
  TORCH_CHECK(kv.size(0) >= 1, "kv must hold at least one row");
  TORCH_CHECK(kv.scalar_type() == q.scalar_type(), "kv must have the dtype of q (", q.scalar_type(), "), got ",
              kv.scalar_type());
  TORCH_CHECK(kv.size(2) == q.size(2), "kv head_dim (", kv.size(2), ") must equal q head_dim (", q.size(2), ")");
  TORCH_CHECK(d_v >= 1 && d_v <= q.size(2), "d_v must be in [1, head_dim of q (", q.size(2), ")], got ", d_v);
  TORCH_CHECK(std::isfinite(sm_scale), "sm_scale must be finite, got ", sm_scale);
  // as a decode: q (Sq, 1, Hq, D), kv one block of Skv tokens, indices (Sq, 1, topk)
  MlaProblem prob = check_mla_decode_inputs(q.unsqueeze(1), kv.unsqueeze(0), std::nullopt, std::nullopt, d_v, sm_scale,
                                            false, false, indices, attn_sink, std::nullopt, std::nullopt, topk_length,
                                            std::nullopt);
  prob.out_shape = {q.size(0), q.size(1), d_v};
  prob.lse_shape = {q.size(0), q.size(1)};
  return prob;
}

void set_mla_outputs(MlaProblem& prob, const at::Tensor& out, const at::Tensor& lse,
                     const std::optional<at::Tensor>& max_logits) {
  TORCH_CHECK(out.is_contiguous() && lse.is_contiguous(), "MLA outputs must be contiguous");
  prob.params.out = out.data_ptr();
  prob.params.lse = lse.data_ptr<float>();
  if (max_logits) prob.params.max_logits = max_logits->data_ptr<float>();
}

void check_mla_index_values(const MlaParams& p) {
  auto check_lengths = [&](const int32_t* len, int k, const char* name) {
    if (!len) return;
    for (int b = 0; b < p.batch; ++b)
      TORCH_CHECK(len[b] >= 0 && len[b] <= k, name, "[", b, "] = ", len[b], " must be in [0, ", k,
                  "] (the index count per row)");
  };
  check_lengths(p.topk_length, p.topk, "topk_length");
  check_lengths(p.extra_topk_length, p.extra_topk, "extra_topk_length");
  if (!p.block_table) return;
  const int P = p.cache.page_size;
  for (int b = 0; b < p.batch; ++b) {
    const int len = p.cache_seqlens[b];
    TORCH_CHECK(len >= 0 && static_cast<int64_t>(len) <= static_cast<int64_t>(p.max_blocks) * P, "cache_seqlens[", b,
                "] = ", len, " must be in [0, max_num_blocks * page_block_size = ",
                static_cast<int64_t>(p.max_blocks) * P, "]");
    const int32_t* row = p.block_table + b * p.block_table_stride;
    for (int64_t i = 0; i < (static_cast<int64_t>(len) + P - 1) / P; ++i)  // 64-bit: len + P may pass 2^31
      TORCH_CHECK(row[i] >= 0 && row[i] < p.cache.num_blocks, "block_table[", b, ", ", i, "] = ", row[i],
                  " is out of range [0, ", p.cache.num_blocks, ")");
  }
}

int check_mla_metadata_args(const at::Tensor& cache_seqlens, int64_t num_q_tokens_per_head_k, int64_t num_heads_k,
                            std::optional<int64_t> topk, std::optional<int64_t> extra_topk, int num_workers) {
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1,
              "cache_seqlens must be a 1-D int32 tensor (batch_size,), got ", cache_seqlens.scalar_type(), " ",
              cache_seqlens.sizes());
  check_int_range(num_q_tokens_per_head_k, 1, "num_q_tokens_per_head_k");
  check_int_range(num_heads_k, 1, "num_heads_k");
  if (topk) check_int_range(*topk, 0, "topk");
  if (extra_topk) check_int_range(*extra_topk, 0, "extra_topk");
  return mla_num_parts(num_workers, static_cast<int>(num_heads_k), static_cast<int>(num_q_tokens_per_head_k));
}

}  // namespace mate
