// The Hopper FMHA forward's fp8 e4m3 kernels for tiles of D = 128, Dv = 128 (bf16 out, plain and
// ScoreMod scores, V staged transposed by launch.cpp); fmha_fwd_sm90.cuh has the kernel,
// fmha_fwd_sm90.cu the dispatch.
#include "fmha_fwd_sm90.cuh"

#if defined(MATE_WITH_SM90)
namespace mate::device::sm90 {
extern const WidthKernels kWidthFp8x128 = fp8_width_kernels<128, 128>();
}  // namespace mate::device::sm90
#endif
