// The packed H-matrix layout read by the HMatMul kernels.
//
// The layout is defined once, in dehm_onnx/hmatrix/pack.py (module docstring, layout
// version 1); the op contract (input order, dtypes, output shape) is in
// dehm_onnx/ops/hmatmul.py. This header only names the layout columns for C++:
// `layout` is an int64 tensor of shape (num_blocks, kLayoutColumns), one row per block,
// with the columns below; `data` holds the payloads at each row's kOffset.
#pragma once

#include <cstdint>

namespace dehm {

constexpr int64_t kLayoutVersion = 1;
constexpr int64_t kLayoutColumns = 7;

// Column indices of one layout row.
constexpr int64_t kKind = 0;
constexpr int64_t kRow0 = 1;
constexpr int64_t kRow1 = 2;
constexpr int64_t kCol0 = 3;
constexpr int64_t kCol1 = 4;
constexpr int64_t kRank = 5;
constexpr int64_t kOffset = 6;

// Values of the kKind column (BlockKind in dehm_onnx/hmatrix/hmatrix.py).
enum class BlockKind : int64_t { kZero = 0, kDense = 1, kLowRank = 2 };

}  // namespace dehm
