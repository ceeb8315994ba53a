// CUDA registration of bank_contrast (g++; kernels in bank_contrast_kernels.cu).
#include <torch/library.h>

#include "cuda/bank_contrast_ops.h"
#include "cuda/cuda_context.h"

namespace {

std::tuple<at::Tensor, at::Tensor> bank_forward_cuda(const at::Tensor& feats,
                                                     const at::Tensor& labels,
                                                     const at::Tensor& bank,
                                                     const at::Tensor& bank_len, double tau,
                                                     int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(feats.device());
  auto out = fastuda::cuda::bank_contrast_forward_op(feats, labels, bank, bank_len, tau,
                                                     ignore_index, fastuda::cuda::current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor bank_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& feats,
                              const at::Tensor& labels, const at::Tensor& bank,
                              const at::Tensor& bank_len, const at::Tensor& neg_lse, double tau,
                              int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(feats.device());
  at::Tensor out = fastuda::cuda::bank_contrast_backward_op(
      grad_loss, feats, labels, bank, bank_len, neg_lse, tau, ignore_index,
      fastuda::cuda::current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastuda, CUDA, m) {
  m.impl("bank_contrast_forward", &bank_forward_cuda);
  m.impl("bank_contrast_backward", &bank_backward_cuda);
}
