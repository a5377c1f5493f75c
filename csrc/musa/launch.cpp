// Torch-facing side of the device kernels: fills the kernel table (csrc/common/
// kernel_table.h) for CUDA (nvcc builds) or PrivateUse1 (MUSA builds). The op bodies in
// csrc/common have validated the arguments and allocated the outputs; these functions
// allocate scratch (split partials) and launch on the current stream. None synchronizes.
//
// Index contents (cu_seqlens, page tables, cache_seqlens) are the caller's duty on devices
// (checking them would need a device-to-host copy); docs/semantics.md says so.
#include <ATen/ATen.h>

#include <cstdlib>
#include <string>

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

// MATE_OPS_FMHA_SM90_SCHEDULE=static keeps the Hopper forward on its static tile schedule for
// every call (to compare with the dynamic one; fmha_sm90_uneven_tiles). Read once per process.
bool sm90_dynamic_schedule_allowed() {
  static const bool allowed = [] {
    const char* v = std::getenv("MATE_OPS_FMHA_SM90_SCHEDULE");
    return v == nullptr || std::string(v) != "static";
  }();
  return allowed;
}

void check_launch(arch::Error e, const char* what) {
  TORCH_CHECK(e == arch::kSuccess, what, " kernel launch failed: ", arch::error_string(e));
}

// FP8 q / k / v for the Hopper kernel (kernels.h: Fp8ToBf16View): when the call with bf16
// inputs would take it, converts q, k and v into one bf16 scratch tensor (exact) and points p
// at it, keeping the descales; the scratch must outlive the launch. Returns an undefined tensor
// (p unchanged) otherwise: those calls stay on the mma.sync kernel's fp8 tiles. The Hopper
// kernel on the copies is 3.7-5.1x that kernel at prefill sizes on the H200 (docs/
// performance.md), although the copies cost an extra read of the fp8 bytes, a write and read
// of twice as many, and a temporary allocation of that size.
at::Tensor fp8_staged_for_sm90(FmhaParams& p, const FmhaProblem& prob) {
  if (p.in_dtype != DType::kFloat8E4M3 || p.out_dtype != DType::kBFloat16 || p.num_splits > 1) return {};
  using sm90_view = Fp8ToBf16View;
  auto view = [](const void* src, int64_t bs, int64_t rs, int64_t hs, int batches, int rows, int heads, int dim) {
    sm90_view v;
    v.src = src;
    v.batch_stride = batches > 1 ? bs : 0;
    v.row_stride = rs;
    v.head_stride = hs;
    v.batches = batches;
    v.rows = rows;
    v.heads = heads;
    v.dim = dim;
    return v;
  };
  const bool q_ragged = p.q_is_ragged, k_ragged = p.k_is_ragged;
  sm90_view views[3] = {
      view(p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride, q_ragged ? 1 : p.batch,
           q_ragged ? p.total_q : p.seqlen_q, p.num_heads, p.head_dim),
      view(p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, k_ragged ? 1 : p.num_pages,
           k_ragged ? p.total_k : p.seqlen_k, p.num_heads_k, p.head_dim),
      view(p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, k_ragged ? 1 : p.num_pages,
           k_ragged ? p.total_k : p.seqlen_k, p.num_heads_k, p.head_dim_v)};
  // the conversion reads 8 bytes at a time, one batch per grid row, 32-bit indices in a batch
  auto convertible = [](const sm90_view& v) {
    return reinterpret_cast<uintptr_t>(v.src) % 8 == 0 && v.dim % 8 == 0 && v.batch_stride % 8 == 0 &&
           v.row_stride % 8 == 0 && v.head_stride % 8 == 0 && v.batches > 0 && v.batches <= 65535 && v.rows > 0 &&
           int64_t{v.rows} * v.heads * (v.dim / 8) <= INT32_MAX / 2;
  };
  if (p.page_table || p.qv || !convertible(views[0]) || !convertible(views[1]) || !convertible(views[2])) return {};
  // a kv cache (rows picked by cache_batch_idx, more rows than sequences, keys appended by
  // fmha_fwd_kvcache) would be converted whole on every call: a temporary copy twice the size
  // of what may be a server's entire cache. Those stay on the mma.sync kernel's fp8 tiles.
  if (p.cache_batch_idx || p.cu_seqlens_k_new || p.seqlen_k_new > 0 || (!p.k_is_ragged && p.num_pages != p.batch))
    return {};
  // the same call on contiguous bf16 copies (a stand-in 256-byte aligned address for the checks)
  FmhaParams s = p;
  s.in_dtype = DType::kBFloat16;
  void* const stand_in = reinterpret_cast<void*>(uintptr_t{256});
  const void** ptrs[3] = {&s.q, &s.k, &s.v};
  int64_t* strides[3][3] = {{&s.q_batch_stride, &s.q_row_stride, &s.q_head_stride},
                            {&s.k_batch_stride, &s.k_row_stride, &s.k_head_stride},
                            {&s.v_batch_stride, &s.v_row_stride, &s.v_head_stride}};
  int64_t offsets[4] = {0, 0, 0, 0};  // bf16 elements, each part 128-element (256-byte) aligned
  for (int i = 0; i < 3; ++i) {
    const sm90_view& v = views[i];
    *ptrs[i] = stand_in;
    *strides[i][2] = v.dim;
    *strides[i][1] = int64_t{v.heads} * v.dim;
    *strides[i][0] = (i == 0 ? q_ragged : k_ragged) ? 0 : int64_t{v.rows} * v.heads * v.dim;
    offsets[i + 1] = offsets[i] + (int64_t{v.batches} * v.rows * v.heads * v.dim + 127) / 128 * 128;
  }
  if (!fmha_sm90_takes(s, prob.max_seqlen_q)) return {};
  at::Tensor staged = at::empty({offsets[3]}, prob.scratch_options.dtype(at::kBFloat16));
  const arch::Stream stream = arch::current_stream();
  for (int i = 0; i < 3; ++i) {
    views[i].dst = static_cast<at::BFloat16*>(staged.data_ptr()) + offsets[i];
    *ptrs[i] = views[i].dst;
    check_launch(launch_fp8_to_bf16(views[i], stream), "fmha_fwd (fp8 to bf16)");
  }
  s.num_splits = 1;  // the Hopper kernel never splits; launch_fmha has no other kernel for these
  p = s;
  return staged;
}

