#include "kernel_table.h"

namespace mate {

// The constexpr constructor makes these constant-initialized: they exist before any
// backend's static MATE_REGISTER_KERNEL runs, whatever the order of translation units.
KernelStub<void(const FmhaProblem&)> fmha_kernel("FMHA kernel");
KernelStub<void(const FmhaBwdParams&)> fmha_bwd_kernel("FMHA backward kernel");
KernelStub<void(const CombineParams&)> combine_kernel("split-KV combine kernel");
KernelStub<void(const AppendParams&)> append_kernel("kv-cache append kernel");
KernelStub<void(const RotaryApplyParams&)> rotary_kernel("rotary embedding kernel");
KernelStub<int(int)> num_workers_kernel("worker count");
KernelStub<int()> mla_workers_kernel("MLA worker count");
KernelStub<void(const MlaParams&)> mla_kernel("MLA kernel");
KernelStub<void(const MlaMetadataParams&)> mla_metadata_kernel("MLA metadata kernel");

}  // namespace mate
