// MLA decode for Hopper (sm_90a): dense bf16 decode against a paged bf16 latent cache on TMA
// loads and wgmma, written with CUTLASS's CuTe headers in the patterns of our FMHA forward
// (fmha_fwd_sm90.cuh). On a compute capability 9.0 device the calls mla_sm90_fits accepts with
// at least 64 query rows per kv head come here by default (mla_kernels.cu: mla_sm90_takes;
// MATE_OPS_MLA_PATH=sm80 opts out, =sm90 sends every call it serves) (mla_kernels.cu: mla_sm90_takes); everything else stays
// on mla_mma_kernel / mla_portable_kernel.
//
// Served: q bf16 (B, Sq, Hq, 576) (512 latent + 64 rope channels), a dense paged cache bf16
// (num_blocks, P, Hkv, 576) with a block table and cache_seqlens, head_dim_v 512 (V = the first
// 512 channels of each cache row), any softmax scale, causal (bottom-right aligned) for Sq > 1,
// attn_sink via mla_finish, Hq / Hkv a multiple of 16, P a multiple of 64, TMA-aligned tensors
// (16-byte base and strides). Semantics: SEMANTICS.md §3 (dense decode).
//
// Why: the mma.sync kernel reaches 158-182 TFLOP/s on the H200 at Hq 128 (docs/performance.md,
// "GPU: MLA (H200)"); mma.sync cannot feed a Hopper SM's tensor cores, wgmma can, and TMA moves
// a 72 KB key tile with a handful of instructions from one thread and no registers.
//
// Work split: the same schedule and split partials as mla_mma_kernel (MlaSplitRun, the device
// computed get_mla_metadata schedule; mla_combine_kernel merges split sequences), so the host
// side is unchanged. Block (part, row block, kv head): 64 of the Sq * Hq / Hkv query rows of a
// sequence (row r = query r / G, head r % G of the kv head's group; wgmma's M) against the
// 64-key tiles of the part's pieces. 384 threads in three warpgroups:
//   - warpgroup 0, the producer: one thread issues the TMA loads of Q (64 x 576 bf16 = 72 KB,
//     once per sequence piece, as four 16-row copies: a 16-row run of rows is 16 consecutive
//     heads of one query because G % 16 == 0) and of the key tiles (64 x 576 = 72 KB each, two
//     stages) whose page comes from the block table (a tile never crosses a page: P % 64 == 0
//     and pieces start at multiples of 64). It keeps 40 registers (setmaxnreg).
//   - warpgroups 1 and 2, the consumers (232 registers each). Each key tile is read once from
//     shared memory by both products: K-major as S's B operand and MN-major (the same bytes,
//     the first 512 channels; static_assert below) as V.
//       S = Q K^T: consumer g computes the 64 rows x its 32 keys (keys 32 g .. 32 g + 31; wgmma
//       64 x 32 x 576, both operands in shared memory), so S is computed once, not per
//       warpgroup. The row maxima of the two halves meet through shared memory, so both
//       warpgroups run the online softmax (base 2) with bitwise the same running maxima.
//       O += P V: consumer g owns output channels 256 g .. 256 g + 255 (64 x 256 fp32 = 128
//       registers per thread), so it needs P of all 64 keys as the A operand of a register-A
//       wgmma. The S accumulators' register layout is that A-operand layout (static_asserts in
//       Config), and thread i of one consumer holds the same rows and relative key columns as
//       thread i of the other (its partner). So each thread packs its P half to bf16 and
//       stores it to an exchange buffer as 8 32-bit words at [consumer][word][i]
//       (bank-conflict free), a 64-thread named barrier per warp pair (not the whole block)
//       publishes them, and each thread loads both halves back in key order as its A operand
//       (16 words). (It does not keep its own half in registers for that step: registers are
//       scarce while P V runs.) With P in registers (RS wgmma) the buffer is free as soon as both
//       have read it, not when the product finishes.
//     Why this split and not the alternatives: one warpgroup computing all of S and sharing P
//     through shared memory idles the other during Q K^T (53 % of the FLOPs); both computing
//     all of S doubles those FLOPs; 128 rows per block need 256 O registers per thread.
//     Splitting S over the channels (each warpgroup half of the 576, partial sums exchanged)
//     would keep 64-key wgmma tiles but needs a 2 x 16 KB fp32 exchange buffer that does not
//     fit beside Q and two key stages (221 KB).
//   - Per tile t (after tile 0): issue S_t and O += P_{t-1} V_{t-1}; wait for S_t only; the
//     softmax of S_t (mask, max exchange, exp2, P_t to the partner) runs while P V is on the
//     tensor cores; then wait for P V, release tile t - 1 to the producer, rescale O, and read
//     the partner's half of P_t. Every wgmma is issued and waited for unconditionally (tile 0's
//     S before the loop, the last P V after it): ptxas serializes all wgmma of a kernel whose
//     issues or waits sit in data-dependent branches (warning C7518; it cost our FMHA forward
//     10-20 %), and the producer / consumer split uses cutlass::canonical_warp_group_idx().
// Masking: a key counts for a row below min(piece end, the row's causal limit); masked scores
// are selected to -inf (never multiplied). Key rows of the last tile past the piece's end are
// unused or other sequences' cache slots (possibly NaN) and 0 * NaN would reach O, so the
// consumers zero their 512 V channels in shared memory before the tile's products (their rope
// channels only reach masked scores). Padding query rows of a block (rows beyond Sq * G) load a
// copy of real rows and are never stored.
//
// Shared memory: Q 72 KB + 2 key stages 144 KB + the P exchange (8 KB) and the row-max exchange
// (2 KB) = 226 KB of data, which the 1024-byte alignment rounds up to exactly the 227 KB a block
// may have (no headroom: any new field breaks the static_assert): one block per SM.
//
// Status: correct on the H200 (tests/test_sm90_mla.py: 24 cases against the fp64 oracle, and every
// cuda case of tests/test_mla.py through it; compute-sanitizer memcheck and racecheck clean on
// scripts/sanitize_sm90_mla.py); 112 / 188 B of spills at compile time (nvcc 13, no C7518).
#include <atomic>
#include <cmath>
#include <cstdint>

