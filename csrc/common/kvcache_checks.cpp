#include "kvcache_checks.h"

#include <algorithm>

#include "check_utils.h"
#include "op_args.h"
#include "fmha_checks.h"

namespace mate {
namespace {

// cos/sin (Sro, R/2) with R % 16 == 0 and R <= D, in the dtype of the rotated tensor x; for
// float8 x, any of fp32/fp16/bf16 (FA3's fp8 kv-cache calls pass bf16 tables): the rotation
// runs in fp32 and the result is stored as float8.
RotaryParams check_rotary_tables(const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& x,
                                 const char* x_name, int64_t head_dim, bool interleaved) {
  const auto dt = x.scalar_type(), ct = cos.scalar_type();
  if (dt == at::kFloat8_e4m3fn) {
    TORCH_CHECK((ct == at::kFloat || ct == at::kHalf || ct == at::kBFloat16) && sin.scalar_type() == ct,
                "rotary_cos and rotary_sin must share one dtype of float32, float16 or bfloat16 with float8 ",
                x_name, ", got ", ct, " and ", sin.scalar_type());
  } else {
    TORCH_CHECK(ct == dt && sin.scalar_type() == dt, "rotary_cos and rotary_sin must have the dtype of ", x_name,
                " (", dt, "), got ", ct, " and ", sin.scalar_type());
  }
  TORCH_CHECK(cos.dim() == 2 && sin.sizes() == cos.sizes(),
              "rotary_cos and rotary_sin must both be 2-D (seqlen_ro, rotary_dim / 2), got ",
              cos.sizes(), " and ", sin.sizes());
  check_same_device(cos, x, "rotary_cos", x_name);
  check_same_device(sin, x, "rotary_sin", x_name);
  check_last_dim_contiguous(cos, "rotary_cos");
  check_last_dim_contiguous(sin, "rotary_sin");
  const int64_t rotary_dim = 2 * cos.size(1);
  TORCH_CHECK(rotary_dim > 0 && rotary_dim % 16 == 0 && rotary_dim <= head_dim,
              "rotary_dim (2 * rotary_cos.size(1) = ", rotary_dim,
              ") must be a positive multiple of 16 and at most head_dim (", head_dim, ")");
  check_int_range(cos.size(0), 0, "rotary_cos.size(0)");
  RotaryParams r;
  r.cos = cos.data_ptr();
  r.sin = sin.data_ptr();
  r.cos_row_stride = cos.stride(0);
  r.sin_row_stride = sin.stride(0);
  r.rotary_dim = static_cast<int>(rotary_dim);
  r.max_positions = static_cast<int>(cos.size(0));
  r.interleaved = interleaved;
  r.table_dtype = to_dtype(ct);
  return r;
}

}  // namespace

AppendParams check_append_inputs(const OpArgs& a) {
  const at::Tensor &k_cache = a.tensor("k_cache"), &v_cache = a.tensor("v_cache");
  const at::Tensor &k = a.tensor("k"), &v = a.tensor("v"), &cache_seqlens = a.tensor("cache_seqlens");
  const auto cu_seqlens_k_new = a.opt_tensor("cu_seqlens_k_new"), page_table = a.opt_tensor("page_table");
  const auto cache_batch_idx = a.opt_tensor("cache_batch_idx"), cache_leftpad = a.opt_tensor("cache_leftpad");
  const auto rotary_cos = a.opt_tensor("rotary_cos"), rotary_sin = a.opt_tensor("rotary_sin");
  const auto rotary_seqlens = a.opt_tensor("rotary_seqlens");
  const bool rotary_interleaved = a.flag("rotary_interleaved", true);
  AppendParams p;
  const auto dt = k_cache.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat8_e4m3fn,
              "k_cache must be float32, float16, bfloat16 or float8_e4m3fn, got ", dt);
  TORCH_CHECK(v_cache.scalar_type() == dt && k.scalar_type() == dt && v.scalar_type() == dt,
              "k_cache, v_cache, k and v must share one dtype, got ", dt, ", ", v_cache.scalar_type(),
              ", ", k.scalar_type(), " and ", v.scalar_type());
  for (auto [t, name] : {std::pair{&v_cache, "v_cache"}, {&k, "k"}, {&v, "v"}})
    check_same_device(*t, k_cache, name, "k_cache");
  TORCH_CHECK(k_cache.dim() == 4, "k_cache must be (batch_size_cache, seqlen_cache, num_heads_k, head_dim) "
              "or paged (num_pages, page_size, num_heads_k, head_dim), got shape ", k_cache.sizes());
  TORCH_CHECK(v_cache.dim() == 4 && v_cache.sizes().slice(0, 3) == k_cache.sizes().slice(0, 3),
              "v_cache must match k_cache in every dimension but the last: k_cache ", k_cache.sizes(),
              ", v_cache ", v_cache.sizes());
  const bool packed = cu_seqlens_k_new.has_value();
  TORCH_CHECK(k.dim() == (packed ? 3 : 4), "k must be ",
              packed ? "(total_k_new, num_heads_k, head_dim) with cu_seqlens_k_new"
                     : "(batch_size, seqlen_new, num_heads_k, head_dim)",
              ", got shape ", k.sizes());
  TORCH_CHECK(v.dim() == k.dim() && v.sizes().slice(0, k.dim() - 1) == k.sizes().slice(0, k.dim() - 1),
              "v must match k in every dimension but the last: k ", k.sizes(), ", v ", v.sizes());
  const int64_t heads_k = k_cache.size(2), head_dim = k_cache.size(3), head_dim_v = v_cache.size(3);
  TORCH_CHECK(k.size(-2) == heads_k && k.size(-1) == head_dim, "k must have (num_heads_k, head_dim) = (",
              heads_k, ", ", head_dim, ") of k_cache in its last two dimensions, got ", k.sizes());
  TORCH_CHECK(v.size(-1) == head_dim_v, "v head_dim (", v.size(-1), ") must equal v_cache's (", head_dim_v, ")");
  for (auto [t, name] : {std::pair{&k_cache, "k_cache"}, {&v_cache, "v_cache"}, {&k, "k"}, {&v, "v"}})
    check_last_dim_contiguous(*t, name);

