// CPU kernels of pixel-to-centroid contrast (ProtoCL, ops.md section 3) and its distributional
// upper bound (DistCL, section 4), forward and backward.
//
// One pixel's loss, with a_c = f.mu_c / tau and b_c = lam / (2 tau^2) f^T Sigma_c f (b = 0 for
// ProtoCL):   l = lse_c(a_c + b_c) - a_y,  weighted by w.
// Work is cut into tiles of kTile consecutive pixels of one image, all D channels, seen as a
// [D][kTile] matrix: read in place for fp32 channels-first input, else copied (converted to the
// accumulation type) into a buffer. The products below are then small dense GEMMs on
// cache-resident data whatever the input's strides and dtype:
//          logits [C][T] = (mu / tau) [C][D] @ X [D][T]            (+ Sigma terms)
//          grad_X [D][T] = (mu / tau)^T [D][C] @ G [C][T]          (+ Sigma terms)
//          grad_mu^T [D][C] += X [D][T] @ G^T [T][C]               (per-chunk partials)
// With keep_probs the forward also writes the softmax probabilities [B, C, P] (C / D of the
// features' size) and the backward takes its class weights from them: the logit GEMMs are not
// done twice, and the ProtoCL backward without centroid gradient does not read the features at
// all. Without them, the backward recomputes the logits from the features and the saved
// per-pixel logsumexp. A full covariance's backward needs Sigma'_c x per class, so it recomputes
// either way.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "common/online_softmax.h"
#include "cpu/gemm_kernel.h"
#include "cpu/output_buffer.h"

