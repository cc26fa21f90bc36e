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

namespace {

// Bytes of `count` values of `elem`, or false on overflow.
bool ElemBytes(Elem elem, int64_t count, int64_t* out) {
  switch (elem) {
    case Elem::kFloat32: return CheckedMul(count, 4, out);
    case Elem::kFloat16: return CheckedMul(count, 2, out);
    case Elem::kInt8: *out = count; return true;
    case Elem::kInt4: *out = count / 2 + count % 2; return true;
  }
  return false;
}

bool AlignUp(int64_t v, int64_t* out) {
  if (!CheckedAdd(v, kAlign - 1, out)) return false;
  *out -= *out % kAlign;
  return true;
}

// Decodes and bounds-checks one array of a layout-v2 row; sets *end to where its bytes end.
std::string CheckArray(int64_t i, const char* name, int64_t code, int64_t offset, int64_t rows, int64_t cols,
                       int64_t data_size, ArrayView* a, int64_t* end_out) {
  auto where = [&] { return "layout row " + std::to_string(i) + ": array " + name + ": "; };
  const int64_t elem = code & 15, scale = (code >> 4) & 15, group = code >> 8;
  if (code < 0 || elem > static_cast<int64_t>(Elem::kInt4))
    return Fail(where() + "unknown format " + std::to_string(code) + " (element " + std::to_string(elem) + ")");
  a->elem = static_cast<Elem>(elem);
  a->rows = rows;
  a->cols = cols;
  a->offset = offset;
  a->group = 0;
  a->scale_offset = 0;
  a->scale_elem = Elem::kFloat32;
  const bool is_int = a->elem == Elem::kInt8 || a->elem == Elem::kInt4;
  if (!is_int && code != elem)
    return Fail(where() + "format " + std::to_string(code) + ": a float element has no scale element or group");
  if (is_int) {
    if (scale > 1 || (group != 16 && group != 32 && group != 64 && group != 128)) {
      return Fail(where() + "format " + std::to_string(code) + ": scale element " + std::to_string(scale) +
                  " must be 0 or 1 and group " + std::to_string(group) + " one of 16, 32, 64, 128");
    }
    a->scale_elem = static_cast<Elem>(scale);
    a->group = group;
  }
  if (offset < 0 || offset % kAlign != 0)
    return Fail(where() + "offset " + std::to_string(offset) + " is not a non-negative multiple of " +
                std::to_string(kAlign));
  int64_t count = 0, bytes = 0, end = 0;
  bool ok = CheckedMul(rows, cols, &count) && ElemBytes(a->elem, count, &bytes) && CheckedAdd(offset, bytes, &end);
  if (ok && is_int) {
    const int64_t groups = rows / group + (rows % group != 0);
    int64_t scale_count = 0, scale_bytes = 0;
    ok = AlignUp(end, &a->scale_offset) && CheckedMul(groups, cols, &scale_count) &&
         ElemBytes(a->scale_elem, scale_count, &scale_bytes) && CheckedAdd(a->scale_offset, scale_bytes, &end);
  }
  if (!ok) return Fail(where() + "size overflows int64");
  if (end > data_size) {
    return Fail(where() + "bytes [" + std::to_string(offset) + ", " + std::to_string(end) +
                ") outside data of " + std::to_string(data_size) + " bytes");
  }
  *end_out = end;
  return "";
}

// Rejects the int8 value -128 (byte 0x80) in an int8 array: symmetric int8 is [-127, 127].
std::string CheckInt8(int64_t i, const char* name, const ArrayView& a, const uint8_t* data) {
  if (a.elem != Elem::kInt8) return "";
  const int64_t count = a.rows * a.cols;  // checked in CheckArray
  for (int64_t k = 0; k < count; ++k) {
    if (data[a.offset + k] == 0x80) {
      return Fail("layout row " + std::to_string(i) + ": array " + name +
                  ": holds the int8 value -128 (symmetric int8 is [-127, 127])");
    }
  }
  return "";
}

// Validates one layout-v2 term row (a dense block or a low-rank tier) into `t`.
std::string CheckRowV2(const int64_t* row, int64_t i, int64_t m, int64_t n, const uint8_t* data, int64_t data_size,
                       TermView* t) {
  t->r0 = row[kRow0];
  t->r1 = row[kRow1];
  t->c0 = row[kCol0];
  t->c1 = row[kCol1];
  t->rank = row[kRank];
  auto where = [i] { return "layout row " + std::to_string(i) + ": "; };
  const int64_t kind = row[kKind];
  if (kind != static_cast<int64_t>(BlockKind::kDense) && kind != static_cast<int64_t>(BlockKind::kLowRank))
    return Fail(where() + "unknown block kind " + std::to_string(kind) + " (a version-2 term is 1 dense or 2 low-rank)");
  t->kind = static_cast<BlockKind>(kind);
  if (!(0 <= t->r0 && t->r0 < t->r1 && t->r1 <= m) || !(0 <= t->c0 && t->c0 < t->c1 && t->c1 <= n)) {
    std::ostringstream s;
    s << where() << "bad ranges rows [" << t->r0 << ", " << t->r1 << ") cols [" << t->c0 << ", " << t->c1
      << ") for shape (" << m << ", " << n << ")";
    return Fail(s.str());
  }
  const int64_t formats = row[kFormats];
  if (formats < 0) return Fail(where() + "negative formats " + std::to_string(formats));
  const int64_t a_fmt = formats & 0xFFFF, b_fmt = formats >> 16;
  const int64_t rows = t->r1 - t->r0, cols = t->c1 - t->c0;
  int64_t end = 0;
  if (t->kind == BlockKind::kDense) {
    if (t->rank != 0 || b_fmt != 0)
      return Fail(where() + "a dense block has rank 0 and no B format, got rank " + std::to_string(t->rank) +
                  ", B format " + std::to_string(b_fmt));
    std::string err = CheckArray(i, "D", a_fmt, row[kByteOffset], rows, cols, data_size, &t->a, &end);
    return err.empty() ? CheckInt8(i, "D", t->a, data) : err;
  }
  if (t->rank < 0) return Fail(where() + "negative rank " + std::to_string(t->rank));
  int64_t b_offset = 0;
  std::string err = CheckArray(i, "U", a_fmt, row[kByteOffset], rows, t->rank, data_size, &t->a, &end);
  if (err.empty() && !AlignUp(end, &b_offset)) err = Fail(where() + "size overflows int64");
  if (err.empty()) err = CheckArray(i, "Vt", b_fmt, b_offset, t->rank, cols, data_size, &t->b, &end);
  if (err.empty()) err = CheckInt8(i, "U", t->a, data);
  if (err.empty()) err = CheckInt8(i, "Vt", t->b, data);
  return err;
}

}  // namespace

