// MATE_HD marks functions that run on the host and inside device kernels.
#pragma once

#if defined(__CUDACC__) || defined(__MUSACC__)
#define MATE_HD __host__ __device__ __forceinline__
#else
#define MATE_HD inline
#endif
