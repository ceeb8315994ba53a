// Pixel-to-pixel supervised contrast, CLUDA-style (ops.md section 6), the math of
// csrc/cpu/pixel_contrast.cpp. The features arrive L2-normalised (the Python wrapper normalises).
// With s_ij = f_i . f_j / tau, for a valid anchor i (label != ignore_index; any other value is a
// class), positives P_i (the other valid pixels of its class) and negatives N_i (the valid pixels
// of other classes):
//   nu_i   = log sum_{n in N_i} exp(s_in)                     (-inf when N_i is empty)
//   l_i    = (1 / |P_i|) sum_{p in P_i} w_ip softplus(nu_i - s_ip),   w_ip = a_i a_p (else 1)
//   loss_i = weight_i l_i (0 when |P_i| = 0),   A_i = sum_p w_ip sigmoid(nu_i - s_ip)
// The forward returns loss, nu (neg_lse), A (pos_acc) and |P_i| (n_pos); 0 at ignored pixels.
// Backward, with c_i = grad_i weight_i / |P_i| (0 without positive or negative), nu'_i = nu_i
// (0 without negative) and the gradient wrt s_ij
//   G_ij = c_i A_i exp(s_ij - nu_i)               (negative pair)
//   G_ij = -c_i w_ij sigmoid(nu_i - s_ij)          (positive pair),
// s is symmetric, so  d loss / d f_i = (1 / tau) sum_j (G_ij + G_ji) f_j  and
// d loss / d a_i = sum_{p in P_i} a_p (c_i softplus(nu_i - s_ip) + c_p softplus(nu'_p - s_pi)).
//
// Layout. Pixels are addressed by their flat id n = b * P + p over all B * P pixels (ignored ones
// included: they are masked, no compaction pass). A block owns kRows = 32 anchor rows and sweeps
// the column tiles of kCols = 64 pixels; the similarity tile [32 x 64] is computed from
// 32-channel slices of both operands staged in shared memory (coalesced loads along whichever of
// pixels / channels is contiguous in the input), 8 dot products per thread in registers: thread
// (r, l) = (tid / 8, tid % 8) owns row r and the columns l, l + 8, ..., l + 56. A row's 8 threads
// are adjacent lanes of one warp, so row reductions are 3 xor-shuffles whose result every lane
// holds bit for bit. The [N, N] matrix never exists: a tile lives in registers for one step.
//   forward pass 1: online logsumexp over the negatives -> nu_i, and the positive count;
//   forward pass 2: the positive terms -> l_i, A_i (needs the final nu_i, hence a second sweep);
//   backward: a coefficient kernel (c_i needs |P_i|, which the schema does not pass: one label
//     sweep per pixel), then a row-owned gradient kernel: a block owns output rows i, sweeps every
//     column tile j, forms G_ij + G_ji for its tile, stages it in shared memory and multiplies it
//     with the tile's features (its own slice of grad_channels channels per grid.y index, 4 per
//     thread per 32-channel stage, in registers). Every output element has one owner: no atomics.
// Column tiles that hold no pair of interest for any row of the block (only ignored pixels, a
// single class in the pass over negatives, zero coefficients) are skipped from the labels alone,
// before any feature is read.
//
// The pixel_contrast family's CUDA side in one file: kernels, launch plan, op bodies
// and registration. nvcc builds it for the GPU, g++ for the host SIMT emulator (cuda/backend.h
// says what differs).
#include <limits>
#include <optional>
#include <tuple>

#include "common/pair_contrast.h"
#include "cuda/backend.h"
#include "cuda/contrast_common.cuh"