namespace fastuda {
namespace {

constexpr int64_t kTile = 32;  // pixels per tile: the vector width of the inner loops

enum class Cov { None, Diag, Full };

// Class count rounded up to whole float vectors (the GEMM's narrowest column block): the
// statistics' gradient partials are accumulated transposed, [D][c_pad(C)], so the tile's
// features need no transposition. 19 classes: 24 columns with AVX2, not 32 (a third less work).
inline int64_t c_pad(int64_t C) {
  constexpr int64_t kCols = kVecBytes / sizeof(float);
  return (C + kCols - 1) / kCols * kCols;
}

// ---------------------------------------------------------------------------------------------
// Softmax pieces of a tile, x [C][kTile] logits. The float versions are written with explicit
// vectors: GCC leaves the scalar loops (and exp_poly inside them) unvectorised.
// ---------------------------------------------------------------------------------------------
// m[t] = max_c x[c][t], z[t] = sum_c exp(x[c][t] - m[t])
template <typename T>
void tile_max_sumexp(const T* x, int64_t C, T* m, T* z) {
  for (int64_t t = 0; t < kTile; ++t) m[t] = x[t];
  for (int64_t c = 1; c < C; ++c)
    for (int64_t t = 0; t < kTile; ++t) m[t] = std::max(m[t], x[c * kTile + t]);
  for (int64_t t = 0; t < kTile; ++t) z[t] = T(0);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t t = 0; t < kTile; ++t) z[t] += exp_poly(x[c * kTile + t] - m[t]);
}

// g[c][t] = s[t] exp(x[c][t] - l[t]); exactly 0 where s[t] = 0, whatever l[t] holds
template <typename T>
void tile_scaled_softmax(const T* x, int64_t C, const T* l, const T* s, T* g) {
  for (int64_t c = 0; c < C; ++c)
    for (int64_t t = 0; t < kTile; ++t)
      g[c * kTile + t] = s[t] != T(0) ? s[t] * exp_poly(x[c * kTile + t] - l[t]) : T(0);
}

using VecF = SimdOf<float>::type;
typedef int32_t VecI __attribute__((vector_size(kVecBytes)));
constexpr int kFloatLanes = kVecBytes / sizeof(float);
constexpr int kTileVecs = kTile / kFloatLanes;
static_assert(kTile % kFloatLanes == 0, "a tile is a whole number of float vectors");

// exp_poly lane by lane: the same polynomial (common/online_softmax.h)
inline VecF exp_vec(VecF x) { return exp_cephes<VecF, VecI>(x); }

template <>
void tile_max_sumexp<float>(const float* x, int64_t C, float* m, float* z) {
  VecF mv[kTileVecs], zv[kTileVecs];
  for (int j = 0; j < kTileVecs; ++j) mv[j] = load_vec(x + j * kFloatLanes);
  for (int64_t c = 1; c < C; ++c)
    for (int j = 0; j < kTileVecs; ++j) {
      const VecF v = load_vec(x + c * kTile + j * kFloatLanes);
      mv[j] = v > mv[j] ? v : mv[j];
    }
  for (int j = 0; j < kTileVecs; ++j) zv[j] = VecF{};
  for (int64_t c = 0; c < C; ++c)
    for (int j = 0; j < kTileVecs; ++j)
      zv[j] += exp_vec(load_vec(x + c * kTile + j * kFloatLanes) - mv[j]);
  for (int j = 0; j < kTileVecs; ++j) {
    store_vec(m + j * kFloatLanes, mv[j]);
    store_vec(z + j * kFloatLanes, zv[j]);
  }
}

template <>
void tile_scaled_softmax<float>(const float* x, int64_t C, const float* l, const float* s,
                                float* g) {
  VecF lv[kTileVecs], sv[kTileVecs];
  for (int j = 0; j < kTileVecs; ++j) {
    lv[j] = load_vec(l + j * kFloatLanes);
    sv[j] = load_vec(s + j * kFloatLanes);
  }
  for (int64_t c = 0; c < C; ++c)
    for (int j = 0; j < kTileVecs; ++j) {
      const VecF e = exp_vec(load_vec(x + c * kTile + j * kFloatLanes) - lv[j]);
      store_vec(g + c * kTile + j * kFloatLanes, sv[j] != 0.0f ? sv[j] * e : VecF{});
    }
}

// ---------------------------------------------------------------------------------------------
// Inputs of one call, already checked; every [C, ...] parameter converted to acc_t, contiguous.
// ---------------------------------------------------------------------------------------------
template <typename acc_t>
struct Problem {
  int64_t B = 0, D = 0, P = 0, C = 0;
  Cov cov = Cov::None;
  // features [B, D, P], any strides
  const void* feats = nullptr;
  at::ScalarType feats_dtype = at::kFloat;
  int64_t f_sb = 0, f_sd = 0, f_sp = 0;
  // labels [B, P], any integer dtype and strides
  const void* labels = nullptr;
  at::ScalarType labels_dtype = at::kLong;
  int64_t l_sb = 0, l_sp = 0;
  int64_t ignore_index = 255;
  const acc_t* weights = nullptr;  // [B, P] contiguous or null
  const acc_t* mu_scaled = nullptr;  // [C, D] mu / tau
  const acc_t* sigma_scaled = nullptr;  // [C, D] or [C, D, D]: lam / (2 tau^2) * (sym.) Sigma
  int64_t tiles_per_row = 0;  // tiles per image
  int64_t num_tiles() const { return B * tiles_per_row; }
  // fp32 channels-first features are read in place (no copy into the tile buffer)
  bool read_in_place() const {
    return f_sp == 1 && feats_dtype == c10::CppTypeToScalarType<acc_t>::value;
  }
};

template <typename scalar_t, typename acc_t>
void load_tile_typed(const Problem<acc_t>& pb, int64_t b, int64_t p0, int64_t n, acc_t* X) {
  const scalar_t* base = static_cast<const scalar_t*>(pb.feats) + b * pb.f_sb + p0 * pb.f_sp;
  const int64_t D = pb.D;
  if (pb.f_sp == 1) {  // channels-first: each channel's pixels are contiguous
    // each channel row of the tile sits in its own page: too many streams for the hardware
    // prefetcher, so the same row of the tile after next is requested with each row copied
    constexpr int64_t kLine = 64 / sizeof(scalar_t);
    const bool prefetch = p0 + 3 * kTile <= pb.P;
    for (int64_t d = 0; d < D; ++d) {
      const scalar_t* src = base + d * pb.f_sd;
      if (prefetch)
        for (int64_t t = 2 * kTile; t < 3 * kTile; t += kLine)
          __builtin_prefetch(src + t, /*rw=*/0, /*locality=*/2);  // to L2
      acc_t* dst = X + d * kTile;
      for (int64_t t = 0; t < n; ++t) dst[t] = static_cast<acc_t>(src[t]);
      for (int64_t t = n; t < kTile; ++t) dst[t] = acc_t(0);
    }
  } else if (pb.f_sp < pb.f_sd) {  // channels-first with strided pixels (a sliced image)
    for (int64_t d = 0; d < D; ++d) {
      const scalar_t* src = base + d * pb.f_sd;
      acc_t* dst = X + d * kTile;
      for (int64_t t = 0; t < n; ++t) dst[t] = static_cast<acc_t>(src[t * pb.f_sp]);
      for (int64_t t = n; t < kTile; ++t) dst[t] = acc_t(0);
    }
  } else {  // pixel-major ([N, D] or channels-last): walk each pixel's channels
    for (int64_t t = 0; t < n; ++t) {
      const scalar_t* src = base + t * pb.f_sp;
      for (int64_t d = 0; d < D; ++d) X[d * kTile + t] = static_cast<acc_t>(src[d * pb.f_sd]);
    }
    if (n < kTile)
      for (int64_t d = 0; d < D; ++d)
        for (int64_t t = n; t < kTile; ++t) X[d * kTile + t] = acc_t(0);
  }
}

// X [D][kTile] <- features of pixels p0 .. p0 + n of image b, zero beyond n
template <typename acc_t>
void load_tile(const Problem<acc_t>& pb, int64_t b, int64_t p0, int64_t n, acc_t* X) {
  switch (pb.feats_dtype) {
    case at::kFloat: return load_tile_typed<float, acc_t>(pb, b, p0, n, X);
    case at::kDouble: return load_tile_typed<double, acc_t>(pb, b, p0, n, X);
    case at::kHalf: return load_tile_typed<at::Half, acc_t>(pb, b, p0, n, X);
    case at::kBFloat16: return load_tile_typed<at::BFloat16, acc_t>(pb, b, p0, n, X);
    default: TORCH_CHECK(false, "fastuda contrast: unsupported feats dtype ", pb.feats_dtype);
  }
}

// y[t] = class of pixel t, or -1 for ignored pixels and padding. Returns the tile position of the
// first label that is neither a class nor ignore_index, or -1.
template <typename label_t, typename acc_t>
int64_t load_labels_typed(const Problem<acc_t>& pb, int64_t b, int64_t p0, int64_t n,
                          int32_t* y) {
  const label_t* src = static_cast<const label_t*>(pb.labels) + b * pb.l_sb + p0 * pb.l_sp;
  int64_t bad = -1;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t v = static_cast<int64_t>(src[t * pb.l_sp]);
    if (v == pb.ignore_index) {
      y[t] = -1;
    } else if (v >= 0 && v < pb.C) {
      y[t] = static_cast<int32_t>(v);
    } else {
      y[t] = -1;
      if (bad < 0) bad = t;
    }
  }
  for (int64_t t = n; t < kTile; ++t) y[t] = -1;
  return bad;
}

template <typename acc_t>
int64_t load_labels(const Problem<acc_t>& pb, int64_t b, int64_t p0, int64_t n, int32_t* y) {
  switch (pb.labels_dtype) {
    case at::kByte: return load_labels_typed<uint8_t>(pb, b, p0, n, y);
    case at::kChar: return load_labels_typed<int8_t>(pb, b, p0, n, y);
    case at::kShort: return load_labels_typed<int16_t>(pb, b, p0, n, y);
    case at::kInt: return load_labels_typed<int32_t>(pb, b, p0, n, y);
    case at::kLong: return load_labels_typed<int64_t>(pb, b, p0, n, y);
    case at::kUInt16: return load_labels_typed<uint16_t>(pb, b, p0, n, y);
    case at::kUInt32: return load_labels_typed<uint32_t>(pb, b, p0, n, y);
    default: TORCH_CHECK(false, "fastuda contrast: unsupported labels dtype ", pb.labels_dtype);
  }
}

