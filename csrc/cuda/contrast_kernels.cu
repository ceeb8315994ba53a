// nvcc translation unit of the contrast kernels (shared with the host emulation).
#include "cuda/contrast_kernels.cuh"

namespace fastuda::cuda {
#define FASTUDA_INSTANTIATE(T)                                                                  \
  template void contrast_forward_launch<T>(const FeatView<T>&, const LabelView&,               \
                                           const WeightView&, const acc_t<T>*, const acc_t<T>*, \
                                           CovKind, int64_t, int64_t, acc_t<T>*, acc_t<T>*,     \
                                           void*);                                              \
  template void contrast_backward_launch<T>(                                                   \
      const FeatView<T>&, const LabelView&, const WeightView&, const acc_t<T>*,                \
      const acc_t<T>*, CovKind, int64_t, int64_t, const acc_t<T>*, const acc_t<T>*,            \
      const ContrastBackwardPlan&, T*, acc_t<T>*, acc_t<T>*, double, double, void*, void*);
FASTUDA_INSTANTIATE(float)
FASTUDA_INSTANTIATE(c10::Half)
FASTUDA_INSTANTIATE(c10::BFloat16)
FASTUDA_INSTANTIATE(double)
#undef FASTUDA_INSTANTIATE
}  // namespace fastuda::cuda
