#pragma once
// FMHA backward for Hopper (sm_90a): steps 2 and 3 of fmha_bwd_kernels.cu (the dK / dV kernel
// and the dQ kernel) on TMA loads and wgmma, written with CUTLASS's CuTe headers like the
// forward (fmha_fwd_sm90.cuh, whose patterns this file follows). Step 1 (the rows kernel: the
// base-2 lse, +inf for a row without keys, and delta, in an fp32 scratch [global row * H + h];
// the sink gradient) is reused unchanged. Served: bf16 / fp16 with dout in the same dtype, D and
// Dv multiples of 8 up to 256 (tile widths 64, 128, 192 x 128 and 256, the forward's; a
// narrower head dim pads up, the TMA boxes reading the missing channels as zeros), dense or
// ragged q / k / v without pages, every
// key-interval mask (key_range_for_row), GQA / MQA, plain scores and, as a second
// instantiation, ScoreMod (softcap, ALiBi). fmha_bwd_sm90_fits (fmha_bwd_sm90.cu) says what
// is served; the rest stays on the mma.sync kernels (arch/sm80/fmha_bwd_mma.cu). One
// translation unit per tile width (fmha_bwd_sm90_<width>.cu) instantiates the kernels.
//
// Why: mma.sync cannot reach a Hopper GPU's tensor-core peak; wgmma can, and TMA loads a tile
// with one thread and no registers (fmha_fwd_sm90.cuh says more).
//
// The split of the work is the mma.sync backward's, and for the same reason: no atomics, so
// every gradient is bitwise identical run to run.
//
//  dK / dV kernel: one block per (kBlockN = 128 keys, kv head, sequence), 384 threads.
//   - warpgroup 0, the producer: one thread TMA-loads K and V once, then per step a Q tile and a
//     dO tile (kBlockM query rows of one query head) into kStages buffers; warp 1 writes the
//     step's per-row values (lse2, delta, the key interval relative to the block's first key)
//     into shared memory beside them. A step's "full" barrier completes when both are in (one
//     expect-tx arrival + 32 lane arrivals). The steps are the G query heads of the kv head, each
//     over the query rows that see a key of the block (one run [ia, ib): the INVARIANT at
//     key_range_for_row), so dK / dV sum over the GQA group in registers.
//   - warpgroups 1 and 2, the consumers, 64 keys each (wgmma's M): S^T = K Q^T and
//     dP^T = V dO^T (both operands in shared memory, K-major), then in registers
//     P^T = exp2(S^T * scale * log2e - lse2) and dS^T = P^T (dP^T - delta), rounded to the
//     input type in the accumulators' own register order, which is the A-operand order of the
//     next wgmma (static_asserts in KvConfig): dV += P^T dO and dK += dS^T Q with A from
//     registers and B = dO / Q read MN-major (the channels are contiguous): the same shared
//     bytes as the K-major tiles of the first two products, seen transposed (same_bytes below).
//     At the end dK is scaled by softmax_scale (plain scores) and both are stored from
//     registers.
//   - the widths (KvConfig's kv_passes / kv_block_m / kv_stages say why in full): a warpgroup
//     cannot own fewer than 64 keys (wgmma's M), so what shrinks with the width is the step:
//     64 rows at widths 64 / 128, 32 at 192 x 128 (dK + dV are 160 of the 232 registers), 48
//     at 256, where dK and dV alone would be 256 registers: there a block computes one of them
//     (kPass 1: dV from S^T and P^T, without V or dP^T; kPass 2: dK), the two passes of a key
//     block being neighbouring blocks of one launch. Chosen over splitting dK / dV's channels
//     across the two warpgroups (both on the same 64 keys), which needs S^T / dP^T in both:
//     computed twice (6 products for 4, against the passes' 5) or exchanged through shared
//     memory with a cross-warpgroup barrier per step; and 192 channels do not halve into the
//     64-channel swizzle atoms that a warpgroup's MN-major B operand must start on.
//  dQ kernel: one block per (kBlockM = 128 query rows, query head, sequence), latest rows first,
//   like the forward: the producer loads Q and dO once and streams K / V tiles; each consumer
//   warpgroup (64 rows) computes S = Q K^T, dP = dO V^T, dS in registers and dQ += dS K (K read
//   MN-major, the same bytes as the K-major tile of S = Q K^T). Key tiles of 128 keys at width
//   64, 64 at 128 and 192 x 128, 48 at 256 (registers and shared memory: DqConfig).
//
// Rows and keys past the ends: TMA boxes read whole tiles, and past a sequence's end lie other
// sequences' rows or unused (possibly NaN) positions, while 0 * NaN = NaN. So P and dS are
// formed by selection (masked -> exactly 0, whatever the score), and the operands that a zero
// multiplies in the second products are zeroed in shared memory: the Q / dO rows past a step's
// last row (dK / dV kernel) and the K rows past the block's last key (dQ kernel). Garbage that
// only reaches rows that are never stored (keys past the block in dK / dV, query rows past
// the sequence in dQ) needs nothing. A row without keys has an empty interval (and lse2 = +inf):
// P = 0.
//
// Status: every width is correct on the H200 (tests/test_sm90_bwd.py: 75 cases against the fp64
// oracle; compute-sanitizer memcheck clean on scripts/sanitize_sm90_bwd.py), so launch_fmha_bwd
// takes them by default on compute capability 9.0 (fmha_bwd_kernels.cu: kWideByDefault).
// Not yet here: overlap of one step's elementwise work with the next step's wgmma inside a
// warpgroup, TMA stores.
#include <atomic>
#include <cmath>
#include <cstdint>

#include "../../../common/fmha_math.h"
#include "../../../common/fmha_params.h"
#include "../../../common/fmha_score.h"
#include "../../kernels.h"
#include "../device.h"
#include "tma_checks.cuh"

#if defined(MATE_WITH_SM90)

// wgmma N = 48 (the query rows of a D 256 step, the keys of a D 256 dQ tile) is behind this switch
#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED 1
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>

#include "../mma.h"  // fast_exp2, pack2

namespace mate::device {
namespace sm90_bwd {

using namespace cute;
// TMA views and image checks shared by the Hopper kernels (tma_checks.cuh)
using sm90_tma::image_loaded;
using sm90_tma::k_batches;
using sm90_tma::k_rows;
using sm90_tma::mode_stride;
using sm90_tma::q_batches;
using sm90_tma::q_rows;

// A (rows, cols) tile stored K-major with the 128-byte swizzle (cols contiguous), as TMA writes
// it and as the A / B operand of a product over cols; and the same bytes as a (cols, rows) tile,
// MN-major, as the B operand of a product over rows. The MN-major swizzle atom (64 cols x 8 rows)
// is the K-major one (8 rows x 64 cols) transposed, and stacking the atoms along the rows first
// gives the K-major tiling's order, so both layouts name the same bytes (checked below).
template <class T, int kRows, int kCols, int kStages>
struct TwoViews {
  using KMajor = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kRows>, Int<kCols>, Int<kStages>>{}));
  using MNMajor = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<T>{}, Shape<Int<kCols>, Int<kRows>, Int<kStages>>{},
                                         Step<_2, _1, _3>{}));
};

// Both views at the same offset over a sample of the tile (the full tile exceeds the
// compiler's constexpr budget): every row at columns 0, 9 and the last, every column at rows
// 0, 7 and the last, and the first element of the last stage. (A host loop over every element
// of every instantiated shape agreed when this was written.)
template <class V, int kRows, int kCols, int kStages>
constexpr bool same_bytes() {
  using K = typename V::KMajor;
  using M = typename V::MNMajor;
  for (int r = 0; r < kRows; ++r)
    if (K{}(r, 0, 0) != M{}(0, r, 0) || K{}(r, 9, 0) != M{}(9, r, 0) || K{}(r, kCols - 1, 0) != M{}(kCols - 1, r, 0))
      return false;
  for (int c = 0; c < kCols; ++c)
    if (K{}(0, c, 0) != M{}(c, 0, 0) || K{}(7, c, 0) != M{}(c, 7, 0) || K{}(kRows - 1, c, 0) != M{}(c, kRows - 1, 0))
      return false;
  return K{}(0, 0, kStages - 1) == M{}(0, 0, kStages - 1);
}

