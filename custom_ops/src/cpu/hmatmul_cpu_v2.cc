// CPU kernel of HMatMul for layout version 2 (uint8 `data`; dehm_onnx/hmatrix/pack.py): every
// stored array is float32, float16, int8 or int4 with groupwise scales, and is read as stored.
//
// Each term (a dense block D, or one tier U_t, Vt_t of a low-rank block) is multiplied panel
// by panel: a few rows of the array (at most kPanelFloats values, so the panel stays in L1/L2)
// are dequantized into a small per-task scratch by the row dequantizers of dequant.h, to
// exactly the values pack.unpack gives (fl(q * scale) rounded once to the scale's type), and
// the float GEMM of gemm.h adds their product into the output. No dense copy of the weight is
// ever made.
// Small products (batch x stored values < kParallelWork, batch < kTransposeBatch) take one
// pass over the terms in storage order on the calling thread. Larger ones run two phases of
// independent tasks on the onnxruntime intra-op pool:
//   1. for every low-rank tier and batch tile: T_t = Xp[:, rows] @ U_t (own slice of scratch);
//   2. for every output column chunk and batch tile: Yp[:, chunk] = sum over the terms meeting
//      the chunk of T_t @ Vt_t[:, part] or Xp[:, rows] @ D[:, part].
// From kTransposeBatch rows on, Xp and T are kept batch-major so that X U_t vectorizes over
// the batch. Xp is X gathered by row_perm and widened to float (or X itself); Yp is scattered
// into Y by col_perm and rounded to T (or is Y).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

#include "common/constant_inputs.h"
#include "dehm/layout.h"
#include "dehm/packed.h"
#include "dequant.h"
#include "gemm.h"
#include "hmatmul_cpu.h"
#include "kernel_util.h"

