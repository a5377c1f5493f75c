// The Hopper FMHA backward's kernels for tiles of D = 64, Dv = 64 (bf16 and fp16, plain and ScoreMod
// scores); fmha_bwd_sm90.cuh has the kernels, fmha_bwd_sm90.cu the dispatch.
#include "fmha_bwd_sm90.cuh"

#if defined(MATE_WITH_SM90)
namespace mate::device::sm90_bwd {
extern const WidthKernels kWidth64 = width_kernels<64, 64>();
}  // namespace mate::device::sm90_bwd
#endif
