// Pixel-to-pixel supervised contrast (CLUDA-style), CPU: ops.md section 6.
//
// The features arrive L2-normalised (the Python wrapper normalises, so autograd covers that step).
// With s_ij = f_i . f_j / tau, for a valid anchor i with positives P_i (other valid pixels of its
// class) and negatives N_i (valid pixels of other classes):
//   nu_i = log sum_{n in N_i} exp(s_in)                       (-inf when N_i is empty)
//   l_i  = (1 / |P_i|) sum_{p in P_i} w_ip softplus(nu_i - s_ip),   w_ip = a_i a_p (else 1)
//   loss_i = weight_i * l_i  (anchors with |P_i| = 0 do not count).
// The valid pixels are sorted by class into a contiguous [n, D] matrix, so the positives of a row
// are one contiguous column range. Row blocks run in parallel; each sweeps column tiles, computing
// the similarity tile with a GEMM and never more than one tile at a time (no [n, n] matrix):
//   forward pass 1: online logsumexp over the negative columns -> nu_i;
//   forward pass 2: only the tiles of the row block's own classes -> l_i and
//                   A_i = sum_p w_ip sigmoid(nu_i - s_ip) (kept for the backward);
//   backward: every tile again; with c_i = grad_i weight_i / |P_i| the gradient wrt s_ij is
//     G_ij = -c_i w_ij sigmoid(nu_i - s_ij) (positive pair), c_i A_i exp(s_ij - nu_i) (negative),
//   and because s is symmetric the row block accumulates (G_ij + G_ji) f_j / tau itself (no
//   cross-thread writes); d loss / d a_i = sum_p a_p (c_i softplus(nu_i - s_ip) + c_p
//   softplus(nu_p - s_pi)).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <optional>
#include <vector>

#include "common/pair_contrast.h"
#include "cpu/pair_contrast_host.h"

namespace fastuda::cpu {
namespace {

constexpr int64_t kRowBlock = 256;
constexpr int64_t kColTile = 512;

struct Problem {
  int64_t B, D, P, n = 0;
  std::vector<int64_t> slot;       // [B * P] sorted row of each valid pixel, else -1
  std::vector<int64_t> order;      // [n] pixel id of each sorted row
  std::vector<int64_t> seg_begin;  // [n] first row of the row's class
  std::vector<int64_t> seg_end;    // [n] one past the last row of the row's class
};

void check_inputs(const char* op, const at::Tensor& feats, const at::Tensor& labels, double tau) {
  TORCH_CHECK(feats.dim() == 3, op, ": feats must be [B, D, P], got shape ", feats.sizes());
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == feats.size(0) &&
                  labels.size(1) == feats.size(2),
              op, ": labels shape ", labels.sizes(), " does not match feats shape ",
              feats.sizes(), " (expected [", feats.size(0), ", ", feats.size(2), "])");
  TORCH_CHECK(tau > 0, op, ": tau must be > 0, got ", tau);
  const auto dt = feats.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, op,
              ": feats must be float32/float16/bfloat16/float64, got ", dt);
}

// The valid pixels, stably sorted by label (any label value other than ignore_index is a class,
// as in the reference), with each row's class range.
Problem sort_pixels(const at::Tensor& feats, const at::Tensor& labels, int64_t ignore_index,
                    const char* op) {
  Problem pb{feats.size(0), feats.size(1), feats.size(2)};
  const int64_t N = pb.B * pb.P, sB = labels.stride(0), sP = labels.stride(1), P = pb.P;
  std::vector<int64_t> value(N);
  with_labels(labels, op, [&](auto* y) {
    at::parallel_for(0, N, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) value[i] = static_cast<int64_t>(y[(i / P) * sB + (i % P) * sP]);
    });
  });
  for (int64_t i = 0; i < N; ++i)
    if (value[i] != ignore_index) pb.order.push_back(i);
  std::stable_sort(pb.order.begin(), pb.order.end(),
                   [&](int64_t a, int64_t b) { return value[a] < value[b]; });
  pb.n = static_cast<int64_t>(pb.order.size());
  pb.slot.assign(N, -1);
  pb.seg_begin.resize(pb.n);
  pb.seg_end.resize(pb.n);
  for (int64_t r = 0; r < pb.n;) {
    int64_t e = r + 1;
    while (e < pb.n && value[pb.order[e]] == value[pb.order[r]]) ++e;
    for (int64_t q = r; q < e; ++q) pb.seg_begin[q] = r, pb.seg_end[q] = e, pb.slot[pb.order[q]] = q;
    r = e;
  }
  return pb;
}

