// Pixel-to-centroid contrast and its distributional upper bound (ops.md sections 3 and 4).
//
// Per valid pixel i with label y and feature f:  a_c = f . mu'_c  (mu' = mu / tau),
// b_c = f^T S_c f  (S = lam / (2 tau^2) Sigma, symmetrised; 0 for proto_contrast),
//   lse_i = log sum_c exp(a_c + b_c),   loss_i = w_i (lse_i - a_y).
// Backward with s_i = grad_loss_i w_i and q_ic = s_i exp(a_c + b_c - lse_i):
//   dL/df = sum_c q_ic (mu'_c + 2 S_c f) - s_i mu'_y
//   dL/dmu_c = 1/tau sum_i (q_ic - s_i [y_i = c]) f_i
//   dL/dSigma_c = lam/(2 tau^2) sum_i q_ic f_i f_i^T   (diagonal: f_i^2)
//
// No covariance / diagonal covariance: one thread per pixel; the parameters of 32 classes x 32
// channels are staged in shared memory (every thread reads the same element: broadcast) and the
// pixel's 32 logits live in registers; more classes run as further 32-class chunks with an online
// logsumexp. The logits never go to memory. The backward writes q [C, N] (class-major: coalesced)
// once, then builds each 32-channel slice of dL/df in registers from it; q is also what the
// statistics' gradients need (a [C, D] reduction over pixels; a per-class Gram matrix for full S).
//
// Full covariance: a block owns 64 pixels. For each class the quadratic form is computed as
// U = F S_c tile by tile (64 px x 32 ch outputs, 8 per thread, shared-memory operands), then
// reduced to b_c = sum_d f_d (U_d + mu'_cd) per pixel with warp shuffles; nothing of size
// [N, C, D] exists, and S_c is read through shared memory once per 64 pixels.
//
// The proto_contrast / dist_contrast family's CUDA side in one file: kernels, launch plan, op
// bodies and registration. nvcc builds it for the GPU, g++ for the host SIMT emulator
// (cuda/backend.h says what differs).
#include <cmath>
#include <limits>
#include <tuple>

#include "cuda/backend.h"
#include "cuda/contrast_common.cuh"

namespace fastuda::FASTUDA_KNS {

// ---- launch plan --------------------------------------------------------------------------------
enum class CovKind : int32_t { kNone = 0, kDiag = 1, kFull = 2 };

struct ContrastWorkspace {
  void *q, *svec, *part;
};

// Backward workspace: q [C, N] (s_i * softmax), s [N], and when the class parameters need
// gradients the block partials [G, C, D] of their reduction over pixels.
struct ContrastBackwardPlan {
  int32_t tile_pixels, class_chunk;
  int64_t class_chunks, d_tiles, groups;
  size_t smem_reduce;
  size_t q_bytes, svec_bytes, part_bytes;

