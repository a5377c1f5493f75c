// MLA on the device: decode (dense paged, sparse top-k with the extra cache, FP8 V3.2 and
// MODEL1 caches, attn_sink) and sparse prefill (a decode of one-row queries), plus the
// get_mla_metadata schedule. Semantics: docs/semantics.md §3; the key lists, FP8 formats and
// causal limit are the shared functions of mla_params.h, as on the CPU.
//
// Fast path (mla_mma_kernel, mma.sync): the query heads that share one latent row are the M
// dimension of both GEMMs, so each key tile is read from memory once for all of them and V
// is the first 512 channels of the same shared-memory tile. A block is kRowWarps x kColWarps
// warps over 16 kRowWarps query rows: S = Q K^T is split over the channels (each column
// warp sums a k-slice; the partial scores meet in shared memory, summed in one fixed order
// so every warp of a row group holds bitwise the same scores and softmax), and O += P V is
// split over the 512 output channels (P stays in registers). Key tiles of 32 stream through
// two shared buffers with cp.async; FP8 tiles land raw in a staging buffer and are
// dequantized in shared memory (scales per 128 / 64 values, bf16 rope copied) before use.
//
// Split-KV follows the get_mla_metadata schedule (mla_schedule, computed on the device for
// every call, so results never depend on a caller's metadata): block x of the grid is part
// x, which walks the 64-key blocks [begin, end) of consecutive sequences. A sequence that
// one part covers whole is finished in place; a piece of a split sequence writes fp32
// partials to slot 2 part (first sequence of the part) or 2 part + 1 (last), and
// mla_combine_kernel merges them. A "sequence" is one batch entry for dense decode (all its
// query rows share the cache) and one (batch, query row) for sparse attention (each row has
// its own indices).
//
// Hopper (default on compute capability 9.0 from 64 query rows per kv head; MATE_OPS_MLA_PATH
// =sm80 opts out, =sm90 takes every call it serves): dense bf16 decode that mla_sm90_fits
// accepts runs arch/sm90/mla_decode_sm90.cu (TMA + wgmma) on the same schedule,
// partials and combine; mla_fast_parts sizes the schedule for it (mla_sm90_takes).
//
// Everything else (fp32, head dims other than 576 / 512, head_dim_v > 512, fp16 with an FP8
// cache, unaligned tensors, MUSA builds) runs on mla_portable_kernel: CUDA cores, one warp
// per query row, no split.
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "../common/dtype_convert.h"
#include "../common/fmha_math.h"
#include "../common/mla_params.h"
#include "arch/mma.h"
#include "kernels.h"
#include "mla_device.cuh"

