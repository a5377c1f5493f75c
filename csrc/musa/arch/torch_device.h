// Vendor layer on the torch side of the launchers: current stream, device guard and
// multiprocessor count, from torch's CUDA headers or torch_musa's MUSA headers.
#pragma once

#if defined(MATE_WITH_MUSA)
#include "torch_musa/csrc/core/MUSAGuard.h"
#include "torch_musa/csrc/core/MUSAStream.h"
namespace mate::arch {
using DeviceGuard = c10::musa::MUSAGuard;
inline constexpr c10::DeviceType kTorchDevice = c10::DeviceType::PrivateUse1;
inline Stream current_stream() { return c10::musa::getCurrentMUSAStream().stream(); }
inline int multiprocessor_count() {
  musaDeviceProp prop;
  int dev = 0;
  musaGetDevice(&dev);
  musaGetDeviceProperties(&prop, dev);
  return prop.multiProcessorCount;
}
}  // namespace mate::arch
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
namespace mate::arch {
using DeviceGuard = c10::cuda::CUDAGuard;
inline constexpr c10::DeviceType kTorchDevice = c10::DeviceType::CUDA;
inline Stream current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }
inline int multiprocessor_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
}  // namespace mate::arch
#endif
