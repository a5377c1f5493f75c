// Parameters and cache formats of the MLA family (SEMANTICS §3): mla_decode (dense,
// sparse top-k, FP8 V3.2 / MODEL1 caches, attn_sink, extra cache) and
// mla_sparse_prefill. Torch-free: device kernels include this file.
#pragma once

#include <cstdint>
#include <cstring>

#include "dtype_convert.h"
#include "fmha_math.h"
#include "fmha_params.h"

namespace mate {

enum class MlaCacheFormat : int32_t {
  kBFloat16 = 0,
  kFloat16 = 1,
  kFloat32 = 2,
  kFp8V32 = 3,     // 656 B/token: 512 e4m3 | 4 fp32 scales (per 128) | 64 bf16 rope; Dqk 576
  kFp8Model1 = 4,  // per block: P x (448 e4m3 | 64 bf16) then P x (7 ue8m0 scales + pad); Dqk 512
};

constexpr int kMlaV32TokenBytes = 656;
constexpr int kMlaModel1TokenBytes = 584;  // 576 data + 8 scale bytes
constexpr int kMlaModel1DataBytes = 576;

// One paged latent cache: token `off` of block `blk`, kv head `h`.
struct MlaCache {
  const uint8_t* base = nullptr;
  int64_t block_stride = 0, token_stride = 0, head_stride = 0;  // bytes
  int page_size = 0, num_blocks = 0;
  MlaCacheFormat format = MlaCacheFormat::kBFloat16;
};

struct MlaParams {
  const void* q = nullptr;  // (B, Sq, Hq, Dqk)
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  void* out = nullptr;      // (B, Sq, Hq, Dv) contiguous
  float* lse = nullptr;     // (B, Hq, Sq) contiguous
  float* max_logits = nullptr;  // (B, Sq, Hq) contiguous, optional (sparse prefill)

  MlaCache cache, extra;
  const int32_t* block_table = nullptr;   // dense: (B, max_blocks)
  int64_t block_table_stride = 0;
  int max_blocks = 0;
  const int32_t* cache_seqlens = nullptr; // dense: (B)
  const int32_t* indices = nullptr;       // sparse: (B, Sq, topk)
  int64_t indices_batch_stride = 0, indices_row_stride = 0;
  int topk = 0;
  const int32_t* topk_length = nullptr;   // (B)
  const int32_t* extra_indices = nullptr; // (B, Sq, extra_topk)
  int64_t extra_batch_stride = 0, extra_row_stride = 0;
  int extra_topk = 0;
  const int32_t* extra_topk_length = nullptr;
  const float* attn_sink = nullptr;       // (Hq)

