// Implementation of GemmKernels (gemm.h), compiled once per instruction set with
// DEHM_GEMM_NS naming the namespace. Plain C++: the compiler vectorizes the fixed-size
// register tiles (RB rows x CB columns kept in accumulators across the whole depth).
#include <algorithm>
#include <cstring>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DEHM_GEMM_PERMUTE 1
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define DEHM_GEMM_PERMUTE 1
#define DEHM_GEMM_NEON 1
#endif

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
constexpr int64_t kAxpyDepth = 8;
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
// Eight floats, with GCC/Clang vector extensions (portable: lowered to SSE/AVX, NEON or
// scalar code as the target allows). Keeps RB x 16 accumulators in vector registers
// across the depth.
#if defined(__aarch64__)
// 128-bit NEON: a native 32-byte vector type would be split by the compiler through the
// stack (every accumulator stored and reloaded at each step, checked in the aarch64
// disassembly); a pair of native 4-lane vectors stays in registers (ld1r + fmla).
typedef float Vec4 __attribute__((vector_size(16)));
struct Vec8 {
  Vec4 lo, hi;
};
inline Vec8 operator+(Vec8 a, Vec8 b) { return {a.lo + b.lo, a.hi + b.hi}; }
inline Vec8& operator+=(Vec8& a, Vec8 b) {
  a.lo += b.lo;
  a.hi += b.hi;
  return a;
}
inline Vec8 operator*(float s, Vec8 b) { return {s * b.lo, s * b.hi}; }

inline Vec8 LoadVec(const float* p) {
  Vec8 v;
  std::memcpy(&v.lo, p, sizeof v.lo);
  std::memcpy(&v.hi, p + 4, sizeof v.hi);
  return v;
}
inline void StoreVec(float* p, Vec8 v) {
  std::memcpy(p, &v.lo, sizeof v.lo);
  std::memcpy(p + 4, &v.hi, sizeof v.hi);
}
#else
typedef float Vec8 __attribute__((vector_size(32)));