namespace mate::device {
namespace {

// ---- get_mla_metadata's schedule, on the device (no host synchronization) ----------------
// mla_schedule deals out the concatenated 64-key blocks of all sequences in equal runs of
// per_part = ceil(total / parts) blocks, so part p covers global blocks
// [p per_part, (p + 1) per_part) and every row has a closed form once the sequences' first
// global blocks (prefix sums) are known. One block of kScheduleThreads computes them in
// parallel; it writes exactly what mla_schedule writes (the sequential loop remains the
// reference and the fallback for more than kScheduleMaxSeqs dense sequences).
constexpr int kScheduleThreads = 1024, kScheduleMaxSeqs = 6000;

__global__ void mla_schedule_kernel(MlaMetadataParams p) { mla_schedule(p); }

// Exclusive prefix sum over the block's threads; `total` gets the sum of all v.
__device__ __forceinline__ int64_t block_exclusive_scan(int64_t v, int64_t& total) {
  __shared__ int64_t warp_sums[kScheduleThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int64_t x = v;
#pragma unroll
  for (int o = 1; o < 32; o *= 2) {
    const int64_t y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int64_t w = lane < kScheduleThreads / 32 ? warp_sums[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o *= 2) {
      const int64_t y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += y;
    }
    if (lane < kScheduleThreads / 32) warp_sums[lane] = w;  // inclusive warp totals
  }
  __syncthreads();
  const int64_t before = warp > 0 ? warp_sums[warp - 1] : 0;
  total = warp_sums[kScheduleThreads / 32 - 1];
  __syncthreads();  // warp_sums may be reused by the next call
  return before + x - v;
}

__global__ void __launch_bounds__(kScheduleThreads) mla_schedule_parallel_kernel(MlaMetadataParams p) {
  extern __shared__ int64_t seq_start[];  // dense: first global block of each sequence, then the total
  const bool fixed = p.fixed_keys >= 0;
  const int64_t fixed_blocks = fixed ? mla_key_blocks(p, 0) : 0;
  if (!fixed) {
    int64_t carry = 0;
    for (int base = 0; base < p.batch; base += kScheduleThreads) {
      const int b = base + threadIdx.x;
      const int64_t v = b < p.batch ? mla_key_blocks(p, b) : 0;
      int64_t chunk;
      const int64_t ex = block_exclusive_scan(v, chunk);
      if (b < p.batch) seq_start[b] = carry + ex;
      carry += chunk;
    }
    if (threadIdx.x == 0) seq_start[p.batch] = carry;
    __syncthreads();
  }
  auto start_of = [&](int b) { return fixed ? b * fixed_blocks : seq_start[b]; };
  const int64_t total = start_of(p.batch);
  const int64_t per_part = (total + p.parts - 1) / p.parts;
  const int64_t step = per_part > 1 ? per_part : 1;  // mla_schedule's per_part
  // global block g -> (sequence, block): the last sequence starting at or before g
  auto locate = [&](int64_t g, int32_t& b_out, int32_t& k_out) {
    if (g >= total) {
      b_out = p.batch;
      k_out = 0;
      return;
    }
    int lo = 0, hi = p.batch - 1;
    if (fixed) {
      lo = hi = static_cast<int>(g / fixed_blocks);
    } else {
      while (lo < hi) {  // largest b with start_of(b) <= g
        const int mid = (lo + hi + 1) / 2;
        if (start_of(mid) <= g) lo = mid; else hi = mid - 1;
      }
    }
    b_out = lo;
    k_out = static_cast<int32_t>(g - start_of(lo));
  };
  // rows [begin_batch, begin_block, end_batch, end_block, first_split, 0, 0, 0]; first_split is
  // the scan of the pieces (sequences touched) of the parts before
  int64_t carry = 0;
  for (int base = 0; base < p.parts; base += kScheduleThreads) {
    const int part = base + threadIdx.x;
    int32_t b0 = 0, k0 = 0, b1 = 0, k1 = 0;
    int64_t pieces = 0;
    if (part < p.parts) {
      const int64_t g0 = part * step, g1 = g0 + step;
      locate(g0 < total ? g0 : total, b0, k0);
      locate(g1 < total ? g1 : total, b1, k1);
      pieces = (b1 - b0) + (k1 > 0 ? 1 : 0);
    }
    int64_t chunk;
    const int64_t first = carry + block_exclusive_scan(pieces, chunk);
    carry += chunk;
    if (part < p.parts) {
      int32_t* row = p.metadata + static_cast<int64_t>(part) * kMlaMetadataCols;
      row[0] = b0;
      row[1] = k0;
      row[2] = b1;
      row[3] = k1;
      row[4] = static_cast<int32_t>(first);
      row[5] = row[6] = row[7] = 0;
    }
  }
  __syncthreads();  // rows are visible to the whole block
  // num_splits[b] = the global split id of b's first piece: the first split of the part
  // holding b's first block, plus one piece per sequence that part starts before b
  for (int b = threadIdx.x; b <= p.batch; b += kScheduleThreads) {
    if (b == p.batch) {
      p.num_splits[b] = static_cast<int32_t>(carry);
    } else {
      const int64_t part = start_of(b) / step;
      const int32_t* row = p.metadata + part * kMlaMetadataCols;
      p.num_splits[b] = row[4] + (b - row[0]);
    }
  }
}

// ---- portable kernel: CUDA cores, one warp per query row ------------------------------
constexpr int kPortRows = 4, kPortKeys = 16, kPortThreads = kPortRows * 32, kPortMaxV = 1024;

__device__ __forceinline__ float mla_key_channel(const MlaCache& c, const MlaTokenRef& t, int i) {
  switch (c.format) {
    case MlaCacheFormat::kBFloat16: return bf16_to_float(reinterpret_cast<const uint16_t*>(t.data)[i]);
    case MlaCacheFormat::kFloat16: return half_to_float(reinterpret_cast<const uint16_t*>(t.data)[i]);
    case MlaCacheFormat::kFloat32: return reinterpret_cast<const float*>(t.data)[i];
    default: return mla_fp8_channel(c.format, t.data, t.scales, i);
  }
}

// grid (sequences, ceil(rows / kPortRows), heads_kv); dynamic shared memory:
// q (kPortRows x D) and keys (kPortKeys x D) in fp32.
__global__ void __launch_bounds__(kPortThreads) mla_portable_kernel(MlaParams p, int rows) {
  extern __shared__ float smem[];
  float* q_s = smem;
  float* k_s = q_s + kPortRows * p.head_dim;
  __shared__ MlaTokenRef refs[kPortKeys];
  __shared__ bool from_extra[kPortKeys];
  const int D = p.head_dim, Dv = p.head_dim_v, hkv = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const MlaSeq seq = mla_seq(p, blockIdx.x);
  const int r = blockIdx.y * kPortRows + warp;
  const bool row_ok = r < rows;
  const MlaRow row = mla_row(p, seq, hkv, row_ok ? r : 0);
  const int64_t q0 = seq.keys.b * p.q_batch_stride + row.s * p.q_row_stride + row.h * p.q_head_stride;
  for (int c = lane; c < D; c += 32) q_s[warp * D + c] = row_ok ? load_float(p.q, q0 + c, p.q_dtype) : 0.f;
  const int limit = p.block_table ? mla_causal_limit(p, seq.keys.positions, row.s) : seq.keys.positions;
  // the block's last key: the largest limit of its rows (limits grow with the row)
  int kend = seq.keys.positions;
  if (p.block_table) {
    const int r_last = imin(blockIdx.y * kPortRows + kPortRows, rows) - 1;
    kend = mla_causal_limit(p, seq.keys.positions, mla_row(p, seq, hkv, r_last).s);
  }
  float acc[kPortMaxV / 32];
#pragma unroll
  for (int i = 0; i < kPortMaxV / 32; ++i) acc[i] = 0.f;
  float m = -INFINITY, l = 0.f;
  const float sl = p.softmax_scale * kLog2e;
  for (int n0 = 0; n0 < kend; n0 += kPortKeys) {
    __syncthreads();  // the previous tile is consumed
    if (threadIdx.x < kPortKeys) {
      const int j = n0 + threadIdx.x;
      refs[threadIdx.x] = j < kend ? mla_key(p, seq.keys, j, hkv) : MlaTokenRef{};
      from_extra[threadIdx.x] = !p.block_table && j >= p.topk;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < kPortKeys * D; e += kPortThreads) {
      const int j = e / D, c = e % D;
      const MlaTokenRef t = refs[j];
      k_s[e] = t.data ? mla_key_channel(from_extra[j] ? p.extra : p.cache, t, c) : 0.f;  // masked keys: zeros
    }
    __syncthreads();
    float sc[kPortKeys];
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < kPortKeys; ++j) {
      float d = 0.f;
      for (int c = lane; c < D; c += 32) d = fmaf(q_s[warp * D + c], k_s[j * D + c], d);
      d = arch::warp_sum(d) * sl;
      if (!refs[j].data || n0 + j >= limit) d = -INFINITY;
      sc[j] = d;
      mx = fmaxf(mx, d);
    }
    const float m_new = fmaxf(m, mx);
    const float m_use = m_new == -INFINITY ? 0.f : m_new;
    const float corr = exp2f(m - m_use);
    m = m_new;
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < kPortKeys; ++j) {
      sc[j] = exp2f(sc[j] - m_use);
      sum += sc[j];
    }
    l = l * corr + sum;
#pragma unroll
    for (int i = 0; i < kPortMaxV / 32; ++i) {
      const int c = lane + 32 * i;
      if (c < Dv) {
        float a = acc[i] * corr;
#pragma unroll
        for (int j = 0; j < kPortKeys; ++j) a = fmaf(sc[j], k_s[j * D + c], a);
        acc[i] = a;
      }
    }
  }
  if (!row_ok) return;
  const MlaFinish f = mla_finish(p, row.h, m, l);
#pragma unroll
  for (int i = 0; i < kPortMaxV / 32; ++i) {
    const int c = lane + 32 * i;
    if (c < Dv) store_float(p.out, row.out + c, p.out_dtype, acc[i] * f.factor);
  }
  if (lane == 0) {
    p.lse[row.lse] = f.lse;
    if (p.max_logits) p.max_logits[row.max_logit] = f.max_logit;
  }
}

// Merges the partials of every split sequence: block (x, y) serves the sequence that part x
// continues (the first part that does), 8 rows per block, one warp per row.
__global__ void __launch_bounds__(256) mla_combine_kernel(MlaParams p, MlaSplitRun run) {
  const int part = blockIdx.x;
  const int32_t* row = run.meta + part * kMlaMetadataCols;
  const int sq = row[0];
  if (sq >= run.seqs || row[1] == 0 || part == 0) return;  // part does not continue a sequence
  const int32_t* prev = row - kMlaMetadataCols;
  if (prev[0] == sq && prev[1] > 0) return;  // an earlier part continues it and merges it
  const MlaSeq seq = mla_seq(p, sq);
  const int rows_all = seq.dense_rows * p.heads_q;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int ra = blockIdx.y * 8 + warp;
  if (ra >= rows_all) return;
  // the row's kv head and its row index within that head's rows
  const int s = seq.dense_rows > 1 ? ra / p.heads_q : 0, h = ra % p.heads_q;
  const int G = p.heads_q / p.heads_kv;
  const MlaRow r = mla_row(p, seq, h / G, s * G + h % G);
  // pieces: part - 1 (sq was its last sequence, or its only one) and the parts that continue sq
  int last = part;
  while (last + 1 < run.parts && run.meta[(last + 1) * kMlaMetadataCols] == sq &&
         run.meta[(last + 1) * kMlaMetadataCols + 1] > 0)
    ++last;
  const int n = last - part + 2;
  auto piece_row = [&](int i) {  // partial row of piece i (part - 1 + i)
    const int q = part - 1 + i;
    return mla_partial_row(p, seq, r, 2 * q + (run.meta[q * kMlaMetadataCols] == sq ? 0 : 1));
  };
  // lanes over pieces for the maxima and the sum, then over channels for the weighted sum
  float mx = -INFINITY, ml = -INFINITY;
  for (int i = lane; i < n; i += 32) {
    const int64_t pr = piece_row(i);
    mx = fmaxf(mx, run.lse[pr]);
    ml = fmaxf(ml, run.max_logit[pr]);
  }
  mx = arch::warp_max(mx);
  ml = arch::warp_max(ml);
  if (mx == -INFINITY) {  // no key in any piece: out 0, lse +inf
    for (int c = lane; c < p.head_dim_v; c += 32) store_float(p.out, r.out + c, p.out_dtype, 0.f);
    if (lane == 0) {
      p.lse[r.lse] = INFINITY;
      if (p.max_logits) p.max_logits[r.max_logit] = -INFINITY;
    }
    return;
  }
  float sum = 0.f;
  for (int i = lane; i < n; i += 32) sum += expf(run.lse[piece_row(i)] - mx);
  const float lse = mx + logf(arch::warp_sum(sum));
  __shared__ float weight[8][32];
  __shared__ int64_t rows[8][32];
  constexpr int kPerLane = 512 / 32;  // the fast path's head_dim_v <= 512
  float acc[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) acc[j] = 0.f;
  for (int base = 0; base < n; base += 32) {
    const int i = base + lane;
    const int64_t pr = i < n ? piece_row(i) : 0;
    weight[warp][lane] = i < n ? expf(run.lse[pr] - lse) : 0.f;  // 0 for an empty piece (lse -inf)
    rows[warp][lane] = pr;
    __syncwarp();
    for (int k = 0; k < 32 && base + k < n; ++k) {
      const float w = weight[warp][k];
      if (w > 0.f) {
        const float* src = run.out + rows[warp][k] * p.head_dim_v;
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) {
          const int c = lane + 32 * j;
          if (c < p.head_dim_v) acc[j] = fmaf(w, src[c], acc[j]);
        }
      }
    }
    __syncwarp();
  }
  float factor = 1.f;
  if (p.attn_sink) factor /= 1.f + expf(p.attn_sink[r.h] - lse);
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int c = lane + 32 * j;
    if (c < p.head_dim_v) store_float(p.out, r.out + c, p.out_dtype, acc[j] * factor);
  }
  if (lane == 0) {
    p.lse[r.lse] = lse;
    if (p.max_logits) p.max_logits[r.max_logit] = ml;
  }
}

