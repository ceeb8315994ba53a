// CUDA registration of the label ops (g++; the kernels are in labels.cu).
#include <torch/library.h>

#include "cuda/cuda_context.h"
#include "cuda/labels_ops.h"

namespace {

at::Tensor downscale_labels_cuda(const at::Tensor& labels, int64_t factor, int64_t num_classes,
                                 double min_ratio, int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(labels.device());
  at::Tensor out = fastuda::cuda::downscale_labels_op(
      labels, factor, num_classes, min_ratio, ignore_index,
      fastuda::cuda::current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastuda, CUDA, m) {
  m.impl("downscale_labels", &downscale_labels_cuda);
}