// [lo, hi): the columns of tile [j0, j1) in the row's own class.
inline void class_cols(const Problem& pb, int64_t row, int64_t j0, int64_t j1, int64_t& lo,
                       int64_t& hi) {
  lo = std::clamp(pb.seg_begin[row], j0, j1);
  hi = std::clamp(pb.seg_end[row], j0, j1);
}

// S[0:rows, 0:cols] = F[i0:i0+rows] . F[j0:j0+cols]^T (without the 1 / tau)
template <typename acc_t>
void sim_tile(const acc_t* F, int64_t D, int64_t i0, int64_t rows, int64_t j0, int64_t cols,
              acc_t* S) {
  at::Tensor sv = matrix_view(S, rows, cols, cols);
  at::mm_out(sv, matrix_view(F + i0 * D, rows, D, D), matrix_view(F + j0 * D, cols, D, D).t());
}

template <typename acc_t>
at::Tensor sorted_features(const at::Tensor& feats, const Problem& pb) {
  at::Tensor F = at::empty({pb.n, pb.D}, feats.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "pixel_rows", [&] {
    gather_rows<scalar_t, acc_t>(feats, pb.slot.data(), F.data_ptr<acc_t>());
  });
  return F;
}

// per sorted row: the optional per-pixel values (1 when absent)
template <typename acc_t>
std::vector<acc_t> rows_of(const std::vector<acc_t>& per_pixel, const Problem& pb) {
  std::vector<acc_t> out(pb.n, acc_t(1));
  if (!per_pixel.empty())
    for (int64_t r = 0; r < pb.n; ++r) out[r] = per_pixel[pb.order[r]];
  return out;
}

