// Device kernels of the FMHA family, written once for CUDA and MUSA (vendor specifics in
// arch/device.h). Torch-free: they read the parameter structs of csrc/common and share its
// mask / split / merge / dtype math with the CPU reference, so both compute SEMANTICS §1-2
// the same way.
//
// These are the portable kernels: every dtype and head dim (fmha_row_kernel), a CUDA-core
// decode kernel (fp32 / fp8 / other head dims), the split merge and combine. bf16/fp16 with
// D = Dv in {64, 128, 256} take the tensor-core kernel of arch/sm80/fmha_mma.cu instead.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "../common/dtype_convert.h"
#include "../common/fmha_math.h"
#include "../common/fmha_score.h"
#include "../common/scheduler.h"
#include "arch/sm90/fp8_pv_order.h"
#include "kernels.h"

namespace mate::device {
namespace {

constexpr int kThreads = 128;
// The tiles below assume 32-lane warps (64-key rows = 2 keys per lane, 16 rows per warp).
static_assert(arch::kWarpSize == 32, "fmha kernels are written for 32-lane warps");
constexpr int kMaxChannelsPerThread = (512 + kThreads - 1) / kThreads;  // Dv <= 512


__device__ __forceinline__ float descale(const float* d, int64_t sb, int64_t sh, int b, int hk) {
  return d ? d[b * sb + hk * sh] : 1.f;
}

__device__ void write_final(const FmhaParams& p, const SeqInfo& s, int b, int i, int h, const float* acc, float lse,
                            float inv) {
  const int64_t row = s.q_row0 + i;
  const int64_t o = b * p.out_batch_stride + row * p.out_row_stride + h * p.out_head_stride;
  for (int k = 0; k < kMaxChannelsPerThread; ++k) {
    const int c = threadIdx.x + k * kThreads;
    if (c < p.head_dim_v) store_float(p.out, o + c, p.out_dtype, acc[k] * inv);
  }
  if (threadIdx.x == 0) p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + row * p.lse_row_stride] = lse;
}

__global__ void __launch_bounds__(kThreads) fmha_row_kernel(FmhaParams p, FmhaSplitBuffers parts) {
  __shared__ float q_s[512], qv_s[512], p_s[kThreads], red[kThreads / arch::kWarpSize];
  const int i = blockIdx.x, h = blockIdx.y;
  const int n = parts.num_splits;
  const int b = blockIdx.z / n, split = blockIdx.z % n;
  const SeqInfo s = seq_info(p, b);
  if (i >= s.q_len_full) return;
  const int G = p.num_heads / p.num_heads_k, hk = h / G;
  float acc[kMaxChannelsPerThread] = {};
  if (i >= s.q_len) {  // padded row: out 0, lse -inf, written once
    if (split == 0) write_final(p, s, b, i, h, acc, -INFINITY, 0.f);
    return;
  }
  // this sequence's splits: capped by its key blocks and by the scheduler metadata
  const int ns = sequence_splits(p, b, s.k_len, n);
  const int64_t grow = (static_cast<int64_t>(split) * p.total_q + global_row(p, s, b, i)) * p.num_heads + h;
  if (split >= ns) {  // an empty split: weighs nothing in the merge
    for (int k = 0; k < kMaxChannelsPerThread; ++k) {
      const int c = threadIdx.x + k * kThreads;
      if (c < p.head_dim_v) parts.out[grow * p.head_dim_v + c] = 0.f;
    }
    if (threadIdx.x == 0) parts.lse[grow] = -INFINITY;
    return;
  }

  const int D = p.head_dim, Dv = p.head_dim_v;
  const float qd = descale(p.q_descale, p.q_descale_batch_stride, p.q_descale_head_stride, b, hk);
  const float kd = descale(p.k_descale, p.k_descale_batch_stride, p.k_descale_head_stride, b, hk);
  const float vd = descale(p.v_descale, p.v_descale_batch_stride, p.v_descale_head_stride, b, hk);
  const int64_t qrow = s.q_row0 + i;
  for (int c = threadIdx.x; c < D; c += kThreads)
    q_s[c] = load_float(p.q, b * p.q_batch_stride + qrow * p.q_row_stride + h * p.q_head_stride + c, p.in_dtype) * qd;
  if (p.qv)
    for (int c = threadIdx.x; c < Dv; c += kThreads)
      qv_s[c] = load_float(p.qv, b * p.qv_batch_stride + qrow * p.qv_row_stride + h * p.qv_head_stride + c,
                           p.in_dtype) * qd;
  __syncthreads();

  int slo = 0, shi = s.k_len;
  if (ns > 1) split_key_range(s.k_len, kSplitKeyBlock, split, ns, slo, shi);
  const KeyInterval keys = key_range_for_row(p, s, i).clip(slo, shi);
  const ScoreMod mod = score_mod(p, s, b, h);

  float m = -INFINITY, l = 0.f;
  for (int c0 = keys.lo; c0 < keys.hi; c0 = next_tile(c0, kThreads, keys.hi)) {
    const int nk = imin(kThreads, keys.hi - c0);  // keys of this chunk
    float score = -INFINITY;
    if (static_cast<int>(threadIdx.x) < nk) {  // key c0 + threadIdx.x lies in the row's interval
      const int j = c0 + threadIdx.x;
      const int t = s.k_start + j;
      const int64_t ko = key_offset(p, s, t, p.k_batch_stride, p.k_row_stride) + hk * p.k_head_stride;
      float dot = 0.f;
      for (int d = 0; d < D; ++d) dot += q_s[d] * load_float(p.k, ko + d, p.in_dtype);
      dot *= kd;
      if (p.qv) {
        const int64_t vo = key_offset(p, s, t, p.v_batch_stride, p.v_row_stride) + hk * p.v_head_stride;
        float dv = 0.f;
        for (int d = 0; d < Dv; ++d) dv += qv_s[d] * load_float(p.v, vo + d, p.in_dtype);
        dot += dv * vd;
      }
      score = mod.logit(dot, i, j);
    }
    const float mc = arch::block_max<kThreads>(score, red);
    const float m_new = fmaxf(m, mc);
    const float corr = m == -INFINITY ? 0.f : expf(m - m_new);
    const float pj = score == -INFINITY ? 0.f : expf(score - m_new);
    p_s[threadIdx.x] = pj;
    l = l * corr + arch::block_sum<kThreads>(pj, red);  // also orders the p_s writes
    m = m_new;
    for (int k = 0; k < kMaxChannelsPerThread; ++k) acc[k] *= corr;
    for (int jj = 0; jj < nk; ++jj) {
      const float w = p_s[jj];
      if (w == 0.f) continue;
      const int64_t vo = key_offset(p, s, s.k_start + c0 + jj, p.v_batch_stride, p.v_row_stride) + hk * p.v_head_stride;
      for (int k = 0; k < kMaxChannelsPerThread; ++k) {
        const int c = threadIdx.x + k * kThreads;
        if (c < Dv) acc[k] += w * load_float(p.v, vo + c, p.in_dtype) * vd;
      }
    }
    __syncthreads();  // p_s is rewritten by the next chunk
  }

  float lse = -INFINITY, inv = 0.f;
  if (l > 0.f || l != l) {  // NaN inputs propagate, never read as "no key"
    lse = m + logf(l);
    inv = 1.f / l;
  }
  if (n > 1) {
    for (int k = 0; k < kMaxChannelsPerThread; ++k) {
      const int c = threadIdx.x + k * kThreads;
      if (c < Dv) parts.out[grow * Dv + c] = acc[k] * inv;
    }
    if (threadIdx.x == 0) parts.lse[grow] = lse;
    return;
  }
  if (p.learnable_sink) inv *= apply_fmha_sink(lse, p.learnable_sink[h]);
  write_final(p, s, b, i, h, acc, lse, inv);
}

// Decode path: few query rows. One block per (kv head, sequence, split) serves all G query
// heads and up to kDecRows packed rows (row m = query qi * G + head g), so K and V are read
// once per kv head instead of once per query head. Each lane loads 8 contiguous channels of a
// key with one 16-byte access; a key takes D / 8 lanes, so a warp scores 32 / (D / 8) keys at
// once (several loads in flight), then accumulates P·V the same way over V rows.
constexpr int kDecRows = 8;          // packed (query row, head) rows per block
constexpr int kDecMaxDim = 256;      // D and Dv of this path (multiples of 8)
constexpr int kDecChunk = 64;        // keys per softmax step
constexpr int kDecWarps = kThreads / arch::kWarpSize;
constexpr int kVec = 8;              // channels per lane access

// 8 consecutive elements (16-byte aligned for 2-byte types) as float.
template <DType kDt>
__device__ __forceinline__ void load8(const void* base, int64_t off, float* x) {
  if constexpr (kDt == DType::kBFloat16 || kDt == DType::kFloat16) {
    const uint4 raw = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(base) + off);
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint16_t lo = static_cast<uint16_t>(w[i] & 0xffffu), hi = static_cast<uint16_t>(w[i] >> 16);
      x[2 * i] = kDt == DType::kBFloat16 ? bf16_to_float(lo) : half_to_float(lo);
      x[2 * i + 1] = kDt == DType::kBFloat16 ? bf16_to_float(hi) : half_to_float(hi);
    }
  } else if constexpr (kDt == DType::kFloat32) {
    const float4 a = *reinterpret_cast<const float4*>(static_cast<const float*>(base) + off);
    const float4 b = *reinterpret_cast<const float4*>(static_cast<const float*>(base) + off + 4);
    x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w; x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
  } else {
    const uint2 raw = *reinterpret_cast<const uint2*>(static_cast<const uint8_t*>(base) + off);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      x[i] = fp8_e4m3_to_float(static_cast<uint8_t>(raw.x >> (8 * i)));
      x[4 + i] = fp8_e4m3_to_float(static_cast<uint8_t>(raw.y >> (8 * i)));
    }
  }
}

