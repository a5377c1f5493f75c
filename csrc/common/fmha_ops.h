// The bodies of the FMHA-family ops, written once for every backend: validate, allocate,
// point the parameters at the outputs, then call the backend's runner
//   run_fmha(FmhaProblem&, const FmhaInputs&) / run_combine(const CombineParams&).
// csrc/cpu_ref and csrc/musa only supply runners (and a device guard).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "fmha_checks.h"

namespace mate {

template <typename Run>
std::tuple<at::Tensor, at::Tensor> fmha_fwd_op(Run run, const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v, MATE_FMHA_ARGS,
                                               std::optional<at::ScalarType> out_dtype,
                                               const std::optional<at::Tensor>& alibi_slopes) {
  FmhaInputs in = make_fmha_inputs(q, k, v, MATE_FMHA_ARG_NAMES);
  in.out_dtype = out_dtype;
  in.alibi_slopes = alibi_slopes;
  FmhaProblem prob = check_fmha_inputs(in);
  at::Tensor out = at::empty(prob.out_shape, q.options().dtype(prob.out_dtype));
  at::Tensor lse = at::empty(prob.lse_shape, q.options().dtype(at::kFloat));
  set_fmha_outputs(prob, out, lse);
  run(prob, in);
  return {out, lse};
}

template <typename Run>
void fmha_fwd_out_op(Run run, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& out, const at::Tensor& lse, MATE_FMHA_ARGS,
                     const std::optional<at::Tensor>& alibi_slopes) {
  FmhaInputs in = make_fmha_inputs(q, k, v, MATE_FMHA_ARG_NAMES);
  in.out_dtype = out.scalar_type();
  in.alibi_slopes = alibi_slopes;
  FmhaProblem prob = check_fmha_inputs(in);
  TORCH_CHECK(out.device() == q.device(), "out must be on the device of q");
  set_fmha_outputs(prob, out, lse);
  run(prob, in);
}

template <typename Run>
std::tuple<at::Tensor, at::Tensor> fmha_combine_op(Run run, const at::Tensor& out_partial,
                                                   const at::Tensor& lse_partial,
                                                   std::optional<at::ScalarType> out_dtype) {
  CombineProblem prob = check_combine_inputs(out_partial, lse_partial, out_dtype);
  at::Tensor out = at::empty(prob.out_shape, out_partial.options().dtype(prob.out_dtype));
  at::Tensor lse = at::empty(prob.lse_shape, out_partial.options());
  set_combine_outputs(prob, out, lse);
  run(prob.params);
  return {out, lse};
}

template <typename Run>
void fmha_combine_out_op(Run run, const at::Tensor& out_partial, const at::Tensor& lse_partial,
                         const at::Tensor& out, const at::Tensor& lse) {
  CombineProblem prob = check_combine_inputs(out_partial, lse_partial, out.scalar_type());
  set_combine_outputs(prob, out, lse);
  run(prob.params);
}

}  // namespace mate