#include "../../../common/fmha_math.h"
#include "../../../common/mla_params.h"
#include "../../kernels.h"
#include "../../mla_device.cuh"
#include "../device.h"
#include "tma_checks.cuh"

#if defined(MATE_WITH_SM90)

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>

#include "../mma.h"  // fast_exp2, pack2

namespace mate::device {
namespace sm90_mla {

using namespace cute;

struct Config {
  using T = cutlass::bfloat16_t;  // CuTe's element type (the wgmma operand type)
  using NvT = arch::bf16;         // the CUDA type of the same bits (arch::pack2)
  static constexpr int kD = 576;                // q / cache row: 512 latent + 64 rope
  static constexpr int kDv = 512;               // V: the first 512 channels of a cache row
  static constexpr int kBlockM = 64;            // query rows per block (wgmma M)
  static constexpr int kBlockN = 64;            // keys per tile: the schedule's key block
  static constexpr int kHalfN = kBlockN / 2;    // keys of S per consumer warpgroup
  static constexpr int kHalfDv = kDv / 2;       // O channels per consumer warpgroup
  static constexpr int kStages = 2;             // key tiles in flight
  static constexpr int kQChunk = 16;            // Q rows per TMA copy (G is a multiple of it)
  static constexpr int kConsumers = 2;
  static constexpr int kConsumerThreads = 128 * kConsumers;
  static constexpr int kThreads = 128 + kConsumerThreads;
  // 128 * 40 + 256 * 232 <= 64K registers
  static constexpr int kProducerRegs = 40, kConsumerRegs = 232;
  static_assert(kBlockN == kMlaBlockTokens, "a tile is one key block of the schedule");
  static_assert(kBlockM % kQChunk == 0);

  // S = Q K_half^T: M 64 rows, N 32 keys, K 576 channels; both operands K-major in shared memory.
  // O_half += P V_half: N 256 channels, K 64 keys; P from registers, V MN-major.
  using AtomS = decltype(GMMA::ss_op_selector<T, T, float, Shape<_64, Int<kHalfN>, Int<kD>>>());
  using AtomO = decltype(GMMA::rs_op_selector<T, T, float, Shape<_64, Int<kHalfDv>, Int<kBlockN>>, GMMA::Major::K,
                                                GMMA::Major::MN>());
  using MmaS = decltype(make_tiled_mma(AtomS{}));  // one warpgroup each
  using MmaO = decltype(make_tiled_mma(AtomO{}));

  // The softmax indexes the accumulators directly (value i = e + 2 h + 4 j is row lane / 4 +
  // 16 warp + 8 h, column 8 j + 2 (lane % 4) + e), and P reuses S's register order as the A
  // operand of O += P V: 16 accumulator columns are laid out exactly like one k-step of a
  // register A operand. So a thread of either consumer holds the same rows and relative
  // columns, and keys 32 g .. 32 g + 31 are k-steps 2 g, 2 g + 1 of P.
  static_assert(cute::is_same_v<typename MmaS::Atom::CLayout, GMMA::CLayout_64xN<kHalfN>>);
  static_assert(cute::is_same_v<typename MmaO::Atom::CLayout, GMMA::CLayout_64xN<kHalfDv>>);
  static_assert(cute::is_same_v<typename MmaO::Atom::ALayout, GMMA::ALayout_64x16>);
  static_assert(cute::is_same_v<GMMA::CLayout_64xN<16>, GMMA::ALayout_64x16>);

