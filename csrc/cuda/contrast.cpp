// CUDA registration of proto_contrast / dist_contrast (g++; kernels in contrast_kernels.cu).
#include <torch/library.h>

#include "cuda/contrast_ops.h"
#include "cuda/cuda_context.h"

namespace {

namespace fc = fastuda::cuda;

std::tuple<at::Tensor, at::Tensor> proto_forward_cuda(
    const at::Tensor& feats, const at::Tensor& labels, const at::Tensor& centroids, double tau,
    int64_t ignore_index, const std::optional<at::Tensor>& weights) {
  const c10::cuda::CUDAGuard guard(feats.device());
  auto out = fc::contrast_forward_op("proto_contrast_forward", feats, labels, centroids, nullptr,
                                     tau, 0.0, ignore_index, weights, fc::current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> proto_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& feats, const at::Tensor& labels,
    const at::Tensor& centroids, const at::Tensor& lse, double tau, int64_t ignore_index,
    const std::optional<at::Tensor>& weights, bool centroids_grad) {
  const c10::cuda::CUDAGuard guard(feats.device());
  auto [gf, gc, unused] = fc::contrast_backward_op(
      "proto_contrast_backward", grad_loss, feats, labels, centroids, nullptr, lse, tau, 0.0,
      ignore_index, weights, centroids_grad, fc::device_tuning(feats.device()),
      fc::current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {gf, gc};
}

std::tuple<at::Tensor, at::Tensor> dist_forward_cuda(
    const at::Tensor& feats, const at::Tensor& labels, const at::Tensor& centroids,
    const at::Tensor& covariance, double tau, double lam, int64_t ignore_index,
    const std::optional<at::Tensor>& weights) {
  const c10::cuda::CUDAGuard guard(feats.device());
  auto out = fc::contrast_forward_op("dist_contrast_forward", feats, labels, centroids,
                                     &covariance, tau, lam, ignore_index, weights,
                                     fc::current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dist_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& feats, const at::Tensor& labels,
    const at::Tensor& centroids, const at::Tensor& covariance, const at::Tensor& lse, double tau,
    double lam, int64_t ignore_index, const std::optional<at::Tensor>& weights,
    bool stats_grad) {
  const c10::cuda::CUDAGuard guard(feats.device());
  auto out = fc::contrast_backward_op("dist_contrast_backward", grad_loss, feats, labels,
                                      centroids, &covariance, lse, tau, lam, ignore_index, weights,
                                      stats_grad, fc::device_tuning(feats.device()),
                                      fc::current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastuda, CUDA, m) {
  m.impl("proto_contrast_forward", &proto_forward_cuda);
  m.impl("proto_contrast_backward", &proto_backward_cuda);
  m.impl("dist_contrast_forward", &dist_forward_cuda);
  m.impl("dist_contrast_backward", &dist_backward_cuda);
}
