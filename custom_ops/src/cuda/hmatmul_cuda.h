// CUDA kernels of HMatMul (contract: dehm_onnx/ops/hmatmul.py): op definition layer.
#pragma once

#include <memory>
#include <vector>

#include "onnxruntime_lite_custom_op.h"

namespace dehm {

// Creates the CUDAExecutionProvider kernels (float32 and float16). X, data and Y live on the
// device; layout, row_perm and col_perm are CPU inputs so they are validated on the host.
void CreateCudaOps(std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>* ops);

}  // namespace dehm
