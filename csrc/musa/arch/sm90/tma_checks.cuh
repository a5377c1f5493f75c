#pragma once
// What the Hopper kernels' TMA views and loaded-image checks need (and the FMHA tile widths),
// written once for the FMHA forward (fmha_fwd_sm90.cuh), backward (fmha_bwd_sm90.cuh) and MLA
// decode (mla_decode_sm90.cu).
#include <atomic>
#include <cstdint>

#include "../../../common/fmha_params.h"
#include "../device.h"

namespace mate::device::sm90_tma {

// The extents of an FMHA call's global views (host and device build the same ones): rows,
// batches; a ragged tensor is one batch of all its rows, a paged one a batch per page.
MATE_HD int q_rows(const FmhaParams& p) { return p.q_is_ragged ? p.total_q : p.seqlen_q; }
MATE_HD int q_batches(const FmhaParams& p) { return p.q_is_ragged ? 1 : p.batch; }
MATE_HD int k_rows(const FmhaParams& p) { return p.page_table ? p.page_size : p.k_is_ragged ? p.total_k : p.seqlen_k; }
MATE_HD int k_batches(const FmhaParams& p) { return p.page_table ? p.num_pages : p.k_is_ragged ? 1 : p.num_pages; }

// The tile widths (D, Dv) the FMHA forward and backward instantiate: a head dim pads up to the
// first that holds it.
enum class Widths { k64, k128, k192x128, k256, kNone };
MATE_HD Widths tile_widths(int d, int dv) {
  if (d % 8 != 0 || dv % 8 != 0 || d <= 0 || dv <= 0) return Widths::kNone;  // 16-byte rows
  if (d <= 64 && dv <= 64) return Widths::k64;
  if (d <= 128 && dv <= 128) return Widths::k128;
  if (d <= 192 && dv <= 128) return Widths::k192x128;  // DeepSeek's prefill shape
  if (d <= 256 && dv <= 256) return Widths::k256;
  return Widths::kNone;
}

// A mode of extent 1 is never stepped along, so its stride only has to pass the descriptor's
// checks (16-byte multiple): torch may report any stride for a size-1 dim; those become 0 (as
// a ragged tensor's batch mode is). Strides in elements of elem_bytes bytes.
MATE_HD int64_t mode_stride(int64_t stride, int extent, int elem_bytes = 2) {
  return extent > 1 || (stride >= 0 && stride * elem_bytes % 16 == 0) ? stride : 0;
}

// TMA takes 16-byte aligned bases and strides below 2^40 bytes; CuTe asserts on a descriptor
// the driver refuses, so callers check here, never there. Strides in elements of elem_bytes.
inline bool stride_ok(int64_t elements, int extent, int elem_bytes = 2) {
  const int64_t bytes = mode_stride(elements, extent, elem_bytes) * elem_bytes;
  return bytes >= 0 && bytes % 16 == 0 && bytes < (int64_t{1} << 40);
}
inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }
// A (rows, channels, heads, batches) view with unit channel stride.
inline bool view_ok(const void* base, int64_t row_stride, int rows, int64_t head_stride, int heads,
                    int64_t batch_stride, int batches, int elem_bytes = 2) {
  return aligned16(base) && stride_ok(row_stride, rows, elem_bytes) && stride_ok(head_stride, heads, elem_bytes) &&
         stride_ok(batch_stride, batches, elem_bytes);
}

// Is the sm_90a body of `kernel` what the current device runs? Its sm_80 build is empty and
// would run on a Hopper GPU too when the binary lacks the sm_90a image: ask the loaded image,
// once per device (known / good: one bit per device, static state of the caller).
template <class Kernel>
bool image_loaded(Kernel kernel, std::atomic<uint64_t>& known, std::atomic<uint64_t>& good) {
  const int dev = arch::current_device();
  if (dev < 0 || dev >= 64) return false;
  const uint64_t bit = uint64_t{1} << dev;
  if (!(known.load(std::memory_order_relaxed) & bit)) {
    cudaFuncAttributes attr{};
    const cudaError_t e = cudaFuncGetAttributes(&attr, kernel);
    if (e != cudaSuccess) cudaGetLastError();  // e.g. no image for this device: not the caller's error
    if (e == cudaSuccess && attr.binaryVersion == 90) good.fetch_or(bit, std::memory_order_relaxed);
    known.fetch_or(bit, std::memory_order_relaxed);
  }
  return good.load(std::memory_order_relaxed) & bit;
}

}  // namespace mate::device::sm90_tma
