#include "fmha_checks.h"

#include <cmath>

#include "fmha_math.h"
#include "check_utils.h"
#include "scheduler.h"

namespace mate {

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat8_e4m3fn: return DType::kFloat8E4M3;
    default: TORCH_CHECK(false, "unsupported dtype ", t);
  }
}

namespace {

void check_descale(const std::optional<at::Tensor>& t, const char* name, int64_t batch,
                   int64_t heads_k, const at::Tensor& q, const float*& ptr, int64_t& sb,
                   int64_t& sh) {
  if (!t) return;
  TORCH_CHECK(q.scalar_type() == at::kFloat8_e4m3fn, name,
              " is only used with float8_e4m3fn inputs, got q of dtype ", q.scalar_type());
  TORCH_CHECK(t->scalar_type() == at::kFloat, name, " must be float32, got ", t->scalar_type());
  TORCH_CHECK(t->dim() == 2 && t->size(0) == batch && t->size(1) == heads_k, name,
              " must have shape (batch_size, num_heads_k) = (", batch, ", ", heads_k, "), got ",
              t->sizes());
  check_same_device(*t, q, name);
  ptr = t->data_ptr<float>();
  sb = t->stride(0);
  sh = t->stride(1);
}

}  // namespace

FmhaInputs make_fmha_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
                       std::optional<int64_t> max_seqlen_q, std::optional<int64_t> max_seqlen_k,
                       const std::optional<at::Tensor>& seqused_q, const std::optional<at::Tensor>& seqused_k,
                       const std::optional<at::Tensor>& page_table, const std::optional<at::Tensor>& cache_batch_idx,
                       const std::optional<at::Tensor>& cache_leftpad, const std::optional<at::Tensor>& qv,
                       const std::optional<at::Tensor>& q_descale, const std::optional<at::Tensor>& k_descale,
                       const std::optional<at::Tensor>& v_descale, std::optional<double> softmax_scale, bool causal,
                       int64_t window_size_left, int64_t window_size_right,
                       const std::optional<at::Tensor>& learnable_sink, int64_t attention_chunk, double softcap,
                       const std::optional<at::Tensor>& scheduler_metadata, int64_t num_splits,
                       std::optional<bool> pack_gqa, int64_t cp_world_size, int64_t cp_rank,
                       const std::optional<at::Tensor>& cp_tot_seqused_k) {
  FmhaInputs in;
  in.q = q; in.k = k; in.v = v;
  in.cu_seqlens_q = cu_seqlens_q; in.cu_seqlens_k = cu_seqlens_k;
  in.max_seqlen_q = max_seqlen_q; in.max_seqlen_k = max_seqlen_k;
  in.seqused_q = seqused_q; in.seqused_k = seqused_k;
  in.page_table = page_table; in.cache_batch_idx = cache_batch_idx; in.cache_leftpad = cache_leftpad;
  in.qv = qv; in.q_descale = q_descale; in.k_descale = k_descale; in.v_descale = v_descale;
  in.softmax_scale = softmax_scale; in.causal = causal;
  in.window_size_left = window_size_left; in.window_size_right = window_size_right;
  in.learnable_sink = learnable_sink; in.attention_chunk = attention_chunk; in.softcap = softcap;
  in.scheduler_metadata = scheduler_metadata; in.num_splits = num_splits; in.pack_gqa = pack_gqa;
  in.cp_world_size = cp_world_size; in.cp_rank = cp_rank; in.cp_tot_seqused_k = cp_tot_seqused_k;
  return in;
}

