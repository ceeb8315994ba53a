// Per-class statistics (ops.md section 1): count, mean and m2 (diagonal or full) of one batch.
//
// Diagonal path, two passes over the features (m2 from centred values, never sum(x^2) - n mean^2):
//   class_sums_kernel<centred=false>  per-block partial sums of w*x and w per class
//   class_stats_finalize_kernel       fixed-order sum of the partials -> count, mean
//   class_sums_kernel<centred=true>   per-block partial sums of w*(x - mean)^2
//   class_stats_finalize_kernel       -> m2 [C, D]
// A block owns a 32-channel slice and a strided set of pixel tiles. It stages a tile [32 ch x TP px]
// in shared memory with coalesced loads (consecutive threads read consecutive pixels of a channel),
// then thread (channel dl, sub-lane s) adds the tile's pixels s, s+S, ... into its own accumulator
// acc[s][class][dl]. Every accumulator has exactly one writer and every sum runs in a fixed order,
// so the results are bitwise reproducible (no floating-point atomics anywhere).
//
// Full path: the same first pass for count and mean, then a stable counting sort of the valid
// pixels by class (class_hist / class_offsets / class_scatter, labels only), then one tiled GEMM
// per (class, 32x32 tile of the upper triangle): m2_c = sum_i w_i (x_i - mu_c)(x_i - mu_c)^T, N*D*D
// multiply-adds in total, written straight to the output (each entry has one writer).
//
// The class_stats family's CUDA side in one file: kernels, launch plan, op bodies
// and registration. nvcc builds it for the GPU, g++ for the host SIMT emulator (cuda/backend.h
// says what differs).
#include <limits>
#include <tuple>

#include "cuda/backend.h"

namespace fastuda::FASTUDA_KNS {

// ---- launch plan --------------------------------------------------------------------------------
struct ClassStatsWorkspace {
  void *part, *part_count, *tile_hist, *class_start, *order;
};

struct ClassStatsPlan {
  bool full_cov;
  int32_t tile_pixels, sub_lanes, class_chunk, sort_tile;
  int64_t class_chunks, d_tiles, groups, sort_tiles;
  size_t smem_sums, smem_centred;
  size_t part_bytes, part_count_bytes, hist_bytes, start_bytes, order_bytes;