  // Shared tiles with the 128-byte swizzle wgmma and TMA both understand.
  using SmemQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kBlockM>, Int<kD>>{}));
  // One TMA copy of Q: 16 rows. (Its boxes are 16 x 64 channels, 2 KB contiguous in SmemQ too:
  // tma_partition places them by SmemQ's own layout.)
  using SmemQChunk = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kQChunk>, Int<kD>>{}));
  using SmemK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kBlockN>, Int<kD>, Int<kStages>>{}));
  // The same bytes as (channels, keys, stage), MN-major: the swizzle atom 64 channels x 8 keys
  // is SmemK's 8 keys x 64 channels transposed, stacked along the keys first like SmemK's.
  using SmemV = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<T>{}, Shape<Int<kD>, Int<kBlockN>, Int<kStages>>{},
                                       Step<_2, _1, _3>{}));

  // Global views for the TMA descriptors: q as (Hq, 576, Sq, B), the cache as
  // (P, 576, Hkv, num_blocks).
  using GShape = Shape<int, int, int, int>;
  using GStride = Stride<int64_t, _1, int64_t, int64_t>;
  using GTensor = decltype(make_tensor(make_gmem_ptr(static_cast<const T*>(nullptr)), GShape{}, GStride{}));
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, std::declval<GTensor>(), SmemQChunk{}));
  using TmaK = decltype(make_tma_copy(SM90_TMA_LOAD{}, std::declval<GTensor>(), take<0, 2>(SmemK{})));

  // Named barriers (CuTe's NamedBarrier numbers them after the ids CUTLASS reserves).
  static constexpr uint32_t kConsumerBarrier = 0;  // both consumer warpgroups (256 threads)
  static constexpr uint32_t kPairBarrier = 1;      // + warp w: warp w of each consumer (64 threads)

  static constexpr uint32_t kQBytes = kBlockM * kD * sizeof(T);
  static constexpr uint32_t kKBytes = kBlockN * kD * sizeof(T);

  struct Smem {
    alignas(1024) cute::array_aligned<T, cosize_v<SmemQ>, 1024> q;
    alignas(1024) cute::array_aligned<T, cosize_v<SmemK>, 1024> k;
    // P exchange: [consumer][packed pair i][thread of the warpgroup]; also the row sums at the end
    uint32_t p_x[kConsumers][kHalfN / 4][128];
    float m_x[kConsumers][2][128];  // row-max exchange: [consumer][row half][thread]
    // full: the tile has landed (TMA transaction count); empty: every consumer thread is done
    uint64_t q_full, q_empty;
    uint64_t k_full[kStages], k_empty[kStages];
  };
  static constexpr int kSmemBytes = static_cast<int>(sizeof(Smem));
  static_assert(kSmemBytes <= 227 * 1024, "a Hopper SM gives one block at most 227 KB of shared memory");
};

// SmemK and SmemV name the same bytes (V's channel c, key k, stage s is K's key k, channel c):
// a sample of the tiles (the whole exceeds the compiler's constexpr budget): every key at
// channels 0, 9, 511 and 575, every channel at keys 0, 7, 63, and the second stage.
constexpr bool k_and_v_share_bytes() {
  using K = Config::SmemK;
  using V = Config::SmemV;
  for (int k = 0; k < Config::kBlockN; ++k)
    if (K{}(k, 0, 0) != V{}(0, k, 0) || K{}(k, 9, 0) != V{}(9, k, 0) || K{}(k, 511, 0) != V{}(511, k, 0) ||
        K{}(k, 575, 1) != V{}(575, k, 1))
      return false;
  for (int c = 0; c < Config::kD; ++c)
    if (K{}(0, c, 0) != V{}(c, 0, 0) || K{}(7, c, 1) != V{}(c, 7, 1) || K{}(63, c, 0) != V{}(c, 63, 0)) return false;
  return true;
}
static_assert(k_and_v_share_bytes(), "the MN-major V view must name the K-major tile's bytes");

// Issues one wgmma tile product, C (+)= A B over every k-step, without waiting for it.
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

// One piece of a schedule part: sequence sq's keys [kbeg, kend) (kend also capped at the
// causal limit of the block's last row), ntiles 64-key tiles; `whole` when the part covers the
// sequence entirely (final output), else fp32 partials for mla_combine_kernel.
struct Piece {
  int kbeg = 0, kend = 0, ntiles = 0;
  bool whole = true;
};

