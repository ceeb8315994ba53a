// Memory-bank contrast (ops.md section 5). With the bank and its class means pre-scaled by 1/tau
// (b, bbar), for a pixel of class y with L = bank_len[y] > 0 live entries:
//   pos_j = f . b_{y,j},  nu = log sum_{k != y, len_k > 0} exp(f . bbar_k)   (-inf if none)
//   l = -(1/L) sum_j [pos_j - log(exp(pos_j) + exp(nu))] = (1/L) sum_j softplus(nu - pos_j)
//   dl/df = (1/L) [ -sum_j sig_j b_{y,j} + (sum_j sig_j) sum_k exp(f . bbar_k - nu) bbar_k ],
//   sig_j = sigmoid(nu - pos_j).
// One thread per pixel. The negatives need only C dot products (bbar is shared by every pixel:
// staged in shared memory, as the centroids of contrast.cu); the positives read the
// pixel's own class rows of the (small, cache-resident) bank. The backward writes the per-pixel
// coefficients of every bank row and class mean ([M + C, N], pixel-contiguous) and then builds
// each 32-channel slice of the gradient in registers from them.
//
// The bank_contrast family's CUDA side in one file: kernels, launch plan, op bodies
// and registration. nvcc builds it for the GPU, g++ for the host SIMT emulator (cuda/backend.h
// says what differs).
#include <limits>
#include <tuple>

#include "common/pair_contrast.h"
#include "cuda/backend.h"
#include "cuda/contrast_common.cuh"

namespace fastuda::FASTUDA_KNS {

namespace bank_detail {
// softplus and sigmoid of common/pair_contrast.h (shared with the CPU kernels)
FASTUDA_DEVICE_INLINE float softplus(float z) { return softplus_libm(z); }
FASTUDA_DEVICE_INLINE double softplus(double z) { return softplus_libm(z); }
FASTUDA_DEVICE_INLINE float sigmoid(float z) { return sigmoid_libm(z); }
FASTUDA_DEVICE_INLINE double sigmoid(double z) { return sigmoid_libm(z); }

// Counted pixel: a valid label whose class has a live entry; returns its class or -1.
FASTUDA_DEVICE_INLINE int64_t bank_pixel_class(const LabelView& y, int64_t b, int64_t p,
                                               int64_t C, int64_t ignore_index,
                                               const int64_t* lens, bool report) {
  const int64_t c = contrast_detail::pixel_class(y, b, p, C, ignore_index, report);
  return (c >= 0 && lens[c] > 0) ? c : -1;
}

// pos_j for the entries [j0, j0 + 32) of class `cls` (entries j >= L stay 0).
template <typename T>
FASTUDA_DEVICE_INLINE void positive_chunk(const FeatView<T>& x, int64_t b, int64_t p,
                                          const acc_t<T>* bank, int64_t M, int64_t cls,
                                          int64_t j0, int64_t L, acc_t<T>* pos) {
  using A = acc_t<T>;
  constexpr int JK = 32, DT = 32;
FASTUDA_UNROLL
  for (int k = 0; k < JK; ++k) pos[k] = A(0);
  const int nk = int(L - j0 < JK ? L - j0 : JK);
  for (int64_t d0 = 0; d0 < x.D; d0 += DT) {
    A f[DT];
FASTUDA_UNROLL
    for (int dd = 0; dd < DT; ++dd) f[dd] = d0 + dd < x.D ? A(*x.at(b, d0 + dd, p)) : A(0);
    const int nd = int(x.D - d0 < DT ? x.D - d0 : DT);
    for (int k = 0; k < nk; ++k) {
      const A* row = bank + ((cls * M + j0 + k) * x.D + d0);
      A dot = A(0);
      for (int dd = 0; dd < nd; ++dd) dot += f[dd] * row[dd];
      pos[k] += dot;
    }
  }
}
}  // namespace bank_detail

// bbar[c] = mean of the live entries of class c (0 when none); checks 0 <= bank_len <= M.
template <typename A>
__global__ void __launch_bounds__(256)
bank_mean_kernel(const A* bank, const int64_t* lens, int64_t C, int64_t M, int64_t D, A* bbar) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < C * D;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = e / D, d = e % D;
    int64_t L = lens[c];
    if (L < 0 || L > M) {
      if (d == 0) report_bad_bank_len(c, L, M);
      L = L < 0 ? 0 : M;
    }
    A sum = A(0);
    for (int64_t j = 0; j < L; ++j) sum += bank[(c * M + j) * D + d];
    bbar[e] = L > 0 ? sum / A(L) : A(0);
  }
}