  static size_t align16(size_t n) { return (n + 15) / 16 * 16; }
  size_t workspace_bytes() const {
    return align16(part_bytes) + align16(part_count_bytes) + align16(hist_bytes) +
           align16(start_bytes) + align16(order_bytes);
  }
  ClassStatsWorkspace carve(void* base) const {
    char* p = static_cast<char*>(base);
    ClassStatsWorkspace ws{};
    ws.part = p;
    p += align16(part_bytes);
    ws.part_count = p;
    p += align16(part_count_bytes);
    ws.tile_hist = p;
    p += align16(hist_bytes);
    ws.class_start = p;
    p += align16(start_bytes);
    ws.order = p;
    return ws;
  }
};

// acc_bytes: 4 (fp32 accumulation) or 8 (fp64 input). Requires B * P >= 1 and D >= 1.
inline ClassStatsPlan plan_class_stats(int64_t B, int64_t D, int64_t P, int64_t C,
                                       size_t acc_bytes, bool full_cov, const Tuning& tuning) {
  constexpr int64_t TD = 32;
  ClassStatsPlan plan{};
  plan.full_cov = full_cov;
  const int64_t TP = tuning.tile_pixels;
  plan.tile_pixels = int32_t(TP);
  const size_t fixed = acc_bytes * size_t(TD * (TP + 1) + TP) + 4 * size_t(TP);
  // per block: acc [S][CC][TD] + cnt [S][CC] (+ mean [CC][TD] in the centred pass)
  auto smem = [&](int64_t S, int64_t CC, bool centred) {
    return fixed + acc_bytes * size_t(S * CC * TD + S * CC + (centred ? CC * TD : 0));
  };
  int64_t S = 8, CC = C;
  while (S > 1 && smem(S, CC, true) > kSharedBudget) S /= 2;
  if (smem(S, CC, true) > kSharedBudget) {  // many classes: split them over grid.z
    CC = int64_t((kSharedBudget - fixed) / (acc_bytes * size_t(2 * TD + 1)));
    if (CC < 1) CC = 1;
  }
  plan.sub_lanes = int32_t(S);
  plan.class_chunk = int32_t(CC);
  plan.class_chunks = (C + CC - 1) / CC;
  plan.smem_sums = smem(S, CC, false);
  plan.smem_centred = smem(S, CC, true);
  plan.d_tiles = (D + TD - 1) / TD;
  const int64_t tiles = B * ((P + TP - 1) / TP);
  int64_t groups = tuning.target_blocks / (plan.d_tiles * plan.class_chunks);
  // the partials [G, C, D] stay below the size of the features (G <= N / (2C))
  const int64_t cap = (B * P) / (2 * C);
  if (groups > cap) groups = cap;
  if (groups > tiles) groups = tiles;
  plan.groups = groups < 1 ? 1 : groups;
  plan.part_bytes = acc_bytes * size_t(plan.groups * C * D);
  plan.part_count_bytes = acc_bytes * size_t(plan.groups * C);
  plan.sort_tile = tuning.sort_tile;
  plan.sort_tiles = full_cov ? (B * P + tuning.sort_tile - 1) / tuning.sort_tile : 0;
  plan.hist_bytes = full_cov ? 4 * size_t(plan.sort_tiles * C) : 0;
  plan.start_bytes = full_cov ? 4 * size_t(C + 1) : 0;
  plan.order_bytes = full_cov ? 4 * size_t(B * P) : 0;
  return plan;
}

namespace class_stats_detail {
constexpr int kChannels = 32;  // channel slice of a block (one warp wide)
}

template <typename T, bool kCentred>
__global__ void __launch_bounds__(256)
class_sums_kernel(FeatView<T> x, LabelView y, WeightView w, int64_t C, int64_t ignore_index,
                  const acc_t<T>* mean, acc_t<T>* part, acc_t<T>* part_count, int32_t tile_pixels,
                  int32_t sub_lanes, int32_t class_chunk) {
  using A = acc_t<T>;
  constexpr int TD = class_stats_detail::kChannels;
  const int TP = tile_pixels, S = sub_lanes, CC = class_chunk;
  FASTUDA_DYNAMIC_SHARED(A, smem);
  A* xs = smem;                  // [TD][TP + 1] (padded: conflict-free column reads)
  A* ws = xs + TD * (TP + 1);    // [TP] pixel weights (0: pixel not counted here)
  A* acc = ws + TP;              // [S][CC][TD]
  A* cnt = acc + S * CC * TD;    // [S][CC]
  A* mean_s = cnt + S * CC;      // [CC][TD] (centred pass)
  int32_t* ys = reinterpret_cast<int32_t*>(mean_s + (kCentred ? CC * TD : 0));  // [TP]

  const int t = threadIdx.x, nthreads = blockDim.x;
  const int64_t d0 = int64_t(blockIdx.y) * TD, c0 = int64_t(blockIdx.z) * CC;
  const int ncls = int(C - c0 < CC ? C - c0 : CC);
  const bool report = !kCentred && blockIdx.y == 0 && blockIdx.z == 0;
  const bool counts_here = blockIdx.y == 0;
  for (int e = t; e < S * CC * TD; e += nthreads) acc[e] = A(0);
  for (int e = t; e < S * CC; e += nthreads) cnt[e] = A(0);
  if (kCentred) {
    for (int e = t; e < CC * TD; e += nthreads) {
      const int c = e / TD, dl = e % TD;
      mean_s[e] = (c < ncls && d0 + dl < x.D) ? mean[(c0 + c) * x.D + d0 + dl] : A(0);
    }
  }
  const int64_t tiles_per_image = (x.P + TP - 1) / TP, tiles = x.B * tiles_per_image;
  const int dl = t % TD, s = t / TD;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t b = tile / tiles_per_image, p0 = (tile % tiles_per_image) * TP;
    __syncthreads();  // the previous tile is consumed (and the accumulators are initialised)
    for (int pl = t; pl < TP; pl += nthreads) {
      const int64_t p = p0 + pl;
      int32_t cls = -1;
      A wt = A(0);
      if (p < x.P) {
        const int64_t v = y.load(b, p);
        if (v != ignore_index) {
          if (v < 0 || v >= C) {
            if (report) report_bad_label(v, C, ignore_index);
          } else if (v >= c0 && v < c0 + ncls) {
            cls = int32_t(v - c0);
            wt = w.template load<A>(b, p);
          }
        }
      }
      ys[pl] = cls;
      ws[pl] = wt;
    }
    __syncthreads();
    for (int e = t; e < TD * TP; e += nthreads) {
      const int el = e / TP, pl = e % TP;
      A v = A(0);
      if (d0 + el < x.D && ys[pl] >= 0) v = A(*x.at(b, d0 + el, p0 + pl));
      xs[el * (TP + 1) + pl] = v;
    }
    __syncthreads();
    for (int pl = s; pl < TP; pl += S) {
      const int c = ys[pl];
      if (c < 0) continue;
      const A wt = ws[pl];
      A v = xs[dl * (TP + 1) + pl];
      if (kCentred) {
        v -= mean_s[c * TD + dl];
        acc[(s * CC + c) * TD + dl] += wt * v * v;
      } else {
        acc[(s * CC + c) * TD + dl] += wt * v;
        if (counts_here && dl == 0) cnt[s * CC + c] += wt;
      }
    }
  }
  __syncthreads();
  const int64_t g = blockIdx.x;
  for (int e = t; e < CC * TD; e += nthreads) {
    const int c = e / TD, el = e % TD;
    if (c >= ncls || d0 + el >= x.D) continue;
    A sum = A(0);
    for (int k = 0; k < S; ++k) sum += acc[(k * CC + c) * TD + el];
    part[(g * C + c0 + c) * x.D + d0 + el] = sum;
  }
  if (!kCentred && counts_here) {
    for (int c = t; c < ncls; c += nthreads) {
      A sum = A(0);
      for (int k = 0; k < S; ++k) sum += cnt[k * CC + c];
      part_count[g * C + c0 + c] = sum;
    }
  }
}

