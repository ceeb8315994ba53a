// CPU helpers shared by bank_contrast.cpp and pixel_contrast.cpp: reading [B, P] label/weight
// tensors of any dtype and strides, matrix views for the tile GEMMs and the row kernels of the
// pair terms; and, for pixel_contrast, moving pixel features between the channels-first
// [B, D, P] layout and a class-sorted, pixel-major [n, D] scratch matrix.
//
// A pixel is addressed by its flat id i = b * P + p. `slot[i]` is its row in the sorted matrix, or
// -1 when the pixel takes no part (ignored, or its class is skipped).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/pair_contrast.h"

namespace fastuda::cpu {

constexpr int64_t kPixelTile = 16;  // pixels per gather/scatter tile (one cache line of fp32)

// Calls fn(const scalar_t* data) for an integer labels tensor (uint8, int8, int16, int32, int64).
template <typename Fn>
void with_labels(const at::Tensor& labels, const char* op, Fn&& fn) {
  TORCH_CHECK(!at::isFloatingType(labels.scalar_type()) && labels.scalar_type() != at::kBool &&
                  !at::isComplexType(labels.scalar_type()),
              op, ": labels must be an integer tensor, got ", labels.scalar_type());
  AT_DISPATCH_INTEGRAL_TYPES(labels.scalar_type(), "fastuda_labels", [&] { fn(labels.const_data_ptr<scalar_t>()); });
}

// An optional per-pixel [B, P] tensor as a dense [B * P] acc_t vector (empty when absent).
template <typename acc_t>
std::vector<acc_t> per_pixel_values(const std::optional<at::Tensor>& t, int64_t B, int64_t P,
                                    const char* op, const char* name) {
  std::vector<acc_t> out;
  if (!t.has_value() || !t->defined()) return out;
  TORCH_CHECK(t->dim() == 2 && t->size(0) == B && t->size(1) == P, op, ": ", name, " shape ",
              t->sizes(), " does not match the labels shape [", B, ", ", P, "]");
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), op, ": ", name,
              " must be a floating tensor, got ", t->scalar_type());
  const at::Tensor dense = t->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  out.assign(dense.const_data_ptr<acc_t>(), dense.const_data_ptr<acc_t>() + B * P);
  return out;
}

// dst[slot[i], :] = feats[b, :, p] for every pixel with slot[i] >= 0 (cast to dst_t). Walks the
// pixels in memory order, kPixelTile at a time: channels-first input is read one cache line per
// channel and transposed in a small (L1-resident) buffer, then each pixel's row is written whole.
template <typename src_t, typename dst_t>
void gather_rows(const at::Tensor& feats, const int64_t* slot, dst_t* dst) {
  const int64_t B = feats.size(0), D = feats.size(1), P = feats.size(2);
  const int64_t sB = feats.stride(0), sD = feats.stride(1), sP = feats.stride(2);
  const src_t* src = feats.const_data_ptr<src_t>();
  const int64_t tiles_per_image = (P + kPixelTile - 1) / kPixelTile;
  at::parallel_for(0, B * tiles_per_image, 16, [&](int64_t t0, int64_t t1) {
    int64_t pos[kPixelTile], row[kPixelTile];
    std::vector<dst_t> buf(kPixelTile * D);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / tiles_per_image, p0 = (t % tiles_per_image) * kPixelTile;
      const int64_t p1 = std::min(P, p0 + kPixelTile);
      int64_t k = 0;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t s = slot[b * P + p];
        if (s >= 0) pos[k] = p, row[k++] = s;
      }
      if (k == 0) continue;
      const src_t* base = src + b * sB;
      if (sD == 1) {  // pixel-major input ([N, D] viewed as [1, D, N]): each pixel is contiguous
        for (int64_t q = 0; q < k; ++q) {
          const src_t* in = base + pos[q] * sP;
          dst_t* out = dst + row[q] * D;
          for (int64_t d = 0; d < D; ++d) out[d] = static_cast<dst_t>(in[d]);
        }
        continue;
      }
      if (sP == 1 && k == p1 - p0) {  // a full run of pixels: contiguous reads per channel
        for (int64_t d = 0; d < D; ++d) {
          const src_t* in = base + d * sD + p0;
          for (int64_t q = 0; q < k; ++q) buf[q * D + d] = static_cast<dst_t>(in[q]);
        }
      } else {
        for (int64_t d = 0; d < D; ++d) {
          const src_t* in = base + d * sD;
          for (int64_t q = 0; q < k; ++q) buf[q * D + d] = static_cast<dst_t>(in[pos[q] * sP]);
        }
      }
      for (int64_t q = 0; q < k; ++q)
        std::copy(buf.data() + q * D, buf.data() + (q + 1) * D, dst + row[q] * D);
    }
  });
}

