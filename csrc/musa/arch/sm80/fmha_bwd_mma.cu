// FMHA backward on tensor cores (mma.sync m16n8k16, sm80+): steps 2 and 3 of
// fmha_bwd_kernels.cu (the dK / dV kernel with keys as the M dimension, the dQ kernel with
// query rows as M), for bf16 / fp16 with D and Dv multiples of 8 up to 256 padded to the
// forward's tile widths (fmha_mma_tiles.cuh). fmha_bwd_kernels.cu says how the work is split.
#include <atomic>
#include <cmath>

#include "../../../common/fmha_math.h"
#include "../../../common/fmha_score.h"
#include "../../kernels.h"
#include "../mma.h"
#include "fmha_mma_tiles.cuh"

namespace mate::device {

#if defined(MATE_HAS_MMA_SYNC)
namespace {
using namespace mma_tiles;

// ---- tensor-core kernels -------------------------------------------------------------------

// dK / dV block: kWarps x 16 keys (each warp owns 16 key rows), kBlockM packed query rows per
// step. kPass 0 computes both gradients; 1 only dV; 2 only dK (head dim 256: two launches).
template <typename T_, int kD_, int kDv_, int kBlockM_, int kPass_, int kWarps_ = 4>
struct BwdKvConfig {
  using T = T_;
  static constexpr int kD = kD_, kDv = kDv_, kBlockM = kBlockM_, kPass = kPass_;
  static constexpr bool kDoDv = kPass != 2, kDoDk = kPass != 1;
  static constexpr int kWarps = kWarps_, kThreads = kWarps * 32;
  static constexpr int kBlockN = kWarps * 16;        // keys of the block
  static constexpr int kNTiles = kBlockM / 8;        // 8-row column tiles of S^T
  static constexpr int kRowsPerWarp = kBlockM / kWarps;  // Q / dO rows each warp copies
  using KvTiles = MmaConfig<T, kD, kDv, kWarps, 1, kBlockN>;  // load_kv_tiles' view of the K / V tile
  static constexpr int kQElems = kBlockM * kD, kDoElems = kBlockM * kDv;
  // K, V; two stages of (Q, dO); two stages of the per-row lse2, delta, key interval
  static constexpr int kSmemBytes =
      (kBlockN * (kD + kDv) + 2 * (kQElems + kDoElems)) * static_cast<int>(sizeof(T)) + 2 * kBlockM * 16;
  static_assert(kBlockM % 16 == 0 && (kRowsPerWarp * (kD / 8)) % 32 == 0 && (kRowsPerWarp * (kDv / 8)) % 32 == 0,
                "a warp's Q / dO rows must fill whole copy steps");
};

// acc (16 rows x 8 kNT columns) += A B^T over kK channels: A is the 16 rows of tile a from
// a_row0, B the first 8 kNT rows of tile b; both tiles hold kK-element rows, swizzled (the K,
// V, Q and dO tiles alike).
template <class T, int kK, int kNT>
__device__ __forceinline__ void mma_rows_abt(float (&acc)[kNT][4], const T* a_tile, int a_row0, const T* b_tile) {
  const int lane = threadIdx.x % arch::kWarpSize;
#pragma unroll
  for (int ks = 0; ks < kK / 16; ++ks) {
    uint32_t a[4];
    arch::ldmatrix_x4(a, a_tile + swz<kK>(a_row0 + lane % 16, 2 * ks + lane / 16));
#pragma unroll
    for (int np = 0; np < kNT / 2; ++np) {
      uint32_t b[4];
      arch::ldmatrix_x4(b, b_tile + swz<kK>(np * 16 + lane % 8 + (lane / 16) * 8, 2 * ks + (lane / 8) % 2));
      arch::mma_16x8x16<T>(acc[2 * np], a, b[0], b[1]);
      arch::mma_16x8x16<T>(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// acc (16 rows x kN columns) += a B: a is one 16 x 16 A fragment in registers (acc_to_a), B the
// rows k0 .. k0 + 15 of tile b (kN-element rows, swizzled), read transposed.
template <class T, int kN>
__device__ __forceinline__ void mma_regs_ab(float (&acc)[kN / 8][4], const uint32_t (&a)[4], const T* b_tile, int k0) {
  const int lane = threadIdx.x % arch::kWarpSize;
#pragma unroll
  for (int dp = 0; dp < kN / 16; ++dp) {
    uint32_t b[4];
    arch::ldmatrix_x4_trans(b, b_tile + swz<kN>(k0 + lane % 8 + ((lane / 8) % 2) * 8, 2 * dp + lane / 16));
    arch::mma_16x8x16<T>(acc[2 * dp], a, b[0], b[1]);
    arch::mma_16x8x16<T>(acc[2 * dp + 1], a, b[2], b[3]);
  }
}


// kPlain: logit = softmax_scale * dot (no softcap, no ALiBi): exp2 folds the scale.
template <class C, bool kPlain>
__global__ void __launch_bounds__(C::kThreads) fmha_bwd_dkdv_kernel(FmhaBwdParams g, FmhaBwdScratch rows) {
  using T = typename C::T;
  constexpr int kD = C::kD, kDv = C::kDv, kBM = C::kBlockM, kNT = C::kNTiles;
  const FmhaParams& p = g.fwd;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* k_s = reinterpret_cast<T*>(smem_raw);
  T* v_s = k_s + C::kBlockN * kD;
  T* q_s = v_s + C::kBlockN * kDv;         // 2 stages
  T* do_s = q_s + 2 * C::kQElems;          // 2 stages
  float* lse_s = reinterpret_cast<float*>(do_s + 2 * C::kDoElems);  // [2][kBM] each
  float* delta_s = lse_s + 2 * kBM;
  int* lo_s = reinterpret_cast<int*>(delta_s + 2 * kBM);
  int* hi_s = lo_s + 2 * kBM;

  const int b = blockIdx.z, hk = blockIdx.y;
  const SeqInfo s = seq_info(p, b);
  const int n0 = blockIdx.x * C::kBlockN;
  if (n0 >= s.k_len) return;  // dk / dv of unused keys stay zero (the op zero-fills them)
  const int n1 = s.k_len - n0 > C::kBlockN ? n0 + C::kBlockN : s.k_len;
  const int G = p.num_heads / p.num_heads_k, H = p.num_heads;
  // Query rows that see a key of [n0, n1): one run, [ia, ib).
  const int ia = first_row_where(p, s, [&](const KeyInterval& k) { return k.hi > n0; });
  const int ib = first_row_where(p, s, [&](const KeyInterval& k) { return k.lo >= n1; });
  const int rows_total = ib > ia ? (ib - ia) * G : 0;  // packed rows: r -> (query ia + r / G, head hk G + r % G)
  const int steps = ceil_div_pos(rows_total, kBM);
  const int warp = threadIdx.x / arch::kWarpSize, lane = threadIdx.x % arch::kWarpSize;
  const int g4 = lane / 4, t = lane % 4, krow = warp * 16;

  // Q, dO rows and per-row values of step st into stage `stage` (rows past the run: zeros,
  // lse2 +inf, an empty key interval).
  auto load_step = [&](int st, int stage) {
    const int r0 = st * kBM;
    for (int c = threadIdx.x; c < kBM; c += C::kThreads) {
      const int r = r0 + c;
      float l2 = INFINITY, dl = 0.f;
      int lo = 0, hi = 0;
      if (r < rows_total) {
        const int i = ia + r / G, h = hk * G + r % G;
        const int64_t at = global_row(p, s, b, i) * H + h;
        l2 = rows.lse2[at];
        dl = rows.delta[at];
        const KeyInterval keys = key_range_for_row(p, s, i);
        lo = keys.lo;
        hi = keys.hi;
      }
      lse_s[stage * kBM + c] = l2;
      delta_s[stage * kBM + c] = dl;
      lo_s[stage * kBM + c] = lo;
      hi_s[stage * kBM + c] = hi;
    }
    const int wr0 = warp * C::kRowsPerWarp;
    int64_t qoff[2] = {-1, -1}, doff[2] = {-1, -1};
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      const int rl = lane + 32 * x, r = r0 + wr0 + rl;
      if (rl < C::kRowsPerWarp && r < rows_total) {
        const int64_t row = s.q_row0 + ia + r / G;
        const int h = hk * G + r % G;
        qoff[x] = b * p.q_batch_stride + row * p.q_row_stride + h * p.q_head_stride;
        doff[x] = b * g.dout_batch_stride + row * g.dout_row_stride + h * g.dout_head_stride;
      }
    }
    const T* qb = static_cast<const T*>(p.q);
    const T* db = static_cast<const T*>(g.dout);
    T* q_dst = q_s + stage * C::kQElems;
    T* do_dst = do_s + stage * C::kDoElems;
    copy_rows<C::kRowsPerWarp, kD / 8>(qoff, wr0, p.head_dim / 8, qb, [&](int r, int c) { return q_dst + swz<kD>(r, c); },
                                       [&](int64_t o, int c) { return qb + o + c * 8; });
    copy_rows<C::kRowsPerWarp, kDv / 8>(doff, wr0, p.head_dim_v / 8, db,
                                        [&](int r, int c) { return do_dst + swz<kDv>(r, c); },
                                        [&](int64_t o, int c) { return db + o + c * 8; });
  };

  float dk[C::kDoDk ? kD / 8 : 1][4], dv[C::kDoDv ? kDv / 8 : 1][4];
#pragma unroll
  for (int x = 0; x < (C::kDoDk ? kD / 8 : 1); ++x)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[x][e] = 0.f;
#pragma unroll
  for (int x = 0; x < (C::kDoDv ? kDv / 8 : 1); ++x)
#pragma unroll
    for (int e = 0; e < 4; ++e) dv[x][e] = 0.f;

  if (steps > 0) {
    load_kv_tiles<typename C::KvTiles>(k_s, v_s, nullptr, p, s, hk, n0, n1);
    load_step(0, 0);
    arch::cp_async_commit();
  }
  const float sl = p.softmax_scale * kLog2e;
  for (int st = 0; st < steps; ++st) {
    const int stage = st & 1;
    arch::cp_async_wait<0>();
    // One barrier per step: step st is visible to all, and every warp is done with stage
    // (st + 1) & 1, which now receives step st + 1 (in flight while step st computes).
    __syncthreads();
    if (st + 1 < steps) {
      load_step(st + 1, stage ^ 1);
      arch::cp_async_commit();
    }
    const T* q_t = q_s + stage * C::kQElems;
    const T* do_t = do_s + stage * C::kDoElems;
    const float* lse_t = lse_s + stage * kBM;
    const float* delta_t = delta_s + stage * kBM;
    const int* lo_t = lo_s + stage * kBM;
    const int* hi_t = hi_s + stage * kBM;

    // S^T = K Q^T (this warp's 16 keys x kBM rows)
    float sacc[kNT][4], dpacc[C::kDoDk ? kNT : 1][4];
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) sacc[nt][e] = 0.f;
    mma_rows_abt<T, kD, kNT>(sacc, k_s, krow, q_t);
    // dP^T = V dO^T
    if constexpr (C::kDoDk) {
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) dpacc[nt][e] = 0.f;
      mma_rows_abt<T, kDv, kNT>(dpacc, v_s, krow, do_t);
    }
    // P^T and dS^T in place; element (key krow + 8 hf + g4, packed row nt 8 + 2t + e)
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int e4 = 0; e4 < 4; ++e4) {
        const int c = nt * 8 + 2 * t + (e4 & 1), jr = krow + 8 * (e4 >> 1) + g4;
        // the row's key interval relative to n0 (no overflow near 2^31)
        const bool in = lo_t[c] - n0 <= jr && jr < hi_t[c] - n0;
        float x = sacc[nt][e4], dlogit = p.softmax_scale;
        if constexpr (kPlain) {
          x *= sl;
        } else {
          const int r = st * kBM + c, i = ia + r / G, h = hk * G + r % G;
          x = score_mod(p, s, b, h).logit_grad(x, i, n0 + jr, dlogit) * kLog2e;
        }
        const float pe = in ? arch::fast_exp2(x - lse_t[c]) : 0.f;
        sacc[nt][e4] = pe;
        if constexpr (C::kDoDk) dpacc[nt][e4] = pe * (dpacc[nt][e4] - delta_t[c]) * dlogit;
      }
    // dV += P^T dO, dK += dS^T Q: the accumulators of two 8-row tiles are one 16-row k step.
#pragma unroll
    for (int pk = 0; pk < kBM / 16; ++pk) {
      if constexpr (C::kDoDv) {
        uint32_t a[4];
        arch::acc_to_a<T>(sacc[2 * pk], sacc[2 * pk + 1], a);
        mma_regs_ab<T, kDv>(dv, a, do_t, pk * 16);
      }
      if constexpr (C::kDoDk) {
        uint32_t a[4];
        arch::acc_to_a<T>(dpacc[2 * pk], dpacc[2 * pk + 1], a);
        mma_regs_ab<T, kD>(dk, a, q_t, pk * 16);
      }
    }
  }

  // Store this warp's key rows (the padding channels never).
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int jr = krow + 8 * hf + g4;
    if (jr >= n1 - n0) continue;
    const int t_key = s.k_start + n0 + jr;
    if constexpr (C::kDoDk) {
      T* dst = static_cast<T*>(g.dk) + key_offset(p, s, t_key, g.dk_batch_stride, g.dk_row_stride) +
               hk * g.dk_head_stride + 2 * t;
#pragma unroll
      for (int dt = 0; dt < kD / 8; ++dt)
        if (dt * 8 < p.head_dim)
          *reinterpret_cast<uint32_t*>(dst + dt * 8) = arch::pack2<T>(dk[dt][2 * hf], dk[dt][2 * hf + 1]);
    }
    if constexpr (C::kDoDv) {
      T* dst = static_cast<T*>(g.dv) + key_offset(p, s, t_key, g.dv_batch_stride, g.dv_row_stride) +
               hk * g.dv_head_stride + 2 * t;
#pragma unroll
      for (int dt = 0; dt < kDv / 8; ++dt)
        if (dt * 8 < p.head_dim_v)
          *reinterpret_cast<uint32_t*>(dst + dt * 8) = arch::pack2<T>(dv[dt][2 * hf], dv[dt][2 * hf + 1]);
    }
  }
}

// dQ block: kWarps x 16 packed query rows (row m -> query m / G, head hk G + m % G), K/V tiles
// of C::kBlockN keys streamed in two stages like the forward; Q and dO stay in shared memory.
template <class C>
constexpr int dq_smem_bytes() {
  return C::kSmemBytes + C::kBlockM * C::kDv * static_cast<int>(sizeof(typename C::T));
}

template <class C, bool kPlain>
__global__ void __launch_bounds__(C::kThreads) fmha_bwd_dq_kernel(FmhaBwdParams g, FmhaBwdScratch rows) {
  using T = typename C::T;
  constexpr int kD = C::kD, kDv = C::kDv, kNT = C::kNTiles;
  const FmhaParams& p = g.fwd;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);
  T* k_s = q_s + C::kBlockM * kD;  // 2 stages of K, then 2 of V
  T* v_s = k_s + 2 * C::kKTileElems;
  T* do_s = v_s + 2 * C::kVTileElems;