  static size_t align16(size_t n) { return (n + 15) / 16 * 16; }
  size_t workspace_bytes() const {
    return align16(q_bytes) + align16(svec_bytes) + align16(part_bytes);
  }
  ContrastWorkspace carve(void* base) const {
    char* p = static_cast<char*>(base);
    ContrastWorkspace ws{};
    ws.q = p;
    ws.svec = p + align16(q_bytes);
    ws.part = p + align16(q_bytes) + align16(svec_bytes);
    return ws;
  }
};

inline ContrastBackwardPlan plan_contrast_backward(int64_t N, int64_t D, int64_t C,
                                                   size_t acc_bytes, bool stats_grad,
                                                   const Tuning& tuning) {
  constexpr int64_t TD = 32;
  ContrastBackwardPlan plan{};
  const int64_t TP = tuning.tile_pixels;
  plan.tile_pixels = int32_t(TP);
  plan.q_bytes = acc_bytes * size_t(C * N);
  plan.svec_bytes = acc_bytes * size_t(N);
  plan.d_tiles = (D + TD - 1) / TD;
  // shared memory of class_reduce_kernel: x [TD][TP + 1], coefficients [CC][TP], acc [CC][TD]
  const size_t fixed = acc_bytes * size_t(TD * (TP + 1));
  int64_t CC = int64_t((kSharedBudget - fixed) / (acc_bytes * size_t(TP + TD)));
  if (CC > C) CC = C;
  if (CC < 1) CC = 1;
  plan.class_chunk = int32_t(CC);
  plan.class_chunks = (C + CC - 1) / CC;
  plan.smem_reduce = fixed + acc_bytes * size_t(CC * (TP + TD));
  int64_t groups = tuning.target_blocks / (plan.d_tiles * plan.class_chunks);
  const int64_t cap = N / (2 * C);
  if (groups > cap) groups = cap;
  if (groups > (N + TP - 1) / TP) groups = (N + TP - 1) / TP;
  plan.groups = groups < 1 ? 1 : groups;
  plan.part_bytes = stats_grad ? acc_bytes * size_t(plan.groups * C * D) : 0;
  return plan;
}

// Forward (no covariance / diagonal): loss [N], lse [N] (N = B * P, 0 where the pixel does not
// count).
template <typename T, bool kDiag>
__global__ void __launch_bounds__(contrast_detail::kPixelThreads)
contrast_forward_kernel(FeatView<T> x, LabelView y, WeightView w, const acc_t<T>* mu,
                        const acc_t<T>* sig, int64_t C, int64_t ignore_index, acc_t<T>* loss,
                        acc_t<T>* lse) {
  using A = acc_t<T>;
  constexpr int CK = contrast_detail::kClasses, DT = contrast_detail::kChannels;
  __shared__ A mu_s[CK][DT];
  __shared__ A sg_s[kDiag ? CK : 1][DT];
  const int64_t N = x.B * x.P;
  for (int64_t base = int64_t(blockIdx.x) * blockDim.x; base < N;
       base += int64_t(gridDim.x) * blockDim.x) {  // uniform trip count: the sweeps synchronise
    const int64_t n = base + threadIdx.x;
    const bool active = n < N;
    const int64_t b = active ? n / x.P : 0, p = active ? n % x.P : 0;
    const int64_t cls = active ? contrast_detail::pixel_class(y, b, p, C, ignore_index, true) : -1;
    const bool counted = cls >= 0;
    A m = -INFINITY, s = A(0), ay = A(0);
    for (int64_t c0 = 0; c0 < C; c0 += CK) {
      A a[CK], bq[CK];
      class_chunk_logits<T, kDiag>(x, b, p, counted, mu, sig, C, c0, mu_s, sg_s, a, bq);
      if (!counted) continue;
FASTUDA_UNROLL
      for (int k = 0; k < CK; ++k) {
        if (c0 + k >= C) break;
        contrast_detail::online_lse_add(a[k] + bq[k], m, s);
        if (c0 + k == cls) ay = a[k];
      }
    }
    if (active) {
      const A l = counted ? m + contrast_detail::log_acc(s) : A(0);
      lse[n] = l;
      loss[n] = counted ? w.template load<A>(b, p) * (l - ay) : A(0);
    }
  }
}

// Backward phase 1 (no covariance / diagonal): q [C, N] and s [N] (0 where the pixel does not
// count).
template <typename T, bool kDiag>
__global__ void __launch_bounds__(contrast_detail::kPixelThreads)
contrast_softmax_kernel(FeatView<T> x, LabelView y, WeightView w, const acc_t<T>* mu,
                        const acc_t<T>* sig, int64_t C, int64_t ignore_index,
                        const acc_t<T>* grad_loss, const acc_t<T>* lse, acc_t<T>* q,
                        acc_t<T>* svec) {
  using A = acc_t<T>;
  constexpr int CK = contrast_detail::kClasses, DT = contrast_detail::kChannels;
  __shared__ A mu_s[CK][DT];
  __shared__ A sg_s[kDiag ? CK : 1][DT];
  const int64_t N = x.B * x.P;
  for (int64_t base = int64_t(blockIdx.x) * blockDim.x; base < N;
       base += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = base + threadIdx.x;
    const bool active = n < N;
    const int64_t b = active ? n / x.P : 0, p = active ? n % x.P : 0;
    const int64_t cls = active ? contrast_detail::pixel_class(y, b, p, C, ignore_index, true) : -1;
    const bool counted = cls >= 0;
    const A s = counted ? grad_loss[n] * w.template load<A>(b, p) : A(0);
    const A l = counted ? lse[n] : A(0);
    if (active) svec[n] = s;
    for (int64_t c0 = 0; c0 < C; c0 += CK) {
      A a[CK], bq[CK];
      class_chunk_logits<T, kDiag>(x, b, p, counted, mu, sig, C, c0, mu_s, sg_s, a, bq);
      if (!active) continue;
FASTUDA_UNROLL
      for (int k = 0; k < CK; ++k) {
        if (c0 + k >= C) break;
        q[(c0 + k) * N + n] = counted ? s * contrast_detail::exp_acc(a[k] + bq[k] - l) : A(0);
      }
    }
  }
}

// Backward phase 2 (no covariance / diagonal): grad_x [B, D, P] contiguous from q and s.
template <typename T, bool kDiag>
__global__ void __launch_bounds__(contrast_detail::kPixelThreads)
contrast_grad_feats_kernel(FeatView<T> x, LabelView y, const acc_t<T>* mu, const acc_t<T>* sig,
                           int64_t C, int64_t ignore_index, const acc_t<T>* q,
                           const acc_t<T>* svec, T* grad_x) {
  using A = acc_t<T>;
  constexpr int CK = contrast_detail::kClasses, DT = contrast_detail::kChannels;
  __shared__ A mu_s[CK][DT];
  __shared__ A sg_s[kDiag ? CK : 1][DT];
  const int64_t N = x.B * x.P;
  for (int64_t base = int64_t(blockIdx.x) * blockDim.x; base < N;
       base += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = base + threadIdx.x;
    const bool active = n < N;
    const int64_t b = active ? n / x.P : 0, p = active ? n % x.P : 0;
    const int64_t cls = active ? contrast_detail::pixel_class(y, b, p, C, ignore_index, false) : -1;
    const bool counted = cls >= 0;
    const A s = counted ? svec[n] : A(0);
    for (int64_t d0 = 0; d0 < x.D; d0 += DT) {
      A f[DT], g[DT];
FASTUDA_UNROLL
      for (int dd = 0; dd < DT; ++dd) {
        f[dd] = (counted && kDiag && d0 + dd < x.D) ? A(*x.at(b, d0 + dd, p)) : A(0);
        g[dd] = A(0);
      }
      for (int64_t c0 = 0; c0 < C; c0 += CK) {
        __syncthreads();
        for (int e = threadIdx.x; e < CK * DT; e += blockDim.x) {
          const int k = e / DT, dd = e % DT;
          const int64_t c = c0 + k, d = d0 + dd;
          const bool in = c < C && d < x.D;
          mu_s[k][dd] = in ? mu[c * x.D + d] : A(0);
          if (kDiag) sg_s[k][dd] = in ? A(2) * sig[c * x.D + d] : A(0);
        }
        __syncthreads();
        if (!counted) continue;
        for (int k = 0; k < CK && c0 + k < C; ++k) {
          const A qk = q[(c0 + k) * N + n];
FASTUDA_UNROLL
          for (int dd = 0; dd < DT; ++dd) {
            g[dd] += qk * mu_s[k][dd];
            if (kDiag) g[dd] += qk * sg_s[k][dd] * f[dd];
          }
        }
      }
      if (!active) continue;
FASTUDA_UNROLL
      for (int dd = 0; dd < DT; ++dd) {
        const int64_t d = d0 + dd;
        if (d >= x.D) break;
        const A v = counted ? g[dd] - s * mu[cls * x.D + d] : A(0);
        grad_x[(b * x.D + d) * x.P + p] = T(v);
      }
    }
  }
}

// ---- full covariance ------------------------------------------------------------------------------
namespace contrast_detail {
constexpr int kTilePixels = 64;  // pixels of a block
}

// Mode kForward: loss/lse; mode kSoftmax: q [C, N], svec [N] (needs lse).
enum class FullMode { kForward, kSoftmax };

// For every class c: z_c = sum_d f_d ((F S_c)_d + mu'_cd), a_c = f . mu'_c for the block's 64
// pixels; U = F S_c is a 64 x 32 tile per channel slice, 8 outputs per thread (thread: channel
// tx = t % 32, pixels ty + 8 r).
template <typename T, FullMode kMode>
__global__ void __launch_bounds__(256)
contrast_full_kernel(FeatView<T> x, LabelView y, WeightView w, const acc_t<T>* mu,
                     const acc_t<T>* sig, int64_t C, int64_t ignore_index,
                     const acc_t<T>* grad_loss, acc_t<T>* loss, acc_t<T>* lse, acc_t<T>* q,
                     acc_t<T>* svec) {
  using A = acc_t<T>;
  constexpr int TPX = contrast_detail::kTilePixels, DT = contrast_detail::kChannels;
  __shared__ A F1[TPX][DT + 1];  // F[:, d1 slice]
  __shared__ A F2[TPX][DT + 1];  // F[:, d2 slice]
  __shared__ A Ss[DT][DT + 1];   // S_c[d2 slice][d1 slice]
  __shared__ A mus[DT];
  __shared__ A zc[TPX], ac[TPX], m_s[TPX], s_s[TPX], ay_s[TPX], l_s[TPX], sv_s[TPX];
  __shared__ int64_t cls_s[TPX], off_s[TPX];
  const int t = threadIdx.x, tx = t % 32, ty = t / 32;
  const int64_t N = x.B * x.P, D = x.D;
  const int64_t tiles = (N + TPX - 1) / TPX;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    __syncthreads();
    if (t < TPX) {
      const int64_t n = tile * TPX + t;
      int64_t cls = -1, off = -1;
      A sv = A(0), l = A(0);
      if (n < N) {
        const int64_t b = n / x.P, p = n % x.P;
        cls = contrast_detail::pixel_class(y, b, p, C, ignore_index, true);
        off = b * x.stride_b + p * x.stride_p;
        if (cls >= 0) {
          sv = w.template load<A>(b, p);
          if (kMode == FullMode::kSoftmax) {
            sv *= grad_loss[n];
            l = lse[n];
          }
        }
        if (kMode == FullMode::kSoftmax) svec[n] = sv;
      }
      cls_s[t] = cls;
      off_s[t] = cls >= 0 ? off : -1;  // pixels that do not count are never read
      sv_s[t] = sv;
      l_s[t] = l;
      m_s[t] = -INFINITY;
      s_s[t] = A(0);
      ay_s[t] = A(0);
    }
    for (int64_t c = 0; c < C; ++c) {
      __syncthreads();
      if (t < TPX) {
        zc[t] = A(0);
        ac[t] = A(0);
      }
      for (int64_t d1 = 0; d1 < D; d1 += DT) {
        __syncthreads();
        for (int e = t; e < TPX * DT; e += blockDim.x) {
          const int px = e % TPX, dd = e / TPX;
          const int64_t off = off_s[px];
          F1[px][dd] = (off >= 0 && d1 + dd < D) ? A(x.ptr[off + (d1 + dd) * x.stride_d]) : A(0);
        }
        if (t < DT) mus[t] = d1 + t < D ? mu[c * D + d1 + t] : A(0);
        A u[8] = {A(0), A(0), A(0), A(0), A(0), A(0), A(0), A(0)};
        for (int64_t d2 = 0; d2 < D; d2 += DT) {
          __syncthreads();
          for (int e = t; e < TPX * DT; e += blockDim.x) {
            const int px = e % TPX, dd = e / TPX;
            const int64_t off = off_s[px];
            F2[px][dd] =
                (off >= 0 && d2 + dd < D) ? A(x.ptr[off + (d2 + dd) * x.stride_d]) : A(0);
          }
          for (int e = t; e < DT * DT; e += blockDim.x) {
            const int r = e / DT, cc = e % DT;
            Ss[r][cc] = (d2 + r < D && d1 + cc < D) ? sig[(c * D + d2 + r) * D + d1 + cc] : A(0);
          }
          __syncthreads();
          for (int k = 0; k < DT; ++k) {
            const A sk = Ss[k][tx];
FASTUDA_UNROLL
            for (int r = 0; r < 8; ++r) u[r] += F2[ty + 8 * r][k] * sk;
          }
        }
FASTUDA_UNROLL
        for (int r = 0; r < 8; ++r) {
          const A f = F1[ty + 8 * r][tx];
          A zv = f * (u[r] + mus[tx]), av = f * mus[tx];
          for (int o = 16; o > 0; o /= 2) {
            zv += __shfl_xor_sync(0xffffffffu, zv, o);
            av += __shfl_xor_sync(0xffffffffu, av, o);
          }
          if (tx == 0) {  // warp ty owns pixels ty + 8 r: one writer each
            zc[ty + 8 * r] += zv;
            ac[ty + 8 * r] += av;
          }
        }
      }
      __syncthreads();
      if (t < TPX && cls_s[t] >= 0) {
        if (kMode == FullMode::kForward) {
          contrast_detail::online_lse_add(zc[t], m_s[t], s_s[t]);
          if (cls_s[t] == c) ay_s[t] = ac[t];
        } else {
          q[c * N + tile * TPX + t] = sv_s[t] * contrast_detail::exp_acc(zc[t] - l_s[t]);
        }
      } else if (t < TPX && kMode == FullMode::kSoftmax && tile * TPX + t < N) {
        q[c * N + tile * TPX + t] = A(0);
      }
    }
    __syncthreads();
    if (kMode == FullMode::kForward && t < TPX && tile * TPX + t < N) {
      const int64_t n = tile * TPX + t;
      const bool counted = cls_s[t] >= 0;
      const A l = counted ? m_s[t] + contrast_detail::log_acc(s_s[t]) : A(0);
      lse[n] = l;
      loss[n] = counted ? sv_s[t] * (l - ay_s[t]) : A(0);
    }
  }
}