// Shared by both kernels: the warpgroups and the register budget (the forward's).
struct Roles {
  static constexpr int kConsumers = 2;  // consumer warpgroups
  static constexpr int kConsumerThreads = 128 * kConsumers;
  static constexpr int kThreads = 128 + kConsumerThreads;
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;  // 128 * 24 + 256 * 240 <= 64K
  using WarpGroups = Layout<Shape<Int<kConsumers>, _1, _1>>;     // warpgroup w owns M rows 64w .. 64w + 63
};

// The dK / dV kernel's shape per tile width. Registers per consumer thread (one warpgroup owns 64
// keys: wgmma's M, the least there is) are dK + dV (kD / 2 + kDv / 2 floats), S^T and dP^T
// (kBlockM / 2 floats each) and P^T, dS^T in 16 bits (kBlockM / 4 each), under the 232 that
// setmaxnreg leaves (plus indices and addresses):
//   - widths 64, 128: one pass, 64-row steps: 224 at width 128.
//   - 192 x 128: one pass on 32-row steps: 160 + 48 = 208 (64-row steps would be 256). The
//     S^T / dP^T products are then 64 x 32 (shared-memory reads of K / V per product weigh
//     more), but a second pass would redo S^T and reload Q / dO for every key block; and
//     channel splits across the warpgroups do not divide 192 into 64-channel swizzle atoms.
//   - 256: dK and dV alone are 256 floats, so the block computes one of them: a dV pass
//     (S^T, P^T, dV += P^T dO) and a dK pass (S^T, dP^T, dS^T, dK += dS^T Q) run in separate
//     blocks of one launch (blockIdx.x = 2 key block + pass), like the mma.sync kernel's two
//     launches: 128 + 24 + 12 (dV) and 128 + 48 + 12 (dK) on 48-row steps. S^T is computed
//     twice (5 products instead of 4). Splitting the channels of dK / dV across the two
//     warpgroups instead (both on the same 64 keys) would either compute S^T / dP^T twice as
//     well (6 products) or exchange P^T / dS^T through shared memory with a barrier between
//     the warpgroups per step; the pass split keeps the GPU-validated step loop unchanged.
// Shared memory (227 KB per block): K and V of the 128 keys (both passes take the same
// layout; the dV pass loads no V) plus kStages (Q, dO) steps: 128 KB + 2 x 48 KB at width 256.
constexpr int kv_passes(int d, int dv) { return d > 192 || dv > 128 ? 2 : 1; }
constexpr int kv_block_m(int d, int dv) { return d > 192 || dv > 128 ? 48 : d > 128 ? 32 : 64; }
constexpr int kv_stages(int d, int dv) { return d > 128 && d <= 192 && dv <= 128 ? 3 : 2; }

// The dK / dV kernel's tiles. T is CuTe's element type (the wgmma operand type); NvT the CUDA
// type of the same bits (arch::pack2).
template <class T_, class NvT_, int kD_, int kDv_>
struct KvConfig : Roles {
  using T = T_;
  using NvT = NvT_;
  static constexpr int kD = kD_, kDv = kDv_;  // tile widths of q / k and v / dout rows
  static constexpr int kBlockN = 128;         // keys per block: 64 per consumer warpgroup (wgmma M)
  static constexpr int kPasses = kv_passes(kD, kDv);  // 2: dV and dK in separate blocks
  static constexpr int kBlockM = kv_block_m(kD, kDv);  // query rows per step
  static constexpr int kStages = kv_stages(kD, kDv);   // Q / dO buffers: later steps land while step t computes
  static_assert(kBlockM % 16 == 0, "the rows of a step are the k-steps of dV += P^T dO");
  // the producer's warp 1 (per-row values: key_range_for_row, 64-bit offsets) spills at 24
  // registers; 128 * 40 + 256 * 232 still fits the SM's 64K
  static constexpr int kProducerRegs = 40, kConsumerRegs = 232;

  // S^T = K Q^T (M keys, N rows, K = D) and dP^T = V dO^T (K = Dv): both operands K-major.
  using AtomS = decltype(GMMA::ss_op_selector<T, T, float, Shape<_64, Int<kBlockM>, Int<kD>>>());
  using AtomDP = decltype(GMMA::ss_op_selector<T, T, float, Shape<_64, Int<kBlockM>, Int<kDv>>>());
  // dV += P^T dO (N = Dv, K = rows), dK += dS^T Q (N = D): A from registers, B MN-major.
  using AtomDV = decltype(GMMA::rs_op_selector<T, T, float, Shape<_64, Int<kDv>, Int<kBlockM>>, GMMA::Major::K,
                                                 GMMA::Major::MN>());
  using AtomDK = decltype(GMMA::rs_op_selector<T, T, float, Shape<_64, Int<kD>, Int<kBlockM>>, GMMA::Major::K,
                                                 GMMA::Major::MN>());
  using MmaS = decltype(make_tiled_mma(AtomS{}, WarpGroups{}));
  using MmaDP = decltype(make_tiled_mma(AtomDP{}, WarpGroups{}));
  using MmaDV = decltype(make_tiled_mma(AtomDV{}, WarpGroups{}));
  using MmaDK = decltype(make_tiled_mma(AtomDK{}, WarpGroups{}));

  // The elementwise code indexes accumulators directly (value i = e + 2 h + 4 j is M row
  // g + 8 h, column 8 j + 2 (lane % 4) + e, g = lane / 4 + 16 * warp), and P^T / dS^T reuse the
  // order of S^T / dP^T as A operands: 16 accumulator columns are one k-step of a register A.
  static_assert(cute::is_same_v<typename MmaS::Atom::CLayout, GMMA::CLayout_64xN<kBlockM>>);
  static_assert(cute::is_same_v<typename MmaDP::Atom::CLayout, GMMA::CLayout_64xN<kBlockM>>);
  static_assert(cute::is_same_v<typename MmaDV::Atom::CLayout, GMMA::CLayout_64xN<kDv>>);
  static_assert(cute::is_same_v<typename MmaDK::Atom::CLayout, GMMA::CLayout_64xN<kD>>);
  static_assert(cute::is_same_v<typename MmaDV::Atom::ALayout, GMMA::ALayout_64x16>);
  static_assert(cute::is_same_v<typename MmaDK::Atom::ALayout, GMMA::ALayout_64x16>);
  static_assert(cute::is_same_v<GMMA::CLayout_64xN<16>, GMMA::ALayout_64x16>);

  using SmemK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kBlockN>, Int<kD>>{}));
  using SmemV = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kBlockN>, Int<kDv>>{}));
  using ViewsQ = TwoViews<T, kBlockM, kD, kStages>;
  using ViewsDO = TwoViews<T, kBlockM, kDv, kStages>;
  using SmemQ = typename ViewsQ::KMajor;     // (rows, D, stage): B of S^T = K Q^T
  using SmemQt = typename ViewsQ::MNMajor;   // (D, rows, stage): B of dK += dS^T Q
  using SmemDO = typename ViewsDO::KMajor;   // (rows, Dv, stage): B of dP^T = V dO^T
  using SmemDOt = typename ViewsDO::MNMajor; // (Dv, rows, stage): B of dV += P^T dO
  static_assert(same_bytes<ViewsQ, kBlockM, kD, kStages>(), "Q's two views must name the same bytes");
  static_assert(same_bytes<ViewsDO, kBlockM, kDv, kStages>(), "dO's two views must name the same bytes");

  // Global views for the TMA descriptors: (rows, channels, heads, batch); a ragged tensor has
  // batch 1.
  using GShape = Shape<int, int, int, int>;
  using GStride = Stride<int64_t, _1, int64_t, int64_t>;
  using GTensor = decltype(make_tensor(make_gmem_ptr(static_cast<const T*>(nullptr)), GShape{}, GStride{}));
  using TmaK = decltype(make_tma_copy(SM90_TMA_LOAD{}, std::declval<GTensor>(), SmemK{}));
  using TmaV = decltype(make_tma_copy(SM90_TMA_LOAD{}, std::declval<GTensor>(), SmemV{}));
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, std::declval<GTensor>(), take<0, 2>(SmemQ{})));
  using TmaDO = decltype(make_tma_copy(SM90_TMA_LOAD{}, std::declval<GTensor>(), take<0, 2>(SmemDO{})));

  static constexpr uint32_t kKBytes = kBlockN * kD * sizeof(T);  // the dV pass loads K only
  static constexpr uint32_t kKVBytes = kBlockN * (kD + kDv) * sizeof(T);
  static constexpr uint32_t kStepBytes = kBlockM * (kD + kDv) * sizeof(T);  // one Q and one dO tile

  struct Smem {
    alignas(1024) cute::array_aligned<T, cosize_v<SmemK>, 1024> k;
    alignas(1024) cute::array_aligned<T, cosize_v<SmemV>, 1024> v;
    alignas(1024) cute::array_aligned<T, cosize_v<SmemQ>, 1024> q;
    alignas(1024) cute::array_aligned<T, cosize_v<SmemDO>, 1024> dout;
    // per step and row: lse2 (+inf past the step's rows), delta, the row's key interval
    // relative to the block's first key (empty past the step's rows)
    float lse2[kStages][kBlockM], delta[kStages][kBlockM];
    int lo[kStages][kBlockM], hi[kStages][kBlockM];
    uint64_t kv_full;
    // full: the Q / dO tiles have landed (expect-tx) and warp 1 wrote the rows (32 arrivals);
    // empty: every consumer thread is done with the stage (kConsumerThreads arrivals)
    uint64_t full[kStages], empty[kStages];
  };
  static constexpr int kSmemBytes = static_cast<int>(sizeof(Smem));
  static_assert(kSmemBytes <= 227 * 1024, "a Hopper SM gives one block at most 227 KB of shared memory");
};

