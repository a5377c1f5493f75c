// The Hopper FMHA forward's kernels for tiles of D = 256, Dv = 256 with 64-key tiles, for calls
// whose sequences are short (kShortKeyTile256; fmha_fwd_sm90.cu picks them). Their own
// translation unit, so the two width-256 key tiles compile in parallel.
#include "fmha_fwd_sm90.cuh"

#if defined(MATE_WITH_SM90)
namespace mate::device::sm90 {
extern const WidthKernels kWidth256Short = width_kernels<256, 256, kShortKeyTile256>();
}  // namespace mate::device::sm90
#endif
