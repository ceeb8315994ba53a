// Majority-vote label downscaling (ops.md section 7): one thread per output cell.
#pragma once

#include "cuda/views.h"

namespace fastuda::FASTUDA_KNS {

// The vote needs no per-class histogram (so no limit on C and no shared memory): the thread walks
// the cell's k = factor^2 labels once per distinct value, counting its occurrences. A segmentation
// cell holds one or a few classes, so this is ~k reads per cell in practice (k * distinct at worst).
__global__ void __launch_bounds__(256)
downscale_labels_kernel(const void* labels, LabelKind kind, int64_t stride_b, int64_t stride_y,
                        int64_t stride_x, int64_t B, int64_t h, int64_t w, int32_t factor,
                        int64_t num_classes, float min_ratio, int64_t ignore_index, void* out,
                        LabelKind out_kind) {
  const int64_t cells = B * h * w;
  const int32_t k = factor * factor;
  for (int64_t cell = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; cell < cells;
       cell += int64_t(gridDim.x) * blockDim.x) {
    const int64_t ox = cell % w, oy = (cell / w) % h, b = cell / (w * h);
    const int64_t base = b * stride_b + oy * factor * stride_y + ox * factor * stride_x;
    // class ids stay, everything outside [0, C) (ignore included) becomes slot C
    auto key = [&](int32_t i) {
      const int64_t v = load_label(labels, kind, base + (i / factor) * stride_y +
                                                      (i % factor) * stride_x);
      return (v >= 0 && v < num_classes) ? v : num_classes;
    };
    int64_t best_key = num_classes + 1;
    int32_t best_count = 0;
    for (int32_t i = 0; i < k && best_count <= k - i; ++i) {
      const int64_t ki = key(i);
      bool seen = false;
      for (int32_t j = 0; j < i && !seen; ++j) seen = key(j) == ki;
      if (seen) continue;
      int32_t count = 1;
      for (int32_t j = i + 1; j < k; ++j) count += key(j) == ki;
      // ties go to the lowest id; the ignore slot C ranks after every class
      if (count > best_count || (count == best_count && ki < best_key)) {
        best_count = count;
        best_key = ki;
      }
    }
    const float ratio = float(best_count) / float(k);
    const bool drop = best_key == num_classes || ratio < min_ratio;
    store_label(out, out_kind, cell, drop ? ignore_index : best_key);
  }
}

// labels [B, H, W] (any strides) -> out [B, H/factor, W/factor] contiguous, same dtype.
void downscale_labels_launch(const void* labels, LabelKind kind, int64_t stride_b,
                             int64_t stride_y, int64_t stride_x, int64_t B, int64_t H, int64_t W,
                             int32_t factor, int64_t num_classes, float min_ratio,
                             int64_t ignore_index, void* out, void* stream) {
  const int64_t h = H / factor, w = W / factor, cells = B * h * w;
  if (cells == 0) return;
  constexpr unsigned threads = 256;
  const int64_t blocks = (cells + threads - 1) / threads;
  const unsigned grid = unsigned(blocks < 65536 ? blocks : 65536);
  FASTUDA_LAUNCH(downscale_labels_kernel, dim3(grid), dim3(threads), 0, stream, labels, kind,
                 stride_b, stride_y, stride_x, B, h, w, factor, num_classes, min_ratio,
                 ignore_index, out, kind);
}

}  // namespace fastuda::FASTUDA_KNS