// The dQ kernel's tiles.
template <class T_, class NvT_, int kD_, int kDv_>
struct DqConfig : Roles {
  using T = T_;
  using NvT = NvT_;
  static constexpr int kD = kD_, kDv = kDv_;
  static constexpr int kBlockM = 128;  // query rows per block: 64 per consumer warpgroup
  // keys per tile: registers per consumer thread are dQ (kD / 2 floats), S and dP (kBlockN / 2
  // each) and dS in 16 bits (kBlockN / 4): 128 at width 64 (192), 64 at widths 128 (144) and
  // 192 x 128 (176), 48 at width 256 (188; and Q, dO and two stages of 48-key K / V tiles are
  // 224 KB of shared memory, where 64-key ones would be 256)
  static constexpr int kBlockN = kD > 192 || kDv > 128 ? 48 : kD > 64 || kDv > 64 ? 64 : 128;
  static constexpr int kStages = 2;

  // S = Q K^T, dP = dO V^T: K-major operands; dQ += dS K: dS from registers, K MN-major.
  using AtomS = decltype(GMMA::ss_op_selector<T, T, float, Shape<_64, Int<kBlockN>, Int<kD>>>());
  using AtomDP = decltype(GMMA::ss_op_selector<T, T, float, Shape<_64, Int<kBlockN>, Int<kDv>>>());
  using AtomDQ = decltype(GMMA::rs_op_selector<T, T, float, Shape<_64, Int<kD>, Int<kBlockN>>, GMMA::Major::K,
                                                 GMMA::Major::MN>());
  using MmaS = decltype(make_tiled_mma(AtomS{}, WarpGroups{}));
  using MmaDP = decltype(make_tiled_mma(AtomDP{}, WarpGroups{}));
  using MmaDQ = decltype(make_tiled_mma(AtomDQ{}, WarpGroups{}));
  static_assert(cute::is_same_v<typename MmaS::Atom::CLayout, GMMA::CLayout_64xN<kBlockN>>);
  static_assert(cute::is_same_v<typename MmaDP::Atom::CLayout, GMMA::CLayout_64xN<kBlockN>>);
  static_assert(cute::is_same_v<typename MmaDQ::Atom::CLayout, GMMA::CLayout_64xN<kD>>);
  static_assert(cute::is_same_v<typename MmaDQ::Atom::ALayout, GMMA::ALayout_64x16>);
  static_assert(cute::is_same_v<GMMA::CLayout_64xN<16>, GMMA::ALayout_64x16>);

  using SmemQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kBlockM>, Int<kD>>{}));
  using SmemDO = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kBlockM>, Int<kDv>>{}));
  using ViewsK = TwoViews<T, kBlockN, kD, kStages>;
  using SmemK = typename ViewsK::KMajor;    // (keys, D, stage): B of S = Q K^T
  using SmemKt = typename ViewsK::MNMajor;  // (D, keys, stage): B of dQ += dS K
  static_assert(same_bytes<ViewsK, kBlockN, kD, kStages>(), "K's two views must name the same bytes");
  using SmemV = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kBlockN>, Int<kDv>, Int<kStages>>{}));

  using GShape = Shape<int, int, int, int>;
  using GStride = Stride<int64_t, _1, int64_t, int64_t>;
  using GTensor = decltype(make_tensor(make_gmem_ptr(static_cast<const T*>(nullptr)), GShape{}, GStride{}));
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, std::declval<GTensor>(), SmemQ{}));
  using TmaDO = decltype(make_tma_copy(SM90_TMA_LOAD{}, std::declval<GTensor>(), SmemDO{}));
  using TmaK = decltype(make_tma_copy(SM90_TMA_LOAD{}, std::declval<GTensor>(), take<0, 2>(SmemK{})));
  using TmaV = decltype(make_tma_copy(SM90_TMA_LOAD{}, std::declval<GTensor>(), take<0, 2>(SmemV{})));

  static constexpr uint32_t kRowBytes = kBlockM * (kD + kDv) * sizeof(T);  // Q and dO
  static constexpr uint32_t kKVBytes = kBlockN * (kD + kDv) * sizeof(T);   // one K and one V tile

  struct Smem {
    alignas(1024) cute::array_aligned<T, cosize_v<SmemQ>, 1024> q;
    alignas(1024) cute::array_aligned<T, cosize_v<SmemDO>, 1024> dout;
    alignas(1024) cute::array_aligned<T, cosize_v<SmemK>, 1024> k;
    alignas(1024) cute::array_aligned<T, cosize_v<SmemV>, 1024> v;
    uint64_t q_full;
    uint64_t kv_full[kStages], kv_empty[kStages];
  };
  static constexpr int kSmemBytes = static_cast<int>(sizeof(Smem));
  static_assert(kSmemBytes <= 227 * 1024, "a Hopper SM gives one block at most 227 KB of shared memory");
};

// The instantiated tile widths: the forward's (tma_checks.cuh).
using sm90_tma::tile_widths;
using sm90_tma::Widths;

// The global views (host and device build the same ones; extents from tma_checks.cuh).
MATE_HD Shape<int, int, int, int> q_shape(const FmhaParams& p) {
  return make_shape(q_rows(p), p.head_dim, p.num_heads, q_batches(p));
}
MATE_HD Shape<int, int, int, int> dout_shape(const FmhaParams& p) {
  return make_shape(q_rows(p), p.head_dim_v, p.num_heads, q_batches(p));
}
MATE_HD Shape<int, int, int, int> k_shape(const FmhaParams& p) {
  return make_shape(k_rows(p), p.head_dim, p.num_heads_k, k_batches(p));
}
MATE_HD Shape<int, int, int, int> v_shape(const FmhaParams& p) {
  return make_shape(k_rows(p), p.head_dim_v, p.num_heads_k, k_batches(p));
}

