// The op bodies, written once for every backend (csrc/common/*_ops.cpp). Each body does
// checks -> defaults -> allocation -> parameter struct -> a call through the kernel
// table (kernel_table.h). A backend registers the bodies of the families it has kernels
// for under its dispatch key, one line per family (csrc/registration.cpp).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

namespace mate {

// fmha_fwd, fmha_fwd_out, fmha_fwd_kvcache, fmha_combine(_out), get_scheduler_metadata.
void register_fmha_ops(torch::Library& m);
// fmha_bwd: registered by backends that have an FMHA backward kernel (CPU, CUDA).
void register_fmha_bwd_ops(torch::Library& m);
// kvcache_append, rotary_embedding.
void register_kvcache_ops(torch::Library& m);
// get_mla_metadata, mla_decode, mla_sparse_prefill.
void register_mla_ops(torch::Library& m);
// Autograd of the forward-only functional ops: their backward raises NotImplementedError
// naming the reason. fmha_fwd's autograd is registered in Python (mate_ops/_autograd.py).
void register_forward_only_autograd(torch::Library& m);

// An op body as a boxed kernel (it reads its arguments by name, see op_args.h).
template <void (*Body)(const c10::OperatorHandle&, torch::jit::Stack*)>
torch::CppFunction boxed() {
  return torch::CppFunction::makeFromBoxedFunction<Body>();
}

// Makes `t`'s device current for the op's allocations and launches (no-op on the CPU).
class DeviceScope {
 public:
  explicit DeviceScope(const at::Tensor& t) {
    if (!t.is_cpu()) guard_.reset_device(t.device());
  }

 private:
  c10::OptionalDeviceGuard guard_;
};

}  // namespace mate