  const int b = blockIdx.z, hk = blockIdx.y;
  const SeqInfo s = seq_info(p, b);
  const int G = p.num_heads / p.num_heads_k, H = p.num_heads;
  const int real_rows = s.q_len * G;
  const int m0 = (gridDim.x - 1 - blockIdx.x) * C::kBlockM;  // latest rows first: causal blocks are heaviest
  if (m0 >= real_rows) return;
  const int warp = threadIdx.x / arch::kWarpSize, lane = threadIdx.x % arch::kWarpSize;
  const int g4 = lane / 4, t = lane % 4, wrow = warp * 16;
  // keys of the block: the first row's lower end to the last row's upper end (monotone ends)
  const int kmin = key_range_for_row(p, s, m0 / G).lo;
  const int kmax = key_range_for_row(p, s, (imin(m0 + C::kBlockM, real_rows) - 1) / G).hi;

  int row_lo[2], row_hi[2];
  float lse2[2], delta[2];
  ScoreMod mod[kPlain ? 1 : 2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int m = m0 + wrow + 8 * hf + g4;
    row_lo[hf] = row_hi[hf] = 0;
    lse2[hf] = INFINITY;
    delta[hf] = 0.f;
    if (m < real_rows) {
      const int i = m / G, h = hk * G + m % G;
      const KeyInterval keys = key_range_for_row(p, s, i);
      row_lo[hf] = keys.lo;
      row_hi[hf] = keys.hi;
      const int64_t at = global_row(p, s, b, i) * H + h;
      lse2[hf] = rows.lse2[at];
      delta[hf] = rows.delta[at];
    }
    if constexpr (!kPlain) mod[hf] = score_mod(p, s, b, hk * G + m % G);
  }

