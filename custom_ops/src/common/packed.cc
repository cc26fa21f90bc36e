#include "dehm/packed.h"

#include <algorithm>
#include <limits>
#include <sstream>

namespace dehm {

bool CheckedMul(int64_t a, int64_t b, int64_t* out) {
  if (a < 0 || b < 0) return false;
  if (a != 0 && b > std::numeric_limits<int64_t>::max() / a) return false;
  *out = a * b;
  return true;
}

bool CheckedAdd(int64_t a, int64_t b, int64_t* out) {
  if (a < 0 || b < 0) return false;
  if (b > std::numeric_limits<int64_t>::max() - a) return false;
  *out = a + b;
  return true;
}

namespace {

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << (shape.size() == 1 ? ",)" : ")");
  return s.str();
}

std::string Fail(const std::string& what) { return "HMatMul: " + what; }

// Validates one layout row; fills `b` and the payload size.
std::string CheckRow(const int64_t* row, int64_t i, int64_t data_size, BlockView* b) {
  const int64_t kind = row[kKind];
  b->r0 = row[kRow0];
  b->r1 = row[kRow1];
  b->c0 = row[kCol0];
  b->c1 = row[kCol1];
  b->offset = row[kOffset];
  b->rank = 0;
  auto where = [i] { return "layout row " + std::to_string(i) + ": "; };  // built only on error
  if (!(0 <= b->r0 && b->r0 < b->r1) || !(0 <= b->c0 && b->c0 < b->c1)) {
    std::ostringstream s;
    s << where() << "empty or negative ranges rows [" << b->r0 << ", " << b->r1 << ") cols [" << b->c0
      << ", " << b->c1 << ")";
    return Fail(s.str());
  }
  const int64_t rows = b->r1 - b->r0, cols = b->c1 - b->c0;
  int64_t size = 0;
  if (kind == static_cast<int64_t>(BlockKind::kZero)) {
    b->kind = BlockKind::kZero;
  } else if (kind == static_cast<int64_t>(BlockKind::kDense)) {
    b->kind = BlockKind::kDense;
    if (!CheckedMul(rows, cols, &size)) return Fail(where() + "dense payload size overflows int64");
  } else if (kind == static_cast<int64_t>(BlockKind::kLowRank)) {
    b->kind = BlockKind::kLowRank;
    b->rank = row[kRank];
    int64_t rc = 0;
    if (b->rank < 0) return Fail(where() + "negative rank " + std::to_string(b->rank));
    if (!CheckedAdd(rows, cols, &rc) || !CheckedMul(b->rank, rc, &size))
      return Fail(where() + "low-rank payload size overflows int64");
  } else {
    return Fail(where() + "unknown block kind " + std::to_string(kind) + " (expected 0 zero, 1 dense, 2 low-rank)");
  }
  if ((b->offset < 0 || size > data_size || b->offset > data_size - size)) {
    std::ostringstream s;
    s << where() << "payload [" << b->offset << ", offset + " << size << ") lies outside data of size "
      << data_size;
    return Fail(s.str());
  }
  return "";
}

// Checks a permutation of 0..size-1 (or length 0 = identity), using `seen` as scratch.
std::string CheckPerm(const char* name, const std::vector<int64_t>& shape, const int64_t* perm, int64_t size,
                      std::vector<unsigned char>* seen, bool* present) {
  if (shape.size() != 1)
    return Fail(std::string(name) + " must be 1-D, got shape " + ShapeString(shape));
  if (shape[0] == 0) {
    *present = false;
    return "";
  }
  if (shape[0] != size) {
    return Fail(std::string(name) + " must have length 0 or " + std::to_string(size) + ", got " +
                std::to_string(shape[0]));
  }
  seen->assign(static_cast<size_t>(size), 0);
  for (int64_t i = 0; i < size; ++i) {
    const int64_t p = perm[i];
    if (p < 0 || p >= size) {
      return Fail(std::string(name) + "[" + std::to_string(i) + "] = " + std::to_string(p) + " is outside [0, " +
                  std::to_string(size) + ")");
    }
    if ((*seen)[static_cast<size_t>(p)]) {
      return Fail(std::string(name) + " is not a permutation: " + std::to_string(p) + " appears twice");
    }
    (*seen)[static_cast<size_t>(p)] = 1;
  }
  *present = true;
  return "";
}

}  // namespace