// Fixed-order (fp64) sum of the G block partials. kMean: count[C] and mean = sum / count (0 for an
// empty class); else the sums themselves (m2).
template <typename A, bool kMean>
__global__ void __launch_bounds__(256)
class_stats_finalize_kernel(const A* part, const A* part_count, int64_t G, int64_t C, int64_t D,
                            A* count, A* out) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t e = first; e < C * D; e += stride) {
    const int64_t c = e / D;
    double sum = 0.0;
    for (int64_t g = 0; g < G; ++g) sum += double(part[g * C * D + e]);
    if (kMean) {
      double n = 0.0;
      for (int64_t g = 0; g < G; ++g) n += double(part_count[g * C + c]);
      out[e] = n > 0.0 ? A(sum / n) : A(0);
    } else {
      out[e] = A(sum);
    }
  }
  if (kMean) {
    for (int64_t c = first; c < C; c += stride) {
      double n = 0.0;
      for (int64_t g = 0; g < G; ++g) n += double(part_count[g * C + c]);
      count[c] = A(n);
    }
  }
}

// ---- stable counting sort of the valid pixels by class (labels only) -----------------------------
FASTUDA_DEVICE_INLINE bool counted_pixel(const LabelView& y, const WeightView& w, int64_t b,
                                         int64_t p, int64_t C, int64_t ignore_index,
                                         int64_t* cls) {
  const int64_t v = y.load(b, p);
  if (v == ignore_index || v < 0 || v >= C) return false;  // bad labels were reported in pass 1
  if (w.present() && w.template load<double>(b, p) == 0.0) return false;  // contributes nothing
  *cls = v;
  return true;
}

// Per tile of `tile` flattened pixels: how many counted pixels each class has.
__global__ void __launch_bounds__(256)
class_hist_kernel(LabelView y, WeightView w, int64_t B, int64_t P, int64_t C,
                  int64_t ignore_index, int32_t tile, int64_t tiles, int32_t* tile_hist) {
  FASTUDA_DYNAMIC_SHARED(int32_t, hist);  // [C]
  const int64_t N = B * P;
  for (int64_t k = blockIdx.x; k < tiles; k += gridDim.x) {
    __syncthreads();
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) hist[c] = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < tile; i += blockDim.x) {
      const int64_t n = k * tile + i;
      int64_t cls;
      if (n < N && counted_pixel(y, w, n / P, n % P, C, ignore_index, &cls))
        atomicAdd(&hist[cls], 1);  // integer: order-independent
    }
    __syncthreads();
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) tile_hist[k * C + c] = hist[c];
  }
}