__device__ __forceinline__ Piece make_piece(const MlaParams& p, const int32_t* sched, int sq, int r_last) {
  MlaMetadataParams blocks_of;  // mla_key_blocks' view of the sequences, as mla_mma_kernel
  blocks_of.cache_seqlens = p.cache_seqlens;
  blocks_of.fixed_keys = -1;
  const int nblocks = static_cast<int>(mla_key_blocks(blocks_of, sq));
  const int blk_lo = sq == sched[0] ? sched[1] : 0, blk_hi = sq == sched[2] ? sched[3] : nblocks;
  const int len = imax(0, p.cache_seqlens[sq]);
  const int G = p.heads_q / p.heads_kv;
  Piece pc;
  pc.whole = blk_lo == 0 && blk_hi == nblocks;
  pc.kbeg = blk_lo * kMlaBlockTokens;
  pc.kend = imin(imin(blk_hi * kMlaBlockTokens, len), mla_causal_limit(p, len, r_last / G));
  pc.ntiles = pc.kend > pc.kbeg ? ceil_div_pos(pc.kend - pc.kbeg, kMlaBlockTokens) : 0;
  return pc;
}

// Does part `sched` cover (a piece of) sequence sq? (mla_mma_kernel's loop condition)
__device__ __forceinline__ bool in_part(const int32_t* sched, int sq, int seqs) {
  return sq < seqs && (sq < sched[2] || (sq == sched[2] && sched[3] > 0));
}

