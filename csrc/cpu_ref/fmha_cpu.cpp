// CPU reference kernels of the FMHA family (attention, split-KV combine, the worker
// count of the split heuristics), filled into the kernel table. Tiled flash attention with an online softmax:
// each work item is (sequence, kv head, block of query rows with their GQA group,
// key split); memory per thread is O(tile), never Sq x Sk.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "../common/fmha_checks.h"
#include "../common/kernel_table.h"
#include "../common/fmha_math.h"
#include "../common/fmha_score.h"
#include "../common/scheduler.h"
#include "cpu_blas.h"
#include "cpu_math.h"
#include "cpu_parallel.h"

namespace mate::cpu {
namespace {

constexpr int kRowsPerTile = 128;  // GQA-packed query rows per work item
constexpr int kKeysPerTile = 256;  // keys per inner step

// Element type the GEMMs read for a given storage type: fp8 is dequantized to fp32.
template <typename T> struct MathType { using type = T; };
template <> struct MathType<c10::Float8_e4m3fn> { using type = float; };

template <typename T>
inline float to_float(T x) { return static_cast<float>(x); }
template <>
inline float to_float(c10::Float8_e4m3fn x) { return fp8_e4m3_to_float(x.x); }

// Copy n values of storage type T to math type MT, multiplying by `scale` (fp8 descale).
template <typename T, typename MT>
inline void load_row(MT* dst, const T* src, int n, float scale) {
  if constexpr (std::is_same_v<T, MT>) {
    std::memcpy(dst, src, n * sizeof(T));
  } else {
    for (int i = 0; i < n; ++i) dst[i] = static_cast<MT>(to_float(src[i]) * scale);
  }
}

// Per-thread scratch, grown on demand and reused across items and calls.
template <typename MT>
struct Scratch {
  std::vector<MT> q, qv, k, v, p;
  std::vector<float> s, acc, m, l;
  std::vector<int> lo, hi;
};

template <typename MT>
Scratch<MT>& scratch() {
  static thread_local Scratch<MT> s;
  return s;
}

struct SplitOutputs {  // where a split writes its partial result (num_splits > 1)
  float* out = nullptr;  // (splits, total_q, H, Dv)
  float* lse = nullptr;  // (splits, total_q, H)
};

// Raw scores s[0, n) of query row i against keys j0, j0 + 1, ... become logits (the score
// pipeline of fmha_score.h, all but the mask: the caller passes only allowed keys); returns
// their max. Without ALiBi the scale (and softcap) run as one vectorized row pass.
inline float logits_max(float* s, int n, const ScoreMod& mod, int i, int j0) {
  if (!mod.alibi) return scale_softcap_max(s, n, mod.scale, mod.softcap);
  float mx = -INFINITY;
  for (int c = 0; c < n; ++c) {
    s[c] = mod.logit(s[c], i, j0 + c);
    mx = s[c] > mx ? s[c] : mx;
  }
  return mx;
}

// Runs one work item: query rows [i0, i1) of sequence b, kv head hk, keys of split `split`.
template <typename T>
void attend_tile(const FmhaParams& p, int b, int hk, int i0, int i1, int split, int num_splits,
                 const SplitOutputs& parts) {
  using MT = typename MathType<T>::type;
  constexpr bool kDequant = !std::is_same_v<T, MT>;
  const SeqInfo s = seq_info(p, b);
  const int G = p.num_heads / p.num_heads_k;
  const int nq = i1 - i0, M = nq * G;
  const int D = p.head_dim, Dv = p.head_dim_v;
  auto& sc = scratch<MT>();

  int split_lo = 0, split_hi = s.k_len;
  if (num_splits > 1) split_key_range(s.k_len, kSplitKeyBlock, split, num_splits, split_lo, split_hi);

  // Key interval per query row, clipped to this split; the union bounds the key loop.
  int* lo = grow(sc.lo, nq);
  int* hi = grow(sc.hi, nq);
  int kmin = split_hi, kmax = split_lo;
  for (int qi = 0; qi < nq; ++qi) {
    const KeyInterval keys = key_range_for_row(p, s, i0 + qi).clip(split_lo, split_hi);
    lo[qi] = keys.lo;
    hi[qi] = keys.hi;
    if (!keys.empty()) {
      kmin = imin(kmin, lo[qi]);
      kmax = imax(kmax, hi[qi]);
    }
  }

  const T* qbase = static_cast<const T*>(p.q);
  const T* kbase = static_cast<const T*>(p.k);
  const T* vbase = static_cast<const T*>(p.v);
  const T* qvbase = static_cast<const T*>(p.qv);
  const float qd = p.q_descale ? p.q_descale[b * p.q_descale_batch_stride + hk * p.q_descale_head_stride] : 1.f;
  const float kd = p.k_descale ? p.k_descale[b * p.k_descale_batch_stride + hk * p.k_descale_head_stride] : 1.f;
  const float vd = p.v_descale ? p.v_descale[b * p.v_descale_batch_stride + hk * p.v_descale_head_stride] : 1.f;

  float* m = grow(sc.m, M);
  float* l = grow(sc.l, M);
  float* acc = grow(sc.acc, static_cast<size_t>(M) * Dv);
  std::fill(m, m + M, -INFINITY);
  std::fill(l, l + M, 0.f);
  std::fill(acc, acc + static_cast<size_t>(M) * Dv, 0.f);

  if (kmin < kmax) {
    // Q (and qv) rows, GQA-packed: row r = qi * G + g is head hk * G + g.
    MT* qt = grow(sc.q, static_cast<size_t>(M) * D);
    MT* qvt = p.qv ? grow(sc.qv, static_cast<size_t>(M) * Dv) : nullptr;
    for (int qi = 0; qi < nq; ++qi) {
      const int64_t row = s.q_row0 + i0 + qi;
      for (int g = 0; g < G; ++g) {
        const int h = hk * G + g;
        load_row<T, MT>(qt + (qi * G + g) * static_cast<int64_t>(D),
                        qbase + b * p.q_batch_stride + row * p.q_row_stride + h * p.q_head_stride, D, qd);
        if (qvt)
          load_row<T, MT>(qvt + (qi * G + g) * static_cast<int64_t>(Dv),
                          qvbase + b * p.qv_batch_stride + row * p.qv_row_stride + h * p.qv_head_stride,
                          Dv, qd);
      }
    }

    float* S = grow(sc.s, static_cast<size_t>(M) * kKeysPerTile);
    // Probabilities in the GEMM's input type; for fp32 they overwrite the scores in place.
    MT* P;
    if constexpr (std::is_same_v<MT, float>) P = S;
    else P = grow(sc.p, static_cast<size_t>(M) * kKeysPerTile);
    for (int n0 = kmin; n0 < kmax; n0 = next_tile(n0, kKeysPerTile, kmax)) {
      const int n = imin(kKeysPerTile, kmax - n0);
      // K / V tiles: read in place when the keys are one strided run of the same type,
      // else gathered (pages) and converted (fp8) into scratch.
      const int t0 = s.k_start + n0;
      const bool one_run = p.page_size == 0 || (t0 / p.page_size == (t0 + n - 1) / p.page_size);
      const MT *kt, *vt;
      int64_t ldk, ldv;
      // rows must not overlap (an expanded k/v has row stride 0): else gather
      if (!kDequant && one_run && p.k_row_stride >= D && p.v_row_stride >= Dv) {
        kt = reinterpret_cast<const MT*>(kbase + key_offset(p, s, t0, p.k_batch_stride, p.k_row_stride) +
                                         hk * p.k_head_stride);
        vt = reinterpret_cast<const MT*>(vbase + key_offset(p, s, t0, p.v_batch_stride, p.v_row_stride) +
                                         hk * p.v_head_stride);
        ldk = p.k_row_stride;
        ldv = p.v_row_stride;
      } else {
        MT* kg = grow(sc.k, static_cast<size_t>(kKeysPerTile) * D);
        MT* vg = grow(sc.v, static_cast<size_t>(kKeysPerTile) * Dv);
        for (int j = 0; j < n; ++j) {
          load_row<T, MT>(kg + j * static_cast<int64_t>(D),
                          kbase + key_offset(p, s, t0 + j, p.k_batch_stride, p.k_row_stride) + hk * p.k_head_stride,
                          D, kd);
          load_row<T, MT>(vg + j * static_cast<int64_t>(Dv),
                          vbase + key_offset(p, s, t0 + j, p.v_batch_stride, p.v_row_stride) + hk * p.v_head_stride,
                          Dv, vd);
        }
        kt = kg;
        vt = vg;
        ldk = D;
        ldv = Dv;
      }

      gemm_nt(M, n, D, qt, D, kt, ldk, 0.f, S, kKeysPerTile);
      if (qvt) gemm_nt(M, n, Dv, qvt, Dv, vt, ldv, 1.f, S, kKeysPerTile);

      for (int r = 0; r < M; ++r) {
        const int qi = r / G;
        const int c0 = imax(lo[qi] - n0, 0), c1 = imin(hi[qi] - n0, n);
        float* srow = S + static_cast<int64_t>(r) * kKeysPerTile;
        MT* prow = P + static_cast<int64_t>(r) * kKeysPerTile;
        if (c0 >= c1) {
          std::fill(prow, prow + n, MT(0));
          continue;
        }
        const ScoreMod mod = score_mod(p, s, b, hk * G + r % G);
        const float row_max = logits_max(srow + c0, c1 - c0, mod, i0 + qi, n0 + c0);
        const float m_new = std::max(m[r], row_max);
        const float corr = fast_exp(m[r] - m_new);  // 0 when m[r] was -inf
        const float sum = exp_shift_store(srow + c0, c1 - c0, m_new, prow + c0);
        std::fill(prow, prow + c0, MT(0));
        std::fill(prow + c1, prow + n, MT(0));
        l[r] = l[r] * corr + sum;
        m[r] = m_new;
        if (corr != 1.f) scale_row(acc + static_cast<int64_t>(r) * Dv, Dv, corr);
      }
      gemm_nn(M, Dv, n, P, kKeysPerTile, vt, ldv, 1.f, acc, Dv);
    }
  }

  // Normalize and store: final output, or this split's partial result.
  const float* sink = p.learnable_sink;
  for (int qi = 0; qi < nq; ++qi) {
    const int i = i0 + qi;
    for (int g = 0; g < G; ++g) {
      const int r = qi * G + g, h = hk * G + g;
      float lse = -INFINITY, inv = 0.f;
      if (l[r] > 0.f || l[r] != l[r]) {  // a NaN input propagates as NaN, never as "no key"
        lse = m[r] + std::log(l[r]);
        inv = 1.f / l[r];
      }
      float* arow = acc + static_cast<int64_t>(r) * Dv;
      if (num_splits > 1) {
        const int64_t grow_idx = (split * static_cast<int64_t>(p.total_q) + global_row(p, s, b, i)) * p.num_heads + h;
        float* dst = parts.out + grow_idx * Dv;
        for (int c = 0; c < Dv; ++c) dst[c] = arow[c] * inv;
        parts.lse[grow_idx] = lse;
        continue;
      }
      if (sink) inv *= apply_fmha_sink(lse, sink[h]);
      scale_row(arow, Dv, inv);
      const int64_t row = s.q_row0 + i;
      store_row(p.out, p.out_dtype, b * p.out_batch_stride + row * p.out_row_stride + h * p.out_head_stride,
                arow, Dv);
      p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + row * p.lse_row_stride] = lse;
    }
  }
}

// Output rows that no key reaches by construction are written as 0 / -inf: rows past
// seqused_q[b], and rows of a ragged q that belong to no sequence.
void zero_rows(const FmhaParams& p, int b, int64_t row_begin, int64_t row_end) {
  std::vector<float> zeros(p.head_dim_v, 0.f);
  for (int64_t row = row_begin; row < row_end; ++row)
    for (int h = 0; h < p.num_heads; ++h) {
      store_row(p.out, p.out_dtype, b * p.out_batch_stride + row * p.out_row_stride + h * p.out_head_stride,
                zeros.data(), p.head_dim_v);
      p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + row * p.lse_row_stride] = -INFINITY;
    }
}

