// Plain views of the op inputs passed to kernels (no ATen types cross into .cu files).
#pragma once

#include <cstdint>

#include "common/simt.h"

namespace fastuda {

// Integer labels of any width, read in place. The dtype switch is uniform across a warp and runs
// once per pixel, next to D feature loads, so it is free; it keeps one kernel instantiation per
// feature dtype instead of one per (feature, label) dtype pair.
enum class LabelKind : int32_t { U8 = 0, I8 = 1, I16 = 2, I32 = 3, I64 = 4 };

FASTUDA_HD_INLINE int64_t load_label(const void* ptr, LabelKind kind, int64_t i) {
  switch (kind) {
    case LabelKind::U8: return static_cast<const uint8_t*>(ptr)[i];
    case LabelKind::I8: return static_cast<const int8_t*>(ptr)[i];
    case LabelKind::I16: return static_cast<const int16_t*>(ptr)[i];
    case LabelKind::I32: return static_cast<const int32_t*>(ptr)[i];
    default: return static_cast<const int64_t*>(ptr)[i];
  }
}

FASTUDA_HD_INLINE void store_label(void* ptr, LabelKind kind, int64_t i, int64_t v) {
  switch (kind) {
    case LabelKind::U8: static_cast<uint8_t*>(ptr)[i] = static_cast<uint8_t>(v); break;
    case LabelKind::I8: static_cast<int8_t*>(ptr)[i] = static_cast<int8_t>(v); break;
    case LabelKind::I16: static_cast<int16_t*>(ptr)[i] = static_cast<int16_t>(v); break;
    case LabelKind::I32: static_cast<int32_t*>(ptr)[i] = static_cast<int32_t>(v); break;
    default: static_cast<int64_t*>(ptr)[i] = v; break;
  }
}

// Labels [B, P] (element strides).
struct LabelView {
  const void* ptr;
  LabelKind kind;
  int64_t stride_b, stride_p;

  FASTUDA_HD_INLINE int64_t load(int64_t b, int64_t p) const {
    return load_label(ptr, kind, b * stride_b + p * stride_p);
  }
};

// Features [B, D, P] (element strides; channels-first maps have stride_p == 1).
template <typename T>
struct FeatView {
  const T* ptr;
  int64_t B, D, P;
  int64_t stride_b, stride_d, stride_p;

  FASTUDA_HD_INLINE const T* at(int64_t b, int64_t d, int64_t p) const {
    return ptr + b * stride_b + d * stride_d + p * stride_p;
  }
};

// Optional per-pixel weights [B, P], fp32 or fp64 (both null: every weight is 1).
struct WeightView {
  const float* f32;
  const double* f64;
  int64_t stride_b, stride_p;

  FASTUDA_HD_INLINE bool present() const { return f32 != nullptr || f64 != nullptr; }
  template <typename A>
  FASTUDA_HD_INLINE A load(int64_t b, int64_t p) const {
    const int64_t i = b * stride_b + p * stride_p;
    return f64 ? A(f64[i]) : (f32 ? A(f32[i]) : A(1));
  }
};

// Accumulation type: fp32 for fp32/fp16/bf16 inputs, fp64 for fp64.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

}  // namespace fastuda
