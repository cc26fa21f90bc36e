// Op-definition layer of HMatMul on CUDA: validates on the host, builds the block and
// column-segment tables (once per node when the packed inputs are constant), fetches the
// stream and calls the launcher (hmatmul_impl.cuh).
#include "hmatmul_cuda.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <exception>
#include <mutex>
#include <new>
#include <string>

#include "common/constant_inputs.h"
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

// Host tables in the order DeviceTableSize documents; they do not depend on the batch.
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

  args->m = plan.m;
  args->n = plan.n;
  args->num_blocks = nb;
  args->num_segments = num_segments;
  args->num_entries = num_entries;
  args->has_row_perm = plan.has_row_perm;
  args->has_col_perm = plan.has_col_perm;
  std::vector<int64_t> tables;
  tables.reserve(static_cast<size_t>(DeviceTableSize(*args)));
  int64_t rank_total = 0;
  for (const BlockView& b : plan.blocks) {
    const int64_t row[kDeviceBlockFields] = {static_cast<int64_t>(b.kind), b.r0, b.r1, b.c0, b.c1, b.rank, b.offset, rank_total};
    tables.insert(tables.end(), row, row + kDeviceBlockFields);
    if (b.kind == BlockKind::kLowRank) rank_total += b.rank;  // cannot overflow: ranks fit in `data`
  }
  args->rank_total = rank_total;
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
  return tables;
}

Ort::Status CudaFailure(cudaError_t status) {
  return Ort::Status((std::string("HMatMul (CUDA): ") + cudaGetErrorName(status) + ": " + cudaGetErrorString(status)).c_str(),
                     ORT_EP_FAIL);
}

// One node's CUDA kernel. When the packed inputs are constant (the usual case: initializers
// of an optimized model) the layout is validated and its tables are uploaded once, at the
// first run, and later runs only check X and launch; otherwise every run validates and
// uploads its own tables.
template <typename T>
class HMatMulCudaKernel {
 public:
  HMatMulCudaKernel(const OrtApi*, const OrtKernelInfo* info) : constant_(PackedInputsConstant(info)) {}
  HMatMulCudaKernel(const HMatMulCudaKernel&) = delete;
  HMatMulCudaKernel& operator=(const HMatMulCudaKernel&) = delete;
  ~HMatMulCudaKernel() {
    if (tables_ != nullptr) cudaFree(tables_);  // nothing to report to from a destructor
  }

  Ort::Status Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<T>& X, const Ort::Custom::Tensor<T>& data,
                      const Ort::Custom::Tensor<int64_t>& layout, const Ort::Custom::Tensor<int64_t>& row_perm,
                      const Ort::Custom::Tensor<int64_t>& col_perm, Ort::Custom::Tensor<T>& Y) {
    using Raw = typename RawType<T>::type;
    try {
      const PackedInputs in = MakePackedInputs(X, data, layout, row_perm, col_perm);
      auto stream = static_cast<cudaStream_t>(Ort::KernelContext(ctx).GetGPUComputeStream());
      const Raw* x = reinterpret_cast<const Raw*>(X.Data());
      const Raw* d = reinterpret_cast<const Raw*>(data.Data());
      if (!constant_) {
        PackedPlan plan;
        std::string err = ValidatePacked(in, &plan);
        if (!err.empty()) return Ort::Status(err.c_str(), ORT_INVALID_ARGUMENT);
        T* y = Y.Allocate(plan.y_shape);
        if (plan.batch == 0) return Ort::Status{nullptr};
        HMatMulDeviceArgs args;
        const std::vector<int64_t> tables = BuildTables(plan, in.row_perm, in.col_perm, &args);
        args.batch = plan.batch;
        cudaError_t status = LaunchHMatMulHostTables<Raw>(stream, args, tables.data(), x, d, reinterpret_cast<Raw*>(y));
        return status == cudaSuccess ? Ort::Status{nullptr} : CudaFailure(status);
      }
      std::lock_guard<std::mutex> lock(mutex_);
      if (tables_ == nullptr) {
        Ort::Status status = Upload(in);
        if (!status.IsOK()) return status;
      }
      HMatMulDeviceArgs args = args_;
      std::vector<int64_t> y_shape;
      std::string err = ValidateX(in.x_shape, args.m, args.n, &args.batch, &y_shape);
      if (!err.empty()) return Ort::Status(err.c_str(), ORT_INVALID_ARGUMENT);
      T* y = Y.Allocate(y_shape);
      if (args.batch == 0) return Ort::Status{nullptr};
      cudaError_t status = LaunchHMatMul<Raw>(stream, args, tables_, x, d, reinterpret_cast<Raw*>(y));
      return status == cudaSuccess ? Ort::Status{nullptr} : CudaFailure(status);
    } catch (const std::bad_alloc&) {
      return Ort::Status("HMatMul (CUDA): out of host memory for the block tables", ORT_FAIL);
    } catch (const std::exception& e) {
      return Ort::Status((std::string("HMatMul (CUDA): ") + e.what()).c_str(), ORT_RUNTIME_EXCEPTION);
    }
  }

 private:
  // Validates the constant layout (X included, with the first run's shape) and uploads the
  // tables with a synchronous copy, once per node.
  Ort::Status Upload(const PackedInputs& in) {
    PackedPlan plan;
    std::string err = ValidatePacked(in, &plan);
    if (!err.empty()) return Ort::Status(err.c_str(), ORT_INVALID_ARGUMENT);
    HMatMulDeviceArgs args;
    const std::vector<int64_t> host = BuildTables(plan, in.row_perm, in.col_perm, &args);
    int64_t* device = nullptr;
    cudaError_t status = cudaMalloc(&device, host.size() * sizeof(int64_t));
    if (status != cudaSuccess) return CudaFailure(status);
    status = cudaMemcpy(device, host.data(), host.size() * sizeof(int64_t), cudaMemcpyHostToDevice);
    if (status != cudaSuccess) {
      cudaFree(device);
      return CudaFailure(status);
    }
    tables_ = device;
    args_ = args;
    return Ort::Status{nullptr};
  }

  const bool constant_;
  std::mutex mutex_;
  int64_t* tables_ = nullptr;  // device copy of the tables (constant inputs only)
  HMatMulDeviceArgs args_;     // their sizes; batch filled per run
};

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
      Ort::Custom::CreateLiteCustomOp<HMatMulCudaKernel<float>>("HMatMul", "CUDAExecutionProvider")));
  ops->emplace_back(WithHostPackedInputs(
      Ort::Custom::CreateLiteCustomOp<HMatMulCudaKernel<Ort::Float16_t>>("HMatMul", "CUDAExecutionProvider")));
}

}  // namespace dehm