// MATE_OPS_FMHA_FP8=bf16 keeps fp8 calls on the bf16 staging above, off the fp8 wgmma kernels
// (to compare the two). Read once per process.
bool fp8_wgmma_allowed() {
  static const bool allowed = [] {
    const char* v = std::getenv("MATE_OPS_FMHA_FP8");
    return v == nullptr || std::string(v) != "bf16";
  }();
  return allowed;
}

// FP8 q / k / v on the Hopper kernel's fp8 wgmma: q and k are read as they are; fp8 wgmma takes
// V only K-major (keys contiguous), so V is staged transposed into a scratch tensor, its keys
// permuted inside 16-key groups (kernels.h: Fp8VtView), and p points at it (v_t_keys). Returns
// an undefined tensor (p unchanged) when the call would not take those kernels: then the bf16
// staging (fp8_staged_for_sm90) or the mma.sync kernel's fp8 tiles serve it. The copy reads V's
// bytes once and writes as many, in place of the bf16 staging's read of q, k and v and write
// and read of twice their size.
at::Tensor fp8_vt_staged_for_sm90(FmhaParams& p, const FmhaProblem& prob) {
  if (!fp8_wgmma_allowed() || p.in_dtype != DType::kFloat8E4M3 || p.out_dtype != DType::kBFloat16 ||
      p.num_splits > 1 || p.page_table || p.qv)
    return {};
  // a kv cache is not staged whole on every call (as in fp8_staged_for_sm90)
  if (p.cache_batch_idx || p.cu_seqlens_k_new || p.seqlen_k_new > 0 || (!p.k_is_ragged && p.num_pages != p.batch))
    return {};
  Fp8VtView v;
  v.src = p.v;
  v.batches = p.k_is_ragged ? 1 : p.batch;
  v.rows = p.k_is_ragged ? p.total_k : p.seqlen_k;
  v.heads = p.num_heads_k;
  v.dim = p.head_dim_v;
  v.batch_stride = v.batches > 1 ? p.v_batch_stride : 0;
  v.row_stride = p.v_row_stride;
  v.head_stride = p.v_head_stride;
  const int64_t keys_pad = (int64_t{v.rows} + 15) / 16 * 16;
  // the staging kernel moves 4-byte words
  auto word = [](int64_t x) { return x % 4 == 0; };
  if (reinterpret_cast<uintptr_t>(v.src) % 4 != 0 || !word(v.batch_stride) || !word(v.row_stride) ||
      !word(v.head_stride) || !word(v.dim) || v.rows <= 0 || keys_pad > INT32_MAX || int64_t{v.batches} * v.heads > 65535)
    return {};
  v.keys_pad = static_cast<int>(keys_pad);
  // the same call on the staged V^T (a stand-in 256-byte aligned address for the checks)
  FmhaParams s = p;
  s.v = reinterpret_cast<void*>(uintptr_t{256});
  s.v_t_keys = v.keys_pad;
  s.v_row_stride = 1;
  s.v_head_stride = int64_t{v.dim} * keys_pad;
  s.v_batch_stride = v.batches > 1 ? int64_t{v.heads} * v.dim * keys_pad : 0;
  if (!fmha_sm90_takes(s, prob.max_seqlen_q)) return {};
  at::Tensor staged = at::empty({int64_t{v.batches} * v.heads * v.dim * keys_pad}, prob.scratch_options.dtype(at::kByte));
  v.dst = staged.data_ptr();
  s.v = v.dst;
  check_launch(launch_fp8_v_transpose(v, arch::current_stream()), "fmha_fwd (fp8 V transpose)");
  s.num_splits = 1;  // the Hopper kernel never splits; launch_fmha has no other kernel for a V^T
  p = s;
  return staged;
}