inline Vec8 LoadVec(const float* p) {
  Vec8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void StoreVec(float* p, Vec8 v) { std::memcpy(p, &v, sizeof v); }
#endif

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
// One row (batch 1): even and odd depth steps go to separate accumulators, four
// independent chains instead of two, so the adds overlap instead of waiting on each other.
template <>
inline void Tile<1, 16, float>(const float* a, int64_t, int64_t ainc, int64_t depth, const float* b, int64_t ldb,
                               float* y, int64_t) {
  Vec8 even0 = LoadVec(y), even1 = LoadVec(y + 8), odd0 = {}, odd1 = {};
  int64_t i = 0;
  for (; i + 2 <= depth; i += 2) {
    const float s0 = a[i * ainc], s1 = a[(i + 1) * ainc];
    const float* b0 = b + i * ldb;
    const float* b1 = b0 + ldb;
    even0 += s0 * LoadVec(b0);
    even1 += s0 * LoadVec(b0 + 8);
    odd0 += s1 * LoadVec(b1);
    odd1 += s1 * LoadVec(b1 + 8);
  }
  if (i < depth) {
    const float s = a[i * ainc];
    even0 += s * LoadVec(b + i * ldb);
    even1 += s * LoadVec(b + i * ldb + 8);
  }
  StoreVec(y, even0 + odd0);
  StoreVec(y + 8, even1 + odd1);
}
#endif

#if defined(DEHM_GEMM_PERMUTE) && !defined(DEHM_GEMM_NEON)
constexpr int64_t kNarrowMinDepth = 8;
// One row of a times a narrow panel stored contiguously (depth x K, K < 16), e.g. x U_b at
// batch 1. Eight panel rows are K whole vectors; lane l of vector v holds row (8v + l) / K,
// column (8v + l) % K. A fixed lane permutation spreads a[i:i+8] to match, so the panel
// streams through K independent FMA chains at full vector width, and the lanes are folded
// onto the K columns once at the end.
template <int K>
void RowTimesNarrowPanel(const float* a, int64_t depth, const float* b, float* y) {
  __m256i spread[K];
  __m256 acc[K];
  for (int v = 0; v < K; ++v) {
    alignas(32) int lanes[8];
    for (int l = 0; l < 8; ++l) lanes[l] = (8 * v + l) / K;
    spread[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
    acc[v] = _mm256_setzero_ps();
  }
  int64_t i = 0;
  for (; i + 8 <= depth; i += 8) {
    const __m256 av = _mm256_loadu_ps(a + i);
    const float* bi = b + i * K;
    for (int v = 0; v < K; ++v)
      acc[v] = _mm256_fmadd_ps(_mm256_loadu_ps(bi + 8 * v), _mm256_permutevar8x32_ps(av, spread[v]), acc[v]);
  }
  alignas(32) float lanes[8 * K];
  for (int v = 0; v < K; ++v) _mm256_store_ps(lanes + 8 * v, acc[v]);
  float sum[K] = {};
  for (int p = 0; p < 8 * K; ++p) sum[p % K] += lanes[p];
  for (; i < depth; ++i)
    for (int c = 0; c < K; ++c) sum[c] += a[i] * b[i * K + c];
  for (int c = 0; c < K; ++c) y[c] += sum[c];
}

#endif

#ifdef DEHM_GEMM_NEON
constexpr int64_t kNarrowMinDepth = 4;
// A float32 panel for RowTimesNarrowPanel: Load4(p) returns panel elements p..p+3. A
// quantized payload would supply its own Load4 that widens and scales in registers.
struct FloatPanel {
  const float* b;
  float32x4_t Load4(int64_t p) const { return vld1q_f32(b + p); }
  float Load1(int64_t p) const { return b[p]; }
};

// NEON form of the permutation product above: four panel rows are K whole 4-lane vectors;
// lane l of vector v holds row (4v + l) / K, column (4v + l) % K, and one table lookup
// (tbl) per vector spreads a[i:i+4] onto those lanes, so the panel streams through K
// independent FMA chains; the lanes are folded onto the K columns once at the end.
template <int K, class Panel>
void RowTimesNarrowPanel(const float* a, int64_t depth, const Panel& panel, float* y) {
  uint8x16_t spread[K];
  float32x4_t acc[K];
  for (int v = 0; v < K; ++v) {
    uint8_t bytes[16];
    for (int l = 0; l < 4; ++l)
      for (int j = 0; j < 4; ++j) bytes[4 * l + j] = static_cast<uint8_t>(4 * ((4 * v + l) / K) + j);
    spread[v] = vld1q_u8(bytes);
    acc[v] = vdupq_n_f32(0.0f);
  }
  int64_t i = 0;
  for (; i + 4 <= depth; i += 4) {
    const uint8x16_t av = vreinterpretq_u8_f32(vld1q_f32(a + i));
    const int64_t p0 = i * K;
    for (int v = 0; v < K; ++v)
      acc[v] = vfmaq_f32(acc[v], panel.Load4(p0 + 4 * v), vreinterpretq_f32_u8(vqtbl1q_u8(av, spread[v])));
  }
  float lanes[4 * K];
  for (int v = 0; v < K; ++v) vst1q_f32(lanes + 4 * v, acc[v]);
  float sum[K] = {};
  for (int p = 0; p < 4 * K; ++p) sum[p % K] += lanes[p];
  for (; i < depth; ++i)  // the last rows (fewer than four: no whole vectors)
    for (int c = 0; c < K; ++c) sum[c] += a[i] * panel.Load1(i * K + c);
  for (int c = 0; c < K; ++c) y[c] += sum[c];
}
#endif

#ifdef DEHM_GEMM_PERMUTE
#ifdef DEHM_GEMM_NEON
#define DEHM_NARROW_PANEL(b) FloatPanel{b}
#else
#define DEHM_NARROW_PANEL(b) b
#endif
// Rows of a (unit stride along the depth) times a contiguous panel of width w < 16.
inline void RowsTimesNarrowPanel(const float* a, int64_t lda, int64_t rows, int64_t depth, const float* b, float* y,
                                 int64_t ldy, int64_t w) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* ar = a + r * lda;
    float* yr = y + r * ldy;
    switch (w) {
#define DEHM_NARROW_CASE(N) \
  case N:                   \
    RowTimesNarrowPanel<N>(ar, depth, DEHM_NARROW_PANEL(b), yr); \
    break;
      DEHM_NARROW_CASE(1)
      DEHM_NARROW_CASE(2)
      DEHM_NARROW_CASE(3)
      DEHM_NARROW_CASE(4)
      DEHM_NARROW_CASE(5)
      DEHM_NARROW_CASE(6)
      DEHM_NARROW_CASE(7)
      DEHM_NARROW_CASE(8)
      DEHM_NARROW_CASE(9)
      DEHM_NARROW_CASE(10)
      DEHM_NARROW_CASE(11)
      DEHM_NARROW_CASE(12)
      DEHM_NARROW_CASE(13)
      DEHM_NARROW_CASE(14)
      DEHM_NARROW_CASE(15)
#undef DEHM_NARROW_CASE
#undef DEHM_NARROW_PANEL
      default:
        break;
    }
  }
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
#undef DEHM_PANEL_CASE
    default:  // 9..15: a panel of 8, then the rest
      Panel<8>(a, lda, ainc, rows, depth, b, ldb, y, ldy);
      return PanelN(width - 8, a, lda, ainc, rows, depth, b + 8, ldb, y + 8, ldy);
  }
}

