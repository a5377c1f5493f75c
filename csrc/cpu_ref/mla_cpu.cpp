// CPU reference kernels of the MLA family: decode (dense / sparse / FP8 / sink / extra
// cache; sparse prefill runs as a decode) and the metadata schedule.
//
// One work item is one query position with the query heads of one kv head (all heads
// for sparse MLA). Its keys (a causal prefix of the paged cache, or the valid top-k
// indices of both caches) are gathered and dequantized tile by tile into fp32 scratch,
// then scored with an online softmax; V is the first head_dim_v channels of each key.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <vector>

#include "../common/kernel_table.h"
#include "../common/mla_params.h"
#include "cpu_blas.h"
#include "cpu_math.h"
#include "cpu_parallel.h"

namespace mate::cpu {
namespace {

constexpr int kMlaKeysPerTile = 128;

// Writes the Dqk fp32 channels of one key into dst.
void load_key(const MlaTokenRef& k, MlaCacheFormat format, int dqk, float* dst) {
  switch (format) {
    case MlaCacheFormat::kFp8V32:
    case MlaCacheFormat::kFp8Model1:
      for (int i = 0; i < dqk; ++i) dst[i] = mla_fp8_channel(format, k.data, k.scales, i);
      return;
    case MlaCacheFormat::kBFloat16: {
      const auto* s = reinterpret_cast<const c10::BFloat16*>(k.data);
      for (int i = 0; i < dqk; ++i) dst[i] = static_cast<float>(s[i]);
      return;
    }
    case MlaCacheFormat::kFloat16: {
      const auto* s = reinterpret_cast<const c10::Half*>(k.data);
      for (int i = 0; i < dqk; ++i) dst[i] = static_cast<float>(s[i]);
      return;
    }
    default: std::memcpy(dst, k.data, dqk * sizeof(float));
  }
}

float q_value(const MlaParams& p, int64_t offset) {
  switch (p.q_dtype) {
    case DType::kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(p.q)[offset]);
    case DType::kFloat16: return static_cast<float>(static_cast<const c10::Half*>(p.q)[offset]);
    default: return static_cast<const float*>(p.q)[offset];
  }
}

// The keys item (b, s, hkv) sees (mla_params.h: mla_keys / mla_key / mla_causal_limit).
void collect_keys(const MlaParams& p, int b, int s, int hkv, std::vector<MlaTokenRef>& keys) {
  keys.clear();
  const MlaKeys k = mla_keys(p, b, s);
  const int limit = p.block_table ? mla_causal_limit(p, k.positions, s) : k.positions;
  for (int j = 0; j < limit; ++j) {
    const MlaTokenRef t = mla_key(p, k, j, hkv);
    if (t.data) keys.push_back(t);
  }
}

struct MlaScratch {
  std::vector<MlaTokenRef> keys;
  std::vector<float> q, k, s, acc, m, l;
};

void attend_item(const MlaParams& p, int b, int s, int hkv) {
  static thread_local MlaScratch sc;
  const int G = p.heads_q / p.heads_kv, D = p.head_dim, Dv = p.head_dim_v;
  collect_keys(p, b, s, hkv, sc.keys);
  const int nkeys = static_cast<int>(sc.keys.size());
  // the extra cache of sparse MLA has the main cache's format (checked)
  const MlaCacheFormat format = p.cache.format;
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
    for (int j = 0; j < n; ++j) load_key(sc.keys[n0 + j], format, D, sc.k.data() + static_cast<int64_t>(j) * D);
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
  const int64_t items = static_cast<int64_t>(p.batch) * p.seqlen_q * p.heads_kv;
  parallel_items(items, [&](int64_t i) {
    const int hkv = static_cast<int>(i % p.heads_kv);
    const int64_t bs = i / p.heads_kv;
    attend_item(p, static_cast<int>(bs / p.seqlen_q), static_cast<int>(bs % p.seqlen_q), hkv);
  });
}

void mla_metadata_cpu(const MlaMetadataParams& p) { mla_schedule(p); }

int mla_workers_cpu() { return at::get_num_threads(); }

}  // namespace

MATE_REGISTER_KERNEL(mla_kernel, CPU, &run_mla);
MATE_REGISTER_KERNEL(mla_metadata_kernel, CPU, &mla_metadata_cpu);
MATE_REGISTER_KERNEL(mla_workers_kernel, CPU, &mla_workers_cpu);

}  // namespace mate::cpu