// grad_x = sum_c q_c (mu'_c + 2 S_c f) - s mu'_y for the block's 64 pixels, one 32-channel
// slice d1 at a time; the slice is transposed through shared memory so the writes are
// pixel-contiguous.
template <typename T>
__global__ void __launch_bounds__(256)
contrast_full_grad_kernel(FeatView<T> x, const acc_t<T>* mu, const acc_t<T>* sig, int64_t C,
                          const acc_t<T>* q, const acc_t<T>* svec, LabelView y,
                          int64_t ignore_index, T* grad_x) {
  using A = acc_t<T>;
  constexpr int TPX = contrast_detail::kTilePixels, DT = contrast_detail::kChannels;
  __shared__ A F2[TPX][DT + 1];
  __shared__ A Ss[DT][DT + 1];
  __shared__ A G[TPX][DT + 1];
  __shared__ A q_s[TPX];
  __shared__ int64_t cls_s[TPX], off_s[TPX];
  const int t = threadIdx.x, tx = t % 32, ty = t / 32;
  const int64_t N = x.B * x.P, D = x.D;
  const int64_t tiles = (N + TPX - 1) / TPX;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    __syncthreads();
    if (t < TPX) {
      const int64_t n = tile * TPX + t;
      int64_t cls = -1, off = -1;
      if (n < N) {
        const int64_t b = n / x.P, p = n % x.P;
        cls = contrast_detail::pixel_class(y, b, p, C, ignore_index, false);
        off = b * x.stride_b + p * x.stride_p;
      }
      cls_s[t] = cls;
      off_s[t] = cls >= 0 ? off : -1;
    }
    for (int64_t d1 = 0; d1 < D; d1 += DT) {
      A g[8] = {A(0), A(0), A(0), A(0), A(0), A(0), A(0), A(0)};
      for (int64_t c = 0; c < C; ++c) {
        A u[8] = {A(0), A(0), A(0), A(0), A(0), A(0), A(0), A(0)};
        for (int64_t d2 = 0; d2 < D; d2 += DT) {
          __syncthreads();
          for (int e = t; e < TPX * DT; e += blockDim.x) {
            const int px = e % TPX, dd = e / TPX;
            const int64_t off = off_s[px];
            F2[px][dd] =
                (off >= 0 && d2 + dd < D) ? A(x.ptr[off + (d2 + dd) * x.stride_d]) : A(0);
          }
          for (int e = t; e < DT * DT; e += blockDim.x) {
            const int r = e / DT, cc = e % DT;
            Ss[r][cc] = (d2 + r < D && d1 + cc < D) ? sig[(c * D + d2 + r) * D + d1 + cc] : A(0);
          }
          if (d2 == 0 && t < TPX) {
            const int64_t n = tile * TPX + t;
            q_s[t] = (n < N && cls_s[t] >= 0) ? q[c * N + n] : A(0);
          }
          __syncthreads();
          for (int k = 0; k < DT; ++k) {
            const A sk = Ss[k][tx];
FASTUDA_UNROLL
            for (int r = 0; r < 8; ++r) u[r] += F2[ty + 8 * r][k] * sk;
          }
        }
        const A mu_cd = d1 + tx < D ? mu[c * D + d1 + tx] : A(0);
FASTUDA_UNROLL
        for (int r = 0; r < 8; ++r) g[r] += q_s[ty + 8 * r] * (mu_cd + A(2) * u[r]);
      }
      __syncthreads();
FASTUDA_UNROLL
      for (int r = 0; r < 8; ++r) {
        const int px = ty + 8 * r;
        const int64_t n = tile * TPX + px, cls = cls_s[px];
        A v = A(0);
        if (cls >= 0 && d1 + tx < D) v = g[r] - svec[n] * mu[cls * D + d1 + tx];
        G[px][tx] = v;
      }
      __syncthreads();
      for (int e = t; e < TPX * DT; e += blockDim.x) {
        const int px = e % TPX, dd = e / TPX;
        const int64_t n = tile * TPX + px;
        if (n >= N || d1 + dd >= D) continue;
        const int64_t b = n / x.P, p = n % x.P;
        grad_x[(b * D + d1 + dd) * x.P + p] = T(G[px][dd]);
      }
    }
  }
}

