// The Hopper FMHA backward's dispatch: which calls it serves (fmha_bwd_sm90_fits) and which tile
// width's kernels run them. The kernels are in fmha_bwd_sm90.cuh (the file comment there has
// the design); their instantiations, one translation unit per tile width, in
// fmha_bwd_sm90_<width>.cu.
#include "fmha_bwd_sm90.cuh"

#if defined(MATE_WITH_SM90)

namespace mate::device {
namespace sm90_bwd {
namespace {
const WidthKernels& kernels_for(Widths w) {
  switch (w) {
    case Widths::k64: return kWidth64;
    case Widths::k128: return kWidth128;
    case Widths::k192x128: return kWidth192x128;
    default: return kWidth256;
  }
}
}  // namespace
}  // namespace sm90_bwd

bool fmha_bwd_sm90_fits(const FmhaBwdParams& g) {
  using namespace sm90_bwd;
  const FmhaParams& p = g.fwd;
  if (!(p.in_dtype == DType::kBFloat16 || p.in_dtype == DType::kFloat16) || p.out_dtype != p.in_dtype) return false;
  const Widths widths = tile_widths(p.head_dim, p.head_dim_v);
  if (widths == Widths::kNone) return false;
  // forward-only features (the op rejects them before any kernel; checked again here, since
  // the kernels know nothing of them)
  if (p.qv || p.page_size > 0 || p.page_table || p.cache_batch_idx || p.cp_world_size != 1) return false;
  if (!p.q || !p.k || !p.v || !g.dout || !g.dq || !g.dk || !g.dv) return false;
  if (p.batch <= 0 || p.batch > 65535 || p.num_heads <= 0 || p.num_heads > 65535 || p.num_heads_k <= 0 ||
      p.num_heads % p.num_heads_k != 0)
    return false;
  // grid x: key blocks / query blocks (both far below 2^31 - 1 for int lengths)
  if (g.max_seqlen_q < 0 || g.max_seqlen_k < 0) return false;
  // TMA: every extent in [1, 2^32], 16-byte aligned base and strides below 2^40 bytes (CuTe
  // asserts on a descriptor the driver refuses, so these are checked here, never there)
  if (q_rows(p) <= 0 || k_rows(p) <= 0 || q_batches(p) <= 0 || k_batches(p) <= 0) return false;
  using sm90_tma::view_ok;
  if (!view_ok(p.q, p.q_row_stride, q_rows(p), p.q_head_stride, p.num_heads, p.q_batch_stride, q_batches(p)) ||
      !view_ok(g.dout, g.dout_row_stride, q_rows(p), g.dout_head_stride, p.num_heads, g.dout_batch_stride,
               q_batches(p)) ||
      !view_ok(p.k, p.k_row_stride, k_rows(p), p.k_head_stride, p.num_heads_k, p.k_batch_stride, k_batches(p)) ||
      !view_ok(p.v, p.v_row_stride, k_rows(p), p.v_head_stride, p.num_heads_k, p.v_batch_stride, k_batches(p)))
    return false;
  // the epilogues store pairs of 16-bit values (dq is contiguous (rows, H, D), D even)
  auto even = [](int64_t x) { return x % 2 == 0; };
  auto aligned4 = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 4 == 0; };
  if (!aligned4(g.dq) || !aligned4(g.dk) || !aligned4(g.dv) || !even(g.dk_batch_stride) || !even(g.dk_row_stride) ||
      !even(g.dk_head_stride) || !even(g.dv_batch_stride) || !even(g.dv_row_stride) || !even(g.dv_head_stride))
    return false;
  return kernels_for(widths).runs_here(p.in_dtype == DType::kFloat16, plain_scores(p));
}

arch::Error launch_fmha_bwd_sm90(const FmhaBwdParams& g, const FmhaBwdScratch& rows, arch::Stream stream) {
  using namespace sm90_bwd;
  const FmhaParams& p = g.fwd;
  if (p.batch <= 0) return arch::kSuccess;
  return kernels_for(tile_widths(p.head_dim, p.head_dim_v))
      .launch(g, rows, stream, p.in_dtype == DType::kFloat16, plain_scores(p));
}

}  // namespace mate::device

#endif  // MATE_WITH_SM90 (without it, fmha_bwd_kernels.cu has the "does not fit" stubs)
