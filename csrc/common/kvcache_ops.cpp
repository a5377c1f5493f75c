// Op bodies of the kv-cache family, once for every backend: kvcache_append (in-place
// append of new keys/values, keys optionally rotated) and rotary_embedding.
#include <torch/library.h>

#include <algorithm>

#include "kernel_table.h"
#include "kvcache_checks.h"
#include "op_args.h"
#include "op_bodies.h"

namespace mate {
namespace {

using torch::jit::Stack;

void kvcache_append(const c10::OperatorHandle& op, Stack* stack) {
  const OpArgs a(op, stack);
  const at::Tensor& k_cache = a.tensor("k_cache");
  const DeviceScope scope(k_cache);
  const AppendParams p = check_append_inputs(a);
  if (k_cache.is_cpu()) check_append_index_values(p);
  append_kernel.get(k_cache.device().type())(p);
  a.set_returns();
}

void rotary_embedding(const c10::OperatorHandle& op, Stack* stack) {
  const OpArgs a(op, stack);
  const at::Tensor& x = a.tensor("x");
  const DeviceScope scope(x);
  RotaryApplyParams p = check_rotary_inputs(x, a.tensor("cos"), a.tensor("sin"), a.tensor("seqlen_offsets"),
                                            a.opt_tensor("cu_seqlens"), a.flag("interleaved", true),
                                            a.flag("positions_per_row", true));
  if (const auto max_seqlen = a.opt_integer("max_seqlen"); max_seqlen && p.cu_seqlens)
    p.max_rows = static_cast<int>(std::clamp<int64_t>(*max_seqlen, 0, p.total_rows));
  if (x.is_cpu()) check_rotary_index_values(p);
  // rows of a ragged x outside every sequence are passed through unchanged
  at::Tensor out = p.cu_seqlens ? x.clone(at::MemoryFormat::Contiguous) : at::empty(x.sizes(), x.options());
  set_rotary_output(p, out);
  rotary_kernel.get(x.device().type())(p);
  a.set_returns(std::move(out));
}

}  // namespace

void register_kvcache_ops(torch::Library& m) {
  m.impl("kvcache_append", boxed<&kvcache_append>());
  m.impl("rotary_embedding", boxed<&rotary_embedding>());
}

}  // namespace mate
