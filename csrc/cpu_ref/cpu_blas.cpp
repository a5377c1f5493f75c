#include "cpu_blas.h"

#include <ATen/Parallel.h>  // at::get_num_threads: a symbol of libtorch_cpu
#include <dlfcn.h>

#include <cstdlib>
#include <cstring>

namespace mate::cpu {
namespace {

// Fortran BLAS (column-major) and MKL's mixed-precision CBLAS entry points.
using SgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*,
                         const float*, const float*, const int*, const float*, const int*,
                         const float*, float*, const int*);
using Gemm16Fn = void (*)(int layout, int transa, int transb, int m, int n, int k, float alpha,
                          const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                          float* c, int ldc);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

struct Blas {
  SgemmFn sgemm = nullptr;
  Gemm16Fn gemm_bf16 = nullptr;
  Gemm16Fn gemm_f16 = nullptr;

  Blas() {
    const char* env = std::getenv("MATE_OPS_CPU_BLAS");
    if (env && std::strcmp(env, "0") == 0) return;
    // torch's own BLAS lives in libtorch_cpu; find that library through a symbol we link to.
    void* handle = nullptr;
    Dl_info info;
    if (dladdr(reinterpret_cast<void*>(&at::get_num_threads), &info) && info.dli_fname)
      handle = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    auto find = [&](const char* name) -> void* {
      void* f = handle ? dlsym(handle, name) : nullptr;
      return f ? f : dlsym(RTLD_DEFAULT, name);
    };
    sgemm = reinterpret_cast<SgemmFn>(find("sgemm_"));
    gemm_bf16 = reinterpret_cast<Gemm16Fn>(find("cblas_gemm_bf16bf16f32"));
    gemm_f16 = reinterpret_cast<Gemm16Fn>(find("cblas_gemm_f16f16f32"));
  }
};

const Blas& blas() {
  static const Blas b;
  return b;
}

template <typename T>
void portable_nt(int m, int n, int k, const T* A, int64_t lda, const T* B, int64_t ldb,
                 float beta, float* C, int64_t ldc) {
  for (int i = 0; i < m; ++i) {
    const T* a = A + i * lda;
    for (int j = 0; j < n; ++j) {
      const T* b = B + j * ldb;
      float acc = 0.f;
      for (int x = 0; x < k; ++x) acc += static_cast<float>(a[x]) * static_cast<float>(b[x]);
      float& c = C[i * ldc + j];
      c = beta == 0.f ? acc : beta * c + acc;
    }
  }
}

template <typename T>
void portable_nn(int m, int n, int k, const T* A, int64_t lda, const T* B, int64_t ldb,
                 float beta, float* C, int64_t ldc) {
  for (int i = 0; i < m; ++i) {
    float* c = C + i * ldc;
    if (beta == 0.f) {
      for (int j = 0; j < n; ++j) c[j] = 0.f;
    } else if (beta != 1.f) {
      for (int j = 0; j < n; ++j) c[j] *= beta;
    }
    for (int x = 0; x < k; ++x) {
      const float a = static_cast<float>(A[i * lda + x]);
      const T* b = B + x * ldb;
      for (int j = 0; j < n; ++j) c[j] += a * static_cast<float>(b[j]);
    }
  }
}

template <typename T>
void portable_tn(int m, int n, int k, const T* A, int64_t lda, const T* B, int64_t ldb,
                 float beta, float* C, int64_t ldc) {
  for (int i = 0; i < m; ++i) {
    float* c = C + i * ldc;
    if (beta == 0.f) {
      for (int j = 0; j < n; ++j) c[j] = 0.f;
    } else if (beta != 1.f) {
      for (int j = 0; j < n; ++j) c[j] *= beta;
    }
  }
  for (int x = 0; x < k; ++x) {
    const T* a = A + x * lda;
    const T* b = B + x * ldb;
    for (int i = 0; i < m; ++i) {
      const float ai = static_cast<float>(a[i]);
      float* c = C + i * ldc;
      for (int j = 0; j < n; ++j) c[j] += ai * static_cast<float>(b[j]);
    }
  }
}

// BLAS needs int leading dimensions at least as wide as the rows (a stride-0 / overlapping
// view would be rejected by MKL, leaving C unwritten): else the portable loops run.
bool blas_ok(int64_t lda, int64_t min_a, int64_t ldb, int64_t min_b, int64_t ldc, int64_t min_c) {
  return lda < (1LL << 31) && ldb < (1LL << 31) && ldc < (1LL << 31) && lda >= min_a && ldb >= min_b && ldc >= min_c;
}

template <typename T>
void gemm16(Gemm16Fn fn, bool nt, int m, int n, int k, const T* A, int64_t lda, const T* B,
            int64_t ldb, float beta, float* C, int64_t ldc, bool ta = false) {
  if (fn && m > 0 && n > 0 && k > 0 && blas_ok(lda, ta ? m : k, ldb, nt ? k : n, ldc, n)) {
    fn(kRowMajor, ta ? kTrans : kNoTrans, nt ? kTrans : kNoTrans, m, n, k, 1.f,
       reinterpret_cast<const uint16_t*>(A), static_cast<int>(lda),
       reinterpret_cast<const uint16_t*>(B), static_cast<int>(ldb), beta, C, static_cast<int>(ldc));
  } else if (ta) {
    portable_tn(m, n, k, A, lda, B, ldb, beta, C, ldc);
  } else if (nt) {
    portable_nt(m, n, k, A, lda, B, ldb, beta, C, ldc);
  } else {
    portable_nn(m, n, k, A, lda, B, ldb, beta, C, ldc);
  }
}

}  // namespace

