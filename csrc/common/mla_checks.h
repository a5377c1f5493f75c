// Argument checking of the MLA family (mla_decode, mla_sparse_prefill, get_mla_metadata),
// once for every backend.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "mla_params.h"

namespace mate {

struct MlaProblem {
  MlaParams params;
  std::vector<int64_t> out_shape, lse_shape;
  at::ScalarType out_dtype;
  at::Tensor sink_f32;
};

MlaProblem check_mla_decode_inputs(
    const at::Tensor& q, const at::Tensor& k_cache, const std::optional<at::Tensor>& block_table,
    const std::optional<at::Tensor>& cache_seqlens, int64_t head_dim_v, std::optional<double> softmax_scale,
    bool causal, bool is_fp8_kvcache, const std::optional<at::Tensor>& indices,
    const std::optional<at::Tensor>& attn_sink, const std::optional<at::Tensor>& extra_k_cache,
    const std::optional<at::Tensor>& extra_indices_in_kvcache, const std::optional<at::Tensor>& topk_length,
    const std::optional<at::Tensor>& extra_topk_length);

// Sparse prefill viewed as a decode: B = Sq query rows, one query each, kv as one block.
MlaProblem check_mla_sparse_prefill_inputs(const at::Tensor& q, const at::Tensor& kv,
                                           const at::Tensor& indices, double sm_scale, int64_t d_v,
                                           const std::optional<at::Tensor>& attn_sink,
                                           const std::optional<at::Tensor>& topk_length);

void set_mla_outputs(MlaProblem& prob, const at::Tensor& out, const at::Tensor& lse,
                     const std::optional<at::Tensor>& max_logits);

// Host-side range checks of block_table / cache_seqlens (dense decode).
void check_mla_index_values(const MlaParams& p);

// get_mla_metadata: validated (batch, parts) for the given worker count.
int check_mla_metadata_args(const at::Tensor& cache_seqlens, int64_t num_q_tokens_per_head_k,
                            int64_t num_heads_k, std::optional<int64_t> topk,
                            std::optional<int64_t> extra_topk, int num_workers);

}  // namespace mate