#if defined(MATE_HAS_MMA_SYNC)

// ---- fast kernel: mma.sync --------------------------------------------------------------
// How key tiles arrive: bf16/fp16 rows copied as they are, or FP8 tokens staged raw and
// dequantized to bf16 in shared memory.
enum MlaTileFormat : int { kTilePlain = 0, kTileV32 = 1, kTileModel1 = 2 };

template <typename T_, int kD_, int kRowWarps_, int kColWarps_, int kFormat_>
struct MlaMmaConfig {
  using T = T_;
  static constexpr int kD = kD_;                // head dim of q and k: 576 or 512
  static constexpr int kRowWarps = kRowWarps_;  // 16-row groups
  static constexpr int kColWarps = kColWarps_;  // warps sharing a row group (k-slices / V columns)
  static constexpr int kFormat = kFormat_;
  static constexpr bool kFp8 = kFormat != kTilePlain;
  static constexpr int kWarps = kRowWarps * kColWarps;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRows = 16 * kRowWarps;
  static constexpr int kKeys = 32;              // keys per tile
  static constexpr int kDv = 512;               // V channels computed (head_dim_v <= 512 stored)
  static constexpr int kChunks = kD / 8;        // 16-byte chunks per bf16 row
  static constexpr int kKSteps = kD / 16 / kColWarps;  // k steps of Q K^T per warp
  static constexpr int kVTiles = kDv / 8 / kColWarps;  // 8-channel tiles of O per warp
  static constexpr int kNTiles = kKeys / 8;
  static constexpr int kKeysPerWarp = kKeys / kWarps;
  // FP8 staging: V3.2 tokens are 656 bytes (41 chunks); MODEL1 576 data bytes + 8 scale
  // bytes, staged at a 592-byte stride (16-byte aligned rows)
  static constexpr int kRawStride = kFormat == kTileV32 ? 656 : 592;
  static constexpr int kTokenChunks = kFormat == kTileV32 ? 41 : kFormat == kTileModel1 ? 37 : kChunks;
  // Plain tiles double-buffer the key tile (tile t + 1 lands while t computes); FP8 tiles
  // double-buffer through the raw staging buffer and dequantize into a single key tile.
  static constexpr int kStages = kFp8 ? 1 : 2;
  static constexpr int kQBytes = kRows * kD * 2, kTileBytes = kKeys * kD * 2;
  static constexpr int kRawBytes = kFp8 ? kKeys * kRawStride : 0;
  static constexpr int kScoreBytes = kColWarps > 1 ? kWarps * 16 * kKeys * 4 : 0;
  static constexpr int kSmemBytes = kQBytes + kStages * kTileBytes + kRawBytes + kScoreBytes + 3 * kKeys;
  // two 4-warp blocks fit an SM (shared memory and registers) when the block is small
  static constexpr int kBlocksPerSm = (kWarps <= 4 && 2 * (kSmemBytes + 1024) <= 228 * 1024) ? 2 : 1;
  static_assert((kD / 16) % kColWarps == 0 && (kDv / 8) % (2 * kColWarps) == 0, "warps must split evenly");
  static_assert(kKeys % kWarps == 0 && kKeysPerWarp <= 32, "each warp loads whole keys");
};

