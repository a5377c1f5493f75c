// FMHA forward with qv on tensor cores (mma.sync m16n8k16, sm80+, so also the Hopper route for
// these calls): scores s = scale (q.k + qv.v), FlashAttention-3's form of MLA's absorbed
// prefill (q / k head dim up to 64, the rope part; v / qv / out head dim up to 512, the
// latent), bf16 / fp16. Before this kernel such calls ran on CUDA cores at under 1 TFLOP/s.
//
// Why a kernel of its own: a warp of fmha_mma.cu holds its rows' whole output, and 16 rows of
// 512 fp32 channels are 256 registers per lane. Here the 512 channels are split over
// kColWarps column warps (as mla_kernels.cu's decode does): every warp of a 16-row group owns
// 128 output channels and the matching 128 qv / v channels (plus 16 of q / k). A key tile's
// scores are therefore summed from four partial products: each column warp writes its partial
// S to shared memory, the block meets at a barrier, and each warp adds its row group's four
// partials in the same order, so all of them hold bitwise the same scores, softmax and P;
// then each warp does O[:, its 128 channels] += P V[:, its 128 channels] with P in registers.
// The V tile in shared memory feeds both GEMMs (qv.v^T reads it like a K tile, P V
// transposed), so qv costs no extra loads.
//
// Everything else is fmha_mma.cu's: block / split / GQA packing layout, the per-row key
// intervals and masks of fmha_score.h (plain and ScoreMod instantiations), paged K / V through
// load_kv_tiles, sinks, fp32 split partials merged by fmha_merge_kernel, the epilogue. Head
// dims below the tile widths pad with zeros inside the kernel, never in memory. Calls this
// kernel does not take (fp8 or fp32 inputs, D > 64, Dv > 512, unaligned rows) run on the
// portable kernels of fmha_kernels.cu.
#include <atomic>
#include <cmath>

#include "../../../common/dtype_convert.h"
#include "../../../common/fmha_math.h"
#include "../../../common/fmha_score.h"
#include "../../../common/scheduler.h"
#include "../mma.h"
#include "fmha_mma_tiles.cuh"
#include "../../kernels.h"

namespace mate::device {

#if defined(MATE_HAS_MMA_SYNC)
namespace {
using namespace mma_tiles;

template <typename T_>
struct QvConfig {
  using T = T_;
  static constexpr bool kFp8In = false;          // load_kv_tiles: 16-bit tiles only
  static constexpr int kD = 64, kDv = 512;       // tile widths of q / k and of qv / v / out
  static constexpr int kRowWarps = 2, kColWarps = 4;
  static constexpr int kWarps = kRowWarps * kColWarps, kThreads = kWarps * 32;
  static constexpr int kBlockM = 16 * kRowWarps, kBlockN = 32, kStages = 2;
  static constexpr int kChunks = kD / 8, kVChunks = kDv / 8;  // 16-byte chunks per row
  static constexpr int kNTiles = kBlockN / 8, kPSteps = kBlockN / 16;
  static constexpr int kSlice = kDv / kColWarps;   // qv / v / out channels of one column warp
  static constexpr int kQSlice = kD / kColWarps;   // q / k channels of one column warp
  static constexpr int kSliceSteps = kSlice / 16, kQSliceSteps = kQSlice / 16, kSliceTiles = kSlice / 8;
  static constexpr int kRowsPerWarp = kBlockN / kWarps;  // K / V rows each warp copies
  static constexpr int kKTileElems = kBlockN * kD, kVTileElems = kBlockN * kDv;
  static constexpr int kScoreFloats = kNTiles * 4 * 32;  // one warp's partial S, fragment order
  static constexpr int kSmemBytes =
      (kBlockM * (kD + kDv) + kStages * (kKTileElems + kVTileElems)) * static_cast<int>(sizeof(T)) +
      kWarps * kScoreFloats * 4;
  static_assert(kQSlice % 16 == 0 && kSlice % 16 == 0, "each column warp takes whole k steps");
  static_assert((kRowsPerWarp * kChunks) % 32 == 0 && (kRowsPerWarp * kVChunks) % 32 == 0,
                "a warp's rows must fill whole copy steps");
};

// S += A B^T over kSteps k-steps of 16: A's fragments in registers (16 rows), B the tile's
// kNTiles * 8 key rows of a swizzled kRow-wide tile from 16-byte chunk c0 on (K for q.k^T, V
// for qv.v^T).
template <typename T, int kRow, int kNTiles, int kSteps>
__device__ __forceinline__ void add_scores(float (&s)[kNTiles][4], const uint32_t (&a)[kSteps][4], const T* tile,
                                           int c0) {
  const int lane = threadIdx.x % arch::kWarpSize;
#pragma unroll
  for (int ks = 0; ks < kSteps; ++ks)
#pragma unroll
    for (int np = 0; np < kNTiles / 2; ++np) {
      uint32_t b[4];
      arch::ldmatrix_x4(b, tile + swz<kRow>(np * 16 + lane % 8 + (lane / 16) * 8, c0 + 2 * ks + (lane / 8) % 2));
      arch::mma_16x8x16<T>(s[2 * np], a[ks], b[0], b[1]);
      arch::mma_16x8x16<T>(s[2 * np + 1], a[ks], b[2], b[3]);
    }
}

template <class C, bool kPlain>
__global__ void __launch_bounds__(C::kThreads, 1)
    fmha_qv_mma_kernel(FmhaParams p, FmhaSplitBuffers parts, int row_heads, bool out_pairs) {
  using T = typename C::T;
  constexpr int kD = C::kD, kDv = C::kDv;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);          // kBlockM rows of q
  T* qv_s = q_s + C::kBlockM * kD;                  // kBlockM rows of qv
  T* k_s = qv_s + C::kBlockM * kDv;                 // kStages K tiles, then kStages V tiles
  T* v_s = k_s + C::kStages * C::kKTileElems;
  float* score_s = reinterpret_cast<float*>(v_s + C::kStages * C::kVTileElems);  // partial S per warp

