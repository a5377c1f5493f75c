// FMHA forward on tensor cores (mma.sync m16n8k16, sm80+), for bf16/fp16 with any D and Dv
// that are multiples of 8 up to 256: the fast path of both prefill and decode. Tiles are
// instantiated at widths (D, Dv) of 64, 128, 192 x 128 (DeepSeek's prefill) and 256; a head
// dim in between pads up inside the kernel: the extra channels load as zeros (they add
// nothing to Q K^T) and are never stored.
//
// One block per (block of packed query rows, kv-head row group, sequence, split). A packed
// row m is (query m / R, head h0 + m % R) with R = G under GQA packing, else 1, so all the G
// query heads of a kv head share each K/V tile. Every warp owns kMTiles x 16 rows; S = Q K^T
// and O += P V run in registers (the S accumulators become the P operand without touching
// shared memory), with an online softmax in base 2. K and V tiles of kBlockN keys stream
// through shared memory with cp.async in two stages: tile t + 1 is in flight while tile t is
// computed (one barrier per tile). Each lane looks up the storage offset of one key row and
// shares it by shuffles, so paged K/V costs one page-table read per row. Shared tiles use an
// XOR swizzle of 16-byte chunks so ldmatrix reads are bank-conflict free.
//
// Scores and masks: the shared pipeline of fmha_score.h. The mask is the per-row key
// interval (key_range_for_row: causal / local / chunk / context parallel) intersected with
// the split; only tiles that cross an interval edge pay for per-element masking. On the
// plain path (scores_are_plain: no softcap, no ALiBi, positive scale) the logits are
// scale * raw, so row maxima are taken on raw scores and the scale folds into the exp2 FFMA;
// softcap, ALiBi and non-positive scales use a separate instantiation (kPlain = false) that
// turns every score into its logit with ScoreMod first. Splits write fp32 partials that
// fmha_merge_kernel (fmha_kernels.cu) combines. Measurements and the road ahead:
// docs/performance.md.
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

