// Helpers of the CUDA op registrations (csrc/cuda/*.cpp, g++ in CUDA builds only): the current
// stream and launch tuning of the tensor's device.
#pragma once

#include <array>
#include <atomic>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "cuda/launchers.h"

namespace fastuda::cuda {

inline void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Reduction kernels aim for 4 blocks per SM (queried once per device; no synchronisation).
inline Tuning device_tuning(const at::Device& device) {
  static std::array<std::atomic<int>, 64> sm_count{};
  const int index = device.index() < 0 ? 0 : device.index() % 64;
  int sms = sm_count[index].load();
  if (sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device.index()));
    sm_count[index].store(sms);
  }
  return Tuning{4 * int64_t(sms), 64, 1024};
}

}  // namespace fastuda::cuda
