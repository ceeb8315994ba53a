// Portability layer for fastuda's CUDA kernel sources (the op family files csrc/cuda/<f>.cu).
//
// The same kernel text compiles in two ways:
//   * under nvcc (csrc/cuda/<f>.cu): the real CUDA built-ins, launches with <<<...>>>;
//   * under g++ with FASTUDA_SIMT_HOST defined (setup.py's build/emu_units/<f>.cpp, which include
//     the family file -> fastuda._C_emu): the host SIMT emulator of common/simt_host.h, which runs
//     every block's threads as cooperative fibers so the CPU test suite executes the kernels' own
//     code (see csrc/README.md).
// The kernels themselves use only this header and cuda/views.h (no ATen type reaches a kernel or a
// launcher); the op bodies of the same file use ATen (cuda/backend.h).
#pragma once

#include <cstdint>
#include <string>

#if defined(__CUDACC__)
#include <cuda_runtime.h>

#include <cassert>
#include <cstdio>
#define FASTUDA_KNS cuda  // kernel namespace: fastuda::cuda (device) / fastuda::emu (host emulation)
#define FASTUDA_HD_INLINE __host__ __device__ __forceinline__
#define FASTUDA_DEVICE_INLINE __device__ __forceinline__
#define FASTUDA_UNROLL _Pragma("unroll")  // g++ does not know nvcc's loop pragma
// kernel<<<grid, block, shared bytes, stream>>>(args...)
#define FASTUDA_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), static_cast<cudaStream_t>(stream)>>>(__VA_ARGS__)
// The block's dynamic shared memory as T* (bytes given at launch).
#define FASTUDA_DYNAMIC_SHARED(T, name)                                  \
  extern __shared__ __align__(16) unsigned char fastuda_dynamic_smem_[]; \
  T* name = reinterpret_cast<T*>(fastuda_dynamic_smem_)
#elif defined(FASTUDA_SIMT_HOST)
#include "common/simt_host.h"
#define FASTUDA_KNS emu
#define FASTUDA_HD_INLINE inline
#define FASTUDA_DEVICE_INLINE inline
#define FASTUDA_UNROLL
#define FASTUDA_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::fastuda::simt::launch((grid), (block), (smem), kernel, __VA_ARGS__)
#define FASTUDA_DYNAMIC_SHARED(T, name) \
  T* name = reinterpret_cast<T*>(::fastuda::simt::dynamic_shared())
#else
#error "common/simt.h: kernel sources are compiled by nvcc or by g++ with FASTUDA_SIMT_HOST"
#endif

namespace fastuda {

// A label outside [0, C) that is not ignore_index. On a GPU: the value is printed and a device-side
// assert fires (the error surfaces at the next synchronisation, as for torch's own index checks;
// an op never synchronises the host to look for it). In emulation the launch raises a
// std::runtime_error with the same message once the kernel has finished. Callers then treat the
// pixel as ignored, so nothing reads out of bounds either way.
#if defined(__CUDACC__)
__device__ __noinline__ inline void report_bad_label(int64_t value, int64_t num_classes,
                                                     int64_t ignore_index) {
  printf("fastuda: label value %lld is outside [0, %lld) and is not ignore_index (%lld)\n",
         static_cast<long long>(value), static_cast<long long>(num_classes),
         static_cast<long long>(ignore_index));
  __assert_fail("label value outside [0, num_classes) and not ignore_index", __FILE__, __LINE__,
                __func__);
}
// bank_len[c] outside [0, M]: reported like a bad label.
__device__ __noinline__ inline void report_bad_bank_len(int64_t c, int64_t len, int64_t M) {
  printf("fastuda: bank_len[%lld] = %lld is outside [0, %lld] (M = bank.shape[1])\n",
         static_cast<long long>(c), static_cast<long long>(len), static_cast<long long>(M));
  __assert_fail("bank_len outside [0, M]", __FILE__, __LINE__, __func__);
}
#elif defined(FASTUDA_SIMT_HOST)
inline void report_bad_bank_len(int64_t c, int64_t len, int64_t M) {
  simt::report_kernel_error("bank_len[" + std::to_string(c) + "] = " + std::to_string(len) +
                            " is outside [0, " + std::to_string(M) + "] (M = bank.shape[1])");
}
inline void report_bad_label(int64_t value, int64_t num_classes, int64_t ignore_index) {
  simt::report_kernel_error("label value " + std::to_string(value) + " is outside [0, " +
                            std::to_string(num_classes) + ") and is not ignore_index (" +
                            std::to_string(ignore_index) + ")");
}
#endif

}  // namespace fastuda
