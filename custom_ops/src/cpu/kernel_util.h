// Helpers shared by the CPU kernels of layout versions 1 and 2 (hmatmul_cpu.cc, hmatmul_cpu_v2.cc).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "common/ort_api.h"
#include "dehm/packed.h"
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

// A node's validated plan and tables, kept when its packed inputs are constant initializers:
// made at the first run whose inputs pass, read-only afterwards (runs on other threads share
// them). Plan is PackedPlan or PackedPlanV2, Tables what the layout's product needs.
template <typename Plan, typename Tables>
class PlanCache {
 public:
  struct Prepared {
    Plan plan;
    Tables tables;
  };

  template <typename Validate, typename Build>
  std::string Get(const PackedInputs& in, const Validate& validate, const Build& build, const Prepared** prepared) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!ready_) {
      Plan plan;
      std::string err = validate(in, &plan);
      if (!err.empty()) return err;
      cached_.tables = build(plan);
      cached_.plan = std::move(plan);
      ready_ = true;
    }
    *prepared = &cached_;
    return "";
  }

 private:
  std::mutex mutex_;
  bool ready_ = false;
  Prepared cached_;
};

// One HMatMul run, either layout: validates (the cached plan and X alone when the packed
// inputs are constant, everything otherwise), allocates Y, and calls
// product(in, plan, tables, batch, y). Problems become onnxruntime statuses starting with
// "HMatMul:"; no exception leaves the kernel.
template <typename T, typename Plan, typename Tables, typename MakeInputs, typename Validate, typename Build,
          typename Product>
Ort::Status RunPackedProduct(bool constant, PlanCache<Plan, Tables>* cache, const MakeInputs& make_inputs,
                             const Validate& validate, const Build& build, const Product& product,
                             Ort::Custom::Tensor<T>& Y) {
  try {
    const PackedInputs in = make_inputs();
    typename PlanCache<Plan, Tables>::Prepared own;
    const typename PlanCache<Plan, Tables>::Prepared* prepared = &own;
    int64_t batch = 0;
    std::vector<int64_t> y_shape;
    std::string err;
    if (constant) {
      err = cache->Get(in, validate, build, &prepared);
      if (err.empty()) err = ValidateX(in.x_shape, prepared->plan.m, prepared->plan.n, &batch, &y_shape);
    } else {
      err = validate(in, &own.plan);
      batch = own.plan.batch;
      y_shape = own.plan.y_shape;
    }
    if (!err.empty()) return Ort::Status(err.c_str(), ORT_INVALID_ARGUMENT);
    T* y = Y.Allocate(y_shape);
    if (batch == 0) return Ort::Status{nullptr};
    if (prepared == &own) own.tables = build(own.plan);
    product(in, prepared->plan, prepared->tables, batch, y);
    return Ort::Status{nullptr};
  } catch (const std::bad_alloc&) {
    return Ort::Status("HMatMul: out of memory for the output or scratch buffer", ORT_FAIL);
  } catch (const std::exception& e) {
    return Ort::Status((std::string("HMatMul: ") + e.what()).c_str(), ORT_RUNTIME_EXCEPTION);
  }
}

}  // namespace dehm
