// AVX2+F16C build of the row dequantizers (compiled with -mavx2 -mf16c on x86-64 only;
// SelectDequantKernels uses it only when the CPU reports both features).
#define DEHM_DEQUANT_NS avx2
#include "dequant_impl.h"