template <int kD>
__device__ __forceinline__ int swz(int r, int c) {
  return r * kD + ((c ^ (r & 7)) << 3);
}

// Key tiles move in three steps, spread over the loop so no warp waits on an address:
// resolve_key (two tiles ahead: the page-table or index load is issued, its result used
// later), publish_key (one tile's worth of addresses and mask flags into shared memory, plus
// an L2 prefetch of the token), issue_key_copies (cp.async of a published tile, one tile
// ahead). Lane i < kKeysPerWarp of warp w owns key w * kKeysPerWarp + i of a tile.
template <class C>
__device__ __forceinline__ MlaTokenRef resolve_key(const MlaParams& p, const MlaKeys& keys, int hkv, int n0, int kend) {
  const int lane = threadIdx.x % 32, j = n0 + (threadIdx.x / 32) * C::kKeysPerWarp + lane;
  MlaTokenRef r;
  if (lane < C::kKeysPerWarp && j < kend) r = mla_key(p, keys, j, hkv);
  return r;
}

template <class C>
__device__ __forceinline__ void publish_key(const MlaTokenRef& r, MlaTokenRef* refs, uint8_t* ok) {
  const int lane = threadIdx.x % 32, key = (threadIdx.x / 32) * C::kKeysPerWarp + lane;
  if (lane >= C::kKeysPerWarp) return;
  refs[key] = r;
  ok[key] = r.data != nullptr;
  if (r.data) {
    constexpr int kBytes = C::kFormat == kTileV32 ? kMlaV32TokenBytes
                           : C::kFormat == kTileModel1 ? kMlaModel1DataBytes : C::kD * 2;
#pragma unroll
    for (int off = 0; off < kBytes + 127; off += 128) arch::prefetch_l2(r.data + imin(off, kBytes - 1));
    if (C::kFormat == kTileModel1) arch::prefetch_l2(r.scales);
  }
}

// cp.async of the warp's keys of a published tile: bytes as they are into the swizzled key
// tile, or raw FP8 tokens into the staging buffer; masked keys become zero bytes.
template <class C>
__device__ __forceinline__ void issue_key_copies(const MlaParams& p, const MlaTokenRef* refs, typename C::T* tile,
                                                 uint8_t* raw) {
  const int lane = threadIdx.x % 32, k0 = (threadIdx.x / 32) * C::kKeysPerWarp;
  __syncwarp();  // the warp's own refs are published
  const uint8_t* dummy = p.cache.base;  // a mapped address for zero-fill copies
  for (int idx = lane; idx < C::kKeysPerWarp * C::kTokenChunks; idx += 32) {
    const int key = k0 + idx / C::kTokenChunks, c = idx % C::kTokenChunks;
    const MlaTokenRef r = refs[key];
    const bool valid = r.data != nullptr;
    if constexpr (C::kFormat == kTileV32) {
      arch::cp_async_16(raw + key * C::kRawStride + c * 16, valid ? r.data + c * 16 : dummy, valid);
    } else if constexpr (C::kFormat == kTileModel1) {
      if (c < C::kTokenChunks - 1)
        arch::cp_async_16(raw + key * C::kRawStride + c * 16, valid ? r.data + c * 16 : dummy, valid);
      else
        arch::cp_async_8(raw + key * C::kRawStride + kMlaModel1DataBytes, valid ? r.scales : dummy, valid);
    } else {
      arch::cp_async_16(tile + swz<C::kD>(key, c), valid ? r.data + c * 16 : dummy, valid);
    }
  }
}

