// CUDA registration of class_stats (g++; the kernels are in class_stats.cu).
#include <torch/library.h>

#include "cuda/class_stats_ops.h"
#include "cuda/cuda_context.h"

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> class_stats_cuda(
    const at::Tensor& feats, const at::Tensor& labels, int64_t num_classes, int64_t ignore_index,
    const std::optional<at::Tensor>& weights, bool full_cov) {
  const c10::cuda::CUDAGuard guard(feats.device());
  auto out = fastuda::cuda::class_stats_op(feats, labels, num_classes, ignore_index, weights,
                                           full_cov, fastuda::cuda::device_tuning(feats.device()),
                                           fastuda::cuda::current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastuda, CUDA, m) {
  m.impl("class_stats", &class_stats_cuda);
}
