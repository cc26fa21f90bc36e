// Launcher layer of the HMatMul CUDA kernels: raw pointers and sizes in, cudaError_t out.
// It never sees the onnxruntime kernel context (that is hmatmul_cuda.cc's job).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dehm {

// Block table row on the device: kind, r0, r1, c0, c1, rank, offset, t_offset.
constexpr int kDeviceBlockFields = 8;

// Everything the kernels read, already validated on the host (dehm/packed.h).
struct HMatMulDeviceArgs {
  int64_t batch = 0, m = 0, n = 0;
  int64_t num_blocks = 0;
  int64_t num_segments = 0;   // column segments [seg_start[s], seg_start[s + 1])
  int64_t num_entries = 0;    // total (segment, block) pairs
  int64_t t_total = 0;        // floats of the per-block (batch x rank) products X_b U_b
  // Host staging of the tables, copied to the device in one transfer:
  // [blocks (num_blocks x 8)] [seg_start (num_segments + 1)] [seg_entry_begin (num_segments + 1)]
  // [entries (num_entries)] [row_perm (m or 0)] [col_perm (n or 0)]
  const int64_t* host_tables = nullptr;
  int64_t host_tables_size = 0;
  bool has_row_perm = false, has_col_perm = false;
};

// Y = X @ W_H for float or half (__half) payloads; T is float or uint16_t (half bits).
// All device memory besides X, data and Y is allocated on `stream` and freed before return.
template <typename T>
cudaError_t LaunchHMatMul(cudaStream_t stream, const HMatMulDeviceArgs& args, const T* x, const T* data, T* y);

}  // namespace dehm
