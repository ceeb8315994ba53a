// CUDA registration of pixel_contrast (g++; kernels in pixel_contrast_kernels.cu).
#include <torch/library.h>

#include "cuda/cuda_context.h"
#include "cuda/pixel_contrast_ops.h"

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pixel_forward_cuda(
    const at::Tensor& feats, const at::Tensor& labels, double tau, int64_t ignore_index,
    const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& pair_weights) {
  const c10::cuda::CUDAGuard guard(feats.device());
  auto out = fastuda::cuda::pixel_contrast_forward_op(feats, labels, tau, ignore_index, weights,
                                                      pair_weights,
                                                      fastuda::cuda::current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> pixel_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& feats, const at::Tensor& labels,
    const at::Tensor& neg_lse, const at::Tensor& pos_acc, double tau, int64_t ignore_index,
    const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& pair_weights) {
  const c10::cuda::CUDAGuard guard(feats.device());
  auto out = fastuda::cuda::pixel_contrast_backward_op(
      grad_loss, feats, labels, neg_lse, pos_acc, tau, ignore_index, weights, pair_weights,
      fastuda::cuda::kPixelGradChannelsMax, fastuda::cuda::current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastuda, CUDA, m) {
  m.impl("pixel_contrast_forward", &pixel_forward_cuda);
  m.impl("pixel_contrast_backward", &pixel_backward_cuda);
}