// kPlain: no softcap, no ALiBi and a positive scale, so raw scores order like the logits and
// the scale folds into the exponent (one FFMA per score). Otherwise every score is first
// turned into its logit (in base 2); that path is a separate instantiation so the common one
// carries none of its code.
template <class C, bool kPlain>
__global__ void __launch_bounds__(C::kThreads, 1)
    fmha_mma_kernel(FmhaParams p, FmhaSplitBuffers parts, int row_heads, bool out_pairs) {
  using T = typename C::T;
  constexpr int kD = C::kD, kMT = C::kMTiles;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);
  T* k_s = q_s + C::kBlockM * kD;                 // kStages K tiles, then kStages V tiles
  T* v_s = k_s + C::kStages * C::kKTileElems;
  uint8_t* raw_s = reinterpret_cast<uint8_t*>(v_s + C::kStages * C::kVTileElems);  // FP8 staging

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

  const int ns = sequence_splits(p, b, s.k_len, n);
  int slo = 0, shi = s.k_len;
  if (ns > 1) split_key_range(s.k_len, kSplitKeyBlock, split, ns, slo, shi);
  const bool live = split < ns;

  // Keys of the block. This relies on the INVARIANT stated at key_range_for_row
  // (fmha_score.h, tested by tests/test_key_interval.py): both ends of a row's key interval
  // are non-decreasing in the row, so the first real row has the smallest lower end and the
  // last the largest upper end. A mask without that property would need the union of all
  // the block's rows here.
  int kmin = 0, kmax = 0;
  if (m0 < real_rows && live) {
    kmin = imax(key_range_for_row(p, s, m0 / row_heads).lo, slo);
    kmax = imin(key_range_for_row(p, s, (imin(m0 + C::kBlockM, real_rows) - 1) / row_heads).hi, shi);
  }
  // This thread's rows: (mt, half) -> block row warp * 16 kMT + 16 mt + 8 half + g.
  int row_lo[kMT][2], row_hi[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int m = m0 + warp * 16 * kMT + mt * 16 + hf * 8 + g;
      KeyInterval keys;
      if (m < real_rows && live) keys = key_range_for_row(p, s, m / row_heads).clip(slo, shi);
      row_lo[mt][hf] = keys.lo;
      row_hi[mt][hf] = keys.hi;
    }

  // FP8 descales (1 without): q and k fold into the logits, v into the output
  float dscale = 1.f, vscale = 1.f;
  if constexpr (C::kFp8In) {
    dscale = (p.q_descale ? p.q_descale[b * p.q_descale_batch_stride + hk * p.q_descale_head_stride] : 1.f) *
             (p.k_descale ? p.k_descale[b * p.k_descale_batch_stride + hk * p.k_descale_head_stride] : 1.f);
    vscale = p.v_descale ? p.v_descale[b * p.v_descale_batch_stride + hk * p.v_descale_head_stride] : 1.f;
  }
  float o[kMT][C::kVTiles][4];
  float row_max[kMT][2], row_sum[kMT][2];  // max in score units: raw (kPlain) or base-2 logits
  const float sl = kPlain ? p.softmax_scale * kLog2e : 1.f;  // score units -> base-2 logits
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int dt = 0; dt < C::kVTiles; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mt][dt][e] = 0.f;
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }

  const int num_tiles = kmax > kmin ? ceil_div_pos(kmax - kmin, C::kBlockN) : 0;
  if (num_tiles > 0) {
    if constexpr (C::kFp8In) {  // Q rows converted on the way in (once per block)
      const uint8_t* q0 = static_cast<const uint8_t*>(p.q);
      for (int idx = threadIdx.x; idx < C::kBlockM * (kD / 16); idx += C::kThreads) {
        const int r = idx / (kD / 16), u = idx % (kD / 16), m = m0 + r;
        uint4 in = make_uint4(0, 0, 0, 0);
        if (m < real_rows && u < p.head_dim / 16)
          in = *reinterpret_cast<const uint4*>(q0 + b * p.q_batch_stride + (s.q_row0 + m / row_heads) * p.q_row_stride +
                                               (h0 + m % row_heads) * p.q_head_stride + u * 16);
        uint4 lo, hi;
        e4m3x16_to_bf16(in, lo, hi);
        *reinterpret_cast<uint4*>(q_s + swz<kD>(r, 2 * u)) = lo;
        *reinterpret_cast<uint4*>(q_s + swz<kD>(r, 2 * u + 1)) = hi;
      }
      load_kv_tiles<C>(k_s, v_s, raw_s, p, s, hk, kmin, kmax);
      arch::cp_async_commit();
    } else {  // Q rows of the block (zeros past the real rows), then the first K/V tiles
      const T* q0 = static_cast<const T*>(p.q);
      for (int idx = threadIdx.x; idx < C::kBlockM * C::kChunks; idx += C::kThreads) {
        const int r = idx / C::kChunks, c = idx % C::kChunks, m = m0 + r;
        const bool valid = m < real_rows && c < p.head_dim / 8;  // zeros pad to the tile width
        const T* src = q0;
        if (valid)
          src = q0 + b * p.q_batch_stride + (s.q_row0 + m / row_heads) * p.q_row_stride +
                (h0 + m % row_heads) * p.q_head_stride + c * 8;
        arch::cp_async_16(q_s + swz<kD>(r, c), src, valid);
      }
      load_kv_tiles<C>(k_s, v_s, raw_s, p, s, hk, kmin, kmax);
      arch::cp_async_commit();
    }
    uint32_t qf[C::kQInRegs ? kMT : 1][C::kQInRegs ? C::kKSteps : 1][4];
    const int wrow = warp * 16 * kMT;

    for (int it = 0; it < num_tiles; ++it) {
      const int n0 = kmin + it * C::kBlockN;
      T* k_t = k_s + (it % C::kStages) * C::kKTileElems;
      T* v_t = v_s + (it % C::kStages) * C::kVTileElems;
      arch::cp_async_wait<0>();  // tile it has landed
      // One barrier per tile: past it, tile it is visible to all and every warp is done with
      // tile it - 1, whose stage now receives tile it + 1 (in flight while tile it computes).
      // FP8: tile it is converted from the staging buffer first, behind a second barrier.
      __syncthreads();
      if constexpr (C::kFp8In) {
        convert_kv_tiles<C>(raw_s, k_t, v_t);
        __syncthreads();
      }
      if (it + 1 < num_tiles) {
        load_kv_tiles<C>(k_s + ((it + 1) % C::kStages) * C::kKTileElems, v_s + ((it + 1) % C::kStages) * C::kVTileElems,
                         raw_s, p, s, hk, n0 + C::kBlockN, kmax);
        arch::cp_async_commit();
      }
      if constexpr (C::kQInRegs) {
        if (it == 0)
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
            for (int ks = 0; ks < C::kKSteps; ++ks)
              arch::ldmatrix_x4(qf[mt][ks], q_s + swz<kD>(wrow + mt * 16 + lane % 16, 2 * ks + lane / 16));
      }
      // Does the tile hold keys this warp sees, and does it need per-element masking?
      // (interval ends relative to n0: n0 + kBlockN may pass 2^31 - 1 on the last tile)
      bool any = false, all = true;
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int lo = row_lo[mt][hf] - n0, hi = row_hi[mt][hf] - n0;
          any |= lo < C::kBlockN && hi > 0 && lo < hi;
          all &= lo <= 0 && C::kBlockN <= hi;
        }
      any = arch::warp_any(any);
      all = arch::warp_all(all);

      float sacc[kMT][C::kNTiles][4];
      if (any) {
        // S = Q K^T
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
          for (int nt = 0; nt < C::kNTiles; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) sacc[mt][nt][e] = 0.f;
#pragma unroll
        for (int ks = 0; ks < C::kKSteps; ++ks) {
          uint32_t a[kMT][4];
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            if constexpr (C::kQInRegs) {
#pragma unroll
              for (int e = 0; e < 4; ++e) a[mt][e] = qf[mt][ks][e];
            } else {
              arch::ldmatrix_x4(a[mt], q_s + swz<kD>(wrow + mt * 16 + lane % 16, 2 * ks + lane / 16));
            }
          }
#pragma unroll
          for (int np = 0; np < C::kNTiles / 2; ++np) {
            uint32_t kb[4];
            arch::ldmatrix_x4(kb, k_t + swz<kD>(np * 16 + lane % 8 + (lane / 16) * 8, 2 * ks + (lane / 8) % 2));
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt) {
              arch::mma_16x8x16<T>(sacc[mt][2 * np], a[mt], kb[0], kb[1]);
              arch::mma_16x8x16<T>(sacc[mt][2 * np + 1], a[mt], kb[2], kb[3]);
            }
          }
        }

        // Online softmax in base 2, per row; a row's 2 kNTiles values live in one lane quad.
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            // the row's key interval relative to n0 (the mask of fmha_score.h)
            const KeyInterval keys{row_lo[mt][hf] - n0, row_hi[mt][hf] - n0};
            const float corr = online_softmax_row<kPlain>(
                sacc[mt], hf, row_max[mt][hf], row_sum[mt][hf], keys, all, sl, [&](float x, int jr) {
                  const int m = m0 + wrow + mt * 16 + hf * 8 + g;
                  const ScoreMod mod = score_mod(p, s, b, h0 + m % row_heads);
                  // key n0 + jr, formed without signed overflow (past kmax it is masked anyway)
                  const int j = static_cast<int>(static_cast<unsigned>(n0) + static_cast<unsigned>(jr));
                  return mod.logit(x * dscale, m / row_heads, j) * kLog2e;
                });
