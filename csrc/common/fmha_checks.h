// Argument checking for the FMHA family, written once for every backend.
// check_fmha_inputs validates shapes/dtypes/devices and builds the FmhaParams
// the CPU and device kernels read; check_fmha_index_values validates the
// contents of index tensors (host-side; the CPU reference always calls it).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "fmha_params.h"

namespace mate {

class OpArgs;

// Validated parameters plus tensors the params point into (kept alive here): what an
// fmha kernel (kernel_table.h) gets.
struct FmhaProblem {
  FmhaParams params;
  at::ScalarType out_dtype;
  std::vector<int64_t> out_shape, lse_shape;
  // Upper bounds of any sequence's query rows / keys from shapes and hints only (no
  // device read): grid sizes and split heuristics of the device kernels.
  int max_seqlen_q = 0, max_seqlen_k = 0;
  at::TensorOptions scratch_options;  // fp32 on the op's device (split buffers)
  at::Tensor sink_f32;                // learnable_sink as contiguous fp32
};

// The tensors of an attention call and the names the op's schema gives them (fmha_fwd:
// k / v / seqused_k; fmha_fwd_kvcache: k_cache / v_cache / cache_seqlens).
struct FmhaTensors {
  const at::Tensor& q;
  const at::Tensor& k;
  const at::Tensor& v;
  std::optional<at::Tensor> seqused_k;
  std::optional<at::ScalarType> out_dtype;
  const char* k_name = "k";
  const char* v_name = "v";
  const char* seqused_k_name = "seqused_k";
};

// Validates an attention call and builds its parameters; the remaining options are read
// from `args` by their schema names (see op_args.h).
FmhaProblem check_fmha_inputs(const OpArgs& args, const FmhaTensors& tensors);

// Checks a caller's out / lse against the problem and points the params at them.
void set_fmha_outputs(FmhaProblem& prob, const at::Tensor& out, const at::Tensor& lse);

// Host-side range checks of cu_seqlens / seqused / page_table / cache indices.
// Requires the index tensors to be readable on the host (CPU tensors).
void check_fmha_index_values(const FmhaParams& p);

DType to_dtype(at::ScalarType t);

// The backward of one attention call: the forward's problem (out / lse point at the saved
// forward outputs) and the backward's parameters. Gradient outputs are set by the op body.
struct FmhaBwdProblem {
  FmhaProblem fwd;
  FmhaBwdParams params;
  at::Tensor dlse;  // contiguous fp32 copy of the incoming lse gradient, if any
};

// Validates fmha_bwd's arguments: everything fmha_fwd checks (the same code), the saved out /
// lse and the incoming gradients; forward-only features raise, naming the reason.
FmhaBwdProblem check_fmha_bwd_inputs(const OpArgs& args);

// Host-side: the index checks of the forward, plus the backward's own rule that every
// sequence's keys lie in its own cu_seqlens_k segment (its dk / dv rows are written by it alone).
void check_fmha_bwd_index_values(const FmhaBwdParams& p);

// Points the backward at its (contiguous) gradient outputs.
void set_fmha_bwd_outputs(FmhaBwdProblem& prob, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                          const at::Tensor& dsink);

// Combine: out_partial (S, ..., Dv) fp32, lse_partial (S, ...) fp32.
struct CombineProblem {
  CombineParams params;
  at::ScalarType out_dtype;
  std::vector<int64_t> out_shape, lse_shape;
  at::Tensor out_partial, lse_partial;  // (S, rows, Dv) / (S, rows) views or copies
};
CombineProblem check_combine_inputs(const at::Tensor& out_partial, const at::Tensor& lse_partial,
                                    std::optional<at::ScalarType> out_dtype);
void set_combine_outputs(CombineProblem& prob, const at::Tensor& out, const at::Tensor& lse);

constexpr int kMaxHeadDim = 512;
constexpr int kMaxSplits = 256;

}  // namespace mate
