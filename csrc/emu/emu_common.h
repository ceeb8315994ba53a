// Helpers of the emulated op registrations (csrc/emu/*.cpp).
#pragma once

#include <stdexcept>
#include <string>

#include <ATen/ATen.h>

#include "cuda/launchers.h"

namespace fastuda::emu {

// Small tiles and few blocks, so the small test inputs still give several blocks, several tiles
// per block and partial tiles.
inline constexpr Tuning kEmuTuning{3, 32, 64};

inline void check_cpu(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastuda_emu::", op, ": ", name,
              " must be a CPU tensor (the emulated CUDA kernels run on the host), got ",
              t.device());
}

// Errors a kernel reported during the emulated launch (a label outside [0, C), a bank_len outside
// [0, M]) become ValueError,
// as in the CPU kernels; the message names the op.
template <typename Fn>
auto run_reporting(const char* op, Fn&& fn) {
  try {
    return fn();
  } catch (const c10::Error&) {
    throw;
  } catch (const std::runtime_error& err) {
    const std::string what = err.what();
    if (what.rfind("label value", 0) == 0 || what.rfind("bank_len", 0) == 0)
      TORCH_CHECK_VALUE(false, "fastuda::", op, ": ", what);
    throw;
  }
}

}  // namespace fastuda::emu
