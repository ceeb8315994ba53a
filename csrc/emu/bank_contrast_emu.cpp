// Host emulation of the bank-contrast kernels (csrc/cuda/bank_contrast_kernels.cuh, g++).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/bank_contrast_kernels.cuh"
#include "cuda/bank_contrast_ops.h"
#include "emu/emu_common.h"

namespace {

namespace fe = fastuda::emu;

std::tuple<at::Tensor, at::Tensor> bank_forward_emu(const at::Tensor& feats,
                                                    const at::Tensor& labels,
                                                    const at::Tensor& bank,
                                                    const at::Tensor& bank_len, double tau,
                                                    int64_t ignore_index) {
  fe::check_cpu("bank_contrast_forward", feats, "feats");
  return fe::run_reporting("bank_contrast_forward", [&] {
    return fe::bank_contrast_forward_op(feats, labels, bank, bank_len, tau, ignore_index,
                                        nullptr);
  });
}

at::Tensor bank_backward_emu(const at::Tensor& grad_loss, const at::Tensor& feats,
                             const at::Tensor& labels, const at::Tensor& bank,
                             const at::Tensor& bank_len, const at::Tensor& neg_lse, double tau,
                             int64_t ignore_index) {
  fe::check_cpu("bank_contrast_backward", feats, "feats");
  return fe::run_reporting("bank_contrast_backward", [&] {
    return fe::bank_contrast_backward_op(grad_loss, feats, labels, bank, bank_len, neg_lse, tau,
                                         ignore_index, nullptr);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastuda_emu, CPU, m) {
  m.impl("bank_contrast_forward", &bank_forward_emu);
  m.impl("bank_contrast_backward", &bank_backward_emu);
}
