// The score pipeline and the masks of SEMANTICS §1, written once for every FMHA kernel
// (the CPU reference, the portable device kernels and the tensor-core kernel):
//
//   raw dot product -> * scale -> softcap -> ALiBi -> mask (-inf outside the row's keys)
//
// key_range_for_row is the mask: every mask of §1 is one interval of key columns per query
// row. ScoreMod is the rest, built once per (sequence, query head) from FmhaParams.
// Host/device neutral: no torch, no std containers.
#pragma once

#include <cmath>
#include <cstdint>

#include "fmha_math.h"

namespace mate {

// Local key indices [lo, hi) of one sequence (0 <= lo <= hi <= k_len); empty when lo == hi.
struct KeyInterval {
  int lo = 0, hi = 0;
  MATE_HD bool empty() const { return hi <= lo; }
  MATE_HD bool contains(int j) const { return lo <= j && j < hi; }
  // The intersection with [a, b), kept in the form lo <= hi.
  MATE_HD KeyInterval clip(int a, int b) const {
    KeyInterval r;
    r.lo = imax(lo, a);
    r.hi = imax(r.lo, imin(hi, b));
    return r;
  }
};

// The key column aligned with query row i (bottom-right): a = i + Sk - Sq, with Sk the
// mask length (global under context parallel). Evaluated as (Sk - Sq) + i, which cannot
// overflow for 0 <= i < Sq (a lies in [-Sq, Sk)); i + Sk alone can.
MATE_HD int row_anchor(const SeqInfo& s, int i) { return (s.mask_k_len - s.q_len) + i; }

// The keys query row i (0 <= i < q_len) may attend to, as local key indices [lo, hi).
// All masks of SEMANTICS §1 (causal, local window, attention chunk, the key length) are
// intervals of global key columns, so their intersection is one interval [glo, ghi);
// context parallel maps it back to the local keys j with glo <= j * W + r < ghi.
//
// Overflow: windows and chunks may be anything up to 2^31 - 1, so a - left, a + right + 1
// and the chunk ends are evaluated in 64 bits. After the clamps to [0, Sk] both ends fit
// an int again (glo <= max(a, 0) < Sk or 0, ghi is clamped to [glo, Sk]).
//
// INVARIANT (the tensor-core kernels of csrc/musa/arch/sm80 rely on it, and
// tests/test_key_interval.py checks it against the oracle and the CPU op): both ends
// lo(i) and hi(i) are non-decreasing in the row i. Every bound above is a non-decreasing
// function of the anchor a (max(0, a - left, floor(a / c) * c) from below, min(Sk,
// a + right + 1, floor(a / c) * c + c) from above), the empty case keeps hi = lo, and the
// context-parallel map j = ceil((g - r) / W) is non-decreasing in g. So the first row of a
// block has the smallest lo and its last row the largest hi. A new mask must keep this
// (an interval whose ends only move right as the row grows), or the kernels' per-block
// key range (and its "latest rows first" ordering) must change with it.
MATE_HD KeyInterval key_range_for_row(const FmhaParams& p, const SeqInfo& s, int i) {
  const int a = row_anchor(s, i);
  int64_t glo = 0, ghi = s.mask_k_len;  // [glo, ghi) in global columns
  if (p.window_left >= 0) {
    const int64_t x = static_cast<int64_t>(a) - p.window_left;
    glo = x > glo ? x : glo;
  }
  if (p.window_right >= 0) {
    const int64_t x = static_cast<int64_t>(a) + p.window_right + 1;
    ghi = x < ghi ? x : ghi;
  }
  if (p.attention_chunk > 0) {
    const int64_t start = static_cast<int64_t>(floor_div(a, p.attention_chunk)) * p.attention_chunk;
    const int64_t end = start + p.attention_chunk;
    glo = start > glo ? start : glo;
    ghi = end < ghi ? end : ghi;
  }
  if (ghi < glo) ghi = glo;  // empty row: hi = lo keeps both ends monotone
  const int W = p.cp_world_size, r = p.cp_rank;
  // glo, ghi in [0, Sk]: the differences below fit an int. Without context parallel (W = 1,
  // r = 0) the map is the identity: no division (the tensor-core kernels evaluate this a few
  // times per work tile, and a division by a runtime value is some twenty instructions).
  const auto local = [W, r](int64_t g) { return W == 1 ? static_cast<int>(g) : ceil_div_signed(static_cast<int>(g) - r, W); };
  KeyInterval k;
  k.lo = imin(imax(0, local(glo)), s.k_len);
  k.hi = imax(k.lo, imin(s.k_len, local(ghi)));
  return k;
}

// First query row i in [0, q_len) with pred(key_range_for_row(i)), for a predicate monotone
// in i (false ... false true ... true), as "hi(i) > j" and "lo(i) > j" are by the INVARIANT
// above: the rows that see a key (block) form one run, found by two binary searches.
template <class Pred>
MATE_HD int first_row_where(const FmhaParams& p, const SeqInfo& s, Pred pred) {
  int lo = 0, hi = s.q_len;
  while (lo < hi) {
    const int mid = lo + (hi - lo) / 2;
    if (pred(key_range_for_row(p, s, mid))) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}

// softcap * tanh(x / softcap) (SEMANTICS §1, Scores), for softcap > 0. (A multiply by a
// precomputed 1 / softcap instead of the division raised the registers of the tensor-core
// kernel's softcap/ALiBi instantiation by 20-35 per thread: keep the division.)
MATE_HD float apply_softcap(float x, float softcap) { return softcap * tanhf(x / softcap); }

// Everything of the score pipeline but the mask, for one (sequence, query head).
struct ScoreMod {
  float scale = 1.f;    // softmax_scale
  float softcap = 0.f;  // > 0: softcap * tanh(x / softcap) after the scale
  bool alibi = false;   // FA2's ALiBi: - slope * |a - g| after the softcap
  float slope = 0.f;
  int anchor0 = 0;      // Sk - Sq: query row i is aligned with global key column anchor0 + i
  int cp_world = 1, cp_rank = 0;

  // Only the scale: logit = scale * dot (the vectorized / exp2-folded paths of the kernels).
  MATE_HD bool scale_only() const { return !(softcap > 0.f) && !alibi; }

  // ALiBi distance |a - g| between row i's anchor a and local key j's global column g.
  // 32-bit unsigned arithmetic (no overflow, no 64-bit products in the device loops), exact
  // for every key of the row's interval: there g < Sk < 2^31 and a >= -Sq, so |a - g| < 2^32.
  // Keys outside the interval get a meaningless distance and are masked.
  MATE_HD float alibi_distance(int i, int j) const {
    const uint32_t a = static_cast<uint32_t>(anchor0 + i);
    const uint32_t g = static_cast<uint32_t>(j) * static_cast<uint32_t>(cp_world) + static_cast<uint32_t>(cp_rank);
    return static_cast<float>(static_cast<int32_t>(a) >= static_cast<int32_t>(g) ? a - g : g - a);
  }
  // softcap -> ALiBi of an already scaled score of row i, key j (natural-log units).
  MATE_HD float softcap_alibi(float scaled, int i, int j) const {
    float x = scaled;
    if (softcap > 0.f) x = apply_softcap(x, softcap);
    if (alibi) x -= slope * alibi_distance(i, j);
    return x;
  }
  // The logit of a raw dot product (q.k [+ qv.v], descaled), without the mask.
  MATE_HD float logit(float dot, int i, int j) const { return softcap_alibi(dot * scale, i, j); }
  // The backward's form of logit(): also d logit / d dot (scale, times 1 - tanh^2 under a
  // softcap; ALiBi is a constant shift). The same operations as logit(), so recomputed
  // probabilities match the forward's.
  MATE_HD float logit_grad(float dot, int i, int j, float& dlogit) const {
    float x = dot * scale;
    dlogit = scale;
    if (softcap > 0.f) {
      const float t = tanhf(x / softcap);
      x = softcap * t;
      dlogit = scale * (1.f - t * t);
    }
    if (alibi) x -= slope * alibi_distance(i, j);
    return x;
  }
  // The full pipeline: -inf for a key outside the row's interval (key_range_for_row).
  MATE_HD float apply(float dot, int i, int j, const KeyInterval& keys) const {
    return keys.contains(j) ? logit(dot, i, j) : -INFINITY;
  }
};

// The ScoreMod of query head h of sequence b.
MATE_HD ScoreMod score_mod(const FmhaParams& p, const SeqInfo& s, int b, int h) {
  ScoreMod m;
  m.scale = p.softmax_scale;
  m.softcap = p.softcap;
  m.alibi = p.alibi_slopes != nullptr;
  if (m.alibi) m.slope = p.alibi_slopes[b * p.alibi_batch_stride + h];
  m.anchor0 = s.mask_k_len - s.q_len;
  m.cp_world = p.cp_world_size;
  m.cp_rank = p.cp_rank;
  return m;
}

// True when every logit is scale * dot with scale > 0: raw dot products then order like the
// logits, so a kernel may take row maxima on raw scores and fold the scale into its exp.
MATE_HD bool scores_are_plain(const FmhaParams& p) {
  return !(p.softcap > 0.f) && !p.alibi_slopes && p.softmax_scale > 0.f;
}

}  // namespace mate
