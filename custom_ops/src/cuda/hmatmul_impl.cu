// Kernel layer of HMatMul on CUDA. Three launches:
//   gather:   Xp[b, i] = float(X[b, row_perm[i]])
//   lowrank:  T_blk[b, k] = sum_i Xp[b, r0 + i] * U[i, k]
//             (grid: H-block x batch tile; one warp per (b, k), lanes split the row sum)
//   columns:  Y[b, col_perm[j]] = sum over H-blocks meeting column j of
//             T_blk[b, :] . Vt[:, j - c0]  or  Xp[b, r0:r1] . D[:, j - c0]
//             (grid: column segment x batch tile; one thread per output entry)
// The column segments (maximal column ranges covered by the same H-blocks) are built on
// the host, so each output entry is written by exactly one thread: no atomics, no races,
// and the same summation order on every run.
#include <cuda_fp16.h>

#include "hmatmul_impl.cuh"

namespace dehm {
namespace {

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(uint16_t v) { return __half2float(__ushort_as_half(v)); }
__device__ __forceinline__ void Store(float* p, float v) { *p = v; }
__device__ __forceinline__ void Store(uint16_t* p, float v) { *p = __half_as_ushort(__float2half_rn(v)); }

struct DeviceTables {
  const int64_t* blocks;
  const int64_t* seg_start;
  const int64_t* seg_entry_begin;
  const int64_t* entries;
  const int64_t* row_perm;  // nullptr: identity
  const int64_t* col_perm;  // nullptr: identity
};

template <typename T>
__global__ void hmatmul_gather_kernel(const T* x, const int64_t* row_perm, int64_t batch, int64_t m, float* xp) {
  const int64_t total = batch * m;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / m, i = idx % m;
    xp[idx] = ToFloat(x[b * m + (row_perm ? row_perm[i] : i)]);
  }
}

// Batch rows per CUDA block in the lowrank and columns kernels (gridDim.y covers the batch).
constexpr int64_t kBatchTile = 8;

template <typename T>
__global__ void hmatmul_lowrank_kernel(const float* xp, const T* data, DeviceTables tab, int64_t batch, int64_t m,
                                       float* tbuf) {
  const int64_t* blk = tab.blocks + static_cast<int64_t>(blockIdx.x) * kDeviceBlockFields;
  if (blk[0] != 2 || blk[5] == 0) return;
  const int64_t r0 = blk[1], rows = blk[2] - blk[1], k = blk[5];
  const T* u = data + blk[6];
  float* t = tbuf + blk[7];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int64_t b0 = blockIdx.y * kBatchTile; b0 < batch; b0 += gridDim.y * kBatchTile) {
    const int64_t outputs = (batch - b0 < kBatchTile ? batch - b0 : kBatchTile) * k;
    // The loop bound is the same for every lane of a warp, so the full-mask shuffle is safe.
    for (int64_t idx = warp; idx < outputs; idx += warps) {
      const int64_t b = b0 + idx / k, kk = idx % k;
      const float* xr = xp + b * m + r0;
      float acc = 0.0f;
#pragma unroll 4
      for (int64_t i = lane; i < rows; i += 32) acc += xr[i] * ToFloat(u[i * k + kk]);
      for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, offset);
      if (lane == 0) t[b * k + kk] = acc;
    }
  }
}

template <typename T>
__global__ void hmatmul_columns_kernel(const float* xp, const T* data, DeviceTables tab, const float* tbuf,
                                       int64_t batch, int64_t m, int64_t n, T* y) {
  const int64_t s = blockIdx.x;
  const int64_t j0 = tab.seg_start[s], width = tab.seg_start[s + 1] - j0;
  const int64_t e0 = tab.seg_entry_begin[s], e1 = tab.seg_entry_begin[s + 1];
  for (int64_t b0 = blockIdx.y * kBatchTile; b0 < batch; b0 += gridDim.y * kBatchTile) {
    const int64_t outputs = (batch - b0 < kBatchTile ? batch - b0 : kBatchTile) * width;
    for (int64_t idx = threadIdx.x; idx < outputs; idx += blockDim.x) {
      const int64_t b = b0 + idx / width, j = j0 + idx % width;
      float acc = 0.0f;
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t* blk = tab.blocks + tab.entries[e] * kDeviceBlockFields;
        const int64_t rows = blk[2] - blk[1], cols = blk[4] - blk[3], jc = j - blk[3];
        if (blk[0] == 2) {
          const int64_t k = blk[5];
          const T* vt = data + blk[6] + rows * k;
          const float* t = tbuf + blk[7] + b * k;
#pragma unroll 4
          for (int64_t kk = 0; kk < k; ++kk) acc += t[kk] * ToFloat(vt[kk * cols + jc]);
        } else if (blk[0] == 1) {
          const T* d = data + blk[6];
          const float* xr = xp + b * m + blk[1];
#pragma unroll 4
          for (int64_t i = 0; i < rows; ++i) acc += xr[i] * ToFloat(d[i * cols + jc]);
        }
      }
      Store(y + b * n + (tab.col_perm ? tab.col_perm[j] : j), acc);
    }
  }
}

