#pragma once
// FMHA forward for Hopper (sm_90a): TMA loads into an mbarrier pipeline and wgmma for both
// GEMMs, written with CUTLASS's CuTe headers. It computes what the mma.sync kernel
// (arch/sm80/fmha_mma.cu) computes without splits, for the common prefill case: bf16/fp16,
// D and Dv multiples of 8 up to 256 (tiles 64, 128, 192 x 128, 256; a head dim in between pads
// up, the TMA boxes reading the missing channels as zeros), every score modifier (softcap,
// ALiBi, any scale: a second instantiation), dense or ragged q/k/v, paged K / V with page
// sizes a multiple of the key tile (one TMA box and one page-table entry per tile).
// Everything else stays on the mma.sync path (fmha_sm90_fits says which is which).
//
// Why a separate kernel: mma.sync cannot reach a Hopper GPU's tensor-core peak; wgmma (a
// 64 x N x 16 product per warpgroup, straight from shared memory, asynchronous) can. TMA moves
// a whole tile with one instruction and no registers, so loading takes one thread instead of
// a block's worth of cp.async address arithmetic, and the other warps keep computing.
//
// Persistent: one block per SM (a block fills one: registers and shared memory), each looping
// over work tiles of (128 query rows, query head, sequence), so the next tile's loads overlap
// the current tile's last P V and epilogue instead of a new block starting cold (barrier
// init, Q load, first K wait). The tiles are numbered in sections of (sequence, head) pairs
// whose K / V fill about half the L2 (make_schedule), latest rows first inside a section (causal
// tiles with late rows are the heaviest: they start first), and dealt out statically as a
// snake: block j takes tile j of round 0, gridDim.x - 1 - j of round 1, and so on (work_at,
// tile_of_round; or dynamically, draw_tile). The producer thread takes each work tile and hands
// it, with the sequence facts and key range it derived, to the consumers and the zero warp
// through a two-slot ring in shared memory (TileFacts), so they agree on every load and the
// consumers start a tile without a global-memory round trip. 384 threads in three warpgroups:
//   - warpgroup 0, the producer: one thread issues the TMA loads of each work tile's Q and of
//     its K and V tiles (kBlockN keys each) into kStages buffers; K and V have their own
//     barriers, so S = Q K^T can start while V is still landing. Its warp 1, the zero warp,
//     clears the rows of a V tile no row may multiply (zero_warp). The warpgroup gives its
//     registers up (setmaxnreg) to the consumers.
//   - warpgroups 1 and 2, the consumers, 64 rows each: S = Q K^T (wgmma, both operands in
//     shared memory), the online softmax in registers in base 2, P rounded to the input type
//     in registers, O += P V (wgmma with P from registers). The accumulator layout of S is the
//     register-operand layout of P (static_asserts below), so P never touches shared memory.
//     Inside a warpgroup the softmax of tile t runs while the tensor cores add tile t - 1's
//     P V; the two warpgroups take turns issuing their GEMMs (ping-pong), so one's softmax
//     overlaps the other's products. The epilogue normalizes like fmha_mma.cu and
//     stores out through shared memory as whole row segments (store_out_staged; from
//     registers at width 256, which has no 16 KB to spare), lse from registers.
// Barriers (mbarriers in shared memory unless named):
//   - k_full / v_landed[stage]: the TMA transaction count of a K / V tile; v_full: the zero
//     warp (zero_warp) has cleared what the consumers must not multiply; k_empty / v_empty:
//     both consumer warpgroups are done with the buffer (after the Q K^T / P V that read it;
//     one arrival per warpgroup, by its first thread after the warpgroup's wgmma wait).
//     Their phases run on across work tiles: both sides count K / V loads over the whole
//     loop, buffer = count % kStages, phase = count / kStages % 2 (the consumers keep the
//     count modulo 2 kStages, `pos`).
//   - q_full / q_empty[buffer]: the Q buffers (two at widths 64 / 128, one at 192 x 128 / 256,
//     shared memory permitting). Each consumer warpgroup arrives on q_empty after its
//     last Q K^T of the work tile. With two buffers the producer loads a work tile's Q before
//     its first K, into the buffer the tile before last released; with one, after that first
//     K, while the consumers still run the last softmax, P V and epilogue of the tile before.
//     A work tile with no keys loads nothing and waits for nothing (both sides skip it).
//   - named kSchedBarrier + w: warpgroup w's turn to issue its GEMMs (ping-pong). Every work
//     tile has num_tiles + 1 steps for both warpgroups, whatever keys each has, so the turns
//     alternate strictly over the whole loop: warpgroup 1 hands warpgroup 0 the very first
//     turn before the loop, its last hand-over of a tile is warpgroup 0's first turn of the
//     next (warpgroup 0 starts it during warpgroup 1's epilogue), and warpgroup 0 takes the
//     final one after the loop.
// Every wgmma is issued outside runtime branches (steps are peeled: S only, S + P V, P V
// only) and the values that pick the steps are made warp-uniform: ptxas otherwise serializes
// all wgmmas (ptxas info C7513 / C7515 / C7518 / C7520 in the build log mean it did).
// The mask is fmha_score.h's per-row key interval: a work tile loads the keys between its
// first row's lower end and its last row's upper end (the interval ends are monotone in the
// row, the INVARIANT at key_range_for_row) and only tiles that cross a row's interval edge pay
// for per-element masking. Keys past the tile's last key are zeroed in V's buffer by the zero
// warp, warp 1 of the producer warpgroup (a TMA box
// reads whole tiles: past a sequence's end lie other sequences' keys or unwritten cache rows,
// and 0 * NaN would leak into the output); paged, so are the keys a page-aligned first tile
// holds before the first key any row sees (block_keys' head).
//
// fp8 e4m3 (kFp8, widths 128 and 256, bf16 out): both GEMMs on fp8 wgmma. fp8 wgmma reads B
// only K-major, so launch.cpp stages V transposed (keys contiguous), and since P's register
// operand layout differs from S's accumulator layout in fp8, the staged keys are permuted inside
// 16-key groups so that P packs straight from S's registers (fp8_pv_order.h); tiles then start
// on a 16-key group (block_keys' head). P is scaled by 2^8 into e4m3's range (kPOffset). Other
// fp8 calls (D <= 64, 192 x 128, D not a multiple of 16) arrive converted to bf16 (launch.cpp).
//
// Not yet here: GQA row packing, TMA stores, fp8 with paged K / V, page sizes that are not a
// multiple of the key tile -- pages under 128 keys,
// and at the 256 width (80-key tiles) every power of two: several 16-row boxes per tile
// would serve them (docs/performance.md has the measured versions).

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "../../../common/fmha_math.h"
#include "../../../common/fmha_params.h"
#include "../../../common/fmha_score.h"
#include "../../kernels.h"
#include "../device.h"
#include "fp8_pv_order.h"
#include "tma_checks.cuh"

#if defined(MATE_WITH_SM90)

// wgmma tile widths that are not multiples of 16 or 32 (80, 112, 176 keys) are behind this switch
#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED 1
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>

#include "../mma.h"  // fast_exp2, pack2

namespace mate::device {
namespace sm90 {

using namespace cute;
// TMA views and image checks shared by the Hopper kernels (tma_checks.cuh)
using sm90_tma::image_loaded;
using sm90_tma::k_batches;
using sm90_tma::k_rows;
using sm90_tma::mode_stride;
using sm90_tma::q_batches;
using sm90_tma::q_rows;

// The tile configuration of one (element type, head dim) instantiation. T is CuTe's element
// type of q / k / v (the wgmma operand type); NvT the CUDA type of the same bits (arch::pack2)
// for 16-bit inputs; OutNvT the CUDA type of out (bf16 for fp8 inputs).
// Keys per K / V tile: 128, and 80 at D 256 so that Q, two K and two V stages fit in 224 KB of
// shared memory and O (128 floats per thread) leaves room for S and P in 240 registers (80
// measured 10-20 % faster than 64 from 2k tokens on the H200: fewer, wider Q K^T products).
constexpr int block_n_for(int d, int dv) { return (d == 256 || dv == 256) ? 80 : 128; }
// Width 256 has a second kernel with 64-key tiles for calls whose sequences are short
// (fmha_fwd_sm90.cu: short_keys_256): 512 keys are 8 whole 64-key tiles where 80-key tiles leave
// 48 rows of the last one empty, and 64-key tiles leave the shared memory the epilogue needs to
// stage its stores (kStageO). H200, same build and run: 10-18 % faster at 512 tokens, 3-9 %
// slower at 2048 (docs/performance.md, version 24).
constexpr int kShortKeyTile256 = 64;
// fp8 (P V's k-steps are 32 keys; P takes a quarter of the registers it takes in 16 bits): 128
// keys. At D 256 that is FlashAttention-3's choice, 7-19 % faster than 64 keys on the H200; its
// 224 at D 128 was 12-31 % slower than 128 there. With ScoreMod at D 256, 64 keys: 128 spilled
// 392 bytes (S is 64 registers beside O's 128, and the score modifiers need more).
constexpr int block_n_for_fp8(int d, int dv, bool plain) { return (d == 256 || dv == 256) && !plain ? 64 : 128; }

// A work tile (Schedule, work_at): 128 query rows of one query head of one sequence.
struct Work {
  int b = 0, h = 0, m0 = 0;  // sequence, query head, first query row of the tile
};
// The keys of a work tile (block_keys).
struct BlockKeys {
  int lo = 0, hi = 0, tiles = 0;
  int head = 0;  // keys [lo, lo + head) of the first tile precede the first key any row sees
};
// What the producer hands the consumers about each work tile it draws (Smem::next_tile): the
// schedule index (>= the tile count: the end) and what it derived from it. The consumers used to
// derive these themselves after the previous tile's epilogue, one global-memory round trip
// (cu_seqlens) and a few divisions on the path to their first Q K^T; the producer, a few key
// tiles ahead of them, has them anyway.
struct TileFacts {
  int64_t i = 0;
  Work w;
  SeqInfo s;
  BlockKeys bk;
};

// V's shared tiles (Config::SmemV), picked without instantiating the other form.
template <bool kFp8, class T, int kDv, int kBlockN, int kStages>
struct SmemVLayout {
  using type = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<T>{}, Shape<Int<kDv>, Int<kBlockN>, Int<kStages>>{},
                                      Step<_2, _1, _3>{}));
};
template <class T, int kDv, int kBlockN, int kStages>
struct SmemVLayout<true, T, kDv, kBlockN, kStages> {  // V^T rows of kBlockN one-byte keys
  // the widest swizzle whose rows (128, 64, 32 bytes) divide a V^T row
  using Atom = cute::conditional_t<
      kBlockN % 128 == 0, GMMA::Layout_K_SW128_Atom<T>,
      cute::conditional_t<kBlockN % 64 == 0, GMMA::Layout_K_SW64_Atom<T>, GMMA::Layout_K_SW32_Atom<T>>>;
  using type = decltype(tile_to_shape(Atom{}, Shape<Int<kDv>, Int<kBlockN>, Int<kStages>>{}));
};

// The TMA descriptors of kPageBox-key boxes of a K / V stage (Config::TmaKBox / TmaVBox): K's
// rows, V's columns (V is (Dv, keys) in shared memory), as sub-layouts of one stage.
template <bool kFp8, class SmemK, class SmemV, class GK, class GV, int kBox, int kD, int kDv, int kBlockN>
struct PageBoxes {
  using LayoutK = decltype(composition(take<0, 2>(SmemK{}),
                                       make_layout(Shape<Int<kBox>, Int<kD>>{}, Stride<_1, Int<kBlockN>>{})));
  using LayoutV = decltype(composition(take<0, 2>(SmemV{}),
                                       make_layout(Shape<Int<kDv>, Int<kBox>>{}, Stride<_1, Int<kDv>>{})));
  using TmaK = decltype(make_tma_copy(SM90_TMA_LOAD{}, std::declval<GK>(), LayoutK{}));
  using TmaV = decltype(make_tma_copy(SM90_TMA_LOAD{}, std::declval<GV>(), LayoutV{}));
};
template <class SmemK, class SmemV, class GK, class GV, int kBox, int kD, int kDv, int kBlockN>
struct PageBoxes<true, SmemK, SmemV, GK, GV, kBox, kD, kDv, kBlockN> {
  using TmaK = decltype(make_tma_copy(SM90_TMA_LOAD{}, std::declval<GK>(), take<0, 2>(SmemK{})));
  using TmaV = decltype(make_tma_copy(SM90_TMA_LOAD{}, std::declval<GV>(), take<0, 2>(SmemV{})));
};

