// fastuda._C_emu: the CUDA kernels of csrc/cuda compiled for the host SIMT layer
// (common/simt_host.h) and registered as CPU ops under torch.ops.fastuda_emu, with the schemas of
// csrc/ops.cpp (tests/ops/test_cuda_emulated.py checks that they stay identical). The test suite
// calls them on CPU tensors and compares with fastuda.ops.reference, so the kernels' own code runs
// without a GPU. Not a production backend: one OS thread executes every simulated CUDA thread.
#include <Python.h>
#include <torch/library.h>

extern "C" PyObject* PyInit__C_emu(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C_emu", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}

TORCH_LIBRARY(fastuda_emu, m) {
  m.def("class_stats(Tensor feats, Tensor labels, int num_classes, int ignore_index, "
        "Tensor? weights, bool full_cov) -> (Tensor count, Tensor mean, Tensor m2)");
  m.def("proto_contrast_forward(Tensor feats, Tensor labels, Tensor centroids, float tau, "
        "int ignore_index, Tensor? weights) -> (Tensor loss, Tensor lse)");
  m.def("proto_contrast_backward(Tensor grad_loss, Tensor feats, Tensor labels, Tensor centroids, "
        "Tensor lse, float tau, int ignore_index, Tensor? weights, bool centroids_grad) "
        "-> (Tensor grad_feats, Tensor grad_centroids)");
  m.def("dist_contrast_forward(Tensor feats, Tensor labels, Tensor centroids, Tensor covariance, "
        "float tau, float lam, int ignore_index, Tensor? weights) -> (Tensor loss, Tensor lse)");
  m.def("dist_contrast_backward(Tensor grad_loss, Tensor feats, Tensor labels, Tensor centroids, "
        "Tensor covariance, Tensor lse, float tau, float lam, int ignore_index, Tensor? weights, "
        "bool stats_grad) -> (Tensor grad_feats, Tensor grad_centroids, Tensor grad_covariance)");
  m.def("bank_contrast_forward(Tensor feats, Tensor labels, Tensor bank, Tensor bank_len, "
        "float tau, int ignore_index) -> (Tensor loss, Tensor neg_lse)");
  m.def("bank_contrast_backward(Tensor grad_loss, Tensor feats, Tensor labels, Tensor bank, "
        "Tensor bank_len, Tensor neg_lse, float tau, int ignore_index) -> Tensor grad_feats");
  m.def("pixel_contrast_forward(Tensor feats, Tensor labels, float tau, int ignore_index, "
        "Tensor? weights, Tensor? pair_weights) "
        "-> (Tensor loss, Tensor neg_lse, Tensor pos_acc, Tensor n_pos)");
  m.def("pixel_contrast_backward(Tensor grad_loss, Tensor feats, Tensor labels, Tensor neg_lse, "
        "Tensor pos_acc, float tau, int ignore_index, Tensor? weights, Tensor? pair_weights) "
        "-> (Tensor grad_feats, Tensor grad_pair_weights)");
  m.def("downscale_labels(Tensor labels, int factor, int num_classes, float min_ratio, "
        "int ignore_index) -> Tensor");
}
