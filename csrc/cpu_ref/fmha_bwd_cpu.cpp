// CPU reference kernel of the FMHA backward (fmha_bwd), filled into the kernel table.
//
// Flash-attention backward, tiled like the forward (fmha_cpu.cpp): the probabilities are
// recomputed from the saved lse, P = exp(logit - lse), never stored whole. With
// delta_i = rowsum(dO_i * O_i) - dlse_i:
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta) * dlogit/ddot,  dQ = dS K,  dK = dS^T Q.
// The mask and the score pipeline are those of the forward (key_range_for_row and ScoreMod
// of fmha_score.h). A work item is (sequence, kv head, chunk of keys): it owns the dK / dV
// rows of its keys and loops over the query rows (with their GQA group) that see them, so dK
// and dV are written once, without races. dQ is accumulated in an fp32 buffer per key chunk
// (one chunk unless the (sequence, kv head) pairs cannot fill the threads), summed in chunk
// order at the end. Every sum has a fixed order: gradients are bitwise identical run to run
// (for a given thread count, which sets the number of key chunks).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../common/dtype_convert.h"
#include "../common/fmha_checks.h"
#include "../common/fmha_math.h"
#include "../common/fmha_score.h"
#include "../common/kernel_table.h"
#include "cpu_blas.h"
#include "cpu_math.h"
#include "cpu_parallel.h"

namespace mate::cpu {
namespace {

constexpr int kKeysPerTile = 128;  // rows of the dK / dV accumulators of one step
constexpr int kRowsPerTile = 128;  // GQA-packed query rows per step
constexpr int kMaxChunks = 16;     // key chunks per (sequence, kv head): dQ buffers

template <typename T>
struct Scratch {
  std::vector<T> q, dout, k, v, p, ds;
  std::vector<float> s, dp, dk, dv, dq, lse, delta;
  std::vector<int> lo, hi;
};

template <typename T>
Scratch<T>& scratch() {
  static thread_local Scratch<T> s;
  return s;
}

// n values of dtype dt into the GEMM type T (a copy when they already are T).
template <typename T>
inline void load_row(T* dst, const void* base, DType dt, int64_t off, int n) {
  if ((std::is_same_v<T, float> && dt == DType::kFloat32) || (std::is_same_v<T, c10::Half> && dt == DType::kFloat16) ||
      (std::is_same_v<T, c10::BFloat16> && dt == DType::kBFloat16)) {
    std::memcpy(dst, static_cast<const T*>(base) + off, n * sizeof(T));
  } else {
    for (int i = 0; i < n; ++i) dst[i] = static_cast<T>(load_float(base, off + i, dt));
  }
}

inline int64_t lse_index(const FmhaParams& p, int b, int h, int64_t row) {
  return b * p.lse_batch_stride + h * p.lse_head_stride + row * p.lse_row_stride;
}

// delta[grow * H + h] = rowsum(dO * O) - dlse for every real query row; then dsink.
void compute_delta(const FmhaBwdParams& g, float* delta) {
  const FmhaParams& p = g.fwd;
  at::parallel_for(0, p.batch, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t bb = b0; bb < b1; ++bb) {
      const int b = static_cast<int>(bb);
      const SeqInfo s = seq_info(p, b);
      for (int i = 0; i < s.q_len; ++i) {
        const int64_t row = s.q_row0 + i;
        for (int h = 0; h < p.num_heads; ++h) {
          const int64_t o_off = b * p.out_batch_stride + row * p.out_row_stride + h * p.out_head_stride;
          const int64_t d_off = b * g.dout_batch_stride + row * g.dout_row_stride + h * g.dout_head_stride;
          float acc = 0.f;
          for (int c = 0; c < p.head_dim_v; ++c)
            acc += load_float(p.out, o_off + c, p.out_dtype) * load_float(g.dout, d_off + c, p.out_dtype);
          if (g.dlse) acc -= g.dlse[b * g.dlse_batch_stride + h * g.dlse_head_stride + row * g.dlse_row_stride];
          delta[global_row(p, s, b, i) * p.num_heads + h] = acc;
        }
      }
    }
  });
  if (!g.dsink) return;
  // The sink is one more logit with probability exp(sink - lse) and no value:
  // dsink_h = -sum_i exp(sink_h - lse_i) * delta_i over the real rows of head h.
  at::parallel_for(0, p.num_heads, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t hh = h0; hh < h1; ++hh) {
      const int h = static_cast<int>(hh);
      const float sink = p.learnable_sink[h];
      float acc = 0.f;
      for (int b = 0; b < p.batch; ++b) {
        const SeqInfo s = seq_info(p, b);
        for (int i = 0; i < s.q_len; ++i) {
          const float lse = p.lse[lse_index(p, b, h, s.q_row0 + i)];
          if (sink == -INFINITY || lse == INFINITY) continue;  // a probability of exactly 0
          acc -= std::exp(sink - lse) * delta[global_row(p, s, b, i) * p.num_heads + h];
        }
      }
      g.dsink[h] = acc;
    }
  });
}