  const int n = parts.num_splits;
  const int b = blockIdx.z / n, split = blockIdx.z % n;
  const SeqInfo s = seq_info(p, b);
  const int rows_total = s.q_len_full * row_heads, real_rows = s.q_len * row_heads;
  const int m0 = (gridDim.x - 1 - blockIdx.x) * C::kBlockM;  // latest rows first: causal blocks are heaviest
  if (m0 >= rows_total) return;
  const int G = p.num_heads / p.num_heads_k;
  const int h0 = blockIdx.y * row_heads, hk = h0 / G;
  const int warp = threadIdx.x / arch::kWarpSize, lane = threadIdx.x % arch::kWarpSize;
  const int g = lane / 4, t = lane % 4;
  const int group = warp / C::kColWarps, col = warp % C::kColWarps;  // row group, column warp
  const int wrow = group * 16;

  const int ns = sequence_splits(p, b, s.k_len, n);
  int slo = 0, shi = s.k_len;
  if (ns > 1) split_key_range(s.k_len, kSplitKeyBlock, split, ns, slo, shi);
  const bool live = split < ns;

  // Keys of the block: the interval ends are non-decreasing in the row (key_range_for_row's
  // INVARIANT, fmha_score.h), as fmha_mma.cu relies on too.
  int kmin = 0, kmax = 0;
  if (m0 < real_rows && live) {
    kmin = imax(key_range_for_row(p, s, m0 / row_heads).lo, slo);
    kmax = imin(key_range_for_row(p, s, (imin(m0 + C::kBlockM, real_rows) - 1) / row_heads).hi, shi);
  }
  int row_lo[2], row_hi[2];  // this lane's rows wrow + 8 half + g
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int m = m0 + wrow + hf * 8 + g;
    KeyInterval keys;
    if (m < real_rows && live) keys = key_range_for_row(p, s, m / row_heads).clip(slo, shi);
    row_lo[hf] = keys.lo;
    row_hi[hf] = keys.hi;
  }