template <typename acc_t>
void forward_impl(const at::Tensor& feats, const Problem& pb, double tau,
                  const std::vector<acc_t>& weight, const std::vector<acc_t>& pair, acc_t* loss,
                  acc_t* neg_lse, acc_t* pos_acc, acc_t* n_pos) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const acc_t inv_tau = static_cast<acc_t>(1.0 / tau);
  const at::Tensor Ft = sorted_features<acc_t>(feats, pb);
  const acc_t* F = Ft.const_data_ptr<acc_t>();
  const int64_t n = pb.n, D = pb.D;
  const std::vector<acc_t> a = rows_of(pair, pb), w = rows_of(weight, pb);
  const bool weighted_pairs = !pair.empty();
  const int64_t n_blocks = (n + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> S(kRowBlock * kColTile), m(kRowBlock), s(kRowBlock), nu(kRowBlock);
    std::vector<acc_t> lsum(kRowBlock), asum(kRowBlock);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * kRowBlock, rows = std::min(kRowBlock, n - i0);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(s.begin(), s.end(), acc_t(0));
      // pass 1: online logsumexp over the negatives
      const bool one_class = pb.seg_begin[i0] == pb.seg_begin[i0 + rows - 1];
      for (int64_t j0 = 0; j0 < n; j0 += kColTile) {
        const int64_t cols = std::min(kColTile, n - j0);
        if (one_class && pb.seg_begin[i0] <= j0 && pb.seg_end[i0] >= j0 + cols) continue;
        sim_tile(F, D, i0, rows, j0, cols, S.data());
        for (int64_t r = 0; r < rows; ++r) {
          const acc_t* x = S.data() + r * cols;
          int64_t lo, hi;
          class_cols(pb, i0 + r, j0, j0 + cols, lo, hi);
          lo -= j0, hi -= j0;
          const acc_t tmax = std::max(row_max(x, lo), row_max(x + hi, cols - hi));
          if (tmax == kNegInf) continue;
          const acc_t mnew = std::max(m[r], tmax * inv_tau);
          const acc_t acc = row_sum_exp(x, lo, inv_tau, mnew) +
                            row_sum_exp(x + hi, cols - hi, inv_tau, mnew);
          s[r] = (m[r] == kNegInf ? acc_t(0) : s[r] * std::exp(m[r] - mnew)) + acc;
          m[r] = mnew;
        }
      }
      for (int64_t r = 0; r < rows; ++r) nu[r] = s[r] > 0 ? m[r] + std::log(s[r]) : kNegInf;
      // pass 2: the positives, i.e. the columns of the block's own classes
      std::fill(lsum.begin(), lsum.end(), acc_t(0));
      std::fill(asum.begin(), asum.end(), acc_t(0));
      const int64_t c0 = pb.seg_begin[i0], c1 = pb.seg_end[i0 + rows - 1];
      for (int64_t j0 = c0; j0 < c1; j0 += kColTile) {
        const int64_t cols = std::min(kColTile, c1 - j0);
        sim_tile(F, D, i0, rows, j0, cols, S.data());
        const acc_t* aj = a.data() + j0;
        for (int64_t r = 0; r < rows; ++r) {
          if (nu[r] == kNegInf) continue;  // no negative: every term is softplus(-inf) = 0
          const int64_t i = i0 + r;
          const acc_t* x = S.data() + r * cols;
          int64_t lo, hi;
          class_cols(pb, i, j0, j0 + cols, lo, hi);
          lo -= j0, hi -= j0;
          const acc_t nui = nu[r], ai = a[i];
          acc_t ls = 0, as = 0;
          for (int64_t part = 0; part < 2; ++part) {  // [lo, i) and (i, hi): j == i is no pair
            const int64_t pa = part == 0 ? lo : std::max(lo, i - j0 + 1);
            const int64_t pe = part == 0 ? std::min(hi, i - j0) : hi;
            if (pe > pa)
              row_pos_terms(x + pa, pe - pa, inv_tau, nui, ai,
                            weighted_pairs ? aj + pa : nullptr, ls, as);
          }
          lsum[r] += ls;
          asum[r] += as;
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r, pix = pb.order[i];
        const int64_t np = pb.seg_end[i] - pb.seg_begin[i] - 1;
        n_pos[pix] = static_cast<acc_t>(np);
        neg_lse[pix] = nu[r];
        pos_acc[pix] = asum[r];
        loss[pix] = np > 0 ? w[i] * lsum[r] / static_cast<acc_t>(np) : acc_t(0);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pixel_contrast_forward_cpu(
    const at::Tensor& feats, const at::Tensor& labels, double tau, int64_t ignore_index,
    const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& pair_weights) {
  const char* op = "fastuda::pixel_contrast_forward";
  check_inputs(op, feats, labels, tau);
  const Problem pb = sort_pixels(feats, labels, ignore_index, op);
  const bool dbl = feats.scalar_type() == at::kDouble;
  const auto opts = feats.options().dtype(dbl ? at::kDouble : at::kFloat);
  at::Tensor loss = at::zeros({pb.B, pb.P}, opts), neg_lse = at::zeros({pb.B, pb.P}, opts);
  at::Tensor pos_acc = at::zeros({pb.B, pb.P}, opts), n_pos = at::zeros({pb.B, pb.P}, opts);
  if (pb.n == 0) return {loss, neg_lse, pos_acc, n_pos};
  auto run = [&](auto zero) {
    using acc_t = decltype(zero);
    forward_impl<acc_t>(feats, pb, tau, per_pixel_values<acc_t>(weights, pb.B, pb.P, op, "weights"),
                        per_pixel_values<acc_t>(pair_weights, pb.B, pb.P, op, "pair_weights"),
                        loss.data_ptr<acc_t>(), neg_lse.data_ptr<acc_t>(),
                        pos_acc.data_ptr<acc_t>(), n_pos.data_ptr<acc_t>());
  };
  dbl ? run(0.0) : run(0.0f);
  return {loss, neg_lse, pos_acc, n_pos};
}


template <typename acc_t, typename out_t>
void backward_impl(const at::Tensor& feats, const Problem& pb, double tau,
                   const std::vector<acc_t>& grad, const std::vector<acc_t>& weight,
                   const std::vector<acc_t>& pair, const std::vector<acc_t>& nu_px,
                   const std::vector<acc_t>& acc_px, at::Tensor& grad_feats,
                   std::vector<acc_t>& grad_pair_rows) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const acc_t inv_tau = static_cast<acc_t>(1.0 / tau);
  const at::Tensor Ft = sorted_features<acc_t>(feats, pb);
  const acc_t* F = Ft.const_data_ptr<acc_t>();
  const int64_t n = pb.n, D = pb.D, P = pb.P;
  const bool weighted_pairs = !pair.empty();
  const std::vector<acc_t> a = rows_of(pair, pb);
  // Per sorted row: nu (0 where there is no negative), c * A (scales the negatives' softmax) and
  // c = d loss / d l_i, set to 0 where there is no negative (the loss is 0 there whatever s is).
  std::vector<acc_t> nu(n), cA(n), c(n);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t pix = pb.order[r], np = pb.seg_end[r] - pb.seg_begin[r] - 1;
    const acc_t wr = weight.empty() ? acc_t(1) : weight[pix];
    const bool has_neg = nu_px[pix] != kNegInf;
    c[r] = (np > 0 && has_neg) ? grad[pix] * wr / static_cast<acc_t>(np) : acc_t(0);
    nu[r] = has_neg ? nu_px[pix] : acc_t(0);
    cA[r] = c[r] * acc_px[pix];
  }
  out_t* out = grad_feats.data_ptr<out_t>();
  const int64_t n_blocks = (n + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> S(kRowBlock * kColTile), acc(kRowBlock * D);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * kRowBlock, rows = std::min(kRowBlock, n - i0);
      at::Tensor gv = matrix_view(acc.data(), rows, D, D);
      gv.zero_();
      for (int64_t j0 = 0; j0 < n; j0 += kColTile) {
        const int64_t cols = std::min(kColTile, n - j0);
        sim_tile(F, D, i0, rows, j0, cols, S.data());
        const acc_t* nuj = nu.data() + j0;
        const acc_t* cAj = cA.data() + j0;
        const acc_t* cj = c.data() + j0;
        const acc_t* aj = a.data() + j0;
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r;
          acc_t* x = S.data() + r * cols;  // s_ij * tau in, G_ij + G_ji out
          int64_t lo, hi;
          class_cols(pb, i, j0, j0 + cols, lo, hi);
          lo -= j0, hi -= j0;
          const acc_t nui = nu[i], cAi = cA[i], ci = c[i], ai = a[i];
          row_neg_coef(x, lo, inv_tau, nui, cAi, nuj, cAj);  // negatives: [0, lo), [hi, cols)
          row_neg_coef(x + hi, cols - hi, inv_tau, nui, cAi, nuj + hi, cAj + hi);
          acc_t ga = 0;
          for (int64_t part = 0; part < 2; ++part) {  // positives: [lo, i) and (i, hi)
            const int64_t pa = part == 0 ? lo : std::max(lo, i - j0 + 1);
            const int64_t pe = part == 0 ? std::min(hi, i - j0) : hi;
            if (pe > pa)
              ga += row_pos_coef(x + pa, pe - pa, inv_tau, nui, ci, nuj + pa, cj + pa, ai,
                                 weighted_pairs ? aj + pa : nullptr);
          }
          if (i >= j0 && i < j0 + cols) x[i - j0] = 0;  // the diagonal is no pair
          if (weighted_pairs) grad_pair_rows[i] += ga;
        }
        gv.addmm_(matrix_view(S.data(), rows, cols, cols), matrix_view(F + j0 * D, cols, D, D));
      }
      // rows -> [B, D, P] (each pixel belongs to one row block: no two threads write it)
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t pix = pb.order[i0 + r];
        out_t* o = out + (pix / P) * D * P + (pix % P);
        const acc_t* g = acc.data() + r * D;
        for (int64_t d = 0; d < D; ++d) o[d * P] = static_cast<out_t>(g[d] * inv_tau);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> pixel_contrast_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& feats, const at::Tensor& labels,
    const at::Tensor& neg_lse, const at::Tensor& pos_acc, double tau,
    int64_t ignore_index, const std::optional<at::Tensor>& weights,
    const std::optional<at::Tensor>& pair_weights) {
  const char* op = "fastuda::pixel_contrast_backward";
  check_inputs(op, feats, labels, tau);
  for (const at::Tensor* t : {&grad_loss, &neg_lse, &pos_acc})
    TORCH_CHECK(t->sizes() == labels.sizes(), op, ": per-pixel input of shape ", t->sizes(),
                " does not match labels ", labels.sizes());
  const Problem pb = sort_pixels(feats, labels, ignore_index, op);
  at::Tensor grad_feats = at::zeros({pb.B, pb.D, pb.P}, feats.options());
  const bool has_pair = pair_weights.has_value() && pair_weights->defined();
  at::Tensor grad_pair = has_pair ? at::zeros({pb.B, pb.P}, pair_weights->options())
                                  : at::empty({0}, feats.options().dtype(at::kFloat));
  if (pb.n == 0) return {grad_feats, grad_pair};
  auto run = [&](auto zero) {
    using acc_t = decltype(zero);
    std::vector<acc_t> grad_pair_rows(has_pair ? pb.n : 0, acc_t(0));
    auto vals = [&](const at::Tensor& t, const char* name) {
      return per_pixel_values<acc_t>(std::optional<at::Tensor>(t), pb.B, pb.P, op, name);
    };
    const std::vector<acc_t> g = vals(grad_loss, "grad_loss"), nu = vals(neg_lse, "neg_lse");
    const std::vector<acc_t> A = vals(pos_acc, "pos_acc");
    const auto w = per_pixel_values<acc_t>(weights, pb.B, pb.P, op, "weights");
    const auto pw = per_pixel_values<acc_t>(pair_weights, pb.B, pb.P, op, "pair_weights");
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(),
                                    "pixel_contrast_backward", [&] {
      backward_impl<acc_t, scalar_t>(feats, pb, tau, g, w, pw, nu, A, grad_feats,
                                     grad_pair_rows);
    });
    if (has_pair) {
      at::Tensor rows_t = at::from_blob(grad_pair_rows.data(), {pb.n},
                                        at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
      at::Tensor idx = at::from_blob(const_cast<int64_t*>(pb.order.data()), {pb.n}, at::kLong);
      grad_pair.view(-1).index_copy_(0, idx, rows_t.to(grad_pair.scalar_type()));
    }
  };
  feats.scalar_type() == at::kDouble ? run(0.0) : run(0.0f);
  return {grad_feats, grad_pair};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastuda, CPU, m) {
  m.impl("pixel_contrast_forward", &pixel_contrast_forward_cpu);
  m.impl("pixel_contrast_backward", &pixel_contrast_backward_cpu);
}

}  // namespace fastuda::cpu
