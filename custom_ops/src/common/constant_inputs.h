// Whether a node's packed inputs are constant initializers (shared by the CPU and CUDA kernels).
#pragma once

#include <exception>

#include "onnxruntime_cxx_api.h"

namespace dehm {

// True when data, layout, row_perm and col_perm (inputs 1..4) are constant initializers of
// the node, so their validation and derived tables can be kept for the node's lifetime.
inline bool PackedInputsConstant(const OrtKernelInfo* info) {
  try {
    Ort::ConstKernelInfo kernel_info(info);
    for (size_t i = 1; i <= 4; ++i) {
      int is_constant = 0;
      kernel_info.GetTensorConstantInput(i, &is_constant);
      if (!is_constant) return false;
    }
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

}  // namespace dehm
