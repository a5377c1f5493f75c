// CPU reference kernels of the kv-cache family: append (in-place write of new keys/values
// into a dense or paged cache, keys optionally rotated) and rotary embedding.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>

#include <cstring>

#include "../common/dtype_convert.h"
#include "../common/kernel_table.h"
#include "../common/kvcache_params.h"

namespace mate::cpu {
namespace {

// Rotates the first rotary_dim channels of one head vector at `pos` in fp32 and stores them
// in the vector's dtype (float8 included); the rest is copied.
template <typename T>
void rotate_head(T* dst, const T* src, int head_dim, const RotaryParams& r, int pos, DType dt) {
  if (r.rotary_dim == 0 || dst != src) std::memcpy(dst, src, head_dim * sizeof(T));
  if (r.rotary_dim == 0) return;
  for (int m = 0; m < r.rotary_dim / 2; ++m) {
    int c1, c2;
    rotary_pair(m, r.rotary_dim, r.interleaved, c1, c2);
    float y1, y2;
    rotate(load_float(src, c1, dt), load_float(src, c2, dt), load_float(r.cos, pos * r.cos_row_stride + m, r.table_dtype),
           load_float(r.sin, pos * r.sin_row_stride + m, r.table_dtype), y1, y2);
    store_float(dst, c1, dt, y1);
    store_float(dst, c2, dt, y2);
  }
}

template <typename T>
void run_append(const AppendParams& p) {
  // One task per (sequence, new key); writes of different tasks never overlap unless
  // cache_batch_idx repeats a row (documented: which write wins is undefined).
  std::vector<int64_t> first(p.batch + 1, 0);
  for (int b = 0; b < p.batch; ++b) first[b + 1] = first[b] + new_len(p, b);
  at::parallel_for(0, first[p.batch], 64, [&](int64_t i0, int64_t i1) {
    int b = static_cast<int>(std::upper_bound(first.begin(), first.end(), i0) - first.begin()) - 1;
    for (int64_t i = i0; i < i1; ++i) {
      while (i >= first[b + 1]) ++b;
      const int t = static_cast<int>(i - first[b]);
      const int pos = p.cache_seqlens[b] + t;
      const int rot_pos = (p.rotary_seqlens ? p.rotary_seqlens[b] : p.cache_seqlens[b]) + t;
      const int64_t src_row = p.cu_seqlens_k_new ? p.cu_seqlens_k_new[b] + t : t;
      T* kc = static_cast<T*>(p.k_cache) + cache_offset(p, b, pos, p.kc_batch_stride, p.kc_row_stride);
      T* vc = static_cast<T*>(p.v_cache) + cache_offset(p, b, pos, p.vc_batch_stride, p.vc_row_stride);
      const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + src_row * p.k_row_stride;
      const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + src_row * p.v_row_stride;
      for (int h = 0; h < p.heads_k; ++h) {
        rotate_head(kc + h * p.kc_head_stride, k + h * p.k_head_stride, p.head_dim, p.rotary, rot_pos, p.dtype);
        std::memcpy(vc + h * p.vc_head_stride, v + h * p.v_head_stride, p.head_dim_v * sizeof(T));
      }
    }
  });
}

void append_cpu(const AppendParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return run_append<float>(p);
    case DType::kFloat16: return run_append<c10::Half>(p);
    case DType::kBFloat16: return run_append<c10::BFloat16>(p);
    case DType::kFloat8E4M3: return run_append<c10::Float8_e4m3fn>(p);
  }
}

template <typename T>
void run_rotary(const RotaryApplyParams& p) {
  at::parallel_for(0, p.batch, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t row0 = p.cu_seqlens ? p.cu_seqlens[b] : 0;
      const int len = p.cu_seqlens ? p.cu_seqlens[b + 1] - p.cu_seqlens[b] : p.seqlen;
      for (int t = 0; t < len; ++t) {
        const int pos = p.seqlen_offsets[b] + (p.positions_per_row ? t : 0);
        const T* x = static_cast<const T*>(p.x) + b * p.x_batch_stride + (row0 + t) * p.x_row_stride;
        T* o = static_cast<T*>(p.out) + b * p.o_batch_stride + (row0 + t) * p.o_row_stride;
        for (int h = 0; h < p.heads; ++h)
          rotate_head(o + h * p.o_head_stride, x + h * p.x_head_stride, p.head_dim, p.rotary, pos, p.dtype);
      }
    }
  });
}

void rotary_cpu(const RotaryApplyParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return run_rotary<float>(p);
    case DType::kFloat16: return run_rotary<c10::Half>(p);
    case DType::kBFloat16: return run_rotary<c10::BFloat16>(p);
    case DType::kFloat8E4M3: return run_rotary<c10::Float8_e4m3fn>(p);
  }
}

}  // namespace

MATE_REGISTER_KERNEL(append_kernel, CPU, &append_cpu);
MATE_REGISTER_KERNEL(rotary_kernel, CPU, &rotary_cpu);

}  // namespace mate::cpu