// The smallest flat pixel index (b * P + p) holding an invalid label, shared by all threads.
struct FirstBadLabel {
  std::atomic<int64_t> index{std::numeric_limits<int64_t>::max()};
  void offer(int64_t i) {
    int64_t cur = index.load(std::memory_order_relaxed);
    while (i < cur && !index.compare_exchange_weak(cur, i, std::memory_order_relaxed)) {
    }
  }
  bool found() const { return index.load() != std::numeric_limits<int64_t>::max(); }
};

void raise_bad_label(const char* op, const at::Tensor& labels, int64_t flat, int64_t C,
                     int64_t ignore_index) {
  const int64_t P = labels.size(1);
  const int64_t value = labels[flat / P][flat % P].item<int64_t>();
  TORCH_CHECK_VALUE(false, "fastuda::", op, ": label value ", value, " (image ", flat / P,
                    ", pixel ", flat % P, ") is outside [0, ", C,
                    ") and is not ignore_index (", ignore_index, ")");
}

// Per-thread scratch: tile buffers, and where the current tile's features are read from.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> xbuf, X2, XT, a, b, g_a, g_b, gT, U, gx, tmp;
  std::vector<int32_t> y;
  const acc_t* X = nullptr;  // the tile, [D][kTile] with row stride ldx
  int64_t ldx = kTile;
  const acc_t* ahead = nullptr;  // in place: the tile after next, to prefetch (or null)
  Scratch(const Problem<acc_t>& pb, bool backward, bool stats_grad) {
    const int64_t D = pb.D, C = pb.C;
    xbuf.resize(D * kTile);
    a.resize(C * kTile);
    b.resize(C * kTile);
    y.resize(kTile);
    if (pb.cov == Cov::Diag) X2.resize(D * kTile);
    if (pb.cov == Cov::Full) U.resize((backward ? C : 1) * D * kTile);
    if (backward) {
      g_a.resize(C * kTile);
      g_b.resize(C * kTile);
      gx.resize(D * kTile);
      if (pb.cov == Cov::Full) tmp.resize(D * kTile);
      if (stats_grad) gT.resize(kTile * c_pad(C));
      if (stats_grad && pb.cov == Cov::Full) XT.resize(kTile * D);
    }
  }

  // Points X at pixels p0 .. p0 + n of image b (zero padded beyond n).
  void fetch(const Problem<acc_t>& pb, int64_t b, int64_t p0, int64_t n) {
    if (n == kTile && pb.read_in_place()) {
      const acc_t* base = static_cast<const acc_t*>(pb.feats) + b * pb.f_sb + p0;
      X = base;
      ldx = pb.f_sd;
      ahead = p0 + 3 * kTile <= pb.P ? base + 2 * kTile : nullptr;
    } else {
      load_tile(pb, b, p0, n, xbuf.data());
      X = xbuf.data();
      ldx = kTile;
      ahead = nullptr;
    }
  }
};

// s.X2 = X o X (the diagonal variance gradient's operand)
template <typename acc_t>
void square_tile(Scratch<acc_t>& s, int64_t D) {
  acc_t* X2 = s.X2.data();
  for (int64_t d = 0; d < D; ++d)
    for (int64_t t = 0; t < kTile; ++t) X2[d * kTile + t] = s.X[d * s.ldx + t] * s.X[d * s.ldx + t];
}

// a [C][T] = mu/tau @ X and b [C][T] = the Sigma term (left untouched for ProtoCL). For the full
// covariance, U_c = Sigma'_c @ X [D][T] is kept per class when keep_u (the backward needs it);
// keep_x2: X o X is also written to s.X2 (the diagonal variance gradient needs it).
template <typename acc_t>
void tile_logits(const Problem<acc_t>& pb, Scratch<acc_t>& s, bool keep_u, bool keep_x2) {
  const int64_t D = pb.D, C = pb.C, ldx = s.ldx;
  const acc_t* X = s.X;
  gemm<acc_t>(C, D, kTile, pb.mu_scaled, D, 1, X, ldx, s.a.data(), kTile, false, s.ahead);
  if (pb.cov == Cov::Diag) {  // sigma' @ (X o X), squared in the GEMM's registers
    gemm<acc_t, true>(C, D, kTile, pb.sigma_scaled, D, 1, X, ldx, s.b.data(), kTile, false);
    if (keep_x2) square_tile(s, D);
  } else if (pb.cov == Cov::Full) {
    for (int64_t c = 0; c < C; ++c) {
      acc_t* U = s.U.data() + (keep_u ? c * D * kTile : 0);
      gemm<acc_t>(D, D, kTile, pb.sigma_scaled + c * D * D, D, 1, X, ldx, U, kTile, false);
      acc_t q[kTile] = {};
      for (int64_t d = 0; d < D; ++d)
        for (int64_t t = 0; t < kTile; ++t) q[t] += X[d * ldx + t] * U[d * kTile + t];
      for (int64_t t = 0; t < kTile; ++t) s.b[c * kTile + t] = q[t];
    }
  }
}

// Work split. Tiles are grouped into n_chunks fixed, contiguous chunks; threads take chunks in
// turn (dynamic balance: the machine is shared), and whatever a chunk sums into its own partial
// slot is merged in chunk order, so results do not depend on the thread count or timing.
template <typename F>
void for_each_chunk(int64_t n_chunks, F&& worker) {
  if (n_chunks <= 0) return;
  std::atomic<int64_t> next{0};
  const auto claim = [&]() { return next.fetch_add(1); };
  const int64_t n_workers = std::min<int64_t>(n_chunks, at::get_num_threads());
  // one call per worker thread (or a single inline call inside an outer parallel region)
  at::parallel_for(0, n_workers, 1, [&](int64_t, int64_t) { worker(claim); });
}

inline std::pair<int64_t, int64_t> chunk_range(int64_t chunk, int64_t n_chunks, int64_t n_tiles) {
  return {chunk * n_tiles / n_chunks, (chunk + 1) * n_tiles / n_chunks};
}

