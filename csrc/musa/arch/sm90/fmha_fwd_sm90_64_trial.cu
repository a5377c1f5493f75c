// The Hopper FMHA forward's D 64 tile variants on trial (MATE_OPS_FMHA_SM90_TILE, read in
// fmha_fwd_sm90.cu): 192-key tiles ("wide") and four K / V stages of 128 keys ("stages4"),
// bf16 and fp16, plain and ScoreMod scores; fmha_fwd_sm90.cuh has the kernel.
#include "fmha_fwd_sm90.cuh"

#if defined(MATE_WITH_SM90)
namespace mate::device::sm90 {
extern const WidthKernels kWidth64n192 = width_kernels<64, 64, 192>();
extern const WidthKernels kWidth64s4 = width_kernels<64, 64, 128, 4>();
}  // namespace mate::device::sm90
#endif
