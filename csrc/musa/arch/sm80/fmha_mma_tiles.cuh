// Shared-memory tiles of the mma.sync FMHA kernels of this folder (fmha_mma.cu forward,
// fmha_bwd_mma.cu backward): the tile configuration and widths, the XOR swizzle, the cp.async
// row copies (page-table and padding aware) and the FP8 staging.
#pragma once

#include "../../../common/fmha_math.h"
#include "../../../common/fmha_params.h"
#include "../../../common/fmha_score.h"
#include "../mma.h"

#if defined(MATE_HAS_MMA_SYNC)
namespace mate::device::mma_tiles {

constexpr float kLn2 = 0.6931471805599453f;

template <typename T_, int kD_, int kDv_, int kWarps_, int kMTiles_, int kBlockN_, bool kFp8In_ = false>
struct MmaConfig {
  using T = T_;                               // the tensor-core operand type (bf16 for fp8 inputs)
  static constexpr bool kFp8In = kFp8In_;     // e4m3 inputs, converted to T in shared memory
  static constexpr int kD = kD_;              // head dim of q and k, padded: the tile width
  static constexpr int kDv = kDv_;            // head dim of v, padded
  static constexpr int kWarps = kWarps_;
  static constexpr int kMTiles = kMTiles_;    // 16-row tiles per warp
  static constexpr int kBlockN = kBlockN_;    // keys per K/V tile
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockM = kWarps * kMTiles * 16;
  static constexpr int kChunks = kD / 8;      // 16-byte chunks per Q / K row
  static constexpr int kVChunks = kDv / 8;    // 16-byte chunks per V row
  static constexpr int kNTiles = kBlockN / 8; // 8-key column tiles of S
  static constexpr int kVTiles = kDv / 8;     // 8-channel column tiles of O
  static constexpr int kKSteps = kD / 16;     // k steps of Q K^T
  static constexpr int kPSteps = kBlockN / 16;  // k steps of P V
  // Q fragments stay in registers when they are few; otherwise ldmatrix re-reads them.
  static constexpr bool kQInRegs = kMTiles * kD <= 128;
  // K/V tile buffers: tile t + 1 loads during tile t. FP8 tiles land raw in a staging buffer
  // (kBlockN rows of K bytes, then of V bytes) and are converted into a single T tile.
  static constexpr int kStages = kFp8In ? 1 : 2;
  static constexpr int kKTileElems = kBlockN * kD, kVTileElems = kBlockN * kDv;
  static constexpr int kRawBytes = kFp8In ? kBlockN * (kD + kDv) : 0;
  static constexpr int kSmemBytes =
      (kBlockM * kD + kStages * (kKTileElems + kVTileElems)) * static_cast<int>(sizeof(T)) + kRawBytes;
  // K/V loading: each warp copies kBlockN / kWarps rows, every lane one 16-byte chunk per step
  static constexpr int kRowsPerWarp = kBlockN / kWarps;
  static_assert(kD % 64 == 0 && kD <= 256 && kDv % 64 == 0 && kDv <= 256,
                "the swizzle needs a multiple of 8 chunks per row");
  static_assert(kBlockN % 16 == 0, "P V steps are 16 keys");
  static_assert((kRowsPerWarp * kChunks) % 32 == 0 && (kRowsPerWarp * kVChunks) % 32 == 0 && kRowsPerWarp <= 64,
                "a warp's rows must fill whole copy steps");
  static_assert(!kFp8In || ((kRowsPerWarp * kD / 16) % 32 == 0 && (kRowsPerWarp * kDv / 16) % 32 == 0),
                "a warp's raw FP8 rows must fill whole copy steps");
};

// The instantiated tile widths (kD, kDv): a head dim pads up to the first that holds it.
// DeepSeek's prefill shape (192, 128) has its own; other dims pad to 64, 128 or 256.
enum class MmaWidths { k64, k128, k192x128, k256 };

inline bool mma_widths(int d, int dv, MmaWidths& w) {
  if (d % 8 != 0 || dv % 8 != 0) return false;  // 16-byte chunks
  if (d <= 64 && dv <= 64) w = MmaWidths::k64;
  else if (d <= 128 && dv <= 128) w = MmaWidths::k128;
  else if (d <= 192 && dv <= 128) w = MmaWidths::k192x128;
  else if (d <= 256 && dv <= 256) w = MmaWidths::k256;
  else return false;
  return true;
}

// The online softmax of one row (half hf of a warp's 16-row S tile, whose kNTiles * 2 values
// of the row live in one lane quad), in base 2 and in place: masks the keys outside `keys`
// (relative to the tile; not needed when `all`), turns the scores into exp2 values (P),
// updates the row's maximum (in score units: raw with kPlain, else base-2 logits) and this
// lane's part of its sum, and returns the factor the row's O accumulators must be scaled by.
// logit(x, jr): the base-2 logit of raw score x at tile key jr (kPlain = false, ScoreMod).
// Shared by the forward kernels of this folder (fmha_mma.cu, fmha_qv_mma.cu).
template <bool kPlain, int kNTiles, class Logit>
__device__ __forceinline__ float online_softmax_row(float (&sacc)[kNTiles][4], int hf, float& row_max, float& row_sum,
                                                    const KeyInterval& keys, bool all, float sl, Logit&& logit) {
  const int t = threadIdx.x % 4;
  float mx = -INFINITY;
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int jr = nt * 8 + 2 * t + e;  // the tile's key jr
      float x = sacc[nt][2 * hf + e];
      if constexpr (!kPlain) x = logit(x, jr);
      if (!all && !keys.contains(jr)) x = -INFINITY;
      sacc[nt][2 * hf + e] = x;
      mx = fmaxf(mx, x);
    }
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
  const float m_new = fmaxf(row_max, mx);
  const float m_use = m_new == -INFINITY ? 0.f : m_new;  // a row with no key yet
  const float corr = arch::fast_exp2((row_max - m_use) * sl);
  const float m_scaled = m_use * sl;
  row_max = m_new;
  float sum = 0.f;
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const float pe = arch::fast_exp2(fmaf(sacc[nt][2 * hf + e], sl, -m_scaled));
      sacc[nt][2 * hf + e] = pe;
      sum += pe;
    }
  row_sum = row_sum * corr + sum;  // this lane's part; the quad sums at the end
  return corr;
}

