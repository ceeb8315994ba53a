// Memory-bank contrast (BankCL), CPU: ops.md section 5.
//
// For pixel i of class y with L = bank_len[y] live entries b_{y,j} and nu_i the logsumexp of
// f_i . bbar_k / tau over the other classes k with a live entry (bbar_k = their mean entry):
//   l_i = (1 / L) sum_j softplus(nu_i - f_i . b_{y,j} / tau).
// Plan: the pixels are cut into windows of kWindow consecutive pixels of one image; inside a
// window they are counting-sorted by class. A thread takes a window, copies its features from
// [B, D, P] into a pixel-major buffer in that class order (reading each channel's run of pixels
// contiguously, through a small transpose tile), and for every chunk of rows of one class two
// GEMMs on buffer rows give every positive logit (rows x L) and the C negative logits (rows x C).
// The backward recomputes them, turns them into d loss / d logit, maps back with two more GEMMs
// into the same buffer rows and writes the window's pixel range of the gradient (zeros for the
// pixels that take no part), so the only large allocation of either pass is the gradient itself.
// (Chunks of one class over the whole image, gathered channel by channel, read one float per
// cache line: the gathers took about as long as the GEMMs.) The bank receives no gradient (it
// holds detached batch centroids).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "common/pair_contrast.h"
#include "cpu/gemm_kernel.h"
#include "cpu/output_buffer.h"
#include "cpu/pair_contrast_host.h"

namespace fastuda::cpu {
namespace {

constexpr int64_t kRowsPerChunk = 256;
// pixels per window (fixed, so results never depend on the thread count): at D = 256 the fp32
// buffer is 2 MiB, and a class has about kWindow / C rows per window for the GEMMs
constexpr int64_t kWindow = 2048;

struct Problem {
  int64_t B, D, P, C, M;
  std::vector<int64_t> lens;  // [C] live entries per class
  int64_t windows_per_image = 0;
  std::vector<int64_t> window_start;  // [n_windows + 1] first sorted row of each window
  std::vector<int64_t> order;  // [n] pixel id of each sorted row (window by window, by class)
  struct Chunk { int64_t cls, row0, rows; };
  std::vector<Chunk> chunks;  // window by window
  std::vector<int64_t> window_chunk;  // [n_windows + 1] first chunk of each window
  int64_t n_windows() const { return B * windows_per_image; }
  int64_t image_of(int64_t w) const { return w / windows_per_image; }
  int64_t first_pixel(int64_t w) const { return (w % windows_per_image) * kWindow; }
  int64_t pixels(int64_t w) const { return std::min(kWindow, P - first_pixel(w)); }
  int64_t rows() const { return window_start.back(); }
};

void check_inputs(const at::Tensor& feats, const at::Tensor& labels, const at::Tensor& bank,
                  const at::Tensor& bank_len, double tau) {
  const char* op = "fastuda::bank_contrast";
  TORCH_CHECK(feats.dim() == 3, op, ": feats must be [B, D, P], got shape ", feats.sizes());
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == feats.size(0) &&
                  labels.size(1) == feats.size(2),
              op, ": labels shape ", labels.sizes(), " does not match feats shape ",
              feats.sizes(), " (expected [", feats.size(0), ", ", feats.size(2), "])");
  TORCH_CHECK(bank.dim() == 3 && bank.size(2) == feats.size(1), op, ": bank shape ",
              bank.sizes(), " does not match feats shape ", feats.sizes(),
              " (expected [C, M, ", feats.size(1), "])");
  TORCH_CHECK(bank_len.dim() == 1 && bank_len.size(0) == bank.size(0), op, ": bank_len shape ",
              bank_len.sizes(), " does not match bank shape ", bank.sizes(), " (expected [",
              bank.size(0), "])");
  TORCH_CHECK(at::isFloatingType(bank.scalar_type()), op, ": bank must be floating, got ",
              bank.scalar_type());
  TORCH_CHECK(tau > 0, op, ": tau must be > 0, got ", tau);
  const auto dt = feats.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, op,
              ": feats must be float32/float16/bfloat16/float64, got ", dt);
}

