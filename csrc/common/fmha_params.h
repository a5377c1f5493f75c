// Plain parameter structs shared by the CPU reference and the device kernels.
// No torch header here: device sources include this file and must compile
// with a bare nvcc / mcc (see docs/design.md, "Device kernels").
#pragma once

#include <cstdint>

#include "host_device.h"

namespace mate {

// Element types an FMHA op reads or writes. Values are stable (kernels switch on them).
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat8E4M3 = 3 };

// Everything one FMHA forward call needs, as raw pointers and element strides.
// Built once by check_fmha_inputs (csrc/common/fmha_checks.cpp) for every backend.
struct FmhaParams {
  // ---- tensors -------------------------------------------------------------
  const void* q = nullptr;   // (B, Sq, H, D) or (Tq, H, D)
  const void* k = nullptr;   // dense (rows, Sk, Hk, D), ragged (Tk, Hk, D), paged (pages, P, Hk, D)
  const void* v = nullptr;   // like k with Dv
  const void* qv = nullptr;  // like q with Dv, optional
  void* out = nullptr;       // like q with Dv
  float* lse = nullptr;      // (B, H, Sq) or (H, Tq), fp32

  // Element strides. "batch" is the sequence (dense) / page (paged) stride;
  // ragged tensors have batch stride 0 and index rows through cu_seqlens.
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t qv_batch_stride = 0, qv_row_stride = 0, qv_head_stride = 0;
  int64_t out_batch_stride = 0, out_row_stride = 0, out_head_stride = 0;
  int64_t lse_batch_stride = 0, lse_head_stride = 0, lse_row_stride = 0;

  // ---- per-sequence metadata (int32, may be null) ---------------------------
  const int32_t* cu_seqlens_q = nullptr;   // (B+1)
  const int32_t* cu_seqlens_k = nullptr;   // (B+1)
  const int32_t* seqused_q = nullptr;      // (B)
  const int32_t* seqused_k = nullptr;      // (B)
  const int32_t* page_table = nullptr;     // (rows, max_pages)
  int64_t page_table_batch_stride = 0;
  const int32_t* cache_batch_idx = nullptr;  // (B)
  const int32_t* cache_leftpad = nullptr;    // (B)
  const int32_t* cp_tot_seqused_k = nullptr; // (B)
  const int32_t* scheduler_metadata = nullptr;  // (B+1), see scheduler.h
  // fmha_fwd_kvcache: keys appended by this call. Sequence b's keys end at
  // seqused_k[b] + its new keys (cu_seqlens_k_new[b+1] - cu_seqlens_k_new[b], or seqlen_k_new).
  const int32_t* cu_seqlens_k_new = nullptr;  // (B+1)
  int seqlen_k_new = 0;

  // FP8 descales, fp32 (B, Hk); strides in elements.
  const float* q_descale = nullptr;
  const float* k_descale = nullptr;
  const float* v_descale = nullptr;
  int64_t q_descale_batch_stride = 0, q_descale_head_stride = 0;
  int64_t k_descale_batch_stride = 0, k_descale_head_stride = 0;
  int64_t v_descale_batch_stride = 0, v_descale_head_stride = 0;

  const float* learnable_sink = nullptr;  // (H), fp32
  const float* alibi_slopes = nullptr;    // (H) or (B, H), fp32
  int64_t alibi_batch_stride = 0;

  // ---- sizes -----------------------------------------------------------------
  int batch = 0;
  int seqlen_q = 0;     // dense q: Sq; ragged: max_seqlen_q hint (0 if unknown)
  int seqlen_k = 0;     // dense k: Sk; ragged: max_seqlen_k hint; paged: max_pages * P
  int total_q = 0;      // rows of the q tensor (B*Sq dense, Tq ragged)
  int total_k = 0;      // rows of a ragged k tensor
  int num_heads = 0, num_heads_k = 0;
  int head_dim = 0, head_dim_v = 0;
  int page_size = 0;    // 0 = not paged
  int max_pages = 0;    // page_table columns
  int num_pages = 0;    // pages in the pool (paged) or cache rows (dense)
  int page_table_rows = 0;
  bool q_is_ragged = false, k_is_ragged = false;

  // ---- math options ----------------------------------------------------------
  float softmax_scale = 1.f;
  float softcap = 0.f;           // 0 = off
  int window_left = -1;          // -1 = unbounded; causal is (-1, 0)
  int window_right = -1;
  int attention_chunk = 0;       // 0 = off
  int num_splits = 1;            // resolved (>= 1) before kernels run
  bool pack_gqa = true;          // performance hint only
  int cp_world_size = 1, cp_rank = 0;

  DType in_dtype = DType::kBFloat16;
  DType out_dtype = DType::kBFloat16;

  // Device only (launch.cpp, fp8 on the Hopper kernel): > 0 when v points at a staged V^T,
  // (batches, Hk, Dv, v_t_keys) with keys contiguous and permuted inside 16-key groups
  // (csrc/musa/arch/sm90/fp8_pv_order.h); v_head_stride / v_batch_stride are then its strides.
  int v_t_keys = 0;
};

// FMHA backward (fmha_bwd): the forward's parameters, whose out / lse point at the saved
// forward outputs, plus the incoming gradients and where the input gradients go.
struct FmhaBwdParams {
  FmhaParams fwd;
  const void* dout = nullptr;    // like out (out dtype)
  int64_t dout_batch_stride = 0, dout_row_stride = 0, dout_head_stride = 0;
  const float* dlse = nullptr;   // like lse, optional (a gradient flowing into the lse output)
  int64_t dlse_batch_stride = 0, dlse_head_stride = 0, dlse_row_stride = 0;
  void* dq = nullptr;            // contiguous, q's shape and dtype
  void* dk = nullptr;            // contiguous, k's shape and dtype
  void* dv = nullptr;            // contiguous, v's shape and dtype
  int64_t dk_batch_stride = 0, dk_row_stride = 0, dk_head_stride = 0;  // 0 batch stride when ragged
  int64_t dv_batch_stride = 0, dv_row_stride = 0, dv_head_stride = 0;
  float* dsink = nullptr;        // (H) fp32 when the forward had a learnable_sink
  bool deterministic = false;    // bitwise-identical gradients run to run
  int max_seqlen_q = 0, max_seqlen_k = 0;  // bounds of any sequence's query rows / keys (grids)
};

// The split-KV combine of SEMANTICS §2, over rows of Dv values.
struct CombineParams {
  const float* out_partial = nullptr;  // (S, rows, Dv): split stride, row stride, unit col stride
  const float* lse_partial = nullptr;  // (S, rows)
  int64_t op_split_stride = 0, op_row_stride = 0;
  int64_t lse_split_stride = 0, lse_row_stride = 0;
  void* out = nullptr;                 // (rows, Dv) contiguous
  float* lse = nullptr;                // (rows) contiguous
  int num_splits = 0;
  int64_t rows = 0;
  int head_dim_v = 0;
  DType out_dtype = DType::kFloat32;
};

}  // namespace mate