  int batch = 0, seqlen_q = 0, heads_q = 0, heads_kv = 0, head_dim = 0, head_dim_v = 0;
  float softmax_scale = 1.f;
  bool causal = false;
  DType q_dtype = DType::kBFloat16, out_dtype = DType::kBFloat16;
};

// Channel i (fp32) of one FP8 token: `token` is its first byte, `scales` its MODEL1 scale
// bytes (unused for V3.2, whose scales follow the latent bytes).
MATE_HD float mla_fp8_channel(MlaCacheFormat format, const uint8_t* token, const uint8_t* scales, int i) {
  uint16_t h;
  if (format == MlaCacheFormat::kFp8V32) {
    if (i < 512) {
      float scale;
      memcpy(&scale, token + 512 + 4 * (i / 128), 4);
      return fp8_e4m3_to_float(token[i]) * scale;
    }
    memcpy(&h, token + 528 + 2 * (i - 512), 2);
    return bf16_to_float(h);
  }
  if (i < 448) return ldexpf(fp8_e4m3_to_float(token[i]), static_cast<int>(scales[i / 64]) - 127);
  memcpy(&h, token + 448 + 2 * (i - 448), 2);
  return bf16_to_float(h);
}

// Where token `off` of block `blk` starts (kv head h), and its MODEL1 scale bytes.
struct MlaTokenRef {
  const uint8_t* data = nullptr;    // nullptr: no such key (masked, never read)
  const uint8_t* scales = nullptr;  // MODEL1 only
};

MATE_HD MlaTokenRef mla_token(const MlaCache& c, int64_t blk, int off, int h) {
  const uint8_t* block = c.base + blk * c.block_stride;
  if (c.format == MlaCacheFormat::kFp8Model1)
    return {block + static_cast<int64_t>(off) * kMlaModel1DataBytes,
            block + static_cast<int64_t>(c.page_size) * kMlaModel1DataBytes + static_cast<int64_t>(off) * 8};
  return {block + off * c.token_stride + h * c.head_stride, nullptr};
}

// Dequantizes the Dqk channels of one FP8 token into dst (fp32).
MATE_HD void load_mla_fp8_token(const MlaCache& c, int blk, int off, float* dst) {
  const MlaTokenRef t = mla_token(c, blk, off, 0);
  const int dqk = c.format == MlaCacheFormat::kFp8V32 ? 576 : 512;
  for (int i = 0; i < dqk; ++i) dst[i] = mla_fp8_channel(c.format, t.data, t.scales, i);
}

// The keys of one query row (b, s): a causal prefix of the dense paged cache, or the
// index positions [0, topk + extra_topk) of the sparse lists, position j < topk in the main
// list and the rest in the extra one; invalid positions are masked.
struct MlaKeys {
  int b = 0, s = 0;
  int positions = 0;          // dense: cache_seqlens[b]; sparse: topk + extra_topk
  int main_count = 0, extra_count = 0;  // sparse: the counted prefix of each list
  const int32_t* main = nullptr;
  const int32_t* extra = nullptr;
};

MATE_HD MlaKeys mla_keys(const MlaParams& p, int b, int s) {
  MlaKeys k;
  k.b = b;
  k.s = s;
  if (p.block_table) {
    k.positions = imax(0, p.cache_seqlens[b]);
    return k;
  }
  k.positions = p.topk + p.extra_topk;
  k.main_count = p.topk_length ? imax(0, imin(p.topk_length[b], p.topk)) : p.topk;
  k.main = p.indices + b * p.indices_batch_stride + s * p.indices_row_stride;
  if (p.extra_indices) {
    k.extra_count = p.extra_topk_length ? imax(0, imin(p.extra_topk_length[b], p.extra_topk)) : p.extra_topk;
    k.extra = p.extra_indices + b * p.extra_batch_stride + s * p.extra_row_stride;
  }
  return k;
}

// Key j of a row's keys, or {} when it does not count (past the dense length, past a list's
// counted prefix, index -1 or out of range). Causal limits are the caller's (per row).
MATE_HD MlaTokenRef mla_key(const MlaParams& p, const MlaKeys& k, int j, int h) {
  if (p.block_table) {
    if (j >= k.positions) return {};
    const int P = p.cache.page_size;
    return mla_token(p.cache, p.block_table[k.b * p.block_table_stride + j / P], j % P, h);
  }
  const MlaCache* c = &p.cache;
  int32_t x = -1;
  if (j < p.topk) {
    if (j < k.main_count) x = k.main[j];
  } else {
    c = &p.extra;
    if (j - p.topk < k.extra_count) x = k.extra[j - p.topk];
  }
  if (x < 0 || x >= static_cast<int64_t>(c->num_blocks) * c->page_size) return {};
  return mla_token(*c, x / c->page_size, x % c->page_size, h);
}

// Keys row s of a dense cache of `len` keys may see (causal: bottom-right aligned).
MATE_HD int mla_causal_limit(const MlaParams& p, int len, int s) {
  return p.causal ? imax(0, imin(len, s + len - p.seqlen_q + 1)) : len;
}

// Tile scheduler metadata of get_mla_metadata: (num_parts, 8) int32 rows
// [begin_batch, begin_block, end_batch, end_block, first_split, 0, 0, 0] and
// num_splits (B+1) cumulative split counts. Parts depend on workers and arguments only.
constexpr int kMlaMetadataCols = 8;
constexpr int kMlaBlockTokens = 64;

MATE_HD int mla_num_parts(int num_workers, int num_heads_k, int num_q_tokens_per_head_k) {
  const int m_blocks = imax(1, (num_q_tokens_per_head_k + kMlaBlockTokens - 1) / kMlaBlockTokens);
  return imax(1, num_workers / imax(1, num_heads_k) / m_blocks);
}

// get_mla_metadata's schedule: each sequence's 64-token key blocks are dealt out evenly
// over `parts` parts, in order (FlashMLA's idea). Single-threaded and allocation-free, so
// a backend may run it on the host or in a one-thread device kernel.
struct MlaMetadataParams {
  const int32_t* cache_seqlens = nullptr;  // (batch): keys per sequence (dense decode)
  int64_t fixed_keys = -1;                 // >= 0: every sequence has this many (topk + extra_topk)
  int batch = 0;
  int parts = 1;
  int32_t* metadata = nullptr;             // (parts, kMlaMetadataCols)
  int32_t* num_splits = nullptr;           // (batch + 1): cumulative splits
};

MATE_HD int64_t mla_key_blocks(const MlaMetadataParams& p, int b) {
  const int64_t keys = p.fixed_keys >= 0 ? p.fixed_keys : (p.cache_seqlens[b] > 0 ? p.cache_seqlens[b] : 0);
  const int64_t blocks = (keys + kMlaBlockTokens - 1) / kMlaBlockTokens;
  return blocks > 1 ? blocks : 1;
}

MATE_HD void mla_schedule(const MlaMetadataParams& p) {
  int64_t total = 0;
  for (int b = 0; b < p.batch; ++b) total += mla_key_blocks(p, b);
  const int64_t per_part_raw = (total + p.parts - 1) / p.parts;
  const int64_t per_part = per_part_raw > 1 ? per_part_raw : 1;
  for (int b = 0; b <= p.batch; ++b) p.num_splits[b] = 0;
  int b = 0;
  int64_t blk = 0, split_count = 0;
  for (int part = 0; part < p.parts; ++part) {
    int32_t* row = p.metadata + static_cast<int64_t>(part) * kMlaMetadataCols;
    row[0] = b;
    row[1] = static_cast<int32_t>(blk);
    row[4] = static_cast<int32_t>(split_count);
    row[5] = row[6] = row[7] = 0;
    int64_t budget = per_part;
    while (b < p.batch && budget > 0) {
      const int64_t blocks = mla_key_blocks(p, b);
      const int64_t take = budget < blocks - blk ? budget : blocks - blk;
      blk += take;
      budget -= take;
      ++p.num_splits[b + 1];  // splits of sequence b, summed below
      ++split_count;
      if (blk == blocks) {
        ++b;
        blk = 0;
      }
    }
    row[2] = b;
    row[3] = static_cast<int32_t>(blk);
  }
  for (int i = 0; i < p.batch; ++i) {
    const int32_t n = p.num_splits[i + 1];
    p.num_splits[i + 1] = p.num_splits[i] + (n > 1 ? n : 1);
  }
}

}  // namespace mate