// Can a tensor's rows move in 16-byte chunks (cp.async)? Base and strides (in elements of
// elem_bytes) multiples of 16 bytes. The fits checks of this folder's kernels.
inline bool rows_aligned16(const void* ptr, int64_t batch_stride, int64_t row_stride, int64_t head_stride,
                           int64_t elem_bytes = 2) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (batch_stride * elem_bytes) % 16 == 0 &&
         (row_stride * elem_bytes) % 16 == 0 && (head_stride * elem_bytes) % 16 == 0;
}

// Element offset of 16-byte chunk c of row r in a tile with kRow-element rows.
template <int kRow>
__device__ __forceinline__ int swz(int r, int c) {
  return r * kRow + ((c ^ (r & 7)) << 3);
}

// Copies the warp's rows of one tile, kCh 16-byte chunks per row: row rl's storage offset
// is lane rl % 32's offs[rl / 32] (-1: a zero row); chunks at or past `valid_chunks` (the
// real head dim) are zero-filled, so a head dim below the tile width pads with zeros inside
// the kernel, never in memory. `dst_of(row, chunk)` places a chunk: the swizzled T tile, or
// row-major in the FP8 staging buffer; `src_of(offset, chunk)` finds it in global memory.
template <int kRowsPerWarp, int kCh, class Dst, class Src>
__device__ __forceinline__ void copy_rows(const int64_t (&offs)[2], int r0, int valid_chunks, const void* base,
                                          Dst&& dst_of, Src&& src_of) {
  const int lane = threadIdx.x % arch::kWarpSize;
#pragma unroll
  for (int step = 0; step < kRowsPerWarp * kCh / 32; ++step) {
    const int idx = step * 32 + lane, rl = idx / kCh, c = idx % kCh;
    int64_t off = __shfl_sync(0xffffffffu, offs[0], rl % 32);
    if constexpr (kRowsPerWarp > 32) {
      const int64_t hi = __shfl_sync(0xffffffffu, offs[1], rl % 32);
      if (rl >= 32) off = hi;
    }
    const bool valid = off >= 0 && c < valid_chunks;
    arch::cp_async_16(dst_of(r0 + rl, c), valid ? src_of(off, c) : base, valid);
  }
}

// 16 e4m3 values -> 16 bf16 values (exact: every e4m3 value is a bf16 value).
__device__ __forceinline__ void e4m3x16_to_bf16(const uint4& in, uint4& lo, uint4& hi) {
  const uint32_t w[4] = {in.x, in.y, in.z, in.w};
  uint32_t o[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float2 f = arch::e4m3x2_to_float2(static_cast<uint16_t>(w[i / 2] >> (16 * (i % 2))));
    o[i] = arch::pack2<arch::bf16>(f.x, f.y);
  }
  lo = make_uint4(o[0], o[1], o[2], o[3]);
  hi = make_uint4(o[4], o[5], o[6], o[7]);
}