// Class of every pixel (range-checked in the same pass), then a stable counting sort of the
// pixels whose class has a live bank entry, inside each window.
Problem sort_pixels(const at::Tensor& feats, const at::Tensor& labels, const at::Tensor& bank,
                    const at::Tensor& bank_len, int64_t ignore_index) {
  Problem pb{feats.size(0), feats.size(1), feats.size(2), bank.size(0), bank.size(1)};
  const int64_t C = pb.C, P = pb.P;
  const at::Tensor lens_t = bank_len.to(at::kCPU, at::kLong).contiguous();
  pb.lens.assign(lens_t.const_data_ptr<int64_t>(), lens_t.const_data_ptr<int64_t>() + C);
  for (int64_t c = 0; c < C; ++c)
    TORCH_CHECK(pb.lens[c] >= 0 && pb.lens[c] <= pb.M, "fastuda::bank_contrast: bank_len[", c,
                "] = ", pb.lens[c], " is outside [0, ", pb.M, "] (M = bank.shape[1])");

  pb.windows_per_image = (P + kWindow - 1) / kWindow;
  const int64_t n_windows = pb.n_windows();
  std::vector<int64_t> counts(n_windows * C, 0);
  std::vector<int32_t> cls(pb.B * P);  // class of each pixel, -1 when it does not count
  std::vector<int64_t> bad_at(n_windows, -1), bad_value(n_windows, 0);
  const int64_t sB = labels.stride(0), sP = labels.stride(1);
  with_labels(labels, "fastuda::bank_contrast", [&](auto* y) {
    at::parallel_for(0, n_windows, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        int64_t* cnt = counts.data() + k * C;
        const int64_t b = pb.image_of(k), p0 = pb.first_pixel(k);
        for (int64_t p = p0, e = p0 + pb.pixels(k); p < e; ++p) {
          const int64_t v = static_cast<int64_t>(y[b * sB + p * sP]);
          int32_t c = -1;
          if (v != ignore_index) {
            if (v < 0 || v >= C) {
              if (bad_at[k] < 0) bad_at[k] = b * P + p, bad_value[k] = v;
            } else if (pb.lens[v] > 0) {
              c = static_cast<int32_t>(v);
              ++cnt[c];
            }
          }
          cls[b * P + p] = c;
        }
      }
    });
  });
  for (int64_t k = 0; k < n_windows; ++k)  // windows ascend in pixel order: the first bad one
    TORCH_CHECK(bad_at[k] < 0, "fastuda::bank_contrast: label value ", bad_value[k],
                " (at flat pixel ", bad_at[k], ") is outside [0, ", C,
                ") and is not ignore_index (", ignore_index, ")");

  // offsets: window-major, then class, then pixel order (a stable sort inside each window)
  pb.window_start.assign(n_windows + 1, 0);
  pb.window_chunk.assign(n_windows + 1, 0);
  std::vector<int64_t> offset(n_windows * C);
  int64_t run = 0;
  for (int64_t k = 0; k < n_windows; ++k) {
    pb.window_start[k] = run;
    pb.window_chunk[k] = static_cast<int64_t>(pb.chunks.size());
    for (int64_t c = 0; c < C; ++c) {
      const int64_t n_c = counts[k * C + c];
      offset[k * C + c] = run;
      for (int64_t r = 0; r < n_c; r += kRowsPerChunk)
        pb.chunks.push_back({c, run + r, std::min(kRowsPerChunk, n_c - r)});
      run += n_c;
    }
  }
  pb.window_start[n_windows] = run;
  pb.window_chunk[n_windows] = static_cast<int64_t>(pb.chunks.size());
  pb.order.resize(run);
  at::parallel_for(0, n_windows, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      int64_t* off = offset.data() + k * C;
      const int64_t i0 = pb.image_of(k) * P + pb.first_pixel(k);
      for (int64_t i = i0, e = i0 + pb.pixels(k); i < e; ++i)
        if (cls[i] >= 0) pb.order[off[cls[i]]++] = i;
    }
  });
  return pb;
}

// A count rounded up to whole vectors of T: the GEMMs' output widths (the padded columns are
// products with zero entries and are never read)
template <typename T>
int64_t vec_pad(int64_t n) {
  constexpr int64_t kLanes = kLanesOf<T>;
  return (n + kLanes - 1) / kLanes * kLanes;
}

