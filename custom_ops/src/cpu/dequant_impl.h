// Implementation of DequantKernels (dequant.h), compiled once per instruction set with
// DEHM_DEQUANT_NS naming the namespace. Plain loops the compiler vectorizes, plus F16C
// conversions where the build has them.
#include <algorithm>
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

void HalfRun(const uint8_t* in, int64_t count, float* out) {
  int64_t j = 0;
#ifdef DEHM_DEQUANT_F16C
  for (; j + 8 <= count; j += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 2 * j));
    _mm256_storeu_ps(out + j, _mm256_cvtph_ps(h));
  }
#endif
  for (; j < count; ++j) {
    uint16_t h;
    std::memcpy(&h, in + 2 * j, sizeof h);
    out[j] = HalfToFloat(h);
  }
}

void HalfRows(const uint8_t* in, int64_t ld, int64_t rows, int64_t w, float* out) {
  if (ld == w) return HalfRun(in, rows * w, out);  // whole rows: one contiguous run
  for (int64_t r = 0; r < rows; ++r) HalfRun(in + 2 * r * ld, w, out + r * w);
}

// out[j] = RoundToHalf(out[j]) for j < count.
void RoundRunToHalf(int64_t count, float* out) {
  int64_t j = 0;
#ifdef DEHM_DEQUANT_F16C
  for (; j + 8 <= count; j += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(out + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_ps(out + j, _mm256_cvtph_ps(h));
  }
#endif
  for (; j < count; ++j) out[j] = RoundToHalf(out[j]);
}

// Rows of a narrow array are one contiguous run: the scales are tiled to a period that is a
// multiple of w and at least kTile - w long, so the run is scaled in fixed-length vector loops.
constexpr int64_t kTile = 64;

// out[e] *= s[e % w] for e < count (w < kTile).
void ScaleRun(int64_t count, int64_t w, const float* s, float* out) {
  if (w == 1) {
    const float s0 = s[0];
    for (int64_t e = 0; e < count; ++e) out[e] *= s0;
    return;
  }
  const int64_t period = w * (kTile / w);
  float tiled[kTile];
  const int64_t fill = std::min(period, count);
  for (int64_t t = 0, j = 0; t < fill; ++t) {
    tiled[t] = s[j];
    j = j + 1 == w ? 0 : j + 1;
  }
  int64_t e = 0;
  for (; e + period <= count; e += period)
    for (int64_t t = 0; t < period; ++t) out[e + t] *= tiled[t];
  for (int64_t t = 0; e + t < count; ++t) out[e + t] *= tiled[t];
}

void Int8Rows(const uint8_t* q, int64_t ld, int64_t rows, int64_t w, const float* s, bool round_half, float* out) {
  if (ld == w && w < kTile) {
    const int8_t* qs = reinterpret_cast<const int8_t*>(q);
    const int64_t count = rows * w;
    for (int64_t e = 0; e < count; ++e) out[e] = static_cast<float>(qs[e]);
    ScaleRun(count, w, s, out);
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      const int8_t* qr = reinterpret_cast<const int8_t*>(q + r * ld);
      float* o = out + r * w;
      for (int64_t j = 0; j < w; ++j) o[j] = static_cast<float>(qr[j]) * s[j];
    }
  }
  if (round_half) RoundRunToHalf(rows * w, out);
}

inline float Nibble(int v) { return static_cast<float>((v ^ 8) - 8); }

// out[j] = int4 value first + j (unscaled), j < count.
void Int4Run(const uint8_t* p, int64_t first, int64_t count, float* out) {
  int64_t j = 0;
  if ((first & 1) && count > 0) {  // a leading high nibble
    out[0] = Nibble(p[first / 2] >> 4);
    j = 1;
  }
  const uint8_t* bytes = p + (first + j) / 2;
  const int64_t pairs = (count - j) / 2;
  for (int64_t k = 0; k < pairs; ++k) {
    const int b = bytes[k];
    out[j + 2 * k] = Nibble(b & 15);
    out[j + 2 * k + 1] = Nibble(b >> 4);
  }
  j += 2 * pairs;
  if (j < count) out[j] = Nibble(bytes[pairs] & 15);
}

void Int4Rows(const uint8_t* p, int64_t first, int64_t ld, int64_t rows, int64_t w, const float* s, bool round_half,
              float* out) {
  if (ld == w && w < kTile) {
    Int4Run(p, first, rows * w, out);
    ScaleRun(rows * w, w, s, out);
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      float* o = out + r * w;
      Int4Run(p, first + r * ld, w, o);
      for (int64_t j = 0; j < w; ++j) o[j] *= s[j];
    }
  }
  if (round_half) RoundRunToHalf(rows * w, out);
}

}  // namespace

const DequantKernels kDequantKernels = {HalfRows, Int8Rows, Int4Rows};

}  // namespace DEHM_DEQUANT_NS
}  // namespace dehm
