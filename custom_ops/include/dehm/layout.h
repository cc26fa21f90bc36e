// The packed H-matrix layout read by the HMatMul kernels.
//
// The layout is defined once, in dehm_onnx/hmatrix/pack.py (module docstring, layout
// versions 1 and 2); the op contract (input order, dtypes, output shape) is in
// dehm_onnx/ops/hmatmul.py. This header only names the layout columns for C++.
// The type of `data` selects the version (one HMatMul op, one kernel per type pair):
//   data of X's type T -> version 1: `layout` is int64 (num_blocks, kLayoutColumns), one row
//     per block; `data` holds the payloads in T at each row's kOffset.
//   data uint8 -> version 2: `layout` is int64 (num_rows, kLayoutV2Columns): a shape row, then
//     one row per term (a dense block or one tier of a low-rank block; zero blocks have none);
//     each stored array is described by a format code (ELEM + 16 * SCALE_ELEM + 256 * GROUP)
//     and its place in `data`.
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

// Layout version 2 (kKind .. kRank as above). Row 0 is the shape row (kind kShapeKind,
// kRow1 = m, kCol1 = n); every other row is a dense block or one tier of a low-rank block.
constexpr int64_t kLayoutV2Columns = 8;
constexpr int64_t kFormats = 6;     // A_FORMAT + 65536 * B_FORMAT (B: Vt_t of a low-rank tier)
constexpr int64_t kByteOffset = 7;  // where A starts; B starts at the next kAlign multiple after A
constexpr int64_t kShapeKind = 3;
constexpr int64_t kAlign = 16;  // every array and every scale table starts at a multiple

// Element types of a stored array or its scales (Elem in pack.py).
enum class Elem : int64_t { kFloat32 = 0, kFloat16 = 1, kInt8 = 2, kInt4 = 3 };

}  // namespace dehm