namespace dehm {
namespace {

constexpr int64_t kBatchTile = 64;
constexpr int64_t kTransposeBatch = 16;  // batches at least this wide keep Xp and T batch-major
constexpr int64_t kPanelFloats = 8192;   // dequantized values per panel (32 KB)
constexpr int64_t kStripCols = 256;      // output columns per product call of the one-pass path
constexpr int64_t kParallelWork = int64_t{1} << 19;

// Per-task scratch: the dequantized panel and one row of scales.
struct Scratch {
  std::vector<float> panel;
  std::vector<float> scales;
};

// The rows [i0, i1) x columns [j0, j0 + w) of a stored array as float: a pointer into `data`
// for an aligned float32 array read whole rows at a time, else dequantized into out (row
// stride w).
const float* DequantizePanel(const DequantKernels& dq, const uint8_t* data, const ArrayView& a, int64_t i0, int64_t i1,
                             int64_t j0, int64_t w, float* out, std::vector<float>* scale_row) {
  const int64_t n = a.cols, rows = i1 - i0;
  const int64_t base = i0 * n + j0;
  if (a.elem == Elem::kFloat32) {
    const uint8_t* p = data + a.offset + 4 * base;
    if (w == n && reinterpret_cast<uintptr_t>(p) % alignof(float) == 0) return reinterpret_cast<const float*>(p);
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(out + r * w, p + 4 * r * n, static_cast<size_t>(w) * sizeof(float));
    return out;
  }
  if (a.elem == Elem::kFloat16) {
    dq.half_rows(data + a.offset + 2 * base, n, rows, w, out);
    return out;
  }
  scale_row->resize(static_cast<size_t>(w));
  const bool round_half = a.scale_elem == Elem::kFloat16;
  for (int64_t i = i0; i < i1;) {  // the rows of one group share one row of scales
    const int64_t group = i / a.group, end = std::min(i1, (group + 1) * a.group);
    const int64_t s = group * n + j0;
    if (a.scale_elem == Elem::kFloat32) {
      std::memcpy(scale_row->data(), data + a.scale_offset + 4 * s, static_cast<size_t>(w) * sizeof(float));
    } else {
      dq.half_rows(data + a.scale_offset + 2 * s, w, 1, w, scale_row->data());
    }
    float* o = out + (i - i0) * w;
    if (a.elem == Elem::kInt8) {
      dq.int8_rows(data + a.offset + i * n + j0, n, end - i, w, scale_row->data(), round_half, o);
    } else {
      dq.int4_rows(data + a.offset, i * n + j0, n, end - i, w, scale_row->data(), round_half, o);
    }
    i = end;
  }
  return out;
}

// The left operand of a product: element (r, i) at p[r * ld_r + i * ld_i].
struct Operand {
  const float* p;
  int64_t ld_r;
  int64_t ld_i;
};

// y[r, 0:w] += sum_i lhs(r, i) * A[i, j0 + j] over rows r < rows, i < a.rows: the product with
// columns [j0, j0 + w) of a stored array, dequantized a panel of rows at a time.
void AddProduct(const GemmKernels& kernels, const DequantKernels& dq, const uint8_t* data, const ArrayView& a,
                int64_t j0, int64_t w, Operand lhs, int64_t rows, float* y, int64_t ldy, Scratch* scratch) {
  if (w <= 0 || a.rows <= 0 || rows <= 0) return;
  const int64_t panel_rows = std::max<int64_t>(1, std::min(a.rows, kPanelFloats / w));
  scratch->panel.resize(static_cast<size_t>(panel_rows * w));
  for (int64_t i0 = 0; i0 < a.rows; i0 += panel_rows) {
    const int64_t i1 = std::min(a.rows, i0 + panel_rows);
    const float* b = DequantizePanel(dq, data, a, i0, i1, j0, w, scratch->panel.data(), &scratch->scales);
    kernels.f32(lhs.p + i0 * lhs.ld_i, lhs.ld_r, lhs.ld_i, rows, i1 - i0, b, w, y, ldy, w);
  }
}

// T^T[k, b] += sum_i U[i, k] * Xt[i, b] for the k x width tile at tt (row stride ldt), with
// Xt's rows at xt (row stride ldx): vectorized over the batch, for wide batches.
void AddTransposedLeft(const GemmKernels& kernels, const DequantKernels& dq, const uint8_t* data, const ArrayView& u,
                       const float* xt, int64_t ldx, int64_t width, float* tt, int64_t ldt, Scratch* scratch) {
  const int64_t k = u.cols;
  if (k <= 0 || u.rows <= 0 || width <= 0) return;
  const int64_t panel_rows = std::max<int64_t>(1, std::min(u.rows, kPanelFloats / k));
  scratch->panel.resize(static_cast<size_t>(panel_rows * k));
  for (int64_t i0 = 0; i0 < u.rows; i0 += panel_rows) {
    const int64_t i1 = std::min(u.rows, i0 + panel_rows);
    const float* a = DequantizePanel(dq, data, u, i0, i1, 0, k, scratch->panel.data(), &scratch->scales);
    kernels.f32(a, 1, k, k, i1 - i0, xt + i0 * ldx, ldx, tt, ldt, width);
  }
}

// Derived from a validated layout, independent of the batch; kept per node with the plan
// when the packed inputs are constant.
struct TablesV2 {
  struct Segment {
    int64_t j0, j1, begin, end;  // columns; covering terms seg_terms[begin, end)
  };
  std::vector<int64_t> rank_offset;  // per term: sum of the ranks of the low-rank terms before it
  int64_t rank_total = 0;
  int64_t max_rank = 0;
  std::vector<int64_t> lowrank;       // low-rank terms of rank > 0, largest rows x rank first
  int64_t col_chunks = 0;             // phase-2 tasks
  std::vector<Segment> segments;      // per chunk, the column ranges between term edges
  std::vector<int64_t> seg_terms, chunk_segments;
};

TablesV2 BuildTablesV2(const PackedPlanV2& plan) {
  TablesV2 t;
  t.rank_offset.assign(plan.terms.size(), 0);
  for (size_t i = 0; i < plan.terms.size(); ++i) {
    const TermView& term = plan.terms[i];
    if (term.kind != BlockKind::kLowRank || term.rank == 0) continue;
    t.rank_offset[i] = t.rank_total;
    t.max_rank = std::max(t.max_rank, term.rank);
    if (!CheckedAdd(t.rank_total, term.rank, &t.rank_total)) throw std::bad_alloc();
    t.lowrank.push_back(static_cast<int64_t>(i));
  }
  auto cost = [&](int64_t i) {
    const TermView& term = plan.terms[static_cast<size_t>(i)];
    return (term.r1 - term.r0) * term.rank;
  };
  std::stable_sort(t.lowrank.begin(), t.lowrank.end(), [&](int64_t a, int64_t b) { return cost(a) > cost(b); });
  BuildColumnSegments(plan.terms, plan.n, &t.col_chunks, &t.chunk_segments, &t.segments, &t.seg_terms);
  return t;
}

// Phase 2 of one output segment: the covering terms' parts are dequantized (split into
// pseudo-terms of at most kPanelFloats values) into one slab of at most kSlabFloats values and
// kMaxTerms terms at a time, and each slab is applied to every batch tile with the segment
// kernel, which sums all its terms in registers and stores each output entry once per slab.
class SegmentWriter {
 public:
  static constexpr int64_t kMaxTerms = 32;
  static constexpr int64_t kSlabFloats = 65536;

