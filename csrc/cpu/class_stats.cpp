// CPU kernel of fastuda::class_stats: per-class count, mean and m2 of one batch (ops.md section 1).
//
// Diagonal statistics are computed in one read of the features. The pixels are cut into chunks
// (one batch image, a few thousand pixels); each chunk is reduced exactly with a two-pass scheme
// while its data sit in L1/L2 (class sums -> class means -> centred squares), and the chunk stats
// are folded into per-thread [C, D] fp64 accumulators with the Chan merge. Thread partials are
// merged in thread order, so results are deterministic for a given thread count. m2 is never
// formed as sum(x^2) - n mean^2.
//
// Two loop orders, picked from the strides of the [B, D, P] view:
//  * channels-first (pixel stride <= channel stride, e.g. [B, D, H, W] contiguous): channel-outer,
//    pixel-inner; each channel row of a chunk is reduced by scattering into per-class scalars
//    (four accumulator banks break the store-to-load chains of runs of equal labels).
//  * pixel-major ([N, D] matrices, channels_last maps): pixel-outer, channel-inner; each pixel's
//    feature row is added to its class's [D] row (contiguous, vectorised).
//
// Full covariance: the diagonal pass gives counts and means; pixels are then counting-sorted by
// class and each class's centred features are gathered block by block into a small buffer that
// feeds one GEMM (addmm) per block: N*D*D multiply-adds in total, no one-hot.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/chan_merge.h"