// Sum over the `width` lanes of a lane group (width a power of two <= warp size).
__device__ __forceinline__ float group_sum(float x, int width) {
  for (int o = width / 2; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__host__ __device__ constexpr int lanes_for(int dim) {  // lanes covering dim channels, a power of 2
  return dim <= 8 ? 1 : dim <= 16 ? 2 : dim <= 32 ? 4 : dim <= 64 ? 8 : dim <= 128 ? 16 : 32;
}

template <DType kDt>
__global__ void __launch_bounds__(kThreads) fmha_decode_kernel(FmhaParams p, FmhaSplitBuffers parts) {
  __shared__ float q_s[kDecRows][kDecMaxDim];
  __shared__ float s_s[kDecRows][kDecChunk];
  __shared__ float m_s[kDecRows], l_s[kDecRows], corr_s[kDecRows];
  __shared__ int lo_s[kDecRows], hi_s[kDecRows];
  __shared__ float acc_s[kDecWarps][kDecRows][kDecMaxDim];
  const int hk = blockIdx.x, n = parts.num_splits;
  const int b = blockIdx.y / n, split = blockIdx.y % n;
  const SeqInfo s = seq_info(p, b);
  const int G = p.num_heads / p.num_heads_k, D = p.head_dim, Dv = p.head_dim_v;
  const int warp = threadIdx.x / arch::kWarpSize, lane = threadIdx.x % arch::kWarpSize;
  const int rows = imin(s.q_len_full * G, kDecRows);

  if (split == 0)  // padded rows (past seqused_q): out 0, lse -inf, written once
    for (int m = s.q_len * G; m < rows; ++m) {
      float zero[kMaxChannelsPerThread] = {};
      write_final(p, s, b, m / G, hk * G + m % G, zero, -INFINITY, 0.f);
    }
  const int M = imin(s.q_len * G, kDecRows);
  if (M == 0) return;
  const int ns = sequence_splits(p, b, s.k_len, n);
  int slo = 0, shi = s.k_len;
  if (ns > 1) split_key_range(s.k_len, kSplitKeyBlock, split, ns, slo, shi);
  const bool empty_split = split >= ns;

  const float qd = descale(p.q_descale, p.q_descale_batch_stride, p.q_descale_head_stride, b, hk);
  const float kd = descale(p.k_descale, p.k_descale_batch_stride, p.k_descale_head_stride, b, hk);
  const float vd = descale(p.v_descale, p.v_descale_batch_stride, p.v_descale_head_stride, b, hk);
  for (int idx = threadIdx.x; idx < M * D; idx += kThreads) {
    const int m = idx / D, c = idx % D;
    const int64_t row = s.q_row0 + m / G;
    q_s[m][c] = load_float(p.q, b * p.q_batch_stride + row * p.q_row_stride + (hk * G + m % G) * p.q_head_stride + c,
                           p.in_dtype) * qd;
  }
  if (threadIdx.x < M) {
    const KeyInterval keys = key_range_for_row(p, s, threadIdx.x / G).clip(slo, shi);
    lo_s[threadIdx.x] = keys.lo;
    hi_s[threadIdx.x] = empty_split ? keys.lo : keys.hi;
    m_s[threadIdx.x] = -INFINITY;
    l_s[threadIdx.x] = 0.f;
  }
  __syncthreads();
  int kmin = INT32_MAX, kmax = 0;
  for (int m = 0; m < M; ++m)
    if (lo_s[m] < hi_s[m]) {
      kmin = imin(kmin, lo_s[m]);
      kmax = imax(kmax, hi_s[m]);
    }

  const int lk = lanes_for(D), kpw = arch::kWarpSize / lk;        // lanes per K row, keys per warp
  const int lv = lanes_for(Dv), vpw = arch::kWarpSize / lv;       // lanes per V row, rows per warp
  const int ksub = lane / lk, kl = lane % lk, vsub = lane / lv, vl = lane % lv;
  float acc[kDecRows][kVec] = {};
  for (int c0 = kmin; c0 < kmax; c0 = next_tile(c0, kDecChunk, kmax)) {
    const int nk = imin(kDecChunk, kmax - c0);  // keys of this chunk (no position past kmax is formed)
    // 1. scores: every lane group of a warp scores one key
    for (int jj0 = warp * kpw; jj0 < kDecChunk; jj0 += kDecWarps * kpw) {
      const int jj = jj0 + ksub, j = c0 + (jj < nk ? jj : 0);
      const bool valid = jj < nk && kl * kVec < D;
      float kv[kVec] = {};
      if (valid) {
        const int64_t ko = key_offset(p, s, s.k_start + j, p.k_batch_stride, p.k_row_stride) + hk * p.k_head_stride;
        load8<kDt>(p.k, ko + kl * kVec, kv);
      }
      for (int m = 0; m < M; ++m) {
        float part = 0.f;
#pragma unroll
        for (int e = 0; e < kVec; ++e) part += (kl * kVec + e < D ? q_s[m][kl * kVec + e] : 0.f) * kv[e];
        const float dot = group_sum(part, lk) * kd;
        if (kl == 0 && jj < kDecChunk) {
          const KeyInterval keys{lo_s[m], hi_s[m]};
          s_s[m][jj] = jj < nk ? score_mod(p, s, b, hk * G + m % G).apply(dot, m / G, j, keys) : -INFINITY;
        }
      }
    }
    __syncthreads();
    // 2. online softmax per row (warp w handles rows w, w + 4, ...)
    for (int m = warp; m < M; m += kDecWarps) {
      float mx = -INFINITY;
      for (int jj = lane; jj < kDecChunk; jj += arch::kWarpSize) mx = fmaxf(mx, s_s[m][jj]);
      mx = arch::warp_max(mx);
      const float m_old = m_s[m], m_new = fmaxf(m_old, mx);
      float sum = 0.f;
      for (int jj = lane; jj < kDecChunk; jj += arch::kWarpSize) {
        const float x = s_s[m][jj];
        const float e = x == -INFINITY ? 0.f : expf(x - m_new);
        s_s[m][jj] = e;
        sum += e;
      }
      sum = arch::warp_sum(sum);
      if (lane == 0) {
        const float corr = m_old == -INFINITY ? 0.f : expf(m_old - m_new);
        corr_s[m] = corr;
        l_s[m] = l_s[m] * corr + sum;
        m_s[m] = m_new;
      }
    }
    __syncthreads();
    // 3. acc += P V: every lane group of a warp takes one V row; lanes own 8 channels each
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[m][e] *= corr_s[m];
    for (int jj0 = warp * vpw; jj0 < kDecChunk; jj0 += kDecWarps * vpw) {
      const int jj = jj0 + vsub;
      if (jj >= nk || vl * kVec >= Dv) continue;
      const int64_t vo = key_offset(p, s, s.k_start + c0 + jj, p.v_batch_stride, p.v_row_stride) + hk * p.v_head_stride;
      float vv[kVec];
      load8<kDt>(p.v, vo + vl * kVec, vv);
      for (int m = 0; m < M; ++m) {
        const float w = s_s[m][jj] * vd;
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[m][e] += w * vv[e];
      }
    }
    __syncthreads();  // s_s is rewritten by the next chunk
  }

  // 4. sum the lane groups of each warp, then the warps, then normalize and store
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      float x = acc[m][e];
      for (int o = lv; o < arch::kWarpSize; o *= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
      acc[m][e] = x;
    }
  if (vsub == 0 && vl * kVec < Dv)
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc_s[warp][m][vl * kVec + e] = acc[m][e];
  __syncthreads();
  for (int idx = threadIdx.x; idx < M * Dv; idx += kThreads) {
    const int m = idx / Dv, c = idx % Dv;
    float o = 0.f;
    for (int w = 0; w < kDecWarps; ++w) o += acc_s[w][m][c];
    const float l = l_s[m];
    const bool has = l > 0.f || l != l;  // NaN inputs propagate
    float lse = has ? m_s[m] + logf(l) : -INFINITY;
    float scale = has ? 1.f / l : 0.f;
    const int qi = m / G, h = hk * G + m % G;
    if (n > 1) {
      const int64_t grow = (static_cast<int64_t>(split) * p.total_q + global_row(p, s, b, qi)) * p.num_heads + h;
      parts.out[grow * Dv + c] = o * scale;
      if (c == 0) parts.lse[grow] = lse;
    } else {
      if (p.learnable_sink) scale *= apply_fmha_sink(lse, p.learnable_sink[h]);
      const int64_t row = s.q_row0 + qi;
      store_float(p.out, b * p.out_batch_stride + row * p.out_row_stride + h * p.out_head_stride + c, p.out_dtype,
                  o * scale);
      if (c == 0) p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + row * p.lse_row_stride] = lse;
    }
  }
}

// The decode path reads K/V rows 8 elements at a time: channels and strides must allow it.
bool decode_path_fits(const FmhaParams& p, int max_rows) {
  const int G = p.num_heads_k > 0 ? p.num_heads / p.num_heads_k : 0;
  auto aligned = [](const void* ptr, int64_t a, int64_t b, int64_t c, int es) {
    return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (a * es) % 16 == 0 && (b * es) % 16 == 0 &&
           (c * es) % 16 == 0;
  };
  // element size for the alignment test; fp8 lanes read 8 bytes, tested like 2-byte types
  const int es = p.in_dtype == DType::kFloat32 ? 4 : 2;
  return !p.qv && max_rows * G <= kDecRows && p.head_dim <= kDecMaxDim && p.head_dim_v <= kDecMaxDim &&
         p.head_dim % kVec == 0 && p.head_dim_v % kVec == 0 &&
         aligned(p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, es) &&
         aligned(p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, es);
}

// Merges the splits of one (row, head) exactly as fmha_combine does, then the sink.
__global__ void __launch_bounds__(kThreads) fmha_merge_kernel(FmhaParams p, FmhaSplitBuffers parts) {
  const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const SeqInfo s = seq_info(p, b);
  if (i >= s.q_len) return;  // padded rows were written by the row kernel
  const int64_t g = global_row(p, s, b, i) * p.num_heads + h;
  const int64_t split_stride = static_cast<int64_t>(p.total_q) * p.num_heads;
  float lse = combined_lse(parts.lse + g, split_stride, parts.num_splits);
  float acc[kMaxChannelsPerThread] = {};
  for (int sp = 0; sp < parts.num_splits; ++sp) {
    const float w = split_weight(parts.lse[g + sp * split_stride], lse);
    if (w == 0.f) continue;
    const float* src = parts.out + (g + sp * split_stride) * p.head_dim_v;
    for (int k = 0; k < kMaxChannelsPerThread; ++k) {
      const int c = threadIdx.x + k * kThreads;
      if (c < p.head_dim_v) acc[k] += w * src[c];
    }
  }
  float scale = 1.f;
  if (p.learnable_sink) scale = apply_fmha_sink(lse, p.learnable_sink[h]);
  write_final(p, s, b, i, h, acc, lse, scale);
}

// Rows of a ragged q that belong to no sequence: out 0, lse -inf.
__global__ void __launch_bounds__(kThreads) zero_unowned_rows_kernel(FmhaParams p) {
  const int64_t row = blockIdx.x;
  const int h = blockIdx.y;
  if (row >= p.cu_seqlens_q[0] && row < p.cu_seqlens_q[p.batch]) return;
  const int64_t o = row * p.out_row_stride + h * p.out_head_stride;
  for (int c = threadIdx.x; c < p.head_dim_v; c += kThreads) store_float(p.out, o + c, p.out_dtype, 0.f);
  if (threadIdx.x == 0) p.lse[h * p.lse_head_stride + row * p.lse_row_stride] = -INFINITY;
}

__global__ void __launch_bounds__(kThreads) combine_kernel(CombineParams c) {
  const int64_t r = blockIdx.x;
  const float lse = combined_lse(c.lse_partial + r * c.lse_row_stride, c.lse_split_stride, c.num_splits);
  for (int ch = threadIdx.x; ch < c.head_dim_v; ch += kThreads) {
    float o = 0.f;
    for (int sp = 0; sp < c.num_splits; ++sp) {
      const float w = split_weight(c.lse_partial[r * c.lse_row_stride + sp * c.lse_split_stride], lse);
      if (w != 0.f) o += w * c.out_partial[r * c.op_row_stride + sp * c.op_split_stride + ch];
    }
    store_float(c.out, r * c.head_dim_v + ch, c.out_dtype, o);
  }
  if (threadIdx.x == 0) c.lse[r] = lse;
}

}  // namespace

