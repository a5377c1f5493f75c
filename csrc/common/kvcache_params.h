// Parameter structs and math of the kv-cache family (SEMANTICS §1 "Append and rotary"):
// kvcache_append (writes new keys/values into a dense or paged cache, optionally
// rotating keys) and rotary_embedding (rotates q). Torch-free: device kernels use it.
#pragma once

#include <cstdint>

#include "fmha_params.h"
#include "host_device.h"

namespace mate {

// Rotary tables and how to apply them.
struct RotaryParams {
  const void* cos = nullptr;     // (Sro, R/2), dtype of the rotated tensor
  const void* sin = nullptr;
  int64_t cos_row_stride = 0, sin_row_stride = 0;
  int rotary_dim = 0;            // R (0 = no rotary)
  int max_positions = 0;         // Sro
  bool interleaved = true;       // GPT-J pairs (2m, 2m+1); else NeoX pairs (m, m + R/2)
  DType table_dtype = DType::kBFloat16;  // of cos/sin: the rotated tensor's, or fp32/fp16/bf16 for fp8
};

struct AppendParams {
  void* k_cache = nullptr;       // dense (rows, Sk, Hk, D) or paged (pages, P, Hk, D)
  void* v_cache = nullptr;
  const void* k = nullptr;       // dense (B, Snew, Hk, D) or packed (Tnew, Hk, D)
  const void* v = nullptr;
  int64_t kc_batch_stride = 0, kc_row_stride = 0, kc_head_stride = 0;
  int64_t vc_batch_stride = 0, vc_row_stride = 0, vc_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;   // batch 0 when packed
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;

  const int32_t* cache_seqlens = nullptr;     // (B): write position of the first new key
  const int32_t* cu_seqlens_k_new = nullptr;  // (B+1) packed new keys
  const int32_t* page_table = nullptr;        // (rows, max_pages)
  int64_t page_table_batch_stride = 0;
  const int32_t* cache_batch_idx = nullptr;   // (B)
  const int32_t* rotary_seqlens = nullptr;    // (B): rotary position of the first new key
  const int32_t* cache_leftpad = nullptr;     // (B): validated only (see kvcache_append)

  int batch = 0, seqlen_new = 0, heads_k = 0, head_dim = 0, head_dim_v = 0;
  int page_size = 0, max_pages = 0;
  int cache_rows = 0;      // dense: cache rows; paged: page-table rows
  int num_pages = 0;       // paged: pages in the pool
  int64_t capacity = 0;    // keys one sequence can hold (Sk, or max_pages * P)
  int64_t total_new = 0;   // rows of a packed k / v
  DType dtype = DType::kBFloat16;
  RotaryParams rotary;
};

// rotary_embedding: x (B, S, H, D) or ragged (T, H, D) -> out (same shape).
struct RotaryApplyParams {
  const void* x = nullptr;
  void* out = nullptr;
  int64_t x_batch_stride = 0, x_row_stride = 0, x_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  const int32_t* seqlen_offsets = nullptr;  // (B): position of row 0
  const int32_t* cu_seqlens = nullptr;      // (B+1) ragged rows
  int batch = 0, seqlen = 0, total_rows = 0, heads = 0, head_dim = 0;
  int max_rows = 0;                         // upper bound of any sequence's rows (grid size)
  bool positions_per_row = true;            // row t at offset + t; else every row at offset
  DType dtype = DType::kBFloat16;
  RotaryParams rotary;
};

// Channel pair m of a rotary of dimension R: the two channel indices it rotates.
MATE_HD void rotary_pair(int m, int rotary_dim, bool interleaved, int& c1, int& c2) {
  if (interleaved) {
    c1 = 2 * m;
    c2 = 2 * m + 1;
  } else {
    c1 = m;
    c2 = m + rotary_dim / 2;
  }
}

// (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos)
MATE_HD void rotate(float x1, float x2, float c, float s, float& y1, float& y2) {
  y1 = x1 * c - x2 * s;
  y2 = x1 * s + x2 * c;
}

// Number of new keys of sequence b.
MATE_HD int new_len(const AppendParams& p, int b) {
  return p.cu_seqlens_k_new ? p.cu_seqlens_k_new[b + 1] - p.cu_seqlens_k_new[b] : p.seqlen_new;
}

// Element offset of cache position t of sequence b (cache row = cache_batch_idx[b] or b).
MATE_HD int64_t cache_offset(const AppendParams& p, int b, int t, int64_t batch_stride, int64_t row_stride) {
  const int row = p.cache_batch_idx ? p.cache_batch_idx[b] : b;
  if (p.page_size > 0) {
    const int page = p.page_table[row * p.page_table_batch_stride + t / p.page_size];
    return page * batch_stride + static_cast<int64_t>(t % p.page_size) * row_stride;
  }
  return row * batch_stride + static_cast<int64_t>(t) * row_stride;
}

}  // namespace mate
