// Validation of a packed H-matrix before any kernel reads it (CPU and CUDA share it).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "dehm/layout.h"

namespace dehm {

// One validated block, with sizes already computed.
struct BlockView {
  BlockKind kind;
  int64_t r0, r1, c0, c1;
  int64_t rank;    // low-rank blocks: k >= 0; others: 0
  int64_t offset;  // payload start in `data`
};

// Host views of the op inputs (layout and permutations must be host memory).
struct PackedInputs {
  std::vector<int64_t> x_shape;
  std::vector<int64_t> data_shape;
  std::vector<int64_t> layout_shape;
  std::vector<int64_t> row_perm_shape;
  std::vector<int64_t> col_perm_shape;
  const int64_t* layout = nullptr;
  const uint8_t* data_bytes = nullptr;  // layout v2 only: `data` (host memory)
  const int64_t* row_perm = nullptr;
  const int64_t* col_perm = nullptr;
};

// Shapes and host pointers of the five op inputs (X, data, layout, row_perm, col_perm);
// works with any tensor type that has Shape() and Data(), such as Ort::Custom::Tensor.
template <class XTensor, class DataTensor, class IndexTensor>
PackedInputs MakePackedInputs(const XTensor& x, const DataTensor& data, const IndexTensor& layout,
                              const IndexTensor& row_perm, const IndexTensor& col_perm) {
  PackedInputs in;
  in.x_shape = x.Shape();
  in.data_shape = data.Shape();
  in.layout_shape = layout.Shape();
  in.row_perm_shape = row_perm.Shape();
  in.col_perm_shape = col_perm.Shape();
  in.layout = layout.Data();
  in.row_perm = row_perm.Data();
  in.col_perm = col_perm.Data();
  return in;
}

// What the kernels need after validation.
struct PackedPlan {
  int64_t batch = 0;  // product of X's leading dimensions
  int64_t m = 0;
  int64_t n = 0;
  int64_t data_size = 0;  // elements of `data` (stored parameters)
  bool has_row_perm = false;
  bool has_col_perm = false;
  std::vector<BlockView> blocks;
  std::vector<int64_t> y_shape;
};

// Checks ranks, shapes, layout rows (kinds, ranges inside [0,m)x[0,n), payload bounds with
// overflow-safe int64 arithmetic, exact area) and permutations. Returns "" and fills `plan`
// on success, else a one-line message naming the problem. Never reads outside the inputs.
std::string ValidatePacked(const PackedInputs& in, PackedPlan* plan);

// The X part of ValidatePacked for an already validated m x n layout: rank >= 1, no
// negative dimension, last dimension m, batch and output sizes within int64. Fills `batch`
// and `y_shape` (X's shape with the last dimension n).
std::string ValidateX(const std::vector<int64_t>& x_shape, int64_t m, int64_t n, int64_t* batch,
                      std::vector<int64_t>* y_shape);

// One stored array of a layout-v2 term: rows x cols values of `elem` at byte `offset`; for
// the integer elements, ceil(rows / group) x cols scales of `scale_elem` at `scale_offset`.
struct ArrayView {
  Elem elem = Elem::kFloat32;
  Elem scale_elem = Elem::kFloat32;
  int64_t group = 0;
  int64_t offset = 0;
  int64_t scale_offset = 0;
  int64_t rows = 0;
  int64_t cols = 0;
};

// One validated layout-v2 row: a dense block (a = D) or one tier of a low-rank block
// (a = U_t, b = Vt_t, rank = k_t).
struct TermView {
  BlockKind kind;
  int64_t r0, r1, c0, c1;
  int64_t rank;
  ArrayView a, b;
};

// What the layout-v2 kernels need after validation.
struct PackedPlanV2 {
  int64_t batch = 0;
  int64_t m = 0;
  int64_t n = 0;
  int64_t stored_values = 0;  // sum of rows x cols over every array (for the work estimate)
  bool has_row_perm = false;
  bool has_col_perm = false;
  std::vector<TermView> terms;  // the term rows after the shape row
  std::vector<int64_t> y_shape;
};

// ValidatePacked for layout version 2 (data is uint8 bytes; in.data_shape counts bytes):
// ranks and shapes, the shape row, every term row's kind, ranges and format codes, every
// array's payload and scales inside data at aligned offsets (overflow-safe), int8 values in
// [-127, 127] (reads in.data_bytes), X, permutations.
std::string ValidatePackedV2(const PackedInputs& in, PackedPlanV2* plan);

// a * b, or false when it would overflow int64 (a, b >= 0).
bool CheckedMul(int64_t a, int64_t b, int64_t* out);
// a + b, or false when it would overflow int64 (a, b >= 0).
bool CheckedAdd(int64_t a, int64_t b, int64_t* out);

}  // namespace dehm
