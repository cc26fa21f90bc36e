// CPU kernel of HMatMul: Y = X @ W_H for a packed H-matrix (dehm_onnx/hmatrix/pack.py).
//
// Two race-free phases, each a list of independent tasks pulled dynamically by the
// onnxruntime intra-op thread pool (KernelContext_ParallelFor):
//   1. for every low-rank block b and batch tile: T_b = Xp[:, rows_b] @ U_b    (own scratch)
//   2. for every output column chunk and batch tile: zero Yp[:, chunk], then add
//      T_b @ Vt_b[:, chunk] and Xp[:, rows_b] @ D_b[:, chunk] for the blocks meeting it.
// Xp is X gathered by row_perm (or X itself); Yp is scattered into Y by col_perm (or is Y).
// float16 payloads are widened to float on the fly; accumulation is always float.
#include "hmatmul_cpu.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <new>
#include <numeric>
#include <type_traits>
#include <string>

#include "dehm/layout.h"
#include "dehm/packed.h"

#if defined(_MSC_VER)
#define DEHM_RESTRICT __restrict
#else
#define DEHM_RESTRICT __restrict__
#endif

namespace dehm {
namespace {

constexpr int64_t kBatchTile = 64;
constexpr int64_t kMaxWorkers = 64;

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

inline float Load(const float* p, int64_t i) { return p[i]; }
inline float Load(const uint16_t* p, int64_t i) { return HalfToFloat(p[i]); }

// y[r, 0:w] += sum_i a[r, i] * b[i, 0:w] for r < rows (row-major with leading dims).
template <typename W>
void AccumulateProduct(const float* a, int64_t lda, int64_t rows, int64_t depth, const W* b, int64_t ldb,
                       float* y, int64_t ldy, int64_t w) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    float* DEHM_RESTRICT y0 = y + r * ldy;
    float* DEHM_RESTRICT y1 = y0 + ldy;
    float* DEHM_RESTRICT y2 = y1 + ldy;
    float* DEHM_RESTRICT y3 = y2 + ldy;
    const float* a0 = a + r * lda;
    for (int64_t i = 0; i < depth; ++i) {
      const float s0 = a0[i], s1 = a0[lda + i], s2 = a0[2 * lda + i], s3 = a0[3 * lda + i];
      const W* bi = b + i * ldb;
      for (int64_t j = 0; j < w; ++j) {
        const float v = Load(bi, j);
        y0[j] += s0 * v;
        y1[j] += s1 * v;
        y2[j] += s2 * v;
        y3[j] += s3 * v;
      }
    }
  }
  for (; r < rows; ++r) {
    float* DEHM_RESTRICT yr = y + r * ldy;
    const float* ar = a + r * lda;
    int64_t i = 0;
    for (; i + 4 <= depth; i += 4) {  // four rows of b per pass: a quarter of the y traffic
      const float s0 = ar[i], s1 = ar[i + 1], s2 = ar[i + 2], s3 = ar[i + 3];
      const W* b0 = b + i * ldb;
      const W* b1 = b0 + ldb;
      const W* b2 = b1 + ldb;
      const W* b3 = b2 + ldb;
      for (int64_t j = 0; j < w; ++j) yr[j] += s0 * Load(b0, j) + s1 * Load(b1, j) + s2 * Load(b2, j) + s3 * Load(b3, j);
    }
    for (; i < depth; ++i) {
      const float s = ar[i];
      const W* bi = b + i * ldb;
      for (int64_t j = 0; j < w; ++j) yr[j] += s * Load(bi, j);
    }
  }
}

// Runs task(t) for t in [0, num_tasks) on the session's intra-op pool, tasks pulled dynamically.
template <typename Task>
void RunTasks(OrtKernelContext* ctx, int64_t num_tasks, const Task& task) {
  struct State {
    const Task* task;
    std::atomic<int64_t> next;
    int64_t total;
  };
  State state{&task, {0}, num_tasks};
  auto worker = [](void* p, size_t) {
    State* s = static_cast<State*>(p);
    for (int64_t t = s->next.fetch_add(1); t < s->total; t = s->next.fetch_add(1)) (*s->task)(t);
  };
  const size_t workers = static_cast<size_t>(std::min<int64_t>(num_tasks, kMaxWorkers));
  if (workers <= 1) {
    worker(&state, 0);
    return;
  }
  Ort::ThrowOnError(Ort::GetApi().KernelContext_ParallelFor(ctx, worker, workers, 0, &state));
}