namespace fastuda {
namespace {

constexpr int64_t kBanks = 4;                          // accumulator banks of the scatter loops
constexpr int64_t kChannelsFirstChunk = 4096;          // pixels per chunk (one row fits L1)
constexpr int64_t kPixelMajorChunkBytes = 256 * 1024;  // a chunk's [len, D] block fits L2
constexpr int64_t kGemmBlockBytes = 4 * 1024 * 1024;   // pixel chunk of the full-cov pass

struct Layout {
  int64_t B, D, P;
  int64_t sb, sd, sp;           // feature strides (elements)
  int64_t lsb, lsp;             // label strides
  int64_t wsb, wsp;             // weight strides
  bool channels_first() const { return sp <= sd; }
};

struct Chunking {
  int64_t per_batch, len, count;
  Chunking(int64_t B, int64_t P, int64_t target) {
    per_batch = P > 0 ? (P + target - 1) / target : 0;
    len = per_batch > 0 ? (P + per_batch - 1) / per_batch : 0;
    count = B * per_batch;
  }
};

// Reads one chunk of labels into class slots (ignore -> slot C). Out-of-range values are found in
// the same pass (branch-free flag) and reported with their position.
template <typename label_t>
void load_labels(const label_t* lab, int64_t stride, int64_t len, int64_t C, int64_t ignore,
                 int32_t* cls, int64_t b, int64_t p0) {
  bool bad = false;
  for (int64_t k = 0; k < len; ++k) {
    const int64_t v = static_cast<int64_t>(lab[k * stride]);
    const bool is_ignore = v == ignore;
    bad |= (!is_ignore) & ((v < 0) | (v >= C));
    cls[k] = is_ignore ? static_cast<int32_t>(C) : static_cast<int32_t>(v);
  }
  if (!bad) return;
  for (int64_t k = 0; k < len; ++k) {
    const int64_t v = static_cast<int64_t>(lab[k * stride]);
    TORCH_CHECK_VALUE(v == ignore || (v >= 0 && v < C), "fastuda::class_stats: label value ", v,
                      " (batch ", b, ", pixel ", p0 + k, ") is outside [0, ", C,
                      ") and is not ignore_index (", ignore, ")");
  }
}

void load_chunk_labels(const at::Tensor& labels, const Layout& g, int64_t C, int64_t ignore,
                       int64_t b, int64_t p0, int64_t len, int32_t* cls) {
  AT_DISPATCH_INTEGRAL_TYPES(labels.scalar_type(), "class_stats_labels", [&] {
    const scalar_t* lab = labels.const_data_ptr<scalar_t>() + b * g.lsb + p0 * g.lsp;
    load_labels(lab, g.lsp, len, C, ignore, cls, b, p0);
  });
}

// Per-chunk class weights (count, or sum of weights) and the list of classes with weight > 0.
void chunk_counts(const int32_t* cls, const float* w, int64_t len, int64_t C, double* cnt,
                  std::vector<int32_t>& present, int64_t b, int64_t p0) {
  std::fill(cnt, cnt + C + 1, 0.0);
  if (w == nullptr) {
    for (int64_t k = 0; k < len; ++k) cnt[cls[k]] += 1.0;
  } else {
    for (int64_t k = 0; k < len; ++k) {
      TORCH_CHECK_VALUE(w[k] >= 0.0f || cls[k] == C, "fastuda::class_stats: weight ", w[k],
                        " (batch ", b, ", pixel ", p0 + k, ") must be >= 0");
      cnt[cls[k]] += static_cast<double>(w[k]);
    }
  }
  present.clear();
  for (int64_t c = 0; c < C; ++c)
    if (cnt[c] > 0.0) present.push_back(static_cast<int32_t>(c));
}

// Running fp64 statistics of one thread: count [C], mean [C, D], m2 [C, D].
struct Partial {
  std::vector<double> n, mean, m2;
  Partial(int64_t C, int64_t D) : n(C, 0.0), mean(C * D, 0.0), m2(C * D, 0.0) {}
};

// Channels-first chunk: for each channel, scatter the row into class sums, then centred squares.
template <typename scalar_t, typename acc_t>
void chunk_channels_first(const scalar_t* x, const Layout& g, int64_t b, int64_t p0, int64_t len,
                          int64_t C, const int32_t* cls, const float* w, const double* cnt,
                          const std::vector<int32_t>& present, acc_t* row_buf, acc_t* bank,
                          acc_t* class_mean, Partial& acc) {
  const int64_t C1 = C + 1;
  acc_t* b0 = bank;
  acc_t* b1 = bank + C1;
  acc_t* b2 = bank + 2 * C1;
  acc_t* b3 = bank + 3 * C1;
  const bool direct = std::is_same_v<scalar_t, acc_t> && g.sp == 1;
  std::fill(class_mean, class_mean + C1, acc_t(0));
  for (int64_t d = 0; d < g.D; ++d) {
    const scalar_t* src = x + b * g.sb + d * g.sd + p0 * g.sp;
    const acc_t* row;
    if (direct) {
      row = reinterpret_cast<const acc_t*>(src);
    } else {
      for (int64_t k = 0; k < len; ++k) row_buf[k] = static_cast<acc_t>(src[k * g.sp]);
      row = row_buf;
    }
    // pass 1: class sums
    std::fill(bank, bank + kBanks * C1, acc_t(0));
    int64_t k = 0;
    if (w == nullptr) {
      for (; k + 4 <= len; k += 4) {
        b0[cls[k]] += row[k];
        b1[cls[k + 1]] += row[k + 1];
        b2[cls[k + 2]] += row[k + 2];
        b3[cls[k + 3]] += row[k + 3];
      }
      for (; k < len; ++k) b0[cls[k]] += row[k];
    } else {
      for (; k + 4 <= len; k += 4) {
        b0[cls[k]] += w[k] * row[k];
        b1[cls[k + 1]] += w[k + 1] * row[k + 1];
        b2[cls[k + 2]] += w[k + 2] * row[k + 2];
        b3[cls[k + 3]] += w[k + 3] * row[k + 3];
      }
      for (; k < len; ++k) b0[cls[k]] += w[k] * row[k];
    }
    for (int32_t c : present)
      class_mean[c] = (b0[c] + b1[c] + b2[c] + b3[c]) / static_cast<acc_t>(cnt[c]);
    // pass 2: centred squares around the chunk's class means (row is still in L1)
    std::fill(bank, bank + kBanks * C1, acc_t(0));
    k = 0;
    if (w == nullptr) {
      for (; k + 4 <= len; k += 4) {
        const acc_t v0 = row[k] - class_mean[cls[k]];
        const acc_t v1 = row[k + 1] - class_mean[cls[k + 1]];
        const acc_t v2 = row[k + 2] - class_mean[cls[k + 2]];
        const acc_t v3 = row[k + 3] - class_mean[cls[k + 3]];
        b0[cls[k]] += v0 * v0;
        b1[cls[k + 1]] += v1 * v1;
        b2[cls[k + 2]] += v2 * v2;
        b3[cls[k + 3]] += v3 * v3;
      }
      for (; k < len; ++k) {
        const acc_t v = row[k] - class_mean[cls[k]];
        b0[cls[k]] += v * v;
      }
    } else {
      for (; k + 4 <= len; k += 4) {
        const acc_t v0 = row[k] - class_mean[cls[k]];
        const acc_t v1 = row[k + 1] - class_mean[cls[k + 1]];
        const acc_t v2 = row[k + 2] - class_mean[cls[k + 2]];
        const acc_t v3 = row[k + 3] - class_mean[cls[k + 3]];
        b0[cls[k]] += w[k] * v0 * v0;
        b1[cls[k + 1]] += w[k + 1] * v1 * v1;
        b2[cls[k + 2]] += w[k + 2] * v2 * v2;
        b3[cls[k + 3]] += w[k + 3] * v3 * v3;
      }
      for (; k < len; ++k) {
        const acc_t v = row[k] - class_mean[cls[k]];
        b0[cls[k]] += w[k] * v * v;
      }
    }
    for (int32_t c : present) {
      const double m2 = static_cast<double>(b0[c] + b1[c] + b2[c] + b3[c]);
      chan_merge_into<double>(acc.n[c], cnt[c], acc.mean[c * g.D + d], acc.m2[c * g.D + d],
                              static_cast<double>(class_mean[c]), m2);
    }
  }
}

// Pixel-major chunk: gather the chunk's valid pixels as [n, D] rows, then row-wise two-pass.
template <typename scalar_t, typename acc_t>
void chunk_pixel_major(const scalar_t* x, const Layout& g, int64_t b, int64_t p0, int64_t len,
                       int64_t C, const int32_t* cls, const float* w, const double* cnt,
                       const std::vector<int32_t>& present, acc_t* block, int32_t* rows,
                       acc_t* sums, acc_t* sq, Partial& acc) {
  const int64_t D = g.D;
  int64_t n = 0;
  for (int64_t k = 0; k < len; ++k)
    if (cls[k] < C && cnt[cls[k]] > 0.0) rows[n++] = static_cast<int32_t>(k);
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t* src = x + b * g.sb + (p0 + rows[j]) * g.sp;
    acc_t* dst = block + j * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<acc_t>(src[d * g.sd]);
  }
  for (int32_t c : present) {
    std::fill(sums + c * D, sums + (c + 1) * D, acc_t(0));
    std::fill(sq + c * D, sq + (c + 1) * D, acc_t(0));
  }
  for (int64_t j = 0; j < n; ++j) {
    const int64_t k = rows[j];
    const acc_t wk = w == nullptr ? acc_t(1) : static_cast<acc_t>(w[k]);
    acc_t* s = sums + cls[k] * D;
    const acc_t* r = block + j * D;
    for (int64_t d = 0; d < D; ++d) s[d] += wk * r[d];
  }
  for (int32_t c : present) {
    const acc_t inv = acc_t(1) / static_cast<acc_t>(cnt[c]);
    acc_t* s = sums + c * D;
    for (int64_t d = 0; d < D; ++d) s[d] *= inv;  // now the chunk's class mean
  }
  for (int64_t j = 0; j < n; ++j) {
    const int64_t k = rows[j];
    const acc_t wk = w == nullptr ? acc_t(1) : static_cast<acc_t>(w[k]);
    const acc_t* m = sums + cls[k] * D;
    acc_t* q = sq + cls[k] * D;
    const acc_t* r = block + j * D;
    for (int64_t d = 0; d < D; ++d) {
      const acc_t v = r[d] - m[d];
      q[d] += wk * v * v;
    }
  }
  for (int32_t c : present)
    for (int64_t d = 0; d < D; ++d)
      chan_merge_into<double>(acc.n[c], cnt[c], acc.mean[c * D + d], acc.m2[c * D + d],
                              static_cast<double>(sums[c * D + d]),
                              static_cast<double>(sq[c * D + d]));
}

// Diagonal statistics in fp64: fills `out` (count, mean [C, D], m2 [C, D]).
template <typename scalar_t, typename acc_t>
void diag_stats(const at::Tensor& feats, const at::Tensor& labels, const float* weights,
                const Layout& g, int64_t C, int64_t ignore, Partial& out) {
  const int64_t D = g.D;
  const bool cf = g.channels_first();
  const int64_t target =
      cf ? kChannelsFirstChunk
         : std::clamp<int64_t>(kPixelMajorChunkBytes / std::max<int64_t>(D * sizeof(acc_t), 1),
                               16, kChannelsFirstChunk);
  const Chunking chunks(g.B, g.P, target);
  if (chunks.count == 0) return;
  const int64_t slots = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), chunks.count));
  std::vector<Partial> partial(slots, Partial(C, D));
  const scalar_t* x = feats.const_data_ptr<scalar_t>();

  at::parallel_for(0, slots, 1, [&](int64_t s0, int64_t s1) {
    const int64_t C1 = C + 1;
    std::vector<int32_t> cls(chunks.len), rows;
    std::vector<float> wbuf(weights ? chunks.len : 0);
    std::vector<double> cnt(C1);
    std::vector<int32_t> present;
    std::vector<acc_t> row_buf, bank, class_mean, block, sums, sq;
    if (cf) {
      row_buf.resize(chunks.len);
      bank.resize(kBanks * C1);
      class_mean.resize(C1);
    } else {
      rows.resize(chunks.len);
      block.resize(chunks.len * D);
      sums.resize(C1 * D);
      sq.resize(C1 * D);
    }
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t first = s * chunks.count / slots, last = (s + 1) * chunks.count / slots;
      for (int64_t i = first; i < last; ++i) {
        const int64_t b = i / chunks.per_batch;
        const int64_t p0 = (i % chunks.per_batch) * chunks.len;
        const int64_t len = std::min(chunks.len, g.P - p0);
        if (len <= 0) continue;
        load_chunk_labels(labels, g, C, ignore, b, p0, len, cls.data());
        const float* w = nullptr;
        if (weights != nullptr) {
          for (int64_t k = 0; k < len; ++k) wbuf[k] = weights[b * g.wsb + (p0 + k) * g.wsp];
          w = wbuf.data();
        }
        chunk_counts(cls.data(), w, len, C, cnt.data(), present, b, p0);
        if (present.empty()) continue;  // all-ignore chunk: the features are not read
        if (cf) {
          chunk_channels_first<scalar_t, acc_t>(x, g, b, p0, len, C, cls.data(), w, cnt.data(),
                                                present, row_buf.data(), bank.data(),
                                                class_mean.data(), partial[s]);
        } else {
          chunk_pixel_major<scalar_t, acc_t>(x, g, b, p0, len, C, cls.data(), w, cnt.data(), present,
                                             block.data(), rows.data(), sums.data(), sq.data(),
                                             partial[s]);
        }
        for (int32_t c : present) partial[s].n[c] += cnt[c];
      }
    }
  });

  // deterministic fold of the thread partials, in slot order
  out = std::move(partial[0]);
  for (int64_t s = 1; s < slots; ++s) {
    const Partial& p = partial[s];
    for (int64_t c = 0; c < C; ++c) {
      if (!(p.n[c] > 0.0)) continue;
      for (int64_t d = 0; d < D; ++d)
        chan_merge_into<double>(out.n[c], p.n[c], out.mean[c * D + d], out.m2[c * D + d],
                                p.mean[c * D + d], p.m2[c * D + d]);
      out.n[c] += p.n[c];
    }
  }
}

