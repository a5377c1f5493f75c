// Device helpers of the MLA decode kernels shared by mla_kernels.cu (the schedule, the
// portable and mma.sync kernels, the split combine) and arch/sm90/mla_decode_sm90.cu (the
// Hopper kernel): where a query row's outputs and split partials live, how a row is finished,
// and the split-KV run a fast kernel and mla_combine_kernel share. Device code only (nvcc).
#pragma once

#include <cmath>
#include <cstdint>

#include "../common/fmha_math.h"
#include "../common/mla_params.h"
#include "arch/device.h"

namespace mate::device {

constexpr float kMlaLn2 = 0.6931471805599453f;

// The sequence `sq` of the schedule and its query rows of one kv head: dense decode has
// seqlen_q * G rows (row r = query s = r / G, head g = r % G), sparse attention G rows.
struct MlaSeq {
  MlaKeys keys;
  int dense_rows;  // seqlen_q for dense decode (rows span queries), 1 for sparse
};

__device__ __forceinline__ MlaSeq mla_seq(const MlaParams& p, int sq) {
  if (p.block_table) return {mla_keys(p, sq, 0), p.seqlen_q};
  return {mla_keys(p, sq / p.seqlen_q, sq % p.seqlen_q), 1};
}

// Output positions of row r (of kv head hkv) of sequence `seq`.
struct MlaRow {
  int s, h;
  int64_t out, lse, max_logit;  // element offsets into out (times Dv), lse, max_logits
};

__device__ __forceinline__ MlaRow mla_row(const MlaParams& p, const MlaSeq& seq, int hkv, int r) {
  const int G = p.heads_q / p.heads_kv;
  MlaRow o;
  o.s = seq.dense_rows > 1 ? r / G : seq.keys.s;
  o.h = hkv * G + r % G;
  const int64_t bs = static_cast<int64_t>(seq.keys.b) * p.seqlen_q + o.s;
  o.out = (bs * p.heads_q + o.h) * p.head_dim_v;
  o.max_logit = bs * p.heads_q + o.h;
  o.lse = (static_cast<int64_t>(seq.keys.b) * p.heads_q + o.h) * p.seqlen_q + o.s;
  return o;
}

// Finishes one row from its running max (base-2 logits), sum and unnormalized output
// scale: out = acc * factor; lse +inf and max_logits -inf for a row with no key (MLA).
struct MlaFinish {
  float factor, lse, max_logit;
};

__device__ __forceinline__ MlaFinish mla_finish(const MlaParams& p, int h, float m2, float l) {
  const bool has = l > 0.f || l != l;  // NaN inputs propagate, never read as "no key"
  if (!has) return {0.f, INFINITY, -INFINITY};
  MlaFinish f{1.f / l, m2 * kMlaLn2 + logf(l), m2 * kMlaLn2};
  // MLA sink: out * exp(lse) / (exp(lse) + exp(sink)); lse excludes the sink
  if (p.attn_sink) f.factor /= 1.f + expf(p.attn_sink[h] - f.lse);
  return f;
}

// Split partials: (2 parts, rows_all, Dv) outputs, (2 parts, rows_all) lse and max logits,
// rows_all = seqlen_q * Hq for dense decode, Hq for sparse.
__device__ __forceinline__ int64_t mla_partial_row(const MlaParams& p, const MlaSeq& seq, const MlaRow& r, int slot) {
  const int rows_all = seq.dense_rows * p.heads_q;
  return static_cast<int64_t>(slot) * rows_all + (seq.dense_rows > 1 ? r.s : 0) * p.heads_q + r.h;
}

// ---- split-KV bookkeeping shared by the fast kernels and the combine --------------------
struct MlaSplitRun {
  const int32_t* meta = nullptr;  // (parts, kMlaMetadataCols) from mla_schedule
  int parts = 0, seqs = 0, rows = 0;  // rows: query rows of one kv head per sequence
  float* out = nullptr;           // (2 parts, rows_all, Dv)
  float* lse = nullptr;           // (2 parts, rows_all)
  float* max_logit = nullptr;     // (2 parts, rows_all)
};

// The Hopper kernel (arch/sm90/mla_decode_sm90.cu; built with MATE_WITH_SM90): runs one
// (part, 64-row block, kv head) per block of the schedule in `run` and writes what
// mla_mma_kernel writes (final rows of whole sequences, fp32 partials of split ones); the caller
// launches mla_combine_kernel after it. Only for calls mla_sm90_fits accepts.
arch::Error launch_mla_sm90(const MlaParams& p, const MlaSplitRun& run, arch::Stream stream);
// Its blocks per schedule part (64-row blocks times kv heads) and blocks per SM.
int mla_sm90_blocks_per_part(const MlaParams& p);

}  // namespace mate::device