// One work item: keys [klo, khi) of sequence b, kv head hk. dq_acc: this chunk's fp32 dQ
// buffer (total_q, H, D).
template <typename T>
void backward_item(const FmhaBwdParams& g, int b, int hk, int klo, int khi, const float* delta, float* dq_acc) {
  const FmhaParams& p = g.fwd;
  const SeqInfo s = seq_info(p, b);
  const int G = p.num_heads / p.num_heads_k, D = p.head_dim, Dv = p.head_dim_v, H = p.num_heads;
  if (klo >= khi || s.q_len == 0) return;
  auto& sc = scratch<T>();

  // Key interval of every query row; both ends are non-decreasing in the row (fmha_score.h).
  int* lo = grow(sc.lo, s.q_len);
  int* hi = grow(sc.hi, s.q_len);
  for (int i = 0; i < s.q_len; ++i) {
    const KeyInterval keys = key_range_for_row(p, s, i);
    lo[i] = keys.lo;
    hi[i] = keys.hi;
  }
  const int rows_per_tile = imax(1, kRowsPerTile / G);
  const int max_m = rows_per_tile * G;
  T* qt = grow(sc.q, static_cast<size_t>(max_m) * D);
  T* dot = grow(sc.dout, static_cast<size_t>(max_m) * Dv);
  float* S = grow(sc.s, static_cast<size_t>(max_m) * kKeysPerTile);
  float* dP = grow(sc.dp, static_cast<size_t>(max_m) * kKeysPerTile);
  T* P = grow(sc.p, static_cast<size_t>(max_m) * kKeysPerTile);
  T* dS = grow(sc.ds, static_cast<size_t>(max_m) * kKeysPerTile);
  float* dqt = grow(sc.dq, static_cast<size_t>(max_m) * D);
  float* lse_r = grow(sc.lse, max_m);
  float* delta_r = grow(sc.delta, max_m);
  float* dk_acc = grow(sc.dk, static_cast<size_t>(kKeysPerTile) * D);
  float* dv_acc = grow(sc.dv, static_cast<size_t>(kKeysPerTile) * Dv);

  const T* kbase = static_cast<const T*>(p.k);
  const T* vbase = static_cast<const T*>(p.v);
  for (int n0 = klo; n0 < khi; n0 = next_tile(n0, kKeysPerTile, khi)) {
    const int n = imin(kKeysPerTile, khi - n0);
    // Query rows that see a key of [n0, n0 + n): one run, as the interval ends are monotone.
    int ia = 0;
    while (ia < s.q_len && hi[ia] <= n0) ++ia;
    int ib = ia;
    while (ib < s.q_len && lo[ib] < n0 + n) ++ib;
    if (ia >= ib) continue;

    // K / V tiles in place (one strided run: no pages here), else gathered (overlapping rows).
    const int t0 = s.k_start + n0;
    const T *kt, *vt;
    int64_t ldk, ldv;
    if (p.k_row_stride >= D && p.v_row_stride >= Dv) {
      kt = kbase + key_offset(p, s, t0, p.k_batch_stride, p.k_row_stride) + hk * p.k_head_stride;
      vt = vbase + key_offset(p, s, t0, p.v_batch_stride, p.v_row_stride) + hk * p.v_head_stride;
      ldk = p.k_row_stride;
      ldv = p.v_row_stride;
    } else {
      T* kg = grow(sc.k, static_cast<size_t>(kKeysPerTile) * D);
      T* vg = grow(sc.v, static_cast<size_t>(kKeysPerTile) * Dv);
      for (int j = 0; j < n; ++j) {
        std::memcpy(kg + j * static_cast<int64_t>(D),
                    kbase + key_offset(p, s, t0 + j, p.k_batch_stride, p.k_row_stride) + hk * p.k_head_stride,
                    D * sizeof(T));
        std::memcpy(vg + j * static_cast<int64_t>(Dv),
                    vbase + key_offset(p, s, t0 + j, p.v_batch_stride, p.v_row_stride) + hk * p.v_head_stride,
                    Dv * sizeof(T));
      }
      kt = kg;
      vt = vg;
      ldk = D;
      ldv = Dv;
    }
    std::fill(dk_acc, dk_acc + static_cast<size_t>(n) * D, 0.f);
    std::fill(dv_acc, dv_acc + static_cast<size_t>(n) * Dv, 0.f);

    for (int i0 = ia; i0 < ib; i0 += rows_per_tile) {
      const int nq = imin(rows_per_tile, ib - i0), M = nq * G;
      // Q, dO, lse, delta of the tile, GQA-packed: row r = qi * G + gi is head hk * G + gi.
      for (int qi = 0; qi < nq; ++qi) {
        const int64_t row = s.q_row0 + i0 + qi;
        const int64_t grow_idx = global_row(p, s, b, i0 + qi);
        for (int gi = 0; gi < G; ++gi) {
          const int h = hk * G + gi, r = qi * G + gi;
          load_row<T>(qt + r * static_cast<int64_t>(D), p.q, p.in_dtype,
                      b * p.q_batch_stride + row * p.q_row_stride + h * p.q_head_stride, D);
          load_row<T>(dot + r * static_cast<int64_t>(Dv), g.dout, p.out_dtype,
                      b * g.dout_batch_stride + row * g.dout_row_stride + h * g.dout_head_stride, Dv);
          const float l = p.lse[lse_index(p, b, h, row)];
          lse_r[r] = l == -INFINITY ? INFINITY : l;  // a row without keys (or sink): P = 0, not NaN
          delta_r[r] = delta[grow_idx * H + h];
        }
      }
      gemm_nt(M, n, D, qt, D, kt, ldk, 0.f, S, kKeysPerTile);
      gemm_nt(M, n, Dv, dot, Dv, vt, ldv, 0.f, dP, kKeysPerTile);
      for (int r = 0; r < M; ++r) {
        const int qi = r / G, i = i0 + qi;
        const int c0 = imax(lo[i] - n0, 0), c1 = imin(hi[i] - n0, n);
        const float* srow = S + static_cast<int64_t>(r) * kKeysPerTile;
        const float* dprow = dP + static_cast<int64_t>(r) * kKeysPerTile;
        T* prow = P + static_cast<int64_t>(r) * kKeysPerTile;
        T* dsrow = dS + static_cast<int64_t>(r) * kKeysPerTile;
        std::fill(prow, prow + n, T(0));
        std::fill(dsrow, dsrow + n, T(0));
        if (c0 >= c1) continue;
        const ScoreMod mod = score_mod(p, s, b, hk * G + r % G);
        const float L = lse_r[r], dl = delta_r[r];
        if (mod.scale_only()) {
          const float sc_ = mod.scale;
          for (int c = c0; c < c1; ++c) {
            const float pv = fast_exp(srow[c] * sc_ - L);
            prow[c] = static_cast<T>(pv);
            dsrow[c] = static_cast<T>(pv * (dprow[c] - dl) * sc_);
          }
        } else {
          for (int c = c0; c < c1; ++c) {
            float dlogit;
            const float x = mod.logit_grad(srow[c], i, n0 + c, dlogit);
            const float pv = fast_exp(x - L);
            prow[c] = static_cast<T>(pv);
            dsrow[c] = static_cast<T>(pv * (dprow[c] - dl) * dlogit);
          }
        }
      }
      gemm_tn(n, Dv, M, P, kKeysPerTile, dot, Dv, 1.f, dv_acc, Dv);
      gemm_tn(n, D, M, dS, kKeysPerTile, qt, D, 1.f, dk_acc, D);
      gemm_nn(M, D, n, dS, kKeysPerTile, kt, ldk, 0.f, dqt, D);
      for (int qi = 0; qi < nq; ++qi) {
        float* dst = dq_acc + (global_row(p, s, b, i0 + qi) * H + hk * G) * static_cast<int64_t>(D);
        const float* src = dqt + static_cast<int64_t>(qi) * G * D;
        for (int x = 0; x < G * D; ++x) dst[x] += src[x];  // the G heads of a row are adjacent
      }
    }
    for (int j = 0; j < n; ++j) {
      store_row(g.dk, p.in_dtype,
                key_offset(p, s, t0 + j, g.dk_batch_stride, g.dk_row_stride) + hk * g.dk_head_stride,
                dk_acc + j * static_cast<int64_t>(D), D);
      store_row(g.dv, p.in_dtype,
                key_offset(p, s, t0 + j, g.dv_batch_stride, g.dv_row_stride) + hk * g.dv_head_stride,
                dv_acc + j * static_cast<int64_t>(Dv), Dv);
    }
  }
}

