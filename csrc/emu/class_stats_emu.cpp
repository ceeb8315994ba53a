// Host emulation of the class-statistics kernels (csrc/cuda/class_stats_kernels.cuh, g++).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/class_stats_kernels.cuh"
#include "cuda/class_stats_ops.h"
#include "emu/emu_common.h"

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> class_stats_emu(
    const at::Tensor& feats, const at::Tensor& labels, int64_t num_classes, int64_t ignore_index,
    const std::optional<at::Tensor>& weights, bool full_cov) {
  fastuda::emu::check_cpu("class_stats", feats, "feats");
  return fastuda::emu::run_reporting("class_stats", [&] {
    return fastuda::emu::class_stats_op(feats, labels, num_classes, ignore_index, weights,
                                        full_cov, fastuda::emu::kEmuTuning, nullptr);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastuda_emu, CPU, m) {
  m.impl("class_stats", &class_stats_emu);
}
