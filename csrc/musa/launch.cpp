// Torch-facing launchers of the device kernels: validate with the shared checks of
// csrc/common, fill the parameter structs, allocate outputs, launch on the current
// stream. Registered on CUDA (nvcc builds) or PrivateUse1 (MUSA builds).
//
// Data-dependent checks (index ranges inside cu_seqlens / page tables / cache_seqlens)
// would need a device-to-host copy, so they are the caller's duty here (docs/semantics.md);
// shapes, dtypes and devices are checked exactly as on the CPU. No op synchronizes.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/fmha_checks.h"
#include "../common/fmha_ops.h"
#include "../common/kvcache_checks.h"
#include "../common/scheduler.h"
#include "arch/device.h"
#include "arch/torch_device.h"
#include "kernels.h"

namespace mate::device {
namespace {

// Parallel workers for the split heuristic: resident blocks, not SMs (a 128-thread block
// leaves room for many per SM, and decode needs them all busy to stream K/V at full rate).
int device_workers(int sm_margin = 0) { return imax(1, arch::multiprocessor_count() - sm_margin) * 16; }

void check_launch(arch::Error e, const char* what) {
  TORCH_CHECK(e == arch::kSuccess, what, " kernel launch failed: ", arch::error_string(e));
}

void run_fmha(FmhaProblem& prob, const FmhaInputs& in) {
  const FmhaParams& p = prob.params;
  const int G = p.num_heads / p.num_heads_k;
  // upper bounds from shapes and hints only (no device read)
  const int max_q = p.q_is_ragged ? (in.max_seqlen_q ? static_cast<int>(*in.max_seqlen_q) : p.total_q) : p.seqlen_q;
  const int max_k = p.k_is_ragged ? (in.max_seqlen_k ? static_cast<int>(*in.max_seqlen_k) : p.total_k) : p.seqlen_k;
  int splits = resolve_num_splits(p.num_splits, p.batch, p.num_heads_k, max_q, G, max_k, device_workers());
  TORCH_CHECK(p.batch <= 65535, "the device kernels handle at most 65535 sequences per call, got ", p.batch);
  splits = imax(1, imin(splits, 65535 / imax(p.batch, 1)));
  FmhaSplitBuffers parts;
  parts.num_splits = splits;
  at::Tensor part_out, part_lse;
  if (splits > 1) {
    const auto opts = in.q.options().dtype(at::kFloat);
    part_out = at::empty({splits, p.total_q, p.num_heads, p.head_dim_v}, opts);
    part_lse = at::empty({splits, p.total_q, p.num_heads}, opts);
    parts.out = part_out.data_ptr<float>();
    parts.lse = part_lse.data_ptr<float>();
  }
  check_launch(launch_fmha(p, parts, max_q, arch::current_stream()), "fmha_fwd");
}

void run_combine(const CombineParams& c) { check_launch(launch_combine(c, arch::current_stream()), "fmha_combine"); }

std::tuple<at::Tensor, at::Tensor> fmha_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            MATE_FMHA_ARGS, std::optional<at::ScalarType> out_dtype,
                                            const std::optional<at::Tensor>& alibi_slopes) {
  arch::DeviceGuard guard(q.device());
  return fmha_fwd_op(&run_fmha, q, k, v, MATE_FMHA_ARG_NAMES, out_dtype, alibi_slopes);
}

void fmha_fwd_out(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                  const at::Tensor& lse, MATE_FMHA_ARGS, const std::optional<at::Tensor>& alibi_slopes) {
  arch::DeviceGuard guard(q.device());
  fmha_fwd_out_op(&run_fmha, q, k, v, out, lse, MATE_FMHA_ARG_NAMES, alibi_slopes);
}

std::tuple<at::Tensor, at::Tensor> fmha_combine(const at::Tensor& out_partial, const at::Tensor& lse_partial,
                                                std::optional<at::ScalarType> out_dtype) {
  arch::DeviceGuard guard(out_partial.device());
  return fmha_combine_op(&run_combine, out_partial, lse_partial, out_dtype);
}

void fmha_combine_out(const at::Tensor& out_partial, const at::Tensor& lse_partial, const at::Tensor& out,
                      const at::Tensor& lse) {
  arch::DeviceGuard guard(out_partial.device());
  fmha_combine_out_op(&run_combine, out_partial, lse_partial, out, lse);
}

at::Tensor get_scheduler_metadata(int64_t batch_size, int64_t max_seqlen_q, int64_t max_seqlen_k,
                                  int64_t num_heads_q, int64_t num_heads_kv, int64_t headdim, int64_t headdim_v,
                                  at::ScalarType qkv_dtype, const at::Tensor& seqused_k,
                                  const std::optional<at::Tensor>& cu_seqlens_q,
                                  const std::optional<at::Tensor>& cu_seqlens_k,
                                  const std::optional<at::Tensor>& cu_seqlens_k_new,
                                  const std::optional<at::Tensor>& seqused_q,
                                  const std::optional<at::Tensor>& cache_leftpad, std::optional<int64_t> page_size,
                                  int64_t max_seqlen_k_new, bool causal, int64_t window_size_left,
                                  int64_t window_size_right, int64_t attention_chunk, bool has_softcap,
                                  int64_t num_splits, std::optional<bool> pack_gqa, int64_t sm_margin) {
  arch::DeviceGuard guard(seqused_k.device());
  const int splits = check_scheduler_args(batch_size, max_seqlen_q, max_seqlen_k, num_heads_q, num_heads_kv, headdim,
                                          headdim_v, seqused_k, max_seqlen_k_new, num_splits,
                                          device_workers(static_cast<int>(sm_margin)));
  return at::full({scheduler_metadata_size(batch_size)}, splits, seqused_k.options().dtype(at::kInt));
}

void kvcache_append(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& cu_seqlens_k_new,
                    const std::optional<at::Tensor>& page_table, const std::optional<at::Tensor>& cache_batch_idx,
                    const std::optional<at::Tensor>& rotary_cos, const std::optional<at::Tensor>& rotary_sin,
                    const std::optional<at::Tensor>& rotary_seqlens, bool rotary_interleaved,
                    const std::optional<at::Tensor>& cache_leftpad) {
  arch::DeviceGuard guard(k_cache.device());
  const AppendParams p = check_append_inputs(k_cache, v_cache, k, v, cache_seqlens, cu_seqlens_k_new, page_table,
                                             cache_batch_idx, rotary_cos, rotary_sin, rotary_seqlens,
                                             rotary_interleaved, cache_leftpad);
  const int64_t max_new = p.cu_seqlens_k_new ? p.total_new : p.seqlen_new;
  TORCH_CHECK(max_new <= INT32_MAX, "too many new keys");
  check_launch(launch_kvcache_append(p, static_cast<int>(max_new), arch::current_stream()), "kvcache_append");
}

at::Tensor rotary_embedding(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                            const at::Tensor& seqlen_offsets, const std::optional<at::Tensor>& cu_seqlens,
                            std::optional<int64_t> max_seqlen, bool interleaved, bool positions_per_row) {
  arch::DeviceGuard guard(x.device());
  RotaryApplyParams p = check_rotary_inputs(x, cos, sin, seqlen_offsets, cu_seqlens, interleaved, positions_per_row);
  at::Tensor out = p.cu_seqlens ? x.clone(at::MemoryFormat::Contiguous) : at::empty(x.sizes(), x.options());
  set_rotary_output(p, out);
  const int max_rows = p.cu_seqlens ? static_cast<int>(max_seqlen.value_or(p.total_rows)) : p.seqlen;
  check_launch(launch_rotary(p, max_rows, arch::current_stream()), "rotary_embedding");
  return out;
}

}  // namespace

#if defined(MATE_WITH_MUSA)
#define MATE_DEVICE_KEY PrivateUse1
#else
#define MATE_DEVICE_KEY CUDA
#endif

TORCH_LIBRARY_IMPL(mate, MATE_DEVICE_KEY, m) {
  m.impl("fmha_fwd", &fmha_fwd);
  m.impl("fmha_fwd_out", &fmha_fwd_out);
  m.impl("fmha_combine", &fmha_combine);
  m.impl("fmha_combine_out", &fmha_combine_out);
  m.impl("get_scheduler_metadata", &get_scheduler_metadata);
  m.impl("kvcache_append", &kvcache_append);
  m.impl("rotary_embedding", &rotary_embedding);
}

}  // namespace mate::device
