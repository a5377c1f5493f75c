#include "fmha_checks.h"

#include <cmath>

#include "fmha_math.h"
#include "op_args.h"
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

FmhaProblem check_fmha_inputs(const OpArgs& a, const FmhaTensors& t) {
  // Arguments by their schema names; fmha_fwd_kvcache lacks some (cu_seqlens_k, ...): they read as not given.
  const at::Tensor &q = t.q, &k = t.k, &v = t.v;
  const char *k_name = t.k_name, *v_name = t.v_name;
  const auto cu_seqlens_q = a.opt_tensor("cu_seqlens_q"), cu_seqlens_k = a.opt_tensor("cu_seqlens_k");
  const auto max_seqlen_q = a.opt_integer("max_seqlen_q"), max_seqlen_k = a.opt_integer("max_seqlen_k");
  const auto seqused_q = a.opt_tensor("seqused_q"), page_table = a.opt_tensor("page_table");
  const auto& seqused_k = t.seqused_k;
  const auto cache_batch_idx = a.opt_tensor("cache_batch_idx"), cache_leftpad = a.opt_tensor("cache_leftpad");
  const auto qv = a.opt_tensor("qv"), q_descale = a.opt_tensor("q_descale");
  const auto k_descale = a.opt_tensor("k_descale"), v_descale = a.opt_tensor("v_descale");
  const auto softmax_scale = a.opt_real("softmax_scale");
  const bool causal = a.flag("causal", false);
  const int64_t window_size_left = a.integer("window_size_left", -1);
  const int64_t window_size_right = a.integer("window_size_right", -1);
  const auto learnable_sink = a.opt_tensor("learnable_sink");
  const int64_t attention_chunk = a.integer("attention_chunk", 0);
  const double softcap = a.real("softcap", 0.0);
  const auto scheduler_metadata = a.opt_tensor("scheduler_metadata");
  const int64_t num_splits = a.integer("num_splits", 1);
  const auto pack_gqa = a.opt_flag("pack_gqa");
  const int64_t cp_world_size = a.integer("cp_world_size", 1), cp_rank = a.integer("cp_rank", 0);
  const auto cp_tot_seqused_k = a.opt_tensor("cp_tot_seqused_k");
  const auto alibi_slopes = a.opt_tensor("alibi_slopes");
  FmhaProblem prob;
  FmhaParams& p = prob.params;

  // dtypes
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 ||
                  dt == at::kFloat8_e4m3fn,
              "q must be float32, float16, bfloat16 or float8_e4m3fn, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt, k_name, " must have the dtype of q (", dt, "), got ",
              k.scalar_type());
  TORCH_CHECK(v.scalar_type() == dt, v_name, " must have the dtype of q (", dt, "), got ",
              v.scalar_type());
  check_same_device(k, q, k_name);
  check_same_device(v, q, v_name);

  // layouts
  const bool q_ragged = cu_seqlens_q.has_value();
  const bool paged = page_table.has_value();
  TORCH_CHECK(!(paged && cu_seqlens_k), "page_table and cu_seqlens_k cannot both be given: "
              "a paged cache takes its key lengths from seqused_k");
  const bool k_ragged = cu_seqlens_k.has_value();
  TORCH_CHECK(!(k_ragged && cache_batch_idx), "cache_batch_idx selects rows of a dense or paged "
              "cache and cannot be used with cu_seqlens_k (ragged k)");
  TORCH_CHECK(q.dim() == (q_ragged ? 3 : 4), "q must be ",
              q_ragged ? "(total_q, num_heads, head_dim) when cu_seqlens_q is given"
                       : "(batch_size, seqlen_q, num_heads, head_dim)",
              ", got shape ", q.sizes());
  TORCH_CHECK(k.dim() == (k_ragged ? 3 : 4), k_name, " must be ",
              k_ragged ? "(total_k, num_heads_k, head_dim) when cu_seqlens_k is given"
              : paged  ? "(num_pages, page_size, num_heads_k, head_dim) with page_table"
                       : "(batch_size, seqlen_k, num_heads_k, head_dim)",
              ", got shape ", k.sizes());
  TORCH_CHECK(v.dim() == k.dim() && v.sizes().slice(0, k.dim() - 1) == k.sizes().slice(0, k.dim() - 1),
              v_name, " must match ", k_name, " in every dimension but the last: ", k_name, " ", k.sizes(), ", ", v_name, " ", v.sizes());
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, k_name);
  check_last_dim_contiguous(v, v_name);

  TORCH_CHECK(!q_ragged || cu_seqlens_q->dim() == 1,
              "cu_seqlens_q must be 1-D (batch_size + 1), got shape ", cu_seqlens_q->sizes());
  const int64_t batch = q_ragged ? cu_seqlens_q->size(0) - 1 : q.size(0);
  TORCH_CHECK(batch >= 1 || (q_ragged && batch == 0) || (!q_ragged && q.size(0) == 0),
              "cu_seqlens_q must have at least 1 entry");
  const int64_t heads = q.size(-2), heads_k = k.size(-2);
  const int64_t head_dim = q.size(-1), head_dim_v = v.size(-1);
  TORCH_CHECK(heads >= 1, "q must have at least one head, got num_heads = ", heads);
  TORCH_CHECK(heads_k >= 1 && heads % heads_k == 0, "num_heads (", heads,
              ") must be a multiple of num_heads_k (", heads_k, ")");
  TORCH_CHECK(k.size(-1) == head_dim, k_name, " head_dim (", k.size(-1), ") must equal q head_dim (",
              head_dim, ")");
  TORCH_CHECK(head_dim >= 1 && head_dim <= kMaxHeadDim, "head_dim must be in [1, ", kMaxHeadDim,
              "], got ", head_dim);
  TORCH_CHECK(head_dim_v >= 1 && head_dim_v <= kMaxHeadDim, "head_dim_v (v.size(-1)) must be in [1, ",
              kMaxHeadDim, "], got ", head_dim_v);

  check_int32_vector(cu_seqlens_q, "cu_seqlens_q", batch + 1, q);
  check_int32_vector(cu_seqlens_k, "cu_seqlens_k", batch + 1, q);
  check_int32_vector(seqused_q, "seqused_q", batch, q);
  check_int32_vector(seqused_k, t.seqused_k_name, batch, q);
  check_int32_vector(cache_batch_idx, "cache_batch_idx", batch, q);
  check_int32_vector(cache_leftpad, "cache_leftpad", batch, q);
  check_int32_vector(cp_tot_seqused_k, "cp_tot_seqused_k", batch, q);
  check_int32_vector(scheduler_metadata, "scheduler_metadata", scheduler_metadata_size(batch),
                     q);
  if (paged) {
    const auto& pt = *page_table;
    TORCH_CHECK(pt.scalar_type() == at::kInt && pt.dim() == 2,
                "page_table must be a 2-D int32 tensor (batch_size, max_num_pages), got ", pt.scalar_type(), " ",
                pt.sizes());
    TORCH_CHECK(cache_batch_idx || pt.size(0) == batch, "page_table must have batch_size (",
                batch, ") rows, got ", pt.size(0));
    check_last_dim_contiguous(pt, "page_table");
    check_same_device(pt, q, "page_table");
    TORCH_CHECK(seqused_k, t.seqused_k_name, " is required with page_table (the key lengths)");
    TORCH_CHECK(k.size(1) >= 1, "page_size (k.size(1)) must be >= 1");
  } else if (!k_ragged) {
    TORCH_CHECK(cache_batch_idx || k.size(0) == batch, k_name, " must have batch_size (", batch,
                ") sequences, got ", k.size(0), " (pass cache_batch_idx to index a larger cache)");
  }
  // qv
  if (qv) {
    const at::Tensor& qvt = *qv;
    TORCH_CHECK(qvt.scalar_type() == dt, "qv must have the dtype of q (", dt, "), got ",
                qvt.scalar_type());
    auto expect = q.sizes().vec();
    expect.back() = head_dim_v;
    TORCH_CHECK(qvt.sizes() == at::IntArrayRef(expect), "qv must have shape ", at::IntArrayRef(expect),
                " (q's shape with head_dim_v), got ", qvt.sizes());
    check_last_dim_contiguous(qvt, "qv");
    check_same_device(qvt, q, "qv");
  }

  // options
  check_int_range(window_size_left, -1, "window_size_left (-1 = unbounded)");
  check_int_range(window_size_right, -1, "window_size_right (-1 = unbounded)");
  check_int_range(attention_chunk, 0, "attention_chunk");
  check_int_range(cp_world_size, 1, "cp_world_size");
  check_int_range(cp_rank, 0, "cp_rank");
  TORCH_CHECK(softcap >= 0 && std::isfinite(softcap), "softcap must be a finite value >= 0, got ", softcap);
  TORCH_CHECK(num_splits >= 0 && num_splits <= kMaxSplits, "num_splits must be in [0, ",
              kMaxSplits, "], got ", num_splits);
  TORCH_CHECK(cp_world_size >= 1, "cp_world_size must be >= 1, got ", cp_world_size);
  TORCH_CHECK(cp_rank >= 0 && cp_rank < cp_world_size, "cp_rank must be in [0, ",
              cp_world_size, "), got ", cp_rank);
  TORCH_CHECK(cp_world_size == 1 || cp_tot_seqused_k,
              "cp_tot_seqused_k (batch_size,) is required when cp_world_size > 1");
  if (softmax_scale) TORCH_CHECK(std::isfinite(*softmax_scale), "softmax_scale must be finite");

  // output dtype: fp8 inputs give bf16 unless asked otherwise
  const at::ScalarType out_dtype = t.out_dtype.value_or(dt == at::kFloat8_e4m3fn ? at::kBFloat16 : dt);
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
  if (max_seqlen_q) check_int_range(*max_seqlen_q, 0, "max_seqlen_q");
  if (max_seqlen_k) check_int_range(*max_seqlen_k, 0, "max_seqlen_k");
  p.total_q = static_cast<int>(total_q);
  p.seqlen_q = static_cast<int>(q_ragged ? max_seqlen_q.value_or(0) : q.size(1));
  if (q_ragged) {
    p.q_batch_stride = 0;
  } else {
    p.q_batch_stride = q.stride(0);
  }
  p.q_row_stride = q.stride(-3);
  p.q_head_stride = q.stride(-2);
  if (paged) {
    p.page_size = static_cast<int>(k.size(1));
    p.max_pages = static_cast<int>(page_table->size(1));
    p.num_pages = static_cast<int>(k.size(0));
    const int64_t capacity = static_cast<int64_t>(p.page_size) * p.max_pages;
    check_int_range(capacity, 0, "page_size * max_num_pages (keys one sequence can hold)");
    p.seqlen_k = static_cast<int>(capacity);
    p.page_table = page_table->data_ptr<int32_t>();
    p.page_table_batch_stride = page_table->stride(0);
    p.page_table_rows = static_cast<int>(page_table->size(0));
  } else if (k_ragged) {
    p.seqlen_k = static_cast<int>(max_seqlen_k.value_or(0));
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
  if (qv) {
    p.qv = qv->data_ptr();
    p.qv_batch_stride = q_ragged ? 0 : qv->stride(0);
    p.qv_row_stride = qv->stride(-3);
    p.qv_head_stride = qv->stride(-2);
  }
  p.cu_seqlens_q = int_ptr(cu_seqlens_q);
  p.cu_seqlens_k = int_ptr(cu_seqlens_k);
  p.seqused_q = int_ptr(seqused_q);
  p.seqused_k = int_ptr(seqused_k);
  p.cache_batch_idx = int_ptr(cache_batch_idx);
  p.cache_leftpad = int_ptr(cache_leftpad);
  p.cp_tot_seqused_k = cp_world_size > 1 ? int_ptr(cp_tot_seqused_k) : nullptr;
  p.scheduler_metadata = int_ptr(scheduler_metadata);
  check_descale(q_descale, "q_descale", batch, heads_k, q, p.q_descale, p.q_descale_batch_stride,
                p.q_descale_head_stride);
  check_descale(k_descale, "k_descale", batch, heads_k, q, p.k_descale, p.k_descale_batch_stride,
                p.k_descale_head_stride);
  check_descale(v_descale, "v_descale", batch, heads_k, q, p.v_descale, p.v_descale_batch_stride,
                p.v_descale_head_stride);
  if (learnable_sink) {
    const auto& s = *learnable_sink;
    TORCH_CHECK(s.dim() == 1 && s.size(0) == heads, "learnable_sink must have shape (num_heads,) = (",
                heads, ",), got ", s.sizes());
    TORCH_CHECK(at::isFloatingType(s.scalar_type()), "learnable_sink must be a floating tensor, got ",
                s.scalar_type());
    check_same_device(s, q, "learnable_sink");
    prob.sink_f32 = s.to(at::kFloat).contiguous();
    p.learnable_sink = prob.sink_f32.data_ptr<float>();
  }

  if (alibi_slopes) {
    const auto& a = *alibi_slopes;
    TORCH_CHECK(a.scalar_type() == at::kFloat, "alibi_slopes must be float32, got ", a.scalar_type());
    TORCH_CHECK((a.dim() == 1 && a.size(0) == heads) || (a.dim() == 2 && a.size(0) == batch && a.size(1) == heads),
                "alibi_slopes must have shape (num_heads,) or (batch_size, num_heads) = (", batch, ", ", heads,
                "), got ", a.sizes());
    TORCH_CHECK(a.stride(-1) == 1 || heads == 1, "alibi_slopes must have a contiguous last dimension");
    check_same_device(a, q, "alibi_slopes");
    p.alibi_slopes = a.data_ptr<float>();
    p.alibi_batch_stride = a.dim() == 2 ? a.stride(0) : 0;
  }

  const double default_scale = 1.0 / std::sqrt(static_cast<double>(head_dim + (qv ? head_dim_v : 0)));
  p.softmax_scale = static_cast<float>(softmax_scale.value_or(default_scale));
  p.softcap = static_cast<float>(softcap);
  p.window_left = static_cast<int>(window_size_left);
  p.window_right = causal ? 0 : static_cast<int>(window_size_right);
  p.attention_chunk = static_cast<int>(attention_chunk);
  p.num_splits = static_cast<int>(num_splits);
  p.pack_gqa = pack_gqa.value_or(true);
  p.cp_world_size = static_cast<int>(cp_world_size);
  p.cp_rank = static_cast<int>(cp_rank);
  p.in_dtype = to_dtype(dt);
  p.out_dtype = to_dtype(out_dtype);

  prob.max_seqlen_q = q_ragged ? static_cast<int>(max_seqlen_q.value_or(p.total_q)) : p.seqlen_q;
  prob.max_seqlen_k = k_ragged ? static_cast<int>(max_seqlen_k.value_or(p.total_k)) : p.seqlen_k;
  prob.scratch_options = q.options().dtype(at::kFloat);
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
    // a ragged sequence may use keys past its cu_seqlens_k segment, as long as they lie in k (FA3).
    // 64-bit sums: lengths near 2^31 must not wrap past the checks.
    const int64_t cap = p.k_is_ragged ? static_cast<int64_t>(p.total_k) - p.cu_seqlens_k[b] : p.seqlen_k;
    const int64_t added = new_keys(p, b);  // fmha_fwd_kvcache: keys this call appends
    if (p.seqused_k)
      TORCH_CHECK(p.seqused_k[b] >= 0 && p.seqused_k[b] + added <= cap, "seqused_k[", b, "] = ", p.seqused_k[b],
                  added ? " plus the new keys" : "", " must be in [0, ", cap, "] (the key capacity of sequence ", b,
                  ")");
    const int64_t own = p.k_is_ragged ? p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b] : p.seqlen_k;
    const int64_t end = p.seqused_k ? p.seqused_k[b] + added : own;
    if (p.cache_leftpad)
      TORCH_CHECK(p.cache_leftpad[b] >= 0 && p.cache_leftpad[b] <= end, "cache_leftpad[", b, "] = ",
                  p.cache_leftpad[b], " must be in [0, ", end, "]");
    if (p.cp_tot_seqused_k)
      TORCH_CHECK(p.cp_tot_seqused_k[b] >= 0, "cp_tot_seqused_k[", b, "] must be >= 0");
    if (p.page_size > 0) {
      const SeqInfo s = seq_info(p, b);
      const int64_t used_pages = (static_cast<int64_t>(s.k_start) + s.k_len + p.page_size - 1) / p.page_size;
      TORCH_CHECK(used_pages <= p.max_pages, "sequence ", b, " needs ", used_pages, " pages but page_table has ",
                  p.max_pages, " columns");
      const int32_t* row = p.page_table + s.cache_row * p.page_table_batch_stride;
      for (int64_t i = s.k_start / p.page_size; i < used_pages; ++i)
        TORCH_CHECK(row[i] >= 0 && row[i] < p.num_pages, "page_table[", s.cache_row, ", ", i,
                    "] = ", row[i], " is out of range [0, ", p.num_pages, ")");
    }
    if (p.scheduler_metadata)
      TORCH_CHECK(p.scheduler_metadata[1 + b] >= 1 && p.scheduler_metadata[1 + b] <= kMaxSplits,
                  "scheduler_metadata entry ", 1 + b, " = ", p.scheduler_metadata[1 + b],
                  " is not a split count in [1, ", kMaxSplits, "]; build it with get_scheduler_metadata");
  }
}