// Dequantizes a staged FP8 tile into bf16 rows of the key tile (masked keys are zero bytes,
// hence zeros: a zero scale times zero values).
template <class C>
__device__ __forceinline__ void dequant_key_tile(const uint8_t* raw, arch::bf16* tile) {
  constexpr bool v32 = C::kFormat == kTileV32;
  constexpr int latent = v32 ? 512 : 448, rope = v32 ? 528 : 448;
  for (int idx = threadIdx.x; idx < C::kKeys * C::kChunks; idx += C::kThreads) {
    const int key = idx / C::kChunks, c = idx % C::kChunks;
    const uint8_t* tok = raw + key * C::kRawStride;
    uint4 outv;
    if (c * 8 < latent) {
      float scale;
      if constexpr (v32) {
        scale = *reinterpret_cast<const float*>(tok + 512 + 4 * (c / 16));
      } else {
        scale = ldexpf(1.f, static_cast<int>(tok[kMlaModel1DataBytes + c / 8]) - 127);
      }
      const uint2 q8 = *reinterpret_cast<const uint2*>(tok + c * 8);
      uint32_t w[4];
      const uint32_t src[2] = {q8.x, q8.y};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float2 f = arch::e4m3x2_to_float2(static_cast<uint16_t>(src[k / 2] >> (16 * (k % 2))));
        w[k] = arch::pack2<arch::bf16>(f.x * scale, f.y * scale);
      }
      outv = make_uint4(w[0], w[1], w[2], w[3]);
    } else {
      outv = *reinterpret_cast<const uint4*>(tok + rope + (c * 8 - latent) * 2);  // bf16 rope, as is
    }
    *reinterpret_cast<uint4*>(tile + swz<C::kD>(key, c)) = outv;
  }
}

