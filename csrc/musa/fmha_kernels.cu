// Device kernels of the FMHA family, written once for CUDA and MUSA (vendor specifics in
// arch/device.h). Torch-free: they read the parameter structs of csrc/common and share its
// mask / split / merge / dtype math with the CPU reference, so both compute SEMANTICS §1-2
// the same way.
//
// This first version is the correctness baseline: one block per (query row, head, sequence,
// split), keys streamed in chunks of kThreads with an online softmax. It has no tensor-core
// path yet (see docs/performance.md for what it reaches and what comes next).
#include <cmath>

#include "../common/dtype_convert.h"
#include "../common/fmha_math.h"
#include "../common/scheduler.h"
#include "kernels.h"

namespace mate::device {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxChannelsPerThread = (512 + kThreads - 1) / kThreads;  // Dv <= 512

__device__ __forceinline__ int64_t global_row(const FmhaParams& p, const SeqInfo& s, int b, int i) {
  return p.q_is_ragged ? s.q_row0 + i : static_cast<int64_t>(b) * p.seqlen_q + i;
}

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
  const int key_blocks = imax(1, (s.k_len + kSplitKeyBlock - 1) / kSplitKeyBlock);
  int ns = imin(n, key_blocks);
  if (p.scheduler_metadata) ns = imax(1, imin(ns, p.scheduler_metadata[1 + b]));
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

  int lo, hi, slo = 0, shi = s.k_len;
  key_range_for_row(p, s, i, lo, hi);
  if (ns > 1) split_key_range(s.k_len, kSplitKeyBlock, split, ns, slo, shi);
  lo = imax(lo, slo);
  hi = imin(hi, shi);
  const int a = i + s.mask_k_len - s.q_len;
  const float slope = p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.f;

  float m = -INFINITY, l = 0.f;
  for (int c0 = lo; c0 < hi; c0 += kThreads) {
    const int j = c0 + threadIdx.x;
    float score = -INFINITY;
    if (j < hi) {
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
      score = dot * p.softmax_scale;
      if (p.softcap > 0.f) score = p.softcap * tanhf(score / p.softcap);
      if (p.alibi_slopes) score -= slope * fabsf(static_cast<float>(a - global_key(p, j)));
    }
    const float mc = arch::block_max<kThreads>(score, red);
    const float m_new = fmaxf(m, mc);
    const float corr = m == -INFINITY ? 0.f : expf(m - m_new);
    const float pj = score == -INFINITY ? 0.f : expf(score - m_new);
    p_s[threadIdx.x] = pj;
    l = l * corr + arch::block_sum<kThreads>(pj, red);  // also orders the p_s writes
    m = m_new;
    for (int k = 0; k < kMaxChannelsPerThread; ++k) acc[k] *= corr;
    const int nk = imin(kThreads, hi - c0);
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

arch::Error launch_fmha(const FmhaParams& p, const FmhaSplitBuffers& splits, int max_rows, arch::Stream stream) {
  if (p.batch > 0 && max_rows > 0 && p.num_heads > 0) {
    const dim3 grid(max_rows, p.num_heads, p.batch * splits.num_splits);
    fmha_row_kernel<<<grid, kThreads, 0, stream>>>(p, splits);
    if (splits.num_splits > 1)
      fmha_merge_kernel<<<dim3(max_rows, p.num_heads, p.batch), kThreads, 0, stream>>>(p, splits);
  }
  if (p.q_is_ragged && p.total_q > 0 && p.num_heads > 0)
    zero_unowned_rows_kernel<<<dim3(p.total_q, p.num_heads), kThreads, 0, stream>>>(p);
  return arch::last_error();
}

arch::Error launch_combine(const CombineParams& c, arch::Stream stream) {
  if (c.rows > 0) combine_kernel<<<static_cast<unsigned>(c.rows), kThreads, 0, stream>>>(c);
  return arch::last_error();
}

}  // namespace mate::device
