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

// Dequantizes the Dqk channels of one FP8 token into dst (fp32).
MATE_HD void load_mla_fp8_token(const MlaCache& c, int blk, int off, float* dst) {
  const uint8_t* block = c.base + blk * c.block_stride;
  if (c.format == MlaCacheFormat::kFp8V32) {
    const uint8_t* tok = block + off * c.token_stride;
    float scales[4];
    memcpy(scales, tok + 512, 16);
    for (int i = 0; i < 512; ++i) dst[i] = fp8_e4m3_to_float(tok[i]) * scales[i / 128];
    for (int i = 0; i < 64; ++i) {
      uint16_t h;
      memcpy(&h, tok + 528 + 2 * i, 2);
      dst[512 + i] = bf16_to_float(h);
    }
  } else {  // MODEL1
    const uint8_t* tok = block + off * kMlaModel1DataBytes;
    const uint8_t* sc = block + static_cast<int64_t>(c.page_size) * kMlaModel1DataBytes + off * 8;
    for (int i = 0; i < 448; ++i) {
      const int e = sc[i / 64];
      dst[i] = ldexpf(fp8_e4m3_to_float(tok[i]), e - 127);
    }
    for (int i = 0; i < 64; ++i) {
      uint16_t h;
      memcpy(&h, tok + 448 + 2 * i, 2);
      dst[448 + i] = bf16_to_float(h);
    }
  }
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
