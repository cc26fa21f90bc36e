// Entry point of the library: onnxruntime calls RegisterCustomOps when a session registers it
// (SessionOptions.register_custom_ops_library). Registers HMatMul in domain "ai.dehm",
// version 1 (contract: dehm_onnx/ops/hmatmul.py): one kernel per (execution provider, X type,
// data type), data of X's type for layout v1 and uint8 for layout v2 (CPU only). It asks
// onnxruntime for C API version kRequiredOrtApi (common/ort_api.h); an older onnxruntime gets
// an error status naming both versions instead of a crash.
#include <atomic>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/ort_api.h"

#include "cpu/hmatmul_cpu.h"
#ifdef DEHM_WITH_CUDA
#include "cuda/hmatmul_cuda.h"
#endif

#if defined(_WIN32)
#define DEHM_EXPORT __declspec(dllexport)
#else
#define DEHM_EXPORT __attribute__((visibility("default")))
#endif

namespace dehm {
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
    dehm::CreateCpuOpsV2(&registry.ops);
#ifdef DEHM_WITH_CUDA
    dehm::CreateCudaOps(&registry.ops);
#endif
    for (auto& op : registry.ops) {
      // The lite wrapper stamps the headers' ORT_API_VERSION; onnxruntime refuses ops newer
      // than itself and hands each kernel GetApi(op->version).
      op->version = kRequiredOrtApi;
      registry.domain->Add(op.get());
    }
  });
  return registry;
}

std::atomic<int> g_runtime_api{0};

// An error status for an onnxruntime without API version kRequiredOrtApi, made with API
// version 1, which every onnxruntime provides.
OrtStatus* TooOldStatus(const OrtApiBase* api_base, const char* version, int runtime_api) {
  const OrtApi* v1 = api_base->GetApi(1);
  std::string msg = "the dehm HMatMul library needs onnxruntime C API version " + std::to_string(kRequiredOrtApi) +
                    " (onnxruntime >= 1." + std::to_string(kRequiredOrtApi) + "); this onnxruntime " +
                    (version ? version : "(unknown)") + " provides API version " +
                    (runtime_api > 0 ? std::to_string(runtime_api) : std::string("(unknown)"));
  return v1 != nullptr ? v1->CreateStatus(ORT_FAIL, msg.c_str()) : nullptr;
}

}  // namespace

int RuntimeOrtApi() { return g_runtime_api.load(std::memory_order_relaxed); }
void SetRuntimeOrtApi(int version) { g_runtime_api.store(version, std::memory_order_relaxed); }

int OrtApiOfVersionString(const char* version) {
  if (version == nullptr) return -1;
  char* end = nullptr;
  const long major = std::strtol(version, &end, 10);
  if (end == version || *end != '.') return -1;
  const char* minor_at = end + 1;
  const long minor = std::strtol(minor_at, &end, 10);
  if (end == minor_at || major < 1) return -1;
  if (major > 1) return 1 << 20;  // a future major version: assume every 1.x API is there
  return static_cast<int>(minor);
}

}  // namespace dehm

// The C API version the library asks for (read by dehm_onnx.ops.library before registering).
extern "C" DEHM_EXPORT int DehmRequiredOrtApiVersion() { return dehm::kRequiredOrtApi; }

extern "C" DEHM_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  using namespace dehm;
  const char* version = api_base->GetVersionString();
  const int runtime_api = OrtApiOfVersionString(version);
  // GetApi of a version the runtime lacks logs an error and returns null; skip the call
  // when the version string already says so.
  const OrtApi* api = runtime_api < 0 || runtime_api >= kRequiredOrtApi ? api_base->GetApi(kRequiredOrtApi) : nullptr;
  if (api == nullptr) return TooOldStatus(api_base, version, runtime_api);
  SetRuntimeOrtApi(runtime_api < 0 ? kRequiredOrtApi : runtime_api);
  Ort::InitApi(api);
  try {
    Ort::UnownedSessionOptions session_options(options);
    session_options.Add(*GetRegistry().domain);
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
