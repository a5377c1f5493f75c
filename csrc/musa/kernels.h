// Host entry points of the device kernels. Torch-free: launch.cpp (the torch-facing
// launcher) fills the parameter structs and calls these with the current stream.
// Every function returns the launch error (kSuccess when fine); none synchronizes.
#pragma once

#include "../common/fmha_params.h"
#include "../common/kvcache_params.h"
#include "../common/mla_params.h"
#include "arch/device.h"

namespace mate::device {

// Split-KV partial results of fmha when num_splits > 1: (splits, total_q, H, Dv) / (splits, total_q, H).
struct FmhaSplitBuffers {
  float* out = nullptr;
  float* lse = nullptr;
  int num_splits = 1;
  // one zeroed 64-bit word for the Hopper kernel's dynamic tile schedule (launch.cpp gives
  // one when fmha_sm90_uneven_tiles); null: its static schedule
  unsigned long long* tile_counter = nullptr;
};

// max_rows: an upper bound of any sequence's query rows (grid size; rows beyond a
// sequence's length exit at once).
arch::Error launch_fmha(const FmhaParams& p, const FmhaSplitBuffers& splits, int max_rows, arch::Stream stream);

// The tensor-core FMHA path (arch/sm80/fmha_mma.cu): bf16/fp16, D and Dv multiples of 8 up to 256
// (padded inside the kernel to the 64, 128, 192 x 128 or 256 tile widths), no qv, 16-byte
// aligned rows. launch_fmha uses it when mma_path_fits; the launch writes what
// the portable kernels would (partials when splits.num_splits > 1; the caller merges).
bool mma_path_fits(const FmhaParams& p);
arch::Error launch_fmha_mma(const FmhaParams& p, const FmhaSplitBuffers& splits, int max_rows, arch::Stream stream);
// Its qv form (arch/sm80/fmha_qv_mma.cu): bf16/fp16 with qv, D up to 64 and Dv up to 512
// (padded inside the kernel), 16-byte aligned rows; the same outputs and partials.
bool qv_mma_fits(const FmhaParams& p);
arch::Error launch_fmha_qv_mma(const FmhaParams& p, const FmhaSplitBuffers& splits, int max_rows,
                               arch::Stream stream);

// FMHA backward (fmha_bwd_kernels.cu): scratch of total_q * H floats each, indexed
// [global row * H + head]: the base-2 lse (+inf for a row without keys) and delta =
// rowsum(dO * O) - dlse. dq / dk / dv must be zero-filled (rows no sequence uses stay 0).
struct FmhaBwdScratch {
  float* lse2 = nullptr;
  float* delta = nullptr;
};
arch::Error launch_fmha_bwd(const FmhaBwdParams& g, const FmhaBwdScratch& rows, arch::Stream stream);
// Its tensor-core kernels (arch/sm80/fmha_bwd_mma.cu): bf16/fp16 with dout in the same dtype,
// D and Dv multiples of 8 up to 256, 16-byte aligned rows.
bool fmha_bwd_mma_fits(const FmhaBwdParams& g);
arch::Error launch_fmha_bwd_mma(const FmhaBwdParams& g, const FmhaBwdScratch& rows, arch::Stream stream);
// Its Hopper kernels (arch/sm90/fmha_bwd_sm90.cuh: CuTe, TMA + wgmma; built with MATE_WITH_SM90):
// bf16/fp16 with dout in the same dtype, D and Dv multiples of 8 up to 256, dense or ragged
// q/k/v, 16-byte aligned bases and strides. launch_fmha_bwd takes it on a compute capability 9.0
// device for every call it serves (MATE_OPS_FMHA_BWD_PATH=sm80: never). Writes what
// launch_fmha_bwd_mma writes (steps 2 and 3; step 1 runs before either).
bool fmha_bwd_sm90_fits(const FmhaBwdParams& g);
arch::Error launch_fmha_bwd_sm90(const FmhaBwdParams& g, const FmhaBwdScratch& rows, arch::Stream stream);

// The Hopper path (arch/sm90: CuTe, TMA + wgmma), built when setup.py finds the CUTLASS
// headers (MATE_WITH_SM90). launch_fmha takes it on a compute capability 9.0 device for calls
// without splits that it serves and that fill a 128-row tile (MATE_OPS_FMHA_PATH: sm90 for
// every call it serves, sm80 for none; fmha_kernels.cu). Writes what the mma.sync path writes.
bool fmha_sm90_fits(const FmhaParams& p);
// Would launch_fmha take the Hopper kernel for p (route, device and fits), given one split?
bool fmha_sm90_takes(const FmhaParams& p, int max_rows);
arch::Error launch_fmha_sm90(const FmhaParams& p, int max_rows, unsigned long long* tile_counter, arch::Stream stream);
// Do the Hopper kernel's work tiles differ in weight (causal / local masks, ragged or seqused
// lengths)? Then a dynamic schedule balances them (a zeroed tile_counter).
bool fmha_sm90_uneven_tiles(const FmhaParams& p);

// FP8 inputs on the Hopper kernel (launch.cpp: fp8_staged_for_sm90): q, k and v are first
// converted to bf16 -- exact, every e4m3 value is a bf16 value -- into contiguous buffers, and
// the Hopper kernel runs on those with the descales still in the parameters (applied to the
// logits and the output as the mma.sync kernel applies them). One view is (batches, rows,
// heads, dim) of e4m3 bytes, element strides, dim a multiple of 8, every stride and the base
// 8-byte aligned; dst is the same view contiguous in bf16.
struct Fp8ToBf16View {
  const void* src = nullptr;
  int64_t batch_stride = 0, row_stride = 0, head_stride = 0;
  int batches = 0, rows = 0, heads = 0, dim = 0;
  void* dst = nullptr;
};
arch::Error launch_fp8_to_bf16(const Fp8ToBf16View& v, arch::Stream stream);

// FP8 on the Hopper kernel's fp8 wgmma (launch.cpp: fp8_vt_staged_for_sm90): q and k are read as
// they are; V is staged transposed, dst = (batches, heads, dim, keys_pad) e4m3 with keys
// contiguous and permuted inside every 16-key group (arch/sm90/fp8_pv_order.h), keys past `rows`
// zero. src as in Fp8ToBf16View: (batches, rows, heads, dim), element strides; dim and every
// stride a multiple of 4, the base 4-byte aligned; keys_pad a multiple of 16 >= rows.
struct Fp8VtView {
  const void* src = nullptr;
  int64_t batch_stride = 0, row_stride = 0, head_stride = 0;
  int batches = 0, rows = 0, heads = 0, dim = 0, keys_pad = 0;
  void* dst = nullptr;
};
arch::Error launch_fp8_v_transpose(const Fp8VtView& v, arch::Stream stream);

arch::Error launch_combine(const CombineParams& c, arch::Stream stream);

// max_new: an upper bound of any sequence's new keys.
arch::Error launch_kvcache_append(const AppendParams& p, int max_new, arch::Stream stream);

// max_rows: an upper bound of any sequence's rows.
arch::Error launch_rotary(const RotaryApplyParams& p, int max_rows, arch::Stream stream);

// ---- MLA (mla_kernels.cu) ----
// Query rows of one kv head per schedule sequence (dense: seqlen_q * G; sparse: G) and the
// number of sequences (dense: batch; sparse: batch * seqlen_q, each row its own indices).
int mla_rows_per_sequence(const MlaParams& p);
int mla_sequences(const MlaParams& p);
// Schedule parts for the fast kernel: as many blocks as the multiprocessors hold at once.
int mla_fast_parts(const MlaParams& p, int multiprocessors);
// The tensor-core path: bf16 (any cache format) or fp16 (fp16 cache) q, head_dim 576 or 512,
// head_dim_v <= 512 and even, 16-byte aligned q rows and cache tokens.
bool mla_mma_fits(const MlaParams& p);

// The Hopper MLA decode kernel (arch/sm90/mla_decode_sm90.cu: CuTe, TMA + wgmma; built with
// MATE_WITH_SM90), default on compute capability 9.0 from 64 query rows per kv head
// (MATE_OPS_MLA_PATH=sm80: never, =sm90: every call it serves): dense decode with bf16 q and a bf16
// paged cache, head dims 576 / 512, page size a multiple of 64, Hq / Hkv a multiple of 16,
// TMA-aligned tensors. mla_sm90_takes: the route is on, the device has compute capability 9.0
// and the kernel fits p; mla_fast_parts and launch_mla_fast then size and run it.
bool mla_sm90_fits(const MlaParams& p);
bool mla_sm90_takes(const MlaParams& p);

// get_mla_metadata's schedule in a one-thread kernel (metadata in device memory).
arch::Error launch_mla_schedule(const MlaMetadataParams& m, arch::Stream stream);

// The fast path's split buffers: the schedule (parts rows, from launch_mla_schedule) and fp32
// partials for 2 * parts pieces: out (2 parts, rows_all, Dv), lse and max logits
// (2 parts, rows_all), rows_all = seqlen_q * Hq (dense) or Hq (sparse).
struct MlaSplitBuffers {
  const int32_t* metadata = nullptr;
  int parts = 1;
  float* out = nullptr;
  float* lse = nullptr;
  float* max_logit = nullptr;
};
arch::Error launch_mla_fast(const MlaParams& p, const MlaSplitBuffers& split, arch::Stream stream);
// Every MLA problem, on CUDA cores, without splits.
arch::Error launch_mla_portable(const MlaParams& p, arch::Stream stream);

}  // namespace mate::device