FmhaBwdProblem check_fmha_bwd_inputs(const OpArgs& a) {
  const at::Tensor &dout = a.tensor("dout"), &q = a.tensor("q"), &k = a.tensor("k"), &v = a.tensor("v");
  const at::Tensor &out = a.tensor("out"), &lse = a.tensor("lse");
  // Forward-only features first, each naming why.
  TORCH_CHECK(q.scalar_type() != at::kFloat8_e4m3fn,
              "fmha_bwd: float8_e4m3fn inputs are forward-only (FP8 attention is an inference path; "
              "train in float32, float16 or bfloat16)");
  TORCH_CHECK(!a.opt_tensor("page_table"),
              "fmha_bwd: paged K/V (page_table) is forward-only (a paged kv cache is an inference "
              "structure); pass dense or ragged (cu_seqlens_k) k/v to train");
  TORCH_CHECK(!a.opt_tensor("cache_batch_idx"),
              "fmha_bwd: cache_batch_idx is forward-only (sequences may share cache rows, so their "
              "key gradients would collide)");
  TORCH_CHECK(!a.opt_tensor("qv"), "fmha_bwd: qv is forward-only (the gradient of qv is not implemented)");
  TORCH_CHECK(a.integer("cp_world_size", 1) == 1,
              "fmha_bwd: context parallel (cp_world_size > 1) is forward-only (no backward of a "
              "rank's partial result)");
  FmhaBwdProblem bp;
  bp.fwd = check_fmha_inputs(a, {q, k, v, a.opt_tensor("seqused_k"), out.scalar_type()});
  check_same_device(out, q, "out");
  check_same_device(lse, q, "lse");
  set_fmha_outputs(bp.fwd, out, lse);  // the saved forward outputs: shapes, dtypes
  FmhaBwdParams& g = bp.params;
  g.fwd = bp.fwd.params;

  TORCH_CHECK(dout.sizes() == out.sizes(), "dout must have the shape of out ", out.sizes(), ", got ", dout.sizes());
  TORCH_CHECK(dout.scalar_type() == out.scalar_type(), "dout must have the dtype of out (", out.scalar_type(),
              "), got ", dout.scalar_type());
  check_same_device(dout, q, "dout");
  check_last_dim_contiguous(dout, "dout");
  g.dout = dout.data_ptr();
  g.dout_batch_stride = g.fwd.q_is_ragged ? 0 : dout.stride(0);
  g.dout_row_stride = dout.stride(-3);
  g.dout_head_stride = dout.stride(-2);

  if (const auto dlse = a.opt_tensor("dlse")) {
    TORCH_CHECK(dlse->sizes() == lse.sizes(), "dlse must have the shape of lse ", lse.sizes(), ", got ",
                dlse->sizes());
    TORCH_CHECK(at::isFloatingType(dlse->scalar_type()), "dlse must be a floating tensor, got ",
                dlse->scalar_type());
    check_same_device(*dlse, q, "dlse");
    bp.dlse = dlse->to(at::kFloat).contiguous();
    g.dlse = bp.dlse.data_ptr<float>();
    if (g.fwd.q_is_ragged) {  // (H, Tq)
      g.dlse_head_stride = bp.dlse.stride(0);
      g.dlse_row_stride = bp.dlse.stride(1);
    } else {  // (B, H, Sq)
      g.dlse_batch_stride = bp.dlse.stride(0);
      g.dlse_head_stride = bp.dlse.stride(1);
      g.dlse_row_stride = bp.dlse.stride(2);
    }
  }
  g.deterministic = a.flag("deterministic", false);
  g.max_seqlen_q = bp.fwd.max_seqlen_q;
  g.max_seqlen_k = bp.fwd.max_seqlen_k;
  return bp;
}

