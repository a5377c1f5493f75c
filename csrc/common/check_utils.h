// Small argument checks shared by every op family's checking code.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace mate {

// t must live on the device of `ref` (named ref_name in the message).
void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                       const char* ref_name = "q");

void check_last_dim_contiguous(const at::Tensor& t, const char* name);

// An int32 contiguous vector of `len` entries (len < 0: any length) on ref's device.
void check_int32_vector(const std::optional<at::Tensor>& t, const char* name, int64_t len,
                        const at::Tensor& ref, const char* ref_name = "q");

// Integer options are int64 in the schemas and int in the kernels: refuse what does not fit.
void check_int_range(int64_t value, int64_t lo, const char* name);

inline const int32_t* int_ptr(const std::optional<at::Tensor>& t) {
  return t ? t->data_ptr<int32_t>() : nullptr;
}

}  // namespace mate