  float o[C::kSliceTiles][4];
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  const float sl = kPlain ? p.softmax_scale * kLog2e : 1.f;  // score units -> base-2 logits
#pragma unroll
  for (int dt = 0; dt < C::kSliceTiles; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[dt][e] = 0.f;

  const int num_tiles = kmax > kmin ? ceil_div_pos(kmax - kmin, C::kBlockN) : 0;
  if (num_tiles > 0) {
    // q and qv rows of the block (zeros past the real rows and head dims), then the first tiles
    const T* q0 = static_cast<const T*>(p.q);
    const T* qv0 = static_cast<const T*>(p.qv);
    constexpr int kRowChunks = C::kChunks + C::kVChunks;
    for (int idx = threadIdx.x; idx < C::kBlockM * kRowChunks; idx += C::kThreads) {
      const int r = idx / kRowChunks, c = idx % kRowChunks, m = m0 + r;
      const bool is_q = c < C::kChunks;
      const int cc = is_q ? c : c - C::kChunks;
      const bool valid = m < real_rows && cc < (is_q ? p.head_dim : p.head_dim_v) / 8;
      const T* src = q0;
      if (valid) {
        const int64_t qi = s.q_row0 + m / row_heads;
        const int h = h0 + m % row_heads;
        src = is_q ? q0 + b * p.q_batch_stride + qi * p.q_row_stride + h * p.q_head_stride + cc * 8
                   : qv0 + b * p.qv_batch_stride + qi * p.qv_row_stride + h * p.qv_head_stride + cc * 8;
      }
      arch::cp_async_16(is_q ? q_s + swz<kD>(r, cc) : qv_s + swz<kDv>(r, cc), src, valid);
    }
    load_kv_tiles<C>(k_s, v_s, nullptr, p, s, hk, kmin, kmax);
    arch::cp_async_commit();

    // This warp's A fragments: its 16 rows of q (kQSlice channels) and of qv (kSlice channels)
    uint32_t qa[C::kQSliceSteps][4], qva[C::kSliceSteps][4];
    const int qc0 = col * C::kQSlice / 8, vc0 = col * C::kSlice / 8;  // first 16-byte chunk of the slices
    float* my_scores = score_s + warp * C::kScoreFloats;
    const float* group_scores = score_s + group * C::kColWarps * C::kScoreFloats;

    for (int it = 0; it < num_tiles; ++it) {
      const int n0 = kmin + it * C::kBlockN;
      T* k_t = k_s + (it % C::kStages) * C::kKTileElems;
      T* v_t = v_s + (it % C::kStages) * C::kVTileElems;
      // Does the tile hold keys these rows see, and does it need per-element masking?
      bool any = false, all = true;
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int lo = row_lo[hf] - n0, hi = row_hi[hf] - n0;
        any |= lo < C::kBlockN && hi > 0 && lo < hi;
        all &= lo <= 0 && C::kBlockN <= hi;
      }
      all = arch::warp_all(all);
      arch::cp_async_wait<0>();  // tile it has landed
      // Past this barrier tile it is visible to all, every warp is done with tile it - 1 (whose
      // stage receives tile it + 1) and has read every partial score of tile it - 1. Whether
      // any row of the block sees the tile is decided here for the whole block, so every warp
      // meets the exchange barrier below or skips the tile (a row group with no key in it
      // computes a fully masked tile: p = 0, its rows unchanged).
      any = __syncthreads_or(any);
      if (it + 1 < num_tiles) {
        load_kv_tiles<C>(k_s + ((it + 1) % C::kStages) * C::kKTileElems, v_s + ((it + 1) % C::kStages) * C::kVTileElems,
                         nullptr, p, s, hk, n0 + C::kBlockN, kmax);
        arch::cp_async_commit();
      }
      if (it == 0) {
#pragma unroll
        for (int ks = 0; ks < C::kQSliceSteps; ++ks)
          arch::ldmatrix_x4(qa[ks], q_s + swz<kD>(wrow + lane % 16, qc0 + 2 * ks + lane / 16));
#pragma unroll
        for (int ks = 0; ks < C::kSliceSteps; ++ks)
          arch::ldmatrix_x4(qva[ks], qv_s + swz<kDv>(wrow + lane % 16, vc0 + 2 * ks + lane / 16));
      }
      if (!any) continue;

      // This column warp's part of S: q.k^T over its q channels plus qv.v^T over its v channels
      float sacc[C::kNTiles][4];
#pragma unroll
      for (int nt = 0; nt < C::kNTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) sacc[nt][e] = 0.f;
      add_scores<T, kD>(sacc, qa, k_t, qc0);
      add_scores<T, kDv>(sacc, qva, v_t, vc0);
      // The group's partials meet in shared memory (fragment order: lanes read what the same
      // lane of another warp wrote); every warp sums them in column order 0, 1, ... The next
      // tile's first barrier keeps the next writes behind these reads.
#pragma unroll
      for (int nt = 0; nt < C::kNTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) my_scores[(nt * 4 + e) * 32 + lane] = sacc[nt][e];
      __syncthreads();
#pragma unroll
      for (int nt = 0; nt < C::kNTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float x = 0.f;
#pragma unroll
          for (int c = 0; c < C::kColWarps; ++c) x += group_scores[c * C::kScoreFloats + (nt * 4 + e) * 32 + lane];
          sacc[nt][e] = x;
        }

      // Online softmax in base 2, per row (online_softmax_row, one 16-row tile per warp)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const KeyInterval keys{row_lo[hf] - n0, row_hi[hf] - n0};
        const float corr =
            online_softmax_row<kPlain>(sacc, hf, row_max[hf], row_sum[hf], keys, all, sl, [&](float x, int jr) {
              const int m = m0 + wrow + hf * 8 + g;
              const ScoreMod mod = score_mod(p, s, b, h0 + m % row_heads);
              const int j = static_cast<int>(static_cast<unsigned>(n0) + static_cast<unsigned>(jr));
              return mod.logit(x, m / row_heads, j) * kLog2e;
            });
#pragma unroll
        for (int dt = 0; dt < C::kSliceTiles; ++dt) {
          o[dt][2 * hf] *= corr;
          o[dt][2 * hf + 1] *= corr;
        }
      }

      // O[:, this warp's channels] += P V: two 8-key S tiles are the A fragment of a 16-key step
#pragma unroll
      for (int pk = 0; pk < C::kPSteps; ++pk) {
        uint32_t a[4];
        arch::acc_to_a<T>(sacc[2 * pk], sacc[2 * pk + 1], a);
#pragma unroll
        for (int dp = 0; dp < C::kSliceTiles / 2; ++dp) {
          uint32_t vb[4];
          arch::ldmatrix_x4_trans(vb, v_t + swz<kDv>(pk * 16 + lane % 8 + ((lane / 8) % 2) * 8, vc0 + 2 * dp + lane / 16));
          arch::mma_16x8x16<T>(o[2 * dp], a, vb[0], vb[1]);
          arch::mma_16x8x16<T>(o[2 * dp + 1], a, vb[2], vb[3]);
        }
      }
    }
  }

  // Normalize and store this warp's channels. Padded rows (past seqused_q) get out 0 and lse
  // -inf, once; column warp 0 writes the lse.
  const int ch0 = col * C::kSlice + 2 * t;  // this lane's first channel
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    float l = row_sum[hf];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int m = m0 + wrow + hf * 8 + g;
    if (m >= rows_total) continue;
    const int qi = m / row_heads, h = h0 + m % row_heads;
    const int64_t row = s.q_row0 + qi;
    const bool padded = qi >= s.q_len;
    if (padded && split != 0) continue;
    const bool has = !padded && (l > 0.f || l != l);  // NaN inputs propagate
    float lse = has ? row_max[hf] * sl * kLn2 + logf(l) : -INFINITY;
    float scale = has ? 1.f / l : 0.f;
    if (!has)  // no key: exact zeros, whatever 0 * V left in this row's accumulators