// Issues C (+)= A B over every k-step as one wgmma batch (the first step overwrites C when
// kZeroInit) without waiting: two products can be in flight before one warpgroup_wait.
template <bool kZeroInit, class Mma, class TA, class TB, class TC>
__device__ __forceinline__ void wgmma_issue(Mma& mma, const TA& a, const TB& b, TC& c) {
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(a); ++k) {
    cute::gemm(mma, a(_, _, k), b(_, _, k), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
}

// fp32 accumulators -> 16-bit A operand in the same register order (see the configs' asserts).
template <class NvT, class TC, class TA>
__device__ __forceinline__ void to_operand(const TC& acc, TA& a) {
  uint32_t* r = reinterpret_cast<uint32_t*>(raw_pointer_cast(a.data()));
  CUTE_UNROLL
  for (int i = 0; i < size(acc) / 2; ++i) r[i] = arch::pack2<NvT>(acc(2 * i), acc(2 * i + 1));
}

// Zeroes rows [valid, kRows) of stage st of a K-major (rows, cols, stage) tile, with all
// consumer threads; the proxy fence makes the generic stores visible to wgmma (and orders them
// before the next TMA write of the buffer).
template <int kRows, int kCols, class Tensor3>
__device__ __forceinline__ void zero_rows(Tensor3& t, int st, int valid, int ct, int nthreads) {
  using T = typename Tensor3::value_type;
  for (int idx = ct; idx < (kRows - valid) * kCols; idx += nthreads) t(valid + idx / kCols, idx % kCols, st) = T(0.f);
}

// One block of the dK / dV kernel: keys [n0, n0 + kBlockN) of kv head hk. kPass 0 computes both
// gradients; 1 only dV (S^T, P^T: no V, no dP^T); 2 only dK (S^T, dP^T, dS^T) -- the wide
// widths' two passes (KvConfig). The descriptors are the kernel's grid constants, by reference.
//
// kPlain: logit = softmax_scale * dot (no softcap, no ALiBi): exp2 folds the scale, and the
// constant d logit / d dot = softmax_scale is applied once to dK / dQ at the end. Otherwise
// ScoreMod::logit_grad per element, as in fmha_bwd_mma.cu's kPlain = false.
template <class C, bool kPlain, int kPass>
__device__ __forceinline__ void dkdv_block(const FmhaBwdParams& g, const FmhaBwdScratch& rows,
                                           const typename C::TmaK& tma_k, const typename C::TmaV& tma_v,
                                           const typename C::TmaQ& tma_q, const typename C::TmaDO& tma_do,
                                           const int key_block) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename C::T;
  constexpr int kD = C::kD, kDv = C::kDv, kBlockM = C::kBlockM, kBlockN = C::kBlockN, kStages = C::kStages;
  constexpr bool kDoDv = kPass != 2, kDoDk = kPass != 1;
  const FmhaParams& p = g.fwd;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  auto& sh = *reinterpret_cast<typename C::Smem*>(smem_raw);

  const int b = blockIdx.z, hk = blockIdx.y;
  const SeqInfo s = seq_info(p, b);
  const int n0 = key_block * kBlockN;
  if (n0 >= s.k_len) return;  // dk / dv of unused keys stay zero (the op zero-fills them)
  const int nvalid = imin(kBlockN, s.k_len - n0);  // real keys of the block
  const int G = p.num_heads / p.num_heads_k, H = p.num_heads;
  // Query rows that see a key of [n0, n0 + nvalid): one run [ia, ib) (monotone interval ends).
  const int ia = first_row_where(p, s, [&](const KeyInterval& k) { return k.hi > n0; });
  const int ib = first_row_where(p, s, [&](const KeyInterval& k) { return k.lo - n0 >= nvalid; });
  const int per_head = ib > ia ? ceil_div_pos(ib - ia, kBlockM) : 0;  // steps per query head
  const int steps = per_head * G;
  // step t: query head hk G + t / per_head, rows [i0, i0 + valid)
  auto step_head = [&](int t) { return hk * G + t / per_head; };
  auto step_row0 = [&](int t) { return ia + (t % per_head) * kBlockM; };

  if (threadIdx.x == 0) {
    initialize_barrier(sh.kv_full, 1);
    for (int st = 0; st < kStages; ++st) {
      initialize_barrier(sh.full[st], 1 + 32);
      initialize_barrier(sh.empty[st], C::kConsumerThreads);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  // ---- producer ------------------------------------------------------------------------------
  if (threadIdx.x < 128) {
    cutlass::arch::warpgroup_reg_dealloc<C::kProducerRegs>();
    const int pwarp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (pwarp == 0 && steps > 0 && elect_one_sync()) {
      // one thread issues every TMA load; tile origins are arbitrary rows (views shifted there,
      // rows past the tensor's end arrive as zeros)
      Tensor sK = make_tensor(make_smem_ptr(sh.k.data()), typename C::SmemK{});
      Tensor sV = make_tensor(make_smem_ptr(sh.v.data()), typename C::SmemV{});
      Tensor sQ = make_tensor(make_smem_ptr(sh.q.data()), typename C::SmemQ{});
      Tensor sDO = make_tensor(make_smem_ptr(sh.dout.data()), typename C::SmemDO{});
      const int k0 = static_cast<int>(s.k_row0) + s.k_start + n0;
      const int bq = p.q_is_ragged ? 0 : b, bk = p.k_is_ragged ? 0 : s.cache_row;
      {
        Tensor mK = tma_k.get_tma_tensor(k_shape(p))(_, _, hk, bk);
        Tensor gK = local_tile(domain_offset(make_coord(k0, _0{}), mK), Shape<Int<kBlockN>, Int<kD>>{}, make_coord(0, 0));
        auto [tKg, tKs] = tma_partition(tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
        set_barrier_transaction_bytes(sh.kv_full, kDoDk ? C::kKVBytes : C::kKBytes);
        copy(tma_k.with(sh.kv_full), tKg, tKs);
        if constexpr (kDoDk) {  // V: the A operand of dP^T = V dO^T
          Tensor mV = tma_v.get_tma_tensor(v_shape(p))(_, _, hk, bk);
          Tensor gV = local_tile(domain_offset(make_coord(k0, _0{}), mV), Shape<Int<kBlockN>, Int<kDv>>{}, make_coord(0, 0));
          auto [tVg, tVs] = tma_partition(tma_v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));
          copy(tma_v.with(sh.kv_full), tVg, tVs);
        }
      }
      Tensor mQ = tma_q.get_tma_tensor(q_shape(p));
      Tensor mDO = tma_do.get_tma_tensor(dout_shape(p));
      for (int t = 0; t < steps; ++t) {
        const int st = t % kStages, phase = (t / kStages) & 1;
        const int h = step_head(t), q0 = static_cast<int>(s.q_row0) + step_row0(t);
        Tensor gQ = local_tile(domain_offset(make_coord(q0, _0{}), mQ(_, _, h, bq)), Shape<Int<kBlockM>, Int<kD>>{},
                               make_coord(0, 0));
        Tensor gDO = local_tile(domain_offset(make_coord(q0, _0{}), mDO(_, _, h, bq)),
                                Shape<Int<kBlockM>, Int<kDv>>{}, make_coord(0, 0));
        auto [tQg, tQs] = tma_partition(tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
        auto [tDg, tDs] = tma_partition(tma_do, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sDO), group_modes<0, 2>(gDO));
        // a buffer's first use needs no wait; later ones wait for the release of step t - kStages
        if (t >= kStages) wait_barrier(sh.empty[st], phase ^ 1);
        set_barrier_transaction_bytes(sh.full[st], C::kStepBytes);
        copy(tma_q.with(sh.full[st]), tQg, tQs(_, st));
        copy(tma_do.with(sh.full[st]), tDg, tDs(_, st));
      }
    } else if (pwarp == 1) {
      // the per-row values of each step, beside its tiles (the full barrier's 32 arrivals)
      for (int t = 0; t < steps; ++t) {
        const int st = t % kStages, phase = (t / kStages) & 1;
        const int h = step_head(t), i0 = step_row0(t), valid = imin(kBlockM, ib - i0);
        if (t >= kStages) wait_barrier(sh.empty[st], phase ^ 1);
        for (int c = lane; c < kBlockM; c += 32) {
          float l2 = INFINITY, dl = 0.f;
          int lo = 0, hi = 0;
          if (c < valid) {
            const int i = i0 + c;
            const int64_t at = global_row(p, s, b, i) * H + h;
            l2 = rows.lse2[at];
            if constexpr (kDoDk) dl = rows.delta[at];
            const KeyInterval keys = key_range_for_row(p, s, i);
            lo = keys.lo - n0;  // both in [0, k_len]: no overflow
            hi = keys.hi - n0;
          }
          sh.lse2[st][c] = l2;
          sh.delta[st][c] = dl;
          sh.lo[st][c] = lo;
          sh.hi[st][c] = hi;
        }
        arrive_barrier(sh.full[st]);
      }
    }
    return;
  }

  // ---- consumers -------------------------------------------------------------------------------
  cutlass::arch::warpgroup_reg_alloc<C::kConsumerRegs>();
  const int ct = threadIdx.x - 128;  // 0 .. 255
  const int group = ct / 128, warp = (ct % 128) / 32, lane = ct % 32;
  const int quad = lane % 4;

  typename C::MmaS mma_s;
  typename C::MmaDP mma_dp;
  typename C::MmaDV mma_dv;
  typename C::MmaDK mma_dk;
  auto thr_s = mma_s.get_thread_slice(ct);
  auto thr_dp = mma_dp.get_thread_slice(ct);
  auto thr_dv = mma_dv.get_thread_slice(ct);
  auto thr_dk = mma_dk.get_thread_slice(ct);
  Tensor sK = make_tensor(make_smem_ptr(sh.k.data()), typename C::SmemK{});
  Tensor sV = make_tensor(make_smem_ptr(sh.v.data()), typename C::SmemV{});
  Tensor sQ = make_tensor(make_smem_ptr(sh.q.data()), typename C::SmemQ{});
  Tensor sQt = make_tensor(make_smem_ptr(sh.q.data()), typename C::SmemQt{});
  Tensor sDO = make_tensor(make_smem_ptr(sh.dout.data()), typename C::SmemDO{});
  Tensor sDOt = make_tensor(make_smem_ptr(sh.dout.data()), typename C::SmemDOt{});
  Tensor tSrK = thr_s.partition_fragment_A(sK);     // this warpgroup's 64 keys
  Tensor tSrQ = thr_s.partition_fragment_B(sQ);     // (.., k-steps, stage)
  Tensor tPrV = thr_dp.partition_fragment_A(sV);
  Tensor tPrDO = thr_dp.partition_fragment_B(sDO);
  Tensor tVrDOt = thr_dv.partition_fragment_B(sDOt);
  Tensor tKrQt = thr_dk.partition_fragment_B(sQt);
  Tensor tSt = partition_fragment_C(mma_s, Shape<Int<kBlockN>, Int<kBlockM>>{});    // S^T, then P^T
  Tensor tDPt = partition_fragment_C(mma_dp, Shape<Int<kBlockN>, Int<kBlockM>>{});  // dP^T, then dS^T
  Tensor tPt = make_tensor<T>(partition_shape_A(mma_dv, Shape<Int<kBlockN>, Int<kBlockM>>{}));
  Tensor tDSt = make_tensor<T>(partition_shape_A(mma_dk, Shape<Int<kBlockN>, Int<kBlockM>>{}));
  Tensor tdV = partition_fragment_C(mma_dv, Shape<Int<kBlockN>, Int<kDv>>{});
  Tensor tdK = partition_fragment_C(mma_dk, Shape<Int<kBlockN>, Int<kD>>{});
  static_assert(size(tSt) == kBlockM / 2 && size(tDPt) == kBlockM / 2 && size(tPt) == size(tSt) &&
                size(tDSt) == size(tDPt) && size(tdV) == kDv / 2 && size(tdK) == kD / 2);
  CUTE_STATIC_ASSERT_V(size<1>(tSrK) == _1{} && size<2>(tSrK) == Int<kD / 16>{} && size<3>(tSrQ) == Int<kStages>{});
  CUTE_STATIC_ASSERT_V(size<1>(tPt) == _1{} && size<2>(tPt) == Int<kBlockM / 16>{} &&
                       size<2>(tVrDOt) == Int<kBlockM / 16>{} && size<3>(tVrDOt) == Int<kStages>{} &&
                       size<3>(tKrQt) == Int<kStages>{});
  if constexpr (kDoDv) clear(tdV);
  if constexpr (kDoDk) clear(tdK);

  // this thread's key rows relative to n0 (+ 8 h); the warpgroup's keys [kw0, kw0 + 64)
  const int kw0 = group * 64, krow = kw0 + warp * 16 + lane / 4;
  const float sl = p.softmax_scale * kLog2e;

  if (steps > 0) wait_barrier(sh.kv_full, 0);
  for (int t = 0; t < steps; ++t) {
    const int st = t % kStages, phase = (t / kStages) & 1;
    const int h = step_head(t), i0 = step_row0(t), valid = imin(kBlockM, ib - i0);
    // the warpgroup's keys against the hull of the step's row intervals (uniform over the
    // warpgroup: wgmma is issued by all of its threads or none); relative to n0
    const KeyInterval first = key_range_for_row(p, s, i0), last = key_range_for_row(p, s, i0 + valid - 1);
    const int lo_min = first.lo - n0, hi_max = last.hi - n0, lo_max = last.lo - n0, hi_min = first.hi - n0;
    const bool any = lo_min < kw0 + 64 && hi_max > kw0 && lo_min < hi_max;
    const bool all = valid == kBlockM && lo_max <= kw0 && hi_min >= kw0 + 64;  // no element masked

    wait_barrier(sh.full[st], phase);
    if (valid < kBlockM) {
      // rows past the step's last row: zeros, so that P^T = 0 / dS^T = 0 there meets no NaN in
      // dO / Q (both warpgroups read every row: both wait for all of the zeros)
      if constexpr (kDoDk) zero_rows<kBlockM, kD>(sQ, st, valid, ct, C::kConsumerThreads);
      if constexpr (kDoDv) zero_rows<kBlockM, kDv>(sDO, st, valid, ct, C::kConsumerThreads);
      cutlass::arch::fence_view_async_shared();
      cutlass::arch::NamedBarrier::sync(C::kConsumerThreads, 0);
    }
    if (any) {
      wgmma_issue<true>(mma_s, tSrK, tSrQ(_, _, _, st), tSt);
      if constexpr (kDoDk) wgmma_issue<true>(mma_dp, tPrV, tPrDO(_, _, _, st), tDPt);
      warpgroup_wait<0>();
      warpgroup_fence_operand(tSt);
      if constexpr (kDoDk) warpgroup_fence_operand(tDPt);

      const ScoreMod mod = score_mod(p, s, b, h);
      const float* lse2 = sh.lse2[st];
      const float* delta = sh.delta[st];
      const int* lo = sh.lo[st];
      const int* hi = sh.hi[st];
      // P^T and dS^T of the step, kMasked: with the per-element mask (a select per element plus
      // the row interval's two shared-memory loads per column); plain scores on a step no
      // element of which is masked take the loop without it (a warp-uniform branch, as in the
      // forward: version 15 of docs/performance.md)
      auto p_and_ds = [&](auto masked_tag) {
        constexpr bool kMasked = decltype(masked_tag)::value;
#pragma unroll
        for (int j = 0; j < kBlockM / 8; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int c = 8 * j + 2 * quad + e;  // column: query row i0 + c
            const float l2 = lse2[c], dl = kDoDk ? delta[c] : 0.f;
            const int clo = kMasked ? lo[c] : 0, chi = kMasked ? hi[c] : 0;
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
              const int i = e + 2 * hf + 4 * j, kr = krow + 8 * hf;
              const bool in = !kMasked || all || (clo <= kr && kr < chi);
              float x = tSt(i), dlogit = 1.f;
              if constexpr (kPlain) {
                x *= sl;
              } else {
                // key n0 + kr formed without signed overflow (past the block it is masked anyway)
                const int key = static_cast<int>(static_cast<unsigned>(n0) + static_cast<unsigned>(kr));
                x = mod.logit_grad(x, i0 + c, key, dlogit) * kLog2e;
              }
              const float pe = in ? arch::fast_exp2(x - l2) : 0.f;
              if constexpr (kDoDv) tSt(i) = pe;
              if constexpr (kDoDk) tDPt(i) = in ? pe * (tDPt(i) - dl) * dlogit : 0.f;
            }
          }
      };
      if (kPlain && all)
        p_and_ds(cute::false_type{});
      else
        p_and_ds(cute::true_type{});
      // dV's product runs while dS^T is rounded (each batch's wgmma.fence orders the register
      // writes before it)
      if constexpr (kDoDv) {
        to_operand<typename C::NvT>(tSt, tPt);
        warpgroup_fence_operand(tPt);
        wgmma_issue<false>(mma_dv, tPt, tVrDOt(_, _, _, st), tdV);
      }
      if constexpr (kDoDk) {
        to_operand<typename C::NvT>(tDPt, tDSt);
        warpgroup_fence_operand(tDSt);
        wgmma_issue<false>(mma_dk, tDSt, tKrQt(_, _, _, st), tdK);
      }
      warpgroup_wait<0>();
      if constexpr (kDoDv) {
        warpgroup_fence_operand(tdV);
        warpgroup_fence_operand(tPt);
      }
      if constexpr (kDoDk) {
        warpgroup_fence_operand(tdK);
        warpgroup_fence_operand(tDSt);
      }
    }
    arrive_barrier(sh.empty[st]);  // every consumer releases every step, computing or not
  }

  // ---- epilogue: this thread's key rows (the padding channels never) --------------------------
  const float dk_scale = kPlain ? p.softmax_scale : 1.f;
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int kr = krow + 8 * hf;
    if (kr >= nvalid) continue;
    const int t_key = s.k_start + n0 + kr;
    if constexpr (kDoDk) {
      typename C::NvT* dk = static_cast<typename C::NvT*>(g.dk) +
                            key_offset(p, s, t_key, g.dk_batch_stride, g.dk_row_stride) + hk * g.dk_head_stride +
                            2 * quad;
#pragma unroll
      for (int j = 0; j < kD / 8; ++j)
        if (8 * j < p.head_dim)
          *reinterpret_cast<uint32_t*>(dk + 8 * j) =
              arch::pack2<typename C::NvT>(tdK(2 * hf + 4 * j) * dk_scale, tdK(1 + 2 * hf + 4 * j) * dk_scale);
    }
    if constexpr (kDoDv) {
      typename C::NvT* dv = static_cast<typename C::NvT*>(g.dv) +
                            key_offset(p, s, t_key, g.dv_batch_stride, g.dv_row_stride) + hk * g.dv_head_stride +
                            2 * quad;
#pragma unroll
      for (int j = 0; j < kDv / 8; ++j)
        if (8 * j < p.head_dim_v)
          *reinterpret_cast<uint32_t*>(dv + 8 * j) =
              arch::pack2<typename C::NvT>(tdV(2 * hf + 4 * j), tdV(1 + 2 * hf + 4 * j));
    }
  }
#endif
}

