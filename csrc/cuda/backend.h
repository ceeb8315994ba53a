// The two builds of an op family file (csrc/cuda/<f>.cu), and the only place they differ:
//   * nvcc: the GPU kernels in fastuda::cuda, registered for the CUDA key of torch.ops.fastuda;
//   * g++ with FASTUDA_SIMT_HOST (setup.py's emulation units, fastuda._C_emu): the same text run
//     by the host SIMT emulator (common/simt_host.h) in fastuda::emu, registered as CPU ops of
//     torch.ops.fastuda_emu.
// A family's entry points open an OpLaunch on the tensor that names the device and run the op
// body through it; FASTUDA_KERNEL_IMPL(m) opens the family's registration block. The launchers
// below the op bodies take plain views (cuda/views.h) and `void* stream` (a cudaStream_t, null in
// emulation) and only enqueue work: they never synchronise.
#pragma once

// Only the ATen headers the op bodies use: <ATen/ATen.h> declares every operator and nvcc parses
// the whole unit once for the host and once per architecture, so it dominated the family's
// compile time. AT_PER_OPERATOR_HEADERS makes ATen's own headers (ATen/TensorOperators.h) include
// per-operator headers instead of <ATen/Functions.h>; TORCH_ASSERT_ONLY_METHOD_OPERATORS turns an
// include of an all-operator header into a compile error, so the unit stays lean.
#ifndef AT_PER_OPERATOR_HEADERS
#define AT_PER_OPERATOR_HEADERS
#endif
#ifndef TORCH_ASSERT_ONLY_METHOD_OPERATORS
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#endif

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "cuda/ops_common.h"

#if defined(__CUDACC__)
#include <array>
#include <atomic>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#elif !defined(FASTUDA_SIMT_HOST)
#error "cuda/backend.h: an op family file is compiled by nvcc or by g++ with FASTUDA_SIMT_HOST"
#endif

namespace fastuda::FASTUDA_KNS {

// Launch-shape knobs: a GPU wants many blocks and wide tiles; the emulation tests want several
// blocks, several tiles per block and partial tiles on small inputs.
struct Tuning {
  int64_t target_blocks;  // blocks a reduction kernel aims for (e.g. 4 x SMs)
  int32_t tile_pixels;    // pixels a reduction block stages per step (multiple of 32)
  int32_t sort_tile;      // pixels per counting-sort tile (multiple of 32)
};

// Shared-memory budget of a reduction block: CUDA's default 48 KiB per block, minus headroom.
inline constexpr size_t kSharedBudget = 46 * 1024;

#if defined(__CUDACC__)

inline constexpr bool kEmulated = false;

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

// Makes the device of `on` current for the op; the body enqueues on its current stream.
class OpLaunch {
 public:
  OpLaunch(const char* /*op*/, const at::Tensor& on, const char* /*name*/)
      : guard_(on.device()), device_(on.device()) {}
  void* stream() const { return c10::cuda::getCurrentCUDAStream().stream(); }
  Tuning tuning() const { return device_tuning(device_); }
  // A failed launch raises here; the kernels themselves are not waited for.
  template <typename Body>
  auto run(Body&& body) const {
    auto out = body();
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }

 private:
  c10::cuda::CUDAGuard guard_;
  at::Device device_;
};

#define FASTUDA_KERNEL_IMPL(m) TORCH_LIBRARY_IMPL(fastuda, CUDA, m)

#else  // FASTUDA_SIMT_HOST

inline constexpr bool kEmulated = true;

// Small tiles and few blocks, so the small test inputs still give several blocks, several tiles
// per block and partial tiles.
inline constexpr Tuning kEmuTuning{3, 32, 64};

class OpLaunch {
 public:
  // `on` (argument `name` of the op) must be a CPU tensor: the emulated kernels run on the host.
  OpLaunch(const char* op, const at::Tensor& on, const char* name) : op_(op) {
    TORCH_CHECK(on.device().is_cpu(), "fastuda_emu::", op, ": ", name,
                " must be a CPU tensor (the emulated CUDA kernels run on the host), got ",
                on.device());
  }
  void* stream() const { return nullptr; }
  Tuning tuning() const { return kEmuTuning; }
  // Errors a kernel reported during the emulated launch (a label outside [0, C), a bank_len
  // outside [0, M]) become ValueError, as in the CPU kernels; the message names the op.
  template <typename Body>
  auto run(Body&& body) const {
    try {
      return body();
    } catch (const c10::Error&) {
      throw;
    } catch (const std::runtime_error& err) {
      const std::string what = err.what();
      if (what.rfind("label value", 0) == 0 || what.rfind("bank_len", 0) == 0)
        TORCH_CHECK_VALUE(false, "fastuda::", op_, ": ", what);
      throw;
    }
  }

 private:
  const char* op_;
};

#define FASTUDA_KERNEL_IMPL(m) TORCH_LIBRARY_IMPL(fastuda_emu, CPU, m)

#endif

}  // namespace fastuda::FASTUDA_KNS
