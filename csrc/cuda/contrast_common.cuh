// Building blocks of the one-thread-per-pixel contrast kernels, shared by the contrast,
// bank_contrast and pixel_contrast families (csrc/cuda/<f>.cu): the pixel's class, exp / log /
// online logsumexp of common/online_softmax.h, the 32-class chunk of logits against staged class
// parameters, and the grid size of a launch.
#pragma once

#include <cmath>

#include "common/online_softmax.h"
#include "cuda/views.h"

namespace fastuda::FASTUDA_KNS {

namespace contrast_detail {
constexpr int kClasses = 32;   // classes per register chunk
constexpr int kChannels = 32;  // channels per shared-memory stage
constexpr int kPixelThreads = 128;

// Label of pixel (b, p): its class, or -1 when it does not count (ignore / out of range).
FASTUDA_DEVICE_INLINE int64_t pixel_class(const LabelView& y, int64_t b, int64_t p, int64_t C,
                                          int64_t ignore_index, bool report) {
  const int64_t v = y.load(b, p);
  if (v == ignore_index) return -1;
  if (v < 0 || v >= C) {
    if (report) report_bad_label(v, C, ignore_index);
    return -1;
  }
  return v;
}

// exp, log and the online logsumexp step are those of common/online_softmax.h (shared with the
// CPU kernels); libm's expf here, which --use_fast_math maps to the SFU instruction.
template <typename A>
FASTUDA_DEVICE_INLINE A exp_acc(A v) { return lse_exp(v); }
template <typename A>
FASTUDA_DEVICE_INLINE A log_acc(A v) { return lse_log(v); }
using ::fastuda::online_lse_add;
}  // namespace contrast_detail

// Sweeps the pixel's channels for classes [c0, c0 + 32): a[k] = f . mu'_{c0+k}, bq[k] = sum_d
// S_{c0+k,d} f_d^2 (kDiag). Every thread of the block must call it (it synchronises).
template <typename T, bool kDiag>
FASTUDA_DEVICE_INLINE void class_chunk_logits(const FeatView<T>& x, int64_t b, int64_t p,
                                              bool counted, const acc_t<T>* mu,
                                              const acc_t<T>* sig, int64_t C, int64_t c0,
                                              acc_t<T> (*mu_s)[contrast_detail::kChannels],
                                              acc_t<T> (*sg_s)[contrast_detail::kChannels],
                                              acc_t<T>* a, acc_t<T>* bq) {
  using A = acc_t<T>;
  constexpr int CK = contrast_detail::kClasses, DT = contrast_detail::kChannels;
FASTUDA_UNROLL
  for (int k = 0; k < CK; ++k) {
    a[k] = A(0);
    bq[k] = A(0);
  }
  for (int64_t d0 = 0; d0 < x.D; d0 += DT) {
    __syncthreads();
    for (int e = threadIdx.x; e < CK * DT; e += blockDim.x) {
      const int k = e / DT, dd = e % DT;
      const int64_t c = c0 + k, d = d0 + dd;
      const bool in = c < C && d < x.D;
      mu_s[k][dd] = in ? mu[c * x.D + d] : A(0);
      if (kDiag) sg_s[k][dd] = in ? sig[c * x.D + d] : A(0);
    }
    __syncthreads();
    if (!counted) continue;
    const int n_d = int(x.D - d0 < DT ? x.D - d0 : DT);
    for (int dd = 0; dd < n_d; ++dd) {
      const A f = A(*x.at(b, d0 + dd, p));
      const A f2 = f * f;
FASTUDA_UNROLL
      for (int k = 0; k < CK; ++k) {
        a[k] += f * mu_s[k][dd];
        if (kDiag) bq[k] += f2 * sg_s[k][dd];
      }
    }
  }
}

// Blocks for `items` work items of `per_block` each, at most `cap` (at least 1).
inline unsigned grid_for(int64_t items, int64_t per_block, int64_t cap) {
  int64_t blocks = (items + per_block - 1) / per_block;
  if (blocks > cap) blocks = cap;
  return unsigned(blocks < 1 ? 1 : blocks);
}

}  // namespace fastuda::FASTUDA_KNS
