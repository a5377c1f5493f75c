// Op bodies of the FMHA family, once for every backend: fmha_fwd, fmha_fwd_out,
// fmha_fwd_kvcache (the decode step: append + rotary + attention), fmha_combine(_out) and
// get_scheduler_metadata. Arguments are read by their schema names (op_args.h); kernels
// are called through the kernel table (kernel_table.h).
#include <torch/library.h>

#include "check_utils.h"
#include "fmha_math.h"
#include "fmha_checks.h"
#include "kernel_table.h"
#include "kvcache_checks.h"
#include "op_args.h"
#include "op_bodies.h"
#include "scheduler.h"

namespace mate {
namespace {

using torch::jit::Stack;

// Index contents are checked on the host, so only for CPU tensors; on devices they are the
// caller's duty (reading them would synchronize).
void run_fmha(const FmhaProblem& prob, const at::Device& device) {
  if (device.is_cpu()) check_fmha_index_values(prob.params);
  fmha_kernel.get(device.type())(prob);
}

void allocate_fmha_outputs(FmhaProblem& prob, const at::Tensor& q, at::Tensor& out, at::Tensor& lse) {
  out = at::empty(prob.out_shape, q.options().dtype(prob.out_dtype));
  lse = at::empty(prob.lse_shape, prob.scratch_options);
  set_fmha_outputs(prob, out, lse);
}

void fmha_fwd(const c10::OperatorHandle& op, Stack* stack) {
  const OpArgs a(op, stack);
  const at::Tensor& q = a.tensor("q");
  const DeviceScope scope(q);
  FmhaProblem prob = check_fmha_inputs(a, {q, a.tensor("k"), a.tensor("v"), a.opt_tensor("seqused_k"),
                                           a.opt_dtype("out_dtype")});
  at::Tensor out, lse;
  allocate_fmha_outputs(prob, q, out, lse);
  run_fmha(prob, q.device());
  a.set_returns(std::move(out), std::move(lse));
}

void fmha_fwd_out(const c10::OperatorHandle& op, Stack* stack) {
  const OpArgs a(op, stack);
  const at::Tensor &q = a.tensor("q"), &out = a.tensor("out"), &lse = a.tensor("lse");
  const DeviceScope scope(q);
  FmhaProblem prob = check_fmha_inputs(a, {q, a.tensor("k"), a.tensor("v"), a.opt_tensor("seqused_k"),
                                           out.scalar_type()});
  TORCH_CHECK(out.device() == q.device(), "out must be on the device of q (", q.device(), "), got ", out.device());
  set_fmha_outputs(prob, out, lse);
  run_fmha(prob, q.device());
  a.set_returns();
}

// The backward of fmha_fwd (dense / ragged / padded keys and queries): recomputes the
// probabilities from the saved lse. dq / dk / dv have the shapes and dtypes of q / k / v;
// rows no sequence uses (past seqused, outside every cu_seqlens segment) get 0. dsink is
// (H,) fp32 when a learnable_sink was given, else an empty tensor.
void fmha_bwd(const c10::OperatorHandle& op, Stack* stack) {
  const OpArgs a(op, stack);
  const at::Tensor &q = a.tensor("q"), &k = a.tensor("k"), &v = a.tensor("v");
  const DeviceScope scope(q);
  FmhaBwdProblem prob = check_fmha_bwd_inputs(a);
  if (q.is_cpu()) check_fmha_bwd_index_values(prob.params);
  // the CPU kernel writes every dq element; the device kernels only the rows sequences use
  at::Tensor dq = q.is_cpu() ? at::empty(q.sizes(), q.options()) : at::zeros(q.sizes(), q.options());
  at::Tensor dk = at::zeros(k.sizes(), k.options());
  at::Tensor dv = at::zeros(v.sizes(), v.options());
  // zeros: a call without query rows (batch 0) launches no kernel
  at::Tensor dsink = at::zeros({prob.params.fwd.learnable_sink ? q.size(-2) : 0}, q.options().dtype(at::kFloat));
  set_fmha_bwd_outputs(prob, dq, dk, dv, dsink);
  fmha_bwd_kernel.get(q.device().type())(prob.params);
  a.set_returns(std::move(dq), std::move(dk), std::move(dv), std::move(dsink));
}

// Points the attention at a rotated copy of q (a fresh contiguous tensor).
void use_rotated_q(FmhaParams& p, const at::Tensor& q_rot) {
  p.q = q_rot.data_ptr();
  p.q_batch_stride = p.q_is_ragged ? 0 : q_rot.stride(0);
  p.q_row_stride = q_rot.stride(-3);
  p.q_head_stride = q_rot.stride(-2);
}

// The decode step of flash_attn_with_kvcache in one dispatch. Every check (attention,
// append, rotary, and on the CPU the index contents) runs before the first write, so a
// call that raises leaves the caches untouched. Then: rotate q, append, attend.
void fmha_fwd_kvcache(const c10::OperatorHandle& op, Stack* stack) {
  const OpArgs a(op, stack);
  const at::Tensor &q = a.tensor("q"), &k_cache = a.tensor("k_cache"), &v_cache = a.tensor("v_cache");
  const DeviceScope scope(q);
  const auto k = a.opt_tensor("k"), v = a.opt_tensor("v");
  const auto cache_seqlens = a.opt_tensor("cache_seqlens");
  const auto rotary_cos = a.opt_tensor("rotary_cos"), rotary_sin = a.opt_tensor("rotary_sin");
  TORCH_CHECK(k.has_value() == v.has_value(), "k and v must be given together");
  TORCH_CHECK(rotary_cos.has_value() == rotary_sin.has_value(), "rotary_cos and rotary_sin must be given together");
  TORCH_CHECK(!rotary_cos || k, "rotary_cos/rotary_sin are only used when appending new keys: pass k and v too");
  TORCH_CHECK(cache_seqlens || !a.opt_tensor("page_table"), "cache_seqlens is required with page_table");
  TORCH_CHECK(cache_seqlens || !k, "cache_seqlens is required when appending k/v");
  TORCH_CHECK(k_cache.dim() == 4, "k_cache must be (batch_size_cache, seqlen_cache, num_heads_k, head_dim) or paged "
              "(num_pages, page_size, num_heads_k, head_dim), got shape ", k_cache.sizes());

  FmhaProblem prob = check_fmha_inputs(a, {q, k_cache, v_cache, cache_seqlens, std::nullopt, "k_cache", "v_cache",
                                           "cache_seqlens"});
  FmhaParams& p = prob.params;
  AppendParams append;
  if (k) {
    append = check_append_inputs(a);
    TORCH_CHECK(append.batch == p.batch, "k has ", append.batch, " sequences but q has ", p.batch);
    p.cu_seqlens_k_new = append.cu_seqlens_k_new;
    p.seqlen_k_new = append.seqlen_new;
  }
  RotaryApplyParams q_rotary;
  if (rotary_cos) {
    // q row t is rotated at off[b] + t when the mask depends on the row (causal, local,
    // chunked), else every row at off[b] (FlashAttention-3's rule).
    const bool per_row = p.window_left >= 0 || p.window_right >= 0 || p.attention_chunk > 0;
    const auto rotary_seqlens = a.opt_tensor("rotary_seqlens");
    q_rotary = check_rotary_inputs(q, *rotary_cos, *rotary_sin, rotary_seqlens ? *rotary_seqlens : *cache_seqlens,
                                   a.opt_tensor("cu_seqlens_q"), a.flag("rotary_interleaved", true), per_row,
                                   {"q", "cu_seqlens_q", rotary_seqlens ? "rotary_seqlens" : "cache_seqlens"});
    if (q_rotary.cu_seqlens) q_rotary.max_rows = imin(prob.max_seqlen_q, q_rotary.total_rows);
  }
  at::Tensor out, lse, q_rot;
  allocate_fmha_outputs(prob, q, out, lse);
  const at::Device device = q.device();
  if (device.is_cpu()) {
    if (k) check_append_index_values(append);
    check_fmha_index_values(p);  // before the rotary check: its messages name cu_seqlens_q
    if (rotary_cos) check_rotary_index_values(q_rotary);
  }
  // ---- writes start here
  if (rotary_cos) {
    q_rot = at::empty(q.sizes(), q.options());
    set_rotary_output(q_rotary, q_rot);
    rotary_kernel.get(device.type())(q_rotary);
    use_rotated_q(p, q_rot);
  }
  if (k) append_kernel.get(device.type())(append);
  fmha_kernel.get(device.type())(prob);
  a.set_returns(std::move(out), std::move(lse));
}

void fmha_combine(const c10::OperatorHandle& op, Stack* stack) {
  const OpArgs a(op, stack);
  const at::Tensor& out_partial = a.tensor("out_partial");
  const DeviceScope scope(out_partial);
  CombineProblem prob = check_combine_inputs(out_partial, a.tensor("lse_partial"), a.opt_dtype("out_dtype"));
  at::Tensor out = at::empty(prob.out_shape, out_partial.options().dtype(prob.out_dtype));
  at::Tensor lse = at::empty(prob.lse_shape, out_partial.options());
  set_combine_outputs(prob, out, lse);
  combine_kernel.get(out_partial.device().type())(prob.params);
  a.set_returns(std::move(out), std::move(lse));
}

void fmha_combine_out(const c10::OperatorHandle& op, Stack* stack) {
  const OpArgs a(op, stack);
  const at::Tensor &out_partial = a.tensor("out_partial"), &out = a.tensor("out");
  const DeviceScope scope(out_partial);
  CombineProblem prob = check_combine_inputs(out_partial, a.tensor("lse_partial"), out.scalar_type());
  set_combine_outputs(prob, out, a.tensor("lse"));
  combine_kernel.get(out_partial.device().type())(prob.params);
  a.set_returns();
}

// (batch_size + 1,) int32: [0] the split count of the call, [1 + b] the splits sequence b
// may use (scheduler.h). Computed from arguments only: no tensor data is read.
void get_scheduler_metadata(const c10::OperatorHandle& op, Stack* stack) {
  const OpArgs a(op, stack);
  const at::Tensor& seqused_k = a.tensor("seqused_k");
  const DeviceScope scope(seqused_k);
  const int64_t batch_size = a.integer("batch_size", 0), max_seqlen_q = a.integer("max_seqlen_q", 0);
  const int64_t max_seqlen_k = a.integer("max_seqlen_k", 0), max_seqlen_k_new = a.integer("max_seqlen_k_new", 0);
  const int64_t num_heads_q = a.integer("num_heads_q", 0), num_heads_kv = a.integer("num_heads_kv", 0);
  const int64_t headdim = a.integer("headdim", 0), headdim_v = a.integer("headdim_v", 0);
  const int64_t num_splits = a.integer("num_splits", 0), sm_margin = a.integer("sm_margin", 0);
  check_int_range(batch_size, 0, "batch_size");
  check_int_range(max_seqlen_q, 0, "max_seqlen_q");
  check_int_range(max_seqlen_k, 0, "max_seqlen_k");
  check_int_range(max_seqlen_k_new, 0, "max_seqlen_k_new");
  TORCH_CHECK(max_seqlen_k + max_seqlen_k_new <= INT32_MAX, "max_seqlen_k + max_seqlen_k_new must fit in int32");
  check_int_range(num_heads_q, 1, "num_heads_q");
  check_int_range(num_heads_kv, 1, "num_heads_kv");
  TORCH_CHECK(num_heads_q % num_heads_kv == 0, "num_heads_q (", num_heads_q, ") must be a multiple of num_heads_kv (",
              num_heads_kv, ")");
  TORCH_CHECK(headdim >= 1 && headdim <= kMaxHeadDim && headdim_v >= 1 && headdim_v <= kMaxHeadDim,
              "headdim and headdim_v must be in [1, ", kMaxHeadDim, "], got ", headdim, " and ", headdim_v);
  TORCH_CHECK(seqused_k.scalar_type() == at::kInt && seqused_k.dim() == 1 && seqused_k.size(0) == batch_size,
              "seqused_k (cache_seqlens) must be an int32 tensor of shape (batch_size,) = (", batch_size, ",), got ",
              seqused_k.scalar_type(), " ", seqused_k.sizes());
  TORCH_CHECK(num_splits >= 0 && num_splits <= kMaxSplits, "num_splits must be in [0, ", kMaxSplits, "], got ",
              num_splits);
  check_int_range(sm_margin, 0, "sm_margin");
  const int workers = num_workers_kernel.get(seqused_k.device().type())(static_cast<int>(sm_margin));
  const int splits = resolve_num_splits(static_cast<int>(num_splits), batch_size, static_cast<int>(num_heads_kv),
                                        static_cast<int>(max_seqlen_q), static_cast<int>(num_heads_q / num_heads_kv),
                                        static_cast<int>(max_seqlen_k + max_seqlen_k_new), workers);
  a.set_returns(at::full({scheduler_metadata_size(batch_size)}, splits, seqused_k.options().dtype(at::kInt)));
}

}  // namespace

void register_fmha_ops(torch::Library& m) {
  m.impl("fmha_fwd", boxed<&fmha_fwd>());
  m.impl("fmha_fwd_out", boxed<&fmha_fwd_out>());
  m.impl("fmha_fwd_kvcache", boxed<&fmha_fwd_kvcache>());
  m.impl("fmha_combine", boxed<&fmha_combine>());
  m.impl("fmha_combine_out", boxed<&fmha_combine_out>());
  m.impl("get_scheduler_metadata", boxed<&get_scheduler_metadata>());
}

void register_fmha_bwd_ops(torch::Library& m) { m.impl("fmha_bwd", boxed<&fmha_bwd>()); }

}  // namespace mate
