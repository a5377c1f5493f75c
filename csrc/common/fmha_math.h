// Math of SEMANTICS §1-2 shared by the CPU reference and the device kernels:
// where sequence b lives, how keys are split, how splits merge. Which keys a query row may
// see and what its scores are: fmha_score.h. Host/device neutral: no torch, no std containers.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "fmha_params.h"

namespace mate {

// floor(a / b) and ceil(a / b) for b > 0 and every int a. Truncating a / b cannot overflow
// for b > 0, and the +-1 corrections only happen when |a / b| <= INT_MAX / 2.
MATE_HD int floor_div(int a, int b) {
  const int q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}
MATE_HD int ceil_div_signed(int a, int b) {
  const int q = a / b;
  return (a % b != 0 && a > 0) ? q + 1 : q;
}
// ceil(a / b) for a >= 0, b > 0, without forming a + b - 1.
constexpr float kLog2e = 1.4426950408889634f;  // exp(x) = exp2(x * kLog2e)

MATE_HD int ceil_div_pos(int a, int b) { return a / b + (a % b != 0 ? 1 : 0); }
MATE_HD int imin(int a, int b) { return a < b ? a : b; }
MATE_HD int imax(int a, int b) { return a > b ? a : b; }

// Where one sequence's queries and keys are, in storage coordinates.
struct SeqInfo {
  int q_len = 0;        // real query rows (seqused_q wins over the layout's length)
  int q_len_full = 0;   // rows of this sequence in the output (rows >= q_len are zeroed)
  int64_t q_row0 = 0;   // first row index (ragged) or 0 (dense, batch stride used)
  int k_start = 0;      // first real key (cache_leftpad)
  int k_len = 0;        // real keys: storage positions [k_start, k_start + k_len)
  int64_t k_row0 = 0;   // ragged: cu_seqlens_k[b]; else 0
  int cache_row = 0;    // dense cache row or page-table row (cache_batch_idx)
  int mask_k_len = 0;   // Sk the masks align with (global length under context parallel)
};

// Keys fmha_fwd_kvcache appends to sequence b before attending (0 for the other ops).
MATE_HD int new_keys(const FmhaParams& p, int b) {
  return p.cu_seqlens_k_new ? p.cu_seqlens_k_new[b + 1] - p.cu_seqlens_k_new[b] : p.seqlen_k_new;
}

MATE_HD SeqInfo seq_info(const FmhaParams& p, int b) {
  SeqInfo s;
  if (p.q_is_ragged) {
    s.q_row0 = p.cu_seqlens_q[b];
    s.q_len_full = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b];
  } else {
    s.q_len_full = p.seqlen_q;
  }
  s.q_len = p.seqused_q ? imin(p.seqused_q[b], s.q_len_full) : s.q_len_full;
  s.cache_row = p.cache_batch_idx ? p.cache_batch_idx[b] : b;
  int k_end;
  if (p.k_is_ragged) {
    s.k_row0 = p.cu_seqlens_k[b];
    k_end = p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b];
  } else {
    k_end = p.seqlen_k;
  }
  if (p.seqused_k) k_end = p.seqused_k[b] + new_keys(p, b);
  s.k_start = p.cache_leftpad ? p.cache_leftpad[b] : 0;
  s.k_len = imax(k_end - s.k_start, 0);
  s.mask_k_len = p.cp_tot_seqused_k ? p.cp_tot_seqused_k[b] : s.k_len;
  return s;
}

// Row of query i of sequence b in the (total_q, ...) numbering of split buffers.
MATE_HD int64_t global_row(const FmhaParams& p, const SeqInfo& s, int b, int i) {
  return p.q_is_ragged ? s.q_row0 + i : static_cast<int64_t>(b) * p.seqlen_q + i;
}

// Where key `t` (storage position) of a sequence lives: its page (paged) or cache row
// (dense/ragged, batch stride 0 for ragged) and its row inside it. K and V share it.
struct KeySlot {
  int64_t batch;
  int64_t row;
};
MATE_HD KeySlot key_slot(const FmhaParams& p, const SeqInfo& s, int t) {
  if (p.page_size > 0)
    return {p.page_table[s.cache_row * p.page_table_batch_stride + t / p.page_size], t % p.page_size};
  return {s.cache_row, s.k_row0 + t};
}