template <class T_, class NvT_, int kD_, int kDv_, class OutNvT_ = NvT_, int kBlockN_ = 0, int kStages_ = 2>
struct Config {
  using T = T_;
  using NvT = NvT_;
  using OutNvT = OutNvT_;
  // fp8 e4m3 inputs: both GEMMs on fp8 wgmma (32-element k-steps, both operands K-major), so V
  // arrives transposed (launch.cpp stages V^T, keys permuted inside 16-key groups: fp8_pv_order.h)
  static constexpr bool kFp8 = sizeof(T) == 1;
  static constexpr int kKStep = kFp8 ? 32 : 16;  // elements per wgmma k-step
  static constexpr int kD = kD_;           // tile width of q / k rows (head_dim pads up to it)
  static constexpr int kDv = kDv_;         // tile width of v / out rows (head_dim_v pads up to it)
  static constexpr int kBlockM = 128;      // query rows per block: 64 per consumer warpgroup
  static constexpr int kBlockN = kBlockN_ > 0 ? kBlockN_ : block_n_for(kD, kDv);  // keys per K / V tile
  static constexpr int kStages = kStages_; // K / V buffers: tile t + 1 lands while tile t computes
  static constexpr int kConsumers = 2;     // consumer warpgroups
  static constexpr int kConsumerThreads = 128 * kConsumers;
  static constexpr int kThreads = 128 + kConsumerThreads;
  // Registers per thread after setmaxnreg: the producer keeps few, the consumers hold S (64),
  // P (32) and O (64 at D 128). 128 * 24 + 256 * 240 fits the SM's 64K.
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
  static_assert(kD % kKStep == 0 && kBlockN % kKStep == 0, "whole wgmma k-steps");

  // S = Q K^T: M = 64 rows per warpgroup, N = kBlockN keys, K = D; Q and K both K-major in
  // shared memory. O += P V: N = Dv, K = kBlockN keys; P from registers, V MN-major (Dv is
  // contiguous in memory) -- K-major for fp8 (V^T: keys contiguous), the only form fp8 wgmma has.
  static constexpr GMMA::Major kMajorV = kFp8 ? GMMA::Major::K : GMMA::Major::MN;
  using AtomQK = decltype(GMMA::ss_op_selector<T, T, float, Shape<_64, Int<kBlockN>, Int<kD>>>());
  using AtomPV =
      decltype(GMMA::rs_op_selector<T, T, float, Shape<_64, Int<kDv>, Int<kBlockN>>, GMMA::Major::K, kMajorV>());
  using WarpGroups = Layout<Shape<Int<kConsumers>, _1, _1>>;  // warpgroup w owns rows 64w .. 64w + 63
  using MmaQK = decltype(make_tiled_mma(AtomQK{}, WarpGroups{}));
  using MmaPV = decltype(make_tiled_mma(AtomPV{}, WarpGroups{}));

  // The softmax indexes the accumulators directly (value i = e + 2 h + 4 j is row g + 8 h,
  // column 8 j + 2 (lane % 4) + e, g = lane / 4 + 16 * warp), and P reuses S's registers as
  // the A operand of O += P V: in 16 bits, 16 accumulator columns are laid out exactly like one
  // k-step of a register A operand; in fp8 they are not, and V^T's key order makes up for it
  // (fp8_pv_order.h, checked against these layouts by a host test). These asserts pin the
  // layouts that reasoning rests on to CuTe's.
  static_assert(cute::is_same_v<typename MmaQK::Atom::CLayout, GMMA::CLayout_64xN<kBlockN>>);
  static_assert(cute::is_same_v<typename MmaPV::Atom::CLayout, GMMA::CLayout_64xN<kDv>>);
  static_assert(cute::is_same_v<typename MmaPV::Atom::ALayout,
                                cute::conditional_t<kFp8, GMMA::ALayout_64x32, GMMA::ALayout_64x16>>);
  static_assert(cute::is_same_v<GMMA::CLayout_64xN<16>, GMMA::ALayout_64x16>);

  // Shared tiles with the 128-byte swizzle wgmma and TMA both understand.
  // Q buffers: two where shared memory has room (widths 64 and 128, fp8 128 and 256), so the
  // next work tile's Q lands while the current one still computes; one at 256 and 192 x 128.
  static constexpr uint32_t kQBytes = kBlockM * kD * sizeof(T);
  static constexpr uint32_t kKBytes = kBlockN * kD * sizeof(T);   // one K tile
  static constexpr uint32_t kVBytes = kBlockN * kDv * sizeof(T);  // one V tile
  static constexpr int kQStages = 2 * kQBytes + kStages * (kKBytes + kVBytes) + 2048 <= 227 * 1024 ? 2 : 1;
  // The epilogue stages out through shared memory where 16 KB are left (every width but 256):
  // each warp writes 16 rows x 64 channels of its accumulators there and reads them back as
  // whole 16-byte row pieces, so its global stores are 128-byte row segments instead of 16-byte
  // pieces of eight rows per instruction (a 64 x 128 epilogue took ~3700 cycles that way).
  // A staging row is 64 channels plus 16 bytes of padding (kOStagePitch words): the accumulator
  // writes (eight rows, one 4-byte column each) then hit 32 distinct banks, and every address is
  // one base register plus a constant.
  static constexpr int kOStagePitch = 64 * sizeof(OutNvT_) / 4 + 4;  // 32-bit words per staged row
  static constexpr uint32_t kOStageBytes = kConsumerThreads / 32 * 16 * kOStagePitch * 4;
  static constexpr bool kStageO =
      kQStages * kQBytes + kStages * (kKBytes + kVBytes) + kOStageBytes + 1024 <= 227 * 1024;
  using SmemQ =
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kBlockM>, Int<kD>, Int<kQStages>>{}));
  using SmemK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kBlockN>, Int<kD>, Int<kStages>>{}));
  // V's swizzle atoms (64 channels x 8 keys) are stacked along the keys first, so that 64
  // channels of a whole tile are one contiguous TMA box (channels first would cut it into
  // 8-key boxes). fp8: V^T rows of 128 keys (one 128-byte swizzle atom wide), K-major.
  using SmemV = typename SmemVLayout<kFp8, T, kDv, kBlockN, kStages>::type;

  // Global views for the TMA descriptors: q / k as (rows, D, heads, batch), v as
  // (Dv, rows, heads, batch) so that its tiles land MN-major (fp8: V^T, keys contiguous, the same
  // modes). A ragged tensor has batch 1.
  using GShape = Shape<int, int, int, int>;
  using GStrideQK = Stride<int64_t, _1, int64_t, int64_t>;
  using GStrideV =
      cute::conditional_t<kFp8, Stride<int64_t, _1, int64_t, int64_t>, Stride<_1, int64_t, int64_t, int64_t>>;
  using GTensorQK = decltype(make_tensor(make_gmem_ptr(static_cast<const T*>(nullptr)), GShape{}, GStrideQK{}));
  using GTensorV = decltype(make_tensor(make_gmem_ptr(static_cast<const T*>(nullptr)), GShape{}, GStrideV{}));
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, std::declval<GTensorQK>(), take<0, 2>(SmemQ{})));
  using TmaK = decltype(make_tma_copy(SM90_TMA_LOAD{}, std::declval<GTensorQK>(), take<0, 2>(SmemK{})));
  using TmaV = decltype(make_tma_copy(SM90_TMA_LOAD{}, std::declval<GTensorV>(), take<0, 2>(SmemV{})));
  // Pages that do not hold whole key tiles (a page size that is a multiple of kPageBox): a K / V
  // tile arrives as boxes of kPageBox keys, each from its own page (the producer, page_box).
  // A box's shared-memory image is its rows (keys) of one stage's layout, so the descriptors are
  // made from that sub-layout. fp8 calls are never paged: their box types are the tile's.
  static constexpr int kPageBox = 16;
  using Boxes = PageBoxes<kFp8, SmemK, SmemV, GTensorQK, GTensorV, kPageBox, kD, kDv, kBlockN>;
  using TmaKBox = typename Boxes::TmaK;
  using TmaVBox = typename Boxes::TmaV;


  struct Smem {
    alignas(1024) cute::array_aligned<T, cosize_v<SmemQ>, 1024> q;
    alignas(1024) cute::array_aligned<T, cosize_v<SmemK>, 1024> k;
    alignas(1024) cute::array_aligned<T, cosize_v<SmemV>, 1024> v;
    // full: the tile has landed (TMA transaction count); empty: every consumer warpgroup is
    // done with the buffer (kConsumers arrivals)
    uint64_t q_full[kQStages], q_empty[kQStages];  // q_empty: both warpgroups did their last Q K^T
    uint64_t k_full[kStages], k_empty[kStages];
    uint64_t v_full[kStages], v_empty[kStages];
    uint64_t v_landed[kStages];  // the TMA transaction count of a V tile (the zero warp waits for it)
    // the hand-over of round r's work tile (slot r % 2, TileFacts): full when the producer
    // wrote it, empty when every consumer thread has read it
    TileFacts next_tile[2];
    uint64_t tile_full[2], tile_empty[2];
    // the epilogue's staging rows (kStageO): per consumer warp 16 rows x 64 channels of out
    alignas(128) cute::array_aligned<uint32_t, kStageO ? kOStageBytes / 4 : 4, 128> o_stage;
  };
  static constexpr int kSmemBytes = static_cast<int>(sizeof(Smem));
  static_assert(kSmemBytes <= 227 * 1024, "a Hopper SM gives one block at most 227 KB of shared memory");
};

// The instantiated tile widths (tma_checks.cuh): a head dim pads up to the first that holds it
// (the TMA boxes read the missing channels as zeros, which add nothing to Q K^T).
using sm90_tma::tile_widths;
using sm90_tma::Widths;

// The global views (host and device build the same ones; extents from tma_checks.cuh).
MATE_HD Shape<int, int, int, int> q_shape(const FmhaParams& p) {
  return make_shape(q_rows(p), p.head_dim, p.num_heads, q_batches(p));
}
MATE_HD Shape<int, int, int, int> k_shape(const FmhaParams& p) {
  return make_shape(k_rows(p), p.head_dim, p.num_heads_k, k_batches(p));
}
MATE_HD Shape<int, int, int, int> v_shape(const FmhaParams& p) {
  // staged V^T (fp8): v_t_keys keys per channel row, a multiple of 16 (whole permuted groups)
  return make_shape(p.head_dim_v, p.v_t_keys > 0 ? p.v_t_keys : k_rows(p), p.num_heads_k, k_batches(p));
}

