// Implementation of GemmKernels (gemm.h), compiled once per instruction set with
// DEHM_GEMM_NS naming the namespace. Plain C++: the compiler vectorizes the fixed-size
// register tiles (RB rows x CB columns kept in accumulators across the whole depth).
#include <cstring>

#include "gemm.h"

#ifndef DEHM_GEMM_NS
#error "define DEHM_GEMM_NS before including gemm_impl.h"
#endif

namespace dehm {
namespace DEHM_GEMM_NS {
namespace {

inline float Load(const float* p, int64_t i) { return p[i]; }
inline float Load(const uint16_t* p, int64_t i) { return HalfToFloat(p[i]); }

constexpr int kRowBlock = 4;
constexpr int kColBlock = 16;

template <int RB, int CB, typename W>
inline void Tile(const float* a, int64_t lda, int64_t ainc, int64_t depth, const W* b, int64_t ldb, float* y, int64_t ldy) {
  float acc[RB][CB];
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < CB; ++c) acc[r][c] = y[r * ldy + c];
  for (int64_t i = 0; i < depth; ++i) {
    float bv[CB];
    const W* bi = b + i * ldb;
    for (int c = 0; c < CB; ++c) bv[c] = Load(bi, c);
    for (int r = 0; r < RB; ++r) {
      const float s = a[r * lda + i * ainc];
      for (int c = 0; c < CB; ++c) acc[r][c] += s * bv[c];
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < CB; ++c) y[r * ldy + c] = acc[r][c];
}

// A single row with a narrow panel (e.g. X_b U_b at batch 1, CB = rank): four independent
// accumulator sets over the depth hide the add latency that one set would serialize on.
template <int CB, typename W>
inline void TileRow(const float* a, int64_t ainc, int64_t depth, const W* b, int64_t ldb, float* y) {
  float acc[4][CB] = {};
  int64_t i = 0;
  for (; i + 4 <= depth; i += 4) {
    for (int u = 0; u < 4; ++u) {
      const float s = a[(i + u) * ainc];
      const W* bi = b + (i + u) * ldb;
      for (int c = 0; c < CB; ++c) acc[u][c] += s * Load(bi, c);
    }
  }
  for (; i < depth; ++i) {
    const float s = a[i * ainc];
    const W* bi = b + i * ldb;
    for (int c = 0; c < CB; ++c) acc[0][c] += s * Load(bi, c);
  }
  for (int c = 0; c < CB; ++c) y[c] += (acc[0][c] + acc[1][c]) + (acc[2][c] + acc[3][c]);
}

#if defined(__GNUC__) || defined(__clang__)
// GCC/Clang vector extension (portable: lowered to SSE/AVX, NEON or scalar code as the
// target allows). Keeps RB x 16 accumulators in vector registers across the depth.
typedef float Vec8 __attribute__((vector_size(32)));

inline Vec8 LoadVec(const float* p) {
  Vec8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void StoreVec(float* p, Vec8 v) { std::memcpy(p, &v, sizeof v); }

template <int RB>
inline void Tile16(const float* a, int64_t lda, int64_t ainc, int64_t depth, const float* b, int64_t ldb, float* y,
                   int64_t ldy) {
  Vec8 acc[RB][2];
  for (int r = 0; r < RB; ++r) {
    acc[r][0] = LoadVec(y + r * ldy);
    acc[r][1] = LoadVec(y + r * ldy + 8);
  }
  for (int64_t i = 0; i < depth; ++i) {
    const Vec8 b0 = LoadVec(b + i * ldb), b1 = LoadVec(b + i * ldb + 8);
    for (int r = 0; r < RB; ++r) {
      const float s = a[r * lda + i * ainc];
      acc[r][0] += s * b0;
      acc[r][1] += s * b1;
    }
  }
  for (int r = 0; r < RB; ++r) {
    StoreVec(y + r * ldy, acc[r][0]);
    StoreVec(y + r * ldy + 8, acc[r][1]);
  }
}

template <>
inline void Tile<4, 16, float>(const float* a, int64_t lda, int64_t ainc, int64_t depth, const float* b, int64_t ldb,
                               float* y, int64_t ldy) {
  Tile16<4>(a, lda, ainc, depth, b, ldb, y, ldy);
}
template <>
inline void Tile<1, 16, float>(const float* a, int64_t lda, int64_t ainc, int64_t depth, const float* b, int64_t ldb,
                               float* y, int64_t ldy) {
  Tile16<1>(a, lda, ainc, depth, b, ldb, y, ldy);
}
#endif

// One column panel of width CB over all rows.
template <int CB, typename W>
void Panel(const float* a, int64_t lda, int64_t ainc, int64_t rows, int64_t depth, const W* b, int64_t ldb, float* y, int64_t ldy) {
  int64_t r = 0;
  for (; r + kRowBlock <= rows; r += kRowBlock) Tile<kRowBlock, CB>(a + r * lda, lda, ainc, depth, b, ldb, y + r * ldy, ldy);
  for (; r < rows; ++r) {
    if (CB < 16) {
      TileRow<CB>(a + r * lda, ainc, depth, b, ldb, y + r * ldy);
    } else {
      Tile<1, CB>(a + r * lda, lda, ainc, depth, b, ldb, y + r * ldy, ldy);
    }
  }
}

template <typename W>
void PanelN(int64_t width, const float* a, int64_t lda, int64_t ainc, int64_t rows, int64_t depth, const W* b, int64_t ldb, float* y,
            int64_t ldy) {
  switch (width) {
#define DEHM_PANEL_CASE(N) \
  case N:                  \
    return Panel<N>(a, lda, ainc, rows, depth, b, ldb, y, ldy);
    DEHM_PANEL_CASE(1)
    DEHM_PANEL_CASE(2)
    DEHM_PANEL_CASE(3)
    DEHM_PANEL_CASE(4)
    DEHM_PANEL_CASE(5)
    DEHM_PANEL_CASE(6)
    DEHM_PANEL_CASE(7)
    DEHM_PANEL_CASE(8)
    DEHM_PANEL_CASE(9)
    DEHM_PANEL_CASE(10)
    DEHM_PANEL_CASE(11)
    DEHM_PANEL_CASE(12)
    DEHM_PANEL_CASE(13)
    DEHM_PANEL_CASE(14)
    DEHM_PANEL_CASE(15)
#undef DEHM_PANEL_CASE
    default:
      return;
  }
}

template <typename W>
void GemmAcc(const float* a, int64_t lda, int64_t ainc, int64_t rows, int64_t depth, const W* b, int64_t ldb, float* y, int64_t ldy,
             int64_t w) {
  int64_t j = 0;
  for (; j + kColBlock <= w; j += kColBlock) Panel<kColBlock>(a, lda, ainc, rows, depth, b + j, ldb, y + j, ldy);
  if (j < w) PanelN(w - j, a, lda, ainc, rows, depth, b + j, ldb, y + j, ldy);
}

void GemmF32(const float* a, int64_t lda, int64_t ainc, int64_t rows, int64_t depth, const float* b, int64_t ldb, float* y,
             int64_t ldy, int64_t w) {
  GemmAcc(a, lda, ainc, rows, depth, b, ldb, y, ldy, w);
}

void GemmF16(const float* a, int64_t lda, int64_t ainc, int64_t rows, int64_t depth, const uint16_t* b, int64_t ldb, float* y,
             int64_t ldy, int64_t w) {
  GemmAcc(a, lda, ainc, rows, depth, b, ldb, y, ldy, w);
}

}  // namespace

const GemmKernels kGemmKernels = {GemmF32, GemmF16};

}  // namespace DEHM_GEMM_NS
}  // namespace dehm
