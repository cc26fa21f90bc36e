// CPU kernel of HMatMul: Y = X @ W_H for a packed H-matrix (dehm_onnx/hmatrix/pack.py).
//
// Small products (batch x stored values < kParallelWork, batch < kTransposeBatch) take one
// pass over the blocks in storage order on the calling thread: T = Xp_b @ U_b, then
// Yp[:, cols_b] += T @ Vt_b (or Xp_b @ D_b), so `data` is read as one forward stream.
// Larger products run two race-free phases of independent tasks pulled dynamically by
// the onnxruntime intra-op thread pool (KernelContext_ParallelFor):
//   1. for every low-rank block and batch tile: T_b = Xp[:, rows_b] @ U_b (own scratch);
//   2. for every output column chunk and batch tile: the chunk is cut at block edges into
//      segments, and each segment's output tile is summed in registers over the blocks
//      covering it (T_b @ Vt_b or Xp_b @ D_b) and stored once.
// From kTransposeBatch rows on, Xp and T are kept batch-major so the products vectorize
// over the batch. Xp is X gathered by row_perm (or X itself); Yp is scattered into Y by
// col_perm (or is Y). float16 is widened to float on load; accumulation is always float.
#include "hmatmul_cpu.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <mutex>
#include <new>
#include <string>
#include <type_traits>

#include "common/constant_inputs.h"
#include "common/ort_api.h"
#include "dehm/layout.h"
#include "dehm/packed.h"
#include "gemm.h"
#include "kernel_util.h"