// Issues one wgmma tile product, C (+)= A B over every k-step, without committing or waiting
// for it: the first step overwrites C when kZeroInit (S = Q K^T starts from nothing), later
// steps accumulate. The caller commits the batch (warpgroup_commit_batch) and waits with
// warpgroup_wait<n>().
// The caller also orders earlier register writes before it (warpgroup_arrive, outside any
// branch that ptxas cannot prove uniform).
template <bool kZeroInit, class Mma, class TA, class TB, class TC>
__device__ __forceinline__ void wgmma_issue(Mma& mma, const TA& a, const TB& b, TC& c) {
  if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(a); ++k) {
    cute::gemm(mma, a(_, _, k), b(_, _, k), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
}

// Key interval facts of a warpgroup's 64 rows [r0, r0 + 64) that are uniform over the
// warpgroup (all of its threads take the unmasked path of a tile or none): by the INVARIANT
// at key_range_for_row, the first row has the smallest ends and the last real row the largest.
struct GroupKeys {
  int lo_max = 0, hi_min = 0;  // every row sees [lo_max, hi_min) when `full`
  bool full = false;           // all 64 rows are real rows
  __device__ bool covers(int n0, int n) const { return full && lo_max <= n0 && hi_min - n0 >= n; }
};

// x from lane 0 of the warp. For values every lane already has (from memory: sequence lengths,
// key ranges): ptxas then knows them to be warp-uniform. wgmma issued or waited for under a
// condition it cannot prove uniform is serialized (ptxas info C7518 / C7520: a wait and fence
// after every wgmma, no overlap of the softmax with the tensor cores).
__device__ __forceinline__ int warp_uniform(int x) { return __shfl_sync(0xffffffffu, x, 0); }

// Named barriers of the consumer warpgroups (CuTe's NamedBarrier numbers them after the ids
// CUTLASS reserves).
constexpr uint32_t kSchedBarrier = 1;  // + warpgroup: its turn to issue GEMMs (ping-pong)
constexpr uint32_t kQScaleBarrier = 3; // a Q tile rescaled for a non-positive FP8 descale

// The persistent schedule (the file comment has the why). A work tile is 128 query rows of one
// query head of one sequence. Tiles are numbered section by section, a section being
// `section` (sequence, head) pairs, heads fastest (a GQA group's heads, which read the same
// K / V, are neighbours); inside a section the latest m-block of every pair comes first, then
// the one before it, and so on. 64-bit counts: sequences * heads * m-blocks may pass 2^31.
struct Schedule {
  int m_blocks = 0;      // 128-row blocks of the longest sequence (max_rows)
  int heads = 0;         // query heads
  int64_t pairs = 0;     // sequences * query heads
  int64_t section = 1;   // pairs per section, 1 .. pairs
  int64_t tiles = 0;     // pairs * m_blocks
  // The dynamic schedule's ticket counter (zeroed by the caller), or null for the static one.
  unsigned long long* counter = nullptr;
  // How far (base 2) a row's maximum may pass its reference before O is rescaled (16-bit inputs;
  // MATE_OPS_FMHA_SM90_RESCALE_SLACK, rescale_slack()): P then reaches up to 2^slack.
  float rescale_slack = 0.f;
};

// Tile i of the schedule (0 <= i < tiles; tests/host/sm90_schedule_check.cpp checks on the host
// that every tile is named once, for every section size). 32-bit arithmetic: fmha_sm90_fits admits only calls
// with at most 2^31 - 1 tiles (a 64-bit division is a long subroutine, run by every thread at
// every work tile; a 64-bit path beside this one made the producer spill 44 bytes more).
MATE_HD Work work_at(const Schedule& sc, int64_t i) {
  const uint32_t per_section = static_cast<uint32_t>(sc.section) * static_cast<uint32_t>(sc.m_blocks);
  const uint32_t ii = static_cast<uint32_t>(i), section = static_cast<uint32_t>(sc.section);
  const uint32_t sec = ii / per_section, l = ii - sec * per_section, first = sec * section;
  const uint32_t left = static_cast<uint32_t>(sc.pairs) - first;  // the last section may be short
  const uint32_t n = left < section ? left : section;
  const uint32_t mb = l / n, pair = first + (l - mb * n);
  Work w;
  w.b = static_cast<int>(pair / static_cast<uint32_t>(sc.heads));
  w.h = static_cast<int>(pair - static_cast<uint32_t>(w.b) * static_cast<uint32_t>(sc.heads));
  w.m0 = (sc.m_blocks - 1 - static_cast<int>(mb)) * 128;
  return w;
}

// The tile a block takes in round r: a snake over the rounds, block j takes index j of even
// rounds and gridDim.x - 1 - j of odd ones (launch_config keeps r below 2^31). Inside a
// section the tiles get lighter with the index (causal), so a block that drew one of a round's
// heavier tiles draws one of the next round's lighter ones; a plain round robin would give
// block 0 the heaviest tile of every round.
__device__ __forceinline__ int64_t tile_of_round(uint32_t r) {
  return static_cast<int64_t>(r) * gridDim.x + ((r & 1) ? gridDim.x - 1 - blockIdx.x : blockIdx.x);
}

// The dynamic schedule (when tile weights differ: causal / local masks, ragged or seqused
// lengths): block j starts with tile j, then takes the next untaken tile in schedule order
// whenever its producer is ready for one -- greedy, so a block that drew heavy tiles takes
// fewer. The static snake's longest block ran up to 1.8x the mean on such calls (D 256 S 16k
// causal, simulated; measured 0.64x cuDNN there). The producer thread draws the ticket and
// hands the tile to the consumers through a two-slot ring in shared memory (Smem::next_tile).
__device__ __forceinline__ int64_t draw_tile(const Schedule& sc, uint32_t r) {
  if (sc.counter == nullptr) return tile_of_round(r);
  return r == 0 ? static_cast<int64_t>(blockIdx.x)
                : static_cast<int64_t>(gridDim.x) + static_cast<int64_t>(atomicAdd(sc.counter, 1ull));
}

// The keys of one work tile: from its first row's lower end to its last real row's upper end
// (INVARIANT at key_range_for_row), in `tiles` K / V tiles of kBlockN keys. Producer and
// consumers both derive it from the same inputs, so they agree on every tile's load count.
// Paged K / V: a tile must not cross a page (one TMA box, one page-table entry), so with page
// sizes a multiple of kBlockN (fmha_sm90_fits) the tiles start on a storage position that is
// a multiple of kBlockN: lo moves down by `head` keys, which no row sees (masked; their V rows
// are zeroed, as they may be left padding or garbage). A staged V^T (fp8) moves lo down to a
// multiple of 16 likewise.
template <int kBlockM, int kBlockN, bool kFp8>
__device__ __forceinline__ BlockKeys block_keys(const FmhaParams& p, const SeqInfo& s, int m0) {
  BlockKeys k;
  if (m0 < s.q_len) {
    k.lo = key_range_for_row(p, s, m0).lo;
    k.hi = key_range_for_row(p, s, imin(m0 + kBlockM, s.q_len) - 1).hi;
  }
  if (p.page_table != nullptr && k.hi > k.lo) {
    k.head = (s.k_start + k.lo) % kBlockN;  // storage positions are >= 0
    k.lo -= k.head;
  } else if (kFp8 && k.hi > k.lo) {
    // staged V^T (fp8): tiles start on a 16-key storage group, whose keys are permuted as one
    // (fp8_pv_order.h); the keys before the first one any row sees are masked and zeroed alike
    // (mod 16 needs only the low bits: 32-bit arithmetic, one register fewer in the producer)
    k.head = static_cast<int>((static_cast<uint32_t>(s.k_row0) + static_cast<uint32_t>(s.k_start + k.lo)) & 15u);
    k.lo -= k.head;
  }
  k.tiles = k.hi > k.lo ? ceil_div_pos(k.hi - k.lo, kBlockN) : 0;
  return k;
}

// A timeline of the first kTraceBlocks blocks, to see where a work tile's time goes (built with
// MATE_OPS_NVCC_FLAGS=-DMATE_SM90_TRACE; without it every TRACE_EVENT is nothing). The producer
// thread and each consumer warpgroup's first thread store (round, event, SM clock) into a
// per-module device array -- plain stores, no call that could serialize the wgmmas -- and the
// launch prints them to stderr as "sm90trace <block> <role> <round> <event> <cycle>" (role 0 the
// producer, 1 / 2 the consumer warpgroups; events: kTrace* below; one block's events share its
// SM's clock).
#if defined(MATE_SM90_TRACE)
constexpr int kTraceBlocks = 2, kTraceEvents = 4096;
struct TraceEvent {
  uint32_t round, event;
  uint64_t cycle;
};
__device__ TraceEvent g_sm90_trace[kTraceBlocks][3][kTraceEvents];
__device__ uint32_t g_sm90_trace_count[kTraceBlocks][3];
__device__ __forceinline__ void trace_event(uint32_t& n, int role, uint32_t round, uint32_t event) {
  if (blockIdx.x >= kTraceBlocks || n >= kTraceEvents) return;
  g_sm90_trace[blockIdx.x][role][n++] = TraceEvent{round, event, static_cast<uint64_t>(clock64())};
}
#define TRACE_EVENT(n, role, round, event) trace_event(n, role, round, event)
#define TRACE_END(n, role) \
  if (blockIdx.x < kTraceBlocks) g_sm90_trace_count[blockIdx.x][role] = n
#else
#define TRACE_EVENT(n, role, round, event) ((void)0)
#define TRACE_END(n, role) ((void)0)
#endif
// Trace events. Producer: the tile drawn, its Q issued, its first K issued (after the buffer
// wait), its last V issued. Consumers: the tile drawn, Q landed, the first S issued (after the
// ping-pong turn), the last P V done, the epilogue done; step t (< 32) begun (before its K / V
// waits) at kTraceStep + t, its turn taken (after the ping-pong barrier) at kTraceTurn + t;
// kTraceReady: the tile's prologue done (before the Q wait).
enum : uint32_t {
  kTraceDraw = 0, kTraceQ = 1, kTraceFirstK = 2, kTraceLastV = 3,
  kTraceFirstS = 4, kTraceLastPV = 5, kTraceStored = 6, kTraceReady = 7, kTraceStep = 32, kTraceTurn = 64
};

// The hand-over of round r's work tile through slot r % 2 of Smem::next_tile. The empty compiler
// barriers keep the slot's plain shared-memory accesses between the mbarrier operations (CuTe's
// barrier asm declares no memory effects).
template <class Smem>
__device__ __forceinline__ void hand_over_tile(Smem& sh, uint32_t r, const TileFacts& f) {
  const int slot = r & 1;
  if (r >= 2) wait_barrier(sh.tile_empty[slot], ((r >> 1) - 1) & 1);
  asm volatile("" ::: "memory");
  sh.next_tile[slot] = f;
  asm volatile("" ::: "memory");
  arrive_barrier(sh.tile_full[slot]);
}
template <class Smem>
__device__ __forceinline__ TileFacts take_tile(Smem& sh, uint32_t r) {
  const int slot = r & 1;
  wait_barrier(sh.tile_full[slot], (r >> 1) & 1);
  asm volatile("" ::: "memory");
  const TileFacts f = sh.next_tile[slot];
  asm volatile("" ::: "memory");
  arrive_barrier(sh.tile_empty[slot]);
  return f;
}

// The epilogue's stores through shared memory (Config::kStageO): this warp's 16 rows (block rows
// from m_first) of the scaled accumulators go to its staging buffer, 64 channels at a time, and
// come back as 16-byte pieces of one row per lane, so that each store instruction writes four
// whole 128-byte row segments. Rows past the sequence's rows and the padding channels of a
// narrower head dim are never stored; out's rows must be 4-byte aligned (fmha_sm90_fits), 16-byte
// stores are taken when they are 16-byte aligned (uniform over the call).
template <class C, class Smem, class TO>
__device__ __forceinline__ void store_out_staged(const FmhaParams& p, Smem& sh, const TO& tOrO, int b, int h,
                                                 const SeqInfo& s, int m_first, int warp_id, int lane) {
  using OutNvT = typename C::OutNvT;
  static_assert(sizeof(OutNvT) == 2 && C::kDv % 64 == 0, "16-bit out, whole 64-channel chunks");
  constexpr int kPitch = C::kOStagePitch;
  uint32_t* buf = sh.o_stage.data() + warp_id * 16 * kPitch;
  const int quad = lane % 4;
  OutNvT* out_base = static_cast<OutNvT*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride;
  const bool wide = ((reinterpret_cast<uintptr_t>(out_base) | static_cast<uintptr_t>(p.out_row_stride) * 2) & 15) == 0;
  // (two copies of the loop below, one per store width: with the width a per-store predicate the
  // compiler issued both forms of every store)
  auto store_chunks = [&](auto wide_tag) {
    constexpr bool kWide = decltype(wide_tag)::value;
#pragma unroll
    for (int c = 0; c < C::kDv / 64; ++c) {
      __syncwarp();  // the previous chunk's reads are done
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int row = lane / 4 + 8 * hf;
#pragma unroll
        for (int jj = 0; jj < 8; ++jj) {
          const int j = 8 * c + jj;
          buf[row * kPitch + jj * 4 + quad] =
              arch::pack2<OutNvT>(tOrO(2 * hf + 4 * j), tOrO(1 + 2 * hf + 4 * j));
        }
      }
      __syncwarp();
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int row = lane / 8 + 4 * k, piece = lane % 8;  // 8 channels: 64 c + 8 piece ..
        const uint4 v = *reinterpret_cast<const uint4*>(buf + row * kPitch + piece * 4);
        const int m = m_first + row, ch = 64 * c + 8 * piece;
        if (m < s.q_len_full && ch < p.head_dim_v) {
          OutNvT* o = out_base + (s.q_row0 + m) * p.out_row_stride + ch;
          if constexpr (kWide) {
            *reinterpret_cast<uint4*>(o) = v;
          } else {
            uint32_t* o32 = reinterpret_cast<uint32_t*>(o);
            o32[0] = v.x, o32[1] = v.y, o32[2] = v.z, o32[3] = v.w;
          }
        }
      }
    }
  };
  if (wide) {
    store_chunks(cute::true_type{});
  } else {
    store_chunks(cute::false_type{});
  }
}

