// Portable build of the row dequantizers, plus the run-time choice among the builds.
#define DEHM_DEQUANT_NS generic
#include "dequant_impl.h"

namespace dehm {

const DequantKernels& SelectDequantKernels() {
#ifdef DEHM_HAVE_AVX2_DEQUANT
  static const bool f16c = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  if (f16c) return avx2::kDequantKernels;
#endif
  return generic::kDequantKernels;
}

}  // namespace dehm
