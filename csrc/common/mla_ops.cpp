// Op bodies of the MLA family, once for every backend: get_mla_metadata, mla_decode and
// mla_sparse_prefill (a decode of single-row queries over one block).
#include <torch/library.h>

#include "check_utils.h"
#include "kernel_table.h"
#include "mla_checks.h"
#include "op_args.h"
#include "op_bodies.h"

namespace mate {
namespace {

using torch::jit::Stack;

void run_mla(const MlaParams& p, const at::Device& device) {
  if (device.is_cpu()) check_mla_index_values(p);
  mla_kernel.get(device.type())(p);
}

void mla_decode(const c10::OperatorHandle& op, Stack* stack) {
  const OpArgs a(op, stack);
  const at::Tensor& q = a.tensor("q");
  const DeviceScope scope(q);
  MlaProblem prob = check_mla_decode_inputs(
      q, a.tensor("k_cache"), a.opt_tensor("block_table"), a.opt_tensor("cache_seqlens"), a.integer("head_dim_v", 0),
      a.opt_real("softmax_scale"), a.flag("causal", false), a.flag("is_fp8_kvcache", false), a.opt_tensor("indices"),
      a.opt_tensor("attn_sink"), a.opt_tensor("extra_k_cache"), a.opt_tensor("extra_indices_in_kvcache"),
      a.opt_tensor("topk_length"), a.opt_tensor("extra_topk_length"));
  // The scheduler metadata guides device kernels only: results never depend on it.
  if (const auto meta = a.opt_tensor("tile_scheduler_metadata")) {
    TORCH_CHECK(meta->scalar_type() == at::kInt && meta->dim() == 2 && meta->size(1) == kMlaMetadataCols,
                "tile_scheduler_metadata must be int32 (num_parts, 8) from get_mla_metadata, got ", meta->sizes());
    check_same_device(*meta, q, "tile_scheduler_metadata");
  }
  if (const auto splits = a.opt_tensor("num_splits")) {
    TORCH_CHECK(splits->scalar_type() == at::kInt && splits->dim() == 1 && splits->size(0) == prob.params.batch + 1,
                "num_splits must be int32 (batch_size + 1,) from get_mla_metadata, got ", splits->sizes());
    check_same_device(*splits, q, "num_splits");
  }
  at::Tensor out = at::empty(prob.out_shape, q.options());
  at::Tensor lse = at::empty(prob.lse_shape, q.options().dtype(at::kFloat));
  set_mla_outputs(prob, out, lse, std::nullopt);
  run_mla(prob.params, q.device());
  a.set_returns(std::move(out), std::move(lse));
}

void mla_sparse_prefill(const c10::OperatorHandle& op, Stack* stack) {
  const OpArgs a(op, stack);
  const at::Tensor& q = a.tensor("q");
  const DeviceScope scope(q);
  MlaProblem prob = check_mla_sparse_prefill_inputs(q, a.tensor("kv"), a.tensor("indices"), a.real("sm_scale", 0.0),
                                                    a.integer("d_v", 512), a.opt_tensor("attn_sink"),
                                                    a.opt_tensor("topk_length"));
  at::Tensor out = at::empty(prob.out_shape, q.options());
  at::Tensor lse = at::empty(prob.lse_shape, q.options().dtype(at::kFloat));
  at::Tensor max_logits = at::empty(prob.lse_shape, q.options().dtype(at::kFloat));
  set_mla_outputs(prob, out, lse, max_logits);
  run_mla(prob.params, q.device());
  a.set_returns(std::move(out), std::move(max_logits), std::move(lse));
}

void get_mla_metadata(const c10::OperatorHandle& op, Stack* stack) {
  const OpArgs a(op, stack);
  const at::Tensor& cache_seqlens = a.tensor("cache_seqlens");
  const DeviceScope scope(cache_seqlens);
  const auto topk = a.opt_integer("topk"), extra_topk = a.opt_integer("extra_topk");
  const int workers = mla_workers_kernel.get(cache_seqlens.device().type())();
  MlaMetadataParams p;
  p.parts = check_mla_metadata_args(cache_seqlens, a.integer("num_q_tokens_per_head_k", 0),
                                    a.integer("num_heads_k", 0), topk, extra_topk, workers);
  const at::Tensor lens = cache_seqlens.contiguous();
  p.cache_seqlens = lens.data_ptr<int32_t>();
  p.fixed_keys = topk ? *topk + extra_topk.value_or(0) : -1;
  p.batch = static_cast<int>(cache_seqlens.size(0));
  at::Tensor meta = at::empty({p.parts, kMlaMetadataCols}, cache_seqlens.options());
  at::Tensor splits = at::empty({static_cast<int64_t>(p.batch) + 1}, cache_seqlens.options());
  p.metadata = meta.data_ptr<int32_t>();
  p.num_splits = splits.data_ptr<int32_t>();
  mla_metadata_kernel.get(cache_seqlens.device().type())(p);
  a.set_returns(std::move(meta), std::move(splits));
}

}  // namespace

void register_mla_ops(torch::Library& m) {
  m.impl("get_mla_metadata", boxed<&get_mla_metadata>());
  m.impl("mla_decode", boxed<&mla_decode>());
  m.impl("mla_sparse_prefill", boxed<&mla_sparse_prefill>());
}

}  // namespace mate