#pragma unroll
            for (int dt = 0; dt < C::kVTiles; ++dt) {
              o[mt][dt][2 * hf] *= corr;
              o[mt][dt][2 * hf + 1] *= corr;
            }
          }

        // O += P V: the S accumulators of two 8-key tiles are the A fragment of one 16-key step.
#pragma unroll
        for (int pk = 0; pk < C::kPSteps; ++pk) {
          uint32_t a[kMT][4];
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            arch::acc_to_a<T>(sacc[mt][2 * pk], sacc[mt][2 * pk + 1], a[mt]);
          }
#pragma unroll
          for (int dp = 0; dp < C::kVTiles / 2; ++dp) {
            uint32_t vb[4];
            arch::ldmatrix_x4_trans(vb, v_t + swz<C::kDv>(pk * 16 + lane % 8 + ((lane / 8) % 2) * 8, 2 * dp + lane / 16));
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt) {
              arch::mma_16x8x16<T>(o[mt][2 * dp], a[mt], vb[0], vb[1]);
              arch::mma_16x8x16<T>(o[mt][2 * dp + 1], a[mt], vb[2], vb[3]);
            }
          }
        }
      }
    }
  }

  // Normalize and store. Padded rows (past seqused_q) get out 0 and lse -inf, once.
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float l = row_sum[mt][hf];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int m = m0 + warp * 16 * kMT + mt * 16 + hf * 8 + g;
      if (m >= rows_total) continue;
      const int qi = m / row_heads, h = h0 + m % row_heads;
      const int64_t row = s.q_row0 + qi;
      const bool padded = qi >= s.q_len;
      if (padded && split != 0) continue;
      const bool has = !padded && (l > 0.f || l != l);  // NaN inputs propagate
      float lse = has ? row_max[mt][hf] * sl * kLn2 + logf(l) : -INFINITY;
      float scale = has ? vscale / l : 0.f;
      if (!has)  // no key: exact zeros, whatever 0 * V left in this row's accumulators