// The four lanes of a quad exchange 32-bit words so that lane q's x[i] becomes lane i's x[q]
// (a 4 x 4 transpose in two xor steps: the off-diagonal 2 x 2 blocks with lane q ^ 2, then each
// block's corners with lane q ^ 1). Every lane of the warp takes part.
__device__ __forceinline__ void quad_transpose(uint32_t (&x)[4], int quad) {
  const bool hi_pair = quad & 2, odd = quad & 1;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const uint32_t got = __shfl_xor_sync(0xffffffffu, hi_pair ? x[e] : x[2 + e], 2);
    if (hi_pair) x[e] = got; else x[2 + e] = got;
  }
#pragma unroll
  for (int c = 0; c < 4; c += 2) {
    const uint32_t got = __shfl_xor_sync(0xffffffffu, odd ? x[c] : x[c + 1], 1);
    if (odd) x[c] = got; else x[c + 1] = got;
  }
}

// The epilogue's stores from registers (no shared memory left for staging: width 256). A lane
// holds two channels of one row for every eighth channel pair; a quad transpose gives each lane
// eight consecutive channels, so one 16-byte store per lane writes 64 bytes of a row per quad
// (two whole 32-byte sectors) where 4-byte stores wrote half of a sector each and needed four
// times the instructions. `normalized(hf, o)` scales an accumulator of row half hf. Rows past
// the sequence's rows and padding channels are never stored; without 16-byte alignment of out
// (uniform over the call) the 4-byte form stays.
template <class C, class TO, class Norm>
__device__ __forceinline__ void store_out_registers(const FmhaParams& p, const TO& tOrO, Norm normalized, int b,
                                                    int h, const SeqInfo& s, int m_first, int lane) {
  using OutNvT = typename C::OutNvT;
  static_assert(sizeof(OutNvT) == 2 && C::kDv % 32 == 0, "16-bit out, whole 32-channel groups");
  const int quad = lane % 4;
  OutNvT* out_base = static_cast<OutNvT*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride;
  const bool wide = ((reinterpret_cast<uintptr_t>(out_base) | static_cast<uintptr_t>(p.out_row_stride) * 2) & 15) == 0;
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int m = m_first + lane / 4 + hf * 8;
    const bool row_stored = m < s.q_len_full;
    OutNvT* out_row = out_base + (s.q_row0 + m) * p.out_row_stride;
    if (wide) {
#pragma unroll
      for (int a = 0; a < C::kDv / 32; ++a) {  // channels 32 a .. 32 a + 31 of the row
        uint32_t x[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int j = 4 * a + i;
          x[i] = arch::pack2<OutNvT>(normalized(hf, tOrO(2 * hf + 4 * j)), normalized(hf, tOrO(1 + 2 * hf + 4 * j)));
        }
        quad_transpose(x, quad);
        const int ch = 32 * a + 8 * quad;
        if (row_stored && ch < p.head_dim_v)
          *reinterpret_cast<uint4*>(out_row + ch) = make_uint4(x[0], x[1], x[2], x[3]);
      }
    } else if (row_stored) {
#pragma unroll
      for (int j = 0; j < C::kDv / 8; ++j)
        if (8 * j < p.head_dim_v)  // the padding channels of a narrower head dim are never stored
          *reinterpret_cast<uint32_t*>(out_row + 8 * j + 2 * quad) =
              arch::pack2<OutNvT>(normalized(hf, tOrO(2 * hf + 4 * j)), normalized(hf, tOrO(1 + 2 * hf + 4 * j)));
    }
  }
}

// The zero warp (warp 1 of the producer warpgroup, otherwise idle): every V tile lands on
// v_landed; the zero warp zeroes the rows of it no row of the work tile sees -- past the tile's
// last key (the last tile) and, paged or with a staged V^T, before its first (block_keys' head,
// the first tile) -- and then lets the consumers at it through v_full. A TMA box reads whole
// tiles, and past a sequence's end lie other sequences' keys or unwritten cache rows: their P
// is 0, but 0 * NaN in P V would leak into the output. The proxy fence makes the generic stores
// visible to wgmma's reads and orders them before the TMA write that refills the buffer for a
// later tile (which waits for the consumers' release, after v_full). Done here rather than by
// the consumers, the fill costs their warpgroups nothing and needs no barrier between them
// (which, both reading all of V, waited for each other's fill at the end of every work tile).
template <class C, class Smem>
__device__ __forceinline__ void zero_warp(const Schedule& sc, Smem& sh, int lane) {
  using T = typename C::T;
  constexpr int kBlockN = C::kBlockN, kDv = C::kDv, kStages = C::kStages;
  Tensor sV = make_tensor(make_smem_ptr(sh.v.data()), typename C::SmemV{});
  uint32_t kv = 0;  // V tiles so far, over all work tiles, as the producer counts them
  for (uint32_t r = 0;; ++r) {
    const TileFacts f = take_tile(sh, r);
    if (f.i >= sc.tiles) break;
    const int tiles = warp_uniform(f.w.m0 < f.s.q_len_full ? f.bk.tiles : 0);
    const int last_keys = warp_uniform(f.bk.hi - f.bk.lo - (tiles - 1) * kBlockN);
    const int head = warp_uniform(f.bk.head);
    for (int t = 0; t < tiles; ++t, ++kv) {
      const int st = kv % kStages;
      wait_barrier(sh.v_landed[st], (kv / kStages) & 1);
      const int valid = t == tiles - 1 ? last_keys : kBlockN, hd = t == 0 ? head : 0;
      if (valid < kBlockN || hd > 0) {
        if constexpr (C::kFp8) {  // a staged V^T holds key n of the tile at column fp8_pv_position(n)
          for (int idx = lane; idx < (kBlockN - valid) * kDv; idx += 32)
            sV(idx % kDv, sm90_fp8::fp8_pv_position(valid + idx / kDv), st) = T(0.f);
          for (int idx = lane; idx < hd * kDv; idx += 32)
            sV(idx % kDv, sm90_fp8::fp8_pv_position(idx / kDv), st) = T(0.f);
        } else {
          // 16 bytes at a time: a key's channels 8 u .. 8 u + 7 are one 16-byte unit of the
          // 128-byte swizzle (which permutes whole units)
          constexpr int kUnits = kDv / 8;
          const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
          for (int idx = lane; idx < (kBlockN - valid) * kUnits; idx += 32)
            *reinterpret_cast<uint4*>(&sV(8 * (idx % kUnits), valid + idx / kUnits, st)) = zero;
          for (int idx = lane; idx < hd * kUnits; idx += 32)
            *reinterpret_cast<uint4*>(&sV(8 * (idx % kUnits), idx / kUnits, st)) = zero;
        }
        cutlass::arch::fence_view_async_shared();
      }
      __syncwarp();
      if (lane == 0) arrive_barrier(sh.v_full[st]);
    }
  }
}

// Pages that do not hold whole key tiles (Config::kPageBox): the tile whose first storage
// position is key0 (a multiple of kBlockN, itself of kPageBox) arrives as kBlockN / kPageBox
// boxes, box c from the page holding keys key0 + kPageBox c .. (a page size that is a multiple of
// kPageBox: a box never straddles two pages). A box past the table row's last column reads that
// column at a row past the page's end, which the TMA fills with zeros. Columns the host does not
// check (before a left padding's first page, past the sequence's last) may hold anything: an id
// outside the pool is an out-of-bounds box (zeros), another page's id loads its rows; either way
// those keys are masked in K and their V rows cleared by the zero warp. The transaction count is
// the whole tile's in every case.
//
// The walk over a tile's boxes, page by page: the page id is loaded once per page the tile
// touches (a 64-key page: 2 loads per 128-key tile, not 8) and the row inside it advances by
// kPageBox, so no box pays a division by the page size; the producer thread does this alone,
// between its buffer wait and the TMA issues. Past the table row's last column the row keeps
// growing past the page's end (zeros). Host and device: tests/host/sm90_page_walk_check.cpp
// checks it against the per-box formula.
struct PageWalk {
  const int32_t* table_row;
  int page_size, last_col, col, row, page;
  MATE_HD PageWalk(const FmhaParams& p, const SeqInfo& s, int key0)
      : table_row(p.page_table + static_cast<int64_t>(s.cache_row) * p.page_table_batch_stride),
        page_size(p.page_size),
        last_col(p.max_pages - 1) {
    col = imin(key0 / page_size, last_col);
    row = key0 - col * page_size;
    page = table_row[col];
  }
  MATE_HD void advance(int keys) {
    row += keys;
    if (row == page_size && col < last_col) {
      row = 0;
      page = table_row[++col];
    }
  }
};
template <class C, class Tma, class TS>
__device__ __forceinline__ void load_page_boxes_k(const FmhaParams& p, const SeqInfo& s, const Tma& tma, uint64_t& bar,
                                                  TS&& s_stage, int key0, int hk) {
  if constexpr (!C::kFp8) {  // fp8 calls are never paged
    constexpr int kBox = C::kPageBox;
    Tensor mK = tma.get_tma_tensor(k_shape(p));
    PageWalk w(p, s, key0);
#pragma unroll 1
    for (int c = 0; c < C::kBlockN / kBox; ++c, w.advance(kBox)) {
      Tensor g = local_tile(domain_offset(make_coord(w.row, _0{}), mK(_, _, hk, w.page)), Shape<Int<kBox>, Int<C::kD>>{},
                            make_coord(0, 0));
      Tensor sb = local_tile(s_stage, Shape<Int<kBox>, Int<C::kD>>{}, make_coord(c, 0));
      auto [tg, ts] = tma_partition(tma, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sb), group_modes<0, 2>(g));
      copy(tma.with(bar), tg, ts);
    }
  }
}
template <class C, class Tma, class TS>
__device__ __forceinline__ void load_page_boxes_v(const FmhaParams& p, const SeqInfo& s, const Tma& tma, uint64_t& bar,
                                                  TS&& s_stage, int key0, int hk) {
  if constexpr (!C::kFp8) {  // fp8 calls are never paged
    constexpr int kBox = C::kPageBox;
    Tensor mV = tma.get_tma_tensor(v_shape(p));
    PageWalk w(p, s, key0);
#pragma unroll 1
    for (int c = 0; c < C::kBlockN / kBox; ++c, w.advance(kBox)) {
      Tensor g = local_tile(domain_offset(make_coord(_0{}, w.row), mV(_, _, hk, w.page)), Shape<Int<C::kDv>, Int<kBox>>{},
                            make_coord(0, 0));
      Tensor sb = local_tile(s_stage, Shape<Int<C::kDv>, Int<kBox>>{}, make_coord(0, c));
      auto [tg, ts] = tma_partition(tma, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sb), group_modes<0, 2>(g));
      copy(tma.with(bar), tg, ts);
    }
  }
}

