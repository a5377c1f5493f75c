// The Hopper FMHA forward's D 64 variant on trial (MATE_OPS_FMHA_SM90_TILE=m192, read in
// fmha_fwd_sm90.cu): 192-row work tiles over three consumer warpgroups, so that two of them
// run their softmax while the third keeps the tensor cores busy (at D 64 a tile's softmax
// takes longer than its two GEMMs). bf16 and fp16, plain and ScoreMod scores.
#include "fmha_fwd_sm90.cuh"

#if defined(MATE_WITH_SM90)
namespace mate::device::sm90 {
extern const WidthKernels kWidth64m192 = width_kernels<64, 64, 128, 2, 3>();
}  // namespace mate::device::sm90
#endif