template <class C>
__global__ void __launch_bounds__(C::kThreads, C::kBlocksPerSm) mla_mma_kernel(MlaParams p, MlaSplitRun run) {
  using T = typename C::T;
  constexpr int kD = C::kD;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ MlaTokenRef refs[3][C::kKeys];  // tile t's addresses in refs[t % 3]
  T* q_s = reinterpret_cast<T*>(smem_raw);
  T* k_s = reinterpret_cast<T*>(smem_raw + C::kQBytes);  // kStages tiles
  uint8_t* raw_s = smem_raw + C::kQBytes + C::kStages * C::kTileBytes;
  float* s_x = reinterpret_cast<float*>(raw_s + C::kRawBytes);  // partial scores, per warp
  uint8_t* ok_s = reinterpret_cast<uint8_t*>(s_x) + C::kScoreBytes;  // key flags of tile t at t % 3

  const int part = blockIdx.x, hkv = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int rw = warp / C::kColWarps, cw = warp % C::kColWarps;
  const int r_base = blockIdx.y * C::kRows;
  if (r_base >= run.rows) return;
  const int32_t* sched = run.meta + part * kMlaMetadataCols;
  const int b0 = sched[0], k0 = sched[1], b1 = sched[2], k1 = sched[3];
  MlaMetadataParams blocks_of;  // mla_key_blocks' view of the sequences
  blocks_of.cache_seqlens = p.cache_seqlens;
  blocks_of.fixed_keys = p.block_table ? -1 : p.topk + p.extra_topk;
  const bool dense = p.block_table != nullptr;
  const float sl = p.softmax_scale * kLog2e;

  for (int sq = b0; sq < run.seqs && (sq < b1 || (sq == b1 && k1 > 0)); ++sq) {
    const int nblocks = static_cast<int>(mla_key_blocks(blocks_of, sq));
    const int blk_lo = sq == b0 ? k0 : 0, blk_hi = sq == b1 ? k1 : nblocks;
    const bool whole = blk_lo == 0 && blk_hi == nblocks;
    const MlaSeq seq = mla_seq(p, sq);
    // keys of this piece; for dense causal rows, up to the largest limit of the block's rows
    const int kbeg = blk_lo * kMlaBlockTokens;
    int kend = imin(blk_hi * kMlaBlockTokens, seq.keys.positions);
    const int r_last = imin(r_base + C::kRows, run.rows) - 1;
    if (dense) kend = imin(kend, mla_causal_limit(p, seq.keys.positions, mla_row(p, seq, hkv, r_last).s));
    // dense: this thread's rows see keys below limit[hf] (causal and the piece's end);
    // sparse: the per-key flags of the tile decide
    int limit[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int r = imin(r_base + rw * 16 + hf * 8 + g, run.rows - 1);
      limit[hf] = dense ? imin(kend, mla_causal_limit(p, seq.keys.positions, mla_row(p, seq, hkv, r).s)) : kend;
    }
    const int ntiles = kend > kbeg ? ceil_div_pos(kend - kbeg, C::kKeys) : 0;

    // the sequence's index lists (or page-table row) into L2: the key lookups of every tile read them
    if (ntiles > 0) {
      const int32_t* list = dense ? p.block_table + seq.keys.b * p.block_table_stride + kbeg / p.cache.page_size
                                  : seq.keys.main + kbeg;
      const int count = dense ? (kend - 1) / p.cache.page_size - kbeg / p.cache.page_size + 1
                              : imax(0, imin(kend, p.topk) - kbeg);
      for (int i = threadIdx.x * 32; i < count; i += C::kThreads * 32) arch::prefetch_l2(list + i);
    }
    __syncthreads();  // the previous sequence is done with every buffer
    if (ntiles > 0) {
      const T* qbase = static_cast<const T*>(p.q);
      for (int idx = threadIdx.x; idx < C::kRows * C::kChunks; idx += C::kThreads) {
        const int rr = idx / C::kChunks, c = idx % C::kChunks, r = r_base + rr;
        const bool valid = r < run.rows;
        const T* src = qbase;
        if (valid) {
          const MlaRow row = mla_row(p, seq, hkv, r);
          src = qbase + seq.keys.b * p.q_batch_stride + row.s * p.q_row_stride + row.h * p.q_head_stride + c * 8;
        }
        arch::cp_async_16(q_s + swz<kD>(rr, c), src, valid);
      }
      publish_key<C>(resolve_key<C>(p, seq.keys, hkv, kbeg, kend), refs[0], ok_s);
      publish_key<C>(resolve_key<C>(p, seq.keys, hkv, kbeg + C::kKeys, kend), refs[1], ok_s + C::kKeys);
      issue_key_copies<C>(p, refs[0], k_s, raw_s);
      arch::cp_async_commit();
    }

    float o[C::kVTiles][4];
#pragma unroll
    for (int vt = 0; vt < C::kVTiles; ++vt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[vt][e] = 0.f;
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};  // base-2 logits

    for (int it = 0; it < ntiles; ++it) {
      const int n0 = kbeg + it * C::kKeys, stage = it % 2;
      T* tile = k_s + (C::kStages == 2 ? stage : 0) * (C::kKeys * kD);
      const uint8_t* ok = ok_s + (it % 3) * C::kKeys;
      arch::cp_async_wait<0>();
      __syncthreads();  // tile it landed; every warp is done with tile it - 1
      if constexpr (C::kFp8) {
        dequant_key_tile<C>(raw_s, reinterpret_cast<arch::bf16*>(tile));
        __syncthreads();  // the staging buffer is free; the tile is ready
      }
      if (it + 1 < ntiles) {
        T* next = k_s + (C::kStages == 2 ? 1 - stage : 0) * (C::kKeys * kD);
        issue_key_copies<C>(p, refs[(it + 1) % 3], next, raw_s);
        arch::cp_async_commit();
      }
      // tile it + 2's addresses: loads issued now, published after Q K^T
      const MlaTokenRef ahead = resolve_key<C>(p, seq.keys, hkv, n0 + 2 * C::kKeys, kend);

      // partial S over this warp's k-slice
      float sacc[C::kNTiles][4];
#pragma unroll
      for (int nt = 0; nt < C::kNTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) sacc[nt][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < C::kKSteps; ++kk) {
        const int ks = cw * C::kKSteps + kk;
        uint32_t a[4];
        arch::ldmatrix_x4(a, q_s + swz<kD>(rw * 16 + lane % 16, 2 * ks + lane / 16));
#pragma unroll
        for (int np = 0; np < C::kNTiles / 2; ++np) {
          uint32_t kb[4];
          arch::ldmatrix_x4(kb, tile + swz<kD>(np * 16 + lane % 8 + (lane / 16) * 8, 2 * ks + (lane / 8) % 2));
          arch::mma_16x8x16<T>(sacc[2 * np], a, kb[0], kb[1]);
          arch::mma_16x8x16<T>(sacc[2 * np + 1], a, kb[2], kb[3]);
        }
      }
      if (it + 2 < ntiles) publish_key<C>(ahead, refs[(it + 2) % 3], ok_s + ((it + 2) % 3) * C::kKeys);
      if constexpr (C::kColWarps > 1) {
        // partial scores as [warp][n tile][lane] float4s: consecutive lanes, no bank conflicts
#pragma unroll
        for (int nt = 0; nt < C::kNTiles; ++nt)
          *reinterpret_cast<float4*>(s_x + ((warp * C::kNTiles + nt) * 32 + lane) * 4) =
              make_float4(sacc[nt][0], sacc[nt][1], sacc[nt][2], sacc[nt][3]);
        __syncthreads();
        // the same order in every warp of the row group: bitwise equal scores
#pragma unroll
        for (int nt = 0; nt < C::kNTiles; ++nt) {
          float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
          for (int w = 0; w < C::kColWarps; ++w) {
            const float4 x = *reinterpret_cast<const float4*>(
                s_x + (((rw * C::kColWarps + w) * C::kNTiles + nt) * 32 + lane) * 4);
            sum.x += x.x;
            sum.y += x.y;
            sum.z += x.z;
            sum.w += x.w;
          }
          sacc[nt][0] = sum.x;
          sacc[nt][1] = sum.y;
          sacc[nt][2] = sum.z;
          sacc[nt][3] = sum.w;
        }
      }

      // masks: dense tiles below every row's limit need none (the common case)
      const bool full = dense && arch::warp_all(n0 + C::kKeys <= imin(limit[0], limit[1]));
      if (!full) {
#pragma unroll
        for (int nt = 0; nt < C::kNTiles; ++nt) {
          const uint16_t pair_ok = *reinterpret_cast<const uint16_t*>(ok + nt * 8 + 2 * t);  // keys jr, jr + 1
#pragma unroll
          for (int hf = 0; hf < 2; ++hf)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int jr = nt * 8 + 2 * t + e;
              const bool key_ok = dense ? n0 + jr < limit[hf] : ((pair_ok >> (8 * e)) & 0xff) != 0;
              if (!key_ok) sacc[nt][2 * hf + e] = -INFINITY;
            }
        }
      }
      // online softmax (base 2); a row's values live in one lane quad
      float corr[2];
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < C::kNTiles; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float x = sacc[nt][2 * hf + e] * sl;
            sacc[nt][2 * hf + e] = x;
            mx = fmaxf(mx, x);
          }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(row_max[hf], mx);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        corr[hf] = arch::fast_exp2(row_max[hf] - m_use);
        row_max[hf] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < C::kNTiles; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float pe = arch::fast_exp2(sacc[nt][2 * hf + e] - m_use);
            sacc[nt][2 * hf + e] = pe;
            sum += pe;
          }
        row_sum[hf] = row_sum[hf] * corr[hf] + sum;
      }
      // rescale O only when some row's maximum moved (rare once the first tiles are in)
      if (arch::warp_any(corr[0] != 1.f || corr[1] != 1.f)) {
#pragma unroll
        for (int vt = 0; vt < C::kVTiles; ++vt) {
          o[vt][0] *= corr[0];
          o[vt][1] *= corr[0];
          o[vt][2] *= corr[1];
          o[vt][3] *= corr[1];
        }
      }

      // O += P V over this warp's 512 / kColWarps channels; V = the tile's first 512 channels
