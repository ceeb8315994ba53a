// The bank_contrast op bodies shared by the CUDA registration and its host emulation.
#pragma once

#include <limits>
#include <tuple>

#include "cuda/launchers.h"
#include "cuda/ops_common.h"

namespace fastuda::FASTUDA_KNS {

inline void check_bank(const char* op, const at::Tensor& feats, const at::Tensor& labels,
                       const at::Tensor& bank, const at::Tensor& bank_len, double tau) {
  check_pixels(op, feats, labels, std::nullopt);
  TORCH_CHECK_VALUE(bank.dim() == 3 && bank.size(2) == feats.size(1), "fastuda::", op,
                    ": bank shape ", bank.sizes(), " does not match feats ", feats.sizes(),
                    " (expected [C, M, ", feats.size(1), "])");
  TORCH_CHECK_VALUE(bank.size(0) >= 1, "fastuda::", op, ": bank ", bank.sizes(),
                    " holds no class");
  TORCH_CHECK_VALUE(bank_len.dim() == 1 && bank_len.size(0) == bank.size(0), "fastuda::", op,
                    ": bank_len shape ", bank_len.sizes(), " does not match bank ", bank.sizes(),
                    " (expected [", bank.size(0), "])");
  TORCH_CHECK_TYPE(bank.is_floating_point(), "fastuda::", op, ": bank must be floating point, got ",
                   bank.scalar_type());
  TORCH_CHECK_TYPE(!bank_len.is_floating_point() && !bank_len.is_complex(), "fastuda::", op,
                   ": bank_len must be an integer tensor, got ", bank_len.scalar_type());
  TORCH_CHECK(bank.device() == feats.device() && bank_len.device() == feats.device(),
              "fastuda::", op, ": bank (", bank.device(), ") and bank_len (", bank_len.device(),
              ") must be on the device of feats (", feats.device(), ")");
  TORCH_CHECK_VALUE(tau > 0, "fastuda::", op, ": tau must be > 0, got ", tau);
  TORCH_CHECK_VALUE(feats.size(0) * feats.size(2) < std::numeric_limits<int32_t>::max(),
                    "fastuda::", op, ": too many pixels for the CUDA kernels");
}

inline std::tuple<at::Tensor, at::Tensor> bank_contrast_forward_op(
    const at::Tensor& feats, const at::Tensor& labels, const at::Tensor& bank,
    const at::Tensor& bank_len, double tau, int64_t ignore_index, void* stream) {
  const char* op = "bank_contrast_forward";
  check_bank(op, feats, labels, bank, bank_len, tau);
  const auto acc = acc_dtype(feats);
  const int64_t B = feats.size(0), D = feats.size(1), P = feats.size(2);
  const int64_t C = bank.size(0), M = bank.size(1);
  const auto opts = feats.options().dtype(acc);
  at::Tensor loss = at::empty({B, P}, opts), neg_lse = at::empty({B, P}, opts);
  const at::Tensor bank_s = (bank.to(acc) * (1.0 / tau)).contiguous();
  const at::Tensor lens = bank_len.to(at::kLong).contiguous();
  at::Tensor bbar = at::empty({C, D}, opts);
  dispatch_feats(feats, op, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    bank_contrast_forward_launch<T>(feat_view<T>(feats), label_view(labels, op),
                                    bank_s.const_data_ptr<A>(), lens.const_data_ptr<int64_t>(),
                                    C, M, ignore_index, bbar.mutable_data_ptr<A>(),
                                    loss.mutable_data_ptr<A>(), neg_lse.mutable_data_ptr<A>(),
                                    stream);
  });
  return {loss, neg_lse};
}

inline at::Tensor bank_contrast_backward_op(const at::Tensor& grad_loss, const at::Tensor& feats,
                                            const at::Tensor& labels, const at::Tensor& bank,
                                            const at::Tensor& bank_len, const at::Tensor& neg_lse,
                                            double tau, int64_t ignore_index, void* stream) {
  const char* op = "bank_contrast_backward";
  check_bank(op, feats, labels, bank, bank_len, tau);
  TORCH_CHECK_VALUE(grad_loss.sizes() == labels.sizes() && neg_lse.sizes() == labels.sizes(),
                    "fastuda::", op, ": grad_loss ", grad_loss.sizes(), " and neg_lse ",
                    neg_lse.sizes(), " must match labels ", labels.sizes());
  const auto acc = acc_dtype(feats);
  const int64_t B = feats.size(0), D = feats.size(1), P = feats.size(2);
  const int64_t C = bank.size(0), M = bank.size(1);
  const at::Tensor bank_s = (bank.to(acc) * (1.0 / tau)).contiguous();
  const at::Tensor lens = bank_len.to(at::kLong).contiguous();
  const at::Tensor gl = grad_loss.to(acc).contiguous(), nu = neg_lse.to(acc).contiguous();
  at::Tensor grad_feats = at::empty({B, D, P}, feats.options());
  at::Tensor workspace = at::empty({C * D + (M + C) * B * P}, feats.options().dtype(acc));
  dispatch_feats(feats, op, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    bank_contrast_backward_launch<T>(feat_view<T>(feats), label_view(labels, op),
                                     bank_s.const_data_ptr<A>(), lens.const_data_ptr<int64_t>(),
                                     C, M, ignore_index, gl.const_data_ptr<A>(),
                                     nu.const_data_ptr<A>(), grad_feats.mutable_data_ptr<T>(),
                                     workspace.mutable_data_ptr(), stream);
  });
  return grad_feats;
}

}  // namespace fastuda::FASTUDA_KNS
