// The Hopper FMHA forward's dispatch: which calls it serves (fmha_sm90_fits) and which tile
// width's kernels run them. The kernel itself is in fmha_fwd_sm90.cuh; its instantiations, one
// translation unit per tile width, in fmha_fwd_sm90_<width>.cu.
#include <cstring>

#include "fmha_fwd_sm90.cuh"

#if defined(MATE_WITH_SM90)

namespace mate::device {
namespace sm90 {
namespace {
// MATE_OPS_FMHA_SM90_SHORT_KEYS=n: width 256 runs its 64-key tiles (kShortKeyTile256) when no
// work tile's rows see more than n keys (default 1024; 1 keeps every call on the 80-key tiles).
// Read once per process.
int64_t short_keys_256() {
  static const int64_t n = env_positive("MATE_OPS_FMHA_SM90_SHORT_KEYS", 1024);
  return n;
}
// The most keys a work tile's rows can see: the key length (dense; a ragged call's max_seqlen_k
// hint, where 0 means unknown and counts as long; paged: the page table's capacity), or the
// width of a sliding window.
int64_t keys_bound(const FmhaParams& p) {
  int64_t keys = p.seqlen_k > 0 ? p.seqlen_k : INT64_MAX;
  if (p.window_left >= 0 && p.window_right >= 0) {
    const int64_t window = 128 + static_cast<int64_t>(p.window_left) + p.window_right;  // 128 rows' union
    if (window < keys) keys = window;
  }
  return keys;
}
// Paged K / V: pages holding whole key tiles (block_keys aligns the tiles to them), or any page
// size that is a multiple of Config::kPageBox: a tile then arrives as kPageBox-key boxes, which
// start on multiples of kPageBox and so never straddle two pages (one TMA box and one page
// lookup per box: the producer's load_page_boxes_k / _v). MATE_OPS_FMHA_SM90_SMALL_PAGES=0
// keeps those on the mma.sync kernel (a trial knob). Read once per process.
bool small_pages_on() {
  static const bool on = [] {
    const char* v = std::getenv("MATE_OPS_FMHA_SM90_SMALL_PAGES");
    return !(v != nullptr && std::strcmp(v, "0") == 0);
  }();
  return on;
}
bool pages_fit(int page_size, int key_tile) {
  constexpr int kBox = 16;  // Config::kPageBox
  if (page_size <= 0) return false;
  if (page_size % key_tile == 0) return true;
  return small_pages_on() && page_size % kBox == 0;
}
// A tile width's kernels for one call and their keys per K / V tile (Config::kBlockN). Width 256
// has two key tiles: 64 for short sequences, else 80; paged calls take the one whose tiles their
// pages hold whole, and the 64-key boxes only when neither fits.
struct WidthChoice {
  const WidthKernels& kernels;
  int key_tile;
};
WidthChoice kernels_for(const FmhaParams& p, Widths w) {
  switch (w) {
    case Widths::k64: return {kWidth64, block_n_for(64, 64)};
    case Widths::k128: return {kWidth128, block_n_for(128, 128)};
    case Widths::k192x128: return {kWidth192x128, block_n_for(192, 128)};
    default: {
      // paged: whole 64-key tiles per page, else whole 80-key tiles, else 64-key tiles in boxes
      const int long_tile = block_n_for(256, 256);
      const bool pages_short = p.page_table == nullptr || p.page_size % kShortKeyTile256 == 0 ||
                               (p.page_size % long_tile != 0 && pages_fit(p.page_size, kShortKeyTile256));
      const bool short_tiles = keys_bound(p) <= short_keys_256() && pages_short;
      if (short_tiles) return {kWidth256Short, kShortKeyTile256};
      return {kWidth256, long_tile};
    }
  }
}
// fp8 e4m3 with a staged V^T (launch.cpp) runs the fp8 kernels of widths 128 and 256: D and Dv
// multiples of 16 (16-byte fp8 rows for TMA), not paged (the V^T is staged per sequence row).
const WidthKernels* fp8_kernels_for(const FmhaParams& p) {
  if (p.v_t_keys <= 0 || p.v_t_keys % 16 != 0 || p.page_table != nullptr || p.head_dim % 16 != 0 ||
      p.head_dim_v % 16 != 0)
    return nullptr;
  switch (tile_widths(p.head_dim, p.head_dim_v)) {
    case Widths::k128: return &kWidthFp8x128;
    case Widths::k256: return &kWidthFp8x256;
    default: return nullptr;  // D <= 64 and 192 x 128 stay on the bf16 staging
  }
}
}  // namespace
}  // namespace sm90

static bool sm90_fp8_fits(const FmhaParams& p) {
  using namespace sm90;
  if (p.in_dtype != DType::kFloat8E4M3 || p.out_dtype != DType::kBFloat16 || p.qv || p.num_splits > 1) return false;
  const WidthKernels* kernels = fp8_kernels_for(p);
  if (kernels == nullptr || !p.out || !p.lse || !p.q || !p.k || !p.v) return false;
  if (p.batch <= 0 || p.batch > 65535 || p.num_heads <= 0 || p.num_heads > 65535 || p.num_heads_k <= 0 ||
      p.num_heads % p.num_heads_k != 0)
    return false;
  if (q_rows(p) <= 0 || k_rows(p) <= 0 || q_batches(p) <= 0 || k_batches(p) <= 0) return false;
  using sm90_tma::stride_ok;
  using sm90_tma::view_ok;
  if (!view_ok(p.q, p.q_row_stride, q_rows(p), p.q_head_stride, p.num_heads, p.q_batch_stride, q_batches(p), 1) ||
      !view_ok(p.k, p.k_row_stride, k_rows(p), p.k_head_stride, p.num_heads_k, p.k_batch_stride, k_batches(p), 1) ||
      !view_ok(p.v, p.v_t_keys, p.head_dim_v, p.v_head_stride, p.num_heads_k, p.v_batch_stride, k_batches(p), 1))
    return false;
  auto even = [](int64_t x) { return x % 2 == 0; };
  if (reinterpret_cast<uintptr_t>(p.out) % 4 != 0 || !even(p.out_batch_stride) || !even(p.out_row_stride) ||
      !even(p.out_head_stride))
    return false;
  return kernels->runs_here(false, scores_are_plain(p));
}

bool fmha_sm90_fits(const FmhaParams& p) {
  using namespace sm90;
  if (p.in_dtype == DType::kFloat8E4M3) return sm90_fp8_fits(p);
  if (p.v_t_keys > 0) return false;  // a staged V^T is read by the fp8 kernels only
  if (!(p.in_dtype == DType::kBFloat16 || p.in_dtype == DType::kFloat16) || p.out_dtype != p.in_dtype) return false;
  const Widths widths = tile_widths(p.head_dim, p.head_dim_v);
  if (widths == Widths::kNone) return false;
  // num_splits: 0 (the heuristic's choice) is resolved by the caller, which takes this path only
  // when that comes to 1; an explicit request for splits stays on the mma.sync path
  if (p.qv || p.num_splits > 1) return false;
  // paged K / V: pages holding whole key tiles (block_keys aligns the tiles to them)
  if ((p.page_table != nullptr) != (p.page_size > 0)) return false;
  const WidthChoice choice = kernels_for(p, widths);
  if (p.page_table != nullptr && !pages_fit(p.page_size, choice.key_tile)) return false;
  if (!p.out || !p.lse || !p.q || !p.k || !p.v) return false;
  if (p.batch <= 0 || p.batch > 65535 || p.num_heads <= 0 || p.num_heads > 65535 || p.num_heads_k <= 0 ||
      p.num_heads % p.num_heads_k != 0)
    return false;
  // TMA: every extent in [1, 2^32], 16-byte aligned base and strides below 2^40 bytes (CuTe
  // asserts on a descriptor the driver refuses, so these are checked here, never there)
  if (q_rows(p) <= 0 || k_rows(p) <= 0 || q_batches(p) <= 0 || k_batches(p) <= 0) return false;
  using sm90_tma::view_ok;
  if (!view_ok(p.q, p.q_row_stride, q_rows(p), p.q_head_stride, p.num_heads, p.q_batch_stride, q_batches(p)) ||
      !view_ok(p.k, p.k_row_stride, k_rows(p), p.k_head_stride, p.num_heads_k, p.k_batch_stride, k_batches(p)) ||
      !view_ok(p.v, p.v_row_stride, k_rows(p), p.v_head_stride, p.num_heads_k, p.v_batch_stride, k_batches(p)))
    return false;
  // the epilogue stores pairs of 16-bit values
  auto even = [](int64_t x) { return x % 2 == 0; };
  if (reinterpret_cast<uintptr_t>(p.out) % 4 != 0 || !even(p.out_batch_stride) || !even(p.out_row_stride) ||
      !even(p.out_head_stride))
    return false;
  return choice.kernels.runs_here(p.in_dtype == DType::kFloat16, scores_are_plain(p));
}

arch::Error launch_fmha_sm90(const FmhaParams& p, int max_rows, unsigned long long* tile_counter, arch::Stream stream) {
  using namespace sm90;
  if (max_rows <= 0) return arch::kSuccess;
  if (p.in_dtype == DType::kFloat8E4M3) {
    const WidthKernels* kernels = fp8_kernels_for(p);
    return kernels ? kernels->launch(p, max_rows, tile_counter, stream, false, scores_are_plain(p))
                   : arch::kInvalidValue;
  }
  return kernels_for(p, tile_widths(p.head_dim, p.head_dim_v))
      .kernels.launch(p, max_rows, tile_counter, stream, p.in_dtype == DType::kFloat16, scores_are_plain(p));
}

bool fmha_sm90_uneven_tiles(const FmhaParams& p) {
  return p.window_left >= 0 || p.window_right >= 0 || p.attention_chunk > 0 || p.q_is_ragged || p.k_is_ragged ||
         p.seqused_q || p.seqused_k || p.cache_leftpad;
}

}  // namespace mate::device

#endif  // MATE_WITH_SM90 (without it, fmha_kernels.cu has the "does not fit" stubs)