#if !defined(MATE_WITH_SM90)  // a build without the CUTLASS headers has no Hopper kernels
bool fmha_sm90_fits(const FmhaParams&) { return false; }
arch::Error launch_fmha_sm90(const FmhaParams&, int, unsigned long long*, arch::Stream) { return arch::kSuccess; }
bool fmha_sm90_uneven_tiles(const FmhaParams&) { return false; }
#endif

namespace {
// Which calls take the Hopper kernel on a compute capability 9.0 GPU (fmha_sm90_fits says which
// it can serve). By default those with at least one full 128-row tile of query rows: shorter
// calls (decode, small chunks) stay on the mma.sync kernel, which packs a GQA group's heads
// into one tile and reads K / V once per kv head. MATE_OPS_FMHA_PATH=sm90 sends every call it
// serves to the Hopper kernel (its tests use that), =sm80 none. Read once per process.
enum class Sm90Route { kAuto, kAlways, kNever };
Sm90Route sm90_route() {
  static const Sm90Route route = [] {
    const char* v = std::getenv("MATE_OPS_FMHA_PATH");
    if (v != nullptr && std::strcmp(v, "sm90") == 0) return Sm90Route::kAlways;
    if (v != nullptr && std::strcmp(v, "sm80") == 0) return Sm90Route::kNever;
    return Sm90Route::kAuto;
  }();
  return route;
}
bool sm90_wanted(int max_rows) {
  const Sm90Route route = sm90_route();
  return route == Sm90Route::kAlways || (route == Sm90Route::kAuto && max_rows >= 128);
}
}  // namespace