// blockIdx.x: the key block (times 2 plus the pass when KvConfig splits the passes: the two
// passes of a key block are neighbours, so their Q / dO streams meet in L2).
template <class C, bool kPlain>
__global__ void __launch_bounds__(C::kThreads, 1)
    fmha_bwd_sm90_dkdv_kernel(const FmhaBwdParams g, const FmhaBwdScratch rows,
                              CUTE_GRID_CONSTANT const typename C::TmaK tma_k,
                              CUTE_GRID_CONSTANT const typename C::TmaV tma_v,
                              CUTE_GRID_CONSTANT const typename C::TmaQ tma_q,
                              CUTE_GRID_CONSTANT const typename C::TmaDO tma_do) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  if constexpr (C::kPasses == 1) {
    dkdv_block<C, kPlain, 0>(g, rows, tma_k, tma_v, tma_q, tma_do, blockIdx.x);
  } else {
    static_assert(C::kPasses == 2);
    const int key_block = blockIdx.x / 2;
    if (blockIdx.x % 2 == 0)
      dkdv_block<C, kPlain, 1>(g, rows, tma_k, tma_v, tma_q, tma_do, key_block);
    else
      dkdv_block<C, kPlain, 2>(g, rows, tma_k, tma_v, tma_q, tma_do, key_block);
  }
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __trap();  // a Hopper-class target without the sm_90a features: a misbuilt binary, fail loudly
#endif
}

