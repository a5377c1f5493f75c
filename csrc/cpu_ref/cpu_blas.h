// Small row-major GEMMs with fp32 accumulation for the CPU reference kernels.
// They call the BLAS that torch itself ships (MKL's sgemm_ / cblas_gemm_bf16bf16f32 /
// cblas_gemm_f16f16f32, looked up at run time) and fall back to portable loops
// when those symbols are absent (other BLAS builds) or MATE_OPS_CPU_BLAS=0. Called
// inside our OpenMP parallel region, the BLAS runs single-threaded on each thread.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace mate::cpu {

// C[m, n] = beta * C + A[m, k] * B[n, k]^T
void gemm_nt(int m, int n, int k, const float* A, int64_t lda, const float* B, int64_t ldb,
             float beta, float* C, int64_t ldc);
void gemm_nt(int m, int n, int k, const c10::BFloat16* A, int64_t lda, const c10::BFloat16* B,
             int64_t ldb, float beta, float* C, int64_t ldc);
void gemm_nt(int m, int n, int k, const c10::Half* A, int64_t lda, const c10::Half* B,
             int64_t ldb, float beta, float* C, int64_t ldc);

// C[m, n] = beta * C + A[m, k] * B[k, n]
void gemm_nn(int m, int n, int k, const float* A, int64_t lda, const float* B, int64_t ldb,
             float beta, float* C, int64_t ldc);
void gemm_nn(int m, int n, int k, const c10::BFloat16* A, int64_t lda, const c10::BFloat16* B,
             int64_t ldb, float beta, float* C, int64_t ldc);
void gemm_nn(int m, int n, int k, const c10::Half* A, int64_t lda, const c10::Half* B,
             int64_t ldb, float beta, float* C, int64_t ldc);

// C[m, n] = beta * C + A[k, m]^T * B[k, n] (the backward's P^T dO and dS^T Q)
void gemm_tn(int m, int n, int k, const float* A, int64_t lda, const float* B, int64_t ldb,
             float beta, float* C, int64_t ldc);
void gemm_tn(int m, int n, int k, const c10::BFloat16* A, int64_t lda, const c10::BFloat16* B,
             int64_t ldb, float beta, float* C, int64_t ldc);
void gemm_tn(int m, int n, int k, const c10::Half* A, int64_t lda, const c10::Half* B,
             int64_t ldb, float beta, float* C, int64_t ldc);

// Which implementation runs: "blas" (torch's BLAS) or "portable" (for docs, tests and benchmarks).
const char* blas_backend();

}  // namespace mate::cpu
