// Host emulation of the contrast kernels (csrc/cuda/contrast_kernels.cuh, g++).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/contrast_kernels.cuh"
#include "cuda/contrast_ops.h"
#include "emu/emu_common.h"

namespace {

namespace fe = fastuda::emu;

std::tuple<at::Tensor, at::Tensor> proto_forward_emu(
    const at::Tensor& feats, const at::Tensor& labels, const at::Tensor& centroids, double tau,
    int64_t ignore_index, const std::optional<at::Tensor>& weights) {
  fe::check_cpu("proto_contrast_forward", feats, "feats");
  return fe::run_reporting("proto_contrast_forward", [&] {
    return fe::contrast_forward_op("proto_contrast_forward", feats, labels, centroids, nullptr,
                                   tau, 0.0, ignore_index, weights, nullptr);
  });
}

std::tuple<at::Tensor, at::Tensor> proto_backward_emu(
    const at::Tensor& grad_loss, const at::Tensor& feats, const at::Tensor& labels,
    const at::Tensor& centroids, const at::Tensor& lse, double tau, int64_t ignore_index,
    const std::optional<at::Tensor>& weights, bool centroids_grad) {
  fe::check_cpu("proto_contrast_backward", feats, "feats");
  return fe::run_reporting("proto_contrast_backward", [&] {
    auto [gf, gc, unused] = fe::contrast_backward_op(
        "proto_contrast_backward", grad_loss, feats, labels, centroids, nullptr, lse, tau, 0.0,
        ignore_index, weights, centroids_grad, fe::kEmuTuning, nullptr);
    return std::tuple<at::Tensor, at::Tensor>{gf, gc};
  });
}

std::tuple<at::Tensor, at::Tensor> dist_forward_emu(
    const at::Tensor& feats, const at::Tensor& labels, const at::Tensor& centroids,
    const at::Tensor& covariance, double tau, double lam, int64_t ignore_index,
    const std::optional<at::Tensor>& weights) {
  fe::check_cpu("dist_contrast_forward", feats, "feats");
  return fe::run_reporting("dist_contrast_forward", [&] {
    return fe::contrast_forward_op("dist_contrast_forward", feats, labels, centroids, &covariance,
                                   tau, lam, ignore_index, weights, nullptr);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dist_backward_emu(
    const at::Tensor& grad_loss, const at::Tensor& feats, const at::Tensor& labels,
    const at::Tensor& centroids, const at::Tensor& covariance, const at::Tensor& lse, double tau,
    double lam, int64_t ignore_index, const std::optional<at::Tensor>& weights,
    bool stats_grad) {
  fe::check_cpu("dist_contrast_backward", feats, "feats");
  return fe::run_reporting("dist_contrast_backward", [&] {
    return fe::contrast_backward_op("dist_contrast_backward", grad_loss, feats, labels, centroids,
                                    &covariance, lse, tau, lam, ignore_index, weights, stats_grad,
                                    fe::kEmuTuning, nullptr);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastuda_emu, CPU, m) {
  m.impl("proto_contrast_forward", &proto_forward_emu);
  m.impl("proto_contrast_backward", &proto_backward_emu);
  m.impl("dist_contrast_forward", &dist_forward_emu);
  m.impl("dist_contrast_backward", &dist_backward_emu);
}
