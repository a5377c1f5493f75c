// FMHA backward on the device (fmha_bwd): the gradients of fmha_fwd's (out, lse) from the
// saved lse, with the probabilities recomputed, never stored whole. With
// delta_i = rowsum(dO_i * O_i) - dlse_i and P = exp(logit - lse):
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta) * dlogit/ddot,  dK = dS^T Q,  dQ = dS K.
// The mask and score pipeline are the forward's (key_range_for_row, ScoreMod; fmha_score.h).
//
// Three steps, none with atomics, so every gradient is bitwise identical run to run (the
// `deterministic` flag costs nothing):
//  1. fmha_bwd_rows_kernel: per (query row, head) the base-2 lse (+inf for a row without keys,
//     so its P is 0, not NaN) and delta, into an fp32 scratch [global row * H + h]; then the
//     learnable-sink gradient, one block per head summing in a fixed order.
//  2. dK / dV: one block per (64 keys, kv head, sequence) owns those keys' gradients and loops
//     over the query rows that see them, the G query heads of the kv head packed as rows (so
//     GQA sums over the group in registers). Keys are the M dimension of the tensor-core
//     GEMMs: S^T = K Q^T and dP^T = V dO^T land in registers in the A-operand layout of
//     dV += P^T dO and dK += dS^T Q. A head dim of 256 runs two passes (dV, then dK) with
//     8-warp blocks, since both accumulators do not fit in one thread's registers.
//  3. dQ: one block per (64 packed query rows, kv head, sequence) loops over the key tiles the
//     rows see, like the forward: S = Q K^T, dP = dO V^T, dQ += dS K. This recomputes S and dP
//     (7 GEMM units of work where FlashAttention-2's atomic dQ inside step 2 needs 5) but adds
//     in a fixed order; the atomic variant measured slower here (docs/performance.md).
// This file holds step 1, the portable CUDA-core kernels (one warp per key for dK / dV, one per
// query row for dQ: fp32, head dims above 256 or not multiples of 8, dout in another dtype,
// unaligned views) and the dispatch. The tensor-core kernels of steps 2 and 3 (mma.sync, for
// bf16/fp16 with D and Dv multiples of 8 up to 256, 16-byte aligned rows) are in
// arch/sm80/fmha_bwd_mma.cu; Hopper versions of both (TMA + wgmma, D and Dv up to 256; taken
// first on compute capability 9.0, up to 128 by default: sm90_bwd_allowed) are in
// arch/sm90/fmha_bwd_sm90.cuh (dispatch: fmha_bwd_sm90.cu).
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "../common/dtype_convert.h"
#include "../common/fmha_math.h"
#include "../common/fmha_score.h"
#include "kernels.h"

namespace mate::device {
namespace {

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// ---- step 1: per-row values and the sink gradient ----------------------------------------

// One warp per (query row, head) of sequence blockIdx.y.
__global__ void fmha_bwd_rows_kernel(FmhaBwdParams g, FmhaBwdScratch rows) {
  const FmhaParams& p = g.fwd;
  const int b = blockIdx.y, H = p.num_heads;
  const int warps = blockDim.x / arch::kWarpSize, lane = threadIdx.x % arch::kWarpSize;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / arch::kWarpSize;
  const SeqInfo s = seq_info(p, b);
  if (idx >= static_cast<int64_t>(s.q_len) * H) return;
  const int i = static_cast<int>(idx / H), h = static_cast<int>(idx % H);
  const int64_t row = s.q_row0 + i;
  const int64_t o_off = b * p.out_batch_stride + row * p.out_row_stride + h * p.out_head_stride;
  const int64_t d_off = b * g.dout_batch_stride + row * g.dout_row_stride + h * g.dout_head_stride;
  float acc = 0.f;
  for (int c = lane; c < p.head_dim_v; c += arch::kWarpSize)
    acc += load_float(p.out, o_off + c, p.out_dtype) * load_float(g.dout, d_off + c, p.out_dtype);
  acc = warp_sum(acc);
  if (lane != 0) return;
  if (g.dlse) acc -= g.dlse[b * g.dlse_batch_stride + h * g.dlse_head_stride + row * g.dlse_row_stride];
  const float lse = p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + row * p.lse_row_stride];
  const int64_t at = global_row(p, s, b, i) * H + h;
  rows.delta[at] = acc;
  rows.lse2[at] = lse == -INFINITY ? INFINITY : lse * kLog2e;  // no key: P = 0, not NaN
}

// dsink_h = -sum_i exp(sink_h - lse_i) * delta_i over the real rows of head h (the sink is one
// more logit with no value). One block per head; the sum order is fixed (deterministic).
constexpr int kSinkThreads = 256;
__global__ void __launch_bounds__(kSinkThreads) fmha_bwd_sink_kernel(FmhaBwdParams g, FmhaBwdScratch rows) {
  const FmhaParams& p = g.fwd;
  const int h = blockIdx.x;
  const float sink = p.learnable_sink[h];
  float acc = 0.f;
  if (sink != -INFINITY) {
    for (int b = 0; b < p.batch; ++b) {
      const SeqInfo s = seq_info(p, b);
      for (int i = threadIdx.x; i < s.q_len; i += kSinkThreads) {
        const float lse = p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + (s.q_row0 + i) * p.lse_row_stride];
        if (lse == INFINITY) continue;  // a probability of exactly 0
        acc -= expf(sink - lse) * rows.delta[global_row(p, s, b, i) * p.num_heads + h];
      }
    }
  }
  __shared__ float part[kSinkThreads];
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int w = kSinkThreads / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) g.dsink[h] = part[0];
}

