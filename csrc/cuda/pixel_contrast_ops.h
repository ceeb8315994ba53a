// The pixel_contrast op bodies shared by the CUDA registration and its host emulation: checks,
// output allocation, the per-pixel inputs in the accumulation dtype, launch. Nothing synchronises.
#pragma once

#include <limits>
#include <optional>
#include <tuple>

#include "cuda/launchers.h"
#include "cuda/ops_common.h"

namespace fastuda::FASTUDA_KNS {

inline void check_pixel_map(const char* op, const char* name, const at::Tensor& t,
                            const at::Tensor& feats, const at::Tensor& labels) {
  TORCH_CHECK_VALUE(t.sizes() == labels.sizes(), "fastuda::", op, ": ", name, " shape ",
                    t.sizes(), " does not match labels shape ", labels.sizes());
  TORCH_CHECK_TYPE(t.is_floating_point(), "fastuda::", op, ": ", name,
                   " must be floating point, got ", t.scalar_type());
  TORCH_CHECK(t.device() == feats.device(), "fastuda::", op, ": ", name, " is on ", t.device(),
              " but feats on ", feats.device());
}

inline void check_pixel_contrast(const char* op, const at::Tensor& feats,
                                 const at::Tensor& labels,
                                 const std::optional<at::Tensor>& weights,
                                 const std::optional<at::Tensor>& pair_weights, double tau) {
  check_pixels(op, feats, labels, std::nullopt);
  if (weights.has_value() && weights->defined())
    check_pixel_map(op, "weights", *weights, feats, labels);
  if (pair_weights.has_value() && pair_weights->defined())
    check_pixel_map(op, "pair_weights", *pair_weights, feats, labels);
  TORCH_CHECK_VALUE(tau > 0, "fastuda::", op, ": tau must be > 0, got ", tau);
  TORCH_CHECK_VALUE(feats.size(0) * feats.size(2) < std::numeric_limits<int32_t>::max(),
                    "fastuda::", op, ": too many pixels for the CUDA kernels");
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pixel_contrast_forward_op(
    const at::Tensor& feats, const at::Tensor& labels, double tau, int64_t ignore_index,
    const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& pair_weights,
    void* stream) {
  const char* op = "pixel_contrast_forward";
  check_pixel_contrast(op, feats, labels, weights, pair_weights, tau);
  const int64_t B = feats.size(0), P = feats.size(2);
  const auto opts = feats.options().dtype(acc_dtype(feats));
  at::Tensor loss = at::empty({B, P}, opts), neg_lse = at::empty({B, P}, opts);
  at::Tensor pos_acc = at::empty({B, P}, opts), n_pos = at::empty({B, P}, opts);
  if (B * P == 0) return {loss, neg_lse, pos_acc, n_pos};
  const at::Tensor w = weights_for(weights, feats), a = weights_for(pair_weights, feats);
  dispatch_feats(feats, op, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    pixel_contrast_forward_launch<T>(feat_view<T>(feats), label_view(labels, op), weight_view(w),
                                     weight_view(a), tau, ignore_index,
                                     loss.mutable_data_ptr<A>(), neg_lse.mutable_data_ptr<A>(),
                                     pos_acc.mutable_data_ptr<A>(), n_pos.mutable_data_ptr<A>(),
                                     stream);
  });
  return {loss, neg_lse, pos_acc, n_pos};
}

// grad_channels: channels of the feature gradient per block (kPixelGradChannelsMax on a GPU;
// fewer in emulation, so small inputs still split D over several blocks).
inline std::tuple<at::Tensor, at::Tensor> pixel_contrast_backward_op(
    const at::Tensor& grad_loss, const at::Tensor& feats, const at::Tensor& labels,
    const at::Tensor& neg_lse, const at::Tensor& pos_acc, double tau, int64_t ignore_index,
    const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& pair_weights,
    int32_t grad_channels, void* stream) {
  const char* op = "pixel_contrast_backward";
  check_pixel_contrast(op, feats, labels, weights, pair_weights, tau);
  check_pixel_map(op, "grad_loss", grad_loss, feats, labels);
  check_pixel_map(op, "neg_lse", neg_lse, feats, labels);
  check_pixel_map(op, "pos_acc", pos_acc, feats, labels);
  TORCH_CHECK(grad_channels >= 32 && grad_channels <= kPixelGradChannelsMax &&
                  grad_channels % 32 == 0,
              "fastuda::", op, ": grad_channels must be a multiple of 32 in [32, ",
              kPixelGradChannelsMax, "], got ", grad_channels);
  const auto acc = acc_dtype(feats);
  const int64_t B = feats.size(0), D = feats.size(1), P = feats.size(2);
  const bool has_pair = pair_weights.has_value() && pair_weights->defined();
  at::Tensor grad_feats = at::empty({B, D, P}, feats.options());
  at::Tensor grad_pair = has_pair ? at::empty({B, P}, feats.options().dtype(acc)) : at::Tensor();
  if (B * P > 0) {
    const at::Tensor gl = grad_loss.to(acc).contiguous(), nu = neg_lse.to(acc).contiguous();
    const at::Tensor pa = pos_acc.to(acc).contiguous();
    const at::Tensor w = weights_for(weights, feats), a = weights_for(pair_weights, feats);
    at::Tensor coef = at::empty({B * P}, feats.options().dtype(acc));  // c_n: B * P scalars
    dispatch_feats(feats, op, [&](auto tag) {
      using T = decltype(tag);
      using A = acc_t<T>;
      pixel_contrast_backward_launch<T>(
          feat_view<T>(feats), label_view(labels, op), weight_view(w), weight_view(a), tau,
          ignore_index, gl.const_data_ptr<A>(), nu.const_data_ptr<A>(), pa.const_data_ptr<A>(),
          grad_channels, grad_feats.mutable_data_ptr<T>(),
          has_pair ? grad_pair.mutable_data_ptr<A>() : nullptr, coef.mutable_data_ptr<A>(),
          stream);
    });
  }
  // the gradient of the pair weights in their own dtype, as the CPU kernel returns it
  if (!has_pair) return {grad_feats, at::empty({0}, feats.options().dtype(at::kFloat))};
  return {grad_feats, grad_pair.to(pair_weights->scalar_type())};
}

}  // namespace fastuda::FASTUDA_KNS