// Grid (parts, row blocks, kv heads).
template <class C>
__global__ void __launch_bounds__(C::kThreads, 1)
    mla_sm90_kernel(const MlaParams p, const MlaSplitRun run, CUTE_GRID_CONSTANT const typename C::TmaQ tma_q,
                    CUTE_GRID_CONSTANT const typename C::TmaK tma_k) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename C::T;
  constexpr int kD = C::kD, kBlockM = C::kBlockM, kBlockN = C::kBlockN, kStages = C::kStages;
  constexpr int kHalfN = C::kHalfN, kHalfDv = C::kHalfDv, kQChunk = C::kQChunk;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  auto& sh = *reinterpret_cast<typename C::Smem*>(smem_raw);

  const int part = blockIdx.x, hkv = blockIdx.z;
  const int r_base = blockIdx.y * kBlockM;  // < run.rows: the grid has ceil(rows / 64) row blocks
  const int r_last = imin(r_base + kBlockM, run.rows) - 1;
  const int32_t* sched = run.meta + part * kMlaMetadataCols;
  const int G = p.heads_q / p.heads_kv;

  if (threadIdx.x == 0) {
    initialize_barrier(sh.q_full, 1);
    initialize_barrier(sh.q_empty, C::kConsumerThreads);
    for (int st = 0; st < kStages; ++st) {
      initialize_barrier(sh.k_full[st], 1);
      initialize_barrier(sh.k_empty[st], C::kConsumerThreads);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  // The role split on a warpgroup index the compiler knows is warp-uniform (a shuffle of lane
  // 0's value): wgmma in a branch it must treat as divergent is serialized (C7518).
  const int warp_group = cutlass::canonical_warp_group_idx();

  // ---- producer: one thread issues every load --------------------------------------------
  if (warp_group == 0) {
    cutlass::arch::warpgroup_reg_dealloc<C::kProducerRegs>();
    if (cutlass::canonical_warp_idx_sync() == 0 && elect_one_sync()) {
      Tensor sQ = make_tensor(make_smem_ptr(sh.q.data()), typename C::SmemQ{});
      Tensor sK = make_tensor(make_smem_ptr(sh.k.data()), typename C::SmemK{});
      Tensor mQ = tma_q.get_tma_tensor(make_shape(p.heads_q, kD, p.seqlen_q, p.batch));
      Tensor mK = tma_k.get_tma_tensor(make_shape(p.cache.page_size, kD, p.heads_kv, p.cache.num_blocks));
      const int P = p.cache.page_size;
      int tiles = 0, q_loads = 0;
      for (int sq = sched[0]; in_part(sched, sq, run.seqs); ++sq) {
        const Piece pc = make_piece(p, sched, sq, r_last);
        if (pc.ntiles == 0) continue;
        // Q: four 16-row copies; a chunk past the real rows loads the last real chunk again
        // (those rows are computed and never stored)
        if (q_loads > 0) wait_barrier(sh.q_empty, (q_loads - 1) & 1);
        set_barrier_transaction_bytes(sh.q_full, C::kQBytes);
        CUTE_UNROLL
        for (int i = 0; i < kBlockM / kQChunk; ++i) {
          const int r = imin(r_base + i * kQChunk, run.rows - kQChunk);
          const int s = r / G, h0 = hkv * G + r % G;
          Tensor gQ = local_tile(mQ(_, _, s, sq), Shape<Int<kQChunk>, Int<kD>>{}, make_coord(_, _0{}));
          Tensor sQi = local_tile(sQ, Shape<Int<kQChunk>, Int<kD>>{}, make_coord(i, _0{}));
          auto [tQg, tQs] = tma_partition(tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQi), group_modes<0, 2>(gQ));
          copy(tma_q.with(sh.q_full), tQg(_, h0 / kQChunk), tQs);
        }
        ++q_loads;
        const int32_t* table = p.block_table + static_cast<int64_t>(sq) * p.block_table_stride;
        for (int t = 0; t < pc.ntiles; ++t, ++tiles) {
          const int st = tiles % kStages;
          const int n0 = pc.kbeg + t * kBlockN;
          const int blk = table[n0 / P];  // loaded before the wait: its latency hides behind it
          // a stage's first use needs no wait; later ones wait for the release of its last tile
          if (tiles >= kStages) wait_barrier(sh.k_empty[st], ((tiles / kStages) & 1) ^ 1);
          Tensor gK = local_tile(mK(_, _, hkv, blk), Shape<Int<kBlockN>, Int<kD>>{}, make_coord(_, _0{}));
          auto [tKg, tKs] = tma_partition(tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
          set_barrier_transaction_bytes(sh.k_full[st], C::kKBytes);
          copy(tma_k.with(sh.k_full[st]), tKg(_, (n0 % P) / kBlockN), tKs(_, st));
        }
      }
    }
    return;
  }

  // ---- consumers --------------------------------------------------------------------------
  cutlass::arch::warpgroup_reg_alloc<C::kConsumerRegs>();
  const int group = warp_group - 1;             // 0 or 1
  const int ct = threadIdx.x - 128;             // 0 .. 255
  const int wt = ct % 128;                      // thread of the warpgroup; its partner has the same
  const int warp = wt / 32, lane = wt % 32, quad = lane % 4;

  typename C::MmaS mma_s;
  typename C::MmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(wt);
  auto thr_o = mma_o.get_thread_slice(wt);
  Tensor sQ = make_tensor(make_smem_ptr(sh.q.data()), typename C::SmemQ{});
  Tensor sK = make_tensor(make_smem_ptr(sh.k.data()), typename C::SmemK{});
  Tensor sV = make_tensor(make_smem_ptr(sh.k.data()), typename C::SmemV{});
  // this warpgroup's keys (S) and channels (O) of every stage
  Tensor sKg = local_tile(sK, Shape<Int<kHalfN>, Int<kD>, Int<kStages>>{}, make_coord(group, _0{}, _0{}));
  Tensor sVg = local_tile(sV, Shape<Int<kHalfDv>, Int<kBlockN>, Int<kStages>>{}, make_coord(group, _0{}, _0{}));
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);   // wgmma descriptors
  Tensor tSrK = thr_s.partition_fragment_B(sKg);  // (.., k-steps, stage)
  Tensor tOrV = thr_o.partition_fragment_B(sVg);
  Tensor tSrS = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kHalfN>>{});   // S, then P in fp32
  Tensor tOrO = partition_fragment_C(mma_o, Shape<Int<kBlockM>, Int<kHalfDv>>{});
  Tensor tOrP = make_tensor<T>(partition_shape_A(mma_o, Shape<Int<kBlockM>, Int<kBlockN>>{}));
  static_assert(size(tSrS) == kHalfN / 2 && size(tOrO) == kHalfDv / 2 && size(tOrP) == kBlockN / 2);
  CUTE_STATIC_ASSERT_V(size<1>(tSrQ) == _1{} && size<2>(tSrQ) == Int<kD / 16>{} && size<3>(tSrK) == Int<kStages>{});
  CUTE_STATIC_ASSERT_V(size<1>(tOrP) == _1{} && size<2>(tOrP) == Int<kBlockN / 16>{} &&
                       size<3>(tOrV) == Int<kStages>{});
  constexpr int kOwn = kHalfN / 4;  // packed bf16 pairs of this thread's share of P_half

  const float sl = p.softmax_scale * kLog2e;  // scores -> base-2 logits
  // this thread's two rows (block rows 16 warp + lane / 4 + 8 hf), clamped to real rows
  int row_s[2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) row_s[hf] = imin(r_base + warp * 16 + lane / 4 + hf * 8, run.rows - 1) / G;

  auto pair_sync = [&] { cutlass::arch::NamedBarrier::sync(64, C::kPairBarrier + warp); };
  auto issue_s = [&](int st) { wgmma_issue<true>(mma_s, tSrQ, tSrK(_, _, _, st), tSrS); };
  auto issue_o = [&](int st) {
    warpgroup_fence_operand(tOrP);
    wgmma_issue<false>(mma_o, tOrP, tOrV(_, _, _, st), tOrO);
  };
  // Waits for tile g (the block's g-th) to land and zeroes its V rows past the piece's end.
  auto ready_tile = [&](int g, int n0, int kend) {
    const int st = g % kStages;
    wait_barrier(sh.k_full[st], (g / kStages) & 1);
    const int valid = kend - n0;
    if (valid < kBlockN) {  // the same for every consumer thread
      constexpr int kChunks = C::kDv / 8;  // 16-byte chunks of a key's V channels
      for (int idx = ct; idx < (kBlockN - valid) * kChunks; idx += C::kConsumerThreads)
        *reinterpret_cast<uint4*>(&sK(valid + idx / kChunks, 8 * (idx % kChunks), st)) = make_uint4(0u, 0u, 0u, 0u);
      cutlass::arch::fence_view_async_shared();  // generic stores -> wgmma's (async proxy) reads
      cutlass::arch::NamedBarrier::sync(C::kConsumerThreads, C::kConsumerBarrier);
    }
  };

  int tiles = 0, q_loads = 0;
  for (int sq = sched[0]; in_part(sched, sq, run.seqs); ++sq) {
    const Piece pc = make_piece(p, sched, sq, r_last);
    const int len = imax(0, p.cache_seqlens[sq]);
    int limit[2];  // keys [0, limit) count for the row (piece end and causal limit)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) limit[hf] = imin(pc.kend, mla_causal_limit(p, len, row_s[hf]));
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};  // base-2 logits
    clear(tOrO);

    // The online softmax of this warpgroup's S tile (keys n0 + 32 group + column): masks, takes
    // the row maxima of both halves (exchanged with the partner thread), turns S into exp2
    // values, adds them to row_sum and packs this half of P (bf16) into the exchange buffer
    // (not kept in registers: they are scarce while P V runs). corr: what O must be scaled by
    // before this tile's P V is added.
    auto softmax = [&](int n0, float (&corr)[2]) {
      float mx[2];
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        mx[hf] = -INFINITY;
#pragma unroll
        for (int j = 0; j < kHalfN / 8; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float& x = tSrS(e + 2 * hf + 4 * j);
            const int key = n0 + group * kHalfN + 8 * j + 2 * quad + e;
            x = key < limit[hf] ? x * sl : -INFINITY;
            mx[hf] = fmaxf(mx[hf], x);
          }
        mx[hf] = fmaxf(mx[hf], __shfl_xor_sync(0xffffffffu, mx[hf], 1));
        mx[hf] = fmaxf(mx[hf], __shfl_xor_sync(0xffffffffu, mx[hf], 2));
        sh.m_x[group][hf][wt] = mx[hf];
      }
      pair_sync();  // the partner's maxima are in (and it has read the last P exchange)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        // fmaxf is exact and commutative: both warpgroups get bitwise the same maxima
        const float m_new = fmaxf(row_max[hf], fmaxf(mx[hf], sh.m_x[1 - group][hf][wt]));
        const float m_use = m_new == -INFINITY ? 0.f : m_new;  // a row with no key yet
        corr[hf] = arch::fast_exp2(row_max[hf] - m_use);
        row_max[hf] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < kHalfN / 8; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float& x = tSrS(e + 2 * hf + 4 * j);
            x = arch::fast_exp2(x - m_use);
            sum += x;
          }
        row_sum[hf] = row_sum[hf] * corr[hf] + sum;  // this lane's part of this half's keys
      }