  SegmentWriter(const GemmKernels& kernels, const DequantKernels& dq, const uint8_t* data, int64_t batch, int64_t n,
                float* y)
      : kernels_(kernels), dq_(dq), data_(data), batch_(batch), n_(n), y_(y) {
    slab_.resize(static_cast<size_t>(kSlabFloats));
  }

  void Begin(int64_t j0, int64_t j1) {
    j0_ = j0;
    w_ = j1 - j0;
    count_ = 0;
    used_ = 0;
    flushed_ = false;
  }

  // Adds lhs @ A[:, part] for the part of A's columns under the segment (column c0 of the term
  // is at segment column j0_ - c0 of A); lhs(b, i) at base + b * ld_b + i * ld_i with b the
  // batch row.
  void Add(const ArrayView& a, int64_t col, const float* base, int64_t ld_b, int64_t ld_i) {
    const int64_t panel_rows = std::max<int64_t>(1, std::min(a.rows, kPanelFloats / w_));
    for (int64_t i0 = 0; i0 < a.rows; i0 += panel_rows) {
      const int64_t i1 = std::min(a.rows, i0 + panel_rows);
      if (count_ == kMaxTerms || used_ + (i1 - i0) * w_ > kSlabFloats) Flush();
      float* out = slab_.data() + used_;
      const float* b = DequantizePanel(dq_, data_, a, i0, i1, col, w_, out, &scales_);
      if (b == out) used_ += (i1 - i0) * w_;
      pending_[count_++] = Pending{base + i0 * ld_i, ld_b, ld_i, i1 - i0, b};
    }
  }

  // Writes what is left (zeros for a segment no term covers).
  void End() {
    if (count_ > 0 || !flushed_) Flush();
  }

 private:
  struct Pending {
    const float* a;
    int64_t ld_b, ld_i, depth;
    const float* b;
  };

  void Flush() {
    Term terms[kMaxTerms];
    for (int64_t b0 = 0; b0 < batch_; b0 += kBatchTile) {
      const int64_t rows = std::min(kBatchTile, batch_ - b0);
      for (int64_t t = 0; t < count_; ++t) {
        const Pending& p = pending_[t];
        terms[t] = Term{p.a + b0 * p.ld_b, p.ld_b, p.ld_i, p.depth, p.b, w_};
      }
      float* yt = y_ + b0 * n_ + j0_;
      if (count_ == 0) {
        for (int64_t r = 0; r < rows; ++r) std::fill(yt + r * n_, yt + r * n_ + w_, 0.0f);
      } else {
        kernels_.segment_f32(terms, count_, rows, yt, n_, w_, flushed_);
      }
    }
    flushed_ = true;
    count_ = 0;
    used_ = 0;
  }

