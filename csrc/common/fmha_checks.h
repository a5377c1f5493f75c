// Argument checking for the FMHA family, written once for every backend.
// check_fmha_inputs validates shapes/dtypes/devices and builds the FmhaParams
// the CPU and device kernels read; check_fmha_index_values validates the
// contents of index tensors (host-side; the CPU reference always calls it).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "fmha_params.h"

namespace mate {

// The arguments of mate::fmha_fwd / fmha_fwd_out, in schema order.
struct FmhaInputs {
  at::Tensor q, k, v;
  std::optional<at::Tensor> cu_seqlens_q, cu_seqlens_k;
  std::optional<int64_t> max_seqlen_q, max_seqlen_k;
  std::optional<at::Tensor> seqused_q, seqused_k, page_table, cache_batch_idx, cache_leftpad;
  std::optional<at::Tensor> qv, q_descale, k_descale, v_descale;
  std::optional<double> softmax_scale;
  bool causal = false;
  int64_t window_size_left = -1, window_size_right = -1;
  std::optional<at::Tensor> learnable_sink;
  int64_t attention_chunk = 0;
  double softcap = 0.0;
  std::optional<at::Tensor> scheduler_metadata;
  int64_t num_splits = 1;
  std::optional<bool> pack_gqa;
  int64_t cp_world_size = 1, cp_rank = 0;
  std::optional<at::Tensor> cp_tot_seqused_k;
  std::optional<at::ScalarType> out_dtype;
  std::optional<at::Tensor> alibi_slopes;
};

// Validated parameters plus tensors the params point into (kept alive here).
struct FmhaProblem {
  FmhaParams params;
  at::ScalarType out_dtype;
  std::vector<int64_t> out_shape, lse_shape;
  at::Tensor sink_f32;  // learnable_sink as contiguous fp32
};

// Packs an op's arguments (schema order after q, k, v) into FmhaInputs.
FmhaInputs make_fmha_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
                       std::optional<int64_t> max_seqlen_q, std::optional<int64_t> max_seqlen_k,
                       const std::optional<at::Tensor>& seqused_q, const std::optional<at::Tensor>& seqused_k,
                       const std::optional<at::Tensor>& page_table, const std::optional<at::Tensor>& cache_batch_idx,
                       const std::optional<at::Tensor>& cache_leftpad, const std::optional<at::Tensor>& qv,
                       const std::optional<at::Tensor>& q_descale, const std::optional<at::Tensor>& k_descale,
                       const std::optional<at::Tensor>& v_descale, std::optional<double> softmax_scale, bool causal,
                       int64_t window_size_left, int64_t window_size_right,
                       const std::optional<at::Tensor>& learnable_sink, int64_t attention_chunk, double softcap,
                       const std::optional<at::Tensor>& scheduler_metadata, int64_t num_splits,
                       std::optional<bool> pack_gqa, int64_t cp_world_size, int64_t cp_rank,
                       const std::optional<at::Tensor>& cp_tot_seqused_k);

// The op argument list shared by fmha_fwd and fmha_fwd_out (schema order after q, k, v [, out, lse]).
#define MATE_FMHA_ARGS                                                                              \
  const std::optional<at::Tensor>&cu_seqlens_q, const std::optional<at::Tensor>&cu_seqlens_k,     \
      std::optional<int64_t> max_seqlen_q, std::optional<int64_t> max_seqlen_k,                   \
      const std::optional<at::Tensor>&seqused_q, const std::optional<at::Tensor>&seqused_k,       \
      const std::optional<at::Tensor>&page_table, const std::optional<at::Tensor>&cache_batch_idx, \
      const std::optional<at::Tensor>&cache_leftpad, const std::optional<at::Tensor>&qv,          \
      const std::optional<at::Tensor>&q_descale, const std::optional<at::Tensor>&k_descale,       \
      const std::optional<at::Tensor>&v_descale, std::optional<double> softmax_scale, bool causal, \
      int64_t window_size_left, int64_t window_size_right,                                        \
      const std::optional<at::Tensor>&learnable_sink, int64_t attention_chunk, double softcap,    \
      const std::optional<at::Tensor>&scheduler_metadata, int64_t num_splits,                     \
      std::optional<bool> pack_gqa, int64_t cp_world_size, int64_t cp_rank,                       \
      const std::optional<at::Tensor>&cp_tot_seqused_k
#define MATE_FMHA_ARG_NAMES                                                                        \
  cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k, page_table,         \
      cache_batch_idx, cache_leftpad, qv, q_descale, k_descale, v_descale, softmax_scale, causal,   \
      window_size_left, window_size_right, learnable_sink, attention_chunk, softcap,                \
      scheduler_metadata, num_splits, pack_gqa, cp_world_size, cp_rank, cp_tot_seqused_k

FmhaProblem check_fmha_inputs(const FmhaInputs& in);

// Checks a caller's out / lse against the problem and points the params at them.
void set_fmha_outputs(FmhaProblem& prob, const at::Tensor& out, const at::Tensor& lse);

// Host-side range checks of cu_seqlens / seqused / page_table / cache indices.
// Requires the index tensors to be readable on the host (CPU tensors).
void check_fmha_index_values(const FmhaParams& p);

DType to_dtype(at::ScalarType t);

// Combine: out_partial (S, ..., Dv) fp32, lse_partial (S, ...) fp32.
struct CombineProblem {
  CombineParams params;
  at::ScalarType out_dtype;
  std::vector<int64_t> out_shape, lse_shape;
  at::Tensor out_partial, lse_partial;  // (S, rows, Dv) / (S, rows) views or copies
};
CombineProblem check_combine_inputs(const at::Tensor& out_partial, const at::Tensor& lse_partial,
                                    std::optional<at::ScalarType> out_dtype);
void set_combine_outputs(CombineProblem& prob, const at::Tensor& out, const at::Tensor& lse);

// get_scheduler_metadata: validates its arguments and returns the split count it records.
int check_scheduler_args(int64_t batch_size, int64_t max_seqlen_q, int64_t max_seqlen_k,
                         int64_t num_heads_q, int64_t num_heads_kv, int64_t headdim,
                         int64_t headdim_v, const at::Tensor& seqused_k, int64_t max_seqlen_k_new,
                         int64_t num_splits, int num_workers);

constexpr int kMaxHeadDim = 512;
constexpr int kMaxSplits = 256;

}  // namespace mate