#pragma unroll
      for (int dt = 0; dt < C::kSliceTiles; ++dt) o[dt][2 * hf] = o[dt][2 * hf + 1] = 0.f;
    const bool writes_lse = t == 0 && col == 0;
    if (n > 1 && !padded) {
      const int64_t grow = (static_cast<int64_t>(split) * p.total_q + global_row(p, s, b, qi)) * p.num_heads + h;
      float* dst = parts.out + grow * p.head_dim_v + ch0;
#pragma unroll
      for (int dt = 0; dt < C::kSliceTiles; ++dt)
        if (ch0 - 2 * t + dt * 8 < p.head_dim_v)  // the padding channels are never stored
          *reinterpret_cast<float2*>(dst + dt * 8) = make_float2(o[dt][2 * hf] * scale, o[dt][2 * hf + 1] * scale);
      if (writes_lse) parts.lse[grow] = lse;
      continue;
    }
    if (p.learnable_sink && !padded) scale *= apply_fmha_sink(lse, p.learnable_sink[h]);
    const int64_t base = b * p.out_batch_stride + row * p.out_row_stride + h * p.out_head_stride + ch0;
#pragma unroll
    for (int dt = 0; dt < C::kSliceTiles; ++dt) {
      if (ch0 - 2 * t + dt * 8 >= p.head_dim_v) break;
      const float x0 = o[dt][2 * hf] * scale, x1 = o[dt][2 * hf + 1] * scale;
      if (out_pairs) {
        *reinterpret_cast<uint32_t*>(static_cast<T*>(p.out) + base + dt * 8) = arch::pack2<T>(x0, x1);
      } else {
        store_float(p.out, base + dt * 8, p.out_dtype, x0);
        store_float(p.out, base + dt * 8 + 1, p.out_dtype, x1);
      }
    }
    if (writes_lse) p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + row * p.lse_row_stride] = lse;
  }
}