bool fmha_sm90_takes(const FmhaParams& p, int max_rows) {
  // at most 2^31 - 1 work tiles of 128 rows (the Hopper kernel numbers them in 32 bits): only a
  // call of absurd shape (batch * heads * row blocks past 2^31) stays on mma.sync for that
  const int64_t tiles = static_cast<int64_t>(p.batch) * p.num_heads * ((static_cast<int64_t>(max_rows) + 127) / 128);
  return p.num_splits <= 1 && sm90_wanted(max_rows) && tiles <= INT32_MAX && fmha_sm90_fits(p) &&
         arch::compute_capability() == 90;
}

arch::Error launch_fmha(const FmhaParams& p, const FmhaSplitBuffers& splits, int max_rows, arch::Stream stream) {
  if (p.batch > 0 && max_rows > 0 && p.num_heads > 0) {
    // tensor cores when the build and the problem allow; the portable kernels otherwise
    bool launched = false;
    // FP8 staged as bf16 (launch.cpp) keeps its descales, which only the Hopper kernel applies
    // to 16-bit inputs, and a staged V^T (fp8 wgmma) is read by the Hopper kernel alone: such a
    // call has no fallback
    const bool sm90_only =
        p.v_t_keys > 0 || (p.in_dtype != DType::kFloat8E4M3 && (p.q_descale || p.k_descale || p.v_descale));
    if (splits.num_splits == 1 && fmha_sm90_takes(p, max_rows)) {
      const arch::Error e = launch_fmha_sm90(p, max_rows, splits.tile_counter, stream);
      launched = e == arch::kSuccess;
      if (!launched) arch::last_error();  // clear it, fall back
      if (!launched && sm90_only) return e;
    }
    if (!launched && p.v_t_keys > 0) return arch::kInvalidValue;
    if (!launched && qv_mma_fits(p)) {
      launched = launch_fmha_qv_mma(p, splits, max_rows, stream) == arch::kSuccess;
      if (!launched) arch::last_error();  // e.g. too little shared memory: clear it, fall back
    }
    if (!launched && mma_path_fits(p)) {
      launched = launch_fmha_mma(p, splits, max_rows, stream) == arch::kSuccess;
      if (!launched) arch::last_error();  // e.g. too little shared memory: clear it, fall back
    }
    if (!launched && decode_path_fits(p, max_rows)) {
      const dim3 grid(p.num_heads_k, p.batch * splits.num_splits);
      switch (p.in_dtype) {
        case DType::kBFloat16: fmha_decode_kernel<DType::kBFloat16><<<grid, kThreads, 0, stream>>>(p, splits); break;
        case DType::kFloat16: fmha_decode_kernel<DType::kFloat16><<<grid, kThreads, 0, stream>>>(p, splits); break;
        case DType::kFloat32: fmha_decode_kernel<DType::kFloat32><<<grid, kThreads, 0, stream>>>(p, splits); break;
        case DType::kFloat8E4M3: fmha_decode_kernel<DType::kFloat8E4M3><<<grid, kThreads, 0, stream>>>(p, splits); break;
      }
      launched = true;
    }
    if (!launched) {
      const dim3 grid(max_rows, p.num_heads, p.batch * splits.num_splits);
      fmha_row_kernel<<<grid, kThreads, 0, stream>>>(p, splits);
    }
    if (splits.num_splits > 1)
      fmha_merge_kernel<<<dim3(max_rows, p.num_heads, p.batch), kThreads, 0, stream>>>(p, splits);
  }
  if (p.q_is_ragged && p.total_q > 0 && p.num_heads > 0)
    zero_unowned_rows_kernel<<<dim3(p.total_q, p.num_heads), kThreads, 0, stream>>>(p);
  return arch::last_error();
}