namespace fastuda::FASTUDA_KNS {

// ---- launch plan --------------------------------------------------------------------------------
// Channels of the feature gradient one block of the backward owns (grid.y splits D into slices of
// at most this many; each slice recomputes the similarity tiles, the accumulators stay in
// registers). A multiple of 32.
inline constexpr int32_t kPixelGradChannelsMax = 128;

namespace pixel_detail {
constexpr int kRows = 32;                         // anchor rows per block
constexpr int kCols = 64;                         // columns per tile
constexpr int kChan = 32;                         // channels per shared-memory stage
constexpr int kLanes = 8;                         // threads per anchor row
constexpr int kPerLane = kCols / kLanes;          // similarity entries per thread
constexpr int kThreads = kRows * kLanes;          // 256
constexpr int kGradPerStage = kChan / kLanes;     // gradient channels per thread per stage
constexpr int kMaxGradStages = 4;                 // kGradChannelsMax / kChan
constexpr int kCoefThreads = 256;
static_assert(kRows * kLanes == kThreads && kLanes * kPerLane == kCols);
static_assert(kMaxGradStages * kChan == kPixelGradChannelsMax);
static_assert(kChan % kLanes == 0 && kThreads % kCols == 0 && kThreads % kRows == 0);

// softplus and sigmoid of common/pair_contrast.h (shared with the CPU kernels)
FASTUDA_DEVICE_INLINE float softplus(float z) { return softplus_libm(z); }
FASTUDA_DEVICE_INLINE double softplus(double z) { return softplus_libm(z); }
FASTUDA_DEVICE_INLINE float sigmoid(float z) { return sigmoid_libm(z); }
FASTUDA_DEVICE_INLINE double sigmoid(double z) { return sigmoid_libm(z); }

// Reductions over the 8 lanes of an anchor row (aligned groups of 8 lanes; every lane of the warp
// takes part). xor-butterflies give all 8 lanes the identical value.
template <typename V>
FASTUDA_DEVICE_INLINE V row_sum(V v) {
FASTUDA_UNROLL
  for (int o = 1; o < kLanes; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <typename V>
FASTUDA_DEVICE_INLINE V row_max(V v) {
FASTUDA_UNROLL
  for (int o = 1; o < kLanes; o <<= 1) {
    const V u = __shfl_xor_sync(0xffffffffu, v, o);
    v = u > v ? u : v;
  }
  return v;
}

FASTUDA_DEVICE_INLINE int64_t label_of(const LabelView& y, int64_t P, int64_t n) {
  return y.load(n / P, n % P);
}

// Offset of pixel n in the features (b * stride_b + p * stride_p), -1 past the last pixel. A
// tile's offsets are computed once (one thread per pixel) and kept in shared memory, so the
// channel stages neither divide nor hold per-thread address arrays in registers.
template <typename T>
FASTUDA_DEVICE_INLINE int64_t pixel_offset(const FeatView<T>& x, int64_t n) {
  return n < x.B * x.P ? (n / x.P) * x.stride_b + (n % x.P) * x.stride_p : int64_t(-1);
}

// tile[c][col] = channel d0 + c of the tile's pixel col, in the accumulation type (0 outside).
// Element e = tid + q * kThreads of the [kChan x kTile] slice: consecutive threads walk pixels
// when pixels are the contiguous dimension (channels-first maps) and channels otherwise
// (pixel-major [N, D]), so the global loads coalesce either way.
template <int kTile, typename T>
FASTUDA_DEVICE_INLINE void stage_slice(const FeatView<T>& x, const int64_t* offset_s, int64_t d0,
                                       acc_t<T> (*tile)[kTile + 1]) {
  using A = acc_t<T>;
  constexpr int kLoads = kChan * kTile / kThreads;
  static_assert(kLoads * kThreads == kChan * kTile);
  const bool pixels_contiguous = x.stride_p <= x.stride_d;
FASTUDA_UNROLL
  for (int q = 0; q < kLoads; ++q) {
    const int e = int(threadIdx.x) + q * kThreads;
    const int col = pixels_contiguous ? e % kTile : e / kChan;
    const int chan = pixels_contiguous ? e / kTile : e % kChan;
    const int64_t off = offset_s[col], d = d0 + chan;
    tile[chan][col] = off >= 0 && d < x.D ? A(x.ptr[off + d * x.stride_d]) : A(0);
  }
}

// dot[k] = f_(row r) . f_(column l + 8k) over all channels (every thread of the block calls it:
// it synchronises; it begins with a barrier, so callers may overwrite nothing it stages before).
template <typename T>
FASTUDA_DEVICE_INLINE void similarity_tile(const FeatView<T>& x, const int64_t* row_off_s,
                                           const int64_t* col_off_s,
                                           acc_t<T> (*rows_s)[kRows + 1],
                                           acc_t<T> (*cols_s)[kCols + 1], int r, int l,
                                           acc_t<T>* dot) {
  using A = acc_t<T>;
FASTUDA_UNROLL
  for (int k = 0; k < kPerLane; ++k) dot[k] = A(0);
  for (int64_t d0 = 0; d0 < x.D; d0 += kChan) {
    __syncthreads();  // the previous stage (or the caller's reads of cols_s) is done
    stage_slice<kRows>(x, row_off_s, d0, rows_s);
    stage_slice<kCols>(x, col_off_s, d0, cols_s);
    __syncthreads();
    const int nd = int(x.D - d0 < kChan ? x.D - d0 : kChan);
    for (int dd = 0; dd < nd; ++dd) {
      const A a = rows_s[dd][r];
FASTUDA_UNROLL
      for (int k = 0; k < kPerLane; ++k) dot[k] += a * cols_s[dd][l + kLanes * k];
    }
  }
}

// Block-uniform "does any thread have work in this tile": `mine` from every thread, after
// `flag_s` was cleared before the caller's last barrier.
FASTUDA_DEVICE_INLINE bool block_any(bool mine, int* flag_s) {
  if (mine) *flag_s = 1;  // every writer stores the same value
  __syncthreads();
  return *flag_s != 0;
}
}  // namespace pixel_detail

// Forward: loss, neg_lse, pos_acc, n_pos [B * P] (0 at ignored pixels).
template <typename T>
__global__ void __launch_bounds__(pixel_detail::kThreads)
pixel_forward_kernel(FeatView<T> x, LabelView y, WeightView w, WeightView pw, acc_t<T> inv_tau,
                     int64_t ignore_index, acc_t<T>* loss, acc_t<T>* neg_lse,
                     acc_t<T>* pos_acc, acc_t<T>* n_pos) {
  using A = acc_t<T>;
  using namespace pixel_detail;
  __shared__ A rows_s[kChan][kRows + 1];
  __shared__ A cols_s[kChan][kCols + 1];
  __shared__ int64_t row_off_s[kRows], col_off_s[kCols], lab_s[kCols];
  __shared__ A pw_s[kCols];
  __shared__ int flag_s;
  const int tid = int(threadIdx.x), r = tid / kLanes, l = tid % kLanes;
  const int64_t N = x.B * x.P, i0 = int64_t(blockIdx.x) * kRows, i = i0 + r;
  const bool in_range = i < N;
  const int64_t yi = in_range ? label_of(y, x.P, i) : ignore_index;
  const bool valid = yi != ignore_index;
  const int64_t bi = in_range ? i / x.P : 0, pi = in_range ? i % x.P : 0;
  const A ai = valid ? pw.load<A>(bi, pi) : A(1);
  if (tid < kRows) row_off_s[tid] = pixel_offset(x, i0 + tid);  // read after the next barrier

  // pass 1: online logsumexp over the negatives, positive count
  A m = A(-INFINITY), s = A(0);
  int npos = 0, nan_neg = 0;  // NaN similarities are skipped by the max: counted apart
  for (int64_t j0 = 0; j0 < N; j0 += kCols) {
    __syncthreads();  // the previous tile's reads of the shared arrays are done
    if (tid < kCols) {
      lab_s[tid] = j0 + tid < N ? label_of(y, x.P, j0 + tid) : ignore_index;
      col_off_s[tid] = pixel_offset(x, j0 + tid);
    }
    if (tid == 0) flag_s = 0;
    __syncthreads();
    unsigned neg = 0;  // bit k: column l + 8k is a negative of the row
FASTUDA_UNROLL
    for (int k = 0; k < kPerLane; ++k) {
      const int c = l + kLanes * k;
      const int64_t yj = lab_s[c];
      if (valid && yj != ignore_index && yj != yi) neg |= 1u << k;
      npos += (valid && yj == yi && j0 + c != i) ? 1 : 0;
    }
    if (!block_any(neg != 0, &flag_s)) continue;
    A dot[kPerLane];
    similarity_tile(x, row_off_s, col_off_s, rows_s, cols_s, r, l, dot);
    A tmax = A(-INFINITY);
FASTUDA_UNROLL
    for (int k = 0; k < kPerLane; ++k) {
      dot[k] *= inv_tau;
      if ((neg >> k & 1u) && dot[k] > tmax) tmax = dot[k];
      nan_neg += (neg >> k & 1u) && dot[k] != dot[k];
    }
    tmax = row_max(tmax);
    const A mnew = tmax > m ? tmax : m;
    A part = A(0);
    if (mnew != A(-INFINITY)) {
FASTUDA_UNROLL
      for (int k = 0; k < kPerLane; ++k)
        if (neg >> k & 1u) part += contrast_detail::exp_acc(dot[k] - mnew);
    }
    part = row_sum(part);
    if (mnew != A(-INFINITY)) {
      s = (m == A(-INFINITY) ? A(0) : s * contrast_detail::exp_acc(m - mnew)) + part;
      m = mnew;
    }
  }
  npos = row_sum(npos);
  nan_neg = row_sum(nan_neg);
  // a non-finite feature (NaN similarity, or inf - inf in the sum) makes the loss NaN, never 0
  const A nu = nan_neg > 0 || s != s ? A(NAN)
               : s > A(0) ? m + contrast_detail::log_acc(s) : A(-INFINITY);
  const bool has_neg = nu != A(-INFINITY);

  // pass 2: the positive terms (nothing to do for anchors without a negative: softplus(-inf) = 0)
  A lsum = A(0), asum = A(0);
  for (int64_t j0 = 0; j0 < N; j0 += kCols) {
    __syncthreads();
    if (tid < kCols) {
      const int64_t j = j0 + tid;
      lab_s[tid] = j < N ? label_of(y, x.P, j) : ignore_index;
      col_off_s[tid] = pixel_offset(x, j);
      pw_s[tid] = j < N ? pw.load<A>(j / x.P, j % x.P) : A(1);
    }
    if (tid == 0) flag_s = 0;
    __syncthreads();
    unsigned pos = 0;  // bit k: column l + 8k is a positive of the row
FASTUDA_UNROLL
    for (int k = 0; k < kPerLane; ++k) {
      const int c = l + kLanes * k;
      if (valid && has_neg && lab_s[c] == yi && j0 + c != i) pos |= 1u << k;
    }
    if (!block_any(pos != 0, &flag_s)) continue;
    A dot[kPerLane];
    similarity_tile(x, row_off_s, col_off_s, rows_s, cols_s, r, l, dot);
FASTUDA_UNROLL
    for (int k = 0; k < kPerLane; ++k) {
      if (!(pos >> k & 1u)) continue;
      const A z = nu - dot[k] * inv_tau;
      const A wp = ai * pw_s[l + kLanes * k];
      lsum += wp * softplus(z);
      asum += wp * sigmoid(z);
    }
  }
  lsum = row_sum(lsum);
  asum = row_sum(asum);
  if (l == 0 && in_range) {
    const A wi = valid ? w.load<A>(bi, pi) : A(1);
    n_pos[i] = valid ? A(npos) : A(0);
    neg_lse[i] = valid ? nu : A(0);
    pos_acc[i] = valid ? asum : A(0);
    loss[i] = valid && npos > 0 ? wi * lsum / A(npos) : A(0);
  }
}

// Backward, step 1: coef[n] = c_n = grad_n weight_n / |P_n| (0 for ignored pixels and anchors
// without a positive or a negative). |P_n| is recounted from the labels (a sweep over all pixels'
// labels, staged 256 at a time).
template <typename A>
__global__ void __launch_bounds__(pixel_detail::kCoefThreads)
pixel_coef_kernel(LabelView y, WeightView w, int64_t B, int64_t P, int64_t ignore_index,
                  const A* grad_loss, const A* neg_lse, A* coef) {
  using namespace pixel_detail;
  __shared__ int64_t lab_s[kCoefThreads];
  const int64_t N = B * P;
  for (int64_t base = int64_t(blockIdx.x) * kCoefThreads; base < N;
       base += int64_t(gridDim.x) * kCoefThreads) {  // uniform trip count: the sweep synchronises
    const int64_t n = base + threadIdx.x;
    const bool in_range = n < N;
    const int64_t yn = in_range ? label_of(y, P, n) : ignore_index;
    const bool valid = yn != ignore_index;
    int64_t same = 0;  // valid pixels of the class, n itself included
    for (int64_t j0 = 0; j0 < N; j0 += kCoefThreads) {
      __syncthreads();
      lab_s[threadIdx.x] = j0 + threadIdx.x < N ? label_of(y, P, j0 + threadIdx.x) : ignore_index;
      __syncthreads();
      if (!valid) continue;
      const int nj = int(N - j0 < kCoefThreads ? N - j0 : kCoefThreads);
      for (int c = 0; c < nj; ++c) same += lab_s[c] == yn ? 1 : 0;
    }
    if (!in_range) continue;
    const int64_t npos = same - 1;
    const bool has_neg = neg_lse[n] != A(-INFINITY);
    coef[n] = valid && npos > 0 && has_neg
                  ? grad_loss[n] * w.load<A>(n / P, n % P) / A(npos)
                  : A(0);
  }
}

// Backward, step 2: grad_x [B, D, P] (channels [blockIdx.y * grad_channels, + grad_channels) of
// the block's rows) and, from the blockIdx.y == 0 blocks, grad_pair [B * P] when non-null.
template <typename T>
__global__ void __launch_bounds__(pixel_detail::kThreads)
pixel_grad_kernel(FeatView<T> x, LabelView y, WeightView pw, acc_t<T> inv_tau,
                  int64_t ignore_index, const acc_t<T>* coef, const acc_t<T>* neg_lse,
                  const acc_t<T>* pos_acc, int32_t grad_channels, T* grad_x,
                  acc_t<T>* grad_pair) {
  using A = acc_t<T>;
  using namespace pixel_detail;
  __shared__ A rows_s[kChan][kRows + 1];
  __shared__ A cols_s[kChan][kCols + 1];
  __shared__ A g_s[kRows][kCols + 1];  // G_ij + G_ji of the tile
  __shared__ int64_t row_off_s[kRows], col_off_s[kCols], lab_s[kCols];
  __shared__ A c_s[kCols], nu_s[kCols], ca_s[kCols], pw_s[kCols];
  __shared__ int flag_s;
  const int tid = int(threadIdx.x), r = tid / kLanes, l = tid % kLanes;
  const int64_t N = x.B * x.P, i0 = int64_t(blockIdx.x) * kRows, i = i0 + r;
  const bool in_range = i < N;
  const int64_t yi = in_range ? label_of(y, x.P, i) : ignore_index;
  const bool valid = yi != ignore_index;
  const A ci = valid ? coef[i] : A(0);
  const A nui = valid && neg_lse[i] != A(-INFINITY) ? neg_lse[i] : A(0);
  const A cai = valid ? ci * pos_acc[i] : A(0);
  const A ai = valid ? pw.load<A>(i / x.P, i % x.P) : A(1);
  const bool pair_grad = grad_pair != nullptr && blockIdx.y == 0;
  const int64_t dg0 = int64_t(blockIdx.y) * grad_channels;
  const int64_t dg1 = dg0 + grad_channels < x.D ? dg0 + grad_channels : x.D;
  if (tid < kRows) row_off_s[tid] = pixel_offset(x, i0 + tid);  // read after the next barrier

  A acc[kMaxGradStages * kGradPerStage];
FASTUDA_UNROLL
  for (int e = 0; e < kMaxGradStages * kGradPerStage; ++e) acc[e] = A(0);
  A ga = A(0);  // d loss / d a_i
  for (int64_t j0 = 0; j0 < N; j0 += kCols) {
    __syncthreads();  // the previous tile's reads of the shared arrays are done
    if (tid < kCols) {
      const int64_t j = j0 + tid;
      const int64_t yj = j < N ? label_of(y, x.P, j) : ignore_index;
      const bool vj = yj != ignore_index;
      const A cj = vj ? coef[j] : A(0);
      lab_s[tid] = yj;
      col_off_s[tid] = pixel_offset(x, j);
      c_s[tid] = cj;
      nu_s[tid] = vj && neg_lse[j] != A(-INFINITY) ? neg_lse[j] : A(0);
      ca_s[tid] = vj ? cj * pos_acc[j] : A(0);
      pw_s[tid] = vj ? pw.load<A>(j / x.P, j % x.P) : A(1);
    }
    if (tid == 0) flag_s = 0;
    __syncthreads();
    // bit k of pos / neg: column l + 8k is a positive / negative of the row; work only where a
    // coefficient is non-zero
    unsigned pos = 0, neg = 0;
    bool any = false;
FASTUDA_UNROLL
    for (int k = 0; k < kPerLane; ++k) {
      const int c = l + kLanes * k;
      const int64_t yj = lab_s[c];
      const bool pair = valid && yj != ignore_index && j0 + c != i;
      if (pair) (yj == yi ? pos : neg) |= 1u << k;
      any = any || (pair && (ci != A(0) || c_s[c] != A(0)));
    }
    if (!block_any(any, &flag_s)) continue;
    A dot[kPerLane];
    similarity_tile(x, row_off_s, col_off_s, rows_s, cols_s, r, l, dot);
FASTUDA_UNROLL
    for (int k = 0; k < kPerLane; ++k) {
      const int c = l + kLanes * k;
      const A z = dot[k] * inv_tau;
      A g = A(0);
      if (neg >> k & 1u) {
        g = cai * contrast_detail::exp_acc(z - nui) +
            ca_s[c] * contrast_detail::exp_acc(z - nu_s[c]);
      } else if (pos >> k & 1u) {
        const A cj = c_s[c], nuj = nu_s[c];
        g = -(ai * pw_s[c]) * (ci * sigmoid(nui - z) + cj * sigmoid(nuj - z));
        if (pair_grad) ga += pw_s[c] * (ci * softplus(nui - z) + cj * softplus(nuj - z));
      }
      g_s[r][c] = g;
    }
    // grad rows += G' F_tile over this block's channel slice, 4 channels per thread per stage
FASTUDA_UNROLL
    for (int st = 0; st < kMaxGradStages; ++st) {
      const int64_t d0 = dg0 + int64_t(st) * kChan;
      if (d0 >= dg1) break;  // uniform
      __syncthreads();  // g_s is complete; cols_s is free again
      stage_slice<kCols>(x, col_off_s, d0, cols_s);
      __syncthreads();
      for (int c = 0; c < kCols; ++c) {
        const A g = g_s[r][c];
FASTUDA_UNROLL
        for (int k = 0; k < kGradPerStage; ++k)
          acc[st * kGradPerStage + k] += g * cols_s[l + kLanes * k][c];
      }
    }
  }
  ga = row_sum(ga);
  if (!in_range) return;  // no barrier follows
  if (pair_grad && l == 0) grad_pair[i] = valid ? ga : A(0);
  const int64_t bi = i / x.P, pi = i % x.P;
FASTUDA_UNROLL
  for (int st = 0; st < kMaxGradStages; ++st) {
FASTUDA_UNROLL
    for (int k = 0; k < kGradPerStage; ++k) {
      const int64_t d = dg0 + int64_t(st) * kChan + l + kLanes * k;
      if (d < dg1) grad_x[(bi * x.D + d) * x.P + pi] = T(acc[st * kGradPerStage + k] * inv_tau);
    }
  }
}

// ---- launchers ------------------------------------------------------------------------------------
// x: L2-normalised features; w: anchor weights, pw: pair weights a (w_ij = a_i a_j), either
// absent (1). loss, neg_lse, pos_acc, n_pos: [B * P] acc_t, written at every pixel (0 at ignored).
template <typename T>
void pixel_contrast_forward_launch(const FeatView<T>& x, const LabelView& y, const WeightView& w,
                                   const WeightView& pw, double tau, int64_t ignore_index,
                                   acc_t<T>* loss, acc_t<T>* neg_lse, acc_t<T>* pos_acc,
                                   acc_t<T>* n_pos, void* stream) {
  using A = acc_t<T>;
  const int64_t N = x.B * x.P;
  if (N == 0) return;
  const auto kernel = &pixel_forward_kernel<T>;
  const unsigned blocks = unsigned((N + pixel_detail::kRows - 1) / pixel_detail::kRows);
  FASTUDA_LAUNCH(kernel, dim3(blocks), dim3(pixel_detail::kThreads), 0, stream, x, y, w, pw,
                 A(1.0 / tau), ignore_index, loss, neg_lse, pos_acc, n_pos);
}

// grad_loss, neg_lse, pos_acc: [B * P] contiguous acc_t; grad_x: [B, D, P] contiguous;
// grad_pair: [B * P] or null (no pair weights); coef: [B * P] acc_t scratch. grad_channels: a
// multiple of 32 in [32, kPixelGradChannelsMax].
template <typename T>
void pixel_contrast_backward_launch(const FeatView<T>& x, const LabelView& y,
                                    const WeightView& w, const WeightView& pw, double tau,
                                    int64_t ignore_index, const acc_t<T>* grad_loss,
                                    const acc_t<T>* neg_lse, const acc_t<T>* pos_acc,
                                    int32_t grad_channels, T* grad_x, acc_t<T>* grad_pair,
                                    acc_t<T>* coef, void* stream) {
  using A = acc_t<T>;
  const int64_t N = x.B * x.P;
  if (N == 0) return;
  const auto coef_kernel = &pixel_coef_kernel<A>;
  FASTUDA_LAUNCH(coef_kernel, dim3(grid_for(N, pixel_detail::kCoefThreads, 1 << 20)),
                 dim3(pixel_detail::kCoefThreads), 0, stream, y, w, x.B, x.P, ignore_index,
                 grad_loss, neg_lse, coef);
  const int64_t slices = (x.D + grad_channels - 1) / grad_channels;
  const unsigned blocks = unsigned((N + pixel_detail::kRows - 1) / pixel_detail::kRows);
  const auto grad = &pixel_grad_kernel<T>;
  FASTUDA_LAUNCH(grad, dim3(blocks, unsigned(slices < 1 ? 1 : slices)),
                 dim3(pixel_detail::kThreads), 0, stream, x, y, pw, A(1.0 / tau), ignore_index,
                 static_cast<const A*>(coef), neg_lse, pos_acc, grad_channels, grad_x,
                 grad_pair);
}

// ---- op bodies: checks, output allocation, parameter preparation, launch ------------------------
inline void check_pixel_map(const char* op, const char* name, const at::Tensor& t,
                            const at::Tensor& feats, const at::Tensor& labels) {
  TORCH_CHECK_VALUE(t.sizes() == labels.sizes(), "fastuda::", op, ": ", name, " shape ",
                    t.sizes(), " does not match labels shape ", labels.sizes());
  TORCH_CHECK_TYPE(t.is_floating_point(), "fastuda::", op, ": ", name,
                   " must be floating point, got ", t.scalar_type());
  TORCH_CHECK(t.device() == feats.device(), "fastuda::", op, ": ", name, " is on ", t.device(),
              " but feats on ", feats.device());
}

inline void check_pixel_contrast(const char* op, const at::Tensor& feats,
                                 const at::Tensor& labels,
                                 const std::optional<at::Tensor>& weights,
                                 const std::optional<at::Tensor>& pair_weights, double tau) {
  check_pixels(op, feats, labels, std::nullopt);
  if (weights.has_value() && weights->defined())
    check_pixel_map(op, "weights", *weights, feats, labels);
  if (pair_weights.has_value() && pair_weights->defined())
    check_pixel_map(op, "pair_weights", *pair_weights, feats, labels);
  TORCH_CHECK_VALUE(tau > 0, "fastuda::", op, ": tau must be > 0, got ", tau);
  TORCH_CHECK_VALUE(feats.size(0) * feats.size(2) < std::numeric_limits<int32_t>::max(),
                    "fastuda::", op, ": too many pixels for the CUDA kernels");
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pixel_contrast_forward_op(
    const at::Tensor& feats, const at::Tensor& labels, double tau, int64_t ignore_index,
    const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& pair_weights,
    void* stream) {
  const char* op = "pixel_contrast_forward";
  check_pixel_contrast(op, feats, labels, weights, pair_weights, tau);
  const int64_t B = feats.size(0), P = feats.size(2);
  const auto opts = feats.options().dtype(acc_dtype(feats));
  at::Tensor loss = at::empty({B, P}, opts), neg_lse = at::empty({B, P}, opts);
  at::Tensor pos_acc = at::empty({B, P}, opts), n_pos = at::empty({B, P}, opts);
  if (B * P == 0) return {loss, neg_lse, pos_acc, n_pos};
  const at::Tensor w = weights_for(weights, feats), a = weights_for(pair_weights, feats);
  dispatch_feats(feats, op, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    pixel_contrast_forward_launch<T>(feat_view<T>(feats), label_view(labels, op), weight_view(w),
                                     weight_view(a), tau, ignore_index,
                                     loss.mutable_data_ptr<A>(), neg_lse.mutable_data_ptr<A>(),
                                     pos_acc.mutable_data_ptr<A>(), n_pos.mutable_data_ptr<A>(),
                                     stream);
  });
  return {loss, neg_lse, pos_acc, n_pos};
}

// grad_channels: channels of the feature gradient per block (kPixelGradChannelsMax on a GPU;
// fewer in emulation, so small inputs still split D over several blocks).
inline std::tuple<at::Tensor, at::Tensor> pixel_contrast_backward_op(
    const at::Tensor& grad_loss, const at::Tensor& feats, const at::Tensor& labels,
    const at::Tensor& neg_lse, const at::Tensor& pos_acc, double tau, int64_t ignore_index,
    const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& pair_weights,
    int32_t grad_channels, void* stream) {
  const char* op = "pixel_contrast_backward";
  check_pixel_contrast(op, feats, labels, weights, pair_weights, tau);
  check_pixel_map(op, "grad_loss", grad_loss, feats, labels);
  check_pixel_map(op, "neg_lse", neg_lse, feats, labels);
  check_pixel_map(op, "pos_acc", pos_acc, feats, labels);
  TORCH_CHECK(grad_channels >= 32 && grad_channels <= kPixelGradChannelsMax &&
                  grad_channels % 32 == 0,
              "fastuda::", op, ": grad_channels must be a multiple of 32 in [32, ",
              kPixelGradChannelsMax, "], got ", grad_channels);
  const auto acc = acc_dtype(feats);
  const int64_t B = feats.size(0), D = feats.size(1), P = feats.size(2);
  const bool has_pair = pair_weights.has_value() && pair_weights->defined();
  at::Tensor grad_feats = at::empty({B, D, P}, feats.options());
  at::Tensor grad_pair = has_pair ? at::empty({B, P}, feats.options().dtype(acc)) : at::Tensor();
  if (B * P > 0) {
    const at::Tensor gl = grad_loss.to(acc).contiguous(), nu = neg_lse.to(acc).contiguous();
    const at::Tensor pa = pos_acc.to(acc).contiguous();
    const at::Tensor w = weights_for(weights, feats), a = weights_for(pair_weights, feats);
    at::Tensor coef = at::empty({B * P}, feats.options().dtype(acc));  // c_n: B * P scalars
    dispatch_feats(feats, op, [&](auto tag) {
      using T = decltype(tag);
      using A = acc_t<T>;
      pixel_contrast_backward_launch<T>(
          feat_view<T>(feats), label_view(labels, op), weight_view(w), weight_view(a), tau,
          ignore_index, gl.const_data_ptr<A>(), nu.const_data_ptr<A>(), pa.const_data_ptr<A>(),
          grad_channels, grad_feats.mutable_data_ptr<T>(),
          has_pair ? grad_pair.mutable_data_ptr<A>() : nullptr, coef.mutable_data_ptr<A>(),
          stream);
    });
  }
  // the gradient of the pair weights in their own dtype, as the CPU kernel returns it
  if (!has_pair) return {grad_feats, at::empty({0}, feats.options().dtype(at::kFloat))};
  return {grad_feats, grad_pair.to(pair_weights->scalar_type())};
}

}  // namespace fastuda::FASTUDA_KNS

namespace {

namespace fk = fastuda::FASTUDA_KNS;

// 32-channel gradient slices in emulation: a feature width over 32 already runs several grid.y
// blocks on the small test inputs.
constexpr int32_t kGradChannels = fk::kEmulated ? 32 : fk::kPixelGradChannelsMax;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pixel_forward_entry(
    const at::Tensor& feats, const at::Tensor& labels, double tau, int64_t ignore_index,
    const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& pair_weights) {
  const fk::OpLaunch launch("pixel_contrast_forward", feats, "feats");
  return launch.run([&] {
    return fk::pixel_contrast_forward_op(feats, labels, tau, ignore_index, weights, pair_weights,
                                         launch.stream());
  });
}

std::tuple<at::Tensor, at::Tensor> pixel_backward_entry(
    const at::Tensor& grad_loss, const at::Tensor& feats, const at::Tensor& labels,
    const at::Tensor& neg_lse, const at::Tensor& pos_acc, double tau, int64_t ignore_index,
    const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& pair_weights) {
  const fk::OpLaunch launch("pixel_contrast_backward", feats, "feats");
  return launch.run([&] {
    return fk::pixel_contrast_backward_op(grad_loss, feats, labels, neg_lse, pos_acc, tau,
                                          ignore_index, weights, pair_weights, kGradChannels,
                                          launch.stream());
  });
}

}  // namespace

FASTUDA_KERNEL_IMPL(m) {
  m.impl("pixel_contrast_forward", &pixel_forward_entry);
  m.impl("pixel_contrast_backward", &pixel_backward_entry);
}