// The bank in the layouts the GEMMs read (fastuda::gemm wants the right operand's rows
// contiguous): entries [C, M, D] for the gradient, transposed entries [C, D, Mp] (zero beyond
// bank_len) for the positive logits, the mean live entry of each class, means [C, D] (0 for an
// empty class), and its transpose [D, Cp] for the negative logits; Mp, Cp: M, C padded to whole
// vectors.
template <typename acc_t>
struct BankOperands {
  at::Tensor entries, entries_t, means, means_t;
  int64_t Mp = 0, Cp = 0;
  BankOperands(const at::Tensor& bank, const Problem& pb) {
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    entries = bank.to(at::kCPU, acc_type).contiguous();
    means = at::zeros({pb.C, pb.D}, entries.options());
    const acc_t* bp = entries.const_data_ptr<acc_t>();
    acc_t* mp = means.data_ptr<acc_t>();
    for (int64_t c = 0; c < pb.C; ++c) {
      if (pb.lens[c] == 0) continue;
      for (int64_t j = 0; j < pb.lens[c]; ++j)
        for (int64_t d = 0; d < pb.D; ++d) mp[c * pb.D + d] += bp[(c * pb.M + j) * pb.D + d];
      for (int64_t d = 0; d < pb.D; ++d) mp[c * pb.D + d] /= static_cast<acc_t>(pb.lens[c]);
    }
    Mp = vec_pad<acc_t>(pb.M);
    Cp = vec_pad<acc_t>(pb.C);
    entries_t = at::zeros({pb.C, pb.D, Mp}, entries.options());
    for (int64_t c = 0; c < pb.C; ++c)
      if (pb.lens[c] > 0)
        entries_t[c].narrow(1, 0, pb.lens[c]).copy_(entries[c].narrow(0, 0, pb.lens[c]).t());
    means_t = at::zeros({pb.D, Cp}, entries.options());
    means_t.narrow(1, 0, pb.C).copy_(means.t());
  }
};

// Positive logits [rows, L] (row stride Mp) and negative logits [rows, C] (row stride Cp), both
// still without the 1 / tau, of the chunk's features x (acc_t, pixel-major: [rows, D]), with the
// register-blocked GEMM of cpu/gemm_kernel.h on the cache-resident operands (a BLAS call per
// chunk spent about a third of its time packing them).
template <typename acc_t>
void chunk_logits(const acc_t* x, const Problem::Chunk& ch, const Problem& pb,
                  const BankOperands<acc_t>& ops, acc_t* pos, acc_t* neg) {
  const int64_t D = pb.D, Mp = ops.Mp, Cp = ops.Cp;
  const acc_t* bt = ops.entries_t.template const_data_ptr<acc_t>() + ch.cls * D * Mp;
  gemm<acc_t>(ch.rows, D, vec_pad<acc_t>(pb.lens[ch.cls]), x, D, 1, bt, Mp, pos, Mp, false);
  gemm<acc_t>(ch.rows, D, Cp, x, D, 1, ops.means_t.template const_data_ptr<acc_t>(), Cp, neg,
              Cp, false);
}

// nu = logsumexp over the classes k != y with a live entry of neg[k] / tau; -inf if none, NaN
// if a logit is NaN (a non-finite feature: std::max would drop it and the pixel would count 0).
template <typename acc_t>
acc_t negative_lse(const acc_t* neg, int64_t y, const Problem& pb, acc_t inv_tau) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t k = 0; k < pb.C; ++k) {
    if (k == y || pb.lens[k] == 0) continue;
    const acc_t v = neg[k] * inv_tau;
    if (std::isnan(v)) return v;
    m = std::max(m, v);
  }
  if (m == -std::numeric_limits<acc_t>::infinity()) return m;
  acc_t s = 0;
  for (int64_t k = 0; k < pb.C; ++k)
    if (k != y && pb.lens[k] > 0) s += std::exp(neg[k] * inv_tau - m);
  return m + std::log(s);
}

// Per-thread buffers of one window: its features (then its gradient) as pixel-major rows in
// sorted order, the window-local row of each of its pixels, the chunk's logits and a transpose
// tile.
template <typename acc_t>
struct WindowScratch {
  std::vector<acc_t> rows, pos, neg, tile;
  std::vector<int64_t> slot;  // [kWindow]: sorted row (window-local) of each pixel, or -1
  WindowScratch(const Problem& pb, int64_t Mp, int64_t Cp)
      : rows(kWindow * pb.D), pos(kRowsPerChunk * Mp), neg(kRowsPerChunk * Cp),
        tile(kPixelTile * pb.D), slot(kWindow) {}
};