// tile_hist [tiles][C] counts -> the position of each (tile, class) run in the sorted order;
// class_start [C + 1]. One block.
__global__ void __launch_bounds__(256)
class_offsets_kernel(int32_t* tile_hist, int64_t tiles, int64_t C, int32_t* class_start) {
  FASTUDA_DYNAMIC_SHARED(int32_t, total);  // [C]
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    int32_t run = 0;
    for (int64_t k = 0; k < tiles; ++k) {
      const int32_t h = tile_hist[k * C + c];
      tile_hist[k * C + c] = run;
      run += h;
    }
    total[c] = run;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t start = 0;
    for (int64_t c = 0; c < C; ++c) {
      class_start[c] = start;
      start += total[c];
    }
    class_start[C] = start;
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const int32_t start = class_start[c];
    for (int64_t k = 0; k < tiles; ++k) tile_hist[k * C + c] += start;
  }
}

// One warp per tile, 32 pixels at a time: lanes with the same class find each other with
// __match_any_sync and take consecutive slots in pixel order, so the sort is stable.
__global__ void __launch_bounds__(128)
class_scatter_kernel(LabelView y, WeightView w, int64_t B, int64_t P, int64_t C,
                     int64_t ignore_index, int32_t tile, int64_t tiles, const int32_t* tile_start,
                     int32_t* order) {
  FASTUDA_DYNAMIC_SHARED(int32_t, cursor_all);  // [warps][C]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  int32_t* cursor = cursor_all + warp * C;
  const int64_t N = B * P;
  for (int64_t k = int64_t(blockIdx.x) * warps + warp; k < tiles; k += int64_t(gridDim.x) * warps) {
    for (int64_t c = lane; c < C; c += 32) cursor[c] = tile_start[k * C + c];
    __syncwarp();
    for (int32_t i0 = 0; i0 < tile; i0 += 32) {
      const int64_t n = k * tile + i0 + lane;
      int64_t cls = -1;
      if (!(n < N && counted_pixel(y, w, n / P, n % P, C, ignore_index, &cls))) cls = -1;
      const unsigned peers = __match_any_sync(0xffffffffu, int32_t(cls));
      if (cls >= 0) {
        const unsigned lower = peers & ((1u << lane) - 1u);
        order[cursor[cls] + __popc(lower)] = int32_t(n);
      }
      __syncwarp();
      if (cls >= 0 && lane == __ffs(int(peers)) - 1) cursor[cls] += __popc(peers);
      __syncwarp();
    }
  }
}