constexpr int64_t kTilesPerChunk = 8;

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------
template <typename acc_t>
void forward_impl(const Problem<acc_t>& pb, acc_t* loss, acc_t* lse, acc_t* probs,
                  FirstBadLabel& first_bad) {
  const int64_t n_tiles = pb.num_tiles();
  const int64_t C = pb.C;
  const int64_t n_chunks = (n_tiles + kTilesPerChunk - 1) / kTilesPerChunk;
  for_each_chunk(n_chunks, [&](const auto& claim) {
    Scratch<acc_t> s(pb, false, false);
    for (int64_t chunk = claim(); chunk < n_chunks; chunk = claim()) {
      const auto [t_begin, t_end] = chunk_range(chunk, n_chunks, n_tiles);
      for (int64_t tile = t_begin; tile < t_end; ++tile) {
        const int64_t b = tile / pb.tiles_per_row;
        const int64_t p0 = (tile % pb.tiles_per_row) * kTile;
        const int64_t n = std::min(kTile, pb.P - p0);
        int32_t* y = s.y.data();
        const int64_t bad = load_labels(pb, b, p0, n, y);
        if (bad >= 0) first_bad.offer(b * pb.P + p0 + bad);
        s.fetch(pb, b, p0, n);
        tile_logits(pb, s, false, false);
        acc_t* a = s.a.data();
        acc_t* bq = s.b.data();
        if (pb.cov != Cov::None)  // b <- a + b: the full logits
          for (int64_t i = 0; i < C * kTile; ++i) bq[i] += a[i];
        const acc_t* full = pb.cov == Cov::None ? a : bq;
        acc_t m[kTile], z[kTile];
        tile_max_sumexp(full, C, m, z);
        const int64_t o = b * pb.P + p0;
        for (int64_t t = 0; t < n; ++t) {
          const acc_t l = m[t] + std::log(z[t]);
          lse[o + t] = l;
          acc_t v = acc_t(0);
          if (y[t] >= 0) {
            v = l - a[y[t] * kTile + t];
            if (pb.weights != nullptr) v *= pb.weights[o + t];
          }
          loss[o + t] = v;
        }
        if (probs != nullptr) {  // p = exp(logit - lse), written [B][C][P]
          acc_t l[kTile], one[kTile];
          for (int64_t t = 0; t < kTile; ++t) {
            l[t] = t < n ? lse[o + t] : acc_t(0);
            one[t] = acc_t(1);
          }
          acc_t* x = pb.cov == Cov::None ? a : bq;  // the logits, not needed any more
          tile_scaled_softmax(x, C, l, one, x);
          for (int64_t c = 0; c < C; ++c)
            std::memcpy(probs + (b * C + c) * pb.P + p0, x + c * kTile, n * sizeof(acc_t));
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------
template <typename acc_t>
struct BackwardOut {
  at::Tensor grad_feats;  // [B, D, P] contiguous, feats dtype
  // per-chunk partials: sum_i g_ic f_i as [D][c_pad(C)] (no 1/tau yet); sum_i 2 s p_ic f_i^2 as
  // [D][c_pad(C)] (diagonal) or sum_i 2 s p_ic f_i f_i^T as [C][D][D] (full)
  acc_t* grad_mu = nullptr;
  acc_t* grad_sigma = nullptr;
};

// One tile row of fp32 gradient, written around the caches (streaming store) when aligned: the
// [B, D, P] output is far larger than the caches and is not read again by this kernel, so
// fetching its lines first (a normal store's read-for-ownership) would double the traffic.
inline bool stream_row(float* dst, const float* src) {
#if defined(__AVX512F__)
  if ((reinterpret_cast<uintptr_t>(dst) & 63) == 0) {
    for (int64_t j = 0; j < kTile; j += 16) _mm512_stream_ps(dst + j, _mm512_loadu_ps(src + j));
    return true;
  }
#elif defined(__AVX__)
  if ((reinterpret_cast<uintptr_t>(dst) & 31) == 0) {
    for (int64_t j = 0; j < kTile; j += 8) _mm256_stream_ps(dst + j, _mm256_loadu_ps(src + j));
    return true;
  }
#endif
  (void)dst;
  (void)src;
  return false;
}

// Streaming stores are weakly ordered: fence them before the data is handed on.
inline void stream_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

template <typename scalar_t, typename acc_t>
void store_grad_tile(const Problem<acc_t>& pb, at::Tensor& out, int64_t b, int64_t p0, int64_t n,
                     const acc_t* gx) {
  scalar_t* base = out.data_ptr<scalar_t>() + (b * pb.D) * pb.P + p0;
  for (int64_t d = 0; d < pb.D; ++d) {
    scalar_t* dst = base + d * pb.P;
    const acc_t* src = gx + d * kTile;
    if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>)
      if (n == kTile && stream_row(dst, src)) continue;
    for (int64_t t = 0; t < n; ++t) dst[t] = static_cast<scalar_t>(src[t]);
  }
}

template <typename acc_t>
void store_grad(const Problem<acc_t>& pb, at::Tensor& out, int64_t b, int64_t p0, int64_t n,
                const acc_t* gx) {
  switch (out.scalar_type()) {
    case at::kFloat: return store_grad_tile<float, acc_t>(pb, out, b, p0, n, gx);
    case at::kDouble: return store_grad_tile<double, acc_t>(pb, out, b, p0, n, gx);
    case at::kHalf: return store_grad_tile<at::Half, acc_t>(pb, out, b, p0, n, gx);
    case at::kBFloat16: return store_grad_tile<at::BFloat16, acc_t>(pb, out, b, p0, n, gx);
    default: TORCH_CHECK(false, "fastuda contrast: unsupported grad dtype ", out.scalar_type());
  }
}

// Where the gradient of a full tile can be written with streaming stores straight from the GEMM's
// registers: fp32 gradient, every tile row aligned to the vector width. Null otherwise (then the
// tile goes through the gx buffer and store_grad).
template <typename acc_t>
acc_t* streamable_grad_tile(const Problem<acc_t>& pb, at::Tensor& out, int64_t b, int64_t p0,
                            int64_t n) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (n != kTile || out.scalar_type() != at::kFloat) return nullptr;
    float* dst = out.data_ptr<float>() + (b * pb.D) * pb.P + p0;
    const bool aligned = reinterpret_cast<uintptr_t>(dst) % kVecBytes == 0 &&
                         (pb.P * int64_t(sizeof(float))) % kVecBytes == 0;
    return aligned ? dst : nullptr;
  } else {
    (void)pb, (void)out, (void)b, (void)p0, (void)n;
    return nullptr;
  }
}

template <typename acc_t>
void backward_impl(const Problem<acc_t>& pb, const acc_t* grad_loss, const acc_t* lse,
                   const acc_t* probs, bool stats_grad, int64_t n_chunks,
                   BackwardOut<acc_t>& out, FirstBadLabel& first_bad) {
  const int64_t n_tiles = pb.num_tiles();
  const int64_t C = pb.C, D = pb.D, P = pb.P;
  if (pb.cov == Cov::Full) probs = nullptr;  // it needs Sigma'_c X: recomputed with the logits
  // with the forward's probs, the features are read only for the Sigma term and the statistics
  const bool needs_x = probs == nullptr || pb.cov != Cov::None || stats_grad;
  const int64_t sigma_size = pb.cov == Cov::Full ? C * D * D : D * c_pad(C);
  for_each_chunk(n_chunks, [&](const auto& claim) {
    Scratch<acc_t> s(pb, true, stats_grad);
    for (int64_t chunk = claim(); chunk < n_chunks; chunk = claim()) {
      const auto [t_begin, t_end] = chunk_range(chunk, n_chunks, n_tiles);
      const int64_t Cp = c_pad(C);
      acc_t* gmu = stats_grad ? out.grad_mu + chunk * D * Cp : nullptr;
      acc_t* gsig = stats_grad && pb.cov != Cov::None ? out.grad_sigma + chunk * sigma_size
                                                        : nullptr;
      for (int64_t tile = t_begin; tile < t_end; ++tile) {
        const int64_t b = tile / pb.tiles_per_row;
        const int64_t p0 = (tile % pb.tiles_per_row) * kTile;
        const int64_t n = std::min(kTile, P - p0);
        const int64_t o = b * P + p0;
        int32_t* y = s.y.data();
        const int64_t bad = load_labels(pb, b, p0, n, y);
        if (bad >= 0) first_bad.offer(o + bad);
        acc_t* gx = s.gx.data();  // the tile's gradient [D][kTile], stored to the output at the end
        constexpr int64_t ldg = kTile;
        // scale[t]: d loss_total / d l_t (0 for pixels that do not count)
        acc_t scale[kTile];
        bool any = false;
        for (int64_t t = 0; t < kTile; ++t) {
          acc_t v = acc_t(0);
          if (t < n && y[t] >= 0) {
            v = grad_loss[o + t];
            if (pb.weights != nullptr) v *= pb.weights[o + t];
          }
          scale[t] = v;
          any = any || v != acc_t(0);
        }
        if (!any) {
          std::fill(s.gx.begin(), s.gx.end(), acc_t(0));
          store_grad(pb, out.grad_feats, b, p0, n, gx);
          continue;
        }
        if (needs_x) s.fetch(pb, b, p0, n);
        const acc_t* X = s.X;
        const int64_t ldx = s.ldx;
        acc_t* ga = s.g_a.data();
        acc_t* gb = s.g_b.data();
        // softmax p = exp(a + b - lse); g_a = s (p - onehot), g_b = 2 s p
        if (probs != nullptr) {
          for (int64_t c = 0; c < C; ++c) {
            const acc_t* pc = probs + (b * C + c) * P + p0;
            for (int64_t t = 0; t < kTile; ++t)
              ga[c * kTile + t] = t < n && scale[t] != acc_t(0) ? scale[t] * pc[t] : acc_t(0);
          }
          if (pb.cov == Cov::Diag && stats_grad) square_tile(s, D);
        } else {
          tile_logits(pb, s, true, stats_grad);
          acc_t* a = s.a.data();
          acc_t* bq = s.b.data();
          acc_t l[kTile];
          for (int64_t t = 0; t < kTile; ++t) l[t] = t < n ? lse[o + t] : acc_t(0);
          if (pb.cov != Cov::None)  // b <- a + b: the full logits
            for (int64_t i = 0; i < C * kTile; ++i) bq[i] += a[i];
          tile_scaled_softmax(pb.cov == Cov::None ? a : bq, C, l, scale, ga);
        }
        if (pb.cov != Cov::None)
          for (int64_t i = 0; i < C * kTile; ++i) gb[i] = acc_t(2) * ga[i];
        for (int64_t t = 0; t < kTile; ++t)
          if (y[t] >= 0) ga[y[t] * kTile + t] -= scale[t];
        // grad_X = (mu/tau)^T g_a + the Sigma terms (2 Sigma' X g_b). Diagonal: both products
        // and the product with X in one pass (gemm_pair). Otherwise the Sigma terms (full) are
        // formed first in tmp and taken as the GEMM's initial value, so the GEMM's result is the
        // tile's gradient. Full tiles of an fp32 gradient go straight from the registers to the
        // output, around the caches; others through gx and store_grad.
        acc_t* dst = streamable_grad_tile(pb, out.grad_feats, b, p0, n);
        if (pb.cov == Cov::Diag) {
          if (dst != nullptr)
            gemm_pair<acc_t, true>(D, C, kTile, pb.mu_scaled, pb.sigma_scaled, 1, D, ga, gb,
                                   kTile, X, ldx, dst, P);
          else
            gemm_pair<acc_t>(D, C, kTile, pb.mu_scaled, pb.sigma_scaled, 1, D, ga, gb, kTile, X,
                             ldx, gx, ldg);
        } else {
          const acc_t* init = nullptr;
          if (pb.cov == Cov::Full) {
            acc_t* tmp = s.tmp.data();
            std::fill(s.tmp.begin(), s.tmp.end(), acc_t(0));
            for (int64_t c = 0; c < C; ++c) {
              const acc_t* U = s.U.data() + c * D * kTile;
              const acc_t* gbc = gb + c * kTile;
              for (int64_t d = 0; d < D; ++d)
                for (int64_t t = 0; t < kTile; ++t)
                  tmp[d * kTile + t] += gbc[t] * U[d * kTile + t];
            }
            init = tmp;
          }
          if (dst != nullptr)
            gemm_init<acc_t, true>(D, C, kTile, pb.mu_scaled, 1, D, ga, kTile, dst, P, init,
                                   kTile);
          else
            gemm_init<acc_t>(D, C, kTile, pb.mu_scaled, 1, D, ga, kTile, gx, ldg, init, kTile);
        }
        if (dst == nullptr) store_grad(pb, out.grad_feats, b, p0, n, gx);
        if (!stats_grad) continue;
        // statistics partials: X [D][T] @ g_a^T [T][Cp] (g transposed, zero padded to Cp
        // columns), (X o X) @ g_b^T for a diagonal Sigma, sum_t g_b[c][t] x_t x_t^T for a full one
        acc_t* gT = s.gT.data();
        const auto transpose_g = [&](const acc_t* g) {
          std::fill(s.gT.begin(), s.gT.end(), acc_t(0));
          for (int64_t c = 0; c < C; ++c)
            for (int64_t t = 0; t < kTile; ++t) gT[t * Cp + c] = g[c * kTile + t];
        };
        transpose_g(ga);
        gemm<acc_t>(D, kTile, Cp, X, ldx, 1, gT, Cp, gmu, Cp, true);
        if (pb.cov == Cov::Diag) {
          transpose_g(gb);
          gemm<acc_t>(D, kTile, Cp, s.X2.data(), kTile, 1, gT, Cp, gsig, Cp, true);
        } else if (pb.cov == Cov::Full) {
          acc_t* XT = s.XT.data();
          for (int64_t d = 0; d < D; ++d)
            for (int64_t t = 0; t < kTile; ++t) XT[t * D + d] = X[d * ldx + t];
          acc_t* GX = s.tmp.data();  // [D][T]: g_b[c][t] x[d][t]
          for (int64_t c = 0; c < C; ++c) {
            const acc_t* gbc = gb + c * kTile;
            for (int64_t d = 0; d < D; ++d)
              for (int64_t t = 0; t < kTile; ++t) GX[d * kTile + t] = gbc[t] * X[d * ldx + t];
            gemm<acc_t>(D, kTile, D, GX, kTile, 1, XT, D, gsig + c * D * D, D, true);
          }
        }
      }
    }
    stream_fence();
  });
}

// Sum of the [n_chunks][size] partials in chunk order, times `scale`.
template <typename acc_t>
at::Tensor merge_partials(const at::Tensor& partials, double scale) {
  const int64_t n_chunks = partials.size(0), size = partials.size(1);
  at::Tensor out = at::empty({size}, partials.options());
  const acc_t* src = partials.data_ptr<acc_t>();
  acc_t* dst = out.data_ptr<acc_t>();
  at::parallel_for(0, size, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t total = acc_t(0);
      for (int64_t k = 0; k < n_chunks; ++k) total += src[k * size + i];
      dst[i] = total * static_cast<acc_t>(scale);
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Op entry points: checks, parameter preparation, output allocation
// ---------------------------------------------------------------------------------------------
at::ScalarType acc_type_of(const at::Tensor& feats) {
  return feats.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_inputs(const char* op, const at::Tensor& feats, const at::Tensor& labels,
                  const at::Tensor& centroids, const at::Tensor* covariance,
                  const std::optional<at::Tensor>& weights, double tau) {
  TORCH_CHECK_VALUE(feats.dim() == 3, "fastuda::", op, ": feats must be [B, D, P], got shape ",
                    feats.sizes());
  const auto fd = feats.scalar_type();
  TORCH_CHECK_TYPE(fd == at::kFloat || fd == at::kHalf || fd == at::kBFloat16 ||
                       fd == at::kDouble,
                   "fastuda::", op, ": feats must be float32/float16/bfloat16/float64, got ", fd);
  TORCH_CHECK_TYPE(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false), "fastuda::",
                   op, ": labels must be an integer tensor, got ", labels.scalar_type());
  const int64_t B = feats.size(0), D = feats.size(1), P = feats.size(2);
  TORCH_CHECK_VALUE(labels.dim() == 2 && labels.size(0) == B && labels.size(1) == P, "fastuda::",
                    op, ": labels shape ", labels.sizes(), " does not match feats shape ",
                    feats.sizes(), " (expected [", B, ", ", P, "])");
  TORCH_CHECK_VALUE(centroids.dim() == 2 && centroids.size(1) == D, "fastuda::", op,
                    ": centroids shape ", centroids.sizes(),
                    " does not match the feature width D=", D, " of feats ", feats.sizes());
  TORCH_CHECK_VALUE(centroids.size(0) >= 1, "fastuda::", op, ": need at least one class, got "
                    "centroids shape ", centroids.sizes());
  TORCH_CHECK_TYPE(centroids.is_floating_point(), "fastuda::", op,
                   ": centroids must be floating point, got ", centroids.scalar_type());
  if (covariance != nullptr) {
    const at::Tensor& cv = *covariance;
    const int64_t C = centroids.size(0);
    const bool diag = cv.dim() == 2 && cv.size(0) == C && cv.size(1) == D;
    const bool full = cv.dim() == 3 && cv.size(0) == C && cv.size(1) == D && cv.size(2) == D;
    TORCH_CHECK_VALUE(diag || full, "fastuda::", op, ": covariance shape ", cv.sizes(),
                      " must be [C, D] or [C, D, D] for centroids ", centroids.sizes());
    TORCH_CHECK_TYPE(cv.is_floating_point(), "fastuda::", op,
                     ": covariance must be floating point, got ", cv.scalar_type());
    TORCH_CHECK(cv.device().is_cpu(), "fastuda::", op, ": the CPU kernel got covariance on ",
                cv.device());
  }
  if (weights.has_value()) {
    TORCH_CHECK_VALUE(weights->sizes() == labels.sizes(), "fastuda::", op, ": weights shape ",
                      weights->sizes(), " does not match labels shape ", labels.sizes());
    TORCH_CHECK_TYPE(weights->is_floating_point(), "fastuda::", op,
                     ": weights must be floating point, got ", weights->scalar_type());
    TORCH_CHECK(weights->device().is_cpu(), "fastuda::", op, ": the CPU kernel got weights on ",
                weights->device());
  }
  for (const at::Tensor* t : {&feats, &labels, &centroids})
    TORCH_CHECK(t->device().is_cpu(), "fastuda::", op, ": the CPU kernel got a tensor on ",
                t->device());
  TORCH_CHECK_VALUE(tau > 0, "fastuda::", op, ": tau must be > 0, got ", tau);
}

template <typename acc_t>
Problem<acc_t> make_problem(const at::Tensor& feats, const at::Tensor& labels,
                            const at::Tensor& centroids, int64_t ignore_index,
                            const at::Tensor& weights_acc, const at::Tensor& mu_scaled,
                            const at::Tensor& sigma_scaled) {
  Problem<acc_t> pb;
  pb.B = feats.size(0);
  pb.D = feats.size(1);
  pb.P = feats.size(2);
  pb.C = centroids.size(0);
  pb.feats = feats.data_ptr();
  pb.feats_dtype = feats.scalar_type();
  pb.f_sb = feats.stride(0);
  pb.f_sd = feats.stride(1);
  pb.f_sp = feats.stride(2);
  pb.labels = labels.data_ptr();
  pb.labels_dtype = labels.scalar_type();
  pb.l_sb = labels.stride(0);
  pb.l_sp = labels.stride(1);
  pb.ignore_index = ignore_index;
  pb.weights = weights_acc.defined() ? weights_acc.data_ptr<acc_t>() : nullptr;
  pb.mu_scaled = mu_scaled.data_ptr<acc_t>();
  if (sigma_scaled.defined()) {
    pb.cov = sigma_scaled.dim() == 3 ? Cov::Full : Cov::Diag;
    pb.sigma_scaled = sigma_scaled.data_ptr<acc_t>();
  }
  pb.tiles_per_row = (pb.P + kTile - 1) / kTile;
  return pb;
}

// Sigma' = lam / (2 tau^2) * Sigma, symmetrised for the full case (x^T S x = x^T sym(S) x)
at::Tensor scaled_sigma(const at::Tensor* covariance, at::ScalarType acc, double tau, double lam) {
  if (covariance == nullptr) return at::Tensor();
  at::Tensor cv = covariance->to(acc);
  if (cv.dim() == 3) cv = (cv + cv.transpose(1, 2)) * 0.5;
  return (cv * (lam / (2.0 * tau * tau))).contiguous();
}

at::Tensor weights_as(const std::optional<at::Tensor>& weights, at::ScalarType acc) {
  return weights.has_value() ? weights->to(acc).contiguous() : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrast_forward(
    const char* op, const at::Tensor& feats, const at::Tensor& labels,
    const at::Tensor& centroids, const at::Tensor* covariance, double tau, double lam,
    int64_t ignore_index, const std::optional<at::Tensor>& weights, bool keep_probs) {
  check_inputs(op, feats, labels, centroids, covariance, weights, tau);
  const auto acc = acc_type_of(feats);
  const int64_t B = feats.size(0), P = feats.size(2), C = centroids.size(0);
  at::Tensor loss = at::empty({B, P}, feats.options().dtype(acc));
  at::Tensor lse = at::empty({B, P}, feats.options().dtype(acc));
  at::Tensor probs = at::empty({keep_probs ? B : 0, keep_probs ? C : 0, keep_probs ? P : 0},
                               feats.options().dtype(acc));
  const at::Tensor mu = (centroids.to(acc) * (1.0 / tau)).contiguous();
  const at::Tensor sigma = scaled_sigma(covariance, acc, tau, lam);
  const at::Tensor w = weights_as(weights, acc);
  FirstBadLabel first_bad;
  AT_DISPATCH_FLOATING_TYPES(acc, "fastuda_contrast_forward", [&] {
    const auto pb = make_problem<scalar_t>(feats, labels, centroids, ignore_index, w, mu, sigma);
    forward_impl<scalar_t>(pb, loss.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                           keep_probs ? probs.data_ptr<scalar_t>() : nullptr, first_bad);
  });
  if (first_bad.found())
    raise_bad_label(op, labels, first_bad.index.load(), centroids.size(0), ignore_index);
  return {loss, lse, probs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrast_backward(
    const char* op, const at::Tensor& grad_loss, const at::Tensor& feats,
    const at::Tensor& labels, const at::Tensor& centroids, const at::Tensor* covariance,
    const at::Tensor& lse, double tau, double lam, int64_t ignore_index,
    const std::optional<at::Tensor>& weights, bool stats_grad,
    const std::optional<at::Tensor>& probs) {
  check_inputs(op, feats, labels, centroids, covariance, weights, tau);
  TORCH_CHECK_VALUE(grad_loss.sizes() == labels.sizes() && lse.sizes() == labels.sizes(),
                    "fastuda::", op, ": grad_loss ", grad_loss.sizes(), " and lse ", lse.sizes(),
                    " must both match labels ", labels.sizes());
  const auto acc = acc_type_of(feats);
  const int64_t B = feats.size(0), D = feats.size(1), P = feats.size(2);
  const int64_t C = centroids.size(0);
  TORCH_CHECK_VALUE(!probs.has_value() || probs->sizes() == at::IntArrayRef({B, C, P}),
                    "fastuda::", op, ": probs ", probs.has_value() ? probs->sizes() : lse.sizes(),
                    " must be [B, C, P] = [", B, ", ", C, ", ", P, "] (the forward's keep_probs)");
  const at::Tensor probs_acc = probs.has_value() ? probs->to(acc).contiguous() : at::Tensor();
  const bool full = covariance != nullptr && covariance->dim() == 3;
  const at::Tensor mu = (centroids.to(acc) * (1.0 / tau)).contiguous();
  const at::Tensor sigma = scaled_sigma(covariance, acc, tau, lam);
  const at::Tensor w = weights_as(weights, acc);
  const at::Tensor gl = grad_loss.to(acc).contiguous();
  const at::Tensor lse_acc = lse.to(acc).contiguous();
  // one kept gradient block per op (cpu/output_buffer.h): proto and dist may run in one step
  static GradBuffer proto_grad_buffer, dist_grad_buffer;
  GradBuffer& grad_buffer = covariance ? dist_grad_buffer : proto_grad_buffer;
  at::Tensor grad_feats = grad_buffer.empty({B, D, P}, feats.options());  // contiguous
  const int64_t n_tiles = B * ((P + kTile - 1) / kTile);
  int64_t n_chunks = (n_tiles + kTilesPerChunk - 1) / kTilesPerChunk;
  const int64_t sigma_size = covariance ? (full ? C * D * D : D * c_pad(C)) : 0;
  if (stats_grad) {
    // per-chunk partials of the statistics' gradients: at most 64 chunks of at least 16 tiles,
    // and their total within the size of the feature input
    const int64_t per_chunk = D * c_pad(C) + sigma_size;
    const int64_t budget = std::max<int64_t>(B * D * P, per_chunk);
    n_chunks = std::clamp<int64_t>(std::min<int64_t>(64, budget / per_chunk), 1,
                                   std::max<int64_t>((n_tiles + 15) / 16, 1));
  }
  at::Tensor part_mu, part_sigma;
  if (stats_grad) {
    part_mu = at::zeros({n_chunks, D * c_pad(C)}, feats.options().dtype(acc));
    if (covariance)
      part_sigma = at::zeros({n_chunks, sigma_size}, feats.options().dtype(acc));
  }
  FirstBadLabel first_bad;
  at::Tensor grad_centroids, grad_covariance;
  AT_DISPATCH_FLOATING_TYPES(acc, "fastuda_contrast_backward", [&] {
    const auto pb = make_problem<scalar_t>(feats, labels, centroids, ignore_index, w, mu, sigma);
    BackwardOut<scalar_t> out;
    out.grad_feats = grad_feats;
    if (stats_grad) {
      out.grad_mu = part_mu.data_ptr<scalar_t>();
      if (covariance) out.grad_sigma = part_sigma.data_ptr<scalar_t>();
    }
    backward_impl<scalar_t>(pb, gl.data_ptr<scalar_t>(), lse_acc.data_ptr<scalar_t>(),
                            probs_acc.defined() ? probs_acc.data_ptr<scalar_t>() : nullptr,
                            stats_grad, n_chunks, out, first_bad);
    if (stats_grad) {
      // d a_c / d mu_c = f / tau
      const auto untranspose = [&](const at::Tensor& dc) {  // [D][Cp] -> [C][D]
        return dc.view({D, c_pad(C)}).narrow(1, 0, C).t().contiguous();
      };
      grad_centroids = untranspose(merge_partials<scalar_t>(part_mu, 1.0 / tau));
      // the partials hold sum 2 s p f f^T; d b_c / d Sigma_c = lam / (2 tau^2) f f^T
      if (covariance) {
        const at::Tensor merged = merge_partials<scalar_t>(part_sigma, lam / (4.0 * tau * tau));
        grad_covariance = full ? merged.view(covariance->sizes()) : untranspose(merged);
      }
    }
  });
  if (first_bad.found())
    raise_bad_label(op, labels, first_bad.index.load(), C, ignore_index);
  if (stats_grad) {
    grad_centroids = grad_centroids.to(centroids.scalar_type());
    if (covariance) grad_covariance = grad_covariance.to(covariance->scalar_type());
  } else {
    grad_centroids = at::empty({0}, centroids.options());
    if (covariance) grad_covariance = at::empty({0}, covariance->options());
  }
  if (!covariance) grad_covariance = at::empty({0}, feats.options().dtype(acc));
  grad_buffer.keep(grad_feats);
  return {grad_feats, grad_centroids, grad_covariance};
}

// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> proto_contrast_forward(
    const at::Tensor& feats, const at::Tensor& labels, const at::Tensor& centroids, double tau,
    int64_t ignore_index, const std::optional<at::Tensor>& weights, bool keep_probs) {
  return contrast_forward("proto_contrast_forward", feats, labels, centroids, nullptr, tau, 0.0,
                          ignore_index, weights, keep_probs);
}

std::tuple<at::Tensor, at::Tensor> proto_contrast_backward(
    const at::Tensor& grad_loss, const at::Tensor& feats, const at::Tensor& labels,
    const at::Tensor& centroids, const at::Tensor& lse, double tau, int64_t ignore_index,
    const std::optional<at::Tensor>& weights, bool centroids_grad,
    const std::optional<at::Tensor>& probs) {
  auto [gf, gc, unused] =
      contrast_backward("proto_contrast_backward", grad_loss, feats, labels, centroids, nullptr,
                        lse, tau, 0.0, ignore_index, weights, centroids_grad, probs);
  return {gf, gc};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dist_contrast_forward(
    const at::Tensor& feats, const at::Tensor& labels, const at::Tensor& centroids,
    const at::Tensor& covariance, double tau, double lam, int64_t ignore_index,
    const std::optional<at::Tensor>& weights, bool keep_probs) {
  return contrast_forward("dist_contrast_forward", feats, labels, centroids, &covariance, tau,
                          lam, ignore_index, weights, keep_probs);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dist_contrast_backward(
    const at::Tensor& grad_loss, const at::Tensor& feats, const at::Tensor& labels,
    const at::Tensor& centroids, const at::Tensor& covariance, const at::Tensor& lse, double tau,
    double lam, int64_t ignore_index, const std::optional<at::Tensor>& weights,
    bool stats_grad, const std::optional<at::Tensor>& probs) {
  return contrast_backward("dist_contrast_backward", grad_loss, feats, labels, centroids,
                           &covariance, lse, tau, lam, ignore_index, weights, stats_grad, probs);
}

}  // namespace
}  // namespace fastuda

TORCH_LIBRARY_IMPL(fastuda, CPU, m) {
  m.impl("proto_contrast_forward", &fastuda::proto_contrast_forward);
  m.impl("proto_contrast_backward", &fastuda::proto_contrast_backward);
  m.impl("dist_contrast_forward", &fastuda::dist_contrast_forward);
  m.impl("dist_contrast_backward", &fastuda::dist_contrast_backward);
}
