// The Hopper FMHA backward's kernels for tiles of D = 192, Dv = 128 (bf16 and fp16, plain and ScoreMod
// scores); fmha_bwd_sm90.cuh has the kernels, fmha_bwd_sm90.cu the dispatch.
#include "fmha_bwd_sm90.cuh"

#if defined(MATE_WITH_SM90)
namespace mate::device::sm90_bwd {
extern const WidthKernels kWidth192x128 = width_kernels<192, 128>();
}  // namespace mate::device::sm90_bwd
#endif
