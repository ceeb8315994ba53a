// Exact merge of per-class sufficient statistics (Chan, Golub & LeVeque parallel formula).
//
// A set of n (possibly weighted) samples is summarised by its mean and m2 = sum w (x - mean)^2.
// Two disjoint sets merge exactly:
//   n = n_a + n_b,  delta = mean_b - mean_a,
//   mean = mean_a + delta n_b / n,  m2 = m2_a + m2_b + delta^2 n_a n_b / n.
// This never forms sum(x^2) - n mean^2, so it stays accurate for features with a large offset.
#pragma once

#include "common/macros.h"

namespace fastuda {

// Merges (n_b, mean_b, m2_b) into (mean_a, m2_a), whose count is n_a; the caller adds n_b to its
// count afterwards (one count is shared by every channel of a class). An empty side is a no-op.
template <typename T>
FASTUDA_HD inline void chan_merge_into(T n_a, T n_b, T& mean_a, T& m2_a, T mean_b, T m2_b) {
  if (!(n_b > T(0))) return;
  if (!(n_a > T(0))) {
    mean_a = mean_b;
    m2_a = m2_b;
    return;
  }
  const T w_b = n_b / (n_a + n_b);
  const T delta = mean_b - mean_a;
  mean_a += delta * w_b;
  m2_a += m2_b + delta * delta * n_a * w_b;
}

}  // namespace fastuda