// ---- gradients of the class parameters ------------------------------------------------------------
// part[g][c][d] = sum over the block's pixels of coef_c(n) * v(n, d), with coef_c(n) = q[c][n]
// (minus s[n] when kOnehot and y_n = c) and v = x (or x^2 when kSquare). A block owns a 32-channel
// slice, a class chunk (grid.z) and a strided set of pixel tiles; thread e owns the entries
// (c, dl) = (e / 32, e % 32), (e + blockDim) / 32, ...: one writer per accumulator, fixed order.
template <typename T, bool kSquare, bool kOnehot>
__global__ void __launch_bounds__(256)
class_reduce_kernel(FeatView<T> x, LabelView y, int64_t C, int64_t ignore_index,
                    const acc_t<T>* q, const acc_t<T>* svec, acc_t<T>* part, int32_t tile_pixels,
                    int32_t class_chunk) {
  using A = acc_t<T>;
  constexpr int TD = 32;
  const int TP = tile_pixels, CC = class_chunk;
  FASTUDA_DYNAMIC_SHARED(A, smem);
  A* xs = smem;                  // [TD][TP + 1]
  A* cs = xs + TD * (TP + 1);    // [CC][TP]
  A* acc = cs + CC * TP;         // [CC][TD]
  const int t = threadIdx.x, nthreads = blockDim.x;
  const int64_t N = x.B * x.P, d0 = int64_t(blockIdx.y) * TD, c0 = int64_t(blockIdx.z) * CC;
  const int ncls = int(C - c0 < CC ? C - c0 : CC);
  for (int e = t; e < CC * TD; e += nthreads) acc[e] = A(0);
  const int64_t tiles = (N + TP - 1) / TP;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t n0 = tile * TP;
    __syncthreads();
    for (int e = t; e < TD * TP; e += nthreads) {
      const int dl = e / TP, pl = e % TP;
      const int64_t n = n0 + pl;
      A v = A(0);
      if (n < N && d0 + dl < x.D) {
        v = A(*x.at(n / x.P, d0 + dl, n % x.P));
        if (kSquare) v *= v;
      }
      xs[dl * (TP + 1) + pl] = v;
    }
    for (int e = t; e < CC * TP; e += nthreads) {
      const int k = e / TP, pl = e % TP;
      const int64_t n = n0 + pl, c = c0 + k;
      A v = A(0);
      if (n < N && k < ncls) {
        v = q[c * N + n];
        if (kOnehot && y.load(n / x.P, n % x.P) == c) v -= svec[n];
      }
      cs[k * TP + pl] = v;
    }
    __syncthreads();
    for (int e = t; e < CC * TD; e += nthreads) {
      const int k = e / TD, dl = e % TD;
      A sum = acc[e];
      for (int pl = 0; pl < TP; ++pl) sum += cs[k * TP + pl] * xs[dl * (TP + 1) + pl];
      acc[e] = sum;
    }
  }
  __syncthreads();
  const int64_t g = blockIdx.x;
  for (int e = t; e < CC * TD; e += nthreads) {
    const int k = e / TD, dl = e % TD;
    if (k < ncls && d0 + dl < x.D) part[(g * C + c0 + k) * x.D + d0 + dl] = acc[e];
  }
  (void)ignore_index;
}