#pragma unroll
      for (int i = 0; i < kOwn; ++i) sh.p_x[group][i][wt] = arch::pack2<typename C::NvT>(tSrS(2 * i), tSrS(2 * i + 1));
    };
    // P of all 64 keys as the A operand: keys 0..31 (k-steps 0, 1) are consumer 0's half.
    auto take_p = [&] {
      uint32_t* pr = reinterpret_cast<uint32_t*>(raw_pointer_cast(tOrP.data()));
#pragma unroll
      for (int i = 0; i < 2 * kOwn; ++i) pr[i] = sh.p_x[i / kOwn][i % kOwn][wt];
    };

    if (pc.ntiles > 0) {
      wait_barrier(sh.q_full, q_loads & 1);
      const int last = pc.ntiles - 1;
      float corr[2];
      // tile 0: S and its softmax (O is still 0: nothing to rescale)
      ready_tile(tiles, pc.kbeg, pc.kend);
      issue_s(tiles % kStages);
      warpgroup_wait<0>();
      warpgroup_fence_operand(tSrS);
      if (last == 0) arrive_barrier(sh.q_empty);  // Q is free for the producer's next piece
      softmax(pc.kbeg, corr);
      pair_sync();  // the partner's half of P is in
      take_p();
      for (int t = 1; t <= last; ++t) {
        const int g = tiles + t, st = g % kStages, pst = (g - 1) % kStages;
        const int n0 = pc.kbeg + t * kBlockN;
        ready_tile(g, n0, pc.kend);
        issue_s(st);
        issue_o(pst);
        warpgroup_wait<1>();  // S_t is done; P V may still run
        warpgroup_fence_operand(tSrS);
        if (t == last) arrive_barrier(sh.q_empty);
        softmax(n0, corr);
        warpgroup_wait<0>();
        warpgroup_fence_operand(tOrO);
        warpgroup_fence_operand(tOrP);
        arrive_barrier(sh.k_empty[pst]);  // this warpgroup is done with tile t - 1
#pragma unroll
        for (int hf = 0; hf < 2; ++hf)
#pragma unroll
          for (int j = 0; j < kHalfDv / 8; ++j) {
            tOrO(2 * hf + 4 * j) *= corr[hf];
            tOrO(1 + 2 * hf + 4 * j) *= corr[hf];
          }
        pair_sync();  // the partner's half of P_t is in
        take_p();
      }
      const int lst = (tiles + last) % kStages;
      issue_o(lst);
      warpgroup_wait<0>();
      warpgroup_fence_operand(tOrO);
      warpgroup_fence_operand(tOrP);
      arrive_barrier(sh.k_empty[lst]);
      tiles += pc.ntiles;
      ++q_loads;
    }

    // ---- epilogue: the row sums of both halves meet, then out / lse or the partials ---------
    // (through p_x: the first barrier makes sure the partner has read the last P)
    float l[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      l[hf] = row_sum[hf];
      l[hf] += __shfl_xor_sync(0xffffffffu, l[hf], 1);
      l[hf] += __shfl_xor_sync(0xffffffffu, l[hf], 2);
    }
    pair_sync();
    sh.p_x[group][0][wt] = __float_as_uint(l[0]);
    sh.p_x[group][1][wt] = __float_as_uint(l[1]);
    pair_sync();
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) l[hf] += __uint_as_float(sh.p_x[1 - group][hf][wt]);  // a + b == b + a

    const MlaSeq seq = mla_seq(p, sq);
    const int slot = 2 * part + (sq == sched[0] ? 0 : 1);
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int r = r_base + warp * 16 + lane / 4 + hf * 8;
      if (r >= run.rows) continue;
      const MlaRow row = mla_row(p, seq, hkv, r);
      const int c0 = group * kHalfDv + 2 * quad;
      if (pc.whole) {
        const MlaFinish f = mla_finish(p, row.h, row_max[hf], l[hf]);
        typename C::NvT* out = static_cast<typename C::NvT*>(p.out) + row.out + c0;
#pragma unroll
        for (int j = 0; j < kHalfDv / 8; ++j)
          *reinterpret_cast<uint32_t*>(out + 8 * j) =
              arch::pack2<typename C::NvT>(tOrO(2 * hf + 4 * j) * f.factor, tOrO(1 + 2 * hf + 4 * j) * f.factor);
        if (group == 0 && quad == 0) {
          p.lse[row.lse] = f.lse;
          if (p.max_logits) p.max_logits[row.max_logit] = f.max_logit;
        }
      } else {
        const bool has = l[hf] > 0.f || l[hf] != l[hf];
        const float factor = has ? 1.f / l[hf] : 0.f;
        const int64_t pr = mla_partial_row(p, seq, row, slot);
        float* out = run.out + pr * p.head_dim_v + c0;
#pragma unroll
        for (int j = 0; j < kHalfDv / 8; ++j)
          *reinterpret_cast<float2*>(out + 8 * j) =
              make_float2(tOrO(2 * hf + 4 * j) * factor, tOrO(1 + 2 * hf + 4 * j) * factor);
        if (group == 0 && quad == 0) {
          run.lse[pr] = has ? row_max[hf] * kMlaLn2 + logf(l[hf]) : -INFINITY;
          run.max_logit[pr] = has ? row_max[hf] * kMlaLn2 : -INFINITY;
        }
      }
    }
  }
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __trap();  // a Hopper-class target without the sm_90a features: a misbuilt binary, fail loudly
#endif
}