  // the batch comes from the new keys: k's first dimension, or cu_seqlens_k_new when packed
  if (packed)
    TORCH_CHECK(cu_seqlens_k_new->dim() == 1 && cu_seqlens_k_new->size(0) >= 1,
                "cu_seqlens_k_new must be 1-D (batch_size + 1,), got shape ", cu_seqlens_k_new->sizes());
  const int64_t batch = packed ? cu_seqlens_k_new->size(0) - 1 : k.size(0);
  check_int32_vector(cu_seqlens_k_new, "cu_seqlens_k_new", batch + 1, k_cache, "k_cache");
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == batch,
              "cache_seqlens must have shape (batch_size,) = (", batch, ",), got ", cache_seqlens.sizes());
  check_int32_vector(cache_seqlens, "cache_seqlens", batch, k_cache, "k_cache");
  check_int32_vector(cache_batch_idx, "cache_batch_idx", batch, k_cache, "k_cache");
  check_int32_vector(rotary_seqlens, "rotary_seqlens", batch, k_cache, "k_cache");
  check_int32_vector(cache_leftpad, "cache_leftpad", batch, k_cache, "k_cache");
  p.cache_leftpad = int_ptr(cache_leftpad);
  if (page_table) {
    const auto& pt = *page_table;
    TORCH_CHECK(pt.scalar_type() == at::kInt && pt.dim() == 2,
                "page_table must be a 2-D int32 tensor (batch_size, max_num_pages), got ", pt.scalar_type(),
                " ", pt.sizes());
    TORCH_CHECK(cache_batch_idx || pt.size(0) == batch, "page_table must have batch_size (", batch,
                ") rows, got ", pt.size(0));
    check_last_dim_contiguous(pt, "page_table");
    check_same_device(pt, k_cache, "page_table", "k_cache");
    p.page_table = pt.data_ptr<int32_t>();
    p.page_table_batch_stride = pt.stride(0);
    p.page_size = static_cast<int>(k_cache.size(1));
    p.max_pages = static_cast<int>(pt.size(1));
    p.cache_rows = static_cast<int>(pt.size(0));
    p.num_pages = static_cast<int>(k_cache.size(0));
    p.capacity = static_cast<int64_t>(p.page_size) * p.max_pages;
  } else {
    TORCH_CHECK(cache_batch_idx || k_cache.size(0) == batch, "k_cache must have batch_size (", batch,
                ") rows, got ", k_cache.size(0), " (pass cache_batch_idx to index a larger cache)");
    p.cache_rows = static_cast<int>(k_cache.size(0));
    p.capacity = k_cache.size(1);
  }

  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.kc_batch_stride = k_cache.stride(0);
  p.kc_row_stride = k_cache.stride(1);
  p.kc_head_stride = k_cache.stride(2);
  p.vc_batch_stride = v_cache.stride(0);
  p.vc_row_stride = v_cache.stride(1);
  p.vc_head_stride = v_cache.stride(2);
  p.k_batch_stride = packed ? 0 : k.stride(0);
  p.v_batch_stride = packed ? 0 : v.stride(0);
  p.k_row_stride = k.stride(-3);
  p.v_row_stride = v.stride(-3);
  p.k_head_stride = k.stride(-2);
  p.v_head_stride = v.stride(-2);
  p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  p.cu_seqlens_k_new = int_ptr(cu_seqlens_k_new);
  p.cache_batch_idx = int_ptr(cache_batch_idx);
  p.rotary_seqlens = int_ptr(rotary_seqlens);
  p.batch = static_cast<int>(batch);
  p.seqlen_new = packed ? 0 : static_cast<int>(k.size(1));
  p.total_new = packed ? k.size(0) : 0;
  p.heads_k = static_cast<int>(heads_k);
  p.head_dim = static_cast<int>(head_dim);
  p.head_dim_v = static_cast<int>(head_dim_v);
  p.dtype = to_dtype(dt);
  TORCH_CHECK(rotary_cos.has_value() == rotary_sin.has_value(),
              "rotary_cos and rotary_sin must be given together");
  if (rotary_cos) p.rotary = check_rotary_tables(*rotary_cos, *rotary_sin, k, "k", head_dim, rotary_interleaved);
  return p;
}