template <typename T>
struct Storage;  // maps the ORT element type to the raw payload type
template <>
struct Storage<float> {
  using Raw = float;
  static float ToFloat(float v) { return v; }
  static float FromFloat(float v) { return v; }
};
template <>
struct Storage<Ort::Float16_t> {
  using Raw = uint16_t;
  static float ToFloat(Ort::Float16_t v) { return HalfToFloat(*reinterpret_cast<const uint16_t*>(&v)); }
  static Ort::Float16_t FromFloat(float v) { return Ort::Float16_t(v); }
};

template <typename T>
void Compute(OrtKernelContext* ctx, const PackedPlan& plan, const T* x, const T* data_t, const int64_t* row_perm,
             const int64_t* col_perm, T* y) {
  using Raw = typename Storage<T>::Raw;
  static_assert(sizeof(Raw) == sizeof(T), "payload type size");
  const Raw* data = reinterpret_cast<const Raw*>(data_t);
  const int64_t batch = plan.batch, m = plan.m, n = plan.n;
  constexpr bool kIsFloat = std::is_same<T, float>::value;
  const bool need_xp = plan.has_row_perm || !kIsFloat;
  const bool need_yp = plan.has_col_perm || !kIsFloat;

  // Scratch: [Xp (batch x m)] [T blocks (batch x rank each)] [Yp (batch x n)].
  std::vector<int64_t> t_offset(plan.blocks.size(), 0);
  int64_t t_total = 0;
  for (size_t i = 0; i < plan.blocks.size(); ++i) {
    if (plan.blocks[i].kind != BlockKind::kLowRank) continue;
    t_offset[i] = t_total;
    int64_t sz = 0;
    if (!CheckedMul(batch, plan.blocks[i].rank, &sz) || !CheckedAdd(t_total, sz, &t_total)) throw std::bad_alloc();
  }
  const int64_t xp_size = need_xp ? batch * m : 0;
  const int64_t yp_size = need_yp ? batch * n : 0;
  int64_t scratch_size = 0;
  if (!CheckedAdd(xp_size, t_total, &scratch_size) || !CheckedAdd(scratch_size, yp_size, &scratch_size))
    throw std::bad_alloc();
  std::unique_ptr<float[]> scratch(new float[static_cast<size_t>(std::max<int64_t>(scratch_size, 1))]);
  float* xp = scratch.get();
  float* tbuf = xp + xp_size;
  float* yp = tbuf + t_total;

  const int64_t batch_tiles = (batch + kBatchTile - 1) / kBatchTile;
  auto tile_range = [&](int64_t tile, int64_t* b0, int64_t* b1) {
    *b0 = tile * kBatchTile;
    *b1 = std::min(batch, *b0 + kBatchTile);
  };

  const float* xf = nullptr;
  if (need_xp) {
    RunTasks(ctx, batch_tiles, [&](int64_t tile) {
      int64_t b0, b1;
      tile_range(tile, &b0, &b1);
      for (int64_t b = b0; b < b1; ++b) {
        const T* xr = x + b * m;
        float* out = xp + b * m;
        if (plan.has_row_perm) {
          for (int64_t i = 0; i < m; ++i) out[i] = Storage<T>::ToFloat(xr[row_perm[i]]);
        } else {
          for (int64_t i = 0; i < m; ++i) out[i] = Storage<T>::ToFloat(xr[i]);
        }
      }
    });
    xf = xp;
  } else {
    xf = reinterpret_cast<const float*>(x);
  }
  float* yf = need_yp ? yp : reinterpret_cast<float*>(y);

  // Phase 1: T_b = Xp_b @ U_b, largest tasks first.
  std::vector<int64_t> tasks;
  for (size_t i = 0; i < plan.blocks.size(); ++i) {
    if (plan.blocks[i].kind == BlockKind::kLowRank && plan.blocks[i].rank > 0) {
      for (int64_t tile = 0; tile < batch_tiles; ++tile) tasks.push_back(static_cast<int64_t>(i) * batch_tiles + tile);
    }
  }
  auto cost = [&](int64_t task) {
    const BlockView& b = plan.blocks[static_cast<size_t>(task / batch_tiles)];
    return (b.r1 - b.r0) * b.rank;
  };
  std::stable_sort(tasks.begin(), tasks.end(), [&](int64_t a, int64_t b) { return cost(a) > cost(b); });
  RunTasks(ctx, static_cast<int64_t>(tasks.size()), [&](int64_t t) {
    const int64_t task = tasks[static_cast<size_t>(t)];
    const size_t bi = static_cast<size_t>(task / batch_tiles);
    const BlockView& blk = plan.blocks[bi];
    int64_t b0, b1;
    tile_range(task % batch_tiles, &b0, &b1);
    const int64_t k = blk.rank;
    float* tb = tbuf + t_offset[bi] + b0 * k;
    std::fill(tb, tb + (b1 - b0) * k, 0.0f);
    AccumulateProduct(xf + b0 * m + blk.r0, m, b1 - b0, blk.r1 - blk.r0, data + blk.offset, k, tb, k, k);
  });

  // Phase 2: each column chunk owns Yp[:, chunk]; no two tasks write the same entries.
  const int64_t chunk = std::max<int64_t>(16, std::min<int64_t>(256, ((n + 15) / 16 + 15) / 16 * 16));
  const int64_t col_chunks = (n + chunk - 1) / chunk;
  RunTasks(ctx, col_chunks * batch_tiles, [&](int64_t task) {
    const int64_t j0 = (task / batch_tiles) * chunk, j1 = std::min(n, j0 + chunk);
    int64_t b0, b1;
    tile_range(task % batch_tiles, &b0, &b1);
    for (int64_t b = b0; b < b1; ++b) std::fill(yf + b * n + j0, yf + b * n + j1, 0.0f);
    for (size_t bi = 0; bi < plan.blocks.size(); ++bi) {
      const BlockView& blk = plan.blocks[bi];
      const int64_t lo = std::max(blk.c0, j0), hi = std::min(blk.c1, j1);
      if (lo >= hi || blk.kind == BlockKind::kZero) continue;
      const int64_t cols = blk.c1 - blk.c0;
      if (blk.kind == BlockKind::kLowRank) {
        if (blk.rank == 0) continue;
        const Raw* vt = data + blk.offset + (blk.r1 - blk.r0) * blk.rank;
        AccumulateProduct(tbuf + t_offset[bi] + b0 * blk.rank, blk.rank, b1 - b0, blk.rank, vt + (lo - blk.c0), cols,
                          yf + b0 * n + lo, n, hi - lo);
      } else {
        AccumulateProduct(xf + b0 * m + blk.r0, m, b1 - b0, blk.r1 - blk.r0, data + blk.offset + (lo - blk.c0), cols,
                          yf + b0 * n + lo, n, hi - lo);
      }
    }
  });

  if (need_yp) {
    RunTasks(ctx, batch_tiles, [&](int64_t tile) {
      int64_t b0, b1;
      tile_range(tile, &b0, &b1);
      for (int64_t b = b0; b < b1; ++b) {
        const float* in = yp + b * n;
        T* out = y + b * n;
        if (plan.has_col_perm) {
          for (int64_t j = 0; j < n; ++j) out[col_perm[j]] = Storage<T>::FromFloat(in[j]);
        } else {
          for (int64_t j = 0; j < n; ++j) out[j] = Storage<T>::FromFloat(in[j]);
        }
      }
    });
  }
}

