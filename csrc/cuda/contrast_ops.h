// The proto_contrast / dist_contrast op bodies shared by the CUDA registration and its host
// emulation. Parameters are prepared with a few small ATen ops on the same device and stream
// (scaling by 1/tau and lam / (2 tau^2), symmetrising a full covariance); nothing synchronises.
#pragma once

#include <limits>
#include <tuple>

#include "cuda/launchers.h"
#include "cuda/ops_common.h"

namespace fastuda::FASTUDA_KNS {

inline void check_contrast(const char* op, const at::Tensor& feats, const at::Tensor& labels,
                           const at::Tensor& centroids, const at::Tensor* covariance,
                           const std::optional<at::Tensor>& weights, double tau) {
  check_pixels(op, feats, labels, weights);
  const int64_t D = feats.size(1);
  TORCH_CHECK_VALUE(centroids.dim() == 2 && centroids.size(1) == D, "fastuda::", op,
                    ": centroids shape ", centroids.sizes(), " does not match the feature width D=",
                    D, " of feats ", feats.sizes());
  TORCH_CHECK_VALUE(centroids.size(0) >= 1, "fastuda::", op,
                    ": need at least one class, got centroids shape ", centroids.sizes());
  TORCH_CHECK_TYPE(centroids.is_floating_point(), "fastuda::", op,
                   ": centroids must be floating point, got ", centroids.scalar_type());
  TORCH_CHECK(centroids.device() == feats.device(), "fastuda::", op, ": centroids are on ",
              centroids.device(), " but feats on ", feats.device());
  if (covariance != nullptr) {
    const at::Tensor& cv = *covariance;
    const int64_t C = centroids.size(0);
    const bool diag = cv.dim() == 2 && cv.size(0) == C && cv.size(1) == D;
    const bool full = cv.dim() == 3 && cv.size(0) == C && cv.size(1) == D && cv.size(2) == D;
    TORCH_CHECK_VALUE(diag || full, "fastuda::", op, ": covariance shape ", cv.sizes(),
                      " must be [C, D] or [C, D, D] for centroids ", centroids.sizes());
    TORCH_CHECK_TYPE(cv.is_floating_point(), "fastuda::", op,
                     ": covariance must be floating point, got ", cv.scalar_type());
    TORCH_CHECK(cv.device() == feats.device(), "fastuda::", op, ": covariance is on ",
                cv.device(), " but feats on ", feats.device());
  }
  TORCH_CHECK_VALUE(tau > 0, "fastuda::", op, ": tau must be > 0, got ", tau);
  TORCH_CHECK_VALUE(feats.size(0) * feats.size(2) < std::numeric_limits<int32_t>::max(),
                    "fastuda::", op, ": too many pixels for the CUDA kernels");
}

struct ContrastParams {
  at::Tensor mu, sig;
  CovKind cov;
};

inline ContrastParams contrast_params(const at::Tensor& feats, const at::Tensor& centroids,
                                      const at::Tensor* covariance, double tau, double lam) {
  const auto acc = acc_dtype(feats);
  ContrastParams out;
  out.mu = (centroids.to(acc) * (1.0 / tau)).contiguous();
  out.cov = CovKind::kNone;
  if (covariance != nullptr) {
    at::Tensor cv = covariance->to(acc);
    out.cov = cv.dim() == 3 ? CovKind::kFull : CovKind::kDiag;
    if (cv.dim() == 3) cv = (cv + cv.transpose(1, 2)) * 0.5;  // x^T S x = x^T sym(S) x
    out.sig = (cv * (lam / (2.0 * tau * tau))).contiguous();
  }
  return out;
}

inline std::tuple<at::Tensor, at::Tensor> contrast_forward_op(
    const char* op, const at::Tensor& feats, const at::Tensor& labels,
    const at::Tensor& centroids, const at::Tensor* covariance, double tau, double lam,
    int64_t ignore_index, const std::optional<at::Tensor>& weights, void* stream) {
  check_contrast(op, feats, labels, centroids, covariance, weights, tau);
  const int64_t B = feats.size(0), P = feats.size(2), C = centroids.size(0);
  const auto opts = feats.options().dtype(acc_dtype(feats));
  at::Tensor loss = at::empty({B, P}, opts), lse = at::empty({B, P}, opts);
  const ContrastParams prm = contrast_params(feats, centroids, covariance, tau, lam);
  const at::Tensor w = weights_for(weights, feats);
  dispatch_feats(feats, op, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    contrast_forward_launch<T>(feat_view<T>(feats), label_view(labels, op), weight_view(w),
                               prm.mu.const_data_ptr<A>(),
                               prm.sig.defined() ? prm.sig.const_data_ptr<A>() : nullptr, prm.cov,
                               C, ignore_index, loss.mutable_data_ptr<A>(),
                               lse.mutable_data_ptr<A>(), stream);
  });
  return {loss, lse};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> contrast_backward_op(
    const char* op, const at::Tensor& grad_loss, const at::Tensor& feats,
    const at::Tensor& labels, const at::Tensor& centroids, const at::Tensor* covariance,
    const at::Tensor& lse, double tau, double lam, int64_t ignore_index,
    const std::optional<at::Tensor>& weights, bool stats_grad, const Tuning& tuning,
    void* stream) {
  check_contrast(op, feats, labels, centroids, covariance, weights, tau);
  TORCH_CHECK_VALUE(grad_loss.sizes() == labels.sizes() && lse.sizes() == labels.sizes(),
                    "fastuda::", op, ": grad_loss ", grad_loss.sizes(), " and lse ", lse.sizes(),
                    " must both match labels ", labels.sizes());
  const auto acc = acc_dtype(feats);
  const int64_t B = feats.size(0), D = feats.size(1), P = feats.size(2), C = centroids.size(0);
  const ContrastParams prm = contrast_params(feats, centroids, covariance, tau, lam);
  const at::Tensor w = weights_for(weights, feats);
  const at::Tensor gl = grad_loss.to(acc).contiguous(), lse_acc = lse.to(acc).contiguous();
  at::Tensor grad_feats = at::empty({B, D, P}, feats.options());
  at::Tensor grad_mu, grad_sig;
  if (stats_grad) {
    grad_mu = at::empty({C, D}, feats.options().dtype(acc));
    if (covariance) grad_sig = at::empty(covariance->sizes(), feats.options().dtype(acc));
  }
  const size_t acc_bytes = acc == at::kDouble ? 8 : 4;
  const ContrastBackwardPlan plan =
      plan_contrast_backward(B * P, D, C, acc_bytes, stats_grad, tuning);
  at::Tensor workspace =
      at::empty({int64_t(plan.workspace_bytes())}, feats.options().dtype(at::kByte));
  if (B * P == 0) {
    if (stats_grad) {
      grad_mu.zero_();
      if (covariance) grad_sig.zero_();
    }
  } else {
    dispatch_feats(feats, op, [&](auto tag) {
      using T = decltype(tag);
      using A = acc_t<T>;
      contrast_backward_launch<T>(
          feat_view<T>(feats), label_view(labels, op), weight_view(w), prm.mu.const_data_ptr<A>(),
          prm.sig.defined() ? prm.sig.const_data_ptr<A>() : nullptr, prm.cov, C, ignore_index,
          gl.const_data_ptr<A>(), lse_acc.const_data_ptr<A>(), plan,
          grad_feats.mutable_data_ptr<T>(), stats_grad ? grad_mu.mutable_data_ptr<A>() : nullptr,
          grad_sig.defined() ? grad_sig.mutable_data_ptr<A>() : nullptr, 1.0 / tau,
          lam / (2.0 * tau * tau), workspace.mutable_data_ptr(), stream);
    });
  }
  at::Tensor grad_centroids, grad_covariance;
  if (stats_grad) {
    grad_centroids = grad_mu.to(centroids.scalar_type());
    grad_covariance = covariance ? grad_sig.to(covariance->scalar_type())
                                 : at::empty({0}, feats.options().dtype(acc));
  } else {
    grad_centroids = at::empty({0}, centroids.options());
    grad_covariance = covariance ? at::empty({0}, covariance->options())
                                 : at::empty({0}, feats.options().dtype(acc));
  }
  return {grad_feats, grad_centroids, grad_covariance};
}

}  // namespace fastuda::FASTUDA_KNS