FmhaProblem check_fmha_inputs(const FmhaInputs& in) {
  FmhaProblem prob;
  FmhaParams& p = prob.params;
  const at::Tensor &q = in.q, &k = in.k, &v = in.v;

  // dtypes
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 ||
                  dt == at::kFloat8_e4m3fn,
              "q must be float32, float16, bfloat16 or float8_e4m3fn, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt, "k must have the dtype of q (", dt, "), got ",
              k.scalar_type());
  TORCH_CHECK(v.scalar_type() == dt, "v must have the dtype of q (", dt, "), got ",
              v.scalar_type());
  check_same_device(k, q, "k");
  check_same_device(v, q, "v");

  // layouts
  const bool q_ragged = in.cu_seqlens_q.has_value();
  const bool paged = in.page_table.has_value();
  TORCH_CHECK(!(paged && in.cu_seqlens_k), "page_table and cu_seqlens_k cannot both be given: "
              "a paged cache takes its key lengths from seqused_k");
  const bool k_ragged = in.cu_seqlens_k.has_value();
  TORCH_CHECK(!(k_ragged && in.cache_batch_idx), "cache_batch_idx selects rows of a dense or paged "
              "cache and cannot be used with cu_seqlens_k (ragged k)");
  TORCH_CHECK(q.dim() == (q_ragged ? 3 : 4), "q must be ",
              q_ragged ? "(total_q, num_heads, head_dim) when cu_seqlens_q is given"
                       : "(batch_size, seqlen_q, num_heads, head_dim)",
              ", got shape ", q.sizes());
  TORCH_CHECK(k.dim() == (k_ragged ? 3 : 4), "k must be ",
              k_ragged ? "(total_k, num_heads_k, head_dim) when cu_seqlens_k is given"
              : paged  ? "(num_pages, page_size, num_heads_k, head_dim) with page_table"
                       : "(batch_size, seqlen_k, num_heads_k, head_dim)",
              ", got shape ", k.sizes());
  TORCH_CHECK(v.dim() == k.dim() && v.sizes().slice(0, k.dim() - 1) == k.sizes().slice(0, k.dim() - 1),
              "v must match k in every dimension but the last: k ", k.sizes(), ", v ", v.sizes());
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, "k");
  check_last_dim_contiguous(v, "v");

  TORCH_CHECK(!q_ragged || in.cu_seqlens_q->dim() == 1,
              "cu_seqlens_q must be 1-D (batch_size + 1), got shape ", in.cu_seqlens_q->sizes());
  const int64_t batch = q_ragged ? in.cu_seqlens_q->size(0) - 1 : q.size(0);
  TORCH_CHECK(batch >= 1 || (q_ragged && batch == 0) || (!q_ragged && q.size(0) == 0),
              "cu_seqlens_q must have at least 1 entry");
  const int64_t heads = q.size(-2), heads_k = k.size(-2);
  const int64_t head_dim = q.size(-1), head_dim_v = v.size(-1);
  TORCH_CHECK(heads >= 1, "q must have at least one head, got num_heads = ", heads);
  TORCH_CHECK(heads_k >= 1 && heads % heads_k == 0, "num_heads (", heads,
              ") must be a multiple of num_heads_k (", heads_k, ")");
  TORCH_CHECK(k.size(-1) == head_dim, "k head_dim (", k.size(-1), ") must equal q head_dim (",
              head_dim, ")");
  TORCH_CHECK(head_dim >= 1 && head_dim <= kMaxHeadDim, "head_dim must be in [1, ", kMaxHeadDim,
              "], got ", head_dim);
  TORCH_CHECK(head_dim_v >= 1 && head_dim_v <= kMaxHeadDim, "head_dim_v (v.size(-1)) must be in [1, ",
              kMaxHeadDim, "], got ", head_dim_v);

  check_int32_vector(in.cu_seqlens_q, "cu_seqlens_q", batch + 1, q);
  check_int32_vector(in.cu_seqlens_k, "cu_seqlens_k", batch + 1, q);
  check_int32_vector(in.seqused_q, "seqused_q", batch, q);
  check_int32_vector(in.seqused_k, "seqused_k", batch, q);
  check_int32_vector(in.cache_batch_idx, "cache_batch_idx", batch, q);
  check_int32_vector(in.cache_leftpad, "cache_leftpad", batch, q);
  check_int32_vector(in.cp_tot_seqused_k, "cp_tot_seqused_k", batch, q);
  check_int32_vector(in.scheduler_metadata, "scheduler_metadata", scheduler_metadata_size(batch),
                     q);
  if (paged) {
    const auto& pt = *in.page_table;
    TORCH_CHECK(pt.scalar_type() == at::kInt, "page_table must be int32, got ", pt.scalar_type());
    TORCH_CHECK(pt.dim() == 2, "page_table must be 2-D (batch_size, max_num_pages), got shape ",
                pt.sizes());
    TORCH_CHECK(in.cache_batch_idx || pt.size(0) == batch, "page_table must have batch_size (",
                batch, ") rows, got ", pt.size(0));
    check_last_dim_contiguous(pt, "page_table");
    check_same_device(pt, q, "page_table");
    TORCH_CHECK(in.seqused_k, "seqused_k is required with page_table (the key lengths)");
    TORCH_CHECK(k.size(1) >= 1, "page_size (k.size(1)) must be >= 1");
  } else if (!k_ragged) {
    TORCH_CHECK(in.cache_batch_idx || k.size(0) == batch, "k must have batch_size (", batch,
                ") sequences, got ", k.size(0), " (pass cache_batch_idx to index a larger cache)");
  }
  // qv
  if (in.qv) {
    const auto& qv = *in.qv;
    TORCH_CHECK(qv.scalar_type() == dt, "qv must have the dtype of q (", dt, "), got ",
                qv.scalar_type());
    auto expect = q.sizes().vec();
    expect.back() = head_dim_v;
    TORCH_CHECK(qv.sizes() == at::IntArrayRef(expect), "qv must have shape ", at::IntArrayRef(expect),
                " (q's shape with head_dim_v), got ", qv.sizes());
    check_last_dim_contiguous(qv, "qv");
    check_same_device(qv, q, "qv");
  }

  // options
  check_int_range(in.window_size_left, -1, "window_size_left (-1 = unbounded)");
  check_int_range(in.window_size_right, -1, "window_size_right (-1 = unbounded)");
  check_int_range(in.attention_chunk, 0, "attention_chunk");
  check_int_range(in.cp_world_size, 1, "cp_world_size");
  check_int_range(in.cp_rank, 0, "cp_rank");
  TORCH_CHECK(in.softcap >= 0 && std::isfinite(in.softcap), "softcap must be a finite value >= 0, got ", in.softcap);
  TORCH_CHECK(in.num_splits >= 0 && in.num_splits <= kMaxSplits, "num_splits must be in [0, ",
              kMaxSplits, "], got ", in.num_splits);
  TORCH_CHECK(in.cp_world_size >= 1, "cp_world_size must be >= 1, got ", in.cp_world_size);
  TORCH_CHECK(in.cp_rank >= 0 && in.cp_rank < in.cp_world_size, "cp_rank must be in [0, ",
              in.cp_world_size, "), got ", in.cp_rank);
  TORCH_CHECK(in.cp_world_size == 1 || in.cp_tot_seqused_k,
              "cp_tot_seqused_k (batch_size,) is required when cp_world_size > 1");
  if (in.softmax_scale) TORCH_CHECK(std::isfinite(*in.softmax_scale), "softmax_scale must be finite");

  // output dtype: fp8 inputs give bf16 unless asked otherwise
  at::ScalarType out_dtype = in.out_dtype.value_or(dt == at::kFloat8_e4m3fn ? at::kBFloat16 : dt);
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16,
              "out dtype must be float32, float16 or bfloat16, got ", out_dtype);
  prob.out_dtype = out_dtype;

  // ---- fill params ----
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_is_ragged = q_ragged;
  p.k_is_ragged = k_ragged;
  p.batch = static_cast<int>(batch);
  p.num_heads = static_cast<int>(heads);
  p.num_heads_k = static_cast<int>(heads_k);
  p.head_dim = static_cast<int>(head_dim);
  p.head_dim_v = static_cast<int>(head_dim_v);
  const int64_t total_q = q_ragged ? q.size(0) : q.size(0) * q.size(1);
  check_int_range(total_q, 0, "the number of query rows");
  if (in.max_seqlen_q) check_int_range(*in.max_seqlen_q, 0, "max_seqlen_q");
  if (in.max_seqlen_k) check_int_range(*in.max_seqlen_k, 0, "max_seqlen_k");
  p.total_q = static_cast<int>(total_q);
  p.seqlen_q = static_cast<int>(q_ragged ? in.max_seqlen_q.value_or(0) : q.size(1));
  if (q_ragged) {
    p.q_batch_stride = 0;
  } else {
    p.q_batch_stride = q.stride(0);
  }
  p.q_row_stride = q.stride(-3);
  p.q_head_stride = q.stride(-2);
  if (paged) {
    p.page_size = static_cast<int>(k.size(1));
    p.max_pages = static_cast<int>(in.page_table->size(1));
    p.num_pages = static_cast<int>(k.size(0));
    const int64_t capacity = static_cast<int64_t>(p.page_size) * p.max_pages;
    check_int_range(capacity, 0, "page_size * max_num_pages (keys one sequence can hold)");
    p.seqlen_k = static_cast<int>(capacity);
    p.page_table = in.page_table->data_ptr<int32_t>();
    p.page_table_batch_stride = in.page_table->stride(0);
    p.page_table_rows = static_cast<int>(in.page_table->size(0));
  } else if (k_ragged) {
    p.seqlen_k = static_cast<int>(in.max_seqlen_k.value_or(0));
    p.total_k = static_cast<int>(k.size(0));
  } else {
    p.seqlen_k = static_cast<int>(k.size(1));
    p.num_pages = static_cast<int>(k.size(0));
  }
  p.k_batch_stride = k_ragged ? 0 : k.stride(0);
  p.v_batch_stride = k_ragged ? 0 : v.stride(0);
  p.k_row_stride = k.stride(-3);
  p.v_row_stride = v.stride(-3);
  p.k_head_stride = k.stride(-2);
  p.v_head_stride = v.stride(-2);
  if (in.qv) {
    p.qv = in.qv->data_ptr();
    p.qv_batch_stride = q_ragged ? 0 : in.qv->stride(0);
    p.qv_row_stride = in.qv->stride(-3);
    p.qv_head_stride = in.qv->stride(-2);
  }
  p.cu_seqlens_q = int_ptr(in.cu_seqlens_q);
  p.cu_seqlens_k = int_ptr(in.cu_seqlens_k);
  p.seqused_q = int_ptr(in.seqused_q);
  p.seqused_k = int_ptr(in.seqused_k);
  p.cache_batch_idx = int_ptr(in.cache_batch_idx);
  p.cache_leftpad = int_ptr(in.cache_leftpad);
  p.cp_tot_seqused_k = in.cp_world_size > 1 ? int_ptr(in.cp_tot_seqused_k) : nullptr;
  p.scheduler_metadata = int_ptr(in.scheduler_metadata);
  check_descale(in.q_descale, "q_descale", batch, heads_k, q, p.q_descale, p.q_descale_batch_stride,
                p.q_descale_head_stride);
  check_descale(in.k_descale, "k_descale", batch, heads_k, q, p.k_descale, p.k_descale_batch_stride,
                p.k_descale_head_stride);
  check_descale(in.v_descale, "v_descale", batch, heads_k, q, p.v_descale, p.v_descale_batch_stride,
                p.v_descale_head_stride);
  if (in.learnable_sink) {
    const auto& s = *in.learnable_sink;
    TORCH_CHECK(s.dim() == 1 && s.size(0) == heads, "learnable_sink must have shape (num_heads,) = (",
                heads, ",), got ", s.sizes());
    TORCH_CHECK(at::isFloatingType(s.scalar_type()), "learnable_sink must be a floating tensor, got ",
                s.scalar_type());
    check_same_device(s, q, "learnable_sink");
    prob.sink_f32 = s.to(at::kFloat).contiguous();
    p.learnable_sink = prob.sink_f32.data_ptr<float>();
  }

  if (in.alibi_slopes) {
    const auto& a = *in.alibi_slopes;
    TORCH_CHECK(a.scalar_type() == at::kFloat, "alibi_slopes must be float32, got ", a.scalar_type());
    TORCH_CHECK((a.dim() == 1 && a.size(0) == heads) || (a.dim() == 2 && a.size(0) == batch && a.size(1) == heads),
                "alibi_slopes must have shape (num_heads,) or (batch_size, num_heads) = (", batch, ", ", heads,
                "), got ", a.sizes());
    TORCH_CHECK(a.stride(-1) == 1 || heads == 1, "alibi_slopes must have a contiguous last dimension");
    check_same_device(a, q, "alibi_slopes");
    p.alibi_slopes = a.data_ptr<float>();
    p.alibi_batch_stride = a.dim() == 2 ? a.stride(0) : 0;
  }

  const double default_scale = 1.0 / std::sqrt(static_cast<double>(head_dim + (in.qv ? head_dim_v : 0)));
  p.softmax_scale = static_cast<float>(in.softmax_scale.value_or(default_scale));
  p.softcap = static_cast<float>(in.softcap);
  p.window_left = static_cast<int>(in.window_size_left);
  p.window_right = in.causal ? 0 : static_cast<int>(in.window_size_right);
  p.attention_chunk = static_cast<int>(in.attention_chunk);
  p.num_splits = static_cast<int>(in.num_splits);
  p.pack_gqa = in.pack_gqa.value_or(true);
  p.cp_world_size = static_cast<int>(in.cp_world_size);
  p.cp_rank = static_cast<int>(in.cp_rank);
  p.in_dtype = to_dtype(dt);
  p.out_dtype = to_dtype(out_dtype);

  prob.out_shape = q.sizes().vec();
  prob.out_shape.back() = head_dim_v;
  prob.lse_shape = q_ragged ? std::vector<int64_t>{heads, q.size(0)}
                            : std::vector<int64_t>{q.size(0), heads, q.size(1)};
  return prob;
}

