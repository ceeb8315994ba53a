// ATen-side helpers of the op bodies in the CUDA op family files (csrc/cuda/<f>.cu, built by nvcc
// and for the host emulation): dtype mapping, shape checks and the views handed to the launchers.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "cuda/views.h"

namespace fastuda::FASTUDA_KNS {

inline LabelKind label_kind(const at::Tensor& labels, const char* op) {
  switch (labels.scalar_type()) {
    case at::kByte: return LabelKind::U8;
    case at::kChar: return LabelKind::I8;
    case at::kShort: return LabelKind::I16;
    case at::kInt: return LabelKind::I32;
    case at::kLong: return LabelKind::I64;
    default:
      TORCH_CHECK_TYPE(false, "fastuda::", op, ": labels must be uint8, int8, int16, int32 or int64, got ",
                  labels.scalar_type());
  }
}

inline LabelView label_view(const at::Tensor& labels_bp, const char* op) {
  return LabelView{labels_bp.data_ptr(), label_kind(labels_bp, op), labels_bp.stride(0),
                   labels_bp.stride(1)};
}

template <typename T>
FeatView<T> feat_view(const at::Tensor& feats) {
  return FeatView<T>{static_cast<const T*>(feats.const_data_ptr()), feats.size(0), feats.size(1),
                     feats.size(2), feats.stride(0), feats.stride(1), feats.stride(2)};
}

// Weights must outlive the launch: pass the tensor returned by weights_for().
inline WeightView weight_view(const at::Tensor& weights) {
  if (!weights.defined()) return WeightView{nullptr, nullptr, 0, 0};
  if (weights.scalar_type() == at::kDouble)
    return WeightView{nullptr, weights.const_data_ptr<double>(), weights.stride(0),
                      weights.stride(1)};
  return WeightView{weights.const_data_ptr<float>(), nullptr, weights.stride(0),
                    weights.stride(1)};
}

// The weights as read by the kernels: fp32 (fp64 kept for fp64 features), any strides.
inline at::Tensor weights_for(const std::optional<at::Tensor>& weights, const at::Tensor& feats) {
  if (!weights.has_value() || !weights->defined()) return at::Tensor();
  const auto want = feats.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return weights->scalar_type() == want ? *weights : weights->to(want);
}

// feats [B, D, P] float, labels [B, P] integer, optional weights [B, P] fp32, same device.
inline void check_pixels(const char* op, const at::Tensor& feats, const at::Tensor& labels,
                         const std::optional<at::Tensor>& weights) {
  TORCH_CHECK_VALUE(feats.dim() == 3, "fastuda::", op, ": feats must be [B, D, P], got shape ",
              feats.sizes());
  const auto t = feats.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble,
                   "fastuda::", op, ": feats must be float32, float16, bfloat16 or float64, got ", t);
  TORCH_CHECK_VALUE(labels.dim() == 2 && labels.size(0) == feats.size(0) &&
                        labels.size(1) == feats.size(2),
                    "fastuda::", op, ": labels shape ", labels.sizes(), " does not match feats shape ",
              feats.sizes(), " (expected [", feats.size(0), ", ", feats.size(2), "])");
  label_kind(labels, op);
  TORCH_CHECK(labels.device() == feats.device(), "fastuda::", op, ": labels are on ",
              labels.device(), " but feats on ", feats.device());
  if (weights.has_value() && weights->defined()) {
    TORCH_CHECK_VALUE(weights->sizes() == labels.sizes(), "fastuda::", op, ": weights shape ",
                weights->sizes(), " does not match labels shape ", labels.sizes());
    TORCH_CHECK_TYPE(weights->scalar_type() == at::kFloat, "fastuda::", op,
                ": weights must be float32, got ", weights->scalar_type());
    TORCH_CHECK(weights->device() == feats.device(), "fastuda::", op, ": weights are on ",
                weights->device(), " but feats on ", feats.device());
  }
}

// Result dtype of the statistics/losses: fp64 for fp64 features, else fp32.
inline at::ScalarType acc_dtype(const at::Tensor& feats) {
  return feats.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Calls fn(T{}) with T the C++ scalar type of the features.
template <typename Fn>
void dispatch_feats(const at::Tensor& feats, const char* op, Fn&& fn) {
  switch (feats.scalar_type()) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    case at::kDouble: fn(double{}); break;
    default: TORCH_CHECK_TYPE(false, "fastuda::", op, ": unsupported feats dtype ", feats.scalar_type());
  }
}

}  // namespace fastuda::FASTUDA_KNS