// Negatives' logsumexp nu for every pixel (all threads call: it synchronises).
template <typename T>
FASTUDA_DEVICE_INLINE acc_t<T> negative_lse(const FeatView<T>& x, int64_t b, int64_t p,
                                            bool counted, int64_t cls, const acc_t<T>* bbar,
                                            const int64_t* lens, int64_t C,
                                            acc_t<T> (*mu_s)[contrast_detail::kChannels]) {
  using A = acc_t<T>;
  constexpr int CK = contrast_detail::kClasses;
  A m = -INFINITY, s = A(0);
  for (int64_t c0 = 0; c0 < C; c0 += CK) {
    A a[CK], unused[CK];
    class_chunk_logits<T, false>(x, b, p, counted, bbar, nullptr, C, c0, mu_s, nullptr, a,
                                 unused);
    if (!counted) continue;
FASTUDA_UNROLL
    for (int k = 0; k < CK; ++k) {  // constant indices keep a[] in registers
      if (c0 + k >= C) break;
      if (c0 + k != cls && lens[c0 + k] > 0) contrast_detail::online_lse_add(a[k], m, s);
    }
  }
  return s > A(0) ? m + contrast_detail::log_acc(s) : A(-INFINITY);
}

template <typename T>
__global__ void __launch_bounds__(contrast_detail::kPixelThreads)
bank_forward_kernel(FeatView<T> x, LabelView y, const acc_t<T>* bank, const acc_t<T>* bbar,
                    const int64_t* lens, int64_t C, int64_t M, int64_t ignore_index,
                    acc_t<T>* loss, acc_t<T>* neg_lse) {
  using A = acc_t<T>;
  constexpr int CK = contrast_detail::kClasses, DT = contrast_detail::kChannels;
  __shared__ A mu_s[CK][DT];
  const int64_t N = x.B * x.P;
  for (int64_t base = int64_t(blockIdx.x) * blockDim.x; base < N;
       base += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = base + threadIdx.x;
    const bool active = n < N;
    const int64_t b = active ? n / x.P : 0, p = active ? n % x.P : 0;
    const int64_t cls =
        active ? bank_detail::bank_pixel_class(y, b, p, C, ignore_index, lens, true) : -1;
    const bool counted = cls >= 0;
    const A nu = negative_lse<T>(x, b, p, counted, cls, bbar, lens, C, mu_s);
    if (!active) continue;
    A l = A(0);
    if (counted) {
      const int64_t L = lens[cls];
      for (int64_t j0 = 0; j0 < L; j0 += 32) {
        A pos[32];
        bank_detail::positive_chunk<T>(x, b, p, bank, M, cls, j0, L, pos);
FASTUDA_UNROLL
        for (int k = 0; k < 32; ++k) {
          if (j0 + k >= L) break;
          l += bank_detail::softplus(nu - pos[k]);
        }
      }
      l /= A(L);
    }
    loss[n] = l;
    neg_lse[n] = counted ? nu : A(0);
  }
}

// Backward phase 1: q_pos [M, N] = -(g / L) sig_j and q_neg [C, N] = (g / L) (sum_j sig_j)
// exp(f . bbar_k - nu) (0 for entries/classes that do not take part).
template <typename T>
__global__ void __launch_bounds__(contrast_detail::kPixelThreads)
bank_coef_kernel(FeatView<T> x, LabelView y, const acc_t<T>* bank, const acc_t<T>* bbar,
                 const int64_t* lens, int64_t C, int64_t M, int64_t ignore_index,
                 const acc_t<T>* grad_loss, const acc_t<T>* neg_lse, acc_t<T>* q_pos,
                 acc_t<T>* q_neg) {
  using A = acc_t<T>;
  constexpr int CK = contrast_detail::kClasses, DT = contrast_detail::kChannels;
  __shared__ A mu_s[CK][DT];
  const int64_t N = x.B * x.P;
  for (int64_t base = int64_t(blockIdx.x) * blockDim.x; base < N;
       base += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = base + threadIdx.x;
    const bool active = n < N;
    const int64_t b = active ? n / x.P : 0, p = active ? n % x.P : 0;
    const int64_t cls =
        active ? bank_detail::bank_pixel_class(y, b, p, C, ignore_index, lens, true) : -1;
    const bool counted = cls >= 0;
    const int64_t L = counted ? lens[cls] : 0;
    const A nu = counted ? neg_lse[n] : A(-INFINITY);
    const A g = counted ? grad_loss[n] / A(L) : A(0);
    A sig_sum = A(0);
    if (active) {
      for (int64_t j0 = 0; j0 < M; j0 += 32) {
        A pos[32];
        if (j0 < L) bank_detail::positive_chunk<T>(x, b, p, bank, M, cls, j0, L, pos);
FASTUDA_UNROLL
        for (int k = 0; k < 32; ++k) {
          if (j0 + k >= M) break;
          A v = A(0);
          if (j0 + k < L) {
            const A sg = bank_detail::sigmoid(nu - pos[k]);
            sig_sum += sg;
            v = -g * sg;
          }
          q_pos[(j0 + k) * N + n] = v;
        }
      }
    }
    const A coef = g * sig_sum;  // 0 when there is no negative (nu = -inf)
    for (int64_t c0 = 0; c0 < C; c0 += CK) {
      A a[CK], unused[CK];
      class_chunk_logits<T, false>(x, b, p, counted, bbar, nullptr, C, c0, mu_s, nullptr, a,
                                   unused);
      if (!active) continue;
FASTUDA_UNROLL
      for (int k = 0; k < CK; ++k) {
        if (c0 + k >= C) break;
        const int64_t c = c0 + k;
        const bool negative = counted && c != cls && lens[c] > 0 && coef != A(0);
        q_neg[c * N + n] = negative ? coef * contrast_detail::exp_acc(a[k] - nu) : A(0);
      }
    }
  }
}

