// Pairwise contrast terms shared by the memory-bank (BankCL) and pixel-to-pixel (CLUDA-style)
// kernels.
//
// Both losses are sums of -log( exp(s_p) / (exp(s_p) + exp(nu)) ) = softplus(nu - s_p) over
// positive logits s_p, where nu is the logsumexp of the negatives. Its derivatives are
//   d/ds_p softplus(nu - s_p) = -sigmoid(nu - s_p),   d/dnu = sigmoid(nu - s_p),
// and d nu / d s_n = exp(s_n - nu). The float versions below are branch-free arithmetic (exp_vec
// and a Cephes-style log), so loops over a tile vectorise; the double versions call libm (they
// serve the fp64 gradient checks).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"
#include "common/online_softmax.h"

namespace fastuda {

// exp(x) for float: exp_cephes of common/online_softmax.h (the one exp polynomial).
FASTUDA_HD inline float exp_vec(float x) { return exp_poly(x); }
FASTUDA_HD inline double exp_vec(double x) { return exp(x); }

// log(x) for a positive normal float, relative error ~1 ulp (frexp-style split, Cephes logf
// polynomial on [sqrt(1/2), sqrt(2))).
FASTUDA_HD inline float log_poly(float x) {
  const int32_t bits = bits_from_float(x);
  int32_t e = ((bits >> 23) & 0xff) - 126;  // x = m * 2^e with m in [0.5, 1)
  float m = float_from_bits((bits & 0x007fffff) | 0x3f000000);
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1 : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float ef = static_cast<float>(e);
  y += -2.12194440e-4f * ef;
  y += -0.5f * z;
  return m + y + 0.693359375f * ef;
}

// log(1 + t) for t in [0, 1]: log(u) corrected by the rounding of u = 1 + t to first order,
// log(1 + t) = log(u) - ((u - 1) - t) / u, so tiny t keep full relative precision (u = 1 gives t).
// No select or branch: those kept GCC from vectorising the loops that call it.
FASTUDA_HD inline float log1p_small(float t) {
  const float u = 1.0f + t;
  return log_poly(u) - ((u - 1.0f) - t) / u;
}

FASTUDA_HD inline float softplus_fast(float x) {  // log(1 + exp(x))
  return (x > 0.0f ? x : 0.0f) + log1p_small(exp_vec(x > 0.0f ? -x : x));
}
FASTUDA_HD inline double softplus_fast(double x) { return fmax(x, 0.0) + log1p(exp(-fabs(x))); }

// The libm forms, for the CUDA kernels (where expf is one SFU instruction under --use_fast_math):
// log(1 + exp(z)) stable, 0 at z = -inf; sigmoid 0 at z = -inf. NaN stays NaN.
FASTUDA_HD inline float softplus_libm(float z) {
  return z > 0.0f ? z + log1pf(expf(-z)) : log1pf(expf(z));
}
FASTUDA_HD inline double softplus_libm(double z) {
  return z > 0.0 ? z + ::log1p(::exp(-z)) : ::log1p(::exp(z));
}
FASTUDA_HD inline float sigmoid_libm(float z) { return 1.0f / (1.0f + expf(-z)); }
FASTUDA_HD inline double sigmoid_libm(double z) { return 1.0 / (1.0 + ::exp(-z)); }

FASTUDA_HD inline float sigmoid_fast(float x) { return 1.0f / (1.0f + exp_vec(-x)); }
FASTUDA_HD inline double sigmoid_fast(double x) { return 1.0 / (1.0 + exp(-x)); }

}  // namespace fastuda