// out[e] = scale * sum_g part[g][e] (fixed order, fp64).
template <typename A>
__global__ void __launch_bounds__(256)
sum_partials_kernel(const A* part, int64_t G, int64_t size, double scale, A* out) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < size;
       e += int64_t(gridDim.x) * blockDim.x) {
    double sum = 0.0;
    for (int64_t g = 0; g < G; ++g) sum += double(part[g * size + e]);
    out[e] = A(scale * sum);
  }
}

// out[c] = scale * sum_n q[c][n] f_n f_n^T: a 32x32 tile of the upper triangle per block (mirrored),
// all pixels in 32-pixel stages, 2x2 outputs per thread.
template <typename T>
__global__ void __launch_bounds__(256)
weighted_gram_kernel(FeatView<T> x, const acc_t<T>* q, int32_t d_tiles, double scale,
                     acc_t<T>* out) {
  using A = acc_t<T>;
  __shared__ A As[32][33];
  __shared__ A Bs[32][33];
  int32_t r = int32_t(blockIdx.x), i = 0;
  while (r >= d_tiles - i) {
    r -= d_tiles - i;
    ++i;
  }
  const int32_t j = i + r;
  const int64_t c = blockIdx.y, D = x.D, N = x.B * x.P;
  const int t = threadIdx.x, tx = t % 16, ty = t / 16;
  A acc[2][2] = {{A(0), A(0)}, {A(0), A(0)}};
  for (int64_t k0 = 0; k0 < N; k0 += 32) {
    __syncthreads();
    for (int e = t; e < 32 * 32; e += blockDim.x) {
      const int kk = e % 32, dd = e / 32;
      const int64_t n = k0 + kk, di = int64_t(i) * 32 + dd, dj = int64_t(j) * 32 + dd;
      A a = A(0), bv = A(0);
      if (n < N) {
        const int64_t b = n / x.P, p = n % x.P;
        const A qn = q[c * N + n];
        if (di < D) a = qn * A(*x.at(b, di, p));
        if (dj < D) bv = A(*x.at(b, dj, p));
      }
      As[kk][dd] = a;
      Bs[kk][dd] = bv;
    }
    __syncthreads();
    for (int kk = 0; kk < 32; ++kk) {
      const A a0 = As[kk][ty], a1 = As[kk][ty + 16], b0 = Bs[kk][tx], b1 = Bs[kk][tx + 16];
      acc[0][0] += a0 * b0;
      acc[0][1] += a0 * b1;
      acc[1][0] += a1 * b0;
      acc[1][1] += a1 * b1;
    }
  }
  for (int rr = 0; rr < 2; ++rr)
    for (int s = 0; s < 2; ++s) {
      const int64_t row = int64_t(i) * 32 + ty + 16 * rr, col = int64_t(j) * 32 + tx + 16 * s;
      if (row >= D || col >= D) continue;
      const A v = A(scale * double(acc[rr][s]));
      out[(c * D + row) * D + col] = v;
      if (i != j) out[(c * D + col) * D + row] = v;
    }
}