#pragma unroll
      for (int pk = 0; pk < C::kKeys / 16; ++pk) {
        uint32_t a[4];
        arch::acc_to_a<T>(sacc[2 * pk], sacc[2 * pk + 1], a);
#pragma unroll
        for (int dp = 0; dp < C::kVTiles / 2; ++dp) {
          const int chunk = cw * C::kVTiles + 2 * dp;  // first 8-channel chunk of the pair
          uint32_t vb[4];
          arch::ldmatrix_x4_trans(vb, tile + swz<kD>(pk * 16 + lane % 8 + ((lane / 8) % 2) * 8, chunk + lane / 16));
          arch::mma_16x8x16<T>(o[2 * dp], a, vb[0], vb[1]);
          arch::mma_16x8x16<T>(o[2 * dp + 1], a, vb[2], vb[3]);
        }
      }
    }

    // epilogue: whole pieces finish in place, split pieces write fp32 partials
    const int slot = 2 * part + (sq == b0 ? 0 : 1);
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float l = row_sum[hf];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int r = r_base + rw * 16 + hf * 8 + g;
      if (r >= run.rows) continue;
      const MlaRow row = mla_row(p, seq, hkv, r);
      const int c0 = cw * (C::kVTiles * 8) + 2 * t;
      if (whole) {
        const MlaFinish f = mla_finish(p, row.h, row_max[hf], l);
#pragma unroll
        for (int vt = 0; vt < C::kVTiles; ++vt) {
          const int c = c0 + vt * 8;
          if (c < p.head_dim_v) {  // head_dim_v is even here
            *reinterpret_cast<uint32_t*>(static_cast<T*>(p.out) + row.out + c) =
                arch::pack2<T>(o[vt][2 * hf] * f.factor, o[vt][2 * hf + 1] * f.factor);
          }
        }
        if (cw == 0 && t == 0) {
          p.lse[row.lse] = f.lse;
          if (p.max_logits) p.max_logits[row.max_logit] = f.max_logit;
        }
      } else {
        const bool has = l > 0.f || l != l;
        const float factor = has ? 1.f / l : 0.f;
        const int64_t pr = mla_partial_row(p, seq, row, slot);
#pragma unroll
        for (int vt = 0; vt < C::kVTiles; ++vt) {
          const int c = c0 + vt * 8;
          if (c < p.head_dim_v)
            *reinterpret_cast<float2*>(run.out + pr * p.head_dim_v + c) =
                make_float2(o[vt][2 * hf] * factor, o[vt][2 * hf + 1] * factor);
        }
        if (cw == 0 && t == 0) {
          run.lse[pr] = has ? row_max[hf] * kMlaLn2 + logf(l) : -INFINITY;
          run.max_logit[pr] = has ? row_max[hf] * kMlaLn2 : -INFINITY;
        }
      }
    }
  }
}

template <class C>
arch::Error launch_mma_config(const MlaParams& p, const MlaSplitRun& run, arch::Stream stream) {
  static std::atomic<uint64_t> configured{0};  // the smem attribute, once per device
  const int dev = arch::current_device();
  const uint64_t bit = dev < 64 ? uint64_t{1} << dev : 0;
  if (!(configured.load(std::memory_order_relaxed) & bit)) {
    const arch::Error e = arch::set_max_dynamic_smem(mla_mma_kernel<C>, C::kSmemBytes);
    if (e != arch::kSuccess) return e;
    configured.fetch_or(bit, std::memory_order_relaxed);
  }
  const dim3 grid(run.parts, ceil_div_pos(run.rows, C::kRows), p.heads_kv);
  mla_mma_kernel<C><<<grid, C::kThreads, C::kSmemBytes, stream>>>(p, run);
  return arch::last_error();
}

// The block shape for `rows` query rows per sequence: 16 rows = 1 x 4 warps, 32 = 2 x 4,
// more = 4 x 2 (64 rows).
template <typename T, int kD, int kFormat, class Fn>
auto with_config(int rows, Fn&& fn) {
  if (rows <= 16) return fn(MlaMmaConfig<T, kD, 1, 4, kFormat>{});
  if (rows <= 32) return fn(MlaMmaConfig<T, kD, 2, 4, kFormat>{});
  return fn(MlaMmaConfig<T, kD, 4, 2, kFormat>{});
}

// Calls fn with the config instance that serves p.
template <class Fn>
auto with_mla_config(const MlaParams& p, int rows, Fn&& fn) {
  const bool bf = p.q_dtype == DType::kBFloat16;
  if (p.head_dim == 576) {
    if (p.cache.format == MlaCacheFormat::kFp8V32) return with_config<arch::bf16, 576, kTileV32>(rows, fn);
    return bf ? with_config<arch::bf16, 576, kTilePlain>(rows, fn) : with_config<arch::f16, 576, kTilePlain>(rows, fn);
  }
  if (p.cache.format == MlaCacheFormat::kFp8Model1) return with_config<arch::bf16, 512, kTileModel1>(rows, fn);
  return bf ? with_config<arch::bf16, 512, kTilePlain>(rows, fn) : with_config<arch::f16, 512, kTilePlain>(rows, fn);
}

#endif  // MATE_HAS_MMA_SYNC

bool aligned16(const void* ptr, int64_t a = 0, int64_t b = 0, int64_t c = 0) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && a % 16 == 0 && b % 16 == 0 && c % 16 == 0;
}

bool cache_fits_mma(const MlaCache& c) {
  // MODEL1 tokens sit at 576-byte steps inside a block (the view's 584-byte stride is nominal)
  if (c.format == MlaCacheFormat::kFp8Model1) return aligned16(c.base, c.block_stride);
  return aligned16(c.base, c.block_stride, c.token_stride, c.head_stride);
}

}  // namespace

int mla_rows_per_sequence(const MlaParams& p) {
  const int G = p.heads_q / p.heads_kv;
  return p.block_table ? p.seqlen_q * G : G;
}

int mla_sequences(const MlaParams& p) { return p.block_table ? p.batch : p.batch * p.seqlen_q; }

#if !defined(MATE_WITH_SM90)  // a build without the CUTLASS headers has no Hopper MLA kernel
bool mla_sm90_fits(const MlaParams&) { return false; }
arch::Error launch_mla_sm90(const MlaParams&, const MlaSplitRun&, arch::Stream) { return arch::kSuccess; }
int mla_sm90_blocks_per_part(const MlaParams&) { return 1; }
#endif