  const GemmKernels& kernels_;
  const DequantKernels& dq_;
  const uint8_t* data_;
  const int64_t batch_, n_;
  float* y_;
  std::vector<float> slab_, scales_;
  Pending pending_[kMaxTerms];
  int64_t j0_ = 0, w_ = 0, count_ = 0, used_ = 0;
  bool flushed_ = false;
};

// Small products: every term in storage order on the calling thread, so `data` is read as
// one forward stream; tsmall holds batch x max_rank floats.
void OnePass(const PackedPlanV2& plan, const GemmKernels& kernels, const DequantKernels& dq, const uint8_t* data,
             const float* xp, int64_t batch, float* tsmall, float* y) {
  const int64_t m = plan.m, n = plan.n;
  std::fill(y, y + batch * n, 0.0f);
  Scratch scratch;
  for (const TermView& term : plan.terms) {
    const int64_t cols = term.c1 - term.c0;
    Operand lhs{xp + term.r0, m, 1};
    const ArrayView* right = &term.a;
    if (term.kind == BlockKind::kLowRank) {
      if (term.rank == 0) continue;
      std::fill(tsmall, tsmall + batch * term.rank, 0.0f);
      AddProduct(kernels, dq, data, term.a, 0, term.rank, lhs, batch, tsmall, term.rank, &scratch);
      lhs = Operand{tsmall, term.rank, 1};
      right = &term.b;
    }
    for (int64_t j0 = 0; j0 < cols; j0 += kStripCols) {
      const int64_t w = std::min(kStripCols, cols - j0);
      AddProduct(kernels, dq, data, *right, j0, w, lhs, batch, y + term.c0 + j0, n, &scratch);
    }
  }
}

template <typename T>
void ComputeV2(OrtKernelContext* ctx, const PackedPlanV2& plan, const TablesV2& tables, int64_t batch, const T* x,
               const uint8_t* data, const int64_t* row_perm, const int64_t* col_perm, T* y) {
  constexpr bool kIsFloat = std::is_same<T, float>::value;
  const int64_t m = plan.m, n = plan.n;
  const GemmKernels& kernels = SelectGemmKernels();
  const DequantKernels& dq = SelectDequantKernels();
  // Batch-major ("transposed") Xp and T once the batch is wide enough to vectorize over it.
  const bool transposed = batch >= kTransposeBatch;
  const bool need_xp = transposed || plan.has_row_perm || !kIsFloat;
  const bool need_yp = plan.has_col_perm || !kIsFloat;
  int64_t work = 0;
  const bool parallel = !CheckedMul(batch, plan.stored_values, &work) || work >= kParallelWork;

  // Scratch: [Xp (batch x m)] [T_t (batch x rank_t) per low-rank tier] [Yp (batch x n)]
  // [batch x max_rank for the one-pass products].
  int64_t t_total = 0, tsmall = 0, size = 0;
  const int64_t xp_size = need_xp ? batch * m : 0, yp_size = need_yp ? batch * n : 0;
  if (!CheckedMul(batch, tables.rank_total, &t_total) || !CheckedMul(batch, tables.max_rank, &tsmall) ||
      !CheckedAdd(xp_size, t_total, &size) || !CheckedAdd(size, yp_size, &size) || !CheckedAdd(size, tsmall, &size))
    throw std::bad_alloc();
  std::unique_ptr<float[]> scratch(new float[static_cast<size_t>(std::max<int64_t>(size, 1))]);
  float* xp = need_xp ? scratch.get() : const_cast<float*>(reinterpret_cast<const float*>(x));
  float* tbuf = scratch.get() + xp_size;
  float* yp = tbuf + t_total;
  float* yf = need_yp ? yp : reinterpret_cast<float*>(y);

  const int64_t batch_tiles = (batch + kBatchTile - 1) / kBatchTile;
  auto tile_range = [&](int64_t tile, int64_t* b0, int64_t* b1) {
    *b0 = tile * kBatchTile;
    *b1 = std::min(batch, *b0 + kBatchTile);
  };
  auto source = [&](int64_t i) { return plan.has_row_perm ? row_perm[i] : i; };
  if (transposed) {  // Xt[i, b] at xp[i * batch + b], 64 rows of Xt a task
    RunTasks(ctx, parallel, (m + 63) / 64, [&](int64_t chunk) {
      const int64_t i0 = chunk * 64, i1 = std::min(m, i0 + 64);
      for (int64_t b0 = 0; b0 < batch; b0 += 16) {  // 16 batch rows: each store run is one cache line
        const int64_t b1 = std::min(batch, b0 + 16);
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t src = source(i);
          for (int64_t b = b0; b < b1; ++b) xp[i * batch + b] = Storage<T>::ToFloat(x[b * m + src]);
        }
      }
    });
  } else if (need_xp) {
    RunTasks(ctx, parallel, batch_tiles, [&](int64_t tile) {
      int64_t b0, b1;
      tile_range(tile, &b0, &b1);
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t i = 0; i < m; ++i) xp[b * m + i] = Storage<T>::ToFloat(x[b * m + source(i)]);
    });
  }

