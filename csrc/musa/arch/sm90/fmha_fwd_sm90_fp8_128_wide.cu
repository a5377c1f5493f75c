// The Hopper FMHA forward's fp8 e4m3 kernel for tiles of D = 128, Dv = 128 on 224-key tiles, plain
// scores only (FlashAttention-3's fp8 choice; a trial beside fmha_fwd_sm90_fp8_128.cu, picked by
// MATE_OPS_FMHA_FP8_KEYS=wide). fmha_fwd_sm90.cuh has the kernel, fmha_fwd_sm90.cu the dispatch.
#include "fmha_fwd_sm90.cuh"

#if defined(MATE_WITH_SM90)
namespace mate::device::sm90 {
extern const WidthKernels kWidthFp8x128Wide = fp8_width_kernels<128, 128, 224, true>();
}  // namespace mate::device::sm90
#endif