std::string ValidatePacked(const PackedInputs& in, PackedPlan* plan) {
  if (in.x_shape.empty()) return Fail("X must have rank >= 1, got a scalar");
  for (int64_t d : in.x_shape)
    if (d < 0) return Fail("X has a negative dimension in shape " + ShapeString(in.x_shape));
  if (in.data_shape.size() != 1) return Fail("data must be 1-D, got shape " + ShapeString(in.data_shape));
  if (in.layout_shape.size() != 2 || in.layout_shape[1] != kLayoutColumns) {
    return Fail("layout must have shape (num_blocks, " + std::to_string(kLayoutColumns) + "), got " +
                ShapeString(in.layout_shape));
  }
  const int64_t num_blocks = in.layout_shape[0];
  if (num_blocks <= 0) return Fail("layout has no blocks");
  const int64_t data_size = in.data_shape[0];

  plan->blocks.resize(static_cast<size_t>(num_blocks));
  int64_t m = 0, n = 0;
  for (int64_t i = 0; i < num_blocks; ++i) {
    std::string err = CheckRow(in.layout + i * kLayoutColumns, i, data_size, &plan->blocks[static_cast<size_t>(i)]);
    if (!err.empty()) return err;
    m = std::max(m, plan->blocks[static_cast<size_t>(i)].r1);
    n = std::max(n, plan->blocks[static_cast<size_t>(i)].c1);
  }
  std::string x_err = ValidateX(in.x_shape, m, n, &plan->batch, &plan->y_shape);
  if (!x_err.empty()) return x_err;
  int64_t total = 0, area = 0;
  if (!CheckedMul(m, n, &total)) return Fail("matrix shape overflows int64");
  for (const BlockView& b : plan->blocks) {
    int64_t a = 0;
    CheckedMul(b.r1 - b.r0, b.c1 - b.c0, &a);  // cannot overflow: a <= m * n
    if (a > total - area) return Fail("blocks overlap: they cover more than " + std::to_string(m) + "x" + std::to_string(n) + " entries");
    area += a;
  }
  if (area != total) {
    return Fail("blocks cover " + std::to_string(area) + " entries, expected " + std::to_string(m) + "x" +
                std::to_string(n) + "=" + std::to_string(total));
  }
  std::vector<unsigned char> seen;
  std::string err = CheckPerm("row_perm", in.row_perm_shape, in.row_perm, m, &seen, &plan->has_row_perm);
  if (!err.empty()) return err;
  err = CheckPerm("col_perm", in.col_perm_shape, in.col_perm, n, &seen, &plan->has_col_perm);
  if (!err.empty()) return err;

  plan->m = m;
  plan->n = n;
  plan->data_size = data_size;
  return "";
}

std::string ValidateX(const std::vector<int64_t>& x_shape, int64_t m, int64_t n, int64_t* batch,
                      std::vector<int64_t>* y_shape) {
  if (x_shape.empty()) return Fail("X must have rank >= 1, got a scalar");
  for (int64_t d : x_shape)
    if (d < 0) return Fail("X has a negative dimension in shape " + ShapeString(x_shape));
  if (x_shape.back() != m) {
    return Fail("X has last dimension " + std::to_string(x_shape.back()) + " but the layout's rows span " +
                std::to_string(m) + " (X shape " + ShapeString(x_shape) + ")");
  }
  int64_t rows = 1;
  for (size_t d = 0; d + 1 < x_shape.size(); ++d) {
    if (!CheckedMul(rows, x_shape[d], &rows)) return Fail("X batch size overflows int64");
  }
  int64_t y_size = 0;
  if (!CheckedMul(rows, n, &y_size)) return Fail("output size overflows int64");
  *batch = rows;
  y_shape->assign(x_shape.begin(), x_shape.end());
  y_shape->back() = n;
  return "";
}

}  // namespace dehm