template <typename T>
Ort::Status HMatMulCpu(OrtKernelContext* ctx, const Ort::Custom::Tensor<T>& X, const Ort::Custom::Tensor<T>& data,
                       const Ort::Custom::Tensor<int64_t>& layout, const Ort::Custom::Tensor<int64_t>& row_perm,
                       const Ort::Custom::Tensor<int64_t>& col_perm, Ort::Custom::Tensor<T>& Y) {
  try {
    PackedInputs in;
    in.x_shape = X.Shape();
    in.data_shape = data.Shape();
    in.layout_shape = layout.Shape();
    in.row_perm_shape = row_perm.Shape();
    in.col_perm_shape = col_perm.Shape();
    in.layout = layout.Data();
    in.row_perm = row_perm.Data();
    in.col_perm = col_perm.Data();
    PackedPlan plan;
    std::string err = ValidatePacked(in, &plan);
    if (!err.empty()) return Ort::Status(err.c_str(), ORT_INVALID_ARGUMENT);
    T* y = Y.Allocate(plan.y_shape);
    if (plan.batch == 0) return Ort::Status{nullptr};
    Compute<T>(ctx, plan, X.Data(), data.Data(), in.row_perm, in.col_perm, y);
    return Ort::Status{nullptr};
  } catch (const std::bad_alloc&) {
    return Ort::Status("HMatMul: out of memory for the output or scratch buffer", ORT_FAIL);
  } catch (const std::exception& e) {
    return Ort::Status((std::string("HMatMul: ") + e.what()).c_str(), ORT_RUNTIME_EXCEPTION);
  }
}

}  // namespace

void CreateCpuOps(std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>* ops) {
  ops->emplace_back(Ort::Custom::CreateLiteCustomOp("HMatMul", "CPUExecutionProvider", HMatMulCpu<float>));
  ops->emplace_back(Ort::Custom::CreateLiteCustomOp("HMatMul", "CPUExecutionProvider", HMatMulCpu<Ort::Float16_t>));
}

}  // namespace dehm
