// CPU kernel of HMatMul for layout version 2 (uint8 `data`; dehm_onnx/hmatrix/pack.py): every
// stored array is float32, float16, int8 or int4 with groupwise scales, and is read as stored.
//
// Each term (a dense block D, or one tier U_t, Vt_t of a low-rank block) is multiplied panel
// by panel: a few rows of the array (at most kPanelFloats values, so the panel stays in L1)
// are dequantized into a small per-task scratch, to exactly the values pack.unpack gives
// (fl(q * scale) rounded once to the scale's type), and the float GEMM of gemm.h adds their
// product into the output. No dense copy of the weight is ever made.
// Two phases of independent tasks, run on the onnxruntime intra-op pool when the product is
// large (on the calling thread otherwise):
//   1. for every low-rank tier and batch tile: T_t = Xp[:, rows] @ U_t (own slice of scratch);
//   2. for every output column chunk and batch tile: Yp[:, chunk] = sum over the terms meeting
//      the chunk of T_t @ Vt_t[:, part] or Xp[:, rows] @ D[:, part].
// Xp is X gathered by row_perm and widened to float (or X itself); Yp is scattered into Y by
// col_perm and rounded to T (or is Y).
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
#include "gemm.h"
#include "hmatmul_cpu.h"
#include "kernel_util.h"

