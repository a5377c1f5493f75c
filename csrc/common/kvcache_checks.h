// Argument checking of the kv-cache family (kvcache_append, rotary_embedding), once for
// every backend. *_index_values read index tensors on the host (the CPU reference
// always calls them).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "kvcache_params.h"

namespace mate {

class OpArgs;

// kvcache_append's arguments (also fmha_fwd_kvcache's append step: the same names).
AppendParams check_append_inputs(const OpArgs& args);
void check_append_index_values(const AppendParams& p);

// Names of the rotated tensor and its index arguments in the calling op's schema.
struct RotaryNames {
  const char* x = "x";
  const char* cu_seqlens = "cu_seqlens";
  const char* seqlen_offsets = "seqlen_offsets";
};
RotaryApplyParams check_rotary_inputs(const at::Tensor& x, const at::Tensor& cos,
                                      const at::Tensor& sin, const at::Tensor& seqlen_offsets,
                                      const std::optional<at::Tensor>& cu_seqlens,
                                      bool interleaved, bool positions_per_row,
                                      const RotaryNames& names = {});
void set_rotary_output(RotaryApplyParams& p, const at::Tensor& out);
void check_rotary_index_values(const RotaryApplyParams& p);

}  // namespace mate