// Pixels with weight > 0 grouped by (chunk, class): order[offsets[i * C + c] ...] lists the flat
// pixel ids (b * P + p) of class c in chunk i (counting sort; labels were range-checked already).
struct ClassOrder {
  std::vector<int64_t> order, offsets;
  int64_t count(int64_t chunk, int64_t C, int64_t c) const {
    return offsets[chunk * C + c + 1] - offsets[chunk * C + c];
  }
};

ClassOrder sort_pixels_by_class(const at::Tensor& labels, const float* weights, const Layout& g,
                                const Chunking& chunks, int64_t C, int64_t ignore) {
  ClassOrder out;
  out.offsets.assign(chunks.count * C + 1, 0);
  AT_DISPATCH_INTEGRAL_TYPES(labels.scalar_type(), "class_stats_sort", [&] {
    const scalar_t* lab = labels.const_data_ptr<scalar_t>();
    auto slot = [&](int64_t b, int64_t p) -> int64_t {
      const int64_t v = static_cast<int64_t>(lab[b * g.lsb + p * g.lsp]);
      if (v == ignore || v < 0 || v >= C) return -1;
      if (weights != nullptr && !(weights[b * g.wsb + p * g.wsp] > 0.0f)) return -1;
      return v;
    };
    auto for_each_pixel = [&](auto&& fn) {
      for (int64_t i = 0; i < chunks.count; ++i) {
        const int64_t b = i / chunks.per_batch, p0 = (i % chunks.per_batch) * chunks.len;
        const int64_t p1 = std::min(g.P, p0 + chunks.len);
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t c = slot(b, p);
          if (c >= 0) fn(i * C + c, b * g.P + p);
        }
      }
    };
    for_each_pixel([&](int64_t key, int64_t) { ++out.offsets[key + 1]; });
    for (size_t k = 1; k < out.offsets.size(); ++k) out.offsets[k] += out.offsets[k - 1];
    out.order.resize(out.offsets.back());
    std::vector<int64_t> fill(out.offsets.begin(), out.offsets.end() - 1);
    for_each_pixel([&](int64_t key, int64_t pix) { out.order[fill[key]++] = pix; });
  });
  return out;
}