void zero_unused_rows(const FmhaParams& p) {
  at::parallel_for(0, p.batch, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const SeqInfo s = seq_info(p, static_cast<int>(b));
      zero_rows(p, static_cast<int>(b), s.q_row0 + s.q_len, s.q_row0 + s.q_len_full);
    }
  });
  if (p.q_is_ragged) {
    zero_rows(p, 0, 0, p.batch > 0 ? p.cu_seqlens_q[0] : p.total_q);
    if (p.batch > 0) zero_rows(p, 0, p.cu_seqlens_q[p.batch], p.total_q);
  }
}

struct Item {
  int b, hk, i0, i1, split, num_splits;
};

template <typename T>
void run_fmha(const FmhaParams& p) {
  const int G = p.num_heads / p.num_heads_k;
  const int rows_per_item = imax(1, kRowsPerTile / G);

  // Splits: from the scheduler metadata when given, else requested / heuristic.
  int max_k = 0, max_q = 0;
  int64_t score_work = 0;  // multiply-adds of QK^T and PV, to decide whether threads pay off
  for (int b = 0; b < p.batch; ++b) {
    const SeqInfo s = seq_info(p, b);
    max_k = imax(max_k, s.k_len);
    max_q = imax(max_q, s.q_len);
    score_work += static_cast<int64_t>(s.q_len) * s.k_len;
  }
  score_work *= static_cast<int64_t>(p.num_heads) * (p.head_dim + p.head_dim_v);
  const int requested = resolve_num_splits(p.num_splits, p.batch, p.num_heads_k, max_q, G, max_k,
                                           at::get_num_threads());
  std::vector<Item> items;
  int max_splits = 1;
  for (int b = 0; b < p.batch; ++b) {
    const SeqInfo s = seq_info(p, b);
    const int ns = sequence_splits(p, b, s.k_len, requested);
    max_splits = imax(max_splits, ns);
    for (int i0 = 0; i0 < s.q_len; i0 += rows_per_item)
      for (int hk = 0; hk < p.num_heads_k; ++hk)
        for (int sp = 0; sp < ns; ++sp) items.push_back({b, hk, i0, imin(i0 + rows_per_item, s.q_len), sp, ns});
  }
  // Heaviest first: later query blocks see more keys under causal masks.
  std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.i0 > y.i0; });

  SplitOutputs parts;
  at::Tensor part_out, part_lse;
  if (max_splits > 1) {
    part_out = at::empty({max_splits, p.total_q, p.num_heads, p.head_dim_v}, at::kFloat);
    part_lse = at::empty({max_splits, p.total_q, p.num_heads}, at::kFloat);
    parts.out = part_out.data_ptr<float>();
    parts.lse = part_lse.data_ptr<float>();
  }
  // below ~10 us of arithmetic, waking the thread pool costs more than it saves (eager decode)
  constexpr int64_t kSerialWork = int64_t{1} << 17;
  parallel_items(static_cast<int64_t>(items.size()), [&](int64_t idx) {
    const Item& it = items[idx];
    attend_tile<T>(p, it.b, it.hk, it.i0, it.i1, it.split, it.num_splits, parts);
  }, score_work < kSerialWork);
  zero_unused_rows(p);
  if (max_splits == 1) return;

  // Merge the splits of every (row, head) exactly as fmha_combine does, then the sink.
  std::vector<int> item_splits(p.batch, 1);
  for (const Item& it : items) item_splits[it.b] = it.num_splits;
  at::parallel_for(0, p.batch, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> o(p.head_dim_v);
    for (int64_t b = b0; b < b1; ++b) {
      const SeqInfo s = seq_info(p, static_cast<int>(b));
      const int ns = item_splits[b];
      if (ns == 1) continue;  // written directly by attend_tile
      for (int i = 0; i < s.q_len; ++i) {
        const int64_t grow_idx0 = global_row(p, s, static_cast<int>(b), i) * p.num_heads;
        const int64_t row = s.q_row0 + i;
        for (int h = 0; h < p.num_heads; ++h) {
          const int64_t gi = grow_idx0 + h;
          const int64_t lse_stride = static_cast<int64_t>(p.total_q) * p.num_heads;
          float lse = combine_rows(parts.lse + gi, lse_stride, parts.out + gi * p.head_dim_v,
                                   lse_stride * p.head_dim_v, ns, p.head_dim_v, o.data());
          if (p.learnable_sink) scale_row(o.data(), p.head_dim_v, apply_fmha_sink(lse, p.learnable_sink[h]));
          store_row(p.out, p.out_dtype, b * p.out_batch_stride + row * p.out_row_stride + h * p.out_head_stride,
                    o.data(), p.head_dim_v);
          p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + row * p.lse_row_stride] = lse;
        }
      }
    }
  });
}

