// The fastuda op schemas, listed once. csrc/ops.cpp (TORCH_LIBRARY fastuda, the real kernels) and
// csrc/emu/module.cpp (TORCH_LIBRARY fastuda_emu, the CUDA kernels compiled for the host) both
// expand this list, so the emulated ops cannot drift from the real ones. A new op adds one line.
//
// FASTUDA_OP_SCHEMAS(X) calls X(schema) for every op; a user defines X as m.def(schema).
//
// Layout conventions shared by every op (the Python wrappers build these views without copies):
//   feats   [B, D, P]  any strides: channels-first [B, D, H, W] viewed as [B, D, H*W], or a
//                      pixel-major [N, D] matrix viewed as [1, D, N]; fp32, fp16 or bf16.
//   labels  [B, P]     any integer dtype; values in [0, C) or ignore_index.
//   weights [B, P]     fp32 per-pixel weights, or None.
//   per-pixel outputs [B, P] fp32 (0 at pixels that do not count).
#pragma once

#define FASTUDA_OP_SCHEMAS(X)                                                                     \
  /* 1. per-class count, mean and m2 (diag [C, D] or full [C, D, D]) of one batch */             \
  X("class_stats(Tensor feats, Tensor labels, int num_classes, int ignore_index, "               \
    "Tensor? weights, bool full_cov) -> (Tensor count, Tensor mean, Tensor m2)")                 \
  /* 3. pixel-to-centroid contrast: per-pixel weighted loss and the logsumexp the backward    */ \
  /*    needs; keep_probs: also the softmax probs [B, C, P], so the backward need not recompute */ \
  /*    the logits (CPU kernel; the GPU kernels refuse it); else probs is empty                 */ \
  X("proto_contrast_forward(Tensor feats, Tensor labels, Tensor centroids, float tau, "          \
    "int ignore_index, Tensor? weights, bool keep_probs=False) "                                 \
    "-> (Tensor loss, Tensor lse, Tensor probs)")                                                \
  X("proto_contrast_backward(Tensor grad_loss, Tensor feats, Tensor labels, Tensor centroids, "  \
    "Tensor lse, float tau, int ignore_index, Tensor? weights, bool centroids_grad, "            \
    "Tensor? probs=None) -> (Tensor grad_feats, Tensor grad_centroids)")                         \
  /* 4. distributional upper bound (covariance [C, D] diagonal or [C, D, D] full) */             \
  X("dist_contrast_forward(Tensor feats, Tensor labels, Tensor centroids, Tensor covariance, "   \
    "float tau, float lam, int ignore_index, Tensor? weights, bool keep_probs=False) "           \
    "-> (Tensor loss, Tensor lse, Tensor probs)")                                                \
  X("dist_contrast_backward(Tensor grad_loss, Tensor feats, Tensor labels, Tensor centroids, "   \
    "Tensor covariance, Tensor lse, float tau, float lam, int ignore_index, Tensor? weights, "   \
    "bool stats_grad, Tensor? probs=None) "                                                      \
    "-> (Tensor grad_feats, Tensor grad_centroids, Tensor grad_covariance)")                     \
  /* 5. memory-bank contrast (bank [C, M, D], bank_len [C]) */                                   \
  X("bank_contrast_forward(Tensor feats, Tensor labels, Tensor bank, Tensor bank_len, "          \
    "float tau, int ignore_index) -> (Tensor loss, Tensor neg_lse)")                             \
  X("bank_contrast_backward(Tensor grad_loss, Tensor feats, Tensor labels, Tensor bank, "        \
    "Tensor bank_len, Tensor neg_lse, float tau, int ignore_index) -> Tensor grad_feats")        \
  /* 6. pixel-to-pixel supervised contrast on L2-normalised feats; pair weight a_i * a_j */      \
  X("pixel_contrast_forward(Tensor feats, Tensor labels, float tau, int ignore_index, "          \
    "Tensor? weights, Tensor? pair_weights) "                                                    \
    "-> (Tensor loss, Tensor neg_lse, Tensor pos_acc, Tensor n_pos)")                            \
  X("pixel_contrast_backward(Tensor grad_loss, Tensor feats, Tensor labels, Tensor neg_lse, "    \
    "Tensor pos_acc, float tau, int ignore_index, Tensor? weights, Tensor? pair_weights) "       \
    "-> (Tensor grad_feats, Tensor grad_pair_weights)")                                          \
  /* 7. majority-vote label downscaling of [B, H, W] labels */                                   \
  X("downscale_labels(Tensor labels, int factor, int num_classes, float min_ratio, "             \
    "int ignore_index) -> Tensor")
