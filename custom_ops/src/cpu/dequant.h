// Row dequantizers of the layout-v2 CPU kernel (hmatmul_cpu_v2.cc), with a portable build and
// (on x86-64 with GCC/Clang) an AVX2+F16C build of the same source, chosen at run time.
// Every function writes exactly the float value pack.unpack gives for each stored entry.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace dehm {

struct DequantKernels {
  // out[r * w + j] = the IEEE half at in + 2 (r * ld + j) (little-endian, any alignment),
  // widened; r < rows, j < w.
  void (*half_rows)(const uint8_t* in, int64_t ld, int64_t rows, int64_t w, float* out);
  // out[r * w + j] = int8 q[r * ld + j] times s[j] (one row of scales for all rows); with
  // round_half, rounded once to the nearest float16.
  void (*int8_rows)(const uint8_t* q, int64_t ld, int64_t rows, int64_t w, const float* s, bool round_half,
                    float* out);
  // out[r * w + j] = int4 value first + r * ld + j of the nibbles at p (value i in the low
  // nibble of p[i / 2] when i is even, the high nibble when odd) times s[j]; round_half as above.
  void (*int4_rows)(const uint8_t* p, int64_t first, int64_t ld, int64_t rows, int64_t w, const float* s,
                    bool round_half, float* out);
};

// The best variant this CPU supports (decided once).
const DequantKernels& SelectDequantKernels();

// The float16 value nearest to f (ties to even), as a float. Used for values exact in float
// (an int8/int4 times a float16 scale has at most 7 + 11 significant bits), so the result is
// the one rounding DequantizeLinear makes in float16.
inline float RoundToHalf(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const uint32_t mag = bits & 0x7fffffffu;
  if (mag >= 0x477ff000u) {  // |f| >= 65520 rounds to infinity (or is Inf/NaN already)
    if (mag > 0x7f800000u) return f;
    bits = (bits & 0x80000000u) | 0x7f800000u;
  } else if (mag < 0x38800000u) {  // below 2^-14: a float16 subnormal, a multiple of 2^-24
    return std::nearbyint(f * 16777216.0f) * (1.0f / 16777216.0f);
  } else {  // keep 10 mantissa bits, rounding the 13 dropped ones to nearest even
    bits += 0x0fffu + ((bits >> 13) & 1u);
    bits &= ~0x1fffu;
  }
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

namespace generic {
extern const DequantKernels kDequantKernels;
}
#ifdef DEHM_HAVE_AVX2_DEQUANT
namespace avx2 {
extern const DequantKernels kDequantKernels;
}
#endif

}  // namespace dehm