namespace {
// 8 channels per thread: one 8-byte load, one 16-byte store; blockIdx.y is the batch, so the
// index arithmetic stays in 32 bits (launch_fp8_to_bf16 checks that a batch's vectors fit).
// Every e4m3 byte is looked up in a 256-entry table of its bf16 bits, built per block.
__global__ void __launch_bounds__(256) fp8_to_bf16_kernel(Fp8ToBf16View v, int vectors_per_batch) {
  __shared__ uint16_t table[256];
  table[threadIdx.x] = float_to_bf16(fp8_e4m3_to_float(static_cast<uint8_t>(threadIdx.x)));
  __syncthreads();
  const int per_row = v.dim / 8;
  const int64_t b = blockIdx.y;
  uint16_t* const dst = static_cast<uint16_t*>(v.dst) + b * vectors_per_batch * int64_t{8};
  for (int i = blockIdx.x * 256 + threadIdx.x; i < vectors_per_batch; i += gridDim.x * 256) {
    const int rh = i / per_row, c = (i - rh * per_row) * 8;
    const int row = rh / v.heads, h = rh - row * v.heads;
    const uint2 bytes = *reinterpret_cast<const uint2*>(static_cast<const uint8_t*>(v.src) + b * v.batch_stride +
                                                        row * v.row_stride + h * v.head_stride + c);
    uint32_t out[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t word = (k < 2 ? bytes.x : bytes.y) >> ((k & 1) * 16);
      out[k] = table[word & 0xff] | (static_cast<uint32_t>(table[(word >> 8) & 0xff]) << 16);
    }
    *reinterpret_cast<uint4*>(dst + int64_t{i} * 8) = make_uint4(out[0], out[1], out[2], out[3]);
  }
}
}  // namespace