void check_append_index_values(const AppendParams& p) {
  if (p.cu_seqlens_k_new) {
    TORCH_CHECK(p.cu_seqlens_k_new[0] >= 0, "cu_seqlens_k_new[0] must be >= 0");
    for (int b = 0; b < p.batch; ++b)
      TORCH_CHECK(p.cu_seqlens_k_new[b + 1] >= p.cu_seqlens_k_new[b], "cu_seqlens_k_new must be non-decreasing");
    TORCH_CHECK(p.cu_seqlens_k_new[p.batch] <= p.total_new, "cu_seqlens_k_new[-1] = ", p.cu_seqlens_k_new[p.batch],
                " exceeds the ", p.total_new, " rows of k and v");
  }
  for (int b = 0; b < p.batch; ++b) {
    const int start = p.cache_seqlens[b], n = new_len(p, b);
    TORCH_CHECK(start >= 0, "cache_seqlens[", b, "] = ", start, " must be >= 0");
    // positions start + t must be int32; the attention after the append reads [0, start + n)
    TORCH_CHECK(static_cast<int64_t>(start) + n <= std::min<int64_t>(p.capacity, 1LL << 31), "appending ", n, " keys at cache_seqlens[", b,
                "] = ", start, " overflows the cache of ", p.capacity, " keys per sequence");
    if (p.cache_leftpad)
      TORCH_CHECK(p.cache_leftpad[b] >= 0 && p.cache_leftpad[b] <= static_cast<int64_t>(start) + n,
                  "cache_leftpad[", b, "] = ", p.cache_leftpad[b], " must be in [0, ", static_cast<int64_t>(start) + n,
                  "] (cache_seqlens + new keys)");
    const int row = p.cache_batch_idx ? p.cache_batch_idx[b] : b;
    TORCH_CHECK(row >= 0 && row < p.cache_rows, "cache_batch_idx[", b, "] = ", row, " is out of range [0, ",
                p.cache_rows, ")");
    if (p.page_size > 0 && start + n > 0) {
      // every page of the sequence after the append, not only the written ones: the attention
      // that follows reads them all, and a bad entry must fail before the cache is touched
      const int32_t* pages = p.page_table + row * p.page_table_batch_stride;
      for (int64_t i = 0; i <= (static_cast<int64_t>(start) + n - 1) / p.page_size; ++i)
        TORCH_CHECK(pages[i] >= 0 && pages[i] < p.num_pages, "page_table[", row, ", ", i, "] = ", pages[i],
                    " is out of range [0, ", p.num_pages, ")");
    }
    if (p.rotary.rotary_dim > 0 && n > 0) {
      const int off = p.rotary_seqlens ? p.rotary_seqlens[b] : start;
      TORCH_CHECK(off >= 0 && static_cast<int64_t>(off) + n <= p.rotary.max_positions,
                  "rotary_cos/rotary_sin have ", p.rotary.max_positions, " positions, but sequence ", b,
                  " rotates new keys at positions [", off, ", ", static_cast<int64_t>(off) + n, ")");
    }
  }
}