void fmha_device(const FmhaProblem& prob) {
  FmhaParams p = prob.params;
  at::Tensor fp8_staged = fp8_vt_staged_for_sm90(p, prob);
  if (!fp8_staged.defined()) fp8_staged = fp8_staged_for_sm90(p, prob);
  const int G = p.num_heads / p.num_heads_k;
  // The Hopper kernel keeps one 384-thread block per SM busy, so its split heuristic counts
  // SMs, not the mma.sync kernel's resident blocks (which would split long prefills needlessly
  // and send them off the Hopper kernel).
  const bool hopper = p.num_splits == 0 && fmha_sm90_takes(p, prob.max_seqlen_q);
  // The qv kernel (one 256-thread block per SM, 124 KB of shared memory) counts SMs likewise.
  const bool one_block_per_sm = hopper || qv_mma_fits(p);
  const int workers = one_block_per_sm ? imax(1, arch::multiprocessor_count()) : device_workers(0);
  int splits = resolve_num_splits(p.num_splits, p.batch, p.num_heads_k, prob.max_seqlen_q, G, prob.max_seqlen_k,
                                  workers);
  TORCH_CHECK(p.batch <= 65535, "the device kernels handle at most 65535 sequences per call, got ", p.batch);
  splits = imax(1, imin(splits, 65535 / imax(p.batch, 1)));
  FmhaSplitBuffers parts;
  parts.num_splits = splits;
  at::Tensor part_out, part_lse, tile_counter;
  if (splits == 1 && sm90_dynamic_schedule_allowed() && fmha_sm90_uneven_tiles(p) &&
      fmha_sm90_takes(p, prob.max_seqlen_q)) {
    tile_counter = at::zeros({1}, prob.scratch_options.dtype(at::kLong));
    parts.tile_counter = reinterpret_cast<unsigned long long*>(tile_counter.data_ptr<int64_t>());
  }
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