void set_fmha_outputs(FmhaProblem& prob, const at::Tensor& out, const at::Tensor& lse) {
  FmhaParams& p = prob.params;
  TORCH_CHECK(out.sizes() == at::IntArrayRef(prob.out_shape), "out must have shape ",
              at::IntArrayRef(prob.out_shape), ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == prob.out_dtype, "out must have dtype ", prob.out_dtype, ", got ",
              out.scalar_type());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(prob.lse_shape), "lse must have shape ",
              at::IntArrayRef(prob.lse_shape), ", got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "lse must be float32, got ", lse.scalar_type());
  check_last_dim_contiguous(out, "out");
  TORCH_CHECK(out.device() == lse.device(), "out and lse must be on one device");
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.out_batch_stride = p.q_is_ragged ? 0 : out.stride(0);
  p.out_row_stride = out.stride(-3);
  p.out_head_stride = out.stride(-2);
  if (p.q_is_ragged) {
    p.lse_batch_stride = 0;
    p.lse_head_stride = lse.stride(0);
    p.lse_row_stride = lse.stride(1);
  } else {
    p.lse_batch_stride = lse.stride(0);
    p.lse_head_stride = lse.stride(1);
    p.lse_row_stride = lse.stride(2);
  }
}

void check_fmha_index_values(const FmhaParams& p) {
  const int B = p.batch;
  auto check_cu = [&](const int32_t* cu, const char* name, int64_t total) {
    if (!cu) return;
    TORCH_CHECK(cu[0] >= 0, name, "[0] must be >= 0, got ", cu[0]);
    for (int b = 0; b < B; ++b)
      TORCH_CHECK(cu[b + 1] >= cu[b], name, " must be non-decreasing, but ", name, "[", b + 1,
                  "] = ", cu[b + 1], " < ", name, "[", b, "] = ", cu[b]);
    TORCH_CHECK(cu[B] <= total, name, "[-1] = ", cu[B], " exceeds the ", total,
                " rows of its tensor");
  };
  check_cu(p.cu_seqlens_q, "cu_seqlens_q", p.total_q);
  check_cu(p.cu_seqlens_k, "cu_seqlens_k", p.total_k);
  for (int b = 0; b < B; ++b) {
    if (p.cache_batch_idx) {
      const int r = p.cache_batch_idx[b];
      const int rows = p.page_size > 0 ? p.page_table_rows : p.num_pages;
      TORCH_CHECK(r >= 0 && r < rows, "cache_batch_idx[", b, "] = ", r,
                  " is out of range [0, ", rows, ")");
    }
    const int q_full = p.q_is_ragged ? p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b] : p.seqlen_q;
    if (p.seqused_q)
      TORCH_CHECK(p.seqused_q[b] >= 0 && p.seqused_q[b] <= q_full, "seqused_q[", b, "] = ",
                  p.seqused_q[b], " must be in [0, ", q_full, "]");
    // a ragged sequence may use keys past its cu_seqlens_k segment, as long as they lie in k (FA3)
    int cap = p.k_is_ragged ? p.total_k - p.cu_seqlens_k[b] : p.seqlen_k;
    if (p.seqused_k)
      TORCH_CHECK(p.seqused_k[b] >= 0 && p.seqused_k[b] <= cap, "seqused_k[", b, "] = ",
                  p.seqused_k[b], " must be in [0, ", cap, "] (the key capacity of sequence ", b, ")");
    const int own = p.k_is_ragged ? p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b] : p.seqlen_k;
    const int end = p.seqused_k ? p.seqused_k[b] : own;
    if (p.cache_leftpad)
      TORCH_CHECK(p.cache_leftpad[b] >= 0 && p.cache_leftpad[b] <= end, "cache_leftpad[", b, "] = ",
                  p.cache_leftpad[b], " must be in [0, ", end, "]");
    if (p.cp_tot_seqused_k)
      TORCH_CHECK(p.cp_tot_seqused_k[b] >= 0, "cp_tot_seqused_k[", b, "] must be >= 0");
    if (p.page_size > 0) {
      const SeqInfo s = seq_info(p, b);
      const int used_pages = (s.k_start + s.k_len + p.page_size - 1) / p.page_size;
      const int32_t* row = p.page_table + s.cache_row * p.page_table_batch_stride;
      for (int i = s.k_start / p.page_size; i < used_pages; ++i)
        TORCH_CHECK(row[i] >= 0 && row[i] < p.num_pages, "page_table[", s.cache_row, ", ", i,
                    "] = ", row[i], " is out of range [0, ", p.num_pages, ")");
    }
    if (p.scheduler_metadata)
      TORCH_CHECK(p.scheduler_metadata[1 + b] >= 1 && p.scheduler_metadata[1 + b] <= kMaxSplits,
                  "scheduler_metadata entry ", 1 + b, " = ", p.scheduler_metadata[1 + b],
                  " is not a split count in [1, ", kMaxSplits, "]; build it with get_scheduler_metadata");
  }
}