arch::Error launch_fp8_to_bf16(const Fp8ToBf16View& v, arch::Stream stream) {
  const int64_t vectors = int64_t{v.rows} * v.heads * (v.dim / 8);  // per batch
  if (vectors > INT32_MAX / 2 || v.batches > 65535) return arch::kInvalidValue;
  if (vectors > 0 && v.batches > 0) {
    // a grid-stride loop: at most 1024 blocks per batch along x (several waves on any GPU)
    const int64_t blocks = (vectors + 255) / 256;
    const dim3 grid(static_cast<unsigned>(blocks < 1024 ? blocks : 1024), static_cast<unsigned>(v.batches));
    fp8_to_bf16_kernel<<<grid, 256, 0, stream>>>(v, static_cast<int>(vectors));
  }
  return arch::last_error();
}

namespace {
// One 64-key x 64-channel tile of one (batch, head) per block: read as 4-byte words along the
// channels, written as 4-byte words along the (permuted) keys, through shared memory.
constexpr int kVtTile = 64;
__global__ void __launch_bounds__(256) fp8_v_transpose_kernel(Fp8VtView v) {
  __shared__ uint32_t tile[kVtTile][kVtTile / 4 + 1];  // [key][4 channels], +1 word against bank conflicts
  const int k0 = blockIdx.x * kVtTile, c0 = blockIdx.y * kVtTile;
  const int bh = blockIdx.z, b = bh / v.heads, h = bh - b * v.heads;
  const uint8_t* src = static_cast<const uint8_t*>(v.src) + b * v.batch_stride + int64_t{h} * v.head_stride;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int w = threadIdx.x + 256 * i, key = w / 16, c4 = (w % 16) * 4;
    uint32_t word = 0;  // keys past the rows (and channels past dim) are zeros
    if (k0 + key < v.rows && c0 + c4 < v.dim)
      word = *reinterpret_cast<const uint32_t*>(src + int64_t{k0 + key} * v.row_stride + c0 + c4);
    tile[key][c4 / 4] = word;
  }
  __syncthreads();
  uint8_t* dst = static_cast<uint8_t*>(v.dst);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int w = threadIdx.x + 256 * i, c = w / 16, pw = w % 16;  // channel, word of 4 key columns
    if (c0 + c >= v.dim || k0 + 4 * pw >= v.keys_pad) continue;
    uint32_t word = 0;
#pragma unroll
    for (int t = 0; t < 4; ++t) {  // column 4 pw + t of the tile holds key 16 group + fp8_pv_key(a)
      const int key = 16 * (pw / 4) + sm90_fp8::fp8_pv_key(4 * (pw % 4) + t);
      word |= ((tile[key][c / 4] >> (8 * (c % 4))) & 0xffu) << (8 * t);
    }
    *reinterpret_cast<uint32_t*>(dst + (int64_t{bh} * v.dim + c0 + c) * v.keys_pad + k0 + 4 * pw) = word;
  }
}
}  // namespace

arch::Error launch_fp8_v_transpose(const Fp8VtView& v, arch::Stream stream) {
  if (v.rows <= 0 || v.dim <= 0 || v.batches <= 0 || v.heads <= 0) return arch::kSuccess;
  if (int64_t{v.batches} * v.heads > 65535 || v.keys_pad % 16 != 0 || v.keys_pad < v.rows || v.dim % 4 != 0)
    return arch::kInvalidValue;
  const dim3 grid((v.keys_pad + kVtTile - 1) / kVtTile, (v.dim + kVtTile - 1) / kVtTile, v.batches * v.heads);
  fp8_v_transpose_kernel<<<grid, 256, 0, stream>>>(v);
  return arch::last_error();
}

arch::Error launch_combine(const CombineParams& c, arch::Stream stream) {
  if (c.rows > 0) combine_kernel<<<static_cast<unsigned>(c.rows), kThreads, 0, stream>>>(c);
  return arch::last_error();
}

}  // namespace mate::device