// ---- launchers ------------------------------------------------------------------------------------
// mu = centroids / tau [C, D]; sig = lam / (2 tau^2) * Sigma ([C, D] diag, [C, D, D] full and
// symmetric; unused for kNone). loss, lse: [B * P].
template <typename T>
void contrast_forward_launch(const FeatView<T>& x, const LabelView& y, const WeightView& w,
                             const acc_t<T>* mu, const acc_t<T>* sig, CovKind cov, int64_t C,
                             int64_t ignore_index, acc_t<T>* loss, acc_t<T>* lse, void* stream) {
  const int64_t N = x.B * x.P;
  if (N == 0) return;
  if (cov == CovKind::kFull) {
    const auto kernel = &contrast_full_kernel<T, FullMode::kForward>;
    FASTUDA_LAUNCH(kernel, dim3(grid_for(N, contrast_detail::kTilePixels, 1 << 20)), dim3(256),
                   0, stream, x, y, w, mu, sig, C, ignore_index,
                   static_cast<const acc_t<T>*>(nullptr), loss, lse,
                   static_cast<acc_t<T>*>(nullptr), static_cast<acc_t<T>*>(nullptr));
    return;
  }
  const auto kernel = cov == CovKind::kDiag ? &contrast_forward_kernel<T, true>
                                            : &contrast_forward_kernel<T, false>;
  FASTUDA_LAUNCH(kernel, dim3(grid_for(N, contrast_detail::kPixelThreads, 1 << 20)),
                 dim3(contrast_detail::kPixelThreads), 0, stream, x, y, w, mu, sig, C,
                 ignore_index, loss, lse);
}

// grad_x [B, D, P] contiguous; grad_mu [C, D] and grad_sig (shape of sig) are written when
// grad_mu != nullptr, scaled by mu_scale (1/tau) and sig_scale (lam / (2 tau^2)).
template <typename T>
void contrast_backward_launch(const FeatView<T>& x, const LabelView& y, const WeightView& w,
                              const acc_t<T>* mu, const acc_t<T>* sig, CovKind cov, int64_t C,
                              int64_t ignore_index, const acc_t<T>* grad_loss,
                              const acc_t<T>* lse, const ContrastBackwardPlan& plan, T* grad_x,
                              acc_t<T>* grad_mu, acc_t<T>* grad_sig, double mu_scale,
                              double sig_scale, void* workspace, void* stream) {
  using A = acc_t<T>;
  const int64_t N = x.B * x.P;
  if (N == 0) return;
  const ContrastWorkspace ws = plan.carve(workspace);
  A* q = static_cast<A*>(ws.q);
  A* svec = static_cast<A*>(ws.svec);
  const unsigned pixel_grid = grid_for(N, contrast_detail::kPixelThreads, 1 << 20);
  const unsigned tile_grid = grid_for(N, contrast_detail::kTilePixels, 1 << 20);
  if (cov == CovKind::kFull) {
    const auto softmax = &contrast_full_kernel<T, FullMode::kSoftmax>;
    FASTUDA_LAUNCH(softmax, dim3(tile_grid), dim3(256), 0, stream, x, y, w, mu, sig, C,
                   ignore_index, grad_loss, static_cast<A*>(nullptr), const_cast<A*>(lse), q,
                   svec);
    const auto grad = &contrast_full_grad_kernel<T>;
    FASTUDA_LAUNCH(grad, dim3(tile_grid), dim3(256), 0, stream, x, mu, sig, C,
                   static_cast<const A*>(q), static_cast<const A*>(svec), y, ignore_index,
                   grad_x);
  } else {
    const bool diag = cov == CovKind::kDiag;
    const auto softmax = diag ? &contrast_softmax_kernel<T, true> : &contrast_softmax_kernel<T, false>;
    FASTUDA_LAUNCH(softmax, dim3(pixel_grid), dim3(contrast_detail::kPixelThreads), 0, stream, x,
                   y, w, mu, sig, C, ignore_index, grad_loss, lse, q, svec);
    const auto grad =
        diag ? &contrast_grad_feats_kernel<T, true> : &contrast_grad_feats_kernel<T, false>;
    FASTUDA_LAUNCH(grad, dim3(pixel_grid), dim3(contrast_detail::kPixelThreads), 0, stream, x, y,
                   mu, sig, C, ignore_index, static_cast<const A*>(q),
                   static_cast<const A*>(svec), grad_x);
  }
  if (grad_mu == nullptr) return;
  A* part = static_cast<A*>(ws.part);
  const dim3 rgrid(unsigned(plan.groups), unsigned(plan.d_tiles), unsigned(plan.class_chunks));
  const unsigned sum_grid = grid_for(C * x.D, 256, 1024);
  const auto reduce_mu = &class_reduce_kernel<T, false, true>;
  FASTUDA_LAUNCH(reduce_mu, rgrid, dim3(256), plan.smem_reduce, stream, x, y, C, ignore_index,
                 static_cast<const A*>(q), static_cast<const A*>(svec), part, plan.tile_pixels,
                 plan.class_chunk);
  const auto sum = &sum_partials_kernel<A>;
  FASTUDA_LAUNCH(sum, dim3(sum_grid), dim3(256), 0, stream, static_cast<const A*>(part),
                 plan.groups, C * x.D, mu_scale, grad_mu);
  if (cov == CovKind::kDiag) {
    const auto reduce_sig = &class_reduce_kernel<T, true, false>;
    FASTUDA_LAUNCH(reduce_sig, rgrid, dim3(256), plan.smem_reduce, stream, x, y, C, ignore_index,
                   static_cast<const A*>(q), static_cast<const A*>(svec), part, plan.tile_pixels,
                   plan.class_chunk);
    FASTUDA_LAUNCH(sum, dim3(sum_grid), dim3(256), 0, stream, static_cast<const A*>(part),
                   plan.groups, C * x.D, sig_scale, grad_sig);
  } else if (cov == CovKind::kFull) {
    const int32_t dt = int32_t((x.D + 31) / 32);
    const auto gram = &weighted_gram_kernel<T>;
    FASTUDA_LAUNCH(gram, dim3(unsigned(dt * (dt + 1) / 2), unsigned(C)), dim3(256), 0, stream, x,
                   static_cast<const A*>(q), dt, sig_scale, grad_sig);
  }
}