#pragma unroll
        for (int dt = 0; dt < C::kVTiles; ++dt) o[mt][dt][2 * hf] = o[mt][dt][2 * hf + 1] = 0.f;
      if (n > 1 && !padded) {
        const int64_t grow = (static_cast<int64_t>(split) * p.total_q + global_row(p, s, b, qi)) * p.num_heads + h;
        float* dst = parts.out + grow * p.head_dim_v + 2 * t;
#pragma unroll
        for (int dt = 0; dt < C::kVTiles; ++dt)
          if (dt * 8 < p.head_dim_v)  // the padding channels are never stored
            *reinterpret_cast<float2*>(dst + dt * 8) =
                make_float2(o[mt][dt][2 * hf] * scale, o[mt][dt][2 * hf + 1] * scale);
        if (t == 0) parts.lse[grow] = lse;
        continue;
      }
      if (p.learnable_sink && !padded) scale *= apply_fmha_sink(lse, p.learnable_sink[h]);
      const int64_t base = b * p.out_batch_stride + row * p.out_row_stride + h * p.out_head_stride + 2 * t;
#pragma unroll
      for (int dt = 0; dt < C::kVTiles; ++dt) {
        if (dt * 8 >= p.head_dim_v) break;
        const float x0 = o[mt][dt][2 * hf] * scale, x1 = o[mt][dt][2 * hf + 1] * scale;
        if (out_pairs) {
          *reinterpret_cast<uint32_t*>(static_cast<T*>(p.out) + base + dt * 8) = arch::pack2<T>(x0, x1);
        } else {
          store_float(p.out, base + dt * 8, p.out_dtype, x0);
          store_float(p.out, base + dt * 8 + 1, p.out_dtype, x1);
        }
      }
      if (t == 0) p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + row * p.lse_row_stride] = lse;
    }
}

template <class C, bool kPlain>
arch::Error launch_config(const FmhaParams& p, const FmhaSplitBuffers& splits, int max_rows, int row_heads,
                          arch::Stream stream) {
  // The shared-memory attribute belongs to a device: set it once per device (a driver call
  // per launch costs eager decode steps microseconds of host time).
  static std::atomic<uint64_t> configured{0};
  const arch::Error e = arch::set_max_dynamic_smem_once(fmha_mma_kernel<C, kPlain>, C::kSmemBytes, configured);
  if (e != arch::kSuccess) return e;
  const int64_t rows = static_cast<int64_t>(max_rows) * row_heads;
  const dim3 grid(static_cast<unsigned>((rows + C::kBlockM - 1) / C::kBlockM), p.num_heads / row_heads,
                  p.batch * splits.num_splits);
  auto even = [](int64_t x) { return x % 2 == 0; };
  const bool out_pairs = p.out_dtype == p.in_dtype && p.in_dtype != DType::kFloat8E4M3 &&
                         reinterpret_cast<uintptr_t>(p.out) % 4 == 0 &&
                         even(p.out_batch_stride) && even(p.out_row_stride) && even(p.out_head_stride);
  fmha_mma_kernel<C, kPlain><<<grid, C::kThreads, C::kSmemBytes, stream>>>(p, splits, row_heads, out_pairs);
  return arch::last_error();
}