#if defined(__GNUC__) || defined(__clang__)
// One row (batch 1): y[0:8 NV] += sum_i a[i * ainc] * b[i * ldb + 0:8 NV], NV vectors of
// y in registers across the depth. Narrow tiles split the depth over two accumulator sets
// so that at least four FMA chains are in flight.
template <int NV>
inline void RowTile(const float* a, int64_t ainc, int64_t depth, const float* b, int64_t ldb, float* y) {
  constexpr int kSets = NV >= 4 ? 1 : 2;
  Vec8 acc[kSets][NV];
  for (int v = 0; v < NV; ++v) {
    acc[0][v] = LoadVec(y + 8 * v);
    if (kSets == 2) acc[kSets - 1][v] = Vec8{};
  }
  int64_t i = 0;
  for (; i + kSets <= depth; i += kSets) {
    for (int set = 0; set < kSets; ++set) {
      const float s = a[(i + set) * ainc];
      const float* bi = b + (i + set) * ldb;
      for (int v = 0; v < NV; ++v) acc[set][v] += s * LoadVec(bi + 8 * v);
    }
  }
  for (; i < depth; ++i) {
    const float s = a[i * ainc];
    for (int v = 0; v < NV; ++v) acc[0][v] += s * LoadVec(b + i * ldb + 8 * v);
  }
  for (int v = 0; v < NV; ++v) StoreVec(y + 8 * v, kSets == 2 ? acc[0][v] + acc[kSets - 1][v] : acc[0][v]);
}

// One row of a times a depth x w panel: 64-column tiles, then 32, 16 and 8, then the
// remaining columns through the narrow panels.
template <typename W>
void RowTimesPanel(const float* a, int64_t ainc, int64_t depth, const float* b, int64_t ldb, float* y, int64_t w) {
  if (depth <= kAxpyDepth) {
    // Shallow (T_b Vt_b at batch 1): one pass per row of b, so b is read front to back.
    for (int64_t i = 0; i < depth; ++i) {
      const float s = a[i * ainc];
      const float* bi = b + i * ldb;
      int64_t j = 0;
      for (; j + 8 <= w; j += 8) StoreVec(y + j, LoadVec(y + j) + s * LoadVec(bi + j));
      for (; j < w; ++j) y[j] += s * bi[j];
    }
    return;
  }
  int64_t j = 0;
  for (; j + 64 <= w; j += 64) RowTile<8>(a, ainc, depth, b + j, ldb, y + j);
  if (j + 32 <= w) {
    RowTile<4>(a, ainc, depth, b + j, ldb, y + j);
    j += 32;
  }
  if (j + 16 <= w) {
    RowTile<2>(a, ainc, depth, b + j, ldb, y + j);
    j += 16;
  }
  if (j + 8 <= w) {
    RowTile<1>(a, ainc, depth, b + j, ldb, y + j);
    j += 8;
  }
  if (j < w) PanelN(w - j, a, 1, ainc, 1, depth, b + j, ldb, y + j, 1);
}
#endif

#if defined(__GNUC__) || defined(__clang__)
// Few rows (e.g. rank k rows of T^T = U^T Xt^T): all RB rows x 8 columns in registers, so
// each b row (a stretch of the batch) is loaded once for all rows.
template <int RB>
inline void TileTall8(const float* a, int64_t lda, int64_t ainc, int64_t depth, const float* b, int64_t ldb, float* y,
                      int64_t ldy) {
  Vec8 acc[RB];
  for (int r = 0; r < RB; ++r) acc[r] = LoadVec(y + r * ldy);
  for (int64_t i = 0; i < depth; ++i) {
    const Vec8 bv = LoadVec(b + i * ldb);
    for (int r = 0; r < RB; ++r) acc[r] += a[r * lda + i * ainc] * bv;
  }
  for (int r = 0; r < RB; ++r) StoreVec(y + r * ldy, acc[r]);
}

template <int RB>
void PanelsTall8(const float* a, int64_t lda, int64_t ainc, int64_t depth, const float* b, int64_t ldb, float* y,
                 int64_t ldy, int64_t w) {
  for (int64_t j = 0; j + 8 <= w; j += 8) TileTall8<RB>(a, lda, ainc, depth, b + j, ldb, y + j, ldy);
}