// ---- portable kernels (CUDA cores, any dtype, head dims up to 512) -------------------------

constexpr int kPortableWarps = 4;
constexpr int kPerLane = 16;  // 512 / 32 channels per lane

// One warp per (key j, kv head, sequence): loops over the query rows (and the G heads) that
// see key j; the dK / dV rows live in registers, kPerLane channels per lane.
__global__ void __launch_bounds__(kPortableWarps * 32)
    fmha_bwd_dkdv_portable_kernel(FmhaBwdParams g, FmhaBwdScratch rows) {
  const FmhaParams& p = g.fwd;
  const int b = blockIdx.z, hk = blockIdx.y, lane = threadIdx.x % arch::kWarpSize;
  const int j = blockIdx.x * kPortableWarps + threadIdx.x / arch::kWarpSize;
  const SeqInfo s = seq_info(p, b);
  if (j >= s.k_len) return;
  const int G = p.num_heads / p.num_heads_k, D = p.head_dim, Dv = p.head_dim_v;
  const int64_t k_off = key_offset(p, s, s.k_start + j, p.k_batch_stride, p.k_row_stride) + hk * p.k_head_stride;
  const int64_t v_off = key_offset(p, s, s.k_start + j, p.v_batch_stride, p.v_row_stride) + hk * p.v_head_stride;
  float kr[kPerLane], vr[kPerLane], dk[kPerLane], dv[kPerLane];
#pragma unroll
  for (int u = 0; u < kPerLane; ++u) {
    const int c = lane + 32 * u;
    kr[u] = c < D ? load_float(p.k, k_off + c, p.in_dtype) : 0.f;
    vr[u] = c < Dv ? load_float(p.v, v_off + c, p.in_dtype) : 0.f;
    dk[u] = dv[u] = 0.f;
  }
  // rows whose interval holds j: hi > j (a suffix) and lo <= j (a prefix)
  const int ia = first_row_where(p, s, [&](const KeyInterval& k) { return k.hi > j; });
  const int ib = first_row_where(p, s, [&](const KeyInterval& k) { return k.lo > j; });
  for (int i = ia; i < ib; ++i) {
    const int64_t row = s.q_row0 + i;
    for (int gi = 0; gi < G; ++gi) {
      const int h = hk * G + gi;
      const int64_t at = global_row(p, s, b, i) * p.num_heads + h;
      const float lse2 = rows.lse2[at], delta = rows.delta[at];
      if (lse2 == INFINITY) continue;
      const int64_t q_off = b * p.q_batch_stride + row * p.q_row_stride + h * p.q_head_stride;
      const int64_t d_off = b * g.dout_batch_stride + row * g.dout_row_stride + h * g.dout_head_stride;
      float qr[kPerLane], dor[kPerLane], dot = 0.f, dpd = 0.f;
#pragma unroll
      for (int u = 0; u < kPerLane; ++u) {
        const int c = lane + 32 * u;
        qr[u] = c < D ? load_float(p.q, q_off + c, p.in_dtype) : 0.f;
        dor[u] = c < Dv ? load_float(g.dout, d_off + c, p.out_dtype) : 0.f;
        dot += qr[u] * kr[u];
        dpd += dor[u] * vr[u];
      }
      dot = warp_sum(dot);
      dpd = warp_sum(dpd);
      float dlogit;
      const float x = score_mod(p, s, b, h).logit_grad(dot, i, j, dlogit);
      const float pe = exp2f(x * kLog2e - lse2);
      const float ds = pe * (dpd - delta) * dlogit;
#pragma unroll
      for (int u = 0; u < kPerLane; ++u) {
        dv[u] += pe * dor[u];
        dk[u] += ds * qr[u];
      }
    }
  }
  const int64_t dk_off = key_offset(p, s, s.k_start + j, g.dk_batch_stride, g.dk_row_stride) + hk * g.dk_head_stride;
  const int64_t dv_off = key_offset(p, s, s.k_start + j, g.dv_batch_stride, g.dv_row_stride) + hk * g.dv_head_stride;
#pragma unroll
  for (int u = 0; u < kPerLane; ++u) {
    const int c = lane + 32 * u;
    if (c < D) store_float(g.dk, dk_off + c, p.in_dtype, dk[u]);
    if (c < Dv) store_float(g.dv, dv_off + c, p.in_dtype, dv[u]);
  }
}