  float dq[kD / 8][4];
#pragma unroll
  for (int dt = 0; dt < kD / 8; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[dt][e] = 0.f;

  const int num_tiles = kmax > kmin ? ceil_div_pos(kmax - kmin, C::kBlockN) : 0;
  if (num_tiles > 0) {  // Q and dO rows of the block (zeros past the real rows), then K/V tile 0
    const T* qb = static_cast<const T*>(p.q);
    const T* db = static_cast<const T*>(g.dout);
    for (int idx = threadIdx.x; idx < C::kBlockM * (kD / 8); idx += C::kThreads) {
      const int r = idx / (kD / 8), c = idx % (kD / 8), m = m0 + r;
      const bool valid = m < real_rows && c < p.head_dim / 8;
      const T* src = qb;
      if (valid)
        src = qb + b * p.q_batch_stride + (s.q_row0 + m / G) * p.q_row_stride + (hk * G + m % G) * p.q_head_stride + c * 8;
      arch::cp_async_16(q_s + swz<kD>(r, c), src, valid);
    }
    for (int idx = threadIdx.x; idx < C::kBlockM * (kDv / 8); idx += C::kThreads) {
      const int r = idx / (kDv / 8), c = idx % (kDv / 8), m = m0 + r;
      const bool valid = m < real_rows && c < p.head_dim_v / 8;
      const T* src = db;
      if (valid)
        src = db + b * g.dout_batch_stride + (s.q_row0 + m / G) * g.dout_row_stride +
              (hk * G + m % G) * g.dout_head_stride + c * 8;
      arch::cp_async_16(do_s + swz<kDv>(r, c), src, valid);
    }
    load_kv_tiles<C>(k_s, v_s, nullptr, p, s, hk, kmin, kmax);
    arch::cp_async_commit();
  }
  const float sl = p.softmax_scale * kLog2e;
  for (int it = 0; it < num_tiles; ++it) {
    const int n0 = kmin + it * C::kBlockN;
    const T* k_t = k_s + (it % 2) * C::kKTileElems;
    const T* v_t = v_s + (it % 2) * C::kVTileElems;
    arch::cp_async_wait<0>();
    __syncthreads();  // tile it visible; every warp done with tile it - 1, whose stage gets it + 1
    if (it + 1 < num_tiles) {
      load_kv_tiles<C>(k_s + ((it + 1) % 2) * C::kKTileElems, v_s + ((it + 1) % 2) * C::kVTileElems, nullptr, p, s,
                       hk, n0 + C::kBlockN, kmax);
      arch::cp_async_commit();
    }
    bool any = false;  // does the tile hold keys this warp's rows see?
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int lo = row_lo[hf] - n0, hi = row_hi[hf] - n0;
      any |= lo < C::kBlockN && hi > 0 && lo < hi;
    }
    if (!arch::warp_any(any)) continue;

    float sacc[kNT][4], dpacc[kNT][4];
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) sacc[nt][e] = dpacc[nt][e] = 0.f;
    mma_rows_abt<T, kD, kNT>(sacc, q_s, wrow, k_t);     // S = Q K^T
    mma_rows_abt<T, kDv, kNT>(dpacc, do_s, wrow, v_t);  // dP = dO V^T
    // dS in place of S; element (row wrow + 8 hf + g4, key n0 + nt 8 + 2t + e)
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int e4 = 0; e4 < 4; ++e4) {
        const int hf = e4 >> 1, jr = nt * 8 + 2 * t + (e4 & 1);
        const bool in = row_lo[hf] - n0 <= jr && jr < row_hi[hf] - n0;
        float x = sacc[nt][e4], dlogit = p.softmax_scale;
        if constexpr (kPlain) {
          x *= sl;
        } else {
          const int m = m0 + wrow + 8 * hf + g4;
          const int j = static_cast<int>(static_cast<unsigned>(n0) + static_cast<unsigned>(jr));
          x = mod[hf].logit_grad(x, m / G, j, dlogit) * kLog2e;
        }
        const float pe = in ? arch::fast_exp2(x - lse2[hf]) : 0.f;
        sacc[nt][e4] = pe * (dpacc[nt][e4] - delta[hf]) * dlogit;
      }
    // dQ += dS K