void fmha_cpu(const FmhaProblem& prob) {
  const FmhaParams& p = prob.params;
  switch (p.in_dtype) {
    case DType::kFloat32: return run_fmha<float>(p);
    case DType::kFloat16: return run_fmha<c10::Half>(p);
    case DType::kBFloat16: return run_fmha<c10::BFloat16>(p);
    case DType::kFloat8E4M3: return run_fmha<c10::Float8_e4m3fn>(p);
  }
}

void combine_cpu(const CombineParams& c) {
  at::parallel_for(0, c.rows, 64, [&](int64_t r0, int64_t r1) {
    std::vector<float> o(c.head_dim_v);
    for (int64_t r = r0; r < r1; ++r) {
      const float lse = combine_rows(c.lse_partial + r * c.lse_row_stride, c.lse_split_stride,
                                     c.out_partial + r * c.op_row_stride, c.op_split_stride, c.num_splits,
                                     c.head_dim_v, o.data());
      store_row(c.out, c.out_dtype, r * c.head_dim_v, o.data(), c.head_dim_v);
      c.lse[r] = lse;
    }
  });
}

// The split heuristics schedule for the threads of at::parallel_for.
int cpu_workers(int) { return at::get_num_threads(); }

}  // namespace

MATE_REGISTER_KERNEL(fmha_kernel, CPU, &fmha_cpu);
MATE_REGISTER_KERNEL(combine_kernel, CPU, &combine_cpu);
MATE_REGISTER_KERNEL(num_workers_kernel, CPU, &cpu_workers);

}  // namespace mate::cpu
