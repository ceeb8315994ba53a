// Host emulation of the pixel-contrast kernels (csrc/cuda/pixel_contrast_kernels.cuh, g++).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/pixel_contrast_kernels.cuh"
#include "cuda/pixel_contrast_ops.h"
#include "emu/emu_common.h"

namespace {

namespace fe = fastuda::emu;

// 32-channel gradient slices: a feature width over 32 already runs several grid.y blocks.
constexpr int32_t kEmuGradChannels = 32;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pixel_forward_emu(
    const at::Tensor& feats, const at::Tensor& labels, double tau, int64_t ignore_index,
    const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& pair_weights) {
  fe::check_cpu("pixel_contrast_forward", feats, "feats");
  return fe::run_reporting("pixel_contrast_forward", [&] {
    return fe::pixel_contrast_forward_op(feats, labels, tau, ignore_index, weights, pair_weights,
                                         nullptr);
  });
}

std::tuple<at::Tensor, at::Tensor> pixel_backward_emu(
    const at::Tensor& grad_loss, const at::Tensor& feats, const at::Tensor& labels,
    const at::Tensor& neg_lse, const at::Tensor& pos_acc, double tau, int64_t ignore_index,
    const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& pair_weights) {
  fe::check_cpu("pixel_contrast_backward", feats, "feats");
  return fe::run_reporting("pixel_contrast_backward", [&] {
    return fe::pixel_contrast_backward_op(grad_loss, feats, labels, neg_lse, pos_acc, tau,
                                          ignore_index, weights, pair_weights, kEmuGradChannels,
                                          nullptr);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastuda_emu, CPU, m) {
  m.impl("pixel_contrast_forward", &pixel_forward_emu);
  m.impl("pixel_contrast_backward", &pixel_backward_emu);
}