// ---- op bodies: checks, output allocation, parameter preparation, launch ------------------------
// Parameters are prepared with a few small ATen ops on the same device and stream (scaling by
// 1/tau and lam / (2 tau^2), symmetrising a full covariance); nothing synchronises.
inline void check_contrast(const char* op, const at::Tensor& feats, const at::Tensor& labels,
                           const at::Tensor& centroids, const at::Tensor* covariance,
                           const std::optional<at::Tensor>& weights, double tau) {
  check_pixels(op, feats, labels, weights);
  const int64_t D = feats.size(1);
  TORCH_CHECK_VALUE(centroids.dim() == 2 && centroids.size(1) == D, "fastuda::", op,
                    ": centroids shape ", centroids.sizes(), " does not match the feature width D=",
                    D, " of feats ", feats.sizes());
  TORCH_CHECK_VALUE(centroids.size(0) >= 1, "fastuda::", op,
                    ": need at least one class, got centroids shape ", centroids.sizes());
  TORCH_CHECK_TYPE(centroids.is_floating_point(), "fastuda::", op,
                   ": centroids must be floating point, got ", centroids.scalar_type());
  TORCH_CHECK(centroids.device() == feats.device(), "fastuda::", op, ": centroids are on ",
              centroids.device(), " but feats on ", feats.device());
  if (covariance != nullptr) {
    const at::Tensor& cv = *covariance;
    const int64_t C = centroids.size(0);
    const bool diag = cv.dim() == 2 && cv.size(0) == C && cv.size(1) == D;
    const bool full = cv.dim() == 3 && cv.size(0) == C && cv.size(1) == D && cv.size(2) == D;
    TORCH_CHECK_VALUE(diag || full, "fastuda::", op, ": covariance shape ", cv.sizes(),
                      " must be [C, D] or [C, D, D] for centroids ", centroids.sizes());
    TORCH_CHECK_TYPE(cv.is_floating_point(), "fastuda::", op,
                     ": covariance must be floating point, got ", cv.scalar_type());
    TORCH_CHECK(cv.device() == feats.device(), "fastuda::", op, ": covariance is on ",
                cv.device(), " but feats on ", feats.device());
  }
  TORCH_CHECK_VALUE(tau > 0, "fastuda::", op, ": tau must be > 0, got ", tau);
  TORCH_CHECK_VALUE(feats.size(0) * feats.size(2) < std::numeric_limits<int32_t>::max(),
                    "fastuda::", op, ": too many pixels for the CUDA kernels");
}

struct ContrastParams {
  at::Tensor mu, sig;
  CovKind cov;
};

inline ContrastParams contrast_params(const at::Tensor& feats, const at::Tensor& centroids,
                                      const at::Tensor* covariance, double tau, double lam) {
  const auto acc = acc_dtype(feats);
  ContrastParams out;
  out.mu = (centroids.to(acc) * (1.0 / tau)).contiguous();
  out.cov = CovKind::kNone;
  if (covariance != nullptr) {
    at::Tensor cv = covariance->to(acc);
    out.cov = cv.dim() == 3 ? CovKind::kFull : CovKind::kDiag;
    if (cv.dim() == 3) cv = (cv + cv.transpose(1, 2)) * 0.5;  // x^T S x = x^T sym(S) x
    out.sig = (cv * (lam / (2.0 * tau * tau))).contiguous();
  }
  return out;
}