using sm90_tma::mode_stride;
using sm90_tma::stride_ok;

// Is the sm_90a body what the current device runs? (tma_checks.cuh's image_loaded.)
bool kernel_runs_here() {
  static std::atomic<uint64_t> known{0}, good{0};
  return sm90_tma::image_loaded(mla_sm90_kernel<Config>, known, good);
}

int row_blocks(const MlaParams& p) { return ceil_div_pos(mla_rows_per_sequence(p), Config::kBlockM); }

}  // namespace sm90_mla

bool mla_sm90_fits(const MlaParams& p) {
  using namespace sm90_mla;
  using C = Config;
  if (!p.block_table || !p.cache_seqlens || p.indices || p.extra_indices) return false;  // dense decode only
  if (p.q_dtype != DType::kBFloat16 || p.out_dtype != DType::kBFloat16 || p.cache.format != MlaCacheFormat::kBFloat16)
    return false;
  if (p.head_dim != C::kD || p.head_dim_v != C::kDv || !p.q || !p.out || !p.lse || !p.cache.base) return false;
  if (p.batch <= 0 || p.seqlen_q <= 0 || p.heads_q <= 0 || p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0) return false;
  const int G = p.heads_q / p.heads_kv;
  if (G % C::kQChunk != 0) return false;  // a 16-row run of a block's rows: 16 heads of one query
  if (row_blocks(p) > 65535 || p.heads_kv > 65535) return false;
  const MlaCache& c = p.cache;
  if (c.page_size <= 0 || c.page_size % C::kBlockN != 0 || c.num_blocks <= 0) return false;  // a tile in one page
  // TMA: 16-byte aligned bases and strides below 2^40 bytes (CuTe asserts on a descriptor the
  // driver refuses, so these are checked here, never there)
  if (!sm90_tma::aligned16(p.q) || !sm90_tma::aligned16(c.base)) return false;
  if (!stride_ok(p.q_head_stride, p.heads_q) || !stride_ok(p.q_row_stride, p.seqlen_q) ||
      !stride_ok(p.q_batch_stride, p.batch))
    return false;
  if (c.token_stride % 2 != 0 || c.head_stride % 2 != 0 || c.block_stride % 2 != 0) return false;
  if (!stride_ok(c.token_stride / 2, c.page_size) || !stride_ok(c.head_stride / 2, p.heads_kv) ||
      !stride_ok(c.block_stride / 2, c.num_blocks))
    return false;
  if (reinterpret_cast<uintptr_t>(p.out) % 4 != 0) return false;  // pairs of bf16 per store
  return kernel_runs_here();
}

