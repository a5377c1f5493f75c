// Argument checking of the kv-cache family (kvcache_append, rotary_embedding), once for
// every backend. *_index_values read index tensors on the host (the CPU reference
// always calls them).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "kvcache_params.h"

namespace mate {

AppendParams check_append_inputs(const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& cache_seqlens,
                                 const std::optional<at::Tensor>& cu_seqlens_k_new,
                                 const std::optional<at::Tensor>& page_table,
                                 const std::optional<at::Tensor>& cache_batch_idx,
                                 const std::optional<at::Tensor>& rotary_cos,
                                 const std::optional<at::Tensor>& rotary_sin,
                                 const std::optional<at::Tensor>& rotary_seqlens,
                                 bool rotary_interleaved,
                                 const std::optional<at::Tensor>& cache_leftpad = std::nullopt);
void check_append_index_values(const AppendParams& p);

RotaryApplyParams check_rotary_inputs(const at::Tensor& x, const at::Tensor& cos,
                                      const at::Tensor& sin, const at::Tensor& seqlen_offsets,
                                      const std::optional<at::Tensor>& cu_seqlens,
                                      bool interleaved, bool positions_per_row);
void set_rotary_output(RotaryApplyParams& p, const at::Tensor& out);
void check_rotary_index_values(const RotaryApplyParams& p);

}  // namespace mate
