// CPU kernels of HMatMul (contract: dehm_onnx/ops/hmatmul.py).
#pragma once

#include <memory>
#include <vector>

#include "onnxruntime_lite_custom_op.h"

namespace dehm {

// Creates the CPUExecutionProvider kernels (float32 and float16) for the op domain.
void CreateCpuOps(std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>* ops);

}  // namespace dehm