// Handles rows <= 8 for float payloads; returns the number of columns done (a multiple of 8).
inline int64_t GemmFewRows(const float* a, int64_t lda, int64_t ainc, int64_t rows, int64_t depth, const float* b,
                           int64_t ldb, float* y, int64_t ldy, int64_t w) {
  const int64_t done = w / 8 * 8;
  switch (rows) {
#define DEHM_TALL_CASE(N)                                         \
  case N:                                                         \
    PanelsTall8<N>(a, lda, ainc, depth, b, ldb, y, ldy, done); \
    return done;
    DEHM_TALL_CASE(2)
    DEHM_TALL_CASE(3)
    DEHM_TALL_CASE(5)
    DEHM_TALL_CASE(6)
    DEHM_TALL_CASE(7)
    DEHM_TALL_CASE(8)
#undef DEHM_TALL_CASE
    default:
      return 0;  // 1 and 4 rows: the general tiles are as good
  }
}
#endif

template <typename W>
void GemmAcc(const float* a, int64_t lda, int64_t ainc, int64_t rows, int64_t depth, const W* b, int64_t ldb, float* y, int64_t ldy,
             int64_t w) {
  int64_t j = 0;
#ifdef DEHM_GEMM_PERMUTE
  if (std::is_same<W, float>::value && ainc == 1 && ldb == w && w >= 1 && w < 16 && depth >= kNarrowMinDepth) {
    RowsTimesNarrowPanel(a, lda, rows, depth, reinterpret_cast<const float*>(b), y, ldy, w);
    return;
  }
#endif
#if defined(__GNUC__) || defined(__clang__)
  if (std::is_same<W, float>::value && rows == 1) {
    RowTimesPanel<float>(a, ainc, depth, reinterpret_cast<const float*>(b), ldb, y, w);
    return;
  }
  if (std::is_same<W, float>::value && rows <= 8) {
    j = GemmFewRows(a, lda, ainc, rows, depth, reinterpret_cast<const float*>(b), ldb, y, ldy, w);
    if (j == w) return;
  }
#endif
  for (; j + kColBlock <= w; j += kColBlock) Panel<kColBlock>(a, lda, ainc, rows, depth, b + j, ldb, y + j, ldy);
  if (j < w) PanelN(w - j, a, lda, ainc, rows, depth, b + j, ldb, y + j, ldy);
}

void GemmF32(const float* a, int64_t lda, int64_t ainc, int64_t rows, int64_t depth, const float* b, int64_t ldb, float* y,
             int64_t ldy, int64_t w) {
  GemmAcc(a, lda, ainc, rows, depth, b, ldb, y, ldy, w);
}

// float16 payloads take plain loops (fewer template instances; float16 speed is no goal).
void GemmF16(const float* a, int64_t lda, int64_t ainc, int64_t rows, int64_t depth, const uint16_t* b, int64_t ldb, float* y,
             int64_t ldy, int64_t w) {
  for (int64_t r = 0; r < rows; ++r) {
    float* yr = y + r * ldy;
    for (int64_t i = 0; i < depth; ++i) {
      const float s = a[r * lda + i * ainc];
      const uint16_t* bi = b + i * ldb;
      for (int64_t j = 0; j < w; ++j) yr[j] += s * HalfToFloat(bi[j]);
    }
  }
}

// Register tile over all terms: RB rows x CB columns, written once.
template <int RB, int CB, typename W>
inline void TermTile(const Term* terms, int64_t num_terms, int64_t r, int64_t j, float* y, int64_t ldy,
                     bool accumulate) {
  float acc[RB][CB];
  for (int rr = 0; rr < RB; ++rr)
    for (int c = 0; c < CB; ++c) acc[rr][c] = accumulate ? y[rr * ldy + c] : 0.0f;
  for (int64_t t = 0; t < num_terms; ++t) {
    const Term& term = terms[t];
    const float* a = term.a + r * term.lda;
    const W* b = static_cast<const W*>(term.b) + j;
    for (int64_t i = 0; i < term.depth; ++i) {
      const W* bi = b + i * term.ldb;
      for (int rr = 0; rr < RB; ++rr) {
        const float s = a[rr * term.lda + i * term.ainc];
        for (int c = 0; c < CB; ++c) acc[rr][c] += s * Load(bi, c);
      }
    }
  }
  for (int rr = 0; rr < RB; ++rr)
    for (int c = 0; c < CB; ++c) y[rr * ldy + c] = acc[rr][c];
}

