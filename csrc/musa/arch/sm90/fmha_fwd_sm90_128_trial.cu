// The Hopper FMHA forward's D 128 tile variant on trial (MATE_OPS_FMHA_SM90_TILE=wide, read in
// fmha_fwd_sm90.cu): 176-key tiles (FlashAttention-3's choice for D 128 without a causal
// mask), bf16 and fp16, plain and ScoreMod scores; fmha_fwd_sm90.cuh has the kernel.
#include "fmha_fwd_sm90.cuh"

#if defined(MATE_WITH_SM90)
namespace mate::device::sm90 {
extern const WidthKernels kWidth128n176 = width_kernels<128, 128, 176>();
}  // namespace mate::device::sm90
#endif