// m2[c] tile (i, j) (and its mirror (j, i)) over the class's sorted pixels: a 32x32 output tile
// per block, 2x2 outputs per thread, 32 pixels per shared-memory stage.
template <typename T>
__global__ void __launch_bounds__(256)
class_cov_kernel(FeatView<T> x, WeightView w, const int32_t* order, const int32_t* class_start,
                 const acc_t<T>* mean, int32_t d_tiles, acc_t<T>* m2) {
  using A = acc_t<T>;
  __shared__ A As[32][33];
  __shared__ A Bs[32][33];
  __shared__ int64_t koff[32];
  __shared__ A kw[32];
  int32_t q = int32_t(blockIdx.x), i = 0;  // blockIdx.x -> (i <= j) in the upper triangle
  while (q >= d_tiles - i) {
    q -= d_tiles - i;
    ++i;
  }
  const int32_t j = i + q;
  const int64_t c = blockIdx.y, D = x.D;
  const int t = threadIdx.x, tx = t % 16, ty = t / 16;
  const int32_t start = class_start[c], end = class_start[c + 1];
  A acc[2][2] = {{A(0), A(0)}, {A(0), A(0)}};
  for (int32_t k0 = start; k0 < end; k0 += 32) {
    __syncthreads();
    if (t < 32) {
      const int64_t k = k0 + t;
      int64_t off = -1;
      A wt = A(0);
      if (k < end) {
        const int64_t n = order[k], b = n / x.P, p = n % x.P;
        off = b * x.stride_b + p * x.stride_p;
        wt = w.template load<A>(b, p);
      }
      koff[t] = off;
      kw[t] = wt;
    }
    __syncthreads();
    for (int e = t; e < 32 * 32; e += blockDim.x) {
      const int kk = e % 32, dd = e / 32;  // consecutive threads: consecutive (sorted) pixels
      const int64_t di = int64_t(i) * 32 + dd, dj = int64_t(j) * 32 + dd, off = koff[kk];
      A a = A(0), bv = A(0);
      if (off >= 0 && di < D) a = (A(x.ptr[off + di * x.stride_d]) - mean[c * D + di]) * kw[kk];
      if (off >= 0 && dj < D) bv = A(x.ptr[off + dj * x.stride_d]) - mean[c * D + dj];
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
  for (int r = 0; r < 2; ++r)
    for (int s = 0; s < 2; ++s) {
      const int64_t row = int64_t(i) * 32 + ty + 16 * r, col = int64_t(j) * 32 + tx + 16 * s;
      if (row >= D || col >= D) continue;
      m2[(c * D + row) * D + col] = acc[r][s];
      if (i != j) m2[(c * D + col) * D + row] = acc[r][s];
    }
}

// count [C], mean [C, D], m2 [C, D] or [C, D, D] (acc_t<T>), workspace of plan.workspace_bytes().
template <typename T>
void class_stats_launch(const FeatView<T>& x, const LabelView& y, const WeightView& w, int64_t C,
                        int64_t ignore_index, const ClassStatsPlan& plan, acc_t<T>* count,
                        acc_t<T>* mean, acc_t<T>* m2, void* workspace, void* stream) {
  using A = acc_t<T>;
  const ClassStatsWorkspace ws = plan.carve(workspace);
  A* part = static_cast<A*>(ws.part);
  A* part_count = static_cast<A*>(ws.part_count);
  const dim3 grid(unsigned(plan.groups), unsigned(plan.d_tiles), unsigned(plan.class_chunks));
  const dim3 block(unsigned(class_stats_detail::kChannels * plan.sub_lanes));
  const unsigned fin_blocks = unsigned((C * x.D + 255) / 256 < 1024 ? (C * x.D + 255) / 256 : 1024);
  const auto sums = &class_sums_kernel<T, false>;
  const auto centred_sums = &class_sums_kernel<T, true>;
  const auto finalize_mean = &class_stats_finalize_kernel<A, true>;
  const auto finalize_sum = &class_stats_finalize_kernel<A, false>;
  const auto cov = &class_cov_kernel<T>;
  FASTUDA_LAUNCH(sums, grid, block, plan.smem_sums, stream, x, y, w, C,
                 ignore_index, static_cast<const A*>(nullptr), part, part_count, plan.tile_pixels,
                 plan.sub_lanes, plan.class_chunk);
  FASTUDA_LAUNCH(finalize_mean, dim3(fin_blocks > 0 ? fin_blocks : 1),
                 dim3(256), 0, stream, static_cast<const A*>(part),
                 static_cast<const A*>(part_count), plan.groups, C, x.D, count, mean);
  if (!plan.full_cov) {
    FASTUDA_LAUNCH(centred_sums, grid, block, plan.smem_centred, stream, x, y, w,
                   C, ignore_index, static_cast<const A*>(mean), part, part_count,
                   plan.tile_pixels, plan.sub_lanes, plan.class_chunk);
    FASTUDA_LAUNCH(finalize_sum, dim3(fin_blocks > 0 ? fin_blocks : 1),
                   dim3(256), 0, stream, static_cast<const A*>(part),
                   static_cast<const A*>(part_count), plan.groups, C, x.D, count, m2);
    return;
  }
  int32_t* tile_hist = static_cast<int32_t*>(ws.tile_hist);
  int32_t* class_start = static_cast<int32_t*>(ws.class_start);
  int32_t* order = static_cast<int32_t*>(ws.order);
  const unsigned sort_blocks = unsigned(plan.sort_tiles < 4096 ? plan.sort_tiles : 4096);
  FASTUDA_LAUNCH(class_hist_kernel, dim3(sort_blocks), dim3(256), size_t(C) * 4, stream, y, w,
                 x.B, x.P, C, ignore_index, plan.sort_tile, plan.sort_tiles, tile_hist);
  FASTUDA_LAUNCH(class_offsets_kernel, dim3(1), dim3(256), size_t(C) * 4, stream, tile_hist,
                 plan.sort_tiles, C, class_start);
  const unsigned scatter_blocks = unsigned((plan.sort_tiles + 3) / 4 < 4096
                                               ? (plan.sort_tiles + 3) / 4 : 4096);
  FASTUDA_LAUNCH(class_scatter_kernel, dim3(scatter_blocks), dim3(128), size_t(C) * 4 * 4, stream,
                 y, w, x.B, x.P, C, ignore_index, plan.sort_tile, plan.sort_tiles,
                 static_cast<const int32_t*>(tile_hist), order);
  const int32_t dt = int32_t((x.D + 31) / 32);
  FASTUDA_LAUNCH(cov, dim3(unsigned(dt * (dt + 1) / 2), unsigned(C)),
                 dim3(256), 0, stream, x, w, static_cast<const int32_t*>(order),
                 static_cast<const int32_t*>(class_start), static_cast<const A*>(mean), dt, m2);
}

// ---- op bodies: checks, output allocation, parameter preparation, launch ------------------------
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> class_stats_op(
    const at::Tensor& feats, const at::Tensor& labels, int64_t num_classes, int64_t ignore_index,
    const std::optional<at::Tensor>& weights, bool full_cov, const Tuning& tuning, void* stream) {
  check_pixels("class_stats", feats, labels, weights);
  TORCH_CHECK_VALUE(num_classes >= 1, "fastuda::class_stats: num_classes must be >= 1, got ",
                    num_classes);
  const int64_t B = feats.size(0), D = feats.size(1), P = feats.size(2), C = num_classes;
  TORCH_CHECK_VALUE(D >= 1, "fastuda::class_stats: feats have no channels (shape ", feats.sizes(),
                    ")");
  TORCH_CHECK_VALUE(B * P < std::numeric_limits<int32_t>::max(), "fastuda::class_stats: ", B * P,
                    " pixels exceed the 2^31 supported by the CUDA kernels");
  const auto opts = feats.options().dtype(acc_dtype(feats));
  at::Tensor count = at::empty({C}, opts);
  at::Tensor mean = at::empty({C, D}, opts);
  at::Tensor m2 = full_cov ? at::empty({C, D, D}, opts) : at::empty({C, D}, opts);
  if (B * P == 0) {
    count.zero_();
    mean.zero_();
    m2.zero_();
    return {count, mean, m2};
  }
  const size_t acc_bytes = feats.scalar_type() == at::kDouble ? 8 : 4;
  const ClassStatsPlan plan = plan_class_stats(B, D, P, C, acc_bytes, full_cov, tuning);
  const at::Tensor w = weights_for(weights, feats);
  at::Tensor workspace =
      at::empty({int64_t(plan.workspace_bytes())}, feats.options().dtype(at::kByte));
  dispatch_feats(feats, "class_stats", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    class_stats_launch<T>(feat_view<T>(feats), label_view(labels, "class_stats"),
                          weight_view(w), C, ignore_index, plan,
                          count.mutable_data_ptr<A>(), mean.mutable_data_ptr<A>(),
                          m2.mutable_data_ptr<A>(), workspace.mutable_data_ptr(), stream);
  });
  return {count, mean, m2};
}

}  // namespace fastuda::FASTUDA_KNS

namespace {

namespace fk = fastuda::FASTUDA_KNS;

std::tuple<at::Tensor, at::Tensor, at::Tensor> class_stats_entry(
    const at::Tensor& feats, const at::Tensor& labels, int64_t num_classes, int64_t ignore_index,
    const std::optional<at::Tensor>& weights, bool full_cov) {
  const fk::OpLaunch launch("class_stats", feats, "feats");
  return launch.run([&] {
    return fk::class_stats_op(feats, labels, num_classes, ignore_index, weights, full_cov,
                              launch.tuning(), launch.stream());
  });
}

}  // namespace

FASTUDA_KERNEL_IMPL(m) {
  m.impl("class_stats", &class_stats_entry);
}
