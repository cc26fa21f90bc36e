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
#include "dehm/layout.h"
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

// Column segments of the output, chunk by chunk: the distinct column ranges within each chunk of
// ``n`` over which the same dense and low-rank (rank > 0) items contribute, with those items
// listed per segment in ``members``. Item is BlockView (layout 1) or TermView (layout 2);
// Segment has the fields j0, j1, begin, end.
template <typename Item, typename Segment>
void BuildColumnSegments(const std::vector<Item>& items, int64_t n, int64_t* col_chunks,
                         std::vector<int64_t>* chunk_segments, std::vector<Segment>* segments,
                         std::vector<int64_t>* members) {
  const int64_t chunk = std::max<int64_t>(16, std::min<int64_t>(256, ((n + 15) / 16 + 15) / 16 * 16));
  *col_chunks = (n + chunk - 1) / chunk;
  chunk_segments->assign(static_cast<size_t>(*col_chunks) + 1, 0);
  std::vector<int64_t> meeting, edges;
  for (int64_t c = 0; c < *col_chunks; ++c) {
    const int64_t j0 = c * chunk, j1 = std::min(n, j0 + chunk);
    meeting.clear();
    edges.assign({j0, j1});
    for (size_t i = 0; i < items.size(); ++i) {
      const Item& item = items[i];
      const bool contributes = item.kind == BlockKind::kDense || (item.kind == BlockKind::kLowRank && item.rank > 0);
      if (!contributes || item.c1 <= j0 || item.c0 >= j1) continue;
      meeting.push_back(static_cast<int64_t>(i));
      edges.push_back(std::max(item.c0, j0));
      edges.push_back(std::min(item.c1, j1));
    }
    std::sort(edges.begin(), edges.end());
    edges.erase(std::unique(edges.begin(), edges.end()), edges.end());
    for (size_t e = 0; e + 1 < edges.size(); ++e) {
      Segment seg{edges[e], edges[e + 1], static_cast<int64_t>(members->size()), 0};
      for (int64_t i : meeting) {
        const Item& item = items[static_cast<size_t>(i)];
        if (item.c0 <= seg.j0 && item.c1 >= seg.j1) members->push_back(i);
      }
      seg.end = static_cast<int64_t>(members->size());
      segments->push_back(seg);
    }
    (*chunk_segments)[static_cast<size_t>(c) + 1] = static_cast<int64_t>(segments->size());
  }
}

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
