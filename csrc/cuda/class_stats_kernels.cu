// nvcc translation unit of the class-statistics kernels (shared with the host emulation).
#include "cuda/class_stats_kernels.cuh"

namespace fastuda::cuda {
#define FASTUDA_INSTANTIATE(T)                                                              \
  template void class_stats_launch<T>(const FeatView<T>&, const LabelView&, const WeightView&, \
                                      int64_t, int64_t, const ClassStatsPlan&, acc_t<T>*,      \
                                      acc_t<T>*, acc_t<T>*, void*, void*);
FASTUDA_INSTANTIATE(float)
FASTUDA_INSTANTIATE(c10::Half)
FASTUDA_INSTANTIATE(c10::BFloat16)
FASTUDA_INSTANTIATE(double)
#undef FASTUDA_INSTANTIATE
}  // namespace fastuda::cuda