// slot[t] for the pixels t of window w
inline void window_slots(const Problem& pb, int64_t w, int64_t* slot) {
  std::fill(slot, slot + kWindow, int64_t(-1));
  const int64_t i0 = pb.image_of(w) * pb.P + pb.first_pixel(w), r0 = pb.window_start[w];
  for (int64_t r = r0; r < pb.window_start[w + 1]; ++r) slot[pb.order[r] - i0] = r - r0;
}

// rows[slot[t], :] = feats[b, :, p0 + t] as acc_t for the window's pixels with slot[t] >= 0,
// kPixelTile pixels at a time: channels-first input is read as one short contiguous run per
// channel, transposed in the (L1-resident) tile, then each pixel's row is written whole.
template <typename scalar_t, typename acc_t>
void gather_window(const at::Tensor& feats, const Problem& pb, int64_t w,
                   WindowScratch<acc_t>& s) {
  const int64_t D = pb.D, sD = feats.stride(1), sP = feats.stride(2);
  const scalar_t* base = feats.const_data_ptr<scalar_t>() + pb.image_of(w) * feats.stride(0) +
                         pb.first_pixel(w) * sP;
  const int64_t n_pix = pb.pixels(w);
  acc_t* tile = s.tile.data();
  for (int64_t t0 = 0; t0 < n_pix; t0 += kPixelTile) {
    const int64_t n = std::min(kPixelTile, n_pix - t0);
    int64_t pos[kPixelTile], row[kPixelTile], k = 0;
    for (int64_t q = 0; q < n; ++q)
      if (s.slot[t0 + q] >= 0) pos[k] = t0 + q, row[k++] = s.slot[t0 + q];
    if (k == 0) continue;
    if (sD == 1) {  // pixel-major input ([N, D] or channels-last): each pixel is contiguous
      for (int64_t q = 0; q < k; ++q) {
        const scalar_t* in = base + pos[q] * sP;
        acc_t* out = s.rows.data() + row[q] * D;
        for (int64_t d = 0; d < D; ++d) out[d] = static_cast<acc_t>(in[d]);
      }
      continue;
    }
    // each channel's run is its own stream, too many for the hardware prefetcher: the same
    // channel row kAhead tiles on is requested with each row read
    constexpr int64_t kAhead = 4;
    const bool prefetch = sP == 1 && t0 + (kAhead + 1) * kPixelTile <= n_pix;
    if (sP == 1 && k == n) {  // every pixel of the tile counts: contiguous reads per channel
      for (int64_t d = 0; d < D; ++d) {
        const scalar_t* in = base + d * sD + t0;
        if (prefetch) __builtin_prefetch(in + kAhead * kPixelTile, /*rw=*/0, /*locality=*/2);
        for (int64_t q = 0; q < k; ++q) tile[q * D + d] = static_cast<acc_t>(in[q]);
      }
    } else {
      for (int64_t d = 0; d < D; ++d) {
        const scalar_t* in = base + d * sD;
        if (prefetch) __builtin_prefetch(in + t0 + kAhead * kPixelTile, 0, 2);
        for (int64_t q = 0; q < k; ++q) tile[q * D + d] = static_cast<acc_t>(in[pos[q] * sP]);
      }
    }
    for (int64_t q = 0; q < k; ++q)
      std::copy(tile + q * D, tile + (q + 1) * D, s.rows.data() + row[q] * D);
  }
}

// grad[b, :, p0 + t] = rows[slot[t], :], or 0 where slot[t] < 0, for every pixel of window w of a
// contiguous [B, D, P] gradient: the window writes its whole pixel range (no other thread
// writes it), so the gradient needs no zeroing beforehand.
template <typename scalar_t, typename acc_t>
void scatter_window(const Problem& pb, int64_t w, WindowScratch<acc_t>& s, at::Tensor& grad) {
  const int64_t D = pb.D, P = pb.P;
  scalar_t* base = grad.data_ptr<scalar_t>() + pb.image_of(w) * D * P + pb.first_pixel(w);
  const int64_t n_pix = pb.pixels(w);
  acc_t* tile = s.tile.data();
  for (int64_t t0 = 0; t0 < n_pix; t0 += kPixelTile) {
    const int64_t n = std::min(kPixelTile, n_pix - t0);
    for (int64_t q = 0; q < n; ++q) {
      const int64_t r = s.slot[t0 + q];
      if (r < 0)
        std::fill(tile + q * D, tile + (q + 1) * D, acc_t(0));
      else
        std::copy(s.rows.data() + r * D, s.rows.data() + (r + 1) * D, tile + q * D);
    }
    for (int64_t d = 0; d < D; ++d) {
      scalar_t* out = base + d * P + t0;
      for (int64_t q = 0; q < n; ++q) out[q] = static_cast<scalar_t>(tile[q * D + d]);
    }
  }
}

