// Kernel layer of HMatMul on CUDA. Up to three launches:
//   gather:   Xp[b, i] = float(X[b, row_perm[i]])   (float X without row_perm is used as is)
//   lowrank:  T_blk[b, k] = sum_i Xp[b, r0 + i] * U[i, k]
//             (grid: H-block x batch tile; the threads split the rows)
//   columns:  Y[b, col_perm[j]] = sum over H-blocks meeting column j of
//             T_blk[b, :] . Vt[:, j - c0]  or  Xp[b, r0:r1] . D[:, j - c0]
//             (grid: column segment x batch tile; the warps split the blocks)
// The column segments (maximal column ranges covered by the same H-blocks) are built on
// the host, so each output entry is written by exactly one thread: no atomics, no races,
// and the same summation order on every run.
#include <cuda_fp16.h>

#include <type_traits>

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
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRankChunk = 8;  // columns of U summed together in registers

static_assert(kBatchTile == kWarps, "the wide-batch paths give each warp one batch row of a tile");

// The sum of v over the warp, in every lane (butterfly, so all lanes see the same total).
__device__ __forceinline__ float WarpSum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// T_blk[b, :] = Xp[b, r0:r1] @ U. Narrow batches: the block's threads split the rows
// (thread i reads row i's k values, so a warp reads one contiguous stretch of U), each
// summing up to kRankChunk columns in registers, and the warps combine through shared
// memory in a fixed order. Wide batches: one warp per batch row, lanes split the rows.
template <typename T>
__global__ void hmatmul_lowrank_kernel(const float* xp, const T* data, DeviceTables tab, int64_t batch, int64_t m,
                                       float* tbuf) {
  const int64_t* blk = tab.blocks + static_cast<int64_t>(blockIdx.x) * kDeviceBlockFields;
  if (blk[0] != 2 || blk[5] == 0) return;  // the whole CUDA block leaves together
  const int64_t r0 = blk[1], rows = blk[2] - blk[1], k = blk[5];
  const T* u = data + blk[6];
  float* t = tbuf + blk[7] * batch;
  __shared__ float partial[kWarps][kRankChunk];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (batch >= kBatchTile) {
    // Wide batches: warp w owns batch row b0 + w and its lanes split the rows, so no
    // block-wide reduction is needed (kBatchTile == kWarps).
    for (int64_t b = blockIdx.y * kBatchTile + warp; b < batch; b += gridDim.y * kBatchTile) {
      const float* xr = xp + b * m + r0;
      for (int64_t kc = 0; kc < k; kc += kRankChunk) {
        const int kn = static_cast<int>(k - kc < kRankChunk ? k - kc : kRankChunk);
        float acc[kRankChunk];
#pragma unroll
        for (int c = 0; c < kRankChunk; ++c) acc[c] = 0.0f;
#pragma unroll 2
        for (int64_t i = lane; i < rows; i += 32) {
          const float xi = xr[i];
          const T* ui = u + i * k + kc;
#pragma unroll
          for (int c = 0; c < kRankChunk; ++c)
            if (c < kn) acc[c] += xi * ToFloat(ui[c]);
        }
#pragma unroll
        for (int c = 0; c < kRankChunk; ++c) acc[c] = WarpSum(acc[c]);
        if (lane < kn) {
          float mine = 0.0f;
#pragma unroll
          for (int c = 0; c < kRankChunk; ++c)
            if (c == lane) mine = acc[c];
          t[b * k + kc + lane] = mine;
        }
      }
    }
    return;
  }
  for (int64_t b0 = blockIdx.y * kBatchTile; b0 < batch; b0 += gridDim.y * kBatchTile) {
    const int64_t b1 = batch - b0 < kBatchTile ? batch : b0 + kBatchTile;
    for (int64_t b = b0; b < b1; ++b) {
      const float* xr = xp + b * m + r0;
      for (int64_t kc = 0; kc < k; kc += kRankChunk) {
        const int kn = static_cast<int>(k - kc < kRankChunk ? k - kc : kRankChunk);
        float acc[kRankChunk];
#pragma unroll
        for (int c = 0; c < kRankChunk; ++c) acc[c] = 0.0f;
#pragma unroll 2
        for (int64_t i = threadIdx.x; i < rows; i += kThreads) {
          const float xi = xr[i];
          const T* ui = u + i * k + kc;
#pragma unroll
          for (int c = 0; c < kRankChunk; ++c)
            if (c < kn) acc[c] += xi * ToFloat(ui[c]);
        }
#pragma unroll
        for (int c = 0; c < kRankChunk; ++c) acc[c] = WarpSum(acc[c]);
        if (lane == 0) {
#pragma unroll
          for (int c = 0; c < kRankChunk; ++c) partial[warp][c] = acc[c];
        }
        __syncthreads();
        if (threadIdx.x < kn) {
          float sum = 0.0f;
          for (int w = 0; w < kWarps; ++w) sum += partial[w][threadIdx.x];
          t[b * k + kc + threadIdx.x] = sum;
        }
        __syncthreads();
      }
    }
  }
}