int GridFor(int64_t work, int threads) {
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<int>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

int BatchTiles(int64_t batch) {
  const int64_t tiles = (batch + kBatchTile - 1) / kBatchTile;
  return static_cast<int>(tiles < 65535 ? tiles : 65535);
}

// The default pool returns freed memory to the driver at every synchronisation unless told
// otherwise, which turns each cudaMallocAsync below into a fresh driver allocation.
cudaError_t KeepPoolMemory() {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  cudaMemPool_t pool = nullptr;
  if (err == cudaSuccess) err = cudaDeviceGetDefaultMemPool(&pool, device);
  uint64_t keep = UINT64_MAX;
  if (err == cudaSuccess) err = cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep);
  return err;
}

}  // namespace

template <typename T>
cudaError_t LaunchHMatMul(cudaStream_t stream, const HMatMulDeviceArgs& a, const T* x, const T* data, T* y) {
  if (a.batch == 0) return cudaSuccess;
  if (a.num_blocks > 2147483647 || a.num_segments > 2147483647) return cudaErrorInvalidValue;
  const size_t table_bytes = static_cast<size_t>(a.host_tables_size) * sizeof(int64_t);
  const size_t xp_floats = static_cast<size_t>(a.batch * a.m);
  const size_t bytes = table_bytes + (xp_floats + static_cast<size_t>(a.t_total)) * sizeof(float);
  cudaError_t err = KeepPoolMemory();
  if (err != cudaSuccess) return err;
  void* scratch = nullptr;
  err = cudaMallocAsync(&scratch, bytes, stream);
  if (err != cudaSuccess) return err;

  int64_t* tables = static_cast<int64_t*>(scratch);
  float* xp = reinterpret_cast<float*>(static_cast<char*>(scratch) + table_bytes);
  float* tbuf = xp + xp_floats;
  DeviceTables tab;
  tab.blocks = tables;
  tab.seg_start = tab.blocks + a.num_blocks * kDeviceBlockFields;
  tab.seg_entry_begin = tab.seg_start + a.num_segments + 1;
  tab.entries = tab.seg_entry_begin + a.num_segments + 1;
  tab.row_perm = a.has_row_perm ? tab.entries + a.num_entries : nullptr;
  tab.col_perm = a.has_col_perm ? tab.entries + a.num_entries + (a.has_row_perm ? a.m : 0) : nullptr;

  constexpr int kThreads = 256;
  err = cudaMemcpyAsync(tables, a.host_tables, table_bytes, cudaMemcpyHostToDevice, stream);
  if (err == cudaSuccess) {
    hmatmul_gather_kernel<T><<<GridFor(a.batch * a.m, kThreads), kThreads, 0, stream>>>(x, tab.row_perm, a.batch, a.m, xp);
    err = cudaGetLastError();
  }
  if (err == cudaSuccess) {
    const dim3 grid(static_cast<unsigned>(a.num_blocks), static_cast<unsigned>(BatchTiles(a.batch)));
    hmatmul_lowrank_kernel<T><<<grid, kThreads, 0, stream>>>(xp, data, tab, a.batch, a.m, tbuf);
    err = cudaGetLastError();
  }
  if (err == cudaSuccess) {
    const dim3 grid(static_cast<unsigned>(a.num_segments), static_cast<unsigned>(BatchTiles(a.batch)));
    hmatmul_columns_kernel<T><<<grid, kThreads, 0, stream>>>(xp, data, tab, tbuf, a.batch, a.m, a.n, y);
    err = cudaGetLastError();
  }
  const cudaError_t free_err = cudaFreeAsync(scratch, stream);
  return err != cudaSuccess ? err : free_err;
}

template cudaError_t LaunchHMatMul<float>(cudaStream_t, const HMatMulDeviceArgs&, const float*, const float*, float*);
template cudaError_t LaunchHMatMul<uint16_t>(cudaStream_t, const HMatMulDeviceArgs&, const uint16_t*, const uint16_t*,
                                             uint16_t*);

}  // namespace dehm
