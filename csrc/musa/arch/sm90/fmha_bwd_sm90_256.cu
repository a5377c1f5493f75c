// The Hopper FMHA backward's kernels for tiles of D = 256, Dv = 256 (bf16 and fp16, plain and ScoreMod
// scores); fmha_bwd_sm90.cuh has the kernels, fmha_bwd_sm90.cu the dispatch.
#include "fmha_bwd_sm90.cuh"

#if defined(MATE_WITH_SM90)
namespace mate::device::sm90_bwd {
extern const WidthKernels kWidth256 = width_kernels<256, 256>();
}  // namespace mate::device::sm90_bwd
#endif