namespace dehm {
namespace {

constexpr int64_t kBatchTile = 64;
constexpr int64_t kPanelFloats = 4096;  // dequantized values per panel (16 KB)
constexpr int64_t kParallelWork = int64_t{1} << 19;

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

inline float LoadF32(const uint8_t* p) {
  float v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline float LoadF16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof h);
  return HalfToFloat(h);
}

inline float ScaleAt(const uint8_t* data, const ArrayView& a, int64_t index) {
  return a.scale_elem == Elem::kFloat32 ? LoadF32(data + a.scale_offset + 4 * index)
                                        : LoadF16(data + a.scale_offset + 2 * index);
}

// Integer value `index` (row-major) of an int8 or int4 array, sign-extended.
inline int IntAt(const uint8_t* data, const ArrayView& a, int64_t index) {
  if (a.elem == Elem::kInt8) return static_cast<int8_t>(data[a.offset + index]);
  const uint8_t byte = data[a.offset + index / 2];
  const int nibble = (index & 1) ? byte >> 4 : byte & 15;
  return (nibble ^ 8) - 8;
}

// out[(i - i0) * w + j] = A[i, j0 + j] for i in [i0, i1), j in [0, w): the dequantized values.
void DequantizePanel(const uint8_t* data, const ArrayView& a, int64_t i0, int64_t i1, int64_t j0, int64_t w,
                     float* out) {
  const int64_t n = a.cols;
  for (int64_t i = i0; i < i1; ++i) {
    float* row = out + (i - i0) * w;
    const int64_t base = i * n + j0;
    switch (a.elem) {
      case Elem::kFloat32:
        std::memcpy(row, data + a.offset + 4 * base, static_cast<size_t>(w) * sizeof(float));
        break;
      case Elem::kFloat16:
        for (int64_t j = 0; j < w; ++j) row[j] = LoadF16(data + a.offset + 2 * (base + j));
        break;
      default: {
        const int64_t scale_base = (i / a.group) * n + j0;
        if (a.scale_elem == Elem::kFloat32) {
          for (int64_t j = 0; j < w; ++j)
            row[j] = static_cast<float>(IntAt(data, a, base + j)) * ScaleAt(data, a, scale_base + j);
        } else {
          for (int64_t j = 0; j < w; ++j)
            row[j] = RoundToHalf(static_cast<float>(IntAt(data, a, base + j)) * ScaleAt(data, a, scale_base + j));
        }
      }
    }
  }
}

// y[r, 0:w] += sum_i x[r * ldx + i] * A[i, j0 + j] over rows r < batch, i < a.rows: the product
// with columns [j0, j0 + w) of a stored array, dequantized kPanelFloats values at a time.
void AddProduct(const GemmKernels& kernels, const uint8_t* data, const ArrayView& a, int64_t j0, int64_t w,
                const float* x, int64_t ldx, int64_t batch, float* y, int64_t ldy, std::vector<float>* panel) {
  if (w <= 0 || a.rows <= 0 || batch <= 0) return;
  const int64_t panel_rows = std::max<int64_t>(1, std::min(a.rows, kPanelFloats / w));
  panel->resize(static_cast<size_t>(panel_rows * w));
  for (int64_t i0 = 0; i0 < a.rows; i0 += panel_rows) {
    const int64_t i1 = std::min(a.rows, i0 + panel_rows);
    DequantizePanel(data, a, i0, i1, j0, w, panel->data());
    kernels.f32(x + i0, ldx, 1, batch, i1 - i0, panel->data(), w, y, ldy, w);
  }
}

// Derived from a validated layout, independent of the batch; kept per node with the plan
// when the packed inputs are constant.
struct TablesV2 {
  std::vector<int64_t> rank_offset;  // per term: sum of the ranks of the low-rank terms before it
  int64_t rank_total = 0;
  std::vector<int64_t> lowrank;       // low-rank terms of rank > 0
  int64_t chunk = 0;                  // output columns per phase-2 chunk
  int64_t col_chunks = 0;
  std::vector<int64_t> chunk_terms;   // terms meeting chunk c: chunk_terms[chunk_begin[c], chunk_begin[c + 1])
  std::vector<int64_t> chunk_begin;
};

TablesV2 BuildTablesV2(const PackedPlanV2& plan) {
  TablesV2 t;
  t.rank_offset.assign(plan.terms.size(), 0);
  for (size_t i = 0; i < plan.terms.size(); ++i) {
    const TermView& term = plan.terms[i];
    if (term.kind != BlockKind::kLowRank || term.rank == 0) continue;
    t.rank_offset[i] = t.rank_total;
    if (!CheckedAdd(t.rank_total, term.rank, &t.rank_total)) throw std::bad_alloc();
    t.lowrank.push_back(static_cast<int64_t>(i));
  }
  const int64_t n = plan.n;
  t.chunk = std::max<int64_t>(16, std::min<int64_t>(256, ((n + 15) / 16 + 15) / 16 * 16));
  t.col_chunks = (n + t.chunk - 1) / t.chunk;
  t.chunk_begin.assign(static_cast<size_t>(t.col_chunks) + 1, 0);
  for (int64_t c = 0; c < t.col_chunks; ++c) {
    const int64_t j0 = c * t.chunk, j1 = std::min(n, j0 + t.chunk);
    for (size_t i = 0; i < plan.terms.size(); ++i) {
      const TermView& term = plan.terms[i];
      const bool contributes = term.kind == BlockKind::kDense || term.rank > 0;
      if (contributes && term.c0 < j1 && term.c1 > j0) t.chunk_terms.push_back(static_cast<int64_t>(i));
    }
    t.chunk_begin[static_cast<size_t>(c) + 1] = static_cast<int64_t>(t.chunk_terms.size());
  }
  return t;
}

template <typename T>
void ComputeV2(OrtKernelContext* ctx, const PackedPlanV2& plan, const TablesV2& tables, int64_t batch, const T* x,
               const uint8_t* data, const int64_t* row_perm, const int64_t* col_perm, T* y) {
  constexpr bool kIsFloat = std::is_same<T, float>::value;
  const int64_t m = plan.m, n = plan.n;
  const GemmKernels& kernels = SelectGemmKernels();
  const bool need_xp = plan.has_row_perm || !kIsFloat;
  const bool need_yp = plan.has_col_perm || !kIsFloat;
  int64_t work = 0;
  const bool parallel = !CheckedMul(batch, plan.stored_values, &work) || work >= kParallelWork;

  // Scratch: [Xp (batch x m)] [T_t (batch x rank_t) per low-rank tier] [Yp (batch x n)].
  int64_t t_total = 0, size = 0;
  const int64_t xp_size = need_xp ? batch * m : 0, yp_size = need_yp ? batch * n : 0;
  if (!CheckedMul(batch, tables.rank_total, &t_total) || !CheckedAdd(xp_size, t_total, &size) ||
      !CheckedAdd(size, yp_size, &size))
    throw std::bad_alloc();
  std::unique_ptr<float[]> scratch(new float[static_cast<size_t>(std::max<int64_t>(size, 1))]);
  float* xp = need_xp ? scratch.get() : const_cast<float*>(reinterpret_cast<const float*>(x));
  float* tbuf = scratch.get() + xp_size;
  float* yf = need_yp ? tbuf + t_total : reinterpret_cast<float*>(y);

  const int64_t batch_tiles = (batch + kBatchTile - 1) / kBatchTile;
  auto tile_range = [&](int64_t tile, int64_t* b0, int64_t* b1) {
    *b0 = tile * kBatchTile;
    *b1 = std::min(batch, *b0 + kBatchTile);
  };
  if (need_xp) {
    RunTasks(ctx, parallel, batch_tiles, [&](int64_t tile) {
      int64_t b0, b1;
      tile_range(tile, &b0, &b1);
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t i = 0; i < m; ++i)
          xp[b * m + i] = Storage<T>::ToFloat(x[b * m + (plan.has_row_perm ? row_perm[i] : i)]);
    });
  }