// Key interval facts of a warpgroup's 64 rows that are uniform over the warpgroup (the
// forward's GroupKeys): the first row has the smallest ends, the last real row the largest.
struct GroupKeys {
  int lo_min = 0, hi_max = 0;  // hull of the rows' intervals: tiles outside it are skipped
  int lo_max = 0, hi_min = 0;  // every row sees [lo_max, hi_min) when `full`
  bool full = false;           // all 64 rows are real rows
  __device__ bool meets(int n0, int n) const { return lo_min - n0 < n && hi_max > n0 && lo_min < hi_max; }
  __device__ bool covers(int n0, int n) const { return full && lo_max <= n0 && hi_min - n0 >= n; }
};

template <class C, bool kPlain>
__global__ void __launch_bounds__(C::kThreads, 1)
    fmha_bwd_sm90_dq_kernel(const FmhaBwdParams g, const FmhaBwdScratch rows,
                            CUTE_GRID_CONSTANT const typename C::TmaQ tma_q,
                            CUTE_GRID_CONSTANT const typename C::TmaDO tma_do,
                            CUTE_GRID_CONSTANT const typename C::TmaK tma_k,
                            CUTE_GRID_CONSTANT const typename C::TmaV tma_v) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename C::T;
  constexpr int kD = C::kD, kDv = C::kDv, kBlockM = C::kBlockM, kBlockN = C::kBlockN, kStages = C::kStages;
  const FmhaParams& p = g.fwd;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  auto& sh = *reinterpret_cast<typename C::Smem*>(smem_raw);

  const int b = blockIdx.z, h = blockIdx.y;
  const SeqInfo s = seq_info(p, b);
  const int m0 = (gridDim.x - 1 - blockIdx.x) * kBlockM;  // latest rows first: causal blocks are heaviest
  if (m0 >= s.q_len) return;  // dq of rows past seqused stays zero (the op zero-fills it)
  const int hk = h / (p.num_heads / p.num_heads_k);
  // keys of the block: the first row's lower end to the last real row's upper end
  const int kmin = key_range_for_row(p, s, m0).lo;
  const int kmax = key_range_for_row(p, s, imin(m0 + kBlockM, s.q_len) - 1).hi;
  const int num_tiles = kmax > kmin ? ceil_div_pos(kmax - kmin, kBlockN) : 0;

  if (threadIdx.x == 0) {
    initialize_barrier(sh.q_full, 1);
    for (int st = 0; st < kStages; ++st) {
      initialize_barrier(sh.kv_full[st], 1);
      initialize_barrier(sh.kv_empty[st], C::kConsumerThreads);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  // ---- producer: one thread issues every load ----------------------------------------------
  if (threadIdx.x < 128) {
    cutlass::arch::warpgroup_reg_dealloc<C::kProducerRegs>();
    if (threadIdx.x < 32 && num_tiles > 0 && elect_one_sync()) {
      Tensor sQ = make_tensor(make_smem_ptr(sh.q.data()), typename C::SmemQ{});
      Tensor sDO = make_tensor(make_smem_ptr(sh.dout.data()), typename C::SmemDO{});
      Tensor sK = make_tensor(make_smem_ptr(sh.k.data()), typename C::SmemK{});
      Tensor sV = make_tensor(make_smem_ptr(sh.v.data()), typename C::SmemV{});
      const int q0 = static_cast<int>(s.q_row0) + m0;
      const int k0 = static_cast<int>(s.k_row0) + s.k_start + kmin;
      const int bq = p.q_is_ragged ? 0 : b, bk = p.k_is_ragged ? 0 : s.cache_row;
      Tensor mQ = tma_q.get_tma_tensor(q_shape(p))(_, _, h, bq);
      Tensor mDO = tma_do.get_tma_tensor(dout_shape(p))(_, _, h, bq);
      Tensor mK = tma_k.get_tma_tensor(k_shape(p))(_, _, hk, bk);
      Tensor mV = tma_v.get_tma_tensor(v_shape(p))(_, _, hk, bk);
      Tensor gQ = local_tile(domain_offset(make_coord(q0, _0{}), mQ), Shape<Int<kBlockM>, Int<kD>>{}, make_coord(0, 0));
      Tensor gDO = local_tile(domain_offset(make_coord(q0, _0{}), mDO), Shape<Int<kBlockM>, Int<kDv>>{}, make_coord(0, 0));
      Tensor gK = local_tile(domain_offset(make_coord(k0, _0{}), mK), Shape<Int<kBlockN>, Int<kD>>{}, make_coord(_, 0));
      Tensor gV = local_tile(domain_offset(make_coord(k0, _0{}), mV), Shape<Int<kBlockN>, Int<kDv>>{}, make_coord(_, 0));
      auto [tQg, tQs] = tma_partition(tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
      auto [tDg, tDs] = tma_partition(tma_do, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sDO), group_modes<0, 2>(gDO));
      auto [tKg, tKs] = tma_partition(tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
      auto [tVg, tVs] = tma_partition(tma_v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));
      CUTE_STATIC_ASSERT_V(size<1>(tKs) == Int<kStages>{} && size<1>(tVs) == Int<kStages>{});

      set_barrier_transaction_bytes(sh.q_full, C::kRowBytes);
      copy(tma_q.with(sh.q_full), tQg, tQs);
      copy(tma_do.with(sh.q_full), tDg, tDs);
      for (int t = 0; t < num_tiles; ++t) {
        const int st = t % kStages, phase = (t / kStages) & 1;
        if (t >= kStages) wait_barrier(sh.kv_empty[st], phase ^ 1);
        set_barrier_transaction_bytes(sh.kv_full[st], C::kKVBytes);
        copy(tma_k.with(sh.kv_full[st]), tKg(_, t), tKs(_, st));
        copy(tma_v.with(sh.kv_full[st]), tVg(_, t), tVs(_, st));
      }
    }
    return;
  }

  // ---- consumers -------------------------------------------------------------------------------
  cutlass::arch::warpgroup_reg_alloc<C::kConsumerRegs>();
  const int ct = threadIdx.x - 128;
  const int group = ct / 128, warp = (ct % 128) / 32, lane = ct % 32;
  const int quad = lane % 4;

  typename C::MmaS mma_s;
  typename C::MmaDP mma_dp;
  typename C::MmaDQ mma_dq;
  auto thr_s = mma_s.get_thread_slice(ct);
  auto thr_dp = mma_dp.get_thread_slice(ct);
  auto thr_dq = mma_dq.get_thread_slice(ct);
  Tensor sQ = make_tensor(make_smem_ptr(sh.q.data()), typename C::SmemQ{});
  Tensor sDO = make_tensor(make_smem_ptr(sh.dout.data()), typename C::SmemDO{});
  Tensor sK = make_tensor(make_smem_ptr(sh.k.data()), typename C::SmemK{});
  Tensor sKt = make_tensor(make_smem_ptr(sh.k.data()), typename C::SmemKt{});
  Tensor sV = make_tensor(make_smem_ptr(sh.v.data()), typename C::SmemV{});
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);
  Tensor tSrK = thr_s.partition_fragment_B(sK);     // (.., k-steps, stage)
  Tensor tPrDO = thr_dp.partition_fragment_A(sDO);
  Tensor tPrV = thr_dp.partition_fragment_B(sV);
  Tensor tQrKt = thr_dq.partition_fragment_B(sKt);
  Tensor tS = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});   // S, then dS
  Tensor tDP = partition_fragment_C(mma_dp, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor tDS = make_tensor<T>(partition_shape_A(mma_dq, Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor tdQ = partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<kD>>{});
  static_assert(size(tS) == kBlockN / 2 && size(tDP) == kBlockN / 2 && size(tDS) == size(tS) && size(tdQ) == kD / 2);
  CUTE_STATIC_ASSERT_V(size<1>(tSrQ) == _1{} && size<2>(tSrQ) == Int<kD / 16>{} && size<3>(tSrK) == Int<kStages>{});
  CUTE_STATIC_ASSERT_V(size<1>(tDS) == _1{} && size<2>(tDS) == Int<kBlockN / 16>{} &&
                       size<2>(tQrKt) == Int<kBlockN / 16>{} && size<3>(tQrKt) == Int<kStages>{});
  clear(tdQ);

  // this thread's two rows (block rows 64 group + 16 warp + lane / 4 + 8 hf): keys, lse2, delta
  int row_lo[2], row_hi[2];
  float row_lse2[2], row_delta[2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int m = m0 + group * 64 + warp * 16 + lane / 4 + hf * 8;
    KeyInterval keys;  // empty past the real rows: they are computed but never stored
    row_lse2[hf] = INFINITY;
    row_delta[hf] = 0.f;
    if (m < s.q_len) {
      keys = key_range_for_row(p, s, m);
      const int64_t at = global_row(p, s, b, m) * p.num_heads + h;
      row_lse2[hf] = rows.lse2[at];
      row_delta[hf] = rows.delta[at];
    }
    row_lo[hf] = keys.lo;
    row_hi[hf] = keys.hi;
  }
  GroupKeys gk;
  {
    const int first = m0 + group * 64, last = imin(first + 64, s.q_len) - 1;
    if (first <= last) {
      const KeyInterval a = key_range_for_row(p, s, first), z = key_range_for_row(p, s, last);
      gk.lo_min = a.lo;
      gk.hi_min = a.hi;
      gk.lo_max = z.lo;
      gk.hi_max = z.hi;
      gk.full = last - first == 63;
    }
  }
  const float sl = p.softmax_scale * kLog2e;
  const ScoreMod mod = score_mod(p, s, b, h);

  if (num_tiles > 0) wait_barrier(sh.q_full, 0);
  for (int t = 0; t < num_tiles; ++t) {
    const int st = t % kStages, phase = (t / kStages) & 1;
    const int n0 = kmin + t * kBlockN;
    const bool any = gk.meets(n0, kBlockN);
    const bool all = gk.covers(n0, kBlockN);

    wait_barrier(sh.kv_full[st], phase);
    if (t == num_tiles - 1 && kmax - n0 < kBlockN) {
      // K rows past the block's last key: zeros, so that dS = 0 there meets no NaN in dQ += dS K
      // (both warpgroups read all of K: both wait for all of the zeros)
      zero_rows<kBlockN, kD>(sK, st, kmax - n0, ct, C::kConsumerThreads);
      cutlass::arch::fence_view_async_shared();
      cutlass::arch::NamedBarrier::sync(C::kConsumerThreads, 0);
    }
    if (any) {
      wgmma_issue<true>(mma_s, tSrQ, tSrK(_, _, _, st), tS);
      wgmma_issue<true>(mma_dp, tPrDO, tPrV(_, _, _, st), tDP);
      warpgroup_wait<0>();
      warpgroup_fence_operand(tS);
      warpgroup_fence_operand(tDP);
      // dS, kMasked: with the per-element mask; plain scores on a tile no element of which is
      // masked take the loop without it (a warp-uniform branch, as in the dK / dV kernel)
      auto ds = [&](auto masked_tag) {
        constexpr bool kMasked = decltype(masked_tag)::value;
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int lo = row_lo[hf] - n0, hi = row_hi[hf] - n0;  // relative to n0
#pragma unroll
          for (int j = 0; j < kBlockN / 8; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int i = e + 2 * hf + 4 * j, col = 8 * j + 2 * quad + e;
              const bool in = !kMasked || all || (lo <= col && col < hi);
              float x = tS(i), dlogit = 1.f;
              if constexpr (kPlain) {
                x *= sl;
              } else {
                const int m = m0 + group * 64 + warp * 16 + lane / 4 + hf * 8;
                const int key = static_cast<int>(static_cast<unsigned>(n0) + static_cast<unsigned>(col));
                x = mod.logit_grad(x, m, key, dlogit) * kLog2e;
              }
              const float pe = in ? arch::fast_exp2(x - row_lse2[hf]) : 0.f;
              tS(i) = in ? pe * (tDP(i) - row_delta[hf]) * dlogit : 0.f;
            }
        }
      };
      if (kPlain && all)
        ds(cute::false_type{});
      else
        ds(cute::true_type{});
      to_operand<typename C::NvT>(tS, tDS);
      warpgroup_fence_operand(tDS);
      wgmma_issue<false>(mma_dq, tDS, tQrKt(_, _, _, st), tdQ);
      warpgroup_wait<0>();
      warpgroup_fence_operand(tdQ);
      warpgroup_fence_operand(tDS);
    }
    arrive_barrier(sh.kv_empty[st]);
  }

  // ---- epilogue: dq is contiguous (total rows, H, D) -------------------------------------------
  const float dq_scale = kPlain ? p.softmax_scale : 1.f;
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int m = m0 + group * 64 + warp * 16 + lane / 4 + hf * 8;
    if (m >= s.q_len) continue;
    typename C::NvT* dq = static_cast<typename C::NvT*>(g.dq) +
                          (global_row(p, s, b, m) * p.num_heads + h) * p.head_dim + 2 * quad;
#pragma unroll
    for (int j = 0; j < kD / 8; ++j)
      if (8 * j < p.head_dim)
        *reinterpret_cast<uint32_t*>(dq + 8 * j) =
            arch::pack2<typename C::NvT>(tdQ(2 * hf + 4 * j) * dq_scale, tdQ(1 + 2 * hf + 4 * j) * dq_scale);
  }
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __trap();
#endif
}