// The producer's load of work tile number qn's Q into buffer qn % kQStages. A buffer is rewritten
// only once both warpgroups released its previous tile's Q.
template <class C, class Smem, class Tma, class TG, class TS>
__device__ __forceinline__ void load_q_tile(Smem& sh, const Tma& tma_q, const TG& tQg, TS& tQs, uint32_t& qn) {
  const uint32_t qb = qn % C::kQStages;
  if (qn >= C::kQStages) wait_barrier(sh.q_empty[qb], (qn / C::kQStages - 1) & 1);
  set_barrier_transaction_bytes(sh.q_full[qb], C::kQBytes);
  copy(tma_q.with(sh.q_full[qb]), tQg, tQs(_, qb));
  ++qn;
}

// kPlain: logit = softmax_scale * dot with a positive scale (scores_are_plain), so row maxima
// are taken on raw scores and the scale folds into exp2's FFMA; otherwise (softcap, ALiBi, a
// non-positive scale) every score first becomes its base-2 logit through ScoreMod, as in
// fmha_mma.cu's kPlain = false instantiation.
template <class C, bool kPlain>
__global__ void __launch_bounds__(C::kThreads, 1)
    fmha_sm90_kernel(const FmhaParams p, const Schedule sc, CUTE_GRID_CONSTANT const typename C::TmaQ tma_q,
                     CUTE_GRID_CONSTANT const typename C::TmaK tma_k, CUTE_GRID_CONSTANT const typename C::TmaV tma_v,
                     CUTE_GRID_CONSTANT const typename C::TmaKBox tma_kb,
                     CUTE_GRID_CONSTANT const typename C::TmaVBox tma_vb) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename C::T;
  constexpr int kD = C::kD, kDv = C::kDv, kBlockM = C::kBlockM, kBlockN = C::kBlockN, kStages = C::kStages;
  static_assert(kBlockM == 128, "work_at numbers the tiles in 128-row blocks");
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  auto& sh = *reinterpret_cast<typename C::Smem*>(smem_raw);
  // fp8: P = exp2(logit - row max + 8), in (0, 256] instead of (0, 1], as e4m3 for P V. e4m3
  // keeps 3 mantissa bits down to 2^-6 and flushes below 2^-9: in [0, 1] the many small
  // probabilities of a long row would lose much of their mass (a simulation lost 4-11 % at
  // 8k-32k keys). The factor 2^8 cancels in out = O / row sum and comes off lse.
  constexpr float kPOffset = C::kFp8 ? 8.f : 0.f;

  if (threadIdx.x == 0) {
    for (int qb = 0; qb < C::kQStages; ++qb) {
      initialize_barrier(sh.q_full[qb], 1);
      initialize_barrier(sh.q_empty[qb], C::kConsumers);  // one arrival per consumer warpgroup
    }
    for (int st = 0; st < kStages; ++st) {
      initialize_barrier(sh.k_full[st], 1);
      initialize_barrier(sh.v_landed[st], 1);
      initialize_barrier(sh.v_full[st], 1);  // the zero warp's arrival
      initialize_barrier(sh.k_empty[st], C::kConsumers);
      initialize_barrier(sh.v_empty[st], C::kConsumers);
    }
    for (int slot = 0; slot < 2; ++slot) {
      initialize_barrier(sh.tile_full[slot], 1);
      initialize_barrier(sh.tile_empty[slot], C::kConsumerThreads + 32);  // and the zero warp's lanes
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  // ---- producer: one thread issues every load of every work tile ---------------------------
  if (threadIdx.x < 128) {
    cutlass::arch::warpgroup_reg_dealloc<C::kProducerRegs>();
    if (threadIdx.x < 32 && elect_one_sync()) {
      Tensor sQ = make_tensor(make_smem_ptr(sh.q.data()), typename C::SmemQ{});
      Tensor sK = make_tensor(make_smem_ptr(sh.k.data()), typename C::SmemK{});
      Tensor sV = make_tensor(make_smem_ptr(sh.v.data()), typename C::SmemV{});
      uint32_t kv = 0;  // K / V tiles loaded so far, over all work tiles: buffer kv % kStages
      uint32_t qn = 0;  // Q tiles loaded so far: buffer qn % kQStages
      [[maybe_unused]] uint32_t trace_n = 0;
      for (uint32_t r = 0;; ++r) {
        TileFacts f;
        f.i = draw_tile(sc, r);
        TRACE_EVENT(trace_n, 0, r, kTraceDraw);
        if (f.i < sc.tiles) {
          f.w = work_at(sc, f.i);
          f.s = seq_info(p, f.w.b);
          if (f.w.m0 < f.s.q_len_full) f.bk = block_keys<kBlockM, kBlockN, C::kFp8>(p, f.s, f.w.m0);
        }
        hand_over_tile(sh, r, f);  // the end marker (i >= tiles) too
        if (f.i >= sc.tiles) break;
        const Work& w = f.w;
        const SeqInfo& s = f.s;
        const BlockKeys& bk = f.bk;
        if (w.m0 >= s.q_len_full) continue;  // past this sequence's rows: the consumers skip it too
        if (bk.tiles == 0) continue;  // no keys: no loads, the consumers store zeros
        const int hk = w.h / (p.num_heads / p.num_heads_k);
        // Tile origins are arbitrary rows (a sequence's first row, a key interval's start): the
        // views are shifted there; rows past the tensor's end arrive as zeros.
        const int q0 = static_cast<int>(s.q_row0) + w.m0;
        const int k0 = static_cast<int>(s.k_row0) + s.k_start + bk.lo;
        const int bq = p.q_is_ragged ? 0 : w.b, bkv = p.k_is_ragged ? 0 : s.cache_row;
        Tensor mQ = tma_q.get_tma_tensor(q_shape(p))(_, _, w.h, bq);
        Tensor mK = tma_k.get_tma_tensor(k_shape(p))(_, _, hk, bkv);
        Tensor mV = tma_v.get_tma_tensor(v_shape(p))(_, _, hk, bkv);
        Tensor gQ = local_tile(domain_offset(make_coord(q0, _0{}), mQ), Shape<Int<kBlockM>, Int<kD>>{}, make_coord(0, 0));
        Tensor gK = local_tile(domain_offset(make_coord(k0, _0{}), mK), Shape<Int<kBlockN>, Int<kD>>{}, make_coord(_, 0));
        Tensor gV = local_tile(domain_offset(make_coord(_0{}, k0), mV), Shape<Int<kDv>, Int<kBlockN>>{}, make_coord(0, _));
        auto [tQg, tQs] = tma_partition(tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
        auto [tKg, tKs] = tma_partition(tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
        auto [tVg, tVs] = tma_partition(tma_v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));
        CUTE_STATIC_ASSERT_V(size<1>(tKs) == Int<kStages>{} && size<1>(tVs) == Int<kStages>{} &&
                             size<1>(tQs) == Int<C::kQStages>{});
        // Two buffers: Q first, into the buffer the work tile before last released long ago, so it
        // lands during the current work tile's last steps.
        if constexpr (C::kQStages > 1) load_q_tile<C>(sh, tma_q, tQg, tQs, qn);
        if constexpr (C::kQStages > 1) TRACE_EVENT(trace_n, 0, r, kTraceQ);

        constexpr bool kPaged = !C::kFp8;  // fp8 calls are never paged (fmha_sm90_fits): no lookup code
        for (int t = 0; t < bk.tiles; ++t, ++kv) {
          const int st = kv % kStages;
          const uint32_t phase = (kv / kStages) & 1;
          // a buffer's first use needs no wait; later ones wait for the release of load kv - kStages
          // (which may belong to the previous work tile: the pipeline runs on across tiles)
          // paged: the page holding this tile's keys (block_keys aligned the tiles to pages),
          // looked up before the buffer wait so that the load's latency hides behind it
          int page = 0, prow = 0;
          // pages that do not hold whole tiles: a box per kPageBox keys, each looked up after the wait
          const bool boxes = kPaged && p.page_table != nullptr && p.page_size % kBlockN != 0;
          const int key0 = s.k_start + bk.lo + t * kBlockN;  // the tile's first storage position
          if (kPaged && p.page_table != nullptr && !boxes) {
            const int key = s.k_start + bk.lo + t * kBlockN;
            page = p.page_table[static_cast<int64_t>(s.cache_row) * p.page_table_batch_stride + key / p.page_size];
            prow = key % p.page_size;
          }
          if (kv >= kStages) wait_barrier(sh.k_empty[st], phase ^ 1);
          set_barrier_transaction_bytes(sh.k_full[st], C::kKBytes);
          if (kPaged && boxes) {
            load_page_boxes_k<C>(p, s, tma_kb, sh.k_full[st], sK(_, _, st), key0, hk);
          } else if (kPaged && p.page_table != nullptr) {
            Tensor gKp = local_tile(domain_offset(make_coord(prow, _0{}), tma_k.get_tma_tensor(k_shape(p))(_, _, hk, page)),
                                    Shape<Int<kBlockN>, Int<kD>>{}, make_coord(0, 0));
            auto [tKgp, tKsp] = tma_partition(tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gKp));
            copy(tma_k.with(sh.k_full[st]), tKgp, tKsp(_, st));
          } else {
            copy(tma_k.with(sh.k_full[st]), tKg(_, t), tKs(_, st));
          }
          // One buffer: Q after the first K, since that K buffer frees a step earlier than Q (the
          // previous work tile's second-to-last Q K^T releases it, its last Q K^T releases Q).
          if (t == 0) TRACE_EVENT(trace_n, 0, r, kTraceFirstK);
          if (C::kQStages == 1 && t == 0) load_q_tile<C>(sh, tma_q, tQg, tQs, qn);
          if (C::kQStages == 1 && t == 0) TRACE_EVENT(trace_n, 0, r, kTraceQ);
          if (kv >= kStages) wait_barrier(sh.v_empty[st], phase ^ 1);
          set_barrier_transaction_bytes(sh.v_landed[st], C::kVBytes);
          if (kPaged && boxes) {
            load_page_boxes_v<C>(p, s, tma_vb, sh.v_landed[st], sV(_, _, st), key0, hk);
          } else if (kPaged && p.page_table != nullptr) {
            Tensor gVp = local_tile(domain_offset(make_coord(_0{}, prow), tma_v.get_tma_tensor(v_shape(p))(_, _, hk, page)),
                                    Shape<Int<kDv>, Int<kBlockN>>{}, make_coord(0, 0));
            auto [tVgp, tVsp] = tma_partition(tma_v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gVp));
            copy(tma_v.with(sh.v_landed[st]), tVgp, tVsp(_, st));
          } else {
            copy(tma_v.with(sh.v_landed[st]), tVg(_, t), tVs(_, st));
          }
        }
        TRACE_EVENT(trace_n, 0, r, kTraceLastV);
      }
      TRACE_END(trace_n, 0);
    } else if (threadIdx.x >= 32 && threadIdx.x < 64) {
      zero_warp<C>(sc, sh, threadIdx.x - 32);
    }
    return;
  }

  // ---- consumers --------------------------------------------------------------------------
  cutlass::arch::warpgroup_reg_alloc<C::kConsumerRegs>();
  const int ct = threadIdx.x - 128;  // 0 .. 255
  const int group = warp_uniform(ct / 128), warp = (ct % 128) / 32, lane = ct % 32;
  const int quad = lane % 4;
  // Does this thread arrive on the empty barriers? One per warpgroup: a wgmma is one operation
  // of the whole warpgroup, so once any of its threads has waited for it, its shared-memory
  // reads are done (CUTLASS's pipelines release likewise). 256 arrivals per buffer were 16
  // warp-wide mbarrier arrives per key tile (the same speed on the H200, within its noise).
  const bool releaser = ct % 128 == 0;

  typename C::MmaQK mma_qk;
  typename C::MmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(ct);
  auto thr_pv = mma_pv.get_thread_slice(ct);
  Tensor sQ = make_tensor(make_smem_ptr(sh.q.data()), typename C::SmemQ{});
  Tensor sK = make_tensor(make_smem_ptr(sh.k.data()), typename C::SmemK{});
  Tensor sV = make_tensor(make_smem_ptr(sh.v.data()), typename C::SmemV{});
  Tensor tSrQ = thr_qk.partition_fragment_A(sQ);  // wgmma descriptors of this warpgroup's Q rows (.., buffer)
  Tensor tSrK = thr_qk.partition_fragment_B(sK);  // (.., k-steps, stage)
  Tensor tOrV = thr_pv.partition_fragment_B(sV);
  Tensor tSrS = partition_fragment_C(mma_qk, Shape<Int<kBlockM>, Int<kBlockN>>{});  // S, then P in fp32
  Tensor tOrO = partition_fragment_C(mma_pv, Shape<Int<kBlockM>, Int<kDv>>{});
  Tensor tOrP = make_tensor<T>(partition_shape_A(mma_pv, Shape<Int<kBlockM>, Int<kBlockN>>{}));
  static_assert(size(tSrS) == kBlockN / 2 && size(tOrO) == kDv / 2 && size(tOrP) == size(tSrS));
  CUTE_STATIC_ASSERT_V(size<1>(tSrQ) == _1{} && size<2>(tSrQ) == Int<kD / C::kKStep>{} &&
                       size<3>(tSrQ) == Int<C::kQStages>{} &&
                       size<3>(tSrK) == Int<kStages>{});
  CUTE_STATIC_ASSERT_V(size<1>(tOrP) == _1{} && size<2>(tOrP) == Int<kBlockN / C::kKStep>{} &&
                       size<3>(tOrV) == Int<kStages>{});

  // The pipeline position, as few registers as possible (live across the epilogue, next to O):
  // bits 0 .. log2(2 kStages) - 1 the K / V loads consumed so far modulo 2 kStages (all that
  // buffer and phase depend on), the bits above them the Q loads consumed modulo 2 kQStages.
  static_assert(kStages == 2 || kStages == 4, "the pipeline position keeps counts modulo 2 kStages");
  constexpr uint32_t kKvMask = 2 * kStages - 1, kQShift = kStages == 2 ? 2 : 3, kQMask = 2 * C::kQStages - 1;
  uint32_t pos = 0;
  // Warpgroup 0 issues first (ping-pong, below); from then on each hand-over of warpgroup 1
  // (the last of a work tile included) is warpgroup 0's next turn, in the next work tile too.
  if (group == 1) cutlass::arch::NamedBarrier::arrive(C::kConsumerThreads, kSchedBarrier + 0);
  [[maybe_unused]] uint32_t trace_n = 0;  // this warpgroup's trace events (its first thread's)
  for (uint32_t r = 0;; ++r) {
    const TileFacts f = take_tile(sh, r);  // the producer's draw and what it derived
    if (f.i >= sc.tiles) break;
    if (releaser) TRACE_EVENT(trace_n, 1 + group, r, kTraceDraw);
    const int b = f.w.b, h = f.w.h, m0 = f.w.m0;
    const SeqInfo& s = f.s;
    if (warp_uniform(m0 < s.q_len_full) == 0) continue;  // no rows here (a shorter sequence of a ragged batch)
    const BlockKeys& bk = f.bk;
    const int kmin = warp_uniform(bk.lo), num_tiles = warp_uniform(bk.tiles);

    // This thread's two rows (block rows 64 group + 16 warp + lane / 4 + 8 hf) and their keys.
    int row_lo[2], row_hi[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int m = m0 + group * 64 + warp * 16 + lane / 4 + hf * 8;
      KeyInterval keys;  // empty past the real rows: they are computed but never stored
      if (m < s.q_len) keys = key_range_for_row(p, s, m);
      row_lo[hf] = keys.lo;
      row_hi[hf] = keys.hi;
    }
    GroupKeys gk;
    {
      const int first = m0 + group * 64, last = imin(first + 64, s.q_len) - 1;
      if (first <= last) {
        const KeyInterval a = key_range_for_row(p, s, first), z = key_range_for_row(p, s, last);
        gk.hi_min = warp_uniform(a.hi);
        gk.lo_max = warp_uniform(z.lo);
        gk.full = warp_uniform(last - first == 63);
      }
    }

    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};  // max on raw scores
    const ScoreMod mod = score_mod(p, s, b, h);
    // FP8 staged as bf16 (launch.cpp): q and k's descales scale the logits, v's the output; 1
    // without, as in fmha_mma.cu. kPlain folds the product's magnitude into exp2's scale, so
    // row maxima on raw scores must order like the logits: a negative, zero or NaN product
    // first multiplies the Q tile in shared memory by its sign (or by itself: 0, NaN), exact
    // in bf16 (q_sign, below) -- no per-score work on any path.
    // The kv head's descales, only where a call has any (block-uniform): the kv head is two
    // integer divisions, which with the descales' address arithmetic were a third of a work
    // tile's prologue on every call (Nsight Compute's samples, session 12).
    float dscale = 1.f, vscale = 1.f;
    if (p.q_descale != nullptr || p.k_descale != nullptr || p.v_descale != nullptr) {
      const int hk = h / (p.num_heads / p.num_heads_k);
      dscale = (p.q_descale ? p.q_descale[b * p.q_descale_batch_stride + hk * p.q_descale_head_stride] : 1.f) *
               (p.k_descale ? p.k_descale[b * p.k_descale_batch_stride + hk * p.k_descale_head_stride] : 1.f);
      vscale = p.v_descale ? p.v_descale[b * p.v_descale_batch_stride + hk * p.v_descale_head_stride] : 1.f;
    }
    const bool q_sign = kPlain && !(dscale > 0.f);  // block-uniform: both warpgroups see it
    const float dmag = fabsf(dscale) > 0.f ? fabsf(dscale) : 1.f;  // 0 / NaN: Q itself carries it
    // score units -> base-2 logits: raw scores (kPlain) or logits already in base 2
    const float sl = kPlain ? p.softmax_scale * kLog2e * dmag : 1.f;

    // The online softmax of one S tile in base 2, in place: masks, takes the new row maxima and
    // turns S into exp2 values (this thread's share of P, fp32), adding them to row_sum; corr
    // is what O must be scaled by before the tile's P V is added. Touches neither O nor P's
    // registers, so it runs while the previous tile's O += P V is in flight.
    auto softmax_tile = [&](int n0, bool all, float (&corr)[2]) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const KeyInterval keys{row_lo[hf] - n0, row_hi[hf] - n0};  // relative to n0
        // fp8: the row's maximum and sum in four independent chains (a thread's 32 values of a
        // 128-key row in one chain are 32 dependent FMNMX / FADD, whose latency sets the pace of
        // an fp8 softmax: +3-7 % on the H200). 16 bits keep one chain: with four the D 64
        // kernel ran 40 % slower in the same run (D 128 / 256 unchanged); not understood yet.
        constexpr int kChains = C::kFp8 ? 4 : 1;
        float mxc[kChains];
#pragma unroll
        for (int c = 0; c < kChains; ++c) mxc[c] = -INFINITY;
        if constexpr (!kPlain) {  // the logit (ScoreMod) in base 2, masked, and the maximum
          const int m = m0 + group * 64 + warp * 16 + lane / 4 + hf * 8;
#pragma unroll
          for (int j = 0; j < kBlockN / 8; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float& x = tSrS(e + 2 * hf + 4 * j);
              // key n0 + column, formed without signed overflow (past the last key it is masked anyway)
              const int key =
                  static_cast<int>(static_cast<unsigned>(n0) + static_cast<unsigned>(8 * j + 2 * quad + e));
              x = mod.logit(x * dscale, m, key) * kLog2e;
              if (!all && !keys.contains(8 * j + 2 * quad + e)) x = -INFINITY;
              mxc[j % kChains] = fmaxf(mxc[j % kChains], x);
            }
        } else {
          // Plain scores: the mask only on tiles that cross a row's key-interval edge. `all` is
          // warp-uniform, so this is a branch the other tiles jump over; as a select in the max
          // loop it cost five instructions per score on every tile (two compares, two predicate
          // ops, the select: 320 of a thread's ~830 per 128-key tile in the H200 profile). The
          // ScoreMod loop above keeps the select: split like this it spilled 150 bytes more.
          if (!all) {
#pragma unroll
            for (int j = 0; j < kBlockN / 8; ++j)
#pragma unroll
              for (int e = 0; e < 2; ++e)
                if (!keys.contains(8 * j + 2 * quad + e)) tSrS(e + 2 * hf + 4 * j) = -INFINITY;
          }
#pragma unroll
          for (int j = 0; j < kBlockN / 8; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) mxc[j % kChains] = fmaxf(mxc[j % kChains], tSrS(e + 2 * hf + 4 * j));
        }
        float mx = mxc[0];
#pragma unroll
        for (int c = 1; c < kChains; ++c) mx = fmaxf(mx, mxc[c]);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // The reference maximum moves only when the tile's passes it by more than the slack (base
        // 2): P may then reach 2^slack, and O is rescaled far less often (after a row's first
        // tiles, almost never). fp8 keeps none: P is already scaled to e4m3's top (kPOffset).
        // NaN maxima (all scores NaN, or no keys yet on either side) leave the reference alone.
        const float slack = C::kFp8 ? 0.f : sc.rescale_slack;
        const bool grow = (mx - row_max[hf]) * sl > slack;
        const float m_new = grow ? mx : row_max[hf];
        const float m_use = m_new == -INFINITY ? 0.f : m_new;  // a row with no key yet
        corr[hf] = grow ? arch::fast_exp2((row_max[hf] - m_use) * sl) : 1.f;
        const float m_scaled = m_use * sl - kPOffset;
        row_max[hf] = m_new;
        float sumc[kChains] = {};
#pragma unroll
        for (int j = 0; j < kBlockN / 8; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float& x = tSrS(e + 2 * hf + 4 * j);
            const float arg = fmaf(x, sl, -m_scaled);
            x = arch::fast_exp2(arg);
            sumc[j % kChains] += x;
          }
        float sum = sumc[0];
#pragma unroll
        for (int c = 1; c < kChains; ++c) sum += sumc[c];
        row_sum[hf] = row_sum[hf] * corr[hf] + sum;  // this lane's part; the quad sums at the end
      }
    };

    // Software pipeline inside the warpgroup: step t issues S_t = Q K_t^T, then O += P_{t-1}
    // V_{t-1}, waits for S_t only and runs its softmax while the tensor cores work on P V;
    // then waits for P V, rescales O and packs P_t into the registers the next step's P V
    // reads. The last step (t = num_tiles) only adds the last P V.
    // Ping-pong: the two warpgroups take turns issuing their GEMMs (named barriers
    // kSchedBarrier + group), so one warpgroup's softmax runs while the other's GEMMs keep the
    // tensor cores busy. Both run the same number of steps in every work tile (num_tiles + 1,
    // whatever keys each has), so the turns alternate strictly across work tiles too: warpgroup
    // 1's last hand-over of a tile lets warpgroup 0 start the next one while warpgroup 1 still
    // runs its last P V and epilogue (the tensor cores would idle through both epilogues if
    // warpgroup 0 waited for warpgroup 1's next tile to begin).
    const uint32_t qcount = pos >> kQShift;  // Q loads consumed, modulo 2 kQStages
    const int qb = warp_uniform(static_cast<int>(qcount % C::kQStages));
    if (releaser) TRACE_EVENT(trace_n, 1 + group, r, kTraceReady);
    if (num_tiles > 0) wait_barrier(sh.q_full[qb], (qcount / C::kQStages) & 1);
    if (releaser) TRACE_EVENT(trace_n, 1 + group, r, kTraceQ);
    if (num_tiles > 0 && q_sign) {
      // Q times sign(dscale) -- or times dscale when it is 0 or NaN -- by all 256 consumer
      // threads; the proxy fence makes the generic stores visible to wgmma's reads and orders
      // them before the TMA write of the next work tile's Q (after q_empty, which comes later)
      const float f = dscale < 0.f ? -1.f : dscale;
      for (int idx = ct; idx < kBlockM * kD; idx += C::kConsumerThreads) {
        T& x = sQ(idx % kBlockM, idx / kBlockM, qb);
        x = T(static_cast<float>(x) * f);
      }
      cutlass::arch::fence_view_async_shared();
      cutlass::arch::NamedBarrier::sync(C::kConsumerThreads, kQScaleBarrier);
    }
    // One step; kS: it issues S_t = Q K_t^T (t < num_tiles), kPV: it adds P_{t-1} V_{t-1}
    // (t > 0). Both are compile-time, so no wgmma sits under a runtime branch: ptxas cannot
    // tell that such a branch is uniform over the warpgroup, moves the accumulators where its
    // paths join, and then serializes every wgmma of the kernel (ptxas info C7513 / C7515 /
    // C7518 / C7520: a fence and a wait around each, no softmax / tensor core overlap). So a
    // warpgroup computes S and its softmax even for a tile where it has no keys (rare: an edge
    // tile of a window or of rows past seqused_q); every score is masked there, P is zeros.
    auto step = [&](int t, auto s_tag, auto pv_tag) {
      constexpr bool kS = decltype(s_tag)::value, kPV = decltype(pv_tag)::value;
      const uint32_t g = (pos & kKvMask) + t;  // this tile's load number (mod 2 kStages); g - 1: tile t - 1's
      const int st = g % kStages, pst = (g - 1) % kStages;
      const int n0 = kmin + t * kBlockN;
      const bool all = gk.covers(n0, kBlockN);  // no row of the warpgroup needs per-element masking

      // Every consumer waits for and releases every tile, computing or not: a release before
      // the tile has landed could complete the buffer's next phase early.
      if (releaser && t < 32) TRACE_EVENT(trace_n, 1 + group, r, kTraceStep + t);
      if constexpr (kS) wait_barrier(sh.k_full[st], (g / kStages) & 1);
      if constexpr (kPV) {
        // (the zero warp has zeroed the rows of this V tile no row sees: zero_v_rows)
        wait_barrier(sh.v_full[pst], ((g - 1) / kStages) & 1);
      }
      cutlass::arch::NamedBarrier::sync(C::kConsumerThreads, kSchedBarrier + group);
      if (kS && !kPV && releaser) TRACE_EVENT(trace_n, 1 + group, r, kTraceFirstS);
      if (releaser && t < 32) TRACE_EVENT(trace_n, 1 + group, r, kTraceTurn + t);
      if constexpr (kS || kPV) {
        warpgroup_fence_operand(tSrS);
        warpgroup_fence_operand(tOrO);
        warpgroup_fence_operand(tOrP);
        warpgroup_arrive();  // the softmax's writes to S, O and P come before the products below
      }
      if constexpr (kS) {
        wgmma_issue<true>(mma_qk, tSrQ(_, _, _, qb), tSrK(_, _, _, st), tSrS);
        warpgroup_commit_batch();
      }
      if constexpr (kPV) {
        wgmma_issue<false>(mma_pv, tOrP, tOrV(_, _, _, pst), tOrO);
        warpgroup_commit_batch();
      }
      cutlass::arch::NamedBarrier::arrive(C::kConsumerThreads, kSchedBarrier + 1 - group);
      float corr[2] = {1.f, 1.f};
      if constexpr (kS) {
        warpgroup_wait<kPV ? 1 : 0>();  // S_t is done; P V may still run
        warpgroup_fence_operand(tSrS);
        if (releaser) arrive_barrier(sh.k_empty[st]);
        // This warpgroup's last Q K^T of the work tile is done: the producer may load the
        // next work tile's Q once both warpgroups say so, while this one still runs its
        // softmax, last P V and epilogue.
        if (t == num_tiles - 1 && releaser) arrive_barrier(sh.q_empty[qb]);
        // Also where the warpgroup has no keys: every score is masked, P comes out zeros and
        // corr leaves O alone. A branch here would define P's registers on two paths.
        softmax_tile(n0, all, corr);
      }
      if constexpr (kPV) {
        warpgroup_wait<0>();  // P V is done: O may be rescaled, P rewritten, V released
        warpgroup_fence_operand(tOrO);
        warpgroup_fence_operand(tOrP);
        if (releaser) arrive_barrier(sh.v_empty[pst]);
      }
      if constexpr (kS) {
        // O changes only where a row's maximum grew (corr is exactly exp2(0) = 1 otherwise),
        // which after a row's first tiles is rare: the warp skips the kDv / 2 multiplies when
        // none of its rows needs them (a warp-uniform vote, so the branch is real).
        if (__any_sync(0xffffffffu, corr[0] != 1.f || corr[1] != 1.f)) {
#pragma unroll
          for (int hf = 0; hf < 2; ++hf)
#pragma unroll
            for (int j = 0; j < kDv / 8; ++j) {
              tOrO(2 * hf + 4 * j) *= corr[hf];
              tOrO(1 + 2 * hf + 4 * j) *= corr[hf];
            }
        }
        // P in the input type, in S's register order (the A operand layout, see Config); fp8:
        // four accumulators per register, picked by fp8_p_source (V^T's key order matches)
        uint32_t* pr = reinterpret_cast<uint32_t*>(raw_pointer_cast(tOrP.data()));
        if constexpr (C::kFp8) {
#pragma unroll
          for (int jj = 0; jj < kBlockN / 16; ++jj)
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
              using sm90_fp8::fp8_p_source;
              pr[2 * jj + hh] = arch::pack_e4m3x4(tSrS(fp8_p_source(jj, hh, 0)), tSrS(fp8_p_source(jj, hh, 1)),
                                                  tSrS(fp8_p_source(jj, hh, 2)), tSrS(fp8_p_source(jj, hh, 3)));
            }
        } else {
#pragma unroll
          for (int i = 0; i < size(tSrS) / 2; ++i) pr[i] = arch::pack2<typename C::NvT>(tSrS(2 * i), tSrS(2 * i + 1));
        }
      }
    };
    // O starts from zero. S and P are rewritten before they are read, but the compiler sees
    // wgmma read S (an in/out operand) and P flow from one work tile's last step to the next
    // tile's first P V: without defining both here, it keeps them (60 registers at D 256)
    // alive through the epilogue and spills O there.
    clear(tOrO);
    clear(tSrS);
    clear(tOrP);
    if (num_tiles > 0) {
      step(0, cute::true_type{}, cute::false_type{});
      for (int t = 1; t < num_tiles; ++t) step(t, cute::true_type{}, cute::true_type{});
      step(num_tiles, cute::false_type{}, cute::true_type{});
      if (releaser) TRACE_EVENT(trace_n, 1 + group, r, kTraceLastPV);
    } else {
      step(0, cute::false_type{}, cute::false_type{});  // no keys: only the ping-pong hand-overs
    }
    if (num_tiles > 0) pos = (((pos & kKvMask) + num_tiles) & kKvMask) | (((qcount + 1) & kQMask) << kQShift);

    // ---- epilogue: normalize and store (fmha_mma.cu's rules) ------------------------------
    // Runs while the producer already loads the next work tile's Q and first K / V tiles.
    constexpr float kLn2 = 0.6931471805599453f;
    // Per row: its scale (v's descale / row sum, times the sink's share), lse, and whether it has
    // keys. A row without keys gets exact zeros, whatever 0 * V left in its accumulators (they may
    // hold NaN): the warp multiplies where none of its rows lacks keys (the common case: a vote,
    // so the branch is real) and selects otherwise (zeroing O first made the compiler copy all of
    // it through other registers; a select per element on every tile was 64 instructions more).
    float scale[2];
    bool has[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float l = row_sum[hf];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int m = m0 + group * 64 + warp * 16 + lane / 4 + hf * 8;
      const int64_t row = s.q_row0 + m;
      const bool padded = m >= s.q_len;  // past seqused_q: out 0, lse -inf (past q_len_full: not stored)
      has[hf] = !padded && (l > 0.f || l != l);  // NaN inputs propagate
      float lse = has[hf] ? (row_max[hf] * sl - kPOffset) * kLn2 + logf(l) : -INFINITY;
      scale[hf] = has[hf] ? vscale / l : 0.f;
      if (p.learnable_sink && !padded) scale[hf] *= apply_fmha_sink(lse, p.learnable_sink[h]);
      if (quad == 0 && m < s.q_len_full)
        p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + row * p.lse_row_stride] = lse;
    }
    const bool all_have = !__any_sync(0xffffffffu, !has[0] || !has[1]);
    if constexpr (C::kStageO) {
      if (all_have) {
#pragma unroll
        for (int j = 0; j < kDv / 8; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i) tOrO(i + 4 * j) *= scale[i / 2];
      } else {
#pragma unroll
        for (int j = 0; j < kDv / 8; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i) tOrO(i + 4 * j) = has[i / 2] ? tOrO(i + 4 * j) * scale[i / 2] : 0.f;
      }
    } else {
      auto normalized = [&](int hf, float o) { return all_have || has[hf] ? o * scale[hf] : 0.f; };
      store_out_registers<C>(p, tOrO, normalized, b, h, s, m0 + group * 64 + warp * 16, lane);
    }
    if constexpr (C::kStageO) store_out_staged<C>(p, sh, tOrO, b, h, s, m0 + group * 64 + warp * 16, ct / 32, lane);
    if (releaser) TRACE_EVENT(trace_n, 1 + group, r, kTraceStored);
  }
  if (releaser) TRACE_END(trace_n, 1 + group);
  // warpgroup 1's last hand-over has no next turn to start: take it, so no named barrier is
  // left half-arrived when the block exits
  if (group == 0) cutlass::arch::NamedBarrier::sync(C::kConsumerThreads, kSchedBarrier + 0);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __trap();  // a Hopper-class target without the sm_90a features: a misbuilt binary, fail loudly
