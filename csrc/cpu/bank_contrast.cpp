// Memory-bank contrast (BankCL), CPU: ops.md section 5.
//
// For pixel i of class y with L = bank_len[y] live entries b_{y,j} and nu_i the logsumexp of
// f_i . bbar_k / tau over the other classes k with a live entry (bbar_k = their mean entry):
//   l_i = (1 / L) sum_j softplus(nu_i - f_i . b_{y,j} / tau).
// Plan: counting-sort the pixel ids by class (no feature is copied); then per chunk of rows of
// one class the chunk's features are gathered from [B, D, P] into a small transposed buffer
// (D x rows, per thread) and two GEMMs give every positive logit (rows x L) and the C negative
// logits (rows x C). The backward recomputes them, turns them into d loss / d logit, maps back
// with two more GEMMs into the same buffer and scatters it into the gradient, so the only large
// allocation of either pass is the gradient itself. The bank receives no gradient (it holds
// detached batch centroids).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/pair_contrast.h"
#include "cpu/pair_contrast_host.h"

namespace fastuda::cpu {
namespace {

constexpr int64_t kRowsPerChunk = 256;
constexpr int64_t kLabelChunk = 8192;  // label-pass work unit (fixed, so results never depend
                                       // on the thread count)

struct Problem {
  int64_t B, D, P, C, M;
  std::vector<int64_t> lens;      // [C] live entries per class
  std::vector<int64_t> class_start;  // [C + 1] first sorted row of each class
  std::vector<int64_t> order;     // [n] pixel id of each sorted row
  struct Chunk { int64_t cls, row0, rows; };
  std::vector<Chunk> chunks;
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
// pixels whose class has a live bank entry.
Problem sort_pixels(const at::Tensor& feats, const at::Tensor& labels, const at::Tensor& bank,
                    const at::Tensor& bank_len, int64_t ignore_index) {
  Problem pb{feats.size(0), feats.size(1), feats.size(2), bank.size(0), bank.size(1)};
  const int64_t C = pb.C, N = pb.B * pb.P;
  const at::Tensor lens_t = bank_len.to(at::kCPU, at::kLong).contiguous();
  pb.lens.assign(lens_t.const_data_ptr<int64_t>(), lens_t.const_data_ptr<int64_t>() + C);
  for (int64_t c = 0; c < C; ++c)
    TORCH_CHECK(pb.lens[c] >= 0 && pb.lens[c] <= pb.M, "fastuda::bank_contrast: bank_len[", c,
                "] = ", pb.lens[c], " is outside [0, ", pb.M, "] (M = bank.shape[1])");

  const int64_t n_chunks = (N + kLabelChunk - 1) / kLabelChunk;
  std::vector<int64_t> counts(n_chunks * C, 0);
  std::vector<int64_t> cls(N);  // class of each pixel, -1 when it does not count
  std::vector<int64_t> bad_at(n_chunks, -1), bad_value(n_chunks, 0);
  const int64_t sB = labels.stride(0), sP = labels.stride(1), P = pb.P;
  with_labels(labels, "fastuda::bank_contrast", [&](auto* y) {
    at::parallel_for(0, n_chunks, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        int64_t* cnt = counts.data() + k * C;
        for (int64_t i = k * kLabelChunk, e = std::min(N, i + kLabelChunk); i < e; ++i) {
          const int64_t v = static_cast<int64_t>(y[(i / P) * sB + (i % P) * sP]);
          int64_t c = -1;
          if (v != ignore_index) {
            if (v < 0 || v >= C) {
              if (bad_at[k] < 0) bad_at[k] = i, bad_value[k] = v;
            } else if (pb.lens[v] > 0) {
              c = v;
              ++cnt[c];
            }
          }
          cls[i] = c;
        }
      }
    });
  });
  for (int64_t k = 0; k < n_chunks; ++k)
    TORCH_CHECK(bad_at[k] < 0, "fastuda::bank_contrast: label value ", bad_value[k],
                " (at flat pixel ", bad_at[k], ") is outside [0, ", C,
                ") and is not ignore_index (", ignore_index, ")");

  // offsets: class-major, then chunk order, so the sort is stable
  pb.class_start.assign(C + 1, 0);
  std::vector<int64_t> offset(n_chunks * C);
  int64_t run = 0;
  for (int64_t c = 0; c < C; ++c) {
    pb.class_start[c] = run;
    for (int64_t k = 0; k < n_chunks; ++k) offset[k * C + c] = run, run += counts[k * C + c];
  }
  pb.class_start[C] = run;
  pb.order.resize(run);
  at::parallel_for(0, n_chunks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      int64_t* off = offset.data() + k * C;
      for (int64_t i = k * kLabelChunk, e = std::min(N, i + kLabelChunk); i < e; ++i) {
        if (cls[i] < 0) continue;
        pb.order[off[cls[i]]++] = i;
      }
    }
  });
  for (int64_t c = 0; c < C; ++c)
    for (int64_t r = pb.class_start[c]; r < pb.class_start[c + 1]; r += kRowsPerChunk)
      pb.chunks.push_back({c, r, std::min(kRowsPerChunk, pb.class_start[c + 1] - r)});
  // chunks in the order of their first pixel: the chunks of all classes over one stretch of the
  // image run one after the other, so the cache lines one chunk's gather brings in are still
  // cached for the next (class-major order re-read the whole input once per class)
  std::stable_sort(pb.chunks.begin(), pb.chunks.end(),
                   [&](const Problem::Chunk& a, const Problem::Chunk& b) {
                     return pb.order[a.row0] < pb.order[b.row0];
                   });
  return pb;
}