// Full m2 [C, D, D]. Classes are dealt to threads (largest first, to the least loaded thread);
// each thread walks the pixel chunks in order and, per chunk and owned class, gathers the centred
// (weighted) features into a small buffer and adds its Gram matrix with one single-threaded GEMM.
// Every class is computed by one thread in a fixed order: deterministic for any thread count.
template <typename scalar_t, typename acc_t>
void full_m2(const at::Tensor& feats, const at::Tensor& labels, const float* weights,
             const Layout& g, int64_t C, int64_t ignore, const Partial& diag, at::Tensor& m2) {
  const int64_t D = g.D;
  if (D == 0 || g.B * g.P == 0) return;
  const int64_t target = std::clamp<int64_t>(kGemmBlockBytes / (D * sizeof(acc_t)), 1024, 16384);
  const Chunking chunks(g.B, g.P, target);
  const ClassOrder sorted = sort_pixels_by_class(labels, weights, g, chunks, C, ignore);
  std::vector<int64_t> total(C, 0);
  int64_t largest = 0;  // most pixels of one class in one chunk
  for (int64_t i = 0; i < chunks.count; ++i)
    for (int64_t c = 0; c < C; ++c) {
      total[c] += sorted.count(i, C, c);
      largest = std::max(largest, sorted.count(i, C, c));
    }
  std::vector<int64_t> classes;
  for (int64_t c = 0; c < C; ++c)
    if (total[c] > 0) classes.push_back(c);
  if (classes.empty()) return;
  std::stable_sort(classes.begin(), classes.end(),
                   [&](int64_t a, int64_t b) { return total[a] > total[b]; });
  const int64_t slots =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), classes.size()));
  std::vector<std::vector<int64_t>> owned(slots);
  std::vector<int64_t> load(slots, 0);
  for (int64_t c : classes) {
    const int64_t s = std::min_element(load.begin(), load.end()) - load.begin();
    owned[s].push_back(c);
    load[s] += total[c];
  }
  for (auto& list : owned) std::sort(list.begin(), list.end());
  const scalar_t* x = feats.const_data_ptr<scalar_t>();
  const bool cf = g.channels_first();
  const auto opts = m2.options();

  at::parallel_for(0, slots, 1, [&](int64_t s0, int64_t s1) {
    at::Tensor centred = at::empty({largest * D}, opts);
    at::Tensor weighted = weights ? at::empty({largest * D}, opts) : centred;
    std::vector<int64_t> offs(largest);
    std::vector<acc_t> wrow(largest), mean_c(D);
    for (int64_t s = s0; s < s1; ++s) {
      for (int64_t i = 0; i < chunks.count; ++i) {
        for (int64_t c : owned[s]) {
          const int64_t r = sorted.count(i, C, c);
          if (r == 0) continue;
          const int64_t* pix = sorted.order.data() + sorted.offsets[i * C + c];
          for (int64_t j = 0; j < r; ++j) {
            const int64_t b = pix[j] / g.P, p = pix[j] % g.P;
            offs[j] = b * g.sb + p * g.sp;
            wrow[j] = weights ? static_cast<acc_t>(weights[b * g.wsb + p * g.wsp]) : acc_t(1);
          }
          for (int64_t d = 0; d < D; ++d) mean_c[d] = static_cast<acc_t>(diag.mean[c * D + d]);
          acc_t* G = centred.mutable_data_ptr<acc_t>();
          acc_t* Gw = weighted.mutable_data_ptr<acc_t>();
          at::Tensor m2_c = m2.select(0, c);
          if (cf) {  // G as [D, r]: each channel row gathered along the class's pixels
            for (int64_t d = 0; d < D; ++d) {
              const scalar_t* src = x + d * g.sd;
              acc_t* dst = G + d * r;
              for (int64_t j = 0; j < r; ++j) dst[j] = static_cast<acc_t>(src[offs[j]]) - mean_c[d];
              if (weights)
                for (int64_t j = 0; j < r; ++j) Gw[d * r + j] = dst[j] * wrow[j];
            }
            at::Tensor Gt = centred.narrow(0, 0, D * r).view({D, r});
            at::Tensor Gwt = weighted.narrow(0, 0, D * r).view({D, r});
            m2_c.addmm_(Gwt, Gt.t());
          } else {  // G as [r, D]: one feature row per pixel
            for (int64_t j = 0; j < r; ++j) {
              const scalar_t* src = x + offs[j];
              acc_t* dst = G + j * D;
              for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<acc_t>(src[d * g.sd]) - mean_c[d];
              if (weights)
                for (int64_t d = 0; d < D; ++d) Gw[j * D + d] = dst[d] * wrow[j];
            }
            at::Tensor Gm = centred.narrow(0, 0, r * D).view({r, D});
            at::Tensor Gwm = weighted.narrow(0, 0, r * D).view({r, D});
            m2_c.addmm_(Gwm.t(), Gm);
          }
        }
      }
      // the GEMM's two operands are summed in different orders: make m2 exactly symmetric
      for (int64_t c : owned[s]) {
        acc_t* m = m2.select(0, c).mutable_data_ptr<acc_t>();
        for (int64_t a = 0; a < D; ++a)
          for (int64_t b = a + 1; b < D; ++b) {
            const acc_t v = (m[a * D + b] + m[b * D + a]) * acc_t(0.5);
            m[a * D + b] = v;
            m[b * D + a] = v;
          }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> class_stats_cpu(
    const at::Tensor& feats, const at::Tensor& labels, int64_t num_classes, int64_t ignore_index,
    const std::optional<at::Tensor>& weights, bool full_cov) {
  TORCH_CHECK_VALUE(feats.dim() == 3, "fastuda::class_stats: feats must be [B, D, P], got shape ",
                    feats.sizes());
  TORCH_CHECK_TYPE(feats.scalar_type() == at::kFloat || feats.scalar_type() == at::kHalf ||
                       feats.scalar_type() == at::kBFloat16 || feats.scalar_type() == at::kDouble,
                   "fastuda::class_stats: feats must be float32/float16/bfloat16/float64, got ",
                   feats.scalar_type());
  TORCH_CHECK_TYPE(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false) &&
                       labels.scalar_type() != at::kUInt16 && labels.scalar_type() != at::kUInt32 &&
                       labels.scalar_type() != at::kUInt64,
                   "fastuda::class_stats: labels must be uint8/int8/int16/int32/int64, got ",
                   labels.scalar_type());
  const int64_t B = feats.size(0), D = feats.size(1), P = feats.size(2);
  TORCH_CHECK_VALUE(labels.dim() == 2 && labels.size(0) == B && labels.size(1) == P,
                    "fastuda::class_stats: labels shape ", labels.sizes(),
                    " does not match feats shape ", feats.sizes(), " (expected [", B, ", ", P, "])");
  TORCH_CHECK_VALUE(num_classes >= 1, "fastuda::class_stats: num_classes must be >= 1, got ",
                    num_classes);
  TORCH_CHECK(labels.device().is_cpu(), "fastuda::class_stats: labels must be on the CPU like "
              "feats, got ", labels.device());
  const float* w = nullptr;
  Layout g{B, D, P, feats.stride(0), feats.stride(1), feats.stride(2),
           labels.stride(0), labels.stride(1), 0, 0};
  if (weights.has_value()) {
    const at::Tensor& wt = *weights;
    TORCH_CHECK_VALUE(wt.dim() == 2 && wt.size(0) == B && wt.size(1) == P,
                      "fastuda::class_stats: weights shape ", wt.sizes(),
                      " does not match feats shape ", feats.sizes(), " (expected [", B, ", ", P,
                      "])");
    TORCH_CHECK_TYPE(wt.scalar_type() == at::kFloat,
                     "fastuda::class_stats: weights must be float32, got ", wt.scalar_type());
    TORCH_CHECK(wt.device().is_cpu(), "fastuda::class_stats: weights must be on the CPU like "
                "feats, got ", wt.device());
    w = wt.const_data_ptr<float>();
    g.wsb = wt.stride(0);
    g.wsp = wt.stride(1);
  }
  const auto out_dtype = feats.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = feats.options().dtype(out_dtype);
  const int64_t C = num_classes;
  Partial diag(C, D);
  at::Tensor m2_full;
  if (full_cov) m2_full = at::zeros({C, D, D}, opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "class_stats",
                                  [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    diag_stats<scalar_t, acc_t>(feats, labels, w, g, C, ignore_index, diag);
    if (full_cov) full_m2<scalar_t, acc_t>(feats, labels, w, g, C, ignore_index, diag, m2_full);
  });

  auto as_tensor = [&](const std::vector<double>& v, at::IntArrayRef shape) {
    return at::from_blob(const_cast<double*>(v.data()), shape, at::kDouble).to(opts, false, true);
  };
  at::Tensor count = as_tensor(diag.n, {C});
  at::Tensor mean = as_tensor(diag.mean, {C, D});
  at::Tensor m2 = full_cov ? m2_full : as_tensor(diag.m2, {C, D});
  return {count, mean, m2};
}

// class_stats is not differentiable (statistics are taken under no_grad): the Autograd kernel
// runs the op below autograd, so its outputs never require grad and nothing is recorded.
std::tuple<at::Tensor, at::Tensor, at::Tensor> class_stats_autograd(
    const at::Tensor& feats, const at::Tensor& labels, int64_t num_classes, int64_t ignore_index,
    const std::optional<at::Tensor>& weights, bool full_cov) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastuda::class_stats", "")
                       .typed<decltype(class_stats_autograd)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(feats, labels, num_classes, ignore_index, weights, full_cov);
}

}  // namespace
}  // namespace fastuda

TORCH_LIBRARY_IMPL(fastuda, CPU, m) { m.impl("class_stats", &fastuda::class_stats_cpu); }

TORCH_LIBRARY_IMPL(fastuda, Autograd, m) {
  m.impl("class_stats", &fastuda::class_stats_autograd);
}