void gemm_nt(int m, int n, int k, const float* A, int64_t lda, const float* B, int64_t ldb,
             float beta, float* C, int64_t ldc) {
  const auto f = blas().sgemm;
  if (f && m > 0 && n > 0 && k > 0 && blas_ok(lda, k, ldb, k, ldc, n)) {
    // row-major C = A B^T is column-major C^T = B A^T... with B stored (n, k) row-major.
    const int ia = static_cast<int>(lda), ib = static_cast<int>(ldb), ic = static_cast<int>(ldc);
    const float one = 1.f;
    f("T", "N", &n, &m, &k, &one, B, &ib, A, &ia, &beta, C, &ic);
  } else {
    portable_nt(m, n, k, A, lda, B, ldb, beta, C, ldc);
  }
}

void gemm_nn(int m, int n, int k, const float* A, int64_t lda, const float* B, int64_t ldb,
             float beta, float* C, int64_t ldc) {
  const auto f = blas().sgemm;
  if (f && m > 0 && n > 0 && k > 0 && blas_ok(lda, k, ldb, n, ldc, n)) {
    const int ia = static_cast<int>(lda), ib = static_cast<int>(ldb), ic = static_cast<int>(ldc);
    const float one = 1.f;
    f("N", "N", &n, &m, &k, &one, B, &ib, A, &ia, &beta, C, &ic);
  } else {
    portable_nn(m, n, k, A, lda, B, ldb, beta, C, ldc);
  }
}

void gemm_nt(int m, int n, int k, const c10::BFloat16* A, int64_t lda, const c10::BFloat16* B,
             int64_t ldb, float beta, float* C, int64_t ldc) {
  gemm16(blas().gemm_bf16, true, m, n, k, A, lda, B, ldb, beta, C, ldc);
}
void gemm_nt(int m, int n, int k, const c10::Half* A, int64_t lda, const c10::Half* B,
             int64_t ldb, float beta, float* C, int64_t ldc) {
  gemm16(blas().gemm_f16, true, m, n, k, A, lda, B, ldb, beta, C, ldc);
}
void gemm_nn(int m, int n, int k, const c10::BFloat16* A, int64_t lda, const c10::BFloat16* B,
             int64_t ldb, float beta, float* C, int64_t ldc) {
  gemm16(blas().gemm_bf16, false, m, n, k, A, lda, B, ldb, beta, C, ldc);
}
void gemm_nn(int m, int n, int k, const c10::Half* A, int64_t lda, const c10::Half* B,
             int64_t ldb, float beta, float* C, int64_t ldc) {
  gemm16(blas().gemm_f16, false, m, n, k, A, lda, B, ldb, beta, C, ldc);
}

void gemm_tn(int m, int n, int k, const float* A, int64_t lda, const float* B, int64_t ldb,
             float beta, float* C, int64_t ldc) {
  const auto f = blas().sgemm;
  if (f && m > 0 && n > 0 && k > 0 && blas_ok(lda, m, ldb, n, ldc, n)) {
    // column-major C^T (n, m) = B^T (n, k) * A (k, m): B as stored, A transposed.
    const int ia = static_cast<int>(lda), ib = static_cast<int>(ldb), ic = static_cast<int>(ldc);
    const float one = 1.f;
    f("N", "T", &n, &m, &k, &one, B, &ib, A, &ia, &beta, C, &ic);
  } else {
    portable_tn(m, n, k, A, lda, B, ldb, beta, C, ldc);
  }
}
void gemm_tn(int m, int n, int k, const c10::BFloat16* A, int64_t lda, const c10::BFloat16* B,
             int64_t ldb, float beta, float* C, int64_t ldc) {
  gemm16(blas().gemm_bf16, false, m, n, k, A, lda, B, ldb, beta, C, ldc, true);
}
void gemm_tn(int m, int n, int k, const c10::Half* A, int64_t lda, const c10::Half* B,
             int64_t ldb, float beta, float* C, int64_t ldc) {
  gemm16(blas().gemm_f16, false, m, n, k, A, lda, B, ldb, beta, C, ldc, true);
}

const char* blas_backend() { return blas().sgemm ? "blas" : "portable"; }

}  // namespace mate::cpu