// One warp per (query row, head) of sequence blockIdx.y: dQ over the row's keys.
__global__ void __launch_bounds__(kPortableWarps * 32)
    fmha_bwd_dq_portable_kernel(FmhaBwdParams g, FmhaBwdScratch rows) {
  const FmhaParams& p = g.fwd;
  const int b = blockIdx.y, H = p.num_heads, lane = threadIdx.x % arch::kWarpSize;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kPortableWarps + threadIdx.x / arch::kWarpSize;
  const SeqInfo s = seq_info(p, b);
  if (idx >= static_cast<int64_t>(s.q_len) * H) return;
  const int i = static_cast<int>(idx / H), h = static_cast<int>(idx % H);
  const int G = H / p.num_heads_k, hk = h / G, D = p.head_dim, Dv = p.head_dim_v;
  const int64_t grow_ = global_row(p, s, b, i), row = s.q_row0 + i;
  const float lse2 = rows.lse2[grow_ * H + h], delta = rows.delta[grow_ * H + h];
  const int64_t q_off = b * p.q_batch_stride + row * p.q_row_stride + h * p.q_head_stride;
  const int64_t d_off = b * g.dout_batch_stride + row * g.dout_row_stride + h * g.dout_head_stride;
  float qr[kPerLane], dor[kPerLane], dq[kPerLane];
#pragma unroll
  for (int u = 0; u < kPerLane; ++u) {
    const int c = lane + 32 * u;
    qr[u] = c < D ? load_float(p.q, q_off + c, p.in_dtype) : 0.f;
    dor[u] = c < Dv ? load_float(g.dout, d_off + c, p.out_dtype) : 0.f;
    dq[u] = 0.f;
  }
  const KeyInterval keys = key_range_for_row(p, s, i);
  const ScoreMod mod = score_mod(p, s, b, h);
  for (int j = keys.lo; j < keys.hi && lse2 != INFINITY; ++j) {
    const int64_t k_off = key_offset(p, s, s.k_start + j, p.k_batch_stride, p.k_row_stride) + hk * p.k_head_stride;
    const int64_t v_off = key_offset(p, s, s.k_start + j, p.v_batch_stride, p.v_row_stride) + hk * p.v_head_stride;
    float kr[kPerLane], dot = 0.f, dpd = 0.f;
#pragma unroll
    for (int u = 0; u < kPerLane; ++u) {
      const int c = lane + 32 * u;
      kr[u] = c < D ? load_float(p.k, k_off + c, p.in_dtype) : 0.f;
      dot += qr[u] * kr[u];
      if (c < Dv) dpd += dor[u] * load_float(p.v, v_off + c, p.in_dtype);
    }
    dot = warp_sum(dot);
    dpd = warp_sum(dpd);
    float dlogit;
    const float x = mod.logit_grad(dot, i, j, dlogit);
    const float ds = exp2f(x * kLog2e - lse2) * (dpd - delta) * dlogit;
#pragma unroll
    for (int u = 0; u < kPerLane; ++u) dq[u] += ds * kr[u];
  }
  const int64_t dq_off = (grow_ * H + h) * D;
#pragma unroll
  for (int u = 0; u < kPerLane; ++u)
    if (lane + 32 * u < D) store_float(g.dq, dq_off + lane + 32 * u, p.in_dtype, dq[u]);
}


