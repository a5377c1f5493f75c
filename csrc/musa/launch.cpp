// Torch-facing side of the device kernels: fills the kernel table (csrc/common/
// kernel_table.h) for CUDA (nvcc builds) or PrivateUse1 (MUSA builds). The op bodies in
// csrc/common have validated the arguments and allocated the outputs; these functions
// allocate scratch (split partials) and launch on the current stream. None synchronizes.
//
// Index contents (cu_seqlens, page tables, cache_seqlens) are the caller's duty on devices
// (checking them would need a device-to-host copy); docs/semantics.md says so.
#include <ATen/ATen.h>

#include "../common/fmha_checks.h"
#include "../common/kernel_table.h"
#include "../common/mla_params.h"
#include "../common/scheduler.h"
#include "arch/device.h"
#include "arch/torch_device.h"
#include "kernels.h"

namespace mate::device {
namespace {

// Parallel workers for the split heuristic: resident blocks, not SMs (a 128-thread block
// leaves room for many per SM, and decode needs them all busy to stream K/V at full rate).
int device_workers(int sm_margin) { return imax(1, arch::multiprocessor_count() - sm_margin) * 16; }

void check_launch(arch::Error e, const char* what) {
  TORCH_CHECK(e == arch::kSuccess, what, " kernel launch failed: ", arch::error_string(e));
}

void fmha_device(const FmhaProblem& prob) {
  const FmhaParams& p = prob.params;
  const int G = p.num_heads / p.num_heads_k;
  // The Hopper kernel keeps one 384-thread block per SM busy, so its split heuristic counts
  // SMs, not the mma.sync kernel's resident blocks (which would split long prefills needlessly
  // and send them off the Hopper kernel).
  const bool hopper = p.num_splits == 0 && fmha_sm90_takes(p, prob.max_seqlen_q);
  const int workers = hopper ? imax(1, arch::multiprocessor_count()) : device_workers(0);
  int splits = resolve_num_splits(p.num_splits, p.batch, p.num_heads_k, prob.max_seqlen_q, G, prob.max_seqlen_k,
                                  workers);
  TORCH_CHECK(p.batch <= 65535, "the device kernels handle at most 65535 sequences per call, got ", p.batch);
  splits = imax(1, imin(splits, 65535 / imax(p.batch, 1)));
  FmhaSplitBuffers parts;
  parts.num_splits = splits;
  at::Tensor part_out, part_lse;
  if (splits > 1) {
    part_out = at::empty({splits, p.total_q, p.num_heads, p.head_dim_v}, prob.scratch_options);
    part_lse = at::empty({splits, p.total_q, p.num_heads}, prob.scratch_options);
    parts.out = part_out.data_ptr<float>();
    parts.lse = part_lse.data_ptr<float>();
  }
  check_launch(launch_fmha(p, parts, prob.max_seqlen_q, arch::current_stream()), "fmha_fwd");
}

// FMHA backward: fp32 per-row scratch (lse in base 2, delta), then the kernels; deterministic
// always (no atomics), so g.deterministic needs nothing more.
void fmha_bwd_device(const FmhaBwdParams& g) {
  const FmhaParams& p = g.fwd;
  TORCH_CHECK(p.batch <= 65535, "the device kernels handle at most 65535 sequences per call, got ", p.batch);
  const auto options = at::TensorOptions().device(arch::kTorchDevice, arch::current_device()).dtype(at::kFloat);
  const int64_t n = static_cast<int64_t>(p.total_q) * p.num_heads;
  at::Tensor scratch = at::empty({2 * n}, options);
  FmhaBwdScratch rows;
  rows.lse2 = scratch.data_ptr<float>();
  rows.delta = rows.lse2 + n;
  check_launch(launch_fmha_bwd(g, rows, arch::current_stream()), "fmha_bwd");
}

void combine_device(const CombineParams& c) {
  check_launch(launch_combine(c, arch::current_stream()), "fmha_combine");
}

void append_device(const AppendParams& p) {
  const int64_t max_new = p.cu_seqlens_k_new ? p.total_new : p.seqlen_new;
  TORCH_CHECK(max_new <= INT32_MAX, "too many new keys");
  check_launch(launch_kvcache_append(p, static_cast<int>(max_new), arch::current_stream()), "kvcache_append");
}

void rotary_device(const RotaryApplyParams& p) {
  check_launch(launch_rotary(p, p.max_rows, arch::current_stream()), "rotary_embedding");
}

// Multiprocessors: get_mla_metadata's workers (the fast MLA kernel runs one block per SM).
int mla_device_workers() { return imax(1, arch::multiprocessor_count()); }

void mla_metadata_device(const MlaMetadataParams& m) {
  check_launch(launch_mla_schedule(m, arch::current_stream()), "get_mla_metadata");
}

// MLA decode / sparse prefill: the tensor-core path with its own schedule (computed on the
// device, so a caller's metadata never changes results) and split partials, else the
// portable kernel.
void mla_device(const MlaParams& p) {
  const arch::Stream stream = arch::current_stream();
  if (!mla_mma_fits(p)) {
    check_launch(launch_mla_portable(p, stream), "mla_decode");
    return;
  }
  const int seqs = mla_sequences(p);
  const int parts = mla_fast_parts(p, mla_device_workers());
  const int rows_all = (p.block_table ? p.seqlen_q : 1) * p.heads_q;
  const auto options = at::TensorOptions().device(arch::kTorchDevice, arch::current_device());
  at::Tensor sched = at::empty({parts * kMlaMetadataCols + seqs + 1}, options.dtype(at::kInt));
  at::Tensor partial = at::empty({2 * static_cast<int64_t>(parts) * rows_all * (p.head_dim_v + 2)}, options.dtype(at::kFloat));
  MlaMetadataParams m;
  m.cache_seqlens = p.cache_seqlens;
  m.fixed_keys = p.block_table ? -1 : static_cast<int64_t>(p.topk) + p.extra_topk;
  m.batch = seqs;
  m.parts = parts;
  m.metadata = sched.data_ptr<int32_t>();
  m.num_splits = m.metadata + parts * kMlaMetadataCols;
  check_launch(launch_mla_schedule(m, stream), "mla_decode (schedule)");
  MlaSplitBuffers split;
  split.metadata = m.metadata;
  split.parts = parts;
  split.out = partial.data_ptr<float>();
  split.lse = split.out + 2 * static_cast<int64_t>(parts) * rows_all * p.head_dim_v;
  split.max_logit = split.lse + 2 * static_cast<int64_t>(parts) * rows_all;
  check_launch(launch_mla_fast(p, split, stream), "mla_decode");
}

}  // namespace

#if defined(MATE_WITH_MUSA)
#define MATE_DEVICE_TYPE PrivateUse1
#else
#define MATE_DEVICE_TYPE CUDA
#endif

MATE_REGISTER_KERNEL(fmha_kernel, MATE_DEVICE_TYPE, &fmha_device);
MATE_REGISTER_KERNEL(fmha_bwd_kernel, MATE_DEVICE_TYPE, &fmha_bwd_device);
MATE_REGISTER_KERNEL(combine_kernel, MATE_DEVICE_TYPE, &combine_device);
MATE_REGISTER_KERNEL(append_kernel, MATE_DEVICE_TYPE, &append_device);
MATE_REGISTER_KERNEL(rotary_kernel, MATE_DEVICE_TYPE, &rotary_device);
MATE_REGISTER_KERNEL(num_workers_kernel, MATE_DEVICE_TYPE, &device_workers);
MATE_REGISTER_KERNEL(mla_workers_kernel, MATE_DEVICE_TYPE, &mla_device_workers);
MATE_REGISTER_KERNEL(mla_kernel, MATE_DEVICE_TYPE, &mla_device);
MATE_REGISTER_KERNEL(mla_metadata_kernel, MATE_DEVICE_TYPE, &mla_metadata_device);

}  // namespace mate::device
