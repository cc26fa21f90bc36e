// Launcher layer of the HMatMul CUDA kernels: raw pointers and sizes in, cudaError_t out.
// It never sees the onnxruntime kernel context (that is hmatmul_cuda.cc's job).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dehm {

// Block table row on the device: kind, r0, r1, c0, c1, rank, offset, rank_offset
// (rank_offset: sum of the ranks of the low-rank blocks before this one).
constexpr int kDeviceBlockFields = 8;

// Sizes of the tables and of the product, everything already validated on the host
// (dehm/packed.h). The tables do not depend on the batch, so they can be uploaded once.
struct HMatMulDeviceArgs {
  int64_t batch = 0, m = 0, n = 0;
  int64_t num_blocks = 0;
  int64_t num_segments = 0;  // column segments [seg_start[s], seg_start[s + 1])
  int64_t num_entries = 0;   // total (segment, block) pairs
  int64_t rank_total = 0;    // sum of the low-rank blocks' ranks
  bool has_row_perm = false, has_col_perm = false;
};

// Number of int64 values in the tables, laid out as
// [blocks (num_blocks x 8)] [seg_start (num_segments + 1)] [seg_entry_begin (num_segments + 1)]
// [entries (num_entries)] [row_perm (m or 0)] [col_perm (n or 0)].
int64_t DeviceTableSize(const HMatMulDeviceArgs& args);

// Y = X @ W_H for float or half (__half) payloads; T is float or uint16_t (half bits).
// `tables` is device memory holding DeviceTableSize(args) values. Scratch is allocated on
// `stream` from the device's default memory pool and freed (stream-ordered) before return.
template <typename T>
cudaError_t LaunchHMatMul(cudaStream_t stream, const HMatMulDeviceArgs& args, const int64_t* tables, const T* x,
                          const T* data, T* y);

// The same with the tables in host memory: they are copied to the device on `stream` first.
template <typename T>
cudaError_t LaunchHMatMulHostTables(cudaStream_t stream, const HMatMulDeviceArgs& args, const int64_t* host_tables,
                                    const T* x, const T* data, T* y);

}  // namespace dehm