#if defined(__GNUC__) || defined(__clang__)
template <int RB>
inline void TermTile16(const Term* terms, int64_t num_terms, int64_t r, int64_t j, float* y, int64_t ldy,
                       bool accumulate) {
  Vec8 acc[RB][2];
  for (int rr = 0; rr < RB; ++rr) {
    acc[rr][0] = accumulate ? LoadVec(y + rr * ldy) : Vec8{};
    acc[rr][1] = accumulate ? LoadVec(y + rr * ldy + 8) : Vec8{};
  }
  for (int64_t t = 0; t < num_terms; ++t) {
    const Term& term = terms[t];
    const float* a = term.a + r * term.lda;
    const float* b = static_cast<const float*>(term.b) + j;
    for (int64_t i = 0; i < term.depth; ++i) {
      const Vec8 b0 = LoadVec(b + i * term.ldb), b1 = LoadVec(b + i * term.ldb + 8);
      for (int rr = 0; rr < RB; ++rr) {
        const float s = a[rr * term.lda + i * term.ainc];
        acc[rr][0] += s * b0;
        acc[rr][1] += s * b1;
      }
    }
  }
  for (int rr = 0; rr < RB; ++rr) {
    StoreVec(y + rr * ldy, acc[rr][0]);
    StoreVec(y + rr * ldy + 8, acc[rr][1]);
  }
}
template <>
inline void TermTile<4, 16, float>(const Term* terms, int64_t num_terms, int64_t r, int64_t j, float* y, int64_t ldy,
                                   bool accumulate) {
  TermTile16<4>(terms, num_terms, r, j, y, ldy, accumulate);
}
template <>
inline void TermTile<1, 16, float>(const Term* terms, int64_t num_terms, int64_t r, int64_t j, float* y, int64_t ldy,
                                   bool accumulate) {
  TermTile16<1>(terms, num_terms, r, j, y, ldy, accumulate);
}
#endif

template <int CB, typename W>
void TermPanel(const Term* terms, int64_t num_terms, int64_t rows, int64_t j, float* y, int64_t ldy, bool accumulate) {
  int64_t r = 0;
  for (; r + kRowBlock <= rows; r += kRowBlock)
    TermTile<kRowBlock, CB, W>(terms, num_terms, r, j, y + r * ldy + j, ldy, accumulate);
  for (; r < rows; ++r) TermTile<1, CB, W>(terms, num_terms, r, j, y + r * ldy + j, ldy, accumulate);
}

template <typename W>
void Segment(const Term* terms, int64_t num_terms, int64_t rows, float* y, int64_t ldy, int64_t w, bool accumulate) {
  int64_t j = 0;
  for (; j + kColBlock <= w; j += kColBlock) TermPanel<kColBlock, W>(terms, num_terms, rows, j, y, ldy, accumulate);
  if (w - j > 8) {
    TermPanel<8, W>(terms, num_terms, rows, j, y, ldy, accumulate);
    j += 8;
  }
  switch (w - j) {
#define DEHM_SEGMENT_CASE(N) \
  case N:                    \
    return TermPanel<N, W>(terms, num_terms, rows, j, y, ldy, accumulate);
    DEHM_SEGMENT_CASE(1)
    DEHM_SEGMENT_CASE(2)
    DEHM_SEGMENT_CASE(3)
    DEHM_SEGMENT_CASE(4)
    DEHM_SEGMENT_CASE(5)
    DEHM_SEGMENT_CASE(6)
    DEHM_SEGMENT_CASE(7)
    DEHM_SEGMENT_CASE(8)
#undef DEHM_SEGMENT_CASE
    default:
      return;
  }
}

void SegmentF32(const Term* terms, int64_t num_terms, int64_t rows, float* y, int64_t ldy, int64_t w, bool accumulate) {
  Segment<float>(terms, num_terms, rows, y, ldy, w, accumulate);
}

void SegmentF16(const Term* terms, int64_t num_terms, int64_t rows, float* y, int64_t ldy, int64_t w, bool accumulate) {
  if (!accumulate) {
    for (int64_t r = 0; r < rows; ++r) std::fill(y + r * ldy, y + r * ldy + w, 0.0f);
  }
  for (int64_t t = 0; t < num_terms; ++t) {
    const Term& term = terms[t];
    GemmF16(term.a, term.lda, term.ainc, rows, term.depth, static_cast<const uint16_t*>(term.b), term.ldb, y, ldy, w);
  }
}

}  // namespace

const GemmKernels kGemmKernels = {GemmF32, GemmF16, SegmentF32, SegmentF16};

}  // namespace DEHM_GEMM_NS
}  // namespace dehm