// Entry e's block's contribution to Y[b, j]: T_blk[b, :] . Vt[:, j - c0] or
// Xp[b, r0:r1] . D[:, j - c0] (zero blocks have no entries).
template <typename T>
__device__ __forceinline__ float BlockColumn(const float* xp, const T* data, const DeviceTables& tab,
                                             const float* tbuf, int64_t batch, int64_t m, int64_t b, int64_t j,
                                             int64_t e) {
  const int64_t* blk = tab.blocks + tab.entries[e] * kDeviceBlockFields;
  const int64_t rows = blk[2] - blk[1], cols = blk[4] - blk[3], jc = j - blk[3];
  float acc = 0.0f;
  if (blk[0] == 2) {
    const int64_t k = blk[5];
    const T* vt = data + blk[6] + rows * k + jc;
    const float* tb = tbuf + blk[7] * batch + b * k;
#pragma unroll 4
    for (int64_t kk = 0; kk < k; ++kk) acc += tb[kk] * ToFloat(vt[kk * cols]);
  } else if (blk[0] == 1) {
    const T* d = data + blk[6] + jc;
    const float* xr = xp + b * m + blk[1];
#pragma unroll 4
    for (int64_t i = 0; i < rows; ++i) acc += xr[i] * ToFloat(d[i * cols]);
  }
  return acc;
}