template <class C, bool kPlain>
arch::Error launch_qv_config(const FmhaParams& p, const FmhaSplitBuffers& splits, int max_rows, int row_heads,
                             arch::Stream stream) {
  static std::atomic<uint64_t> configured{0};  // the shared-memory attribute, once per device
  const arch::Error e = arch::set_max_dynamic_smem_once(fmha_qv_mma_kernel<C, kPlain>, C::kSmemBytes, configured);
  if (e != arch::kSuccess) return e;
  const int64_t rows = static_cast<int64_t>(max_rows) * row_heads;
  const dim3 grid(static_cast<unsigned>((rows + C::kBlockM - 1) / C::kBlockM), p.num_heads / row_heads,
                  p.batch * splits.num_splits);
  auto even = [](int64_t x) { return x % 2 == 0; };
  const bool out_pairs = p.out_dtype == p.in_dtype && reinterpret_cast<uintptr_t>(p.out) % 4 == 0 &&
                         even(p.out_batch_stride) && even(p.out_row_stride) && even(p.out_head_stride);
  fmha_qv_mma_kernel<C, kPlain><<<grid, C::kThreads, C::kSmemBytes, stream>>>(p, splits, row_heads, out_pairs);
  return arch::last_error();
}

template <typename T>
arch::Error launch_qv_typed(const FmhaParams& p, const FmhaSplitBuffers& splits, int max_rows, int row_heads,
                            arch::Stream stream) {
  using C = QvConfig<T>;
  return scores_are_plain(p) ? launch_qv_config<C, true>(p, splits, max_rows, row_heads, stream)
                             : launch_qv_config<C, false>(p, splits, max_rows, row_heads, stream);
}

}  // namespace

bool qv_mma_fits(const FmhaParams& p) {
  return p.qv != nullptr && (p.in_dtype == DType::kBFloat16 || p.in_dtype == DType::kFloat16) &&
         p.head_dim % 8 == 0 && p.head_dim <= QvConfig<arch::bf16>::kD && p.head_dim_v % 8 == 0 &&
         p.head_dim_v <= QvConfig<arch::bf16>::kDv &&
         rows_aligned16(p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride) &&
         rows_aligned16(p.qv, p.qv_batch_stride, p.qv_row_stride, p.qv_head_stride) &&
         rows_aligned16(p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride) &&
         rows_aligned16(p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
}

arch::Error launch_fmha_qv_mma(const FmhaParams& p, const FmhaSplitBuffers& splits, int max_rows,
                               arch::Stream stream) {
  const int row_heads = p.pack_gqa ? p.num_heads / p.num_heads_k : 1;
  return p.in_dtype == DType::kFloat16 ? launch_qv_typed<arch::f16>(p, splits, max_rows, row_heads, stream)
                                       : launch_qv_typed<arch::bf16>(p, splits, max_rows, row_heads, stream);
}

#else  // no mma.sync in this build: the portable kernels of fmha_kernels.cu serve qv

bool qv_mma_fits(const FmhaParams&) { return false; }
arch::Error launch_fmha_qv_mma(const FmhaParams&, const FmhaSplitBuffers&, int, arch::Stream) {
  return arch::kSuccess;
}

#endif

}  // namespace mate::device
