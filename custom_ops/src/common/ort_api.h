// Which onnxruntime C API the library asks for, and what the running onnxruntime offers.
//
// The library asks onnxruntime for the oldest OrtApi version that provides everything it
// cannot do without (kRequiredOrtApi), not for the ORT_API_VERSION of the headers it was
// compiled with: onnxruntime returns null for a version newer than its own, and a custom op
// whose OrtCustomOp::version is newer than the runtime is refused at session creation.
// Functions newer than kRequiredOrtApi are used only where the runtime has them
// (RuntimeOrtApi(), set at registration).
#pragma once

namespace dehm {

// Version 16 (onnxruntime 1.16) is the oldest with everything below:
//   KernelInfo_GetInputCount / _GetOutputCount (14, called by the lite custom-op wrapper),
//   KernelInfoGetConstantInput_tensor (15), Status-returning KernelComputeV2 (16; the
//   runtime calls it only for ops whose OrtCustomOp::version is at least 16).
// Everything else the kernels call (tensor access, status, custom-op domains, the CUDA
// stream) dates from version 11 or earlier.
constexpr int kRequiredOrtApi = 16;

// Optional: KernelContext_ParallelFor (17). Without it the CPU kernel runs its tasks on the
// calling thread.
constexpr int kParallelForOrtApi = 17;

// The C API version of the onnxruntime that registered the library (0 before registration).
int RuntimeOrtApi();
void SetRuntimeOrtApi(int version);

// The API version of an onnxruntime version string: "1.20.1" -> 20 (onnxruntime 1.x
// provides C API versions 1..x); -1 when the string is not of that form.
int OrtApiOfVersionString(const char* version);

}  // namespace dehm