// On a compute capability 9.0 GPU steps 2 and 3 take the Hopper kernels for every call they
// serve, every tile width (64, 128, 192 x 128, 256; tested on the H200); MATE_OPS_FMHA_BWD_PATH=
// sm80 keeps them on the mma.sync kernels (to compare, or to sidestep the Hopper ones), =sm90 is
// the default spelled out. kWideByDefault = false would keep head dims above 128 on mma.sync
// unless =sm90 is set. Read once per process.
constexpr bool kWideByDefault = true;
bool sm90_bwd_allowed(const FmhaParams& p) {
  static const int route = [] {  // 0: off, 1: default, 2: every width the kernels serve
    const char* v = std::getenv("MATE_OPS_FMHA_BWD_PATH");
    if (v == nullptr) return 1;
    return std::strcmp(v, "sm80") == 0 ? 0 : std::strcmp(v, "sm90") == 0 ? 2 : 1;
  }();
  if (route == 0) return false;
  return route == 2 || kWideByDefault || (p.head_dim <= 128 && p.head_dim_v <= 128);
}

}  // namespace

#if !defined(MATE_WITH_SM90)  // a build without the CUTLASS headers has no Hopper kernels
bool fmha_bwd_sm90_fits(const FmhaBwdParams&) { return false; }
arch::Error launch_fmha_bwd_sm90(const FmhaBwdParams&, const FmhaBwdScratch&, arch::Stream) { return arch::kSuccess; }
#endif

arch::Error launch_fmha_bwd(const FmhaBwdParams& g, const FmhaBwdScratch& rows, arch::Stream stream) {
  const FmhaParams& p = g.fwd;
  if (p.batch == 0) return arch::kSuccess;
  const int64_t row_items = static_cast<int64_t>(imax(g.max_seqlen_q, 1)) * p.num_heads;
  const unsigned row_blocks = static_cast<unsigned>((row_items + kPortableWarps - 1) / kPortableWarps);
  fmha_bwd_rows_kernel<<<dim3(row_blocks, p.batch), kPortableWarps * 32, 0, stream>>>(g, rows);
  arch::Error e = arch::last_error();
  if (e != arch::kSuccess) return e;
  if (g.dsink) {
    fmha_bwd_sink_kernel<<<p.num_heads, kSinkThreads, 0, stream>>>(g, rows);
    if ((e = arch::last_error()) != arch::kSuccess) return e;
  }
  if (sm90_bwd_allowed(p) && fmha_bwd_sm90_fits(g) && arch::compute_capability() == 90) {
    // a failure before its kernels run (e.g. the shared-memory attribute) falls back; the
    // mma.sync kernels below then write every gradient the Hopper ones would have
    if (launch_fmha_bwd_sm90(g, rows, stream) == arch::kSuccess) return arch::kSuccess;
    arch::last_error();  // clear it
  }
  if (fmha_bwd_mma_fits(g)) return launch_fmha_bwd_mma(g, rows, stream);
  const dim3 kv_grid(static_cast<unsigned>(ceil_div_pos(imax(g.max_seqlen_k, 1), kPortableWarps)), p.num_heads_k,
                     p.batch);
  fmha_bwd_dkdv_portable_kernel<<<kv_grid, kPortableWarps * 32, 0, stream>>>(g, rows);
  if ((e = arch::last_error()) != arch::kSuccess) return e;
  fmha_bwd_dq_portable_kernel<<<dim3(row_blocks, p.batch), kPortableWarps * 32, 0, stream>>>(g, rows);
  return arch::last_error();
}

}  // namespace mate::device