// bank [C, M, D] in acc_t and the mean live entry of each class [C, D] (0 for an empty class).
template <typename acc_t>
std::pair<at::Tensor, at::Tensor> bank_and_means(const at::Tensor& bank, const Problem& pb) {
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  at::Tensor b = bank.to(at::kCPU, acc_type).contiguous();
  at::Tensor bbar = at::zeros({pb.C, pb.D}, b.options());
  const acc_t* bp = b.const_data_ptr<acc_t>();
  acc_t* mp = bbar.data_ptr<acc_t>();
  for (int64_t c = 0; c < pb.C; ++c) {
    if (pb.lens[c] == 0) continue;
    for (int64_t j = 0; j < pb.lens[c]; ++j)
      for (int64_t d = 0; d < pb.D; ++d) mp[c * pb.D + d] += bp[(c * pb.M + j) * pb.D + d];
    for (int64_t d = 0; d < pb.D; ++d) mp[c * pb.D + d] /= static_cast<acc_t>(pb.lens[c]);
  }
  return {b, bbar};
}

// Positive logits [rows, L] and negative logits [rows, C] (both still without the 1 / tau) of
// the chunk's features xt (acc_t, transposed: [D, rows]).
template <typename acc_t>
void chunk_logits(const acc_t* xt, const Problem::Chunk& ch, const Problem& pb,
                  const at::Tensor& b, const at::Tensor& bbar, acc_t* pos, acc_t* neg) {
  const int64_t L = pb.lens[ch.cls];
  const at::Tensor x = matrix_view(xt, pb.D, ch.rows, ch.rows).t();
  at::Tensor pv = matrix_view(pos, ch.rows, L, L);
  at::Tensor nv = matrix_view(neg, ch.rows, pb.C, pb.C);
  at::mm_out(pv, x, b[ch.cls].narrow(0, 0, L).t());
  at::mm_out(nv, x, bbar.t());
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

// Flat offsets of the chunk's pixels in a [B, D, P] tensor with strides (sB, ., sP).
inline void chunk_offsets(const Problem::Chunk& ch, const Problem& pb, int64_t sB, int64_t sP,
                          std::vector<int64_t>& off) {
  off.resize(ch.rows);
  for (int64_t r = 0; r < ch.rows; ++r) {
    const int64_t pix = pb.order[ch.row0 + r];
    off[r] = (pix / pb.P) * sB + (pix % pb.P) * sP;
  }
}

// xt[d, r] = feats[b_r, d, p_r] as acc_t. The pixels of a chunk ascend in memory, so each
// channel's reads move forward through one row of the input.
template <typename scalar_t, typename acc_t>
void gather_chunk(const at::Tensor& feats, const Problem::Chunk& ch, const Problem& pb,
                  std::vector<int64_t>& off, acc_t* xt) {
  chunk_offsets(ch, pb, feats.stride(0), feats.stride(2), off);
  const scalar_t* src = feats.const_data_ptr<scalar_t>();
  const int64_t sD = feats.stride(1), rows = ch.rows;
  for (int64_t d = 0; d < pb.D; ++d) {
    const scalar_t* in = src + d * sD;
    acc_t* out = xt + d * rows;
    for (int64_t r = 0; r < rows; ++r) out[r] = static_cast<acc_t>(in[off[r]]);
  }
}

// grad[b_r, :, p_r] = yt[:, r] for a contiguous [B, D, P] gradient (every pixel belongs to one
// chunk, so threads never write the same element).
template <typename scalar_t, typename acc_t>
void scatter_chunk(const acc_t* yt, const Problem::Chunk& ch, const Problem& pb,
                   std::vector<int64_t>& off, at::Tensor& grad) {
  chunk_offsets(ch, pb, pb.D * pb.P, 1, off);
  scalar_t* dst = grad.data_ptr<scalar_t>();
  const int64_t rows = ch.rows;
  for (int64_t d = 0; d < pb.D; ++d) {
    scalar_t* out = dst + d * pb.P;
    const acc_t* in = yt + d * rows;
    for (int64_t r = 0; r < rows; ++r) out[off[r]] = static_cast<scalar_t>(in[r]);
  }
}

// Runs body(chunk, xt, pos, neg, off) for every chunk, the chunks spread over the threads: the
// chunk's features gathered into xt ([D, rows]) and its logits computed (chunk_logits); off is
// scratch the body may reuse.
template <typename scalar_t, typename acc_t, typename Body>
void for_each_chunk(const at::Tensor& feats, const Problem& pb, const at::Tensor& b,
                    const at::Tensor& bbar, Body&& body) {
  at::parallel_for(0, static_cast<int64_t>(pb.chunks.size()), 1, [&](int64_t c0, int64_t c1) {
    std::vector<acc_t> xt(kRowsPerChunk * pb.D), pos(kRowsPerChunk * pb.M),
        neg(kRowsPerChunk * pb.C);
    std::vector<int64_t> off;
    for (int64_t ci = c0; ci < c1; ++ci) {
      const Problem::Chunk& ch = pb.chunks[ci];
      gather_chunk<scalar_t, acc_t>(feats, ch, pb, off, xt.data());
      chunk_logits<acc_t>(xt.data(), ch, pb, b, bbar, pos.data(), neg.data());
      body(ch, xt.data(), pos.data(), neg.data(), off);
    }
  });
}

template <typename scalar_t>
void forward_impl(const at::Tensor& feats, const at::Tensor& bank, const Problem& pb, double tau,
                  at::Tensor& loss, at::Tensor& neg_lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t inv_tau = static_cast<acc_t>(1.0 / tau);
  auto [b, bbar] = bank_and_means<acc_t>(bank, pb);
  acc_t* loss_p = loss.data_ptr<acc_t>();
  acc_t* nlse_p = neg_lse.data_ptr<acc_t>();
  for_each_chunk<scalar_t, acc_t>(feats, pb, b, bbar, [&](const Problem::Chunk& ch, acc_t*,
                                                          acc_t* pos, acc_t* neg,
                                                          std::vector<int64_t>&) {
    const int64_t L = pb.lens[ch.cls];
    for (int64_t r = 0; r < ch.rows; ++r) {
      const int64_t pix = pb.order[ch.row0 + r];
      const acc_t nu = negative_lse<acc_t>(neg + r * pb.C, ch.cls, pb, inv_tau);
      nlse_p[pix] = nu;
      if (nu == -std::numeric_limits<acc_t>::infinity()) continue;  // no negative: loss 0
      loss_p[pix] = row_sum_softplus<acc_t>(pos + r * L, L, inv_tau, nu) / static_cast<acc_t>(L);
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
  if (pb.class_start[pb.C] == 0) return {loss, neg_lse};
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
  auto [b, bbar] = bank_and_means<acc_t>(bank, pb);
  const at::Tensor g_t = grad_loss.to(acc_type);
  const at::Tensor nu_t = neg_lse.to(acc_type).contiguous();
  const acc_t* gp = g_t.const_data_ptr<acc_t>();
  const int64_t gsB = g_t.stride(0), gsP = g_t.stride(1);
  const acc_t* nup = nu_t.const_data_ptr<acc_t>();
  for_each_chunk<scalar_t, acc_t>(feats, pb, b, bbar, [&](const Problem::Chunk& ch, acc_t* xt,
                                                          acc_t* pos, acc_t* neg,
                                                          std::vector<int64_t>& off) {
    const int64_t L = pb.lens[ch.cls];
    // logits -> d loss / d logit, scaled by 1 / tau (d logit / d f = entry / tau)
    for (int64_t r = 0; r < ch.rows; ++r) {
      const int64_t pix = pb.order[ch.row0 + r];
      const acc_t nu = nup[pix];
      acc_t* pr = pos + r * L;
      acc_t* nr = neg + r * pb.C;
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
    // (d loss / d f)^T = bank[y, :L]^T @ coef_pos^T + bbar^T @ coef_neg^T, into the buffer the
    // features came in (they are no longer needed)
    at::Tensor yt = matrix_view(xt, pb.D, ch.rows, ch.rows);
    at::mm_out(yt, b[ch.cls].narrow(0, 0, L).t(), matrix_view(pos, ch.rows, L, L).t());
    yt.addmm_(bbar.t(), matrix_view(neg, ch.rows, pb.C, pb.C).t());
    scatter_chunk<scalar_t, acc_t>(xt, ch, pb, off, grad);
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
  // zeros: pixels that take no part (ignored, or their class has no entry) get no gradient
  at::Tensor grad = at::zeros({pb.B, pb.D, pb.P}, feats.options());
  if (pb.class_start[pb.C] == 0) return grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(),
                                  "bank_contrast_backward", [&] {
    backward_impl<scalar_t>(grad_loss, feats, bank, neg_lse, pb, tau, grad);
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastuda, CPU, m) {
  m.impl("bank_contrast_forward", &bank_contrast_forward_cpu);
  m.impl("bank_contrast_backward", &bank_contrast_backward_cpu);
}

}  // namespace fastuda::cpu
