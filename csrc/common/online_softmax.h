// Log-sum-exp and softmax helpers shared by the CPU and CUDA contrast kernels.
//
// OnlineLogSumExp keeps (max, sum of exp(x - max)) so a logsumexp can be built one value or one
// partial state at a time (column tiles, warp lanes, thread blocks) without overflow; merging two
// states is exact up to rounding. exp_poly is an exp whose body is branch-free arithmetic, so a
// compiler can vectorise loops calling it (libm's expf does not vectorise without -ffast-math).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common/macros.h"

namespace fastuda {

FASTUDA_HD inline float lse_exp(float x) { return expf(x); }
FASTUDA_HD inline double lse_exp(double x) { return exp(x); }
FASTUDA_HD inline float lse_log(float x) { return logf(x); }
FASTUDA_HD inline double lse_log(double x) { return log(x); }

template <typename T>
struct OnlineLogSumExp {
  T max = -std::numeric_limits<T>::infinity();
  T sum = T(0);  // sum of exp(x - max) over the values seen

  FASTUDA_HD void add(T x) {
    if (x > max) {
      sum = sum * lse_exp(max - x) + T(1);  // exp(-inf) = 0 for the first value
      max = x;
    } else {
      sum += lse_exp(x - max);
    }
  }

  FASTUDA_HD void merge(const OnlineLogSumExp& other) {
    if (other.max > max) {
      sum = sum * lse_exp(max - other.max) + other.sum;
      max = other.max;
    } else if (other.max > -std::numeric_limits<T>::infinity()) {
      sum += other.sum * lse_exp(other.max - max);
    }
  }

  // -inf when nothing was added
  FASTUDA_HD T value() const {
    return sum > T(0) ? max + lse_log(sum) : -std::numeric_limits<T>::infinity();
  }
};

// exp(x) for float with a relative error below 2 ulp on [-87, 88] (Cody-Waite range reduction and
// the Cephes degree-6 polynomial). Inputs below -87 return exp(-87) ~ 1.6e-38 instead of a
// denormal or 0: callers use it for softmax terms where that difference is far below rounding.
FASTUDA_HD inline float exp_poly(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float k = floorf(x * 1.44269504088896341f + 0.5f);  // round(x / ln 2)
  const float r = (x - k * 0.693359375f) + k * 2.12194440e-4f;  // x - k ln2, two-part ln2
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;  // 2^k; k in [-126, 127]
  float scale;
  memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

FASTUDA_HD inline double exp_poly(double x) { return exp(x); }

}  // namespace fastuda