// out[b, d, p] (a contiguous [B, D, P] tensor) = rows[slot[i], d], or 0 where slot[i] < 0; the
// reverse of gather_rows, through the same kind of small transpose buffer.
template <typename row_t, typename out_t>
void scatter_rows(const row_t* rows, const int64_t* slot, at::Tensor& out) {
  const int64_t B = out.size(0), D = out.size(1), P = out.size(2);
  out_t* dst = out.data_ptr<out_t>();
  const int64_t tiles_per_image = (P + kPixelTile - 1) / kPixelTile;
  at::parallel_for(0, B * tiles_per_image, 16, [&](int64_t t0, int64_t t1) {
    std::vector<out_t> buf(kPixelTile * D);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / tiles_per_image, p0 = (t % tiles_per_image) * kPixelTile;
      const int64_t n = std::min(P, p0 + kPixelTile) - p0;
      const int64_t* s = slot + b * P + p0;
      for (int64_t q = 0; q < n; ++q) {
        out_t* o = buf.data() + q * D;
        if (s[q] < 0) {
          std::fill(o, o + D, out_t(0));
        } else {
          const row_t* in = rows + s[q] * D;
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<out_t>(in[d]);
        }
      }
      for (int64_t d = 0; d < D; ++d) {
        out_t* o = dst + (b * D + d) * P + p0;
        for (int64_t q = 0; q < n; ++q) o[q] = buf[q * D + d];
      }
    }
  });
}

// A [rows, cols] row-major matrix at `data` (leading dimension `ld`) as a tensor view, for the GEMMs.
template <typename T>
at::Tensor matrix_view(const T* data, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(data), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// ---------------------------------------------------------------------------------------------
// Row kernels of the pair terms. Kept out of line on purpose: inlined into the big tile loops GCC
// stopped vectorising them (seen in the disassembly), as standalone loops they use 16-lane AVX-512.
// x holds raw dot products; `scale` is 1 / tau.
// ---------------------------------------------------------------------------------------------

// max_j x[j] over [0, n) (-inf when n = 0)
template <typename T>
[[gnu::noinline]] T row_max(const T* x, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// sum_j exp(scale x[j] - shift)
template <typename T>
[[gnu::noinline]] T row_sum_exp(const T* x, int64_t n, T scale, T shift) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += exp_vec(scale * x[j] - shift);
  return s;
}

// sum_j softplus(nu - scale x[j])
template <typename T>
[[gnu::noinline]] T row_sum_softplus(const T* x, int64_t n, T scale, T nu) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += softplus_fast(nu - scale * x[j]);
  return s;
}

// sum_j w_j softplus(nu - scale x[j]) and sum_j w_j sigmoid(nu - scale x[j]), w_j = wa * wb[j]
// (w_j = 1 when wb is null)
template <typename T>
[[gnu::noinline]] void row_pos_terms(const T* x, int64_t n, T scale, T nu, T wa, const T* wb,
                                     T& softplus_sum, T& sigmoid_sum) {
  T ls = 0, ss = 0;
  if (wb == nullptr) {
#pragma omp simd reduction(+ : ls, ss)
    for (int64_t j = 0; j < n; ++j) {
      const T z = nu - scale * x[j];
      ls += softplus_fast(z);
      ss += sigmoid_fast(z);
    }
  } else {
#pragma omp simd reduction(+ : ls, ss)
    for (int64_t j = 0; j < n; ++j) {
      const T z = nu - scale * x[j], w = wa * wb[j];
      ls += w * softplus_fast(z);
      ss += w * sigmoid_fast(z);
    }
  }
  softplus_sum += ls;
  sigmoid_sum += ss;
}

// x[j] <- -c sigmoid(nu - scale x[j]); returns sum_j c sigmoid(...) (the d loss / d nu part)
template <typename T>
[[gnu::noinline]] T row_sigmoid_coef(T* x, int64_t n, T scale, T nu, T c) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    const T g = c * sigmoid_fast(nu - scale * x[j]);
    x[j] = -g;
    s += g;
  }
  return s;
}

// negative pairs of the symmetric backward:
// x[j] <- ca exp(scale x[j] - nua) + cb[j] exp(scale x[j] - nub[j])
template <typename T>
[[gnu::noinline]] void row_neg_coef(T* x, int64_t n, T scale, T nua, T ca, const T* nub,
                                    const T* cb) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T z = scale * x[j];
    x[j] = ca * exp_vec(z - nua) + cb[j] * exp_vec(z - nub[j]);
  }
}

// positive pairs of the symmetric backward, pair weight w_j = wa * wb[j] (1 when wb is null):
// x[j] <- -w_j (ca sigmoid(nua - z) + cb[j] sigmoid(nub[j] - z)), z = scale x[j]; returns
// sum_j wb[j] (ca softplus(nua - z) + cb[j] softplus(nub[j] - z)) (d loss / d wa), 0 without wb
template <typename T>
[[gnu::noinline]] T row_pos_coef(T* x, int64_t n, T scale, T nua, T ca, const T* nub,
                                 const T* cb, T wa, const T* wb) {
  T g = 0;
  if (wb == nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T z = scale * x[j];
      x[j] = -(ca * sigmoid_fast(nua - z) + cb[j] * sigmoid_fast(nub[j] - z));
    }
  } else {
#pragma omp simd reduction(+ : g)
    for (int64_t j = 0; j < n; ++j) {
      const T z = scale * x[j];
      g += wb[j] * (ca * softplus_fast(nua - z) + cb[j] * softplus_fast(nub[j] - z));
      x[j] = -wa * wb[j] * (ca * sigmoid_fast(nua - z) + cb[j] * sigmoid_fast(nub[j] - z));
    }
  }
  return g;
}

}  // namespace fastuda::cpu