// keep_probs / probs: the CPU kernels' option of keeping the softmax for the backward. These
// kernels recompute the logits in the backward, from the features they read anyway.
inline void check_no_probs(const char* op, bool keep_probs, const std::optional<at::Tensor>& probs) {
  TORCH_CHECK_VALUE(!keep_probs && !probs.has_value(), "fastuda::", op, ": keep_probs / probs "
                    "are a CPU kernel option; the GPU kernels recompute the softmax");
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> contrast_forward_op(
    const char* op, const at::Tensor& feats, const at::Tensor& labels,
    const at::Tensor& centroids, const at::Tensor* covariance, double tau, double lam,
    int64_t ignore_index, const std::optional<at::Tensor>& weights, bool keep_probs,
    void* stream) {
  check_no_probs(op, keep_probs, std::nullopt);
  check_contrast(op, feats, labels, centroids, covariance, weights, tau);
  const int64_t B = feats.size(0), P = feats.size(2), C = centroids.size(0);
  const auto opts = feats.options().dtype(acc_dtype(feats));
  at::Tensor loss = at::empty({B, P}, opts), lse = at::empty({B, P}, opts);
  const ContrastParams prm = contrast_params(feats, centroids, covariance, tau, lam);
  const at::Tensor w = weights_for(weights, feats);
  dispatch_feats(feats, op, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    contrast_forward_launch<T>(feat_view<T>(feats), label_view(labels, op), weight_view(w),
                               prm.mu.const_data_ptr<A>(),
                               prm.sig.defined() ? prm.sig.const_data_ptr<A>() : nullptr, prm.cov,
                               C, ignore_index, loss.mutable_data_ptr<A>(),
                               lse.mutable_data_ptr<A>(), stream);
  });
  return {loss, lse, at::empty({0, 0, 0}, opts)};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> contrast_backward_op(
    const char* op, const at::Tensor& grad_loss, const at::Tensor& feats,
    const at::Tensor& labels, const at::Tensor& centroids, const at::Tensor* covariance,
    const at::Tensor& lse, double tau, double lam, int64_t ignore_index,
    const std::optional<at::Tensor>& weights, bool stats_grad,
    const std::optional<at::Tensor>& probs, const Tuning& tuning, void* stream) {
  check_no_probs(op, false, probs);
  check_contrast(op, feats, labels, centroids, covariance, weights, tau);
  TORCH_CHECK_VALUE(grad_loss.sizes() == labels.sizes() && lse.sizes() == labels.sizes(),
                    "fastuda::", op, ": grad_loss ", grad_loss.sizes(), " and lse ", lse.sizes(),
                    " must both match labels ", labels.sizes());
  const auto acc = acc_dtype(feats);
  const int64_t B = feats.size(0), D = feats.size(1), P = feats.size(2), C = centroids.size(0);
  const ContrastParams prm = contrast_params(feats, centroids, covariance, tau, lam);
  const at::Tensor w = weights_for(weights, feats);
  const at::Tensor gl = grad_loss.to(acc).contiguous(), lse_acc = lse.to(acc).contiguous();
  at::Tensor grad_feats = at::empty({B, D, P}, feats.options());
  at::Tensor grad_mu, grad_sig;
  if (stats_grad) {
    grad_mu = at::empty({C, D}, feats.options().dtype(acc));
    if (covariance) grad_sig = at::empty(covariance->sizes(), feats.options().dtype(acc));
  }
  const size_t acc_bytes = acc == at::kDouble ? 8 : 4;
  const ContrastBackwardPlan plan =
      plan_contrast_backward(B * P, D, C, acc_bytes, stats_grad, tuning);
  at::Tensor workspace =
      at::empty({int64_t(plan.workspace_bytes())}, feats.options().dtype(at::kByte));
  if (B * P == 0) {
    if (stats_grad) {
      grad_mu.zero_();
      if (covariance) grad_sig.zero_();
    }
  } else {
    dispatch_feats(feats, op, [&](auto tag) {
      using T = decltype(tag);
      using A = acc_t<T>;
      contrast_backward_launch<T>(
          feat_view<T>(feats), label_view(labels, op), weight_view(w), prm.mu.const_data_ptr<A>(),
          prm.sig.defined() ? prm.sig.const_data_ptr<A>() : nullptr, prm.cov, C, ignore_index,
          gl.const_data_ptr<A>(), lse_acc.const_data_ptr<A>(), plan,
          grad_feats.mutable_data_ptr<T>(), stats_grad ? grad_mu.mutable_data_ptr<A>() : nullptr,
          grad_sig.defined() ? grad_sig.mutable_data_ptr<A>() : nullptr, 1.0 / tau,
          lam / (2.0 * tau * tau), workspace.mutable_data_ptr(), stream);
    });
  }
  at::Tensor grad_centroids, grad_covariance;
  if (stats_grad) {
    grad_centroids = grad_mu.to(centroids.scalar_type());
    grad_covariance = covariance ? grad_sig.to(covariance->scalar_type())
                                 : at::empty({0}, feats.options().dtype(acc));
  } else {
    grad_centroids = at::empty({0}, centroids.options());
    grad_covariance = covariance ? at::empty({0}, covariance->options())
                                 : at::empty({0}, feats.options().dtype(acc));
  }
  return {grad_feats, grad_centroids, grad_covariance};
}

}  // namespace fastuda::FASTUDA_KNS

namespace {

namespace fk = fastuda::FASTUDA_KNS;

std::tuple<at::Tensor, at::Tensor, at::Tensor> proto_forward_entry(
    const at::Tensor& feats, const at::Tensor& labels, const at::Tensor& centroids, double tau,
    int64_t ignore_index, const std::optional<at::Tensor>& weights, bool keep_probs) {
  const char* op = "proto_contrast_forward";
  const fk::OpLaunch launch(op, feats, "feats");
  return launch.run([&] {
    return fk::contrast_forward_op(op, feats, labels, centroids, nullptr, tau, 0.0, ignore_index,
                                   weights, keep_probs, launch.stream());
  });
}

std::tuple<at::Tensor, at::Tensor> proto_backward_entry(
    const at::Tensor& grad_loss, const at::Tensor& feats, const at::Tensor& labels,
    const at::Tensor& centroids, const at::Tensor& lse, double tau, int64_t ignore_index,
    const std::optional<at::Tensor>& weights, bool centroids_grad,
    const std::optional<at::Tensor>& probs) {
  const char* op = "proto_contrast_backward";
  const fk::OpLaunch launch(op, feats, "feats");
  return launch.run([&] {
    auto [gf, gc, unused] = fk::contrast_backward_op(
        op, grad_loss, feats, labels, centroids, nullptr, lse, tau, 0.0, ignore_index, weights,
        centroids_grad, probs, launch.tuning(), launch.stream());
    return std::tuple<at::Tensor, at::Tensor>{gf, gc};
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dist_forward_entry(
    const at::Tensor& feats, const at::Tensor& labels, const at::Tensor& centroids,
    const at::Tensor& covariance, double tau, double lam, int64_t ignore_index,
    const std::optional<at::Tensor>& weights, bool keep_probs) {
  const char* op = "dist_contrast_forward";
  const fk::OpLaunch launch(op, feats, "feats");
  return launch.run([&] {
    return fk::contrast_forward_op(op, feats, labels, centroids, &covariance, tau, lam,
                                   ignore_index, weights, keep_probs, launch.stream());
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dist_backward_entry(
    const at::Tensor& grad_loss, const at::Tensor& feats, const at::Tensor& labels,
    const at::Tensor& centroids, const at::Tensor& covariance, const at::Tensor& lse, double tau,
    double lam, int64_t ignore_index, const std::optional<at::Tensor>& weights,
    bool stats_grad, const std::optional<at::Tensor>& probs) {
  const char* op = "dist_contrast_backward";
  const fk::OpLaunch launch(op, feats, "feats");
  return launch.run([&] {
    return fk::contrast_backward_op(op, grad_loss, feats, labels, centroids, &covariance, lse, tau,
                                    lam, ignore_index, weights, stats_grad, probs,
                                    launch.tuning(), launch.stream());
  });
}

}  // namespace

FASTUDA_KERNEL_IMPL(m) {
  m.impl("proto_contrast_forward", &proto_forward_entry);
  m.impl("proto_contrast_backward", &proto_backward_entry);
  m.impl("dist_contrast_forward", &dist_forward_entry);
  m.impl("dist_contrast_backward", &dist_backward_entry);
}