int mla_sm90_blocks_per_part(const MlaParams& p) { return sm90_mla::row_blocks(p) * imax(1, p.heads_kv); }

arch::Error launch_mla_sm90(const MlaParams& p, const MlaSplitRun& run, arch::Stream stream) {
  using namespace sm90_mla;
  using C = Config;
  using T = C::T;
  static std::atomic<uint64_t> configured{0};  // the shared-memory attribute, once per device
  const arch::Error e = arch::set_max_dynamic_smem_once(mla_sm90_kernel<C>, C::kSmemBytes, configured);
  if (e != arch::kSuccess) return e;
  const MlaCache& c = p.cache;
  auto gq = make_tensor(make_gmem_ptr(static_cast<const T*>(p.q)),
                        make_shape(p.heads_q, C::kD, p.seqlen_q, p.batch),
                        make_stride(mode_stride(p.q_head_stride, p.heads_q), _1{}, mode_stride(p.q_row_stride, p.seqlen_q),
                                    mode_stride(p.q_batch_stride, p.batch)));
  auto gk = make_tensor(make_gmem_ptr(reinterpret_cast<const T*>(c.base)),
                        make_shape(c.page_size, C::kD, p.heads_kv, c.num_blocks),
                        make_stride(mode_stride(c.token_stride / 2, c.page_size), _1{},
                                    mode_stride(c.head_stride / 2, p.heads_kv), mode_stride(c.block_stride / 2, c.num_blocks)));
  const typename C::TmaQ tma_q = make_tma_copy(SM90_TMA_LOAD{}, gq, typename C::SmemQChunk{});
  const typename C::TmaK tma_k = make_tma_copy(SM90_TMA_LOAD{}, gk, take<0, 2>(typename C::SmemK{}));
  const dim3 grid(static_cast<unsigned>(run.parts), static_cast<unsigned>(row_blocks(p)),
                  static_cast<unsigned>(p.heads_kv));
  mla_sm90_kernel<C><<<grid, C::kThreads, C::kSmemBytes, stream>>>(p, run, tma_q, tma_k);
  return arch::last_error();
}

}  // namespace mate::device

#endif  // MATE_WITH_SM90 (without it, mla_kernels.cu has the "does not fit" stubs)