  // Phase 1: T_t = Xp[:, r0:r1] @ U_t, row-major (batch x rank_t) per tier.
  const int64_t num_lowrank = static_cast<int64_t>(tables.lowrank.size());
  RunTasks(ctx, parallel, num_lowrank * batch_tiles, [&](int64_t task) {
    const size_t ti = static_cast<size_t>(tables.lowrank[static_cast<size_t>(task / batch_tiles)]);
    const TermView& term = plan.terms[ti];
    int64_t b0, b1;
    tile_range(task % batch_tiles, &b0, &b1);
    float* tb = tbuf + tables.rank_offset[ti] * batch + b0 * term.rank;
    std::fill(tb, tb + (b1 - b0) * term.rank, 0.0f);
    std::vector<float> panel;
    AddProduct(kernels, data, term.a, 0, term.rank, xp + b0 * m + term.r0, m, b1 - b0, tb, term.rank, &panel);
  });

  // Phase 2: each task owns (column chunk, batch tile) of Yp, so no two tasks write the same entries.
  RunTasks(ctx, parallel, tables.col_chunks * batch_tiles, [&](int64_t task) {
    const int64_t c = task / batch_tiles;
    int64_t b0, b1;
    tile_range(task % batch_tiles, &b0, &b1);
    const int64_t j0 = c * tables.chunk, j1 = std::min(n, j0 + tables.chunk);
    for (int64_t b = b0; b < b1; ++b) std::fill(yf + b * n + j0, yf + b * n + j1, 0.0f);
    std::vector<float> panel;
    for (int64_t k = tables.chunk_begin[static_cast<size_t>(c)]; k < tables.chunk_begin[static_cast<size_t>(c) + 1];
         ++k) {
      const size_t ti = static_cast<size_t>(tables.chunk_terms[static_cast<size_t>(k)]);
      const TermView& term = plan.terms[ti];
      const int64_t s0 = std::max(term.c0, j0), s1 = std::min(term.c1, j1);
      float* yt = yf + b0 * n + s0;
      if (term.kind == BlockKind::kDense) {
        AddProduct(kernels, data, term.a, s0 - term.c0, s1 - s0, xp + b0 * m + term.r0, m, b1 - b0, yt, n, &panel);
      } else {
        const float* tb = tbuf + tables.rank_offset[ti] * batch + b0 * term.rank;
        AddProduct(kernels, data, term.b, s0 - term.c0, s1 - s0, tb, term.rank, b1 - b0, yt, n, &panel);
      }
    }
  });

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
    try {
      PackedInputs in = MakePackedInputs(X, data, layout, row_perm, col_perm);
      in.data_bytes = data.Data();
      Prepared own;
      const Prepared* prepared = &own;
      int64_t batch = 0;
      std::vector<int64_t> y_shape;
      std::string err;
      if (constant_) {
        err = CachedPlan(in, &prepared);
        if (err.empty()) err = ValidateX(in.x_shape, prepared->plan.m, prepared->plan.n, &batch, &y_shape);
      } else {
        err = ValidatePackedV2(in, &own.plan);
        batch = own.plan.batch;
        y_shape = own.plan.y_shape;
      }
      if (!err.empty()) return Ort::Status(err.c_str(), ORT_INVALID_ARGUMENT);
      T* y = Y.Allocate(y_shape);
      if (batch == 0) return Ort::Status{nullptr};
      if (prepared == &own) own.tables = BuildTablesV2(own.plan);
      ComputeV2<T>(ctx, prepared->plan, prepared->tables, batch, X.Data(), data.Data(), in.row_perm, in.col_perm, y);
      return Ort::Status{nullptr};
    } catch (const std::bad_alloc&) {
      return Ort::Status("HMatMul: out of memory for the output or scratch buffer", ORT_FAIL);
    } catch (const std::exception& e) {
      return Ort::Status((std::string("HMatMul: ") + e.what()).c_str(), ORT_RUNTIME_EXCEPTION);
    }
  }

 private:
  struct Prepared {
    PackedPlanV2 plan;
    TablesV2 tables;
  };

  std::string CachedPlan(const PackedInputs& in, const Prepared** prepared) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!ready_) {
      PackedPlanV2 plan;
      std::string err = ValidatePackedV2(in, &plan);
      if (!err.empty()) return err;
      cached_.tables = BuildTablesV2(plan);
      cached_.plan = std::move(plan);
      ready_ = true;
    }
    *prepared = &cached_;
    return "";
  }

  const bool constant_;
  std::mutex mutex_;
  bool ready_ = false;
  Prepared cached_;
};

}  // namespace

void CreateCpuOpsV2(std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>* ops) {
  ops->emplace_back(Ort::Custom::CreateLiteCustomOp<HMatMulCpuKernelV2<float>>("HMatMul", "CPUExecutionProvider"));
  ops->emplace_back(
      Ort::Custom::CreateLiteCustomOp<HMatMulCpuKernelV2<Ort::Float16_t>>("HMatMul", "CPUExecutionProvider"));
}

}  // namespace dehm
