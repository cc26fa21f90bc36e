// CPU kernels of HMatMul (contract: dehm_onnx/ops/hmatmul.py).
#pragma once

#include <memory>
#include <vector>

#include "onnxruntime_lite_custom_op.h"

namespace dehm {

// Creates the CPUExecutionProvider kernels of layout version 1 (X and data float32, or both
// float16) for the op domain.
void CreateCpuOps(std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>* ops);

// Creates the CPUExecutionProvider kernels of layout version 2 (X float32 or float16, data
// uint8): the same HMatMul op, told apart by the type of data (hmatmul_cpu_v2.cc).
void CreateCpuOpsV2(std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>* ops);

}  // namespace dehm
