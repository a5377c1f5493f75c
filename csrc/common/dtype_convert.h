// Bit-exact conversions between the storage dtypes of DType and float, written on raw
// bits so that host code and device code of any vendor (CUDA, MUSA) share them without
// vendor half/bfloat16 types. Round-to-nearest-even, like torch.
#pragma once

#include <cstdint>
#include <cstring>

#include "fmha_math.h"
#include "fmha_params.h"
#include "host_device.h"

namespace mate {

MATE_HD float bits_to_float(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
MATE_HD uint32_t float_to_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

MATE_HD float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

MATE_HD uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

MATE_HD float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  if (exp == 0) {  // zero or subnormal: man * 2^-24
    const float f = static_cast<float>(man) * 5.9604644775390625e-08f;
    return sign ? -f : f;
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}

MATE_HD uint16_t float_to_half(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000);
  const uint32_t au = u & 0x7fffffffu;
  if (au > 0x7f800000u) return sign | 0x7e00;  // NaN
  if (au >= 0x477ff000u) return sign | 0x7c00;  // rounds to >= 65520: inf
  if (au < 0x38800000u) {                       // subnormal half (or zero)
    const float a = bits_to_float(au);
    // a / 2^-24, rounded to nearest even through the float adder
    const float scaled = a * 16777216.0f;
    const float r = (scaled + 12582912.0f) - 12582912.0f;
    return sign | static_cast<uint16_t>(r);
  }
  const uint32_t rounded = au + 0xfffu + ((au >> 13) & 1u);
  return sign | static_cast<uint16_t>((rounded - 0x38000000u) >> 13);
}

// float to float8 e4m3fn, round to nearest even. e4m3fn has no infinity: NaN stays NaN
// (0x7f) and finite values or infinities past the largest finite value (448) saturate to
// it, as torch's conversion does since 2.10.
MATE_HD uint8_t float_to_fp8_e4m3(float f) {
  uint32_t u = float_to_bits(f);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return sign | 0x7f;   // NaN
  if (u >= 0x43f00000u) return sign | 0x7e;  // >= 480 (rounds past 448) or inf: saturate
  if (u < 0x3c800000u) {                     // below 2^-6: subnormal e4m3, steps of 2^-9
    // adding 2^14 leaves the value's multiples of 2^-9 in the low mantissa bits, rounded
    // to nearest even by the float adder
    const float r = bits_to_float(u) + 16384.0f;
    return sign | static_cast<uint8_t>(float_to_bits(r) - float_to_bits(16384.0f));
  }
  // normal: rebias the exponent (127 -> 7) and round the 23-bit mantissa to 3 bits
  const uint32_t odd = (u >> 20) & 1u;
  u += 0x7ffffu + odd - (120u << 23);
  const uint8_t r = static_cast<uint8_t>(u >> 20);
  return sign | (r == 0x7f ? 0x7e : r);
}

// Element `i` of a tensor of dtype `dt` as float.
MATE_HD float load_float(const void* base, int64_t i, DType dt) {
  switch (dt) {
    case DType::kFloat32: return static_cast<const float*>(base)[i];
    case DType::kFloat16: return half_to_float(static_cast<const uint16_t*>(base)[i]);
    case DType::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
    default: return fp8_e4m3_to_float(static_cast<const uint8_t*>(base)[i]);
  }
}

// Stores f as dtype `dt` at element `i`.
MATE_HD void store_float(void* base, int64_t i, DType dt, float f) {
  switch (dt) {
    case DType::kFloat32: static_cast<float*>(base)[i] = f; break;
    case DType::kFloat16: static_cast<uint16_t*>(base)[i] = float_to_half(f); break;
    case DType::kBFloat16: static_cast<uint16_t*>(base)[i] = float_to_bf16(f); break;
    case DType::kFloat8E4M3: static_cast<uint8_t*>(base)[i] = float_to_fp8_e4m3(f); break;
  }
}

}  // namespace mate