struct Item {
  int b, hk, klo, khi, chunk;
};

template <typename T>
void run_backward(const FmhaBwdParams& g) {
  const FmhaParams& p = g.fwd;
  const int H = p.num_heads, D = p.head_dim;
  const int64_t q_elems = static_cast<int64_t>(p.total_q) * H * D;

  int max_k = 0;
  int64_t work = 0;
  for (int b = 0; b < p.batch; ++b) {
    const SeqInfo s = seq_info(p, b);
    max_k = imax(max_k, s.k_len);
    work += static_cast<int64_t>(s.q_len) * s.k_len;
  }
  work *= static_cast<int64_t>(H) * (D + p.head_dim_v);
  // Key chunks: only when the (sequence, kv head) pairs cannot keep every thread busy.
  const int threads = at::get_num_threads();
  const int64_t units = static_cast<int64_t>(p.batch) * p.num_heads_k;
  int chunks = 1;
  if (units > 0 && units < 2 * threads)
    chunks = static_cast<int>(std::min<int64_t>((2 * threads + units - 1) / units, kMaxChunks));
  chunks = imax(1, imin(chunks, ceil_div_pos(imax(max_k, 1), kKeysPerTile)));

  std::vector<Item> items;
  for (int b = 0; b < p.batch; ++b) {
    const SeqInfo s = seq_info(p, b);
    if (s.q_len == 0 || s.k_len == 0) continue;
    for (int c = 0; c < chunks; ++c) {
      int klo, khi;
      split_key_range(s.k_len, kKeysPerTile, c, chunks, klo, khi);
      if (klo >= khi) continue;
      for (int hk = 0; hk < p.num_heads_k; ++hk) items.push_back({b, hk, klo, khi, c});
    }
  }
  // Earlier keys first: under causal masks more query rows see them.
  std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.klo < y.klo; });

  at::Tensor delta_t = at::empty({static_cast<int64_t>(p.total_q) * H}, at::kFloat);
  float* delta = delta_t.data_ptr<float>();
  compute_delta(g, delta);

  // fp32 dQ accumulators, one per key chunk; an fp32 dq with one chunk is its own accumulator.
  const bool in_place = chunks == 1 && p.in_dtype == DType::kFloat32;
  at::Tensor acc_t;
  float* acc;
  if (in_place) {
    acc = static_cast<float*>(g.dq);
    std::fill(acc, acc + q_elems, 0.f);
  } else {
    acc_t = at::zeros({chunks, q_elems}, at::kFloat);
    acc = acc_t.data_ptr<float>();
  }
  constexpr int64_t kSerialWork = int64_t{1} << 17;
  parallel_items(static_cast<int64_t>(items.size()), [&](int64_t idx) {
    const Item& it = items[idx];
    backward_item<T>(g, it.b, it.hk, it.klo, it.khi, delta, acc + it.chunk * q_elems);
  }, work < kSerialWork);
  if (in_place) return;
  // dq = sum of the chunks' accumulators, in chunk order.
  at::parallel_for(0, static_cast<int64_t>(p.total_q) * H, 64, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(D);
    for (int64_t r = r0; r < r1; ++r) {
      for (int x = 0; x < D; ++x) row[x] = acc[r * D + x];
      for (int c = 1; c < chunks; ++c)
        for (int x = 0; x < D; ++x) row[x] += acc[c * q_elems + r * D + x];
      store_row(g.dq, p.in_dtype, r * D, row.data(), D);
    }
  });
}

void fmha_bwd_cpu(const FmhaBwdParams& g) {
  switch (g.fwd.in_dtype) {
    case DType::kFloat32: return run_backward<float>(g);
    case DType::kFloat16: return run_backward<c10::Half>(g);
    case DType::kBFloat16: return run_backward<c10::BFloat16>(g);
    default: TORCH_CHECK(false, "fmha_bwd: float8 inputs are forward-only");
  }
}

}  // namespace

MATE_REGISTER_KERNEL(fmha_bwd_kernel, CPU, &fmha_bwd_cpu);

}  // namespace mate::cpu
