#include "check_utils.h"

namespace mate {

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                       const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name, " (",
              ref.device(), "), got ", t.device());
}

void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() >= 1, name, " must have at least one dimension");
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, name,
              " must have a contiguous last dimension (stride 1), got stride ", t.stride(-1));
}

void check_int32_vector(const std::optional<at::Tensor>& t, const char* name, int64_t len,
                        const at::Tensor& ref, const char* ref_name) {
  if (!t) return;
  TORCH_CHECK(t->scalar_type() == at::kInt, name, " must be int32, got ", t->scalar_type());
  TORCH_CHECK(t->dim() == 1, name, " must be 1-D, got shape ", t->sizes());
  TORCH_CHECK(len < 0 || t->size(0) == len, name, " must have ", len, " entries, got ",
              t->size(0));
  TORCH_CHECK(t->is_contiguous(), name, " must be contiguous");
  check_same_device(*t, ref, name, ref_name);
}

void check_int_range(int64_t value, int64_t lo, const char* name) {
  TORCH_CHECK(value >= lo && value <= INT32_MAX, name, " must be in [", lo, ", 2^31 - 1], got ",
              value);
}

}  // namespace mate