// Runs, for every window (windows handed to the threads one at a time, so a descheduled thread
// holds up one window, not a static share), body(window, scratch): the window's slots set and
// its features gathered into scratch.rows.
template <typename scalar_t, typename acc_t, typename Body>
void for_each_window(const at::Tensor& feats, const Problem& pb, const BankOperands<acc_t>& ops,
                     Body&& body) {
  const int64_t n_windows = pb.n_windows();
  std::atomic<int64_t> next{0};
  const int64_t n_workers = std::min<int64_t>(n_windows, at::get_num_threads());
  at::parallel_for(0, n_workers, 1, [&](int64_t, int64_t) {
    WindowScratch<acc_t> s(pb, ops.Mp, ops.Cp);
    for (int64_t w = next.fetch_add(1); w < n_windows; w = next.fetch_add(1)) {
      window_slots(pb, w, s.slot.data());
      gather_window<scalar_t, acc_t>(feats, pb, w, s);
      body(w, s);
    }
  });
}

// The sorted rows of chunk ch inside its window's buffer
template <typename acc_t>
acc_t* chunk_rows(const Problem& pb, int64_t w, const Problem::Chunk& ch,
                  WindowScratch<acc_t>& s) {
  return s.rows.data() + (ch.row0 - pb.window_start[w]) * pb.D;
}