namespace dehm {
namespace {

constexpr int64_t kBatchTile = 64;
constexpr int64_t kTransposeBatch = 16;  // batches at least this wide use the batch-major layout
constexpr int64_t kTransposeRows = 64;
constexpr int64_t kParallelWork = int64_t{1} << 19;  // multiply-adds below which one thread runs

inline void Gemm(const GemmKernels& k, const float* a, int64_t lda, int64_t ainc, int64_t rows, int64_t depth,
                 const float* b, int64_t ldb, float* y, int64_t ldy, int64_t w) {
  k.f32(a, lda, ainc, rows, depth, b, ldb, y, ldy, w);
}
inline void Gemm(const GemmKernels& k, const float* a, int64_t lda, int64_t ainc, int64_t rows, int64_t depth,
                 const uint16_t* b, int64_t ldb, float* y, int64_t ldy, int64_t w) {
  k.f16(a, lda, ainc, rows, depth, b, ldb, y, ldy, w);
}

// Strided view of a float matrix: element (b, i) at p[b * ld_b + i * ld_i].
struct View {
  float* p;
  int64_t ld_b;
  int64_t ld_i;
};

// Y[b, col_perm[j]] = Yp[b, j] (rounded to T) for b in [b0, b1); nothing when Yp is Y.
template <typename T>
void ScatterOutput(const PackedPlan& plan, const float* yp, const int64_t* col_perm, T* y, bool need_yp, int64_t b0,
                   int64_t b1) {
  if (!need_yp) return;
  const int64_t n = plan.n;
  for (int64_t b = b0; b < b1; ++b) {
    const float* in = yp + b * n;
    T* out = y + b * n;
    if (plan.has_col_perm) {
      for (int64_t j = 0; j < n; ++j) out[col_perm[j]] = Storage<T>::FromFloat(in[j]);
    } else {
      for (int64_t j = 0; j < n; ++j) out[j] = Storage<T>::FromFloat(in[j]);
    }
  }
}

// Small products: y = the products of all blocks, in one pass in storage order on the
// calling thread, so `data` is read as one forward stream (left to the hardware
// prefetchers: software prefetching 16 KB ahead, which paid before the one-row tiles read
// each block front to back, now costs 8 µs per 1.6 MB with the factors in cache and 10 µs
// without). tbuf holds batch x (largest rank) floats. (Measured: splitting the pass into
// runs pulled by two pool tasks, each summing into its own copy of y, was 10-15 % slower
// at batch 1, whether the pool thread slept or spun.)
template <typename Raw>
void SmallProduct(const PackedPlan& plan, const GemmKernels& kernels, const float* xp, const Raw* data, int64_t batch,
                  float* tbuf, float* y) {
  const int64_t m = plan.m, n = plan.n;
  std::fill(y, y + batch * n, 0.0f);
  for (const BlockView& blk : plan.blocks) {
    const int64_t rows = blk.r1 - blk.r0, cols = blk.c1 - blk.c0;
    const float* xa = xp + blk.r0;
    if (blk.kind == BlockKind::kDense) {
      Gemm(kernels, xa, m, 1, batch, rows, data + blk.offset, cols, y + blk.c0, n, cols);
    } else if (blk.kind == BlockKind::kLowRank && blk.rank > 0) {
      const int64_t k = blk.rank;
      std::fill(tbuf, tbuf + batch * k, 0.0f);
      Gemm(kernels, xa, m, 1, batch, rows, data + blk.offset, k, tbuf, k, k);
      Gemm(kernels, tbuf, k, 1, batch, k, data + blk.offset + rows * k, cols, y + blk.c0, n, cols);
    }
  }
}

// What the kernel derives from a validated layout, independent of the batch: kept per node
// with the plan when the packed inputs are constant.
struct KernelTables {
  struct Segment {
    int64_t j0, j1, begin, end;  // columns; covering blocks seg_blocks[begin, end)
  };
  std::vector<int64_t> rank_offset;      // per block: sum of the ranks of the low-rank blocks before it
  int64_t rank_total = 0;                // sum of all low-rank ranks
  int64_t max_rank = 0;
  std::vector<int64_t> lowrank_by_cost;  // low-rank blocks of rank > 0, largest rows x rank first
  int64_t col_chunks = 0;                // output column chunks of phase 2
  std::vector<Segment> segments;         // per chunk, the column ranges between block edges
  std::vector<int64_t> seg_blocks, chunk_segments;
};

KernelTables BuildKernelTables(const PackedPlan& plan) {
  KernelTables t;
  const int64_t n = plan.n;
  t.rank_offset.assign(plan.blocks.size(), 0);
  for (size_t i = 0; i < plan.blocks.size(); ++i) {
    const BlockView& blk = plan.blocks[i];
    t.max_rank = std::max(t.max_rank, blk.rank);
    if (blk.kind != BlockKind::kLowRank) continue;
    t.rank_offset[i] = t.rank_total;
    if (!CheckedAdd(t.rank_total, blk.rank, &t.rank_total)) throw std::bad_alloc();
    if (blk.rank > 0) t.lowrank_by_cost.push_back(static_cast<int64_t>(i));
  }
  auto cost = [&](int64_t i) {
    const BlockView& b = plan.blocks[static_cast<size_t>(i)];
    return (b.r1 - b.r0) * b.rank;
  };
  std::stable_sort(t.lowrank_by_cost.begin(), t.lowrank_by_cost.end(),
                   [&](int64_t a, int64_t b) { return cost(a) > cost(b); });

  BuildColumnSegments(plan.blocks, n, &t.col_chunks, &t.chunk_segments, &t.segments, &t.seg_blocks);
  return t;
}

template <typename T>
void Compute(OrtKernelContext* ctx, const PackedPlan& plan, const KernelTables& tables, int64_t batch, const T* x,
             const T* data_t, const int64_t* row_perm, const int64_t* col_perm, T* y) {
  using Raw = typename Storage<T>::Raw;
  static_assert(sizeof(Raw) == sizeof(T), "payload type size");
  const Raw* data = reinterpret_cast<const Raw*>(data_t);
  const int64_t m = plan.m, n = plan.n;
  constexpr bool kIsFloat = std::is_same<T, float>::value;
  const GemmKernels& kernels = SelectGemmKernels();
  // Batch-major ("transposed") layout for X and the X_b U_b products once the batch is wide
  // enough to vectorize over it; small batches vectorize over the output columns instead.
  const bool transposed = kIsFloat && batch >= kTransposeBatch;
  const bool need_xp = transposed || plan.has_row_perm || !kIsFloat;
  const bool need_yp = plan.has_col_perm || !kIsFloat;
  // Waking pool threads costs tens of microseconds (spinning is often off): small products
  // run on the calling thread.
  int64_t work = 0;
  const bool parallel = !CheckedMul(batch, plan.data_size, &work) || work >= kParallelWork;

  // The one scratch buffer: [Xp (batch x m)] [per low-rank block: batch x rank, at
  // batch x rank_offset] [Yp (batch x n)] [batch x max_rank for the one-pass products].
  int64_t t_total = 0, tsmall = 0, scratch_size = 0;
  const int64_t xp_size = need_xp ? batch * m : 0;
  const int64_t yp_size = need_yp ? batch * n : 0;
  if (!CheckedMul(batch, tables.rank_total, &t_total) || !CheckedMul(batch, tables.max_rank, &tsmall) ||
      !CheckedAdd(xp_size, t_total, &scratch_size) || !CheckedAdd(scratch_size, yp_size, &scratch_size) ||
      !CheckedAdd(scratch_size, tsmall, &scratch_size))
    throw std::bad_alloc();
  std::unique_ptr<float[]> scratch(new float[static_cast<size_t>(std::max<int64_t>(scratch_size, 1))]);
  float* tbuf = scratch.get() + xp_size;
  float* yp = tbuf + t_total;
  auto t_offset = [&](size_t block) { return tables.rank_offset[block] * batch; };

  const int64_t batch_tiles = (batch + kBatchTile - 1) / kBatchTile;
  auto tile_range = [&](int64_t tile, int64_t* b0, int64_t* b1) {
    *b0 = tile * kBatchTile;
    *b1 = std::min(batch, *b0 + kBatchTile);
  };

  View xv{const_cast<float*>(reinterpret_cast<const float*>(x)), m, 1};
  if (transposed) {
    xv = View{scratch.get(), 1, batch};
    const int64_t row_chunks = (m + kTransposeRows - 1) / kTransposeRows;
    RunTasks(ctx, parallel, row_chunks, [&](int64_t chunk) {
      const int64_t i0 = chunk * kTransposeRows, i1 = std::min(m, i0 + kTransposeRows);
      // 16 batch rows at a time: each store run is one contiguous 64-byte line of Xt.
      for (int64_t b0 = 0; b0 < batch; b0 += 16) {
        const int64_t b1 = std::min(batch, b0 + 16);
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t src = plan.has_row_perm ? row_perm[i] : i;
          float* out = xv.p + i * batch;
          for (int64_t b = b0; b < b1; ++b) out[b] = Storage<T>::ToFloat(x[b * m + src]);
        }
      }
    });
  } else if (need_xp) {
    xv = View{scratch.get(), m, 1};
    RunTasks(ctx, parallel, batch_tiles, [&](int64_t tile) {
      int64_t b0, b1;
      tile_range(tile, &b0, &b1);
      for (int64_t b = b0; b < b1; ++b) {
        const T* xr = x + b * m;
        float* out = xv.p + b * m;
        for (int64_t i = 0; i < m; ++i) out[i] = Storage<T>::ToFloat(xr[plan.has_row_perm ? row_perm[i] : i]);
      }
    });
  }
  float* yf = need_yp ? yp : reinterpret_cast<float*>(y);

