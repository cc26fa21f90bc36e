// Checks the row dequantizers of one build (dequant_impl.h) bit for bit against plain loops
// and the compiler's float16 conversions (_Float16: GCC >= 12 or Clang on x86-64 and aarch64).
// Built and run by tests/ops/test_dequant_rows.py, once per build the machine can run:
//   c++ -std=c++17 -O2 -I custom_ops/src/cpu -DDEHM_DEQUANT_NS=generic dequant_rows_test.cc
// Exit code 0 and "mismatches: 0" when every value agrees.
#include "dequant_impl.h"

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

float ViaHalf(float v) { return static_cast<float>(static_cast<_Float16>(v)); }

bool Same(float a, float b) { return a == b || (std::isnan(a) && std::isnan(b)); }

long CheckHalves() {
  long bad = 0;
  std::mt19937 rng(1);
  std::uniform_int_distribution<int> q(-127, 127);
  for (uint32_t h = 0; h < 65536; ++h) {
    _Float16 f;
    std::memcpy(&f, &h, 2);
    const float ref = static_cast<float>(f), got = dehm::HalfToFloat(static_cast<uint16_t>(h));
    bad += !Same(ref, got);
    if (std::isnan(ref) || ref == 0) continue;
    for (int k = 0; k < 4; ++k) {  // int8 x float16 scale: exact in float, then one rounding
      const float product = static_cast<float>(q(rng)) * got;
      bad += !Same(dehm::RoundToHalf(product), ViaHalf(product));
    }
  }
  return bad;
}

long CheckRows(const dehm::DequantKernels& dq) {
  long bad = 0;
  std::mt19937 rng(2);
  std::uniform_int_distribution<int> byte(0, 255);
  for (int trial = 0; trial < 2000; ++trial) {
    const int rows = 1 + trial % 7, w = 1 + (trial * 7) % 70, ld = w + (trial % 3 == 0 ? 0 : trial % 5);
    const int first = trial % 2;
    const bool round_half = trial % 2;
    std::vector<uint8_t> q(static_cast<size_t>(2 * rows * ld + 16));  // room for float16 rows too
    for (auto& b : q) b = static_cast<uint8_t>(byte(rng) == 0x80 ? 0 : byte(rng));
    std::vector<float> s(static_cast<size_t>(w)), got(static_cast<size_t>(rows * w));
    for (auto& v : s) v = std::ldexp(1.0f + byte(rng) / 256.0f, -(byte(rng) % 30));
    dq.int8_rows(q.data(), ld, rows, w, s.data(), round_half, got.data());
    for (int r = 0; r < rows; ++r)
      for (int j = 0; j < w; ++j) {
        const float v = static_cast<float>(static_cast<int8_t>(q[r * ld + j])) * s[j];
        bad += !Same(got[r * w + j], round_half ? ViaHalf(v) : v);
      }
    dq.int4_rows(q.data(), first, ld, rows, w, s.data(), round_half, got.data());
    for (int r = 0; r < rows; ++r)
      for (int j = 0; j < w; ++j) {
        const long i = first + r * ld + j;
        int nibble = (i & 1) ? q[i / 2] >> 4 : q[i / 2] & 15;
        nibble = nibble >= 8 ? nibble - 16 : nibble;
        const float v = static_cast<float>(nibble) * s[j];
        bad += !Same(got[r * w + j], round_half ? ViaHalf(v) : v);
      }
    dq.half_rows(q.data(), ld, rows, w, got.data());
    for (int r = 0; r < rows; ++r)
      for (int j = 0; j < w; ++j) {
        uint16_t h;
        std::memcpy(&h, q.data() + 2 * (r * ld + j), 2);
        bad += !Same(got[r * w + j], dehm::HalfToFloat(h));
      }
  }
  return bad;
}

}  // namespace

int main() {
  const long bad = CheckHalves() + CheckRows(dehm::DEHM_DEQUANT_NS::kDequantKernels);
  std::printf("mismatches: %ld\n", bad);
  return bad != 0;
}
