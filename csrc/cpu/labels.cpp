// CPU kernel of fastuda::downscale_labels: majority vote per factor x factor cell (ops.md section 7).
//
// One pass over the labels: each cell is voted with a (C + 1)-slot histogram (slot C = ignore) kept
// with an online winner, then only the touched slots are reset. No one-hot tensor is formed.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/label_vote.h"

namespace fastuda {
namespace {

template <typename label_t>
void downscale(const at::Tensor& labels, at::Tensor& out, int64_t factor, int64_t C,
               float min_ratio, int64_t ignore) {
  const int64_t B = labels.size(0), H = labels.size(1), W = labels.size(2);
  const int64_t h = H / factor, w = W / factor;
  const int64_t s0 = labels.stride(0), s1 = labels.stride(1), s2 = labels.stride(2);
  const label_t* lab = labels.const_data_ptr<label_t>();
  label_t* dst = out.mutable_data_ptr<label_t>();
  const int64_t area = factor * factor;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(W * factor, 1));
  at::parallel_for(0, B * h, grain, [&](int64_t r0, int64_t r1) {
    std::vector<int32_t> counts(C + 1, 0);
    std::vector<int32_t> slots(area);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / h, oy = r % h;
      for (int64_t ox = 0; ox < w; ++ox) {
        int best = static_cast<int>(C) + 1;
        int32_t best_count = 0;
        int64_t n = 0;
        for (int64_t dy = 0; dy < factor; ++dy) {
          const int64_t y = oy * factor + dy;
          const label_t* row = lab + b * s0 + y * s1 + ox * factor * s2;
          for (int64_t dx = 0; dx < factor; ++dx) {
            const int64_t v = static_cast<int64_t>(row[dx * s2]);
            int slot;
            if (v == ignore) {
              slot = static_cast<int>(C);
            } else {
              TORCH_CHECK_VALUE(v >= 0 && v < C, "fastuda::downscale_labels: label value ", v,
                                " (batch ", b, ", row ", y, ", column ", ox * factor + dx,
                                ") is outside [0, ", C, ") and is not ignore_index (", ignore,
                                ")");
              slot = static_cast<int>(v);
            }
            slots[n++] = slot;
            vote_add(counts.data(), slot, best, best_count);
          }
        }
        for (int64_t k = 0; k < n; ++k) counts[slots[k]] = 0;
        dst[r * w + ox] = static_cast<label_t>(vote_result(
            best, best_count, static_cast<int>(area), static_cast<int>(C), min_ratio, ignore));
      }
    }
  });
}

at::Tensor downscale_labels_cpu(const at::Tensor& labels, int64_t factor, int64_t num_classes,
                                double min_ratio, int64_t ignore_index) {
  TORCH_CHECK_VALUE(labels.dim() == 3, "fastuda::downscale_labels: labels must be [B, H, W], got "
                    "shape ", labels.sizes());
  TORCH_CHECK_TYPE(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false) &&
                       labels.scalar_type() != at::kUInt16 && labels.scalar_type() != at::kUInt32 &&
                       labels.scalar_type() != at::kUInt64,
                   "fastuda::downscale_labels: labels must be uint8/int8/int16/int32/int64, got ",
                   labels.scalar_type());
  TORCH_CHECK_VALUE(factor >= 1, "fastuda::downscale_labels: factor must be >= 1, got ", factor);
  TORCH_CHECK_VALUE(num_classes >= 1, "fastuda::downscale_labels: num_classes must be >= 1, got ",
                    num_classes);
  const int64_t B = labels.size(0), H = labels.size(1), W = labels.size(2);
  TORCH_CHECK_VALUE(H % factor == 0 && W % factor == 0, "fastuda::downscale_labels: labels ", H,
                    "x", W, " are not divisible by factor ", factor);
  TORCH_CHECK_VALUE(factor * factor < (int64_t(1) << 31),
                    "fastuda::downscale_labels: factor ", factor, " is too large");
  at::Tensor out = at::empty({B, H / factor, W / factor}, labels.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_INTEGRAL_TYPES(labels.scalar_type(), "downscale_labels", [&] {
    downscale<scalar_t>(labels, out, factor, num_classes, static_cast<float>(min_ratio),
                        ignore_index);
  });
  return out;
}

}  // namespace
}  // namespace fastuda

TORCH_LIBRARY_IMPL(fastuda, CPU, m) {
  m.impl("downscale_labels", &fastuda::downscale_labels_cpu);
}