#pragma unroll
    for (int pk = 0; pk < C::kBlockN / 16; ++pk) {
      uint32_t a[4];
      arch::acc_to_a<T>(sacc[2 * pk], sacc[2 * pk + 1], a);
      mma_regs_ab<T, kD>(dq, a, k_t, pk * 16);
    }
  }

  // dq is contiguous (total rows, H, D); rows past seqused stay zero (the op zero-fills dq)
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int m = m0 + wrow + 8 * hf + g4;
    if (m >= real_rows) continue;
    T* dst = static_cast<T*>(g.dq) + (global_row(p, s, b, m / G) * H + hk * G + m % G) * p.head_dim + 2 * t;
#pragma unroll
    for (int dt = 0; dt < kD / 8; ++dt)
      if (dt * 8 < p.head_dim) *reinterpret_cast<uint32_t*>(dst + dt * 8) = arch::pack2<T>(dq[dt][2 * hf], dq[dt][2 * hf + 1]);
  }
}

template <class C, bool kPlain>
arch::Error launch_dkdv(const FmhaBwdParams& g, const FmhaBwdScratch& rows, arch::Stream stream) {
  static std::atomic<uint64_t> configured{0};
  auto kernel = fmha_bwd_dkdv_kernel<C, kPlain>;
  arch::Error e = arch::set_max_dynamic_smem_once(kernel, C::kSmemBytes, configured);
  if (e != arch::kSuccess) return e;
  const dim3 grid(static_cast<unsigned>(ceil_div_pos(imax(g.max_seqlen_k, 1), C::kBlockN)), g.fwd.num_heads_k,
                  g.fwd.batch);
  kernel<<<grid, C::kThreads, C::kSmemBytes, stream>>>(g, rows);
  return arch::last_error();
}

