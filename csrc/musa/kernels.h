// Host entry points of the device kernels. Torch-free: launch.cpp (the torch-facing
// launcher) fills the parameter structs and calls these with the current stream.
// Every function returns the launch error (kSuccess when fine); none synchronizes.
#pragma once

#include "../common/fmha_params.h"
#include "../common/kvcache_params.h"
#include "arch/device.h"

namespace mate::device {

// Split-KV partial results of fmha when num_splits > 1: (splits, total_q, H, Dv) / (splits, total_q, H).
struct FmhaSplitBuffers {
  float* out = nullptr;
  float* lse = nullptr;
  int num_splits = 1;
};

// max_rows: an upper bound of any sequence's query rows (grid size; rows beyond a
// sequence's length exit at once).
arch::Error launch_fmha(const FmhaParams& p, const FmhaSplitBuffers& splits, int max_rows, arch::Stream stream);

// The tensor-core FMHA path (fmha_mma.cu): bf16/fp16, D = Dv in {64, 128, 256}, no qv,
// 16-byte aligned rows. launch_fmha uses it when mma_path_fits; the launch writes what
// the portable kernels would (partials when splits.num_splits > 1; the caller merges).
bool mma_path_fits(const FmhaParams& p);
arch::Error launch_fmha_mma(const FmhaParams& p, const FmhaSplitBuffers& splits, int max_rows, arch::Stream stream);

arch::Error launch_combine(const CombineParams& c, arch::Stream stream);

// max_new: an upper bound of any sequence's new keys.
arch::Error launch_kvcache_append(const AppendParams& p, int max_new, arch::Stream stream);

// max_rows: an upper bound of any sequence's rows.
arch::Error launch_rotary(const RotaryApplyParams& p, int max_rows, arch::Stream stream);

}  // namespace mate::device
