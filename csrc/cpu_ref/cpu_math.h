// Row-wise float helpers of the CPU kernels, written as plain loops without calls
// so the compiler vectorizes them (fast_exp instead of std::exp for that reason).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../common/fmha_math.h"
#include "../common/fmha_score.h"
#include "../common/fmha_params.h"

namespace mate::cpu {

// exp(x) to ~2 ulp for x in [-87, 88]; exactly 0 below (so exp(-inf) == 0).
inline float fast_exp(float x) {
  const float xc = x > 88.f ? 88.f : (x < -87.f ? -87.f : x);
  // x = n ln2 + r, |r| <= ln2/2; n rounded with the 1.5 * 2^23 trick (no call, vectorizes).
  const float kMagic = 12582912.f;
  const float t = xc * 1.44269504f + kMagic;
  const float n = t - kMagic;
  const float r = (xc - n * 0.693145752f) - n * 1.42860677e-6f;
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  int32_t ti, pi;
  std::memcpy(&ti, &t, 4);
  std::memcpy(&pi, &p, 4);
  pi += (ti - 0x4B400000) << 23;  // multiply by 2^n
  float y;
  std::memcpy(&y, &pi, 4);
  return x < -87.f ? 0.f : y;
}

// Reductions keep kLanes independent partial results so the compiler vectorizes them
// without -ffast-math (a single running sum or max would be a serial dependency).
constexpr int kLanes = 16;

// s = scale * s (then apply_softcap of fmha_score.h when softcap > 0); returns max(s).
inline float scale_softcap_max(float* s, int n, float scale, float softcap) {
  if (softcap > 0.f)
    for (int i = 0; i < n; ++i) s[i] = apply_softcap(s[i] * scale, softcap);
  float lane[kLanes];
  for (int j = 0; j < kLanes; ++j) lane[j] = -INFINITY;
  const float mul = softcap > 0.f ? 1.f : scale;
  int i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const float x = s[i + j] * mul;
      s[i + j] = x;
      lane[j] = x > lane[j] ? x : lane[j];
    }
  for (; i < n; ++i) {
    s[i] *= mul;
    lane[0] = s[i] > lane[0] ? s[i] : lane[0];
  }
  float mx = lane[0];
  for (int j = 1; j < kLanes; ++j) mx = lane[j] > mx ? lane[j] : mx;
  return mx;
}

// p[i] = exp(s[i] - m) in type T (s is overwritten with the fp32 values); returns their sum.
template <typename T>
inline float exp_shift_store(float* s, int n, float m, T* p) {
  for (int i = 0; i < n; ++i) s[i] = fast_exp(s[i] - m);
  float lane[kLanes] = {};
  int i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lane[j] += s[i + j];
  for (; i < n; ++i) lane[0] += s[i];
  if (static_cast<const void*>(p) != static_cast<const void*>(s))
    for (int j = 0; j < n; ++j) p[j] = static_cast<T>(s[j]);
  float sum = 0.f;
  for (int j = 0; j < kLanes; ++j) sum += lane[j];
  return sum;
}

inline void scale_row(float* x, int n, float a) {
  for (int i = 0; i < n; ++i) x[i] *= a;
}

// Writes n floats as the dtype `dt` at element offset `offset` of `base`.
inline void store_row(void* base, DType dt, int64_t offset, const float* src, int n) {
  switch (dt) {
    case DType::kFloat32: std::memcpy(static_cast<float*>(base) + offset, src, n * sizeof(float)); break;
    case DType::kFloat16: {
      auto* d = static_cast<c10::Half*>(base) + offset;
      for (int i = 0; i < n; ++i) d[i] = static_cast<c10::Half>(src[i]);
      break;
    }
    case DType::kBFloat16: {
      auto* d = static_cast<c10::BFloat16*>(base) + offset;
      for (int i = 0; i < n; ++i) d[i] = static_cast<c10::BFloat16>(src[i]);
      break;
    }
    default: break;  // fp8 outputs are rejected by the checks
  }
}

// SEMANTICS §2 for one row: merges `n` splits of (lse, out[dv]) into `o`; returns the lse.
inline float combine_rows(const float* lse, int64_t lse_stride, const float* out, int64_t out_stride,
                          int n, int dv, float* o) {
  const float total = combined_lse(lse, lse_stride, n);
  for (int c = 0; c < dv; ++c) o[c] = 0.f;
  for (int s = 0; s < n; ++s) {
    const float w = split_weight(lse[s * lse_stride], total);
    if (w == 0.f) continue;  // also keeps NaN partial outputs of empty splits out
    const float* src = out + s * out_stride;
    for (int c = 0; c < dv; ++c) o[c] += w * src[c];
  }
  return total;
}

// Per-thread scratch: v holds at least n values (kept across calls, never shrunk).
template <typename V>
V* grow(std::vector<V>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

}  // namespace mate::cpu
