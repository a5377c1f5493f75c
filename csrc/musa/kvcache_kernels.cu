// Device kernels of the kv-cache family (kvcache_append, rotary_embedding), written once
// for CUDA and MUSA. Torch-free; the math (positions, pairs, cache offsets) comes from
// csrc/common/kvcache_params.h, shared with the CPU reference.
#include "../common/dtype_convert.h"
#include "kernels.h"

namespace mate::device {
namespace {

constexpr int kThreads = 128;

__device__ __forceinline__ int element_size(DType dt) {
  return dt == DType::kFloat32 ? 4 : (dt == DType::kFloat8E4M3 ? 1 : 2);
}

__device__ __forceinline__ void copy_element(void* dst, int64_t di, const void* src, int64_t si, int es) {
  if (es == 4) static_cast<uint32_t*>(dst)[di] = static_cast<const uint32_t*>(src)[si];
  else if (es == 2) static_cast<uint16_t*>(dst)[di] = static_cast<const uint16_t*>(src)[si];
  else static_cast<uint8_t*>(dst)[di] = static_cast<const uint8_t*>(src)[si];
}

// Channel c of a head vector `x` (element offset xo) after rotation at position pos, in fp32
// (float8 vectors rotate with fp32/fp16/bf16 tables; store_float rounds back to float8).
__device__ __forceinline__ float rotated(const void* x, int64_t xo, DType dt, int c, const RotaryParams& r, int pos) {
  const int half = r.rotary_dim / 2;
  const int m = r.interleaved ? c / 2 : (c < half ? c : c - half);
  int c1, c2;
  rotary_pair(m, r.rotary_dim, r.interleaved, c1, c2);
  const float cs = load_float(r.cos, pos * r.cos_row_stride + m, r.table_dtype);
  const float sn = load_float(r.sin, pos * r.sin_row_stride + m, r.table_dtype);
  float y1, y2;
  rotate(load_float(x, xo + c1, dt), load_float(x, xo + c2, dt), cs, sn, y1, y2);
  return c == c1 ? y1 : y2;
}

// One block per (new key t, sequence b): all heads and channels of that key.
__global__ void __launch_bounds__(kThreads) append_kernel(AppendParams p) {
  const int t = blockIdx.x, b = blockIdx.y;
  if (t >= new_len(p, b)) return;
  const int pos = p.cache_seqlens[b] + t;
  const int rot_pos = (p.rotary_seqlens ? p.rotary_seqlens[b] : p.cache_seqlens[b]) + t;
  const int64_t src_row = p.cu_seqlens_k_new ? p.cu_seqlens_k_new[b] + t : t;
  const int64_t kc0 = cache_offset(p, b, pos, p.kc_batch_stride, p.kc_row_stride);
  const int64_t vc0 = cache_offset(p, b, pos, p.vc_batch_stride, p.vc_row_stride);
  const int64_t k0 = b * p.k_batch_stride + src_row * p.k_row_stride;
  const int64_t v0 = b * p.v_batch_stride + src_row * p.v_row_stride;
  const int es = element_size(p.dtype);
  for (int idx = threadIdx.x; idx < p.heads_k * p.head_dim; idx += kThreads) {
    const int h = idx / p.head_dim, c = idx % p.head_dim;
    const int64_t so = k0 + h * p.k_head_stride, dO = kc0 + h * p.kc_head_stride;
    if (c < p.rotary.rotary_dim) store_float(p.k_cache, dO + c, p.dtype, rotated(p.k, so, p.dtype, c, p.rotary, rot_pos));
    else copy_element(p.k_cache, dO + c, p.k, so + c, es);
  }
  for (int idx = threadIdx.x; idx < p.heads_k * p.head_dim_v; idx += kThreads) {
    const int h = idx / p.head_dim_v, c = idx % p.head_dim_v;
    copy_element(p.v_cache, vc0 + h * p.vc_head_stride + c, p.v, v0 + h * p.v_head_stride + c, es);
  }
}

// One block per (row t, sequence b): all heads of that row.
__global__ void __launch_bounds__(kThreads) rotary_kernel(RotaryApplyParams p) {
  const int t = blockIdx.x, b = blockIdx.y;
  const int len = p.cu_seqlens ? p.cu_seqlens[b + 1] - p.cu_seqlens[b] : p.seqlen;
  if (t >= len) return;
  const int64_t row = (p.cu_seqlens ? p.cu_seqlens[b] : 0) + t;
  const int pos = p.seqlen_offsets[b] + (p.positions_per_row ? t : 0);
  const int es = element_size(p.dtype);
  for (int idx = threadIdx.x; idx < p.heads * p.head_dim; idx += kThreads) {
    const int h = idx / p.head_dim, c = idx % p.head_dim;
    const int64_t xo = b * p.x_batch_stride + row * p.x_row_stride + h * p.x_head_stride;
    const int64_t oo = b * p.o_batch_stride + row * p.o_row_stride + h * p.o_head_stride;
    if (c < p.rotary.rotary_dim) store_float(p.out, oo + c, p.dtype, rotated(p.x, xo, p.dtype, c, p.rotary, pos));
    else copy_element(p.out, oo + c, p.x, xo + c, es);
  }
}

}  // namespace

arch::Error launch_kvcache_append(const AppendParams& p, int max_new, arch::Stream stream) {
  if (p.batch > 0 && max_new > 0) append_kernel<<<dim3(max_new, p.batch), kThreads, 0, stream>>>(p);
  return arch::last_error();
}

arch::Error launch_rotary(const RotaryApplyParams& p, int max_rows, arch::Stream stream) {
  if (p.batch > 0 && max_rows > 0) rotary_kernel<<<dim3(max_rows, p.batch), kThreads, 0, stream>>>(p);
  return arch::last_error();
}

}  // namespace mate::device