RotaryApplyParams check_rotary_inputs(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                                      const at::Tensor& seqlen_offsets,
                                      const std::optional<at::Tensor>& cu_seqlens, bool interleaved,
                                      bool positions_per_row, const RotaryNames& names) {
  RotaryApplyParams p;
  const auto dt = x.scalar_type();
  const char* xn = names.x;
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat8_e4m3fn, xn,
              " must be float32, float16, bfloat16 or float8_e4m3fn, got ", dt);
  const bool ragged = cu_seqlens.has_value();
  TORCH_CHECK(x.dim() == (ragged ? 3 : 4), xn, " must be ",
              ragged ? "(total, num_heads, head_dim) with " : "(batch_size, seqlen, num_heads, head_dim)",
              ragged ? names.cu_seqlens : "", ", got shape ", x.sizes());
  check_last_dim_contiguous(x, xn);
  TORCH_CHECK(!ragged || cu_seqlens->dim() == 1, names.cu_seqlens, " must be 1-D (batch_size + 1)");
  const int64_t batch = ragged ? cu_seqlens->size(0) - 1 : x.size(0);
  check_int32_vector(cu_seqlens, names.cu_seqlens, batch + 1, x, xn);
  check_int32_vector(seqlen_offsets, names.seqlen_offsets, batch, x, xn);
  p.rotary = check_rotary_tables(cos, sin, x, xn, x.size(-1), interleaved);
  p.x = x.data_ptr();
  p.x_batch_stride = ragged ? 0 : x.stride(0);
  p.x_row_stride = x.stride(-3);
  p.x_head_stride = x.stride(-2);
  p.seqlen_offsets = seqlen_offsets.data_ptr<int32_t>();
  p.cu_seqlens = int_ptr(cu_seqlens);
  p.batch = static_cast<int>(batch);
  p.seqlen = ragged ? 0 : static_cast<int>(x.size(1));
  p.total_rows = static_cast<int>(ragged ? x.size(0) : x.size(0) * x.size(1));
  p.max_rows = ragged ? p.total_rows : p.seqlen;  // callers with a max_seqlen hint lower it
  p.heads = static_cast<int>(x.size(-2));
  p.head_dim = static_cast<int>(x.size(-1));
  p.positions_per_row = positions_per_row;
  p.dtype = to_dtype(dt);
  return p;
}

void set_rotary_output(RotaryApplyParams& p, const at::Tensor& out) {
  p.out = out.data_ptr();
  p.o_batch_stride = p.cu_seqlens ? 0 : out.stride(0);
  p.o_row_stride = out.stride(-3);
  p.o_head_stride = out.stride(-2);
}

void check_rotary_index_values(const RotaryApplyParams& p) {
  for (int b = 0; b < p.batch; ++b) {
    const int len = p.cu_seqlens ? p.cu_seqlens[b + 1] - p.cu_seqlens[b] : p.seqlen;
    if (p.cu_seqlens)
      TORCH_CHECK(p.cu_seqlens[b] >= 0 && len >= 0 && p.cu_seqlens[b + 1] <= p.total_rows,
                  "cu_seqlens must be non-decreasing and within the ", p.total_rows, " rows of x");
    const int off = p.seqlen_offsets[b];
    TORCH_CHECK(off >= 0, "seqlen_offsets[", b, "] = ", off, " must be >= 0 (a rotary position)");
    const int64_t last = len == 0 ? off : (p.positions_per_row ? static_cast<int64_t>(off) + len - 1 : off);
    TORCH_CHECK(off >= 0 && (len == 0 || last < p.rotary.max_positions), "rotary_cos/rotary_sin have ",
                p.rotary.max_positions, " positions, but sequence ", b, " needs position ", last);
  }
}

}  // namespace mate