// Tile shapes (measured on an H200, docs/performance.md): prefill takes 4 warps of 16 rows;
// up to 16 packed rows (decode) take one warp per block, so many blocks per SM keep K/V
// loads in flight. Softcap / ALiBi / non-positive scales use the prefill tile for every size.
template <typename T, int kD, int kDv>
arch::Error launch_dim(const FmhaParams& p, const FmhaSplitBuffers& splits, int max_rows, int row_heads,
                       arch::Stream stream) {
  constexpr int kPrefillKeys = (kD == 256 || kDv == 256) ? 32 : 64, kDecodeKeys = kD == 64 ? 64 : 32;
  using Prefill = MmaConfig<T, kD, kDv, 4, 1, kPrefillKeys>;
  using Decode = MmaConfig<T, kD, kDv, 1, 1, kDecodeKeys>;
  const bool plain = scores_are_plain(p);
  if (!plain) return launch_config<Prefill, false>(p, splits, max_rows, row_heads, stream);
  if (static_cast<int64_t>(max_rows) * row_heads <= 16)
    return launch_config<Decode, true>(p, splits, max_rows, row_heads, stream);
  return launch_config<Prefill, true>(p, splits, max_rows, row_heads, stream);
}

// FP8 inputs: bf16 tiles converted in shared memory; the descales go through the ScoreMod
// path (any sign), on the prefill tile.
template <int kD, int kDv>
arch::Error launch_fp8(const FmhaParams& p, const FmhaSplitBuffers& splits, int max_rows, int row_heads,
                       arch::Stream stream) {
  constexpr int kKeys = (kD == 256 || kDv == 256) ? 32 : 64;
  return launch_config<MmaConfig<arch::bf16, kD, kDv, 4, 1, kKeys, true>, false>(p, splits, max_rows, row_heads,
                                                                                  stream);
}

template <typename T>
arch::Error launch_typed(const FmhaParams& p, const FmhaSplitBuffers& splits, int max_rows, int row_heads,
                         arch::Stream stream) {
  MmaWidths w = MmaWidths::k256;
  mma_widths(p.head_dim, p.head_dim_v, w);
  if (p.in_dtype == DType::kFloat8E4M3) {
    switch (w) {
      case MmaWidths::k64: return launch_fp8<64, 64>(p, splits, max_rows, row_heads, stream);
      case MmaWidths::k128: return launch_fp8<128, 128>(p, splits, max_rows, row_heads, stream);
      case MmaWidths::k192x128: return launch_fp8<192, 128>(p, splits, max_rows, row_heads, stream);
      default: return launch_fp8<256, 256>(p, splits, max_rows, row_heads, stream);
    }
  }
  switch (w) {
    case MmaWidths::k64: return launch_dim<T, 64, 64>(p, splits, max_rows, row_heads, stream);
    case MmaWidths::k128: return launch_dim<T, 128, 128>(p, splits, max_rows, row_heads, stream);
    case MmaWidths::k192x128: return launch_dim<T, 192, 128>(p, splits, max_rows, row_heads, stream);
    default: return launch_dim<T, 256, 256>(p, splits, max_rows, row_heads, stream);
  }
}

}  // namespace

bool mma_path_fits(const FmhaParams& p) {
  const bool fp8 = p.in_dtype == DType::kFloat8E4M3;
  const int64_t es = fp8 ? 1 : 2;  // element bytes
  MmaWidths w;
  // FP8 rows move in 16-value units: head dims multiples of 16
  const bool dims_ok = fp8 ? p.head_dim % 16 == 0 && p.head_dim_v % 16 == 0 : true;
  return (p.in_dtype == DType::kBFloat16 || p.in_dtype == DType::kFloat16 || fp8) && !p.qv && dims_ok &&
         mma_widths(p.head_dim, p.head_dim_v, w) &&
         rows_aligned16(p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride, es) &&
         rows_aligned16(p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, es) &&
         rows_aligned16(p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, es);
}

arch::Error launch_fmha_mma(const FmhaParams& p, const FmhaSplitBuffers& splits, int max_rows, arch::Stream stream) {
  const int G = p.num_heads / p.num_heads_k;
  const int row_heads = p.pack_gqa ? G : 1;
  return p.in_dtype == DType::kFloat16 ? launch_typed<arch::f16>(p, splits, max_rows, row_heads, stream)
                                       : launch_typed<arch::bf16>(p, splits, max_rows, row_heads, stream);
}

#else  // no mma.sync in this build: the portable kernels of fmha_kernels.cu serve everything

bool mma_path_fits(const FmhaParams&) { return false; }
arch::Error launch_fmha_mma(const FmhaParams&, const FmhaSplitBuffers&, int, arch::Stream) {
  return arch::kSuccess;
}

#endif

}  // namespace mate::device