int check_scheduler_args(int64_t batch_size, int64_t max_seqlen_q, int64_t max_seqlen_k,
                         int64_t num_heads_q, int64_t num_heads_kv, int64_t headdim,
                         int64_t headdim_v, const at::Tensor& seqused_k, int64_t max_seqlen_k_new,
                         int64_t num_splits, int num_workers) {
  check_int_range(batch_size, 0, "batch_size");
  check_int_range(max_seqlen_q, 0, "max_seqlen_q");
  check_int_range(max_seqlen_k, 0, "max_seqlen_k");
  check_int_range(max_seqlen_k_new, 0, "max_seqlen_k_new");
  TORCH_CHECK(max_seqlen_k + max_seqlen_k_new <= INT32_MAX, "max_seqlen_k + max_seqlen_k_new must fit in int32");
  check_int_range(num_heads_q, 1, "num_heads_q");
  check_int_range(num_heads_kv, 1, "num_heads_kv");
  TORCH_CHECK(num_heads_q % num_heads_kv == 0, "num_heads_q (", num_heads_q,
              ") must be a multiple of num_heads_kv (", num_heads_kv, ")");
  TORCH_CHECK(headdim >= 1 && headdim <= kMaxHeadDim && headdim_v >= 1 && headdim_v <= kMaxHeadDim,
              "headdim and headdim_v must be in [1, ", kMaxHeadDim, "], got ", headdim, " and ", headdim_v);
  TORCH_CHECK(seqused_k.scalar_type() == at::kInt && seqused_k.dim() == 1 && seqused_k.size(0) == batch_size,
              "seqused_k (cache_seqlens) must be an int32 tensor of shape (batch_size,) = (", batch_size,
              ",), got ", seqused_k.scalar_type(), " ", seqused_k.sizes());
  TORCH_CHECK(num_splits >= 0 && num_splits <= kMaxSplits, "num_splits must be in [0, ", kMaxSplits,
              "], got ", num_splits);
  return resolve_num_splits(static_cast<int>(num_splits), batch_size, static_cast<int>(num_heads_kv),
                            static_cast<int>(max_seqlen_q), static_cast<int>(num_heads_q / num_heads_kv),
                            static_cast<int>(max_seqlen_k + max_seqlen_k_new), num_workers);
}

