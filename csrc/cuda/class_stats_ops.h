// The class_stats op body shared by the CUDA registration and its host emulation.
#pragma once

#include <limits>
#include <tuple>

#include "cuda/launchers.h"
#include "cuda/ops_common.h"

namespace fastuda::FASTUDA_KNS {

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> class_stats_op(
    const at::Tensor& feats, const at::Tensor& labels, int64_t num_classes, int64_t ignore_index,
    const std::optional<at::Tensor>& weights, bool full_cov, const Tuning& tuning, void* stream) {
  check_pixels("class_stats", feats, labels, weights);
  TORCH_CHECK_VALUE(num_classes >= 1, "fastuda::class_stats: num_classes must be >= 1, got ",
                    num_classes);
  const int64_t B = feats.size(0), D = feats.size(1), P = feats.size(2), C = num_classes;
  TORCH_CHECK_VALUE(D >= 1, "fastuda::class_stats: feats have no channels (shape ", feats.sizes(),
                    ")");
  TORCH_CHECK_VALUE(B * P < std::numeric_limits<int32_t>::max(), "fastuda::class_stats: ", B * P,
                    " pixels exceed the 2^31 supported by the CUDA kernels");
  const auto opts = feats.options().dtype(acc_dtype(feats));
  at::Tensor count = at::empty({C}, opts);
  at::Tensor mean = at::empty({C, D}, opts);
  at::Tensor m2 = full_cov ? at::empty({C, D, D}, opts) : at::empty({C, D}, opts);
  if (B * P == 0) {
    count.zero_();
    mean.zero_();
    m2.zero_();
    return {count, mean, m2};
  }
  const size_t acc_bytes = feats.scalar_type() == at::kDouble ? 8 : 4;
  const ClassStatsPlan plan = plan_class_stats(B, D, P, C, acc_bytes, full_cov, tuning);
  const at::Tensor w = weights_for(weights, feats);
  at::Tensor workspace =
      at::empty({int64_t(plan.workspace_bytes())}, feats.options().dtype(at::kByte));
  dispatch_feats(feats, "class_stats", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    class_stats_launch<T>(feat_view<T>(feats), label_view(labels, "class_stats"),
                          weight_view(w), C, ignore_index, plan,
                          count.mutable_data_ptr<A>(), mean.mutable_data_ptr<A>(),
                          m2.mutable_data_ptr<A>(), workspace.mutable_data_ptr(), stream);
  });
  return {count, mean, m2};
}

}  // namespace fastuda::FASTUDA_KNS
