// Small dense products used by the CPU kernel, with a portable build and (on x86-64 with
// GCC/Clang) an AVX2+FMA build of the same source, chosen at run time.
#pragma once

#include <cstdint>
#include <cstring>

namespace dehm {

// One product term of an output segment: rows of a (a[r * lda + i * ainc]) times the
// depth x width matrix b (b[i * ldb + j], float or IEEE half bits per GemmKernels entry).
struct Term {
  const float* a;
  int64_t lda;
  int64_t ainc;
  int64_t depth;
  const void* b;
  int64_t ldb;
};

// gemm:    y[r, 0:w] += sum_i a[r * lda + i * ainc] * b[i * ldb + j] for r < rows, j < w.
// segment: y[r, 0:w] (= or +=) sum over terms of a_t[r, :] @ b_t[:, 0:w], each output entry
//          loaded and stored once however many terms there are.
// b holds float or IEEE half bits (uint16_t), widened to float on load.
struct GemmKernels {
  void (*f32)(const float* a, int64_t lda, int64_t ainc, int64_t rows, int64_t depth, const float* b, int64_t ldb, float* y,
              int64_t ldy, int64_t w);
  void (*f16)(const float* a, int64_t lda, int64_t ainc, int64_t rows, int64_t depth, const uint16_t* b, int64_t ldb, float* y,
              int64_t ldy, int64_t w);
  void (*segment_f32)(const Term* terms, int64_t num_terms, int64_t rows, float* y, int64_t ldy, int64_t w,
                      bool accumulate);
  void (*segment_f16)(const Term* terms, int64_t num_terms, int64_t rows, float* y, int64_t ldy, int64_t w,
                      bool accumulate);
};

// The best variant this CPU supports (decided once).
const GemmKernels& SelectGemmKernels();

// IEEE half (bits) to float, exact for every value, without hardware support.
inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  uint32_t bits;
  float f;
  if (em >= 0x7c00u) {  // Inf / NaN
    bits = sign | 0x7f800000u | (static_cast<uint32_t>(em & 0x3ffu) << 13);
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  bits = em << 13;  // normals and subnormals: rebias the exponent by multiplying by 2^112
  std::memcpy(&f, &bits, sizeof f);
  f *= 5.192296858534828e+33f;
  std::memcpy(&bits, &f, sizeof f);
  bits |= sign;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

namespace generic {
extern const GemmKernels kGemmKernels;
}
#ifdef DEHM_HAVE_AVX2_GEMM
namespace avx2 {
extern const GemmKernels kGemmKernels;
}
#endif

}  // namespace dehm