  if (!parallel && !transposed) {
    SmallProduct(plan, kernels, xv.p, data, batch, yp + yp_size, yf);
    ScatterOutput(plan, yp, col_perm, y, need_yp, 0, batch);
    return;
  }

  // Phase 1: T_b = Xp_b @ U_b per low-rank block and batch tile, largest tasks first.
  // Row layout: T_b[b, k] at t[b * rank + k]; transposed: at t[k * batch + b].
  const int64_t num_tasks = static_cast<int64_t>(tables.lowrank_by_cost.size()) * batch_tiles;
  RunTasks(ctx, parallel, num_tasks, [&](int64_t task) {
    const size_t bi = static_cast<size_t>(tables.lowrank_by_cost[static_cast<size_t>(task / batch_tiles)]);
    const BlockView& blk = plan.blocks[bi];
    int64_t b0, b1;
    tile_range(task % batch_tiles, &b0, &b1);
    const int64_t k = blk.rank, rows = blk.r1 - blk.r0;
    const Raw* u = data + blk.offset;
    if (transposed) {
      float* tb = tbuf + t_offset(bi) + b0;
      for (int64_t kk = 0; kk < k; ++kk) std::fill(tb + kk * batch, tb + kk * batch + (b1 - b0), 0.0f);
      // T^T[k, b] += sum_i U[i, k] * Xt[r0 + i, b]: vectorized over the batch.
      kernels.f32(reinterpret_cast<const float*>(u), 1, k, k, rows, xv.p + blk.r0 * batch + b0, batch, tb, batch,
                  b1 - b0);
    } else {
      float* tb = tbuf + t_offset(bi) + b0 * k;
      std::fill(tb, tb + (b1 - b0) * k, 0.0f);
      Gemm(kernels, xv.p + b0 * xv.ld_b + blk.r0, xv.ld_b, 1, b1 - b0, rows, u, k, tb, k, k);
    }
  });