// Are the sm_90a bodies what the current device runs? (tma_checks.cuh's image_loaded.)
template <class KC, class QC, bool kPlain>
bool kernels_run_here() {
  static std::atomic<uint64_t> known_kv{0}, good_kv{0}, known_q{0}, good_q{0};
  return image_loaded(fmha_bwd_sm90_dkdv_kernel<KC, kPlain>, known_kv, good_kv) &&
         image_loaded(fmha_bwd_sm90_dq_kernel<QC, kPlain>, known_q, good_q);
}


// Global views of q, dout, k, v for the descriptors (fmha_bwd_sm90_fits checked their needs).
template <class T>
auto q_view(const FmhaParams& p) {
  return make_tensor(make_gmem_ptr(static_cast<const T*>(p.q)), q_shape(p),
                     make_stride(mode_stride(p.q_row_stride, q_rows(p)), _1{}, mode_stride(p.q_head_stride, p.num_heads),
                                 mode_stride(p.q_batch_stride, q_batches(p))));
}
template <class T>
auto dout_view(const FmhaBwdParams& g) {
  const FmhaParams& p = g.fwd;
  return make_tensor(make_gmem_ptr(static_cast<const T*>(g.dout)), dout_shape(p),
                     make_stride(mode_stride(g.dout_row_stride, q_rows(p)), _1{},
                                 mode_stride(g.dout_head_stride, p.num_heads),
                                 mode_stride(g.dout_batch_stride, q_batches(p))));
}
template <class T>
auto k_view(const FmhaParams& p) {
  return make_tensor(make_gmem_ptr(static_cast<const T*>(p.k)), k_shape(p),
                     make_stride(mode_stride(p.k_row_stride, k_rows(p)), _1{}, mode_stride(p.k_head_stride, p.num_heads_k),
                                 mode_stride(p.k_batch_stride, k_batches(p))));
}
template <class T>
auto v_view(const FmhaParams& p) {
  return make_tensor(make_gmem_ptr(static_cast<const T*>(p.v)), v_shape(p),
                     make_stride(mode_stride(p.v_row_stride, k_rows(p)), _1{}, mode_stride(p.v_head_stride, p.num_heads_k),
                                 mode_stride(p.v_batch_stride, k_batches(p))));
}

