// The vendor layer of the device kernels: everything CUDA- or MUSA-specific lives here
// (runtime header, stream type, warp size and shuffles, launch checks). The kernels
// in csrc/musa/*.cu use only these names, so the same sources build with nvcc for
// NVIDIA GPUs and with mcc (torch_musa's MUSAExtension) for Moore Threads GPUs.
#pragma once

#include <atomic>
#include <cstdint>

#if defined(__MUSACC__) || defined(MATE_WITH_MUSA)
#include <musa_runtime.h>
namespace mate::arch {
using Stream = musaStream_t;
using Error = musaError_t;
inline constexpr Error kSuccess = musaSuccess;
inline constexpr Error kInvalidValue = musaErrorInvalidValue;
inline Error last_error() { return musaGetLastError(); }
inline const char* error_string(Error e) { return musaGetErrorString(e); }
// Lets `kernel` use `bytes` of dynamic shared memory (needed above 48 KB).
template <typename Kernel>
inline Error set_max_dynamic_smem(Kernel kernel, int bytes) {
  return musaFuncSetAttribute(kernel, musaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}
inline int current_device() {
  int dev = 0;
  musaGetDevice(&dev);
  return dev;
}
// CUDA compute capabilities do not apply (the sm90 path is NVIDIA's): 0.
inline int compute_capability() { return 0; }
}  // namespace mate::arch
#else
#include <cuda_runtime.h>
#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
namespace mate::arch {
using bf16 = __nv_bfloat16;
using f16 = __half;
// Explicit conversions (torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends).
__device__ __forceinline__ void from_float(float x, bf16& y) { y = __float2bfloat16(x); }
__device__ __forceinline__ void from_float(float x, f16& y) { y = __float2half(x); }
}  // namespace mate::arch
#endif
namespace mate::arch {
using Stream = cudaStream_t;
using Error = cudaError_t;
inline constexpr Error kSuccess = cudaSuccess;
inline constexpr Error kInvalidValue = cudaErrorInvalidValue;
inline Error last_error() { return cudaGetLastError(); }
inline const char* error_string(Error e) { return cudaGetErrorString(e); }
// Lets `kernel` use `bytes` of dynamic shared memory (needed above 48 KB).
template <typename Kernel>
inline Error set_max_dynamic_smem(Kernel kernel, int bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}
inline int current_device() {
  int dev = 0;
  cudaGetDevice(&dev);
  return dev;
}
// The current device's compute capability, major * 10 + minor (90 for Hopper).
inline int compute_capability() {
  const int dev = current_device();
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  return major * 10 + minor;
}
}  // namespace mate::arch
#endif

namespace mate::arch {
// set_max_dynamic_smem once per device: the attribute belongs to a device, and a driver call
// per launch costs eager calls microseconds of host time. `configured` (a static of the
// caller, one bit per device) remembers where it is set.
template <typename Kernel>
inline Error set_max_dynamic_smem_once(Kernel kernel, int bytes, std::atomic<uint64_t>& configured) {
  const int dev = current_device();
  const uint64_t bit = dev < 64 ? uint64_t{1} << dev : 0;
  if (configured.load(std::memory_order_relaxed) & bit) return kSuccess;
  const Error e = set_max_dynamic_smem(kernel, bytes);
  if (e == kSuccess) configured.fetch_or(bit, std::memory_order_relaxed);
  return e;
}
}  // namespace mate::arch

#if defined(__CUDACC__) || defined(__MUSACC__)  // device helpers: kernel sources only
namespace mate::arch {

// Threads of a warp. The kernels are written for 32 lanes (fmha_kernels.cu asserts it);
// MUSA builds must compile them for 32-wide warps.
inline constexpr int kWarpSize = 32;

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Block-wide reductions for blocks of kThreads (a multiple of kWarpSize); `scratch`
// holds kThreads / kWarpSize floats of shared memory. All threads get the result.
template <int kThreads>
__device__ __forceinline__ float block_max(float x, float* scratch) {
  x = warp_max(x);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  float r = -INFINITY;
  for (int w = 0; w < kThreads / kWarpSize; ++w) r = fmaxf(r, scratch[w]);
  __syncthreads();
  return r;
}

template <int kThreads>
__device__ __forceinline__ float block_sum(float x, float* scratch) {
  x = warp_sum(x);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  float r = 0.f;
  for (int w = 0; w < kThreads / kWarpSize; ++w) r += scratch[w];
  __syncthreads();
  return r;
}

}  // namespace mate::arch
#endif  // device helpers