std::string ValidatePackedV2(const PackedInputs& in, PackedPlanV2* plan) {
  if (in.data_shape.size() != 1) return Fail("data must be 1-D, got shape " + ShapeString(in.data_shape));
  if (in.layout_shape.size() != 2 || in.layout_shape[1] != kLayoutV2Columns) {
    return Fail("layout v2 (uint8 data) must have shape (num_rows, " + std::to_string(kLayoutV2Columns) + "), got " +
                ShapeString(in.layout_shape));
  }
  const int64_t num_rows = in.layout_shape[0];
  if (num_rows <= 0) return Fail("layout v2 has no shape row");
  const int64_t* shape_row = in.layout;
  const int64_t m = shape_row[kRow1], n = shape_row[kCol1];
  bool shape_ok = shape_row[kKind] == kShapeKind && m >= 1 && n >= 1;
  for (int64_t c : {kRow0, kCol0, kRank, kFormats, kByteOffset}) shape_ok = shape_ok && shape_row[c] == 0;
  if (!shape_ok) {
    std::ostringstream s;
    s << "layout v2 row 0 must be the shape row [" << kShapeKind << ", 0, m, 0, n, 0, 0, 0] with m, n >= 1, got [";
    for (int64_t c = 0; c < kLayoutV2Columns; ++c) s << (c ? ", " : "") << shape_row[c];
    s << "]";
    return Fail(s.str());
  }
  const int64_t data_size = in.data_shape[0];
  plan->terms.clear();
  int64_t stored = 0;
  for (int64_t i = 1; i < num_rows; ++i) {
    TermView t;
    std::string err = CheckRowV2(in.layout + i * kLayoutV2Columns, i, m, n, in.data_bytes, data_size, &t);
    if (!err.empty()) return err;
    int64_t a = t.a.rows * t.a.cols, b = t.kind == BlockKind::kLowRank ? t.b.rows * t.b.cols : 0;  // checked above
    if (!CheckedAdd(stored, a, &stored) || !CheckedAdd(stored, b, &stored)) return Fail("stored size overflows int64");
    plan->terms.push_back(t);
  }
  std::string x_err = ValidateX(in.x_shape, m, n, &plan->batch, &plan->y_shape);
  if (!x_err.empty()) return x_err;
  std::vector<unsigned char> seen;
  std::string err = CheckPerm("row_perm", in.row_perm_shape, in.row_perm, m, &seen, &plan->has_row_perm);
  if (!err.empty()) return err;
  err = CheckPerm("col_perm", in.col_perm_shape, in.col_perm, n, &seen, &plan->has_col_perm);
  if (!err.empty()) return err;
  plan->m = m;
  plan->n = n;
  plan->stored_values = stored;
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
