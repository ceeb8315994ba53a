// nvcc translation unit of the bank-contrast kernels (shared with the host emulation).
#include "cuda/bank_contrast_kernels.cuh"

namespace fastuda::cuda {
#define FASTUDA_INSTANTIATE(T)                                                                 \
  template void bank_contrast_forward_launch<T>(const FeatView<T>&, const LabelView&,         \
                                                const acc_t<T>*, const int64_t*, int64_t,      \
                                                int64_t, int64_t, acc_t<T>*, acc_t<T>*,        \
                                                acc_t<T>*, void*);                             \
  template void bank_contrast_backward_launch<T>(const FeatView<T>&, const LabelView&,        \
                                                 const acc_t<T>*, const int64_t*, int64_t,     \
                                                 int64_t, int64_t, const acc_t<T>*,            \
                                                 const acc_t<T>*, T*, void*, void*);
FASTUDA_INSTANTIATE(float)
FASTUDA_INSTANTIATE(c10::Half)
FASTUDA_INSTANTIATE(c10::BFloat16)
FASTUDA_INSTANTIATE(double)
#undef FASTUDA_INSTANTIATE
}  // namespace fastuda::cuda
