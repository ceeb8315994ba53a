// Host emulation of the label kernels: csrc/cuda/labels_kernels.cuh compiled with g++.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/labels_kernels.cuh"
#include "cuda/labels_ops.h"

namespace {

at::Tensor downscale_labels_emu(const at::Tensor& labels, int64_t factor, int64_t num_classes,
                                double min_ratio, int64_t ignore_index) {
  return fastuda::emu::downscale_labels_op(labels, factor, num_classes, min_ratio, ignore_index,
                                           nullptr);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastuda_emu, CPU, m) {
  m.impl("downscale_labels", &downscale_labels_emu);
}
