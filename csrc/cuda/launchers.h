// Host-callable launchers of the CUDA kernels, declared without any CUDA or ATen type. Defined in
// csrc/cuda/*_kernels.cuh, compiled once by nvcc (csrc/cuda/*.cu, namespace fastuda::cuda) and once
// by g++ against the host SIMT layer (csrc/emu/*.cpp, namespace fastuda::emu). `stream` is a
// cudaStream_t (ignored in emulation). Launchers only enqueue work: they never synchronise.
#pragma once

#include <cstdint>

#include "cuda/views.h"

namespace fastuda::FASTUDA_KNS {

// labels [B, H, W] -> out [B, H/factor, W/factor] (contiguous, same dtype as labels)
void downscale_labels_launch(const void* labels, LabelKind kind, int64_t stride_b,
                             int64_t stride_y, int64_t stride_x, int64_t B, int64_t H, int64_t W,
                             int32_t factor, int64_t num_classes, float min_ratio,
                             int64_t ignore_index, void* out, void* stream);

// ---- class_stats ---------------------------------------------------------------------------------
// Launch-shape knobs: a GPU wants many blocks and wide tiles; the emulation tests want several
// blocks, several tiles per block and partial tiles on small inputs.
struct Tuning {
  int64_t target_blocks;  // blocks a reduction kernel aims for (e.g. 4 x SMs)
  int32_t tile_pixels;    // pixels a reduction block stages per step (multiple of 32)
  int32_t sort_tile;      // pixels per counting-sort tile (multiple of 32)
};

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

// Shared-memory budget of a reduction block: CUDA's default 48 KiB per block, minus headroom.
inline constexpr size_t kSharedBudget = 46 * 1024;

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

// count [C], mean [C, D], m2 [C, D] or [C, D, D] (acc_t<T>), workspace of plan.workspace_bytes().
template <typename T>
void class_stats_launch(const FeatView<T>& x, const LabelView& y, const WeightView& w, int64_t C,
                        int64_t ignore_index, const ClassStatsPlan& plan, acc_t<T>* count,
                        acc_t<T>* mean, acc_t<T>* m2, void* workspace, void* stream);

// ---- proto_contrast / dist_contrast -------------------------------------------------------------
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

// mu = centroids / tau [C, D]; sig = lam / (2 tau^2) * Sigma ([C, D] diag, [C, D, D] full and
// symmetric; unused for kNone). loss, lse: [B * P].
template <typename T>
void contrast_forward_launch(const FeatView<T>& x, const LabelView& y, const WeightView& w,
                             const acc_t<T>* mu, const acc_t<T>* sig, CovKind cov, int64_t C,
                             int64_t ignore_index, acc_t<T>* loss, acc_t<T>* lse, void* stream);

// grad_x [B, D, P] contiguous; grad_mu [C, D] and grad_sig (shape of sig) are written when
// grad_mu != nullptr, scaled by mu_scale (1/tau) and sig_scale (lam / (2 tau^2)).
template <typename T>
void contrast_backward_launch(const FeatView<T>& x, const LabelView& y, const WeightView& w,
                              const acc_t<T>* mu, const acc_t<T>* sig, CovKind cov, int64_t C,
                              int64_t ignore_index, const acc_t<T>* grad_loss,
                              const acc_t<T>* lse, const ContrastBackwardPlan& plan, T* grad_x,
                              acc_t<T>* grad_mu, acc_t<T>* grad_sig, double mu_scale,
                              double sig_scale, void* workspace, void* stream);

// ---- bank_contrast -------------------------------------------------------------------------------
// bank = bank / tau [C, M, D] (acc_t), lens = bank_len as int64 [C]; bbar: [C, D] scratch.
template <typename T>
void bank_contrast_forward_launch(const FeatView<T>& x, const LabelView& y,
                                  const acc_t<T>* bank, const int64_t* lens, int64_t C,
                                  int64_t M, int64_t ignore_index, acc_t<T>* bbar,
                                  acc_t<T>* loss, acc_t<T>* neg_lse, void* stream);

// workspace: (C * D + (M + C) * B * P) acc_t elements.
template <typename T>
void bank_contrast_backward_launch(const FeatView<T>& x, const LabelView& y,
                                   const acc_t<T>* bank, const int64_t* lens, int64_t C,
                                   int64_t M, int64_t ignore_index, const acc_t<T>* grad_loss,
                                   const acc_t<T>* neg_lse, T* grad_x, void* workspace,
                                   void* stream);


// ---- pixel_contrast ------------------------------------------------------------------------------
// Channels of the feature gradient one block of the backward owns (grid.y splits D into slices of
// at most this many; each slice recomputes the similarity tiles, the accumulators stay in
// registers). A multiple of 32.
inline constexpr int32_t kPixelGradChannelsMax = 128;

// x: L2-normalised features; w: anchor weights, pw: pair weights a (w_ij = a_i a_j), either
// absent (1). loss, neg_lse, pos_acc, n_pos: [B * P] acc_t, written at every pixel (0 at ignored).
template <typename T>
void pixel_contrast_forward_launch(const FeatView<T>& x, const LabelView& y, const WeightView& w,
                                   const WeightView& pw, double tau, int64_t ignore_index,
                                   acc_t<T>* loss, acc_t<T>* neg_lse, acc_t<T>* pos_acc,
                                   acc_t<T>* n_pos, void* stream);

// grad_loss, neg_lse, pos_acc: [B * P] contiguous acc_t; grad_x: [B, D, P] contiguous;
// grad_pair: [B * P] or null (no pair weights); coef: [B * P] acc_t scratch. grad_channels: a
// multiple of 32 in [32, kPixelGradChannelsMax].
template <typename T>
void pixel_contrast_backward_launch(const FeatView<T>& x, const LabelView& y,
                                    const WeightView& w, const WeightView& pw, double tau,
                                    int64_t ignore_index, const acc_t<T>* grad_loss,
                                    const acc_t<T>* neg_lse, const acc_t<T>* pos_acc,
                                    int32_t grad_channels, T* grad_x, acc_t<T>* grad_pair,
                                    acc_t<T>* coef, void* stream);

}  // namespace fastuda::FASTUDA_KNS