namespace {
// Dense bf16 decode takes the Hopper kernel (arch/sm90/mla_decode_sm90.cu: TMA + wgmma) on a
// compute capability 9.0 device for the calls mla_sm90_fits accepts that fill its 64-row
// blocks (query rows per kv head, Sq * Hq / Hkv >= 64: the compute-bound calls, where it is
// 2x the mma.sync kernel on the H200; with fewer rows both stream the cache and the mma.sync
// kernel was 5 % faster). MATE_OPS_MLA_PATH=sm90 sends every call it serves there (its tests),
// =sm80 none. Read once per process.
enum class MlaRoute { kAuto, kAlways, kNever };
MlaRoute mla_sm90_route() {
  static const MlaRoute route = [] {
    const char* v = std::getenv("MATE_OPS_MLA_PATH");
    if (v != nullptr && std::strcmp(v, "sm90") == 0) return MlaRoute::kAlways;
    if (v != nullptr && std::strcmp(v, "sm80") == 0) return MlaRoute::kNever;
    return MlaRoute::kAuto;
  }();
  return route;
}
}  // namespace

bool mla_sm90_takes(const MlaParams& p) {
  const MlaRoute route = mla_sm90_route();
  if (route == MlaRoute::kNever || (route == MlaRoute::kAuto && mla_rows_per_sequence(p) < 64)) return false;
  return mla_mma_fits(p) && arch::compute_capability() == 90 && mla_sm90_fits(p);
}

int mla_fast_parts(const MlaParams& p, int multiprocessors) {
  // the Hopper kernel: one 384-thread block per SM (its shared memory), blocks_per_part of them
  // per schedule part
  if (mla_sm90_takes(p)) return imax(1, multiprocessors / imax(1, mla_sm90_blocks_per_part(p)));
#if defined(MATE_HAS_MMA_SYNC)
  const int rows = mla_rows_per_sequence(p);
  return with_mla_config(p, rows, [&](auto c) {
    using C = decltype(c);
    const int blocks_per_part = ceil_div_pos(rows, C::kRows) * p.heads_kv;
    return imax(1, multiprocessors * C::kBlocksPerSm / blocks_per_part);
  });
#else
  (void)p;
  return multiprocessors;
#endif
}

bool mla_mma_fits(const MlaParams& p) {
#if defined(MATE_HAS_MMA_SYNC)
  const bool fp8 = p.cache.format == MlaCacheFormat::kFp8V32 || p.cache.format == MlaCacheFormat::kFp8Model1;
  const bool dtype_ok = fp8 ? p.q_dtype == DType::kBFloat16
                            : (p.q_dtype == DType::kBFloat16 && p.cache.format == MlaCacheFormat::kBFloat16) ||
                                  (p.q_dtype == DType::kFloat16 && p.cache.format == MlaCacheFormat::kFloat16);
  const int64_t es = 2;
  return dtype_ok && (p.head_dim == 576 || p.head_dim == 512) && p.head_dim_v <= 512 && p.head_dim_v % 2 == 0 &&
         aligned16(p.q, p.q_batch_stride * es, p.q_row_stride * es, p.q_head_stride * es) &&
         reinterpret_cast<uintptr_t>(p.out) % 4 == 0 && cache_fits_mma(p.cache) &&
         (!p.extra_indices || cache_fits_mma(p.extra));
#else
  (void)p;
  return false;
#endif
}

arch::Error launch_mla_schedule(const MlaMetadataParams& m, arch::Stream stream) {
  if (m.fixed_keys >= 0 || m.batch <= kScheduleMaxSeqs) {
    const int smem = m.fixed_keys >= 0 ? 0 : (m.batch + 1) * static_cast<int>(sizeof(int64_t));
    mla_schedule_parallel_kernel<<<1, kScheduleThreads, smem, stream>>>(m);
  } else {
    mla_schedule_kernel<<<1, 1, 0, stream>>>(m);
  }
  return arch::last_error();
}

arch::Error launch_mla_portable(const MlaParams& p, arch::Stream stream) {
  const int rows = mla_rows_per_sequence(p);
  const int smem = (kPortRows + kPortKeys) * p.head_dim * static_cast<int>(sizeof(float));
  static std::atomic<uint64_t> configured{0};
  const int dev = arch::current_device();
  const uint64_t bit = dev < 64 ? uint64_t{1} << dev : 0;
  if (!(configured.load(std::memory_order_relaxed) & bit)) {  // up to D = 1024: 80 KB
    const arch::Error e = arch::set_max_dynamic_smem(mla_portable_kernel, (kPortRows + kPortKeys) * 1024 * 4);
    if (e != arch::kSuccess) return e;
    configured.fetch_or(bit, std::memory_order_relaxed);
  }
  const dim3 grid(mla_sequences(p), ceil_div_pos(rows, kPortRows), p.heads_kv);
  mla_portable_kernel<<<grid, kPortThreads, smem, stream>>>(p, rows);
  return arch::last_error();
}

arch::Error launch_mla_fast(const MlaParams& p, const MlaSplitBuffers& split, arch::Stream stream) {
  MlaSplitRun run;
  run.meta = split.metadata;
  run.parts = split.parts;
  run.seqs = mla_sequences(p);
  run.rows = mla_rows_per_sequence(p);
  run.out = split.out;
  run.lse = split.lse;
  run.max_logit = split.max_logit;
#if defined(MATE_HAS_MMA_SYNC)
  // mla_fast_parts sized the schedule for the same kernel (mla_sm90_takes answers the same for p)
  const arch::Error e =
      mla_sm90_takes(p)
          ? launch_mla_sm90(p, run, stream)
          : with_mla_config(p, run.rows, [&](auto c) { return launch_mma_config<decltype(c)>(p, run, stream); });
  if (e != arch::kSuccess) return e;
  const int rows_all = (p.block_table ? p.seqlen_q : 1) * p.heads_q;
  mla_combine_kernel<<<dim3(run.parts, ceil_div_pos(rows_all, 8)), 256, 0, stream>>>(p, run);
  return arch::last_error();
#else
  (void)run;
  return launch_mla_portable(p, stream);
#endif
}

}  // namespace mate::device
