// CPU reference kernels of the MLA family: mla_decode (dense / sparse / FP8 / sink /
// extra cache), mla_sparse_prefill and get_mla_metadata.
//
// One work item is one query position with the query heads of one kv head (all heads
// for sparse MLA). Its keys (a causal prefix of the paged cache, or the valid top-k
// indices of both caches) are gathered and dequantized tile by tile into fp32 scratch,
// then scored with an online softmax; V is the first head_dim_v channels of each key.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <vector>

#include "../common/mla_checks.h"
#include "cpu_blas.h"
#include "cpu_math.h"
#include "cpu_parallel.h"

namespace mate::cpu {
namespace {

constexpr int kMlaKeysPerTile = 128;

struct KeyRef {
  const MlaCache* cache;
  int block, offset;
};

// Writes the Dqk fp32 channels of one key (kv head h) into dst.
void load_key(const KeyRef& k, int h, int dqk, float* dst) {
  const MlaCache& c = *k.cache;
  switch (c.format) {
    case MlaCacheFormat::kFp8V32:
    case MlaCacheFormat::kFp8Model1: return load_mla_fp8_token(c, k.block, k.offset, dst);
    default: break;
  }
  const uint8_t* src = c.base + k.block * c.block_stride + k.offset * c.token_stride + h * c.head_stride;
  if (c.format == MlaCacheFormat::kBFloat16) {
    const auto* s = reinterpret_cast<const c10::BFloat16*>(src);
    for (int i = 0; i < dqk; ++i) dst[i] = static_cast<float>(s[i]);
  } else if (c.format == MlaCacheFormat::kFloat16) {
    const auto* s = reinterpret_cast<const c10::Half*>(src);
    for (int i = 0; i < dqk; ++i) dst[i] = static_cast<float>(s[i]);
  } else {
    std::memcpy(dst, src, dqk * sizeof(float));
  }
}

float q_value(const MlaParams& p, int64_t offset) {
  switch (p.q_dtype) {
    case DType::kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(p.q)[offset]);
    case DType::kFloat16: return static_cast<float>(static_cast<const c10::Half*>(p.q)[offset]);
    default: return static_cast<const float*>(p.q)[offset];
  }
}

// The keys of item (b, s, hkv): a causal prefix of the dense cache, or the valid indices.
void collect_keys(const MlaParams& p, int b, int s, std::vector<KeyRef>& keys) {
  keys.clear();
  if (p.block_table) {
    const int len = p.cache_seqlens[b];
    int limit = len;
    if (p.causal) limit = imax(0, imin(len, s + len - p.seqlen_q + 1));
    const int32_t* row = p.block_table + b * p.block_table_stride;
    for (int t = 0; t < limit; ++t) keys.push_back({&p.cache, row[t / p.cache.page_size], t % p.cache.page_size});
    return;
  }
  auto add = [&](const MlaCache& c, const int32_t* idx, int count) {
    const int64_t slots = static_cast<int64_t>(c.num_blocks) * c.page_size;
    for (int i = 0; i < count; ++i) {
      const int32_t x = idx[i];
      if (x < 0 || x >= slots) continue;  // -1 and out-of-range indices are ignored
      keys.push_back({&c, x / c.page_size, x % c.page_size});
    }
  };
  const int n = p.topk_length ? imax(0, imin(p.topk_length[b], p.topk)) : p.topk;
  add(p.cache, p.indices + b * p.indices_batch_stride + s * p.indices_row_stride, n);
  if (p.extra_indices) {
    const int ne = p.extra_topk_length ? imax(0, imin(p.extra_topk_length[b], p.extra_topk)) : p.extra_topk;
    add(p.extra, p.extra_indices + b * p.extra_batch_stride + s * p.extra_row_stride, ne);
  }
}

struct MlaScratch {
  std::vector<KeyRef> keys;
  std::vector<float> q, k, s, acc, m, l;
};

void attend_item(const MlaParams& p, int b, int s, int hkv) {
  static thread_local MlaScratch sc;
  const int G = p.heads_q / p.heads_kv, D = p.head_dim, Dv = p.head_dim_v;
  collect_keys(p, b, s, sc.keys);
  const int nkeys = static_cast<int>(sc.keys.size());
  sc.q.resize(static_cast<size_t>(G) * D);
  sc.acc.assign(static_cast<size_t>(G) * Dv, 0.f);
  sc.m.assign(G, -INFINITY);
  sc.l.assign(G, 0.f);
  for (int g = 0; g < G; ++g) {
    const int64_t base = b * p.q_batch_stride + s * p.q_row_stride + (hkv * G + g) * p.q_head_stride;
    for (int c = 0; c < D; ++c) sc.q[g * D + c] = q_value(p, base + c);
  }
  sc.k.resize(static_cast<size_t>(kMlaKeysPerTile) * D);
  sc.s.resize(static_cast<size_t>(G) * kMlaKeysPerTile);
  for (int n0 = 0; n0 < nkeys; n0 += kMlaKeysPerTile) {
    const int n = imin(kMlaKeysPerTile, nkeys - n0);
    for (int j = 0; j < n; ++j) load_key(sc.keys[n0 + j], hkv, D, sc.k.data() + static_cast<int64_t>(j) * D);
    gemm_nt(G, n, D, sc.q.data(), D, sc.k.data(), D, 0.f, sc.s.data(), kMlaKeysPerTile);
    for (int g = 0; g < G; ++g) {
      float* row = sc.s.data() + static_cast<int64_t>(g) * kMlaKeysPerTile;
      const float mx = scale_softcap_max(row, n, p.softmax_scale, 0.f);
      const float m_new = std::max(sc.m[g], mx);
      const float corr = fast_exp(sc.m[g] - m_new);
      sc.l[g] = sc.l[g] * corr + exp_shift_store(row, n, m_new, row);
      sc.m[g] = m_new;
      if (corr != 1.f) scale_row(sc.acc.data() + static_cast<int64_t>(g) * Dv, Dv, corr);
    }
    gemm_nn(G, Dv, n, sc.s.data(), kMlaKeysPerTile, sc.k.data(), D, 1.f, sc.acc.data(), Dv);
  }
  for (int g = 0; g < G; ++g) {
    const int h = hkv * G + g;
    float* o = sc.acc.data() + static_cast<int64_t>(g) * Dv;
    float lse = INFINITY;  // MLA: a query with no key has lse +inf
    if (sc.l[g] > 0.f || sc.l[g] != sc.l[g]) {  // NaN inputs propagate, never read as "no key"
      lse = sc.m[g] + std::log(sc.l[g]);
      float f = 1.f / sc.l[g];
      // MLA sink: out * exp(lse) / (exp(lse) + exp(sink)); lse excludes the sink
      if (p.attn_sink) f /= 1.f + std::exp(p.attn_sink[h] - lse);
      scale_row(o, Dv, f);
    } else {
      std::fill(o, o + Dv, 0.f);
    }
    const int64_t out_row = (static_cast<int64_t>(b) * p.seqlen_q + s) * p.heads_q + h;
    store_row(p.out, p.out_dtype, out_row * Dv, o, Dv);
    p.lse[(static_cast<int64_t>(b) * p.heads_q + h) * p.seqlen_q + s] = lse;
    if (p.max_logits) p.max_logits[out_row] = (sc.l[g] > 0.f || sc.l[g] != sc.l[g]) ? sc.m[g] : -INFINITY;
  }
}

void run_mla(const MlaParams& p) {
  check_mla_index_values(p);
  const int64_t items = static_cast<int64_t>(p.batch) * p.seqlen_q * p.heads_kv;
  parallel_items(items, [&](int64_t i) {
    const int hkv = static_cast<int>(i % p.heads_kv);
    const int64_t bs = i / p.heads_kv;
    attend_item(p, static_cast<int>(bs / p.seqlen_q), static_cast<int>(bs % p.seqlen_q), hkv);
  });
}

std::tuple<at::Tensor, at::Tensor> mla_decode(
    const at::Tensor& q, const at::Tensor& k_cache, const std::optional<at::Tensor>& block_table,
    const std::optional<at::Tensor>& cache_seqlens, int64_t head_dim_v,
    const std::optional<at::Tensor>& tile_scheduler_metadata, const std::optional<at::Tensor>& num_splits,
    std::optional<double> softmax_scale, bool causal, bool is_fp8_kvcache, const std::optional<at::Tensor>& indices,
    const std::optional<at::Tensor>& attn_sink, const std::optional<at::Tensor>& extra_k_cache,
    const std::optional<at::Tensor>& extra_indices_in_kvcache, const std::optional<at::Tensor>& topk_length,
    const std::optional<at::Tensor>& extra_topk_length) {
  MlaProblem prob = check_mla_decode_inputs(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal,
                                            is_fp8_kvcache, indices, attn_sink, extra_k_cache, extra_indices_in_kvcache,
                                            topk_length, extra_topk_length);
  // The scheduler metadata only guides device kernels: the CPU result never depends on it.
  if (tile_scheduler_metadata)
    TORCH_CHECK(tile_scheduler_metadata->scalar_type() == at::kInt && tile_scheduler_metadata->dim() == 2 &&
                    tile_scheduler_metadata->size(1) == kMlaMetadataCols,
                "tile_scheduler_metadata must be int32 (num_parts, 8) from get_mla_metadata, got ",
                tile_scheduler_metadata->sizes());
  if (num_splits)
    TORCH_CHECK(num_splits->scalar_type() == at::kInt && num_splits->dim() == 1 && num_splits->size(0) == static_cast<int64_t>(prob.params.batch) + 1,
                "num_splits must be int32 (batch_size + 1,) from get_mla_metadata, got ", num_splits->sizes());
  at::Tensor out = at::empty(prob.out_shape, q.options());
  at::Tensor lse = at::empty(prob.lse_shape, q.options().dtype(at::kFloat));
  set_mla_outputs(prob, out, lse, std::nullopt);
  run_mla(prob.params);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mla_sparse_prefill(const at::Tensor& q, const at::Tensor& kv,
                                                                  const at::Tensor& indices, double sm_scale,
                                                                  int64_t d_v,
                                                                  const std::optional<at::Tensor>& attn_sink,
                                                                  const std::optional<at::Tensor>& topk_length) {
  MlaProblem prob = check_mla_sparse_prefill_inputs(q, kv, indices, sm_scale, d_v, attn_sink, topk_length);
  at::Tensor out = at::empty(prob.out_shape, q.options());
  at::Tensor lse = at::empty(prob.lse_shape, q.options().dtype(at::kFloat));
  at::Tensor max_logits = at::empty(prob.lse_shape, q.options().dtype(at::kFloat));
  set_mla_outputs(prob, out, lse, max_logits);
  run_mla(prob.params);
  return {out, max_logits, lse};
}

// Splits each sequence's 64-token blocks evenly over the parts (FlashMLA's idea); the CPU
// kernel does not need it, device kernels will.
std::tuple<at::Tensor, at::Tensor> get_mla_metadata(const at::Tensor& cache_seqlens, int64_t num_q_tokens_per_head_k,
                                                    int64_t num_heads_k, std::optional<int64_t> num_heads_q,
                                                    bool is_fp8_kvcache, std::optional<int64_t> topk,
                                                    std::optional<int64_t> extra_topk) {
  const int parts = check_mla_metadata_args(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, topk, extra_topk,
                                            at::get_num_threads());
  const int64_t batch = cache_seqlens.size(0);
  const auto lens = cache_seqlens.contiguous();
  const int32_t* len = lens.data_ptr<int32_t>();
  std::vector<int64_t> blocks(batch);
  int64_t total = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t keys = topk ? *topk + extra_topk.value_or(0) : std::max<int32_t>(len[b], 0);
    blocks[b] = std::max<int64_t>(1, (keys + kMlaBlockTokens - 1) / kMlaBlockTokens);
    total += blocks[b];
  }
  at::Tensor meta = at::zeros({parts, kMlaMetadataCols}, cache_seqlens.options());
  at::Tensor splits = at::zeros({batch + 1}, cache_seqlens.options());
  auto* m = meta.data_ptr<int32_t>();
  auto* sp = splits.data_ptr<int32_t>();
  const int64_t per_part = std::max<int64_t>(1, (total + parts - 1) / parts);
  int64_t b = 0, blk = 0, split_count = 0;
  std::vector<int32_t> splits_of(batch, 0);
  for (int part = 0; part < parts; ++part) {
    int32_t* row = m + part * kMlaMetadataCols;
    row[0] = static_cast<int32_t>(std::min(b, batch));
    row[1] = static_cast<int32_t>(blk);
    row[4] = static_cast<int32_t>(split_count);
    int64_t budget = per_part;
    while (b < batch && budget > 0) {
      const int64_t take = std::min(budget, blocks[b] - blk);
      blk += take;
      budget -= take;
      ++splits_of[b];
      ++split_count;
      if (blk == blocks[b]) {
        ++b;
        blk = 0;
      }
    }
    row[2] = static_cast<int32_t>(b);
    row[3] = static_cast<int32_t>(blk);
  }
  for (int64_t i = 0; i < batch; ++i) sp[i + 1] = sp[i] + std::max(splits_of[i], 1);
  (void)num_heads_q;
  (void)is_fp8_kvcache;
  return {meta, splits};
}

}  // namespace

TORCH_LIBRARY_IMPL(mate, CPU, m) {
  m.impl("get_mla_metadata", &get_mla_metadata);
  m.impl("mla_decode", &mla_decode);
  m.impl("mla_sparse_prefill", &mla_sparse_prefill);
}

}  // namespace mate::cpu
