// Portable build of the small products, plus the run-time choice among the builds.
#define DEHM_GEMM_NS generic
#include "gemm_impl.h"

namespace dehm {

const GemmKernels& SelectGemmKernels() {
#ifdef DEHM_HAVE_AVX2_GEMM
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) return avx2::kGemmKernels;
#endif
  return generic::kGemmKernels;
}

}  // namespace dehm
