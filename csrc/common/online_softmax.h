// Log-sum-exp, softmax and exp helpers shared by the CPU and CUDA contrast kernels: the one place
// the exp polynomial and the online log-sum-exp update are written.
//
// online_lse_add / OnlineLogSumExp keep (max, sum of exp(x - max)) so a logsumexp can be built one
// value or one partial state at a time (column tiles, warp lanes, thread blocks) without overflow;
// merging two states is exact up to rounding. exp_cephes is an exp whose body is branch-free
// arithmetic, written once for a float or a GCC vector of floats, so loops calling it vectorise
// (libm's expf does not vectorise without -ffast-math).
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

// One step of the online logsumexp: fold x into (max, sum). NaN in x makes sum NaN.
template <typename T>
FASTUDA_HD inline void online_lse_add(T x, T& max, T& sum) {
  if (x > max) {
    sum = sum * lse_exp(max - x) + T(1);  // exp(-inf) = 0 for the first value
    max = x;
  } else {
    sum += lse_exp(x - max);
  }
}

template <typename T>
struct OnlineLogSumExp {
  T max = -std::numeric_limits<T>::infinity();
  T sum = T(0);  // sum of exp(x - max) over the values seen

  FASTUDA_HD void add(T x) { online_lse_add(x, max, sum); }

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

// Bit casts that keep loops vectorisable (a memcpy-based cast stops GCC's vectoriser on the host;
// device code has no __builtin_bit_cast for every nvcc, and memcpy is a register move there).
template <typename To, typename From>
FASTUDA_HD inline To bit_cast_hd(const From& v) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast_hd needs types of one size");
#ifdef __CUDA_ARCH__
  To out;
  memcpy(&out, &v, sizeof(To));
  return out;
#else
  return __builtin_bit_cast(To, v);
#endif
}
FASTUDA_HD inline float float_from_bits(int32_t b) { return bit_cast_hd<float>(b); }
FASTUDA_HD inline int32_t bits_from_float(float x) { return bit_cast_hd<int32_t>(x); }

// exp(x) for float lanes, relative error below 2 ulp on [-87, 88] (Cody-Waite range reduction and
// the Cephes degree-6 polynomial). V is float (I = int32_t) or a GCC vector of floats (I the int32
// vector of the same width): one body for the scalar and the explicit-vector callers. No floorf
// and no float -> int conversion (under the default -ftrapping-math either one kept loops scalar):
// the rounding uses the 1.5 * 2^23 trick, whose bits also hold the integer k. Inputs below -87
// give exp(-87) ~ 1.6e-38 instead of a denormal or 0, far below the rounding of the softmax sums
// it enters; NaN stays NaN.
template <typename V, typename I>
FASTUDA_HD inline V exp_cephes(V x) {
  const V lo = V{} - 87.0f, hi = V{} + 88.0f;
  x = x < lo ? lo : x;  // comparisons: fminf/fmaxf stay libm calls
  x = x > hi ? hi : x;
  const V big = x * 1.44269504088896341f + 12582912.0f;  // round(x / ln 2) + 1.5 * 2^23
  const V k = big - 12582912.0f;
  const V r = (x - k * 0.693359375f) + k * 2.12194440e-4f;  // x - k ln2, two-part ln2
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const I ki = bit_cast_hd<I>(big) - 0x4B400000;  // k as an integer, in [-126, 127]
  return p * bit_cast_hd<V>((ki + 127) << 23);
}

FASTUDA_HD inline float exp_poly(float x) { return exp_cephes<float, int32_t>(x); }
FASTUDA_HD inline double exp_poly(double x) { return exp(x); }

}  // namespace fastuda