// Backward phase 2: grad_x [B, D, P] contiguous.
template <typename T>
__global__ void __launch_bounds__(contrast_detail::kPixelThreads)
bank_grad_kernel(FeatView<T> x, LabelView y, const acc_t<T>* bank, const acc_t<T>* bbar,
                 const int64_t* lens, int64_t C, int64_t M, int64_t ignore_index,
                 const acc_t<T>* q_pos, const acc_t<T>* q_neg, T* grad_x) {
  using A = acc_t<T>;
  constexpr int CK = contrast_detail::kClasses, DT = contrast_detail::kChannels;
  __shared__ A mu_s[CK][DT];
  const int64_t N = x.B * x.P;
  for (int64_t base = int64_t(blockIdx.x) * blockDim.x; base < N;
       base += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = base + threadIdx.x;
    const bool active = n < N;
    const int64_t b = active ? n / x.P : 0, p = active ? n % x.P : 0;
    const int64_t cls =
        active ? bank_detail::bank_pixel_class(y, b, p, C, ignore_index, lens, false) : -1;
    const bool counted = cls >= 0;
    const int64_t L = counted ? lens[cls] : 0;
    for (int64_t d0 = 0; d0 < x.D; d0 += DT) {
      A g[DT];
FASTUDA_UNROLL
      for (int dd = 0; dd < DT; ++dd) g[dd] = A(0);
      for (int64_t c0 = 0; c0 < C; c0 += CK) {
        __syncthreads();
        for (int e = threadIdx.x; e < CK * DT; e += blockDim.x) {
          const int k = e / DT, dd = e % DT;
          const bool in = c0 + k < C && d0 + dd < x.D;
          mu_s[k][dd] = in ? bbar[(c0 + k) * x.D + d0 + dd] : A(0);
        }
        __syncthreads();
        if (!counted) continue;
        for (int k = 0; k < CK && c0 + k < C; ++k) {
          const A qk = q_neg[(c0 + k) * N + n];
FASTUDA_UNROLL
          for (int dd = 0; dd < DT; ++dd) g[dd] += qk * mu_s[k][dd];
        }
      }
      if (!active) continue;
      const int nd = int(x.D - d0 < DT ? x.D - d0 : DT);
      for (int64_t j = 0; j < L; ++j) {
        const A qj = q_pos[j * N + n];
        const A* row = bank + ((cls * M + j) * x.D + d0);
        for (int dd = 0; dd < nd; ++dd) g[dd] += qj * row[dd];
      }
FASTUDA_UNROLL
      for (int dd = 0; dd < DT; ++dd)
        if (d0 + dd < x.D) grad_x[(b * x.D + d0 + dd) * x.P + p] = T(g[dd]);
    }
  }
}