template <class KC, class QC, bool kPlain>
arch::Error launch_configs(const FmhaBwdParams& g, const FmhaBwdScratch& rows, arch::Stream stream) {
  using T = typename KC::T;
  const FmhaParams& p = g.fwd;
  static std::atomic<uint64_t> configured_kv{0}, configured_q{0};
  // both attributes before either launch: a failure here launches nothing (the caller falls back)
  arch::Error e =
      arch::set_max_dynamic_smem_once(fmha_bwd_sm90_dkdv_kernel<KC, kPlain>, KC::kSmemBytes, configured_kv);
  if (e == arch::kSuccess)
    e = arch::set_max_dynamic_smem_once(fmha_bwd_sm90_dq_kernel<QC, kPlain>, QC::kSmemBytes, configured_q);
  if (e != arch::kSuccess) return e;
  const auto gq = q_view<T>(p);
  const auto gdo = dout_view<T>(g);
  const auto gk = k_view<T>(p);
  const auto gv = v_view<T>(p);

  const dim3 kv_grid(static_cast<unsigned>(ceil_div_pos(imax(g.max_seqlen_k, 1), KC::kBlockN) * KC::kPasses),
                     static_cast<unsigned>(p.num_heads_k), static_cast<unsigned>(p.batch));
  fmha_bwd_sm90_dkdv_kernel<KC, kPlain><<<kv_grid, KC::kThreads, KC::kSmemBytes, stream>>>(
      g, rows, make_tma_copy(SM90_TMA_LOAD{}, gk, typename KC::SmemK{}),
      make_tma_copy(SM90_TMA_LOAD{}, gv, typename KC::SmemV{}),
      make_tma_copy(SM90_TMA_LOAD{}, gq, take<0, 2>(typename KC::SmemQ{})),
      make_tma_copy(SM90_TMA_LOAD{}, gdo, take<0, 2>(typename KC::SmemDO{})));
  if ((e = arch::last_error()) != arch::kSuccess) return e;

  const dim3 q_grid(static_cast<unsigned>(ceil_div_pos(imax(g.max_seqlen_q, 1), QC::kBlockM)),
                    static_cast<unsigned>(p.num_heads), static_cast<unsigned>(p.batch));
  fmha_bwd_sm90_dq_kernel<QC, kPlain><<<q_grid, QC::kThreads, QC::kSmemBytes, stream>>>(
      g, rows, make_tma_copy(SM90_TMA_LOAD{}, gq, typename QC::SmemQ{}),
      make_tma_copy(SM90_TMA_LOAD{}, gdo, typename QC::SmemDO{}),
      make_tma_copy(SM90_TMA_LOAD{}, gk, take<0, 2>(typename QC::SmemK{})),
      make_tma_copy(SM90_TMA_LOAD{}, gv, take<0, 2>(typename QC::SmemV{})));
  return arch::last_error();
}

// logit = softmax_scale * dot: no softcap, no ALiBi (the sign of the scale does not matter to
// the backward, which takes the lse as given)
inline bool plain_scores(const FmhaParams& p) { return !(p.softcap > 0.f) && !p.alibi_slopes; }

// The bf16 and fp16 kernels of one tile width: is the sm_90a body loaded, and launch.
struct WidthKernels {
  bool (*runs_here)(bool f16, bool plain);
  arch::Error (*launch)(const FmhaBwdParams& g, const FmhaBwdScratch& rows, arch::Stream stream, bool f16, bool plain);
};
template <class KC, class QC>
bool width_runs_here(bool plain) {
  return plain ? kernels_run_here<KC, QC, true>() : kernels_run_here<KC, QC, false>();
}
template <class KC, class QC>
arch::Error width_launch(const FmhaBwdParams& g, const FmhaBwdScratch& rows, arch::Stream stream, bool plain) {
  return plain ? launch_configs<KC, QC, true>(g, rows, stream) : launch_configs<KC, QC, false>(g, rows, stream);
}
template <int kD, int kDv>
constexpr WidthKernels width_kernels() {
  using B = cutlass::bfloat16_t;
  using H = cutlass::half_t;
  return {[](bool f16, bool plain) {
            return f16 ? width_runs_here<KvConfig<H, arch::f16, kD, kDv>, DqConfig<H, arch::f16, kD, kDv>>(plain)
                       : width_runs_here<KvConfig<B, arch::bf16, kD, kDv>, DqConfig<B, arch::bf16, kD, kDv>>(plain);
          },
          [](const FmhaBwdParams& g, const FmhaBwdScratch& rows, arch::Stream stream, bool f16, bool plain) {
            return f16 ? width_launch<KvConfig<H, arch::f16, kD, kDv>, DqConfig<H, arch::f16, kD, kDv>>(g, rows, stream,
                                                                                                      plain)
                       : width_launch<KvConfig<B, arch::bf16, kD, kDv>, DqConfig<B, arch::bf16, kD, kDv>>(g, rows, stream,
                                                                                                       plain);
          }};
}

// One translation unit per tile width (fmha_bwd_sm90_<width>.cu) instantiates its kernels, so
// a parallel build compiles them side by side; fmha_bwd_sm90.cu has the dispatch.
extern const WidthKernels kWidth64, kWidth128, kWidth192x128, kWidth256;

}  // namespace sm90_bwd
}  // namespace mate::device

#endif  // MATE_WITH_SM90
