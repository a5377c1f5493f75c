// The per-device kernel table (ATen's DispatchStub idea, small): every op body in
// csrc/common calls its kernels through a stub declared here, and a backend fills the
// stubs with one line per kernel:
//
//   MATE_REGISTER_KERNEL(fmha_kernel, CPU, &fmha_cpu);
//
// A new backend is one file of such lines plus one TORCH_LIBRARY_IMPL that registers the
// op bodies of the families it serves for its dispatch key (see csrc/registration.cpp).
#pragma once

#include <ATen/ATen.h>

namespace mate {

struct FmhaProblem;
struct CombineParams;
struct FmhaBwdParams;
struct AppendParams;
struct RotaryApplyParams;
struct MlaParams;
struct MlaMetadataParams;

template <typename Fn>
class KernelStub {
 public:
  // constexpr: a stub is constant-initialized, so backends may fill it from static
  // initializers of any translation unit.
  constexpr explicit KernelStub(const char* name) : name_(name) {}

  void set(c10::DeviceType device, Fn* fn) { fns_[slot(device)] = fn; }
  bool has(c10::DeviceType device) const { return fns_[slot(device)] != nullptr; }
  Fn* get(c10::DeviceType device) const {
    Fn* fn = fns_[slot(device)];
    TORCH_CHECK(fn, "mate: there is no ", name_, " for ", device, " tensors in this build");
    return fn;
  }

 private:
  static constexpr int slot(c10::DeviceType device) {
    return device == c10::DeviceType::CPU ? 0 : device == c10::DeviceType::CUDA ? 1
         : device == c10::DeviceType::PrivateUse1 ? 2 : 3;  // 3: never filled
  }
  const char* name_;
  Fn* fns_[4] = {};
};

#define MATE_REGISTER_KERNEL(stub, device, fn)                                   \
  static const bool mate_registered_##stub = (::mate::stub.set(c10::DeviceType::device, fn), true)

// ---- the kernels ---------------------------------------------------------------
// FMHA forward (also the attention step of fmha_fwd_kvcache): writes out / lse.
extern KernelStub<void(const FmhaProblem&)> fmha_kernel;
// FMHA backward: writes dq / dk / dv (and dsink) from the saved forward outputs.
extern KernelStub<void(const FmhaBwdParams&)> fmha_bwd_kernel;
// Split-KV combine.
extern KernelStub<void(const CombineParams&)> combine_kernel;
// In-place append of new keys/values (keys rotated when the params carry rotary tables).
extern KernelStub<void(const AppendParams&)> append_kernel;
// Rotary embedding of a query-like tensor into p.out.
extern KernelStub<void(const RotaryApplyParams&)> rotary_kernel;
// Parallel workers the split heuristics schedule for (threads on the CPU, resident
// blocks on a GPU), minus a margin of multiprocessors a caller keeps free.
extern KernelStub<int(int sm_margin)> num_workers_kernel;
// Workers get_mla_metadata schedules over (threads on the CPU, multiprocessors on a GPU).
extern KernelStub<int()> mla_workers_kernel;
// MLA decode / sparse prefill (one kernel: prefill is a decode of single-row queries).
extern KernelStub<void(const MlaParams&)> mla_kernel;
// MLA tile-scheduler metadata.
extern KernelStub<void(const MlaMetadataParams&)> mla_metadata_kernel;

}  // namespace mate