#endif
}

// Is the sm_90a body what the current device runs? (tma_checks.cuh's image_loaded.)
template <class C, bool kPlain>
bool kernel_runs_here() {
  static std::atomic<uint64_t> known{0}, good{0};
  return image_loaded(fmha_sm90_kernel<C, kPlain>, known, good);
}

// The TMA descriptors of one call's q, k and v (fmha_sm90_fits checked what they require).
template <class C>
struct Descriptors {
  typename C::TmaQ q;
  typename C::TmaK k;
  typename C::TmaV v;
  typename C::TmaKBox kb;  // pages smaller than a key tile (else unused: a copy of k's kind)
  typename C::TmaVBox vb;
};

template <class C>
Descriptors<C> make_descriptors(const FmhaParams& p) {
  using T = typename C::T;
  constexpr int es = sizeof(T);
  const int hq = p.num_heads, hk = p.num_heads_k, qb = q_batches(p), kb = k_batches(p);
  auto gq = make_tensor(make_gmem_ptr(static_cast<const T*>(p.q)), q_shape(p),
                        make_stride(mode_stride(p.q_row_stride, q_rows(p), es), _1{},
                                    mode_stride(p.q_head_stride, hq, es), mode_stride(p.q_batch_stride, qb, es)));
  auto gk = make_tensor(make_gmem_ptr(static_cast<const T*>(p.k)), k_shape(p),
                        make_stride(mode_stride(p.k_row_stride, k_rows(p), es), _1{},
                                    mode_stride(p.k_head_stride, hk, es), mode_stride(p.k_batch_stride, kb, es)));
  auto v_strides = [&] {
    if constexpr (C::kFp8)  // the staged V^T: (Dv, keys) rows of v_t_keys contiguous keys
      return make_stride(int64_t{p.v_t_keys}, _1{}, mode_stride(p.v_head_stride, hk, es),
                         mode_stride(p.v_batch_stride, kb, es));
    else
      return make_stride(_1{}, mode_stride(p.v_row_stride, k_rows(p), es), mode_stride(p.v_head_stride, hk, es),
                         mode_stride(p.v_batch_stride, kb, es));
  };
  auto gv = make_tensor(make_gmem_ptr(static_cast<const T*>(p.v)), v_shape(p), v_strides());
  Descriptors<C> d{make_tma_copy(SM90_TMA_LOAD{}, gq, take<0, 2>(typename C::SmemQ{})),
                    make_tma_copy(SM90_TMA_LOAD{}, gk, take<0, 2>(typename C::SmemK{})),
                    make_tma_copy(SM90_TMA_LOAD{}, gv, take<0, 2>(typename C::SmemV{})),
                    {},
                    {}};
  if constexpr (!C::kFp8) {
    // the boxes' descriptors, only when used: the kernel's test (boxes) is the same
    if (p.page_table != nullptr && p.page_size % C::kBlockN != 0) {
      d.kb = make_tma_copy(SM90_TMA_LOAD{}, gk, typename C::Boxes::LayoutK{});
      d.vb = make_tma_copy(SM90_TMA_LOAD{}, gv, typename C::Boxes::LayoutV{});
    }
  }
  return d;
}

