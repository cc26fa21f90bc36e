// Helpers shared by the CPU kernels of layout versions 1 and 2 (hmatmul_cpu.cc, hmatmul_cpu_v2.cc).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "common/ort_api.h"
#include "gemm.h"
#include "onnxruntime_cxx_api.h"

namespace dehm {

constexpr int64_t kMaxWorkers = 64;

// Runs task(t) for t in [0, num_tasks) on the session's intra-op pool, tasks pulled
// dynamically; on the calling thread when the runtime has no KernelContext_ParallelFor
// (onnxruntime < 1.17).
template <typename Task>
void RunTasks(OrtKernelContext* ctx, bool parallel, int64_t num_tasks, const Task& task) {
  struct State {
    const Task* task;
    std::atomic<int64_t> next;
    int64_t total;
  };
  State state{&task, {0}, num_tasks};
  auto worker = [](void* p, size_t) {
    State* s = static_cast<State*>(p);
    for (int64_t t = s->next.fetch_add(1); t < s->total; t = s->next.fetch_add(1)) (*s->task)(t);
  };
  const size_t workers = static_cast<size_t>(std::min<int64_t>(num_tasks, kMaxWorkers));
  if (!parallel || workers <= 1 || RuntimeOrtApi() < kParallelForOrtApi) {
    worker(&state, 0);
    return;
  }
  Ort::ThrowOnError(Ort::GetApi().KernelContext_ParallelFor(ctx, worker, workers, 0, &state));
}

template <typename T>
struct Storage;  // maps the ORT element type to the raw payload type
template <>
struct Storage<float> {
  using Raw = float;
  static float ToFloat(float v) { return v; }
  static float FromFloat(float v) { return v; }
};
template <>
struct Storage<Ort::Float16_t> {
  using Raw = uint16_t;
  static float ToFloat(Ort::Float16_t v) { return HalfToFloat(*reinterpret_cast<const uint16_t*>(&v)); }
  static Ort::Float16_t FromFloat(float v) { return Ort::Float16_t(v); }
};

}  // namespace dehm