void check_fmha_bwd_index_values(const FmhaBwdParams& g) {
  const FmhaParams& p = g.fwd;
  check_fmha_index_values(p);
  if (!p.k_is_ragged) return;
  for (int b = 0; b < p.batch; ++b) {
    const int64_t own = static_cast<int64_t>(p.cu_seqlens_k[b + 1]) - p.cu_seqlens_k[b];
    TORCH_CHECK(!p.seqused_k || p.seqused_k[b] <= own, "fmha_bwd: seqused_k[", b, "] = ", p.seqused_k[b],
                " reaches past sequence ", b, "'s cu_seqlens_k segment of ", own,
                " keys (allowed in the forward; the backward needs each key owned by one sequence)");
  }
}

void set_fmha_bwd_outputs(FmhaBwdProblem& prob, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                          const at::Tensor& dsink) {
  FmhaBwdParams& g = prob.params;
  TORCH_CHECK(dq.is_contiguous() && dk.is_contiguous() && dv.is_contiguous(), "dq, dk, dv must be contiguous");
  g.dq = dq.data_ptr();
  g.dk = dk.data_ptr();
  g.dv = dv.data_ptr();
  g.dk_batch_stride = g.fwd.k_is_ragged ? 0 : dk.stride(0);
  g.dk_row_stride = dk.stride(-3);
  g.dk_head_stride = dk.stride(-2);
  g.dv_batch_stride = g.fwd.k_is_ragged ? 0 : dv.stride(0);
  g.dv_row_stride = dv.stride(-3);
  g.dv_head_stride = dv.stride(-2);
  g.dsink = g.fwd.learnable_sink ? dsink.data_ptr<float>() : nullptr;
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