// Element offset of key `t` in k (or v, with its strides).
MATE_HD int64_t key_offset(const FmhaParams& p, const SeqInfo& s, int t, int64_t batch_stride,
                           int64_t row_stride) {
  const KeySlot k = key_slot(p, s, t);
  return k.batch * batch_stride + k.row * row_stride;
}

// Key range [lo, hi) of split `split` out of `num_splits`, in units of `block` keys.
// No overflow for any k_len: the ceilings avoid k_len + block - 1, the products are 64-bit
// ((split + 1) * per_split * block may pass 2^31 - 1), and no division is 64-bit.
MATE_HD void split_key_range(int k_len, int block, int split, int num_splits, int& lo, int& hi) {
  const int n_blocks = ceil_div_pos(k_len, block);
  const int per_split = ceil_div_pos(n_blocks, num_splits);
  const int64_t keys = static_cast<int64_t>(per_split) * block;
  const int64_t l = split * keys, h = (split + 1) * keys;
  lo = l < k_len ? static_cast<int>(l) : k_len;
  hi = h < k_len ? static_cast<int>(h) : k_len;
}

// Start of the tile after the one at c0, for tiles of `step` keys that end at `end`
// (c0 < end): c0 + step, or `end` for the last tile. Loops over keys step with it so that no
// position past `end` is formed (c0 + step can pass 2^31 - 1 when `end` is near it).
MATE_HD int next_tile(int c0, int step, int end) { return end - c0 > step ? c0 + step : end; }

// Splits for num_splits == 0: split the key range only when the (batch, kv head,
// query block) units cannot fill the machine (SMs on a GPU, threads on the CPU).
MATE_HD int num_splits_heuristic(int64_t work_units, int num_workers, int num_key_blocks,
                                 int max_splits) {
  if (num_key_blocks <= 1 || work_units <= 0 || work_units * 5 >= static_cast<int64_t>(num_workers) * 4)
    return 1;
  int splits = static_cast<int>((num_workers + work_units - 1) / work_units);
  splits = imin(splits, num_key_blocks);
  splits = imin(splits, max_splits);
  return imax(splits, 1);
}

MATE_HD bool lse_counts(float x) { return x == x && x > -INFINITY; }  // not NaN, not -inf

// log(sum_s exp(lse_s)) over the splits that count; -inf when none does.
MATE_HD float combined_lse(const float* lse, int64_t stride, int n) {
  float m = -INFINITY;
  for (int s = 0; s < n; ++s) {
    const float x = lse[s * stride];
    if (lse_counts(x) && x > m) m = x;
  }
  if (m == -INFINITY) return -INFINITY;
  if (m == INFINITY) return INFINITY;
  float sum = 0.f;
  for (int s = 0; s < n; ++s) {
    const float x = lse[s * stride];
    if (lse_counts(x)) sum += expf(x - m);
  }
  return m + logf(sum);
}

// Weight of a split with log-sum-exp x in a total `total`; 0 for splits that do not count.
MATE_HD float split_weight(float x, float total) {
  if (!lse_counts(x) || !(total > -INFINITY)) return 0.f;
  const float w = expf(x - total);
  return w == w ? w : 0.f;
}

// Learnable sink (FMHA semantics): one extra unscaled logit in the denominator.
// Returns the factor the normalized output is multiplied by and updates lse.
MATE_HD float apply_fmha_sink(float& lse, float sink) {
  if (!(lse > -INFINITY)) {
    lse = sink;
    return 0.f;
  }
  const float m = lse > sink ? lse : sink;
  if (m == INFINITY) {  // sink = +inf swallows everything
    lse = INFINITY;
    return 0.f;
  }
  const float total = m + logf(expf(lse - m) + expf(sink - m));
  const float scale = expf(lse - total);
  lse = total;
  return scale;
}

// float8 e4m3fn (bias 7, no infinities, 0x7f/0xff are NaN) to float, bit-exact.
MATE_HD float fp8_e4m3_to_float(uint8_t x) {
  const uint32_t sign = static_cast<uint32_t>(x & 0x80) << 24;
  const uint32_t exp = (x >> 3) & 0xF, man = x & 0x7;
  float f;
  if ((x & 0x7F) == 0x7F) {
    f = NAN;
  } else if (exp == 0) {
    f = static_cast<float>(man) * 0.001953125f;  // man * 2^-9
  } else {
    uint32_t bits = ((exp + 120) << 23) | (man << 20);
    memcpy(&f, &bits, 4);
  }
  return sign ? -f : f;
}

}  // namespace mate
