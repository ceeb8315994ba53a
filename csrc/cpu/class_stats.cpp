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
//  * channels-first (pixel stride <= channel stride, e.g. [B, D, H, W] contiguous): the chunk's
//    pixels are counting-sorted by class once; each channel row is streamed in memory order into
//    an L1 buffer, regrouped by class, and every class is reduced as a contiguous segment.
//  * pixel-major ([N, D] matrices, channels_last maps): pixel-outer, channel-inner; each pixel's
//    feature row is added to its class's [D] row (contiguous, vectorised).
//
// Full covariance: the diagonal pass gives counts and means; pixels are then counting-sorted by
// (chunk, class), classes are dealt to threads, and each thread gathers its classes' centred
// features of a chunk into a buffer that feeds one GEMM (addmm) per class: N*D*D multiply-adds in
// total, no one-hot. Each class is owned by one thread, so m2 does not depend on the thread count.
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

constexpr int64_t kChannelsFirstChunk = 4096;          // pixels per chunk (one row fits L1)
constexpr int64_t kPixelMajorChunkBytes = 256 * 1024;  // a chunk's [len, D] block fits L2
constexpr int64_t kGemmChunkBytes = 4 * 1024 * 1024;   // pixel chunk of the full-cov pass

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

// Channels-first chunk. The chunk's pixels are counting-sorted by class once (the cost is shared
// by all D channels); then for each channel the row is gathered in class order into an L1 buffer
// and every class is a contiguous segment: segment sum -> class mean -> centred squares, both
// vectorised, with no scattered read-modify-write.
template <typename scalar_t, typename acc_t>
void chunk_channels_first(const scalar_t* x, const Layout& g, int64_t b, int64_t p0, int64_t len,
                          int64_t C, const int32_t* cls, const float* w, const double* cnt,
                          const std::vector<int32_t>& present, int32_t* order, acc_t* w_sorted,
                          acc_t* row_seq, acc_t* row, std::vector<int64_t>& seg,
                          Partial& acc) {
  // counting sort by class id (slot C = ignore); seg[c] .. seg[c + 1] is class c's segment
  const int64_t np = static_cast<int64_t>(present.size());
  seg.assign(C + 2, 0);
  for (int64_t k = 0; k < len; ++k) ++seg[cls[k] + 1];
  for (int64_t c = 0; c <= C; ++c) seg[c + 1] += seg[c];
  std::vector<int64_t> fill(seg.begin(), seg.end() - 1);
  for (int64_t k = 0; k < len; ++k) order[fill[cls[k]]++] = static_cast<int32_t>(k);
  if (w != nullptr)
    for (int32_t c : present)
      for (int64_t j = seg[c]; j < seg[c + 1]; ++j) w_sorted[j] = static_cast<acc_t>(w[order[j]]);
  const scalar_t* base = x + b * g.sb + p0 * g.sp;
  for (int64_t d = 0; d < g.D; ++d) {
    // stream the row in memory order (prefetch-friendly), then regroup it by class in L1
    const scalar_t* src = base + d * g.sd;
    for (int64_t k = 0; k < len; ++k) row_seq[k] = static_cast<acc_t>(src[k * g.sp]);
    for (int64_t i = 0; i < np; ++i) {
      const int32_t c = present[i];
      const int64_t j0 = seg[c], j1 = seg[c + 1];
      for (int64_t j = j0; j < j1; ++j) row[j] = row_seq[order[j]];
      const acc_t* seg_x = row + j0;
      const int64_t n = j1 - j0;
      acc_t s = 0;
      if (w == nullptr) {
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < n; ++j) s += seg_x[j];
      } else {
        const acc_t* seg_w = w_sorted + j0;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < n; ++j) s += seg_w[j] * seg_x[j];
      }
      const acc_t mean = s / static_cast<acc_t>(cnt[c]);
      acc_t q = 0;
      if (w == nullptr) {
#pragma omp simd reduction(+ : q)
        for (int64_t j = 0; j < n; ++j) {
          const acc_t v = seg_x[j] - mean;
          q += v * v;
        }
      } else {
        const acc_t* seg_w = w_sorted + j0;
#pragma omp simd reduction(+ : q)
        for (int64_t j = 0; j < n; ++j) {
          const acc_t v = seg_x[j] - mean;
          q += seg_w[j] * v * v;
        }
      }
      chan_merge_into<double>(acc.n[c], cnt[c], acc.mean[c * g.D + d], acc.m2[c * g.D + d],
                              static_cast<double>(mean), static_cast<double>(q));
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
    std::vector<acc_t> row_seq, row_buf, w_sorted, block, sums, sq;
    std::vector<int32_t> order;
    std::vector<int64_t> seg;
    if (cf) {
      row_seq.resize(chunks.len);
      row_buf.resize(chunks.len);
      order.resize(chunks.len);
      if (weights) w_sorted.resize(chunks.len);
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
                                                present, order.data(), w_sorted.data(),
                                                row_seq.data(), row_buf.data(), seg, partial[s]);
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

// Full m2 [C, D, D]. Classes are dealt to threads (largest first, to the least loaded thread).
// Each thread walks the pixel chunks in order; per chunk it gathers the centred features of all
// its classes into one buffer (channels-first data: channel-outer, so each channel row of the
// chunk is read once for all classes; pixel-major data: one row copy per pixel), then adds each
// class's Gram matrix with one single-threaded GEMM. Every class is computed by one thread in a
// fixed order, so results do not depend on the thread count.
template <typename scalar_t, typename acc_t>
void full_m2(const at::Tensor& feats, const at::Tensor& labels, const float* weights,
             const Layout& g, int64_t C, int64_t ignore, const Partial& diag, at::Tensor& m2) {
  const int64_t D = g.D;
  if (D == 0 || g.B * g.P == 0) return;
  const int64_t target = std::clamp<int64_t>(kGemmChunkBytes / (D * sizeof(acc_t)), 1024, 16384);
  const Chunking chunks(g.B, g.P, target);
  const ClassOrder sorted = sort_pixels_by_class(labels, weights, g, chunks, C, ignore);
  std::vector<int64_t> total(C, 0);
  for (int64_t i = 0; i < chunks.count; ++i)
    for (int64_t c = 0; c < C; ++c) total[c] += sorted.count(i, C, c);
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
    for (int64_t s = s0; s < s1; ++s) {
      const std::vector<int64_t>& mine = owned[s];
      const int64_t nc = static_cast<int64_t>(mine.size());
      // buffer sizes: this thread's pixels of one chunk (all its classes), one class's block
      int64_t rows_max = 0, class_max = 0;
      for (int64_t i = 0; i < chunks.count; ++i) {
        int64_t rows = 0;
        for (int64_t c : mine) {
          rows += sorted.count(i, C, c);
          class_max = std::max(class_max, sorted.count(i, C, c));
        }
        rows_max = std::max(rows_max, rows);
      }
      at::Tensor centred = at::empty({rows_max * D}, opts);
      at::Tensor weighted = weights ? at::empty({class_max * D}, opts) : at::Tensor();
      std::vector<int64_t> offs(rows_max), start(nc + 1);
      std::vector<acc_t> wrow(rows_max), means(nc * D);
      for (int64_t k = 0; k < nc; ++k)
        for (int64_t d = 0; d < D; ++d)
          means[k * D + d] = static_cast<acc_t>(diag.mean[mine[k] * D + d]);
      acc_t* G = centred.mutable_data_ptr<acc_t>();
      for (int64_t i = 0; i < chunks.count; ++i) {
        start[0] = 0;
        for (int64_t k = 0; k < nc; ++k) {
          const int64_t c = mine[k], r = sorted.count(i, C, c);
          const int64_t* pix = sorted.order.data() + sorted.offsets[i * C + c];
          for (int64_t j = 0; j < r; ++j) {
            const int64_t b = pix[j] / g.P, p = pix[j] % g.P;
            offs[start[k] + j] = b * g.sb + p * g.sp;
            wrow[start[k] + j] =
                weights ? static_cast<acc_t>(weights[b * g.wsb + p * g.wsp]) : acc_t(1);
          }
          start[k + 1] = start[k] + r;
        }
        if (start[nc] == 0) continue;
        // class k's block starts at G + start[k] * D: [D, r] (channels-first) or [r, D]
        if (cf) {
          for (int64_t d = 0; d < D; ++d) {
            const scalar_t* src = x + d * g.sd;
            for (int64_t k = 0; k < nc; ++k) {
              const int64_t r = start[k + 1] - start[k];
              const int64_t* o = offs.data() + start[k];
              const acc_t m = means[k * D + d];
              acc_t* dst = G + start[k] * D + d * r;
              for (int64_t j = 0; j < r; ++j) dst[j] = static_cast<acc_t>(src[o[j]]) - m;
            }
          }
        } else {
          for (int64_t k = 0; k < nc; ++k) {
            const acc_t* m = means.data() + k * D;
            for (int64_t j = start[k]; j < start[k + 1]; ++j) {
              const scalar_t* src = x + offs[j];
              acc_t* dst = G + j * D;
              for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<acc_t>(src[d * g.sd]) - m[d];
            }
          }
        }
        for (int64_t k = 0; k < nc; ++k) {
          const int64_t r = start[k + 1] - start[k];
          if (r == 0) continue;
          at::Tensor block = centred.narrow(0, start[k] * D, r * D);
          at::Tensor m2_c = m2.select(0, mine[k]);
          const acc_t* Gk = G + start[k] * D;
          const acc_t* wk = wrow.data() + start[k];
          if (cf) {  // m2 += Gw G^T with G [D, r]
            at::Tensor Gt = block.view({D, r});
            at::Tensor Gwt = Gt;
            if (weights) {
              Gwt = weighted.narrow(0, 0, D * r).view({D, r});
              acc_t* dst = Gwt.mutable_data_ptr<acc_t>();
              for (int64_t d = 0; d < D; ++d)
                for (int64_t j = 0; j < r; ++j) dst[d * r + j] = Gk[d * r + j] * wk[j];
            }
            m2_c.addmm_(Gwt, Gt.t());
          } else {  // m2 += Gw^T G with G [r, D]
            at::Tensor Gm = block.view({r, D});
            at::Tensor Gwm = Gm;
            if (weights) {
              Gwm = weighted.narrow(0, 0, r * D).view({r, D});
              acc_t* dst = Gwm.mutable_data_ptr<acc_t>();
              for (int64_t j = 0; j < r; ++j)
                for (int64_t d = 0; d < D; ++d) dst[j * D + d] = Gk[j * D + d] * wk[j];
            }
            m2_c.addmm_(Gwm.t(), Gm);
          }
        }
      }
      // the GEMM's two operands are summed in different orders: make m2 exactly symmetric
      for (int64_t c : mine) {
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