  // Phase 2: Yp[:, segment] = sum over the blocks covering the segment of T_b @ Vt_b or
  // Xp_b @ D_b. Segments are the column ranges between block edges inside each chunk; a
  // task owns (chunk, batch tile), so no two tasks write the same entries, and each output
  // entry is stored once.
  auto segment_fn = std::is_same<Raw, float>::value ? kernels.segment_f32 : kernels.segment_f16;
  RunTasks(ctx, parallel, tables.col_chunks * batch_tiles, [&](int64_t task) {
    const int64_t c = task / batch_tiles;
    int64_t b0, b1;
    tile_range(task % batch_tiles, &b0, &b1);
    constexpr int64_t kMaxTerms = 32;
    Term terms[kMaxTerms];
    for (int64_t si = tables.chunk_segments[static_cast<size_t>(c)];
         si < tables.chunk_segments[static_cast<size_t>(c) + 1]; ++si) {
      const KernelTables::Segment& seg = tables.segments[static_cast<size_t>(si)];
      float* yt = yf + b0 * n + seg.j0;
      if (seg.begin == seg.end) {
        for (int64_t b = b0; b < b1; ++b) std::fill(yt + (b - b0) * n, yt + (b - b0) * n + (seg.j1 - seg.j0), 0.0f);
        continue;
      }
      for (int64_t g = seg.begin; g < seg.end; g += kMaxTerms) {
        const int64_t count = std::min(kMaxTerms, seg.end - g);
        for (int64_t t = 0; t < count; ++t) {
          const size_t bi = static_cast<size_t>(tables.seg_blocks[static_cast<size_t>(g + t)]);
          const BlockView& blk = plan.blocks[bi];
          const int64_t cols = blk.c1 - blk.c0, rows = blk.r1 - blk.r0;
          Term& term = terms[t];
          if (blk.kind == BlockKind::kLowRank) {
            const float* tb = tbuf + t_offset(bi);
            term.a = transposed ? tb + b0 : tb + b0 * blk.rank;
            term.lda = transposed ? 1 : blk.rank;
            term.ainc = transposed ? batch : 1;
            term.depth = blk.rank;
            term.b = data + blk.offset + rows * blk.rank + (seg.j0 - blk.c0);
          } else {
            term.a = xv.p + b0 * xv.ld_b + blk.r0 * xv.ld_i;
            term.lda = xv.ld_b;
            term.ainc = xv.ld_i;
            term.depth = rows;
            term.b = data + blk.offset + (seg.j0 - blk.c0);
          }
          term.ldb = cols;
        }
        segment_fn(terms, count, b1 - b0, yt, n, seg.j1 - seg.j0, g > seg.begin);
      }
    }
  });

  RunTasks(ctx, parallel, batch_tiles, [&](int64_t tile) {
    int64_t b0, b1;
    tile_range(tile, &b0, &b1);
    ScatterOutput(plan, yp, col_perm, y, need_yp, b0, b1);
  });
}

// One node's CPU kernel. When the packed inputs are constant (initializers of an optimized
// model) the layout is validated and its tables built once, at the first run, and later
// runs only check X.
template <typename T>
class HMatMulCpuKernel {
 public:
  HMatMulCpuKernel(const OrtApi*, const OrtKernelInfo* info) : constant_(PackedInputsConstant(info)) {}

  Ort::Status Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<T>& X, const Ort::Custom::Tensor<T>& data,
                      const Ort::Custom::Tensor<int64_t>& layout, const Ort::Custom::Tensor<int64_t>& row_perm,
                      const Ort::Custom::Tensor<int64_t>& col_perm, Ort::Custom::Tensor<T>& Y) {
    return RunPackedProduct<T>(
        constant_, &cache_, [&] { return MakePackedInputs(X, data, layout, row_perm, col_perm); }, ValidatePacked,
        BuildKernelTables,
        [&](const PackedInputs& in, const PackedPlan& plan, const KernelTables& tables, int64_t batch, T* y) {
          dehm::Compute<T>(ctx, plan, tables, batch, X.Data(), data.Data(), in.row_perm, in.col_perm, y);
        },
        Y);
  }

 private:
  const bool constant_;
  PlanCache<PackedPlan, KernelTables> cache_;
};

}  // namespace

void CreateCpuOps(std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>* ops) {
  ops->emplace_back(Ort::Custom::CreateLiteCustomOp<HMatMulCpuKernel<float>>("HMatMul", "CPUExecutionProvider"));
  ops->emplace_back(
      Ort::Custom::CreateLiteCustomOp<HMatMulCpuKernel<Ort::Float16_t>>("HMatMul", "CPUExecutionProvider"));
}

}  // namespace dehm