template <typename scalar_t>
void forward_impl(const at::Tensor& feats, const at::Tensor& bank, const Problem& pb, double tau,
                  at::Tensor& loss, at::Tensor& neg_lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t inv_tau = static_cast<acc_t>(1.0 / tau);
  const BankOperands<acc_t> ops(bank, pb);
  acc_t* loss_p = loss.data_ptr<acc_t>();
  acc_t* nlse_p = neg_lse.data_ptr<acc_t>();
  for_each_window<scalar_t, acc_t>(feats, pb, ops, [&](int64_t w, WindowScratch<acc_t>& s) {
    for (int64_t ci = pb.window_chunk[w]; ci < pb.window_chunk[w + 1]; ++ci) {
      const Problem::Chunk& ch = pb.chunks[ci];
      acc_t* pos = s.pos.data();
      acc_t* neg = s.neg.data();
      chunk_logits<acc_t>(chunk_rows(pb, w, ch, s), ch, pb, ops, pos, neg);
      const int64_t L = pb.lens[ch.cls];
      for (int64_t r = 0; r < ch.rows; ++r) {
        const int64_t pix = pb.order[ch.row0 + r];
        const acc_t nu = negative_lse<acc_t>(neg + r * ops.Cp, ch.cls, pb, inv_tau);
        nlse_p[pix] = nu;
        if (nu == -std::numeric_limits<acc_t>::infinity()) continue;  // no negative: loss 0
        loss_p[pix] =
            row_sum_softplus<acc_t>(pos + r * ops.Mp, L, inv_tau, nu) / static_cast<acc_t>(L);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> bank_contrast_forward_cpu(
    const at::Tensor& feats, const at::Tensor& labels, const at::Tensor& bank,
    const at::Tensor& bank_len, double tau, int64_t ignore_index) {
  check_inputs(feats, labels, bank, bank_len, tau);
  const Problem pb = sort_pixels(feats, labels, bank, bank_len, ignore_index);
  const auto out_type = feats.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::zeros({pb.B, pb.P}, feats.options().dtype(out_type));
  at::Tensor neg_lse = at::zeros({pb.B, pb.P}, feats.options().dtype(out_type));
  if (pb.rows() == 0) return {loss, neg_lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(),
                                  "bank_contrast_forward",
                                  [&] { forward_impl<scalar_t>(feats, bank, pb, tau, loss, neg_lse); });
  return {loss, neg_lse};
}

template <typename scalar_t>
void backward_impl(const at::Tensor& grad_loss, const at::Tensor& feats, const at::Tensor& bank,
                   const at::Tensor& neg_lse, const Problem& pb, double tau, at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const acc_t inv_tau = static_cast<acc_t>(1.0 / tau);
  const BankOperands<acc_t> ops(bank, pb);
  const int64_t Mp = ops.Mp, Cp = ops.Cp, D = pb.D;
  const at::Tensor g_t = grad_loss.to(acc_type);
  const at::Tensor nu_t = neg_lse.to(acc_type).contiguous();
  const acc_t* gp = g_t.const_data_ptr<acc_t>();
  const int64_t gsB = g_t.stride(0), gsP = g_t.stride(1);
  const acc_t* nup = nu_t.const_data_ptr<acc_t>();
  for_each_window<scalar_t, acc_t>(feats, pb, ops, [&](int64_t w, WindowScratch<acc_t>& s) {
    for (int64_t ci = pb.window_chunk[w]; ci < pb.window_chunk[w + 1]; ++ci) {
      const Problem::Chunk& ch = pb.chunks[ci];
      acc_t* pos = s.pos.data();
      acc_t* neg = s.neg.data();
      acc_t* x = chunk_rows(pb, w, ch, s);
      chunk_logits<acc_t>(x, ch, pb, ops, pos, neg);
      const int64_t L = pb.lens[ch.cls];
      // logits -> d loss / d logit, scaled by 1 / tau (d logit / d f = entry / tau)
      for (int64_t r = 0; r < ch.rows; ++r) {
        const int64_t pix = pb.order[ch.row0 + r];
        const acc_t nu = nup[pix];
        acc_t* pr = pos + r * Mp;
        acc_t* nr = neg + r * Cp;
        if (nu == -std::numeric_limits<acc_t>::infinity()) {  // no negative: zero gradient
          std::fill(pr, pr + L, acc_t(0));
          std::fill(nr, nr + pb.C, acc_t(0));
          continue;
        }
        const acc_t cg = gp[(pix / pb.P) * gsB + (pix % pb.P) * gsP] * inv_tau /
                         static_cast<acc_t>(L);
        const acc_t dnu = row_sigmoid_coef<acc_t>(pr, L, inv_tau, nu, cg);
        for (int64_t k = 0; k < pb.C; ++k)
          nr[k] = (k != ch.cls && pb.lens[k] > 0) ? dnu * std::exp(nr[k] * inv_tau - nu)
                                                  : acc_t(0);
      }
      // d loss / d f = coef_pos @ bank[y, :L] + coef_neg @ bbar, into the rows the features
      // came in (the chunk's own rows; they are no longer needed)
      const acc_t* entries = ops.entries.template const_data_ptr<acc_t>() + ch.cls * pb.M * D;
      gemm<acc_t>(ch.rows, L, D, pos, Mp, 1, entries, D, x, D, false);
      gemm<acc_t>(ch.rows, pb.C, D, neg, Cp, 1, ops.means.template const_data_ptr<acc_t>(), D, x,
                  D, true);
    }
    scatter_window<scalar_t, acc_t>(pb, w, s, grad);
  });
}

at::Tensor bank_contrast_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& feats,
                                      const at::Tensor& labels, const at::Tensor& bank,
                                      const at::Tensor& bank_len, const at::Tensor& neg_lse,
                                      double tau, int64_t ignore_index) {
  check_inputs(feats, labels, bank, bank_len, tau);
  TORCH_CHECK(grad_loss.sizes() == labels.sizes() && neg_lse.sizes() == labels.sizes(),
              "fastuda::bank_contrast_backward: grad_loss ", grad_loss.sizes(), " and neg_lse ",
              neg_lse.sizes(), " must match labels ", labels.sizes());
  const Problem pb = sort_pixels(feats, labels, bank, bank_len, ignore_index);
  // pixels that take no part (ignored, or their class has no entry) get no gradient: zeros,
  // written by the windows themselves when any pixel counts
  if (pb.rows() == 0) return at::zeros({pb.B, pb.D, pb.P}, feats.options());
  static GradBuffer grad_buffer;  // cpu/output_buffer.h: the pages of the last step's gradient
  at::Tensor grad = grad_buffer.empty({pb.B, pb.D, pb.P}, feats.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(),
                                  "bank_contrast_backward", [&] {
    backward_impl<scalar_t>(grad_loss, feats, bank, neg_lse, pb, tau, grad);
  });
  grad_buffer.keep(grad);
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastuda, CPU, m) {
  m.impl("bank_contrast_forward", &bank_contrast_forward_cpu);
  m.impl("bank_contrast_backward", &bank_contrast_backward_cpu);
}

}  // namespace fastuda::cpu