// Y[b, j] for the columns of one segment. Narrow batches: 32 columns at a time (one per
// lane), warp w sums the segment's blocks w, w + kWarps, ..., then warp 0 adds the warps'
// sums in a fixed order and stores. Wide batches: one warp per batch row, each lane sums
// every block for its column.
template <typename T>
__global__ void hmatmul_columns_kernel(const float* xp, const T* data, DeviceTables tab, const float* tbuf,
                                       int64_t batch, int64_t m, int64_t n, T* y) {
  const int64_t s = blockIdx.x;
  const int64_t j0 = tab.seg_start[s], width = tab.seg_start[s + 1] - j0;
  const int64_t e0 = tab.seg_entry_begin[s], e1 = tab.seg_entry_begin[s + 1];
  __shared__ float partial[kWarps][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (batch >= kBatchTile) {
    // Wide batches: warp w owns batch row b0 + w; each lane sums all the segment's blocks
    // for its column, with no block-wide reduction (kBatchTile == kWarps).
    for (int64_t b = blockIdx.y * kBatchTile + warp; b < batch; b += gridDim.y * kBatchTile) {
      for (int64_t jc0 = lane; jc0 < width; jc0 += 32) {
        const int64_t j = j0 + jc0;
        float acc = 0.0f;
        for (int64_t e = e0; e < e1; ++e) acc += BlockColumn(xp, data, tab, tbuf, batch, m, b, j, e);
        Store(y + b * n + (tab.col_perm ? tab.col_perm[j] : j), acc);
      }
    }
    return;
  }
  for (int64_t b0 = blockIdx.y * kBatchTile; b0 < batch; b0 += gridDim.y * kBatchTile) {
    const int64_t b1 = batch - b0 < kBatchTile ? batch : b0 + kBatchTile;
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t jc0 = 0; jc0 < width; jc0 += 32) {
        const bool active = jc0 + lane < width;
        const int64_t j = j0 + jc0 + lane;
        float acc = 0.0f;
        if (active) {
          for (int64_t e = e0 + warp; e < e1; e += kWarps) acc += BlockColumn(xp, data, tab, tbuf, batch, m, b, j, e);
        }
        partial[warp][lane] = acc;
        __syncthreads();
        if (warp == 0 && active) {
          float sum = 0.0f;
          for (int w = 0; w < kWarps; ++w) sum += partial[w][lane];
          Store(y + b * n + (tab.col_perm ? tab.col_perm[j] : j), sum);
        }
        __syncthreads();
      }
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

DeviceTables TablesAt(const int64_t* tables, const HMatMulDeviceArgs& a) {
  DeviceTables tab;
  tab.blocks = tables;
  tab.seg_start = tab.blocks + a.num_blocks * kDeviceBlockFields;
  tab.seg_entry_begin = tab.seg_start + a.num_segments + 1;
  tab.entries = tab.seg_entry_begin + a.num_segments + 1;
  tab.row_perm = a.has_row_perm ? tab.entries + a.num_entries : nullptr;
  tab.col_perm = a.has_col_perm ? tab.entries + a.num_entries + (a.has_row_perm ? a.m : 0) : nullptr;
  return tab;
}

}  // namespace

int64_t DeviceTableSize(const HMatMulDeviceArgs& a) {
  return a.num_blocks * kDeviceBlockFields + 2 * (a.num_segments + 1) + a.num_entries + (a.has_row_perm ? a.m : 0) +
         (a.has_col_perm ? a.n : 0);
}

template <typename T>
cudaError_t LaunchHMatMul(cudaStream_t stream, const HMatMulDeviceArgs& a, const int64_t* tables, const T* x,
                          const T* data, T* y) {
  if (a.batch == 0) return cudaSuccess;
  if (a.num_blocks > 2147483647 || a.num_segments > 2147483647) return cudaErrorInvalidValue;
  // float X in storage order is its own gathered copy; otherwise gather (and widen) it.
  const bool need_xp = a.has_row_perm || !std::is_same<T, float>::value;
  const size_t xp_floats = need_xp ? static_cast<size_t>(a.batch * a.m) : 0;
  const size_t bytes = (xp_floats + static_cast<size_t>(a.batch * a.rank_total)) * sizeof(float);
  cudaError_t err = KeepPoolMemory();
  void* scratch = nullptr;
  if (err == cudaSuccess && bytes > 0) err = cudaMallocAsync(&scratch, bytes, stream);
  if (err != cudaSuccess) return err;

  const DeviceTables tab = TablesAt(tables, a);
  float* tbuf = static_cast<float*>(scratch) + xp_floats;
  const float* xp = need_xp ? static_cast<const float*>(scratch) : reinterpret_cast<const float*>(x);
  if (need_xp) {
    hmatmul_gather_kernel<T><<<GridFor(a.batch * a.m, kThreads), kThreads, 0, stream>>>(
        x, tab.row_perm, a.batch, a.m, static_cast<float*>(scratch));
    err = cudaGetLastError();
  }
  if (err == cudaSuccess && a.rank_total > 0) {
    const dim3 grid(static_cast<unsigned>(a.num_blocks), static_cast<unsigned>(BatchTiles(a.batch)));
    hmatmul_lowrank_kernel<T><<<grid, kThreads, 0, stream>>>(xp, data, tab, a.batch, a.m, tbuf);
    err = cudaGetLastError();
  }
  if (err == cudaSuccess) {
    const dim3 grid(static_cast<unsigned>(a.num_segments), static_cast<unsigned>(BatchTiles(a.batch)));
    hmatmul_columns_kernel<T><<<grid, kThreads, 0, stream>>>(xp, data, tab, tbuf, a.batch, a.m, a.n, y);
    err = cudaGetLastError();
  }
  const cudaError_t free_err = scratch ? cudaFreeAsync(scratch, stream) : cudaSuccess;
  return err != cudaSuccess ? err : free_err;
}

template <typename T>
cudaError_t LaunchHMatMulHostTables(cudaStream_t stream, const HMatMulDeviceArgs& a, const int64_t* host_tables,
                                    const T* x, const T* data, T* y) {
  if (a.batch == 0) return cudaSuccess;
  const size_t table_bytes = static_cast<size_t>(DeviceTableSize(a)) * sizeof(int64_t);
  cudaError_t err = KeepPoolMemory();
  void* tables = nullptr;
  if (err == cudaSuccess) err = cudaMallocAsync(&tables, table_bytes, stream);
  if (err != cudaSuccess) return err;
  err = cudaMemcpyAsync(tables, host_tables, table_bytes, cudaMemcpyHostToDevice, stream);
  if (err == cudaSuccess) err = LaunchHMatMul<T>(stream, a, static_cast<const int64_t*>(tables), x, data, y);
  const cudaError_t free_err = cudaFreeAsync(tables, stream);
  return err != cudaSuccess ? err : free_err;
}

template cudaError_t LaunchHMatMul<float>(cudaStream_t, const HMatMulDeviceArgs&, const int64_t*, const float*,
                                          const float*, float*);
template cudaError_t LaunchHMatMul<uint16_t>(cudaStream_t, const HMatMulDeviceArgs&, const int64_t*,
                                             const uint16_t*, const uint16_t*, uint16_t*);
template cudaError_t LaunchHMatMulHostTables<float>(cudaStream_t, const HMatMulDeviceArgs&, const int64_t*,
                                                    const float*, const float*, float*);
template cudaError_t LaunchHMatMulHostTables<uint16_t>(cudaStream_t, const HMatMulDeviceArgs&, const int64_t*,
                                                       const uint16_t*, const uint16_t*, uint16_t*);

}  // namespace dehm
