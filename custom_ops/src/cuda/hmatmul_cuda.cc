// Op-definition layer of HMatMul on CUDA: validates on the host, builds the block and
// column-segment tables, fetches the stream and calls the launcher (hmatmul_impl.cuh).
#include "hmatmul_cuda.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <exception>
#include <new>
#include <string>

#include "dehm/layout.h"
#include "dehm/packed.h"
#include "hmatmul_impl.cuh"

namespace dehm {
namespace {

template <typename T>
struct RawType {
  using type = float;
};
template <>
struct RawType<Ort::Float16_t> {
  using type = uint16_t;
};

// Host tables in the order HMatMulDeviceArgs documents.
std::vector<int64_t> BuildTables(const PackedPlan& plan, const int64_t* row_perm, const int64_t* col_perm,
                                 HMatMulDeviceArgs* args) {
  const int64_t nb = static_cast<int64_t>(plan.blocks.size());
  std::vector<int64_t> bounds;
  bounds.reserve(2 * plan.blocks.size());
  for (const BlockView& b : plan.blocks) {
    bounds.push_back(b.c0);
    bounds.push_back(b.c1);
  }
  std::sort(bounds.begin(), bounds.end());
  bounds.erase(std::unique(bounds.begin(), bounds.end()), bounds.end());
  const int64_t num_segments = static_cast<int64_t>(bounds.size()) - 1;

  std::vector<int64_t> count(static_cast<size_t>(num_segments) + 1, 0);
  auto segment_of = [&](int64_t col) {
    return static_cast<int64_t>(std::lower_bound(bounds.begin(), bounds.end(), col) - bounds.begin());
  };
  for (const BlockView& b : plan.blocks) {
    if (b.kind == BlockKind::kZero) continue;
    for (int64_t s = segment_of(b.c0); s < segment_of(b.c1); ++s) ++count[static_cast<size_t>(s) + 1];
  }
  for (size_t s = 1; s < count.size(); ++s) count[s] += count[s - 1];
  const int64_t num_entries = count.back();

  std::vector<int64_t> tables;
  tables.reserve(static_cast<size_t>(nb * kDeviceBlockFields + 2 * (num_segments + 1) + num_entries + plan.m + plan.n));
  int64_t t_total = 0;
  for (const BlockView& b : plan.blocks) {
    const int64_t t_offset = t_total;
    if (b.kind == BlockKind::kLowRank) t_total += plan.batch * b.rank;
    const int64_t row[kDeviceBlockFields] = {static_cast<int64_t>(b.kind), b.r0, b.r1, b.c0, b.c1, b.rank, b.offset, t_offset};
    tables.insert(tables.end(), row, row + kDeviceBlockFields);
  }
  tables.insert(tables.end(), bounds.begin(), bounds.end());
  tables.insert(tables.end(), count.begin(), count.end());
  const size_t entries_at = tables.size();
  tables.resize(entries_at + static_cast<size_t>(num_entries));
  std::vector<int64_t> fill(count.begin(), count.end() - 1);
  for (int64_t i = 0; i < nb; ++i) {
    const BlockView& b = plan.blocks[static_cast<size_t>(i)];
    if (b.kind == BlockKind::kZero) continue;
    for (int64_t s = segment_of(b.c0); s < segment_of(b.c1); ++s) tables[entries_at + static_cast<size_t>(fill[static_cast<size_t>(s)]++)] = i;
  }
  if (plan.has_row_perm) tables.insert(tables.end(), row_perm, row_perm + plan.m);
  if (plan.has_col_perm) tables.insert(tables.end(), col_perm, col_perm + plan.n);

  args->batch = plan.batch;
  args->m = plan.m;
  args->n = plan.n;
  args->num_blocks = nb;
  args->num_segments = num_segments;
  args->num_entries = num_entries;
  args->t_total = t_total;
  args->has_row_perm = plan.has_row_perm;
  args->has_col_perm = plan.has_col_perm;
  return tables;
}

template <typename T>
Ort::Status HMatMulCuda(OrtKernelContext* ctx, const Ort::Custom::Tensor<T>& X, const Ort::Custom::Tensor<T>& data,
                        const Ort::Custom::Tensor<int64_t>& layout, const Ort::Custom::Tensor<int64_t>& row_perm,
                        const Ort::Custom::Tensor<int64_t>& col_perm, Ort::Custom::Tensor<T>& Y) {
  try {
    const PackedInputs in = MakePackedInputs(X, data, layout, row_perm, col_perm);
    PackedPlan plan;
    std::string err = ValidatePacked(in, &plan);
    if (!err.empty()) return Ort::Status(err.c_str(), ORT_INVALID_ARGUMENT);
    T* y = Y.Allocate(plan.y_shape);
    if (plan.batch == 0) return Ort::Status{nullptr};

    HMatMulDeviceArgs args;
    std::vector<int64_t> tables = BuildTables(plan, in.row_perm, in.col_perm, &args);
    args.host_tables = tables.data();
    args.host_tables_size = static_cast<int64_t>(tables.size());
    auto stream = static_cast<cudaStream_t>(Ort::KernelContext(ctx).GetGPUComputeStream());
    using Raw = typename RawType<T>::type;
    cudaError_t status = LaunchHMatMul<Raw>(stream, args, reinterpret_cast<const Raw*>(X.Data()),
                                            reinterpret_cast<const Raw*>(data.Data()), reinterpret_cast<Raw*>(y));
    if (status != cudaSuccess) {
      return Ort::Status((std::string("HMatMul (CUDA): ") + cudaGetErrorName(status) + ": " + cudaGetErrorString(status)).c_str(),
                         ORT_EP_FAIL);
    }
    return Ort::Status{nullptr};
  } catch (const std::bad_alloc&) {
    return Ort::Status("HMatMul (CUDA): out of host memory for the block tables", ORT_FAIL);
  } catch (const std::exception& e) {
    return Ort::Status((std::string("HMatMul (CUDA): ") + e.what()).c_str(), ORT_RUNTIME_EXCEPTION);
  }
}

Ort::Custom::OrtLiteCustomOp* WithHostPackedInputs(Ort::Custom::OrtLiteCustomOp* op) {
  // layout, row_perm and col_perm (inputs 2..4) stay on the CPU for host-side validation.
  op->GetInputMemoryType = [](const OrtCustomOp*, size_t index) {
    return index >= 2 ? OrtMemTypeCPUInput : OrtMemTypeDefault;
  };
  return op;
}

}  // namespace

void CreateCudaOps(std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>* ops) {
  ops->emplace_back(WithHostPackedInputs(
      Ort::Custom::CreateLiteCustomOp("HMatMul", "CUDAExecutionProvider", HMatMulCuda<float>)));
  ops->emplace_back(WithHostPackedInputs(
      Ort::Custom::CreateLiteCustomOp("HMatMul", "CUDAExecutionProvider", HMatMulCuda<Ort::Float16_t>)));
}

}  // namespace dehm
