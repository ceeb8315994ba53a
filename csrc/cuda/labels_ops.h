// The downscale_labels op body shared by the CUDA registration and its host emulation.
#pragma once

#include "cuda/launchers.h"
#include "cuda/ops_common.h"

namespace fastuda::FASTUDA_KNS {

inline at::Tensor downscale_labels_op(const at::Tensor& labels, int64_t factor,
                                      int64_t num_classes, double min_ratio,
                                      int64_t ignore_index, void* stream) {
  TORCH_CHECK_VALUE(labels.dim() == 3, "fastuda::downscale_labels: labels must be [B, H, W], got shape ",
              labels.sizes());
  TORCH_CHECK_VALUE(factor >= 1, "fastuda::downscale_labels: factor must be >= 1, got ", factor);
  TORCH_CHECK_VALUE(factor <= 46340, "fastuda::downscale_labels: factor ", factor,
              " is too large (the cell's factor^2 votes are counted in int32)");
  TORCH_CHECK_VALUE(num_classes >= 1, "fastuda::downscale_labels: num_classes must be >= 1, got ",
              num_classes);
  const int64_t B = labels.size(0), H = labels.size(1), W = labels.size(2);
  TORCH_CHECK_VALUE(H % factor == 0 && W % factor == 0, "fastuda::downscale_labels: labels ", H, "x", W,
              " are not divisible by factor ", factor);
  const LabelKind kind = label_kind(labels, "downscale_labels");
  at::Tensor out = at::empty({B, H / factor, W / factor}, labels.options());
  downscale_labels_launch(labels.const_data_ptr(), kind, labels.stride(0), labels.stride(1),
                          labels.stride(2), B, H, W, int32_t(factor), num_classes,
                          float(min_ratio), ignore_index, out.mutable_data_ptr(), stream);
  return out;
}

}  // namespace fastuda::FASTUDA_KNS