// bank = bank / tau [C, M, D] (acc_t), lens = bank_len as int64 [C]; bbar: [C, D] scratch.
template <typename T>
void bank_contrast_forward_launch(const FeatView<T>& x, const LabelView& y,
                                  const acc_t<T>* bank, const int64_t* lens, int64_t C,
                                  int64_t M, int64_t ignore_index, acc_t<T>* bbar,
                                  acc_t<T>* loss, acc_t<T>* neg_lse, void* stream) {
  using A = acc_t<T>;
  const auto mean = &bank_mean_kernel<A>;
  FASTUDA_LAUNCH(mean, dim3(grid_for(C * x.D, 256, 1024)), dim3(256), 0, stream, bank, lens, C, M,
                 x.D, bbar);
  const int64_t N = x.B * x.P;
  if (N == 0) return;
  const auto kernel = &bank_forward_kernel<T>;
  FASTUDA_LAUNCH(kernel, dim3(grid_for(N, contrast_detail::kPixelThreads, 1 << 20)),
                 dim3(contrast_detail::kPixelThreads), 0, stream, x, y, bank,
                 static_cast<const A*>(bbar), lens, C, M, ignore_index, loss, neg_lse);
}

// workspace: (C * D + (M + C) * B * P) acc_t elements.
template <typename T>
void bank_contrast_backward_launch(const FeatView<T>& x, const LabelView& y,
                                   const acc_t<T>* bank, const int64_t* lens, int64_t C,
                                   int64_t M, int64_t ignore_index, const acc_t<T>* grad_loss,
                                   const acc_t<T>* neg_lse, T* grad_x, void* workspace,
                                   void* stream) {
  using A = acc_t<T>;
  const int64_t N = x.B * x.P;
  A* bbar = static_cast<A*>(workspace);  // [C, D]
  A* q_pos = bbar + C * x.D;             // [M, N]
  A* q_neg = q_pos + M * N;              // [C, N]
  const auto mean = &bank_mean_kernel<A>;
  FASTUDA_LAUNCH(mean, dim3(grid_for(C * x.D, 256, 1024)), dim3(256), 0, stream, bank, lens, C, M,
                 x.D, bbar);
  if (N == 0) return;
  const unsigned grid = grid_for(N, contrast_detail::kPixelThreads, 1 << 20);
  const auto coef = &bank_coef_kernel<T>;
  FASTUDA_LAUNCH(coef, dim3(grid), dim3(contrast_detail::kPixelThreads), 0, stream, x, y, bank,
                 static_cast<const A*>(bbar), lens, C, M, ignore_index, grad_loss, neg_lse, q_pos,
                 q_neg);
  const auto grad = &bank_grad_kernel<T>;
  FASTUDA_LAUNCH(grad, dim3(grid), dim3(contrast_detail::kPixelThreads), 0, stream, x, y, bank,
                 static_cast<const A*>(bbar), lens, C, M, ignore_index,
                 static_cast<const A*>(q_pos), static_cast<const A*>(q_neg), grad_x);
}

// ---- op bodies: checks, output allocation, parameter preparation, launch ------------------------
inline void check_bank(const char* op, const at::Tensor& feats, const at::Tensor& labels,
                       const at::Tensor& bank, const at::Tensor& bank_len, double tau) {
  check_pixels(op, feats, labels, std::nullopt);
  TORCH_CHECK_VALUE(bank.dim() == 3 && bank.size(2) == feats.size(1), "fastuda::", op,
                    ": bank shape ", bank.sizes(), " does not match feats ", feats.sizes(),
                    " (expected [C, M, ", feats.size(1), "])");
  TORCH_CHECK_VALUE(bank.size(0) >= 1, "fastuda::", op, ": bank ", bank.sizes(),
                    " holds no class");
  TORCH_CHECK_VALUE(bank_len.dim() == 1 && bank_len.size(0) == bank.size(0), "fastuda::", op,
                    ": bank_len shape ", bank_len.sizes(), " does not match bank ", bank.sizes(),
                    " (expected [", bank.size(0), "])");
  TORCH_CHECK_TYPE(bank.is_floating_point(), "fastuda::", op, ": bank must be floating point, got ",
                   bank.scalar_type());
  TORCH_CHECK_TYPE(!bank_len.is_floating_point() && !bank_len.is_complex(), "fastuda::", op,
                   ": bank_len must be an integer tensor, got ", bank_len.scalar_type());
  TORCH_CHECK(bank.device() == feats.device() && bank_len.device() == feats.device(),
              "fastuda::", op, ": bank (", bank.device(), ") and bank_len (", bank_len.device(),
              ") must be on the device of feats (", feats.device(), ")");
  TORCH_CHECK_VALUE(tau > 0, "fastuda::", op, ": tau must be > 0, got ", tau);
  TORCH_CHECK_VALUE(feats.size(0) * feats.size(2) < std::numeric_limits<int32_t>::max(),
                    "fastuda::", op, ": too many pixels for the CUDA kernels");
}