// The staged FP8 K and V rows of a tile into the swizzled bf16 tiles (zero bytes stay zero).
template <class C>
__device__ __forceinline__ void convert_kv_tiles(const uint8_t* raw, typename C::T* k_t, typename C::T* v_t) {
  constexpr int kKU = C::kD / 16, kVU = C::kDv / 16;  // 16-byte units per row
  for (int idx = threadIdx.x; idx < C::kBlockN * (kKU + kVU); idx += C::kThreads) {
    const bool is_k = idx < C::kBlockN * kKU;
    const int j = is_k ? idx : idx - C::kBlockN * kKU, units = is_k ? kKU : kVU;
    const int r = j / units, u = j % units;
    const uint8_t* src = is_k ? raw + r * C::kD + u * 16 : raw + C::kBlockN * C::kD + r * C::kDv + u * 16;
    uint4 lo, hi;
    e4m3x16_to_bf16(*reinterpret_cast<const uint4*>(src), lo, hi);
    typename C::T* dst = is_k ? k_t : v_t;
    const int o0 = is_k ? swz<C::kD>(r, 2 * u) : swz<C::kDv>(r, 2 * u);
    const int o1 = is_k ? swz<C::kD>(r, 2 * u + 1) : swz<C::kDv>(r, 2 * u + 1);
    *reinterpret_cast<uint4*>(dst + o0) = lo;
    *reinterpret_cast<uint4*>(dst + o1) = hi;
  }
}

// Copies keys [n0, n0 + kBlockN) of one kv head into swizzled K and V tiles; keys >= kmax
// become zeros (compared as offsets from n0: n0 + kBlockN may pass 2^31 - 1). Each lane
// finds the storage offset of one row (page-table lookups in parallel, once per row), then
// the warp's lanes share them through shuffles.
template <class C>
__device__ __forceinline__ void load_kv_tiles(typename C::T* k_dst, typename C::T* v_dst, uint8_t* raw,
                                              const FmhaParams& p, const SeqInfo& s, int hk, int n0, int kmax) {
  using T = typename C::T;
  const int warp = threadIdx.x / arch::kWarpSize, lane = threadIdx.x % arch::kWarpSize;
  const int r0 = warp * C::kRowsPerWarp;
  int64_t koff[2] = {-1, -1}, voff[2] = {-1, -1};
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int rl = lane + 32 * i;
    if (rl < C::kRowsPerWarp && r0 + rl < kmax - n0) {
      const int j = n0 + r0 + rl;
      koff[i] = key_offset(p, s, s.k_start + j, p.k_batch_stride, p.k_row_stride) + hk * p.k_head_stride;
      voff[i] = key_offset(p, s, s.k_start + j, p.v_batch_stride, p.v_row_stride) + hk * p.v_head_stride;
    }
  }
  if constexpr (C::kFp8In) {  // raw e4m3 rows: K rows, then V rows, row-major
    const uint8_t* kb = static_cast<const uint8_t*>(p.k);
    const uint8_t* vb = static_cast<const uint8_t*>(p.v);
    uint8_t* raw_v = raw + C::kBlockN * C::kD;
    copy_rows<C::kRowsPerWarp, C::kD / 16>(koff, r0, p.head_dim / 16, kb,
                                           [&](int r, int c) { return raw + r * C::kD + c * 16; },
                                           [&](int64_t o, int c) { return kb + o + c * 16; });
    copy_rows<C::kRowsPerWarp, C::kDv / 16>(voff, r0, p.head_dim_v / 16, vb,
                                            [&](int r, int c) { return raw_v + r * C::kDv + c * 16; },
                                            [&](int64_t o, int c) { return vb + o + c * 16; });
  } else {
    const T* kb = static_cast<const T*>(p.k);
    const T* vb = static_cast<const T*>(p.v);
    copy_rows<C::kRowsPerWarp, C::kChunks>(koff, r0, p.head_dim / 8, kb,
                                           [&](int r, int c) { return k_dst + swz<C::kD>(r, c); },
                                           [&](int64_t o, int c) { return kb + o + c * 8; });
    copy_rows<C::kRowsPerWarp, C::kVChunks>(voff, r0, p.head_dim_v / 8, vb,
                                            [&](int r, int c) { return v_dst + swz<C::kDv>(r, c); },
                                            [&](int64_t o, int c) { return vb + o + c * 8; });
  }
}

}  // namespace mate::device::mma_tiles
#endif  // MATE_HAS_MMA_SYNC
