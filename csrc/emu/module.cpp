// fastuda._C_emu: the CUDA kernels of csrc/cuda compiled for the host SIMT layer
// (common/simt_host.h) and registered as CPU ops under torch.ops.fastuda_emu, with the schemas of
// csrc/ops_schema.h, the list csrc/ops.cpp expands too (tests/ops/test_cuda_emulated.py checks
// that they are identical). The test suite calls them on CPU tensors and compares with
// fastuda.ops.reference, so the kernels' own code runs without a GPU. Not a production backend:
// one OS thread executes every simulated CUDA thread.
#include <Python.h>
#include <torch/library.h>

#include "ops_schema.h"

extern "C" PyObject* PyInit__C_emu(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C_emu", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}

TORCH_LIBRARY(fastuda_emu, m) {
#define FASTUDA_DEF(schema) m.def(schema);
  FASTUDA_OP_SCHEMAS(FASTUDA_DEF)
#undef FASTUDA_DEF
}