  if (!parallel && !transposed) {
    OnePass(plan, kernels, dq, data, xp, batch, yp + yp_size, yf);
  } else {
    // Phase 1: T_t = Xp[:, r0:r1] @ U_t per tier and batch tile; T_t[b, k] at
    // tbuf[rank_offset * batch + b * rank + k], transposed at [... + k * batch + b].
    const int64_t num_lowrank = static_cast<int64_t>(tables.lowrank.size());
    RunTasks(ctx, parallel, num_lowrank * batch_tiles, [&](int64_t task) {
      const size_t ti = static_cast<size_t>(tables.lowrank[static_cast<size_t>(task / batch_tiles)]);
      const TermView& term = plan.terms[ti];
      int64_t b0, b1;
      tile_range(task % batch_tiles, &b0, &b1);
      Scratch local;
      float* t = tbuf + tables.rank_offset[ti] * batch;
      if (transposed) {
        for (int64_t k = 0; k < term.rank; ++k) std::fill(t + k * batch + b0, t + k * batch + b1, 0.0f);
        AddTransposedLeft(kernels, dq, data, term.a, xp + term.r0 * batch + b0, batch, b1 - b0, t + b0, batch, &local);
      } else {
        float* tb = t + b0 * term.rank;
        std::fill(tb, tb + (b1 - b0) * term.rank, 0.0f);
        AddProduct(kernels, dq, data, term.a, 0, term.rank, Operand{xp + b0 * m + term.r0, m, 1}, b1 - b0, tb,
                   term.rank, &local);
      }
    });

    // Phase 2: each task owns one column chunk of Yp (every batch row), so no two tasks write
    // the same entries and each dequantized slab serves the whole batch.
    RunTasks(ctx, parallel, tables.col_chunks, [&](int64_t c) {
      SegmentWriter writer(kernels, dq, data, batch, n, yf);
      for (int64_t si = tables.chunk_segments[static_cast<size_t>(c)];
           si < tables.chunk_segments[static_cast<size_t>(c) + 1]; ++si) {
        const TablesV2::Segment& seg = tables.segments[static_cast<size_t>(si)];
        writer.Begin(seg.j0, seg.j1);
        for (int64_t k = seg.begin; k < seg.end; ++k) {
          const size_t ti = static_cast<size_t>(tables.seg_terms[static_cast<size_t>(k)]);
          const TermView& term = plan.terms[ti];
          if (term.kind == BlockKind::kDense) {
            if (transposed) writer.Add(term.a, seg.j0 - term.c0, xp + term.r0 * batch, 1, batch);
            else writer.Add(term.a, seg.j0 - term.c0, xp + term.r0, m, 1);
          } else {
            const float* t = tbuf + tables.rank_offset[ti] * batch;
            if (transposed) writer.Add(term.b, seg.j0 - term.c0, t, 1, batch);
            else writer.Add(term.b, seg.j0 - term.c0, t, term.rank, 1);
          }
        }
        writer.End();
      }
    });
  }

  if (!need_yp) return;
  RunTasks(ctx, parallel, batch_tiles, [&](int64_t tile) {
    int64_t b0, b1;
    tile_range(tile, &b0, &b1);
    for (int64_t b = b0; b < b1; ++b) {
      const float* in = yf + b * n;
      T* out = y + b * n;
      for (int64_t j = 0; j < n; ++j) out[plan.has_col_perm ? col_perm[j] : j] = Storage<T>::FromFloat(in[j]);
    }
  });
}

// One node's layout-v2 CPU kernel; like the version-1 kernel, it validates constant packed
// inputs and builds their tables once, at the first run whose inputs pass.
template <typename T>
class HMatMulCpuKernelV2 {
 public:
  HMatMulCpuKernelV2(const OrtApi*, const OrtKernelInfo* info) : constant_(PackedInputsConstant(info)) {}

  Ort::Status Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<T>& X, const Ort::Custom::Tensor<uint8_t>& data,
                      const Ort::Custom::Tensor<int64_t>& layout, const Ort::Custom::Tensor<int64_t>& row_perm,
                      const Ort::Custom::Tensor<int64_t>& col_perm, Ort::Custom::Tensor<T>& Y) {
    auto make_inputs = [&] {
      PackedInputs in = MakePackedInputs(X, data, layout, row_perm, col_perm);
      in.data_bytes = data.Data();
      return in;
    };
    return RunPackedProduct<T>(
        constant_, &cache_, make_inputs, ValidatePackedV2, BuildTablesV2,
        [&](const PackedInputs& in, const PackedPlanV2& plan, const TablesV2& tables, int64_t batch, T* y) {
          ComputeV2<T>(ctx, plan, tables, batch, X.Data(), data.Data(), in.row_perm, in.col_perm, y);
        },
        Y);
  }

 private:
  const bool constant_;
  PlanCache<PackedPlanV2, TablesV2> cache_;
};

}  // namespace

void CreateCpuOpsV2(std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>* ops) {
  ops->emplace_back(Ort::Custom::CreateLiteCustomOp<HMatMulCpuKernelV2<float>>("HMatMul", "CPUExecutionProvider"));
  ops->emplace_back(
      Ort::Custom::CreateLiteCustomOp<HMatMulCpuKernelV2<Ort::Float16_t>>("HMatMul", "CPUExecutionProvider"));
}

}  // namespace dehm