template <class C, bool kPlain>
arch::Error launch_dq(const FmhaBwdParams& g, const FmhaBwdScratch& rows, arch::Stream stream) {
  static std::atomic<uint64_t> configured{0};
  auto kernel = fmha_bwd_dq_kernel<C, kPlain>;
  constexpr int kSmem = dq_smem_bytes<C>();
  arch::Error e = arch::set_max_dynamic_smem_once(kernel, kSmem, configured);
  if (e != arch::kSuccess) return e;
  const int G = g.fwd.num_heads / g.fwd.num_heads_k;
  const int64_t rows_max = static_cast<int64_t>(imax(g.max_seqlen_q, 1)) * G;
  const dim3 grid(static_cast<unsigned>((rows_max + C::kBlockM - 1) / C::kBlockM), g.fwd.num_heads_k, g.fwd.batch);
  kernel<<<grid, C::kThreads, kSmem, stream>>>(g, rows);
  return arch::last_error();
}

// Tile shapes per width: dK/dV accumulators (kD + kDv) / 2 registers per thread plus 2 x kBlockM
// / 2 for S^T and dP^T; a 256 width splits into a dV pass and a dK pass.
template <typename T, int kD, int kDv, bool kPlain>
arch::Error launch_width(const FmhaBwdParams& g, const FmhaBwdScratch& rows, arch::Stream stream) {
  arch::Error e;
  if constexpr (kD == 256 || kDv == 256) {
    // 8 warps: 128 keys share each Q / dO step, and the 190 KB of shared memory still holds
    // 8 warps per SM (4 warps x 64 keys took 128 KB for 4)
    e = launch_dkdv<BwdKvConfig<T, kD, kDv, 32, 1, 8>, kPlain>(g, rows, stream);
    if (e == arch::kSuccess) e = launch_dkdv<BwdKvConfig<T, kD, kDv, 32, 2, 8>, kPlain>(g, rows, stream);
  } else {
    e = launch_dkdv<BwdKvConfig<T, kD, kDv, (kD + kDv <= 256 ? 64 : 32), 0>, kPlain>(g, rows, stream);
  }
  if (e != arch::kSuccess) return e;
  if constexpr (kD == 256 || kDv == 256)  // 8 warps x 16 rows: 8 warps per SM in 192 KB
    return launch_dq<MmaConfig<T, kD, kDv, 8, 1, 32>, kPlain>(g, rows, stream);
  else
    return launch_dq<MmaConfig<T, kD, kDv, 4, 1, 64>, kPlain>(g, rows, stream);
}