CombineProblem check_combine_inputs(const at::Tensor& out_partial, const at::Tensor& lse_partial,
                                    std::optional<at::ScalarType> out_dtype) {
  CombineProblem prob;
  TORCH_CHECK(out_partial.scalar_type() == at::kFloat, "out_partial must be float32, got ",
              out_partial.scalar_type());
  TORCH_CHECK(lse_partial.scalar_type() == at::kFloat, "lse_partial must be float32, got ",
              lse_partial.scalar_type());
  TORCH_CHECK(out_partial.dim() == 4 || out_partial.dim() == 5,
              "out_partial must be (num_splits, batch, seqlen, num_heads, head_dim) or "
              "(num_splits, total_q, num_heads, head_dim), got shape ", out_partial.sizes());
  TORCH_CHECK(lse_partial.dim() == out_partial.dim() - 1 &&
                  lse_partial.sizes() == out_partial.sizes().slice(0, out_partial.dim() - 1),
              "lse_partial must have shape ", out_partial.sizes().slice(0, out_partial.dim() - 1),
              " (out_partial without head_dim), got ", lse_partial.sizes());
  TORCH_CHECK(lse_partial.device() == out_partial.device(),
              "lse_partial must be on the device of out_partial");
  const int64_t splits = out_partial.size(0);
  TORCH_CHECK(splits >= 1 && splits <= kMaxSplits, "num_splits (out_partial.size(0)) must be in [1, ",
              kMaxSplits, "], got ", splits);
  const int64_t dv = out_partial.size(-1);
  TORCH_CHECK(dv >= 1 && dv <= kMaxHeadDim, "head_dim must be in [1, ", kMaxHeadDim, "], got ", dv);
  const auto odt = out_dtype.value_or(at::kFloat);
  TORCH_CHECK(odt == at::kFloat || odt == at::kHalf || odt == at::kBFloat16,
              "out_dtype must be float32, float16 or bfloat16, got ", odt);
  prob.out_dtype = odt;
  prob.out_partial = out_partial.reshape({splits, -1, dv});
  if (prob.out_partial.stride(2) != 1) prob.out_partial = prob.out_partial.contiguous();
  prob.lse_partial = lse_partial.reshape({splits, -1});
  CombineParams& c = prob.params;
  c.out_partial = prob.out_partial.data_ptr<float>();
  c.lse_partial = prob.lse_partial.data_ptr<float>();
  c.op_split_stride = prob.out_partial.stride(0);
  c.op_row_stride = prob.out_partial.stride(1);
  c.lse_split_stride = prob.lse_partial.stride(0);
  c.lse_row_stride = prob.lse_partial.stride(1);
  c.num_splits = static_cast<int>(splits);
  c.rows = prob.out_partial.size(1);
  c.head_dim_v = static_cast<int>(dv);
  c.out_dtype = to_dtype(odt);
  prob.out_shape = out_partial.sizes().slice(1).vec();
  prob.lse_shape = lse_partial.sizes().slice(1).vec();
  return prob;
}

void set_combine_outputs(CombineProblem& prob, const at::Tensor& out, const at::Tensor& lse) {
  TORCH_CHECK(out.sizes() == at::IntArrayRef(prob.out_shape), "out must have shape ",
              at::IntArrayRef(prob.out_shape), ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == prob.out_dtype, "out must have dtype ", prob.out_dtype, ", got ",
              out.scalar_type());
  TORCH_CHECK(out.is_contiguous(), "out must be contiguous");
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(prob.lse_shape), "lse must have shape ",
              at::IntArrayRef(prob.lse_shape), ", got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous(),
              "lse must be a contiguous float32 tensor");
  TORCH_CHECK(out.device() == prob.out_partial.device() && lse.device() == out.device(),
              "out and lse must be on the device of out_partial");
  prob.params.out = out.data_ptr();
  prob.params.lse = lse.data_ptr<float>();
}

}  // namespace mate
