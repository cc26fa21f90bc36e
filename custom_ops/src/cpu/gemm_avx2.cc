// AVX2+FMA build of the small products (compiled with -mavx2 -mfma on x86-64 only;
// SelectGemmKernels uses it only when the CPU reports both features).
#define DEHM_GEMM_NS avx2
#include "gemm_impl.h"
