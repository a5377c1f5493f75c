// The Hopper FMHA forward's fp8 e4m3 kernel for tiles of D = 256, Dv = 256 on 128-key tiles, plain
// scores only (FlashAttention-3's fp8 choice; a trial beside fmha_fwd_sm90_fp8_256.cu, picked by
// MATE_OPS_FMHA_FP8_KEYS=wide). fmha_fwd_sm90.cuh has the kernel, fmha_fwd_sm90.cu the dispatch.
#include "fmha_fwd_sm90.cuh"

#if defined(MATE_WITH_SM90)
namespace mate::device::sm90 {
extern const WidthKernels kWidthFp8x256Wide = fp8_width_kernels<256, 256, 128, true>();
}  // namespace mate::device::sm90
#endif
