// The fastuda op schemas, declared once. Backends register implementations in their own files:
// csrc/cpu/*.cpp (CPU), csrc/cuda/*.cpp (CUDA); autograd and fake (meta) implementations are
// registered from Python in fastuda/ops/.
//
// Layout conventions shared by every op (the Python wrappers build these views without copies):
//   feats   [B, D, P]  any strides: channels-first [B, D, H, W] viewed as [B, D, H*W], or a
//                      pixel-major [N, D] matrix viewed as [1, D, N]; fp32, fp16 or bf16.
//   labels  [B, P]     any integer dtype; values in [0, C) or ignore_index.
//   weights [B, P]     fp32 per-pixel weights, or None.
//   per-pixel outputs [B, P] fp32 (0 at pixels that do not count).
#include <Python.h>
#include <torch/library.h>

// Importing fastuda._C must work as a Python module even though everything is registered through
// TORCH_LIBRARY; an empty module definition is enough.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}

TORCH_LIBRARY(fastuda, m) {
  // 1. per-class count, mean and m2 (diag [C, D] or full [C, D, D]) of one batch
  m.def("class_stats(Tensor feats, Tensor labels, int num_classes, int ignore_index, "
        "Tensor? weights, bool full_cov) -> (Tensor count, Tensor mean, Tensor m2)");
  // 3. pixel-to-centroid contrast: per-pixel weighted loss and the logsumexp the backward reuses
  m.def("proto_contrast_forward(Tensor feats, Tensor labels, Tensor centroids, float tau, "
        "int ignore_index, Tensor? weights) -> (Tensor loss, Tensor lse)");
  m.def("proto_contrast_backward(Tensor grad_loss, Tensor feats, Tensor labels, Tensor centroids, "
        "Tensor lse, float tau, int ignore_index, Tensor? weights, bool centroids_grad) "
        "-> (Tensor grad_feats, Tensor grad_centroids)");
  // 4. distributional upper bound (covariance [C, D] diagonal or [C, D, D] full)
  m.def("dist_contrast_forward(Tensor feats, Tensor labels, Tensor centroids, Tensor covariance, "
        "float tau, float lam, int ignore_index, Tensor? weights) -> (Tensor loss, Tensor lse)");
  m.def("dist_contrast_backward(Tensor grad_loss, Tensor feats, Tensor labels, Tensor centroids, "
        "Tensor covariance, Tensor lse, float tau, float lam, int ignore_index, Tensor? weights, "
        "bool stats_grad) -> (Tensor grad_feats, Tensor grad_centroids, Tensor grad_covariance)");
  // 5. memory-bank contrast (bank [C, M, D], bank_len [C])
  m.def("bank_contrast_forward(Tensor feats, Tensor labels, Tensor bank, Tensor bank_len, "
        "float tau, int ignore_index) -> (Tensor loss, Tensor neg_lse)");
  m.def("bank_contrast_backward(Tensor grad_loss, Tensor feats, Tensor labels, Tensor bank, "
        "Tensor bank_len, Tensor neg_lse, float tau, int ignore_index) -> Tensor grad_feats");
  // 6. pixel-to-pixel supervised contrast on L2-normalised feats; pair weight a_i * a_j
  m.def("pixel_contrast_forward(Tensor feats, Tensor labels, float tau, int ignore_index, "
        "Tensor? weights, Tensor? pair_weights) "
        "-> (Tensor loss, Tensor neg_lse, Tensor pos_acc, Tensor n_pos)");
  m.def("pixel_contrast_backward(Tensor grad_loss, Tensor feats, Tensor labels, Tensor neg_lse, "
        "Tensor pos_acc, float tau, int ignore_index, Tensor? weights, Tensor? pair_weights) "
        "-> (Tensor grad_feats, Tensor grad_pair_weights)");
  // 7. majority-vote label downscaling of [B, H, W] labels
  m.def("downscale_labels(Tensor labels, int factor, int num_classes, float min_ratio, "
        "int ignore_index) -> Tensor");
}
