// Entry point of the library: onnxruntime calls RegisterCustomOps when a session registers it
// (SessionOptions.register_custom_ops_library). Registers HMatMul in domain "ai.dehm",
// version 1 (contract: dehm_onnx/ops/hmatmul.py).
#include <memory>
#include <mutex>
#include <vector>

#include "cpu/hmatmul_cpu.h"
#ifdef DEHM_WITH_CUDA
#include "cuda/hmatmul_cuda.h"
#endif

#if defined(_WIN32)
#define DEHM_EXPORT __declspec(dllexport)
#else
#define DEHM_EXPORT __attribute__((visibility("default")))
#endif

namespace {

constexpr const char* kDomain = "ai.dehm";

// The domain must outlive every session that uses it, so it lives for the whole process.
struct Registry {
  std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>> ops;
  std::unique_ptr<Ort::CustomOpDomain> domain;
};

Registry& GetRegistry() {
  static Registry registry;
  static std::once_flag once;
  std::call_once(once, [] {
    registry.domain = std::make_unique<Ort::CustomOpDomain>(kDomain);
    dehm::CreateCpuOps(&registry.ops);
#ifdef DEHM_WITH_CUDA
    dehm::CreateCudaOps(&registry.ops);
#endif
    for (auto& op : registry.ops) registry.domain->Add(op.get());
  });
  return registry;
}

}  // namespace

extern "C" DEHM_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  try {
    Ort::UnownedSessionOptions session_options(options);
    session_options.Add(*GetRegistry().domain);
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
