// nvcc translation unit of the pixel-contrast kernels (shared with the host emulation).
#include "cuda/pixel_contrast_kernels.cuh"

namespace fastuda::cuda {
#define FASTUDA_INSTANTIATE(T)                                                                  \
  template void pixel_contrast_forward_launch<T>(const FeatView<T>&, const LabelView&,         \
                                                 const WeightView&, const WeightView&, double,  \
                                                 int64_t, acc_t<T>*, acc_t<T>*, acc_t<T>*,      \
                                                 acc_t<T>*, void*);                             \
  template void pixel_contrast_backward_launch<T>(                                             \
      const FeatView<T>&, const LabelView&, const WeightView&, const WeightView&, double,      \
      int64_t, const acc_t<T>*, const acc_t<T>*, const acc_t<T>*, int32_t, T*, acc_t<T>*,      \
      acc_t<T>*, void*);
FASTUDA_INSTANTIATE(float)
FASTUDA_INSTANTIATE(c10::Half)
FASTUDA_INSTANTIATE(c10::BFloat16)
FASTUDA_INSTANTIATE(double)
#undef FASTUDA_INSTANTIATE
}  // namespace fastuda::cuda