// The device facts the schedule needs, asked once per device: multiprocessors (the grid) and
// the L2 size (the section size).
struct DeviceFacts {
  int sms = 0, l2_bytes = 0;
};
inline DeviceFacts device_facts() {
  static std::atomic<int> sms[64], l2[64];  // 0: not asked yet (static storage starts zeroed)
  const int dev = arch::current_device();
  auto ask = [dev] {
    DeviceFacts f;
    if (cudaDeviceGetAttribute(&f.sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) cudaGetLastError();
    if (cudaDeviceGetAttribute(&f.l2_bytes, cudaDevAttrL2CacheSize, dev) != cudaSuccess) cudaGetLastError();
    f.sms = f.sms > 0 ? f.sms : 1;
    f.l2_bytes = f.l2_bytes > 0 ? f.l2_bytes : 1;
    return f;
  };
  if (dev < 0 || dev >= 64) return ask();
  DeviceFacts f{sms[dev].load(std::memory_order_relaxed), l2[dev].load(std::memory_order_relaxed)};
  if (f.sms == 0) {
    f = ask();
    l2[dev].store(f.l2_bytes, std::memory_order_relaxed);
    sms[dev].store(f.sms, std::memory_order_relaxed);
  }
  return f;
}

// A positive integer from the environment variable `name`, or `fallback`.
inline int64_t env_positive(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  const long long n = v != nullptr ? std::atoll(v) : 0;
  return n > 0 ? static_cast<int64_t>(n) : fallback;
}

// MATE_OPS_FMHA_SM90_BLOCKS=n caps the persistent grid at n blocks (a debugging / measuring
// knob: 1 runs every work tile on one SM, one after the other, the most tile boundaries a
// call can have; a number >= the tile count gives every block one tile). Read once per process.
inline int64_t grid_cap() {
  static const int64_t cap = env_positive("MATE_OPS_FMHA_SM90_BLOCKS", 0);
  return cap;
}

// MATE_OPS_FMHA_SM90_RESCALE_SLACK=n (0 .. 8, default 8): O is rescaled only when a row's maximum
// grows by more than n in base 2 (Schedule::rescale_slack), so P reaches up to 2^n -- 256 at the
// default, far inside bf16's and fp16's range, with the row sum and O in fp32. Session 14 timed 8
// against 0 (main before): equal or up to 7 % faster on the 16-bit prefill rows (D 256 most);
// 0 rescales on every growth, as before. Read once per process.
inline float rescale_slack() {
  static const float slack = [] {
    const char* v = std::getenv("MATE_OPS_FMHA_SM90_RESCALE_SLACK");
    const long long n = v != nullptr ? std::atoll(v) : 8;
    return static_cast<float>(n < 0 ? 0 : n > 8 ? 8 : n);
  }();
  return slack;
}

// MATE_OPS_FMHA_SM90_L2_SHARE=n sizes the schedule's sections to K / V filling 1/n of the L2
// (default 2; a measuring knob: at 512 tokens Nsight Compute read a 39 % L2 hit rate where each
// K / V tile is read by four row blocks, and a large n -- one pair per section -- runs a
// sequence's row blocks back to back). Read once per process.
inline int64_t l2_share() {
  static const int64_t share = env_positive("MATE_OPS_FMHA_SM90_L2_SHARE", 2);
  return share;
}

// The schedule of one call. A section holds the (sequence, head) pairs whose K / V fill about
// half of the L2 cache (l2_share): the blocks running at one time work on one section, or the
// end of one and the start of the next, so their K / V tiles are read from memory about once.
template <class C>
Schedule make_schedule(const FmhaParams& p, int max_rows, int l2_bytes) {
  Schedule sc;
  sc.m_blocks = static_cast<int>((static_cast<int64_t>(max_rows) + C::kBlockM - 1) / C::kBlockM);
  sc.heads = p.num_heads;
  sc.pairs = static_cast<int64_t>(p.batch) * p.num_heads;
  sc.tiles = sc.pairs * sc.m_blocks;
  // keys of a sequence: the dense length, or a ragged batch's mean (an estimate is enough)
  const int64_t keys = p.k_is_ragged ? (static_cast<int64_t>(p.total_k) + p.batch - 1) / p.batch : p.seqlen_k;
  const int64_t group = p.num_heads / p.num_heads_k;  // query heads that share one K / V head
  const int64_t bytes = keys * (p.head_dim + p.head_dim_v) * static_cast<int64_t>(sizeof(typename C::T)) / group;
  int64_t section = bytes > 0 ? (static_cast<int64_t>(l2_bytes) / l2_share()) / bytes : sc.pairs;
  if (section >= group) section -= section % group;  // a GQA group stays in one section
  sc.section = section < 1 ? 1 : section > sc.pairs ? sc.pairs : section;
  sc.rescale_slack = rescale_slack();
  return sc;
}

#if defined(MATE_SM90_TRACE)
// The trace of the launch just made (TRACE_EVENT): waits for it, then one line per event.
inline void print_trace(arch::Stream stream) {
  static TraceEvent events[kTraceBlocks][3][kTraceEvents];
  uint32_t counts[kTraceBlocks][3] = {};
  if (cudaStreamSynchronize(stream) != cudaSuccess ||
      cudaMemcpyFromSymbol(counts, g_sm90_trace_count, sizeof(counts)) != cudaSuccess ||
      cudaMemcpyFromSymbol(events, g_sm90_trace, sizeof(events)) != cudaSuccess)
    return;
  for (int blk = 0; blk < kTraceBlocks; ++blk)
    for (int role = 0; role < 3; ++role)
      for (uint32_t e = 0; e < counts[blk][role] && e < static_cast<uint32_t>(kTraceEvents); ++e) {
        const TraceEvent& t = events[blk][role][e];
        std::fprintf(stderr, "sm90trace %d %d %u %u %llu\n", blk, role, t.round, t.event,
                     static_cast<unsigned long long>(t.cycle));
      }
  const uint32_t zero[kTraceBlocks][3] = {};
  cudaMemcpyToSymbol(g_sm90_trace_count, zero, sizeof(zero));
}
#endif

template <class C, bool kPlain>
arch::Error launch_config(const FmhaParams& p, int max_rows, unsigned long long* tile_counter, arch::Stream stream) {
  static std::atomic<uint64_t> configured{0};  // the shared-memory attribute, once per device
  const arch::Error e = arch::set_max_dynamic_smem_once(fmha_sm90_kernel<C, kPlain>, C::kSmemBytes, configured);
  if (e != arch::kSuccess) return e;
  const DeviceFacts f = device_facts();
  Schedule sc = make_schedule<C>(p, max_rows, f.l2_bytes);
  if (sc.tiles <= 0) return arch::kSuccess;
  if (sc.tiles > INT32_MAX) return arch::kInvalidValue;  // work_at numbers tiles in 32 bits (fmha_sm90_takes bounds them)
  sc.counter = tile_counter;
  // Persistent: one block per multiprocessor (a block fills one: registers and shared memory),
  // each looping over its share of the tiles.
  int64_t blocks = sc.tiles < f.sms ? sc.tiles : f.sms;
  if (grid_cap() > 0 && grid_cap() < blocks) blocks = grid_cap();
  const int64_t kMaxRounds = 0x7fffffff;  // tile_of_round's round counter
  if ((sc.tiles + blocks - 1) / blocks > kMaxRounds) blocks = (sc.tiles + kMaxRounds - 1) / kMaxRounds;
  const Descriptors<C> d = make_descriptors<C>(p);
  fmha_sm90_kernel<C, kPlain><<<dim3(static_cast<unsigned>(blocks)), C::kThreads, C::kSmemBytes, stream>>>(p, sc, d.q, d.k,
                                                                                                        d.v, d.kb, d.vb);
#if defined(MATE_SM90_TRACE)
  print_trace(stream);
#endif
  return arch::last_error();
}

// The bf16 and fp16 kernels of one tile width (CB, CH): is the sm_90a body loaded, and launch.
template <class CB, class CH>
bool width_runs_here(bool f16, bool plain) {
  return f16 ? (plain ? kernel_runs_here<CH, true>() : kernel_runs_here<CH, false>())
             : (plain ? kernel_runs_here<CB, true>() : kernel_runs_here<CB, false>());
}
template <class CB, class CH>
arch::Error width_launch(const FmhaParams& p, int max_rows, unsigned long long* counter, arch::Stream stream, bool f16,
                         bool plain) {
  return f16 ? (plain ? launch_config<CH, true>(p, max_rows, counter, stream)
                      : launch_config<CH, false>(p, max_rows, counter, stream))
             : (plain ? launch_config<CB, true>(p, max_rows, counter, stream)
                      : launch_config<CB, false>(p, max_rows, counter, stream));
}
struct WidthKernels {
  bool (*runs_here)(bool f16, bool plain);
  arch::Error (*launch)(const FmhaParams& p, int max_rows, unsigned long long* counter, arch::Stream stream, bool f16,
                        bool plain);
};
template <int kD, int kDv, int kBlockN = 0>  // 0: block_n_for's key tile
constexpr WidthKernels width_kernels() {
  using CB = Config<cutlass::bfloat16_t, arch::bf16, kD, kDv, arch::bf16, kBlockN>;
  using CH = Config<cutlass::half_t, arch::f16, kD, kDv, arch::f16, kBlockN>;
  return {&width_runs_here<CB, CH>, &width_launch<CB, CH>};
}

// fp8 e4m3 in, bf16 out, on fp8 wgmma (the f16 flag is unused: there is one output type).
// Plain and ScoreMod scores may take different key tiles (block_n_for_fp8).
template <class CP, class CM>
bool fp8_runs_here(bool, bool plain) {
  return plain ? kernel_runs_here<CP, true>() : kernel_runs_here<CM, false>();
}
template <class CP, class CM>
arch::Error fp8_launch(const FmhaParams& p, int max_rows, unsigned long long* counter, arch::Stream stream, bool,
                       bool plain) {
  return plain ? launch_config<CP, true>(p, max_rows, counter, stream)
               : launch_config<CM, false>(p, max_rows, counter, stream);
}
template <int kD, int kDv>
constexpr WidthKernels fp8_width_kernels() {
  using CP = Config<cutlass::float_e4m3_t, uint8_t, kD, kDv, arch::bf16, block_n_for_fp8(kD, kDv, true)>;
  using CM = Config<cutlass::float_e4m3_t, uint8_t, kD, kDv, arch::bf16, block_n_for_fp8(kD, kDv, false)>;
  return {&fp8_runs_here<CP, CM>, &fp8_launch<CP, CM>};
}

// One translation unit per tile width (fmha_fwd_sm90_<width>.cu) instantiates its kernels, so
// a parallel build compiles them side by side (one CuTe kernel takes about half a minute).
extern const WidthKernels kWidth64, kWidth128, kWidth192x128, kWidth256;
extern const WidthKernels kWidth256Short;  // 64-key tiles (kShortKeyTile256)
// fp8 with a staged V^T (fmha_fwd_sm90_fp8_<width>.cu): widths 128 and 256 (D and Dv
// multiples of 16; the other fp8 calls are staged to bf16 instead, launch.cpp)
extern const WidthKernels kWidthFp8x128, kWidthFp8x256;

}  // namespace sm90
}  // namespace mate::device

#endif  // MATE_WITH_SM90
