// Implementation of DequantKernels (dequant.h), compiled once per instruction set with
// DEHM_DEQUANT_NS naming the namespace. Plain loops the compiler vectorizes, plus F16C
// conversions where the build has them.
#include <cstring>

#if defined(__F16C__) && defined(__AVX2__)
#include <immintrin.h>
#define DEHM_DEQUANT_F16C 1
#endif

#include "dequant.h"
#include "gemm.h"

#ifndef DEHM_DEQUANT_NS
#error "define DEHM_DEQUANT_NS before including dequant_impl.h"
#endif

namespace dehm {
namespace DEHM_DEQUANT_NS {
namespace {

void HalfRow(const uint8_t* in, int64_t w, float* out) {
  int64_t j = 0;
#ifdef DEHM_DEQUANT_F16C
  for (; j + 8 <= w; j += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 2 * j));
    _mm256_storeu_ps(out + j, _mm256_cvtph_ps(h));
  }
#endif
  for (; j < w; ++j) {
    uint16_t h;
    std::memcpy(&h, in + 2 * j, sizeof h);
    out[j] = HalfToFloat(h);
  }
}

// out[j] = RoundToHalf(out[j]) for j < w.
void RoundRowToHalf(int64_t w, float* out) {
  int64_t j = 0;
#ifdef DEHM_DEQUANT_F16C
  for (; j + 8 <= w; j += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(out + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_ps(out + j, _mm256_cvtph_ps(h));
  }
#endif
  for (; j < w; ++j) out[j] = RoundToHalf(out[j]);
}

void Int8Row(const uint8_t* q, const float* s, int64_t w, bool round_half, float* out) {
  for (int64_t j = 0; j < w; ++j) out[j] = static_cast<float>(static_cast<int8_t>(q[j])) * s[j];
  if (round_half) RoundRowToHalf(w, out);
}

inline float Nibble(int v) { return static_cast<float>((v ^ 8) - 8); }

void Int4Row(const uint8_t* p, int64_t first, const float* s, int64_t w, bool round_half, float* out) {
  int64_t j = 0;
  if (first & 1) {  // a leading high nibble
    if (w > 0) out[0] = Nibble(p[first / 2] >> 4) * s[0];
    j = 1;
  }
  const uint8_t* bytes = p + (first + j) / 2;
  const int64_t pairs = (w - j) / 2;
  for (int64_t k = 0; k < pairs; ++k) {
    const int b = bytes[k];
    out[j + 2 * k] = Nibble(b & 15) * s[j + 2 * k];
    out[j + 2 * k + 1] = Nibble(b >> 4) * s[j + 2 * k + 1];
  }
  j += 2 * pairs;
  if (j < w) out[j] = Nibble(bytes[pairs] & 15) * s[j];
  if (round_half) RoundRowToHalf(w, out);
}

}  // namespace

const DequantKernels kDequantKernels = {HalfRow, Int8Row, Int4Row};

}  // namespace DEHM_DEQUANT_NS
}  // namespace dehm
