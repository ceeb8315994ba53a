// Pairwise contrast terms shared by the memory-bank (BankCL) and pixel-to-pixel (CLUDA-style)
// kernels.
//
// Both losses are sums of -log( exp(s_p) / (exp(s_p) + exp(nu)) ) = softplus(nu - s_p) over
// positive logits s_p, where nu is the logsumexp of the negatives. Its derivatives are
//   d/ds_p softplus(nu - s_p) = -sigmoid(nu - s_p),   d/dnu = sigmoid(nu - s_p),
// and d nu / d s_n = exp(s_n - nu). The float versions below are branch-free arithmetic (exp_poly
// and a Cephes-style log), so loops over a tile vectorise; the double versions call libm (they
// serve the fp64 gradient checks).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/macros.h"
#include "common/online_softmax.h"

namespace fastuda {

// log(x) for a positive normal float, relative error ~1 ulp (frexp-style split, Cephes logf
// polynomial on [sqrt(1/2), sqrt(2))).
FASTUDA_HD inline float log_poly(float x) {
  int32_t bits;
  memcpy(&bits, &x, sizeof(bits));
  int32_t e = ((bits >> 23) & 0xff) - 126;  // x = m * 2^e with m in [0.5, 1)
  bits = (bits & 0x007fffff) | 0x3f000000;
  float m;
  memcpy(&m, &bits, sizeof(m));
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

// log(1 + t) for t in [0, 1]: log(u) * t / (u - 1) with u = 1 + t rounded corrects the rounding
// of u (Goldberg's trick), so tiny t keep full relative precision.
FASTUDA_HD inline float log1p_small(float t) {
  const float u = 1.0f + t;
  const float d = u - 1.0f;
  return d == 0.0f ? t : log_poly(u) * (t / d);
}

FASTUDA_HD inline float softplus_fast(float x) {  // log(1 + exp(x))
  return fmaxf(x, 0.0f) + log1p_small(exp_poly(-fabsf(x)));
}
FASTUDA_HD inline double softplus_fast(double x) { return fmax(x, 0.0) + log1p(exp(-fabs(x))); }

FASTUDA_HD inline float sigmoid_fast(float x) { return 1.0f / (1.0f + exp_poly(-x)); }
FASTUDA_HD inline double sigmoid_fast(double x) { return 1.0 / (1.0 + exp(-x)); }

}  // namespace fastuda