template <typename T, bool kPlain>
arch::Error launch_typed(const FmhaBwdParams& g, const FmhaBwdScratch& rows, arch::Stream stream) {
  MmaWidths w = MmaWidths::k256;
  mma_widths(g.fwd.head_dim, g.fwd.head_dim_v, w);
  switch (w) {
    case MmaWidths::k64: return launch_width<T, 64, 64, kPlain>(g, rows, stream);
    case MmaWidths::k128: return launch_width<T, 128, 128, kPlain>(g, rows, stream);
    case MmaWidths::k192x128: return launch_width<T, 192, 128, kPlain>(g, rows, stream);
    default: return launch_width<T, 256, 256, kPlain>(g, rows, stream);
  }
}

}  // namespace

bool fmha_bwd_mma_fits(const FmhaBwdParams& g) {
  const FmhaParams& p = g.fwd;
  MmaWidths w;
  return (p.in_dtype == DType::kBFloat16 || p.in_dtype == DType::kFloat16) && p.out_dtype == p.in_dtype &&
         mma_widths(p.head_dim, p.head_dim_v, w) &&
         rows_aligned16(p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride) &&
         rows_aligned16(p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride) &&
         rows_aligned16(p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride) &&
         rows_aligned16(g.dout, g.dout_batch_stride, g.dout_row_stride, g.dout_head_stride);
}

arch::Error launch_fmha_bwd_mma(const FmhaBwdParams& g, const FmhaBwdScratch& rows, arch::Stream stream) {
  const bool plain = !(g.fwd.softcap > 0.f) && !g.fwd.alibi_slopes;
  if (g.fwd.in_dtype == DType::kFloat16)
    return plain ? launch_typed<arch::f16, true>(g, rows, stream) : launch_typed<arch::f16, false>(g, rows, stream);
  return plain ? launch_typed<arch::bf16, true>(g, rows, stream) : launch_typed<arch::bf16, false>(g, rows, stream);
}

#else  // no mma.sync in this build: the portable kernels serve every backward

bool fmha_bwd_mma_fits(const FmhaBwdParams&) { return false; }
arch::Error launch_fmha_bwd_mma(const FmhaBwdParams&, const FmhaBwdScratch&, arch::Stream) {
  return arch::kSuccess;
}

#endif

}  // namespace mate::device
