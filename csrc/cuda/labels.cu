// Majority-vote label downscaling (ops.md section 7): one thread per output cell.
//
// The label family's CUDA side in one file: kernel, launch, op body and registration. nvcc builds
// it for the GPU, g++ for the host SIMT emulator (cuda/backend.h says what differs).
#include "cuda/backend.h"

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
    auto label_at = [&](int32_t i) {
      return load_label(labels, kind, base + (i / factor) * stride_y + (i % factor) * stride_x);
    };
    // every label of the cell is checked before the vote, which may stop before reading them all
    for (int32_t i = 0; i < k; ++i) {
      const int64_t v = label_at(i);
      if ((v < 0 || v >= num_classes) && v != ignore_index) {
        report_bad_label(v, num_classes, ignore_index);
        break;
      }
    }
    // class ids stay, ignore becomes slot C
    auto key = [&](int32_t i) {
      const int64_t v = label_at(i);
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

// ---- op body ------------------------------------------------------------------------------------
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

namespace {

namespace fk = fastuda::FASTUDA_KNS;

at::Tensor downscale_labels_entry(const at::Tensor& labels, int64_t factor, int64_t num_classes,
                                  double min_ratio, int64_t ignore_index) {
  const fk::OpLaunch launch("downscale_labels", labels, "labels");
  return launch.run([&] {
    return fk::downscale_labels_op(labels, factor, num_classes, min_ratio, ignore_index,
                                   launch.stream());
  });
}

}  // namespace

FASTUDA_KERNEL_IMPL(m) {
  m.impl("downscale_labels", &downscale_labels_entry);
}