inline std::tuple<at::Tensor, at::Tensor> bank_contrast_forward_op(
    const at::Tensor& feats, const at::Tensor& labels, const at::Tensor& bank,
    const at::Tensor& bank_len, double tau, int64_t ignore_index, void* stream) {
  const char* op = "bank_contrast_forward";
  check_bank(op, feats, labels, bank, bank_len, tau);
  const auto acc = acc_dtype(feats);
  const int64_t B = feats.size(0), D = feats.size(1), P = feats.size(2);
  const int64_t C = bank.size(0), M = bank.size(1);
  const auto opts = feats.options().dtype(acc);
  at::Tensor loss = at::empty({B, P}, opts), neg_lse = at::empty({B, P}, opts);
  const at::Tensor bank_s = (bank.to(acc) * (1.0 / tau)).contiguous();
  const at::Tensor lens = bank_len.to(at::kLong).contiguous();
  at::Tensor bbar = at::empty({C, D}, opts);
  dispatch_feats(feats, op, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    bank_contrast_forward_launch<T>(feat_view<T>(feats), label_view(labels, op),
                                    bank_s.const_data_ptr<A>(), lens.const_data_ptr<int64_t>(),
                                    C, M, ignore_index, bbar.mutable_data_ptr<A>(),
                                    loss.mutable_data_ptr<A>(), neg_lse.mutable_data_ptr<A>(),
                                    stream);
  });
  return {loss, neg_lse};
}

inline at::Tensor bank_contrast_backward_op(const at::Tensor& grad_loss, const at::Tensor& feats,
                                            const at::Tensor& labels, const at::Tensor& bank,
                                            const at::Tensor& bank_len, const at::Tensor& neg_lse,
                                            double tau, int64_t ignore_index, void* stream) {
  const char* op = "bank_contrast_backward";
  check_bank(op, feats, labels, bank, bank_len, tau);
  TORCH_CHECK_VALUE(grad_loss.sizes() == labels.sizes() && neg_lse.sizes() == labels.sizes(),
                    "fastuda::", op, ": grad_loss ", grad_loss.sizes(), " and neg_lse ",
                    neg_lse.sizes(), " must match labels ", labels.sizes());
  const auto acc = acc_dtype(feats);
  const int64_t B = feats.size(0), D = feats.size(1), P = feats.size(2);
  const int64_t C = bank.size(0), M = bank.size(1);
  const at::Tensor bank_s = (bank.to(acc) * (1.0 / tau)).contiguous();
  const at::Tensor lens = bank_len.to(at::kLong).contiguous();
  const at::Tensor gl = grad_loss.to(acc).contiguous(), nu = neg_lse.to(acc).contiguous();
  at::Tensor grad_feats = at::empty({B, D, P}, feats.options());
  at::Tensor workspace = at::empty({C * D + (M + C) * B * P}, feats.options().dtype(acc));
  dispatch_feats(feats, op, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    bank_contrast_backward_launch<T>(feat_view<T>(feats), label_view(labels, op),
                                     bank_s.const_data_ptr<A>(), lens.const_data_ptr<int64_t>(),
                                     C, M, ignore_index, gl.const_data_ptr<A>(),
                                     nu.const_data_ptr<A>(), grad_feats.mutable_data_ptr<T>(),
                                     workspace.mutable_data_ptr(), stream);
  });
  return grad_feats;
}

}  // namespace fastuda::FASTUDA_KNS

namespace {

namespace fk = fastuda::FASTUDA_KNS;

std::tuple<at::Tensor, at::Tensor> bank_forward_entry(const at::Tensor& feats,
                                                      const at::Tensor& labels,
                                                      const at::Tensor& bank,
                                                      const at::Tensor& bank_len, double tau,
                                                      int64_t ignore_index) {
  const fk::OpLaunch launch("bank_contrast_forward", feats, "feats");
  return launch.run([&] {
    return fk::bank_contrast_forward_op(feats, labels, bank, bank_len, tau, ignore_index,
                                        launch.stream());
  });
}

at::Tensor bank_backward_entry(const at::Tensor& grad_loss, const at::Tensor& feats,
                               const at::Tensor& labels, const at::Tensor& bank,
                               const at::Tensor& bank_len, const at::Tensor& neg_lse, double tau,
                               int64_t ignore_index) {
  const fk::OpLaunch launch("bank_contrast_backward", feats, "feats");
  return launch.run([&] {
    return fk::bank_contrast_backward_op(grad_loss, feats, labels, bank, bank_len, neg_lse, tau,
                                         ignore_index, launch.stream());
  });
}

}  // namespace

FASTUDA_KERNEL_IMPL(m) {
  m.impl("bank_contrast_forward", &bank_forward_entry);
  m.impl("bank_contrast_backward", &bank_backward_entry);
}
