// The fastuda op library. The schemas live in csrc/ops_schema.h (shared with the emulated module);
// backends register implementations in their own files: csrc/cpu/*.cpp (CPU), csrc/cuda/*.cu
// (CUDA); autograd and fake (meta) implementations are registered from Python by the op
// descriptors of fastuda/ops/_op.py.
#include <Python.h>
#include <torch/library.h>

#include "ops_schema.h"

// Importing fastuda._C must work as a Python module even though everything is registered through
// TORCH_LIBRARY; an empty module definition is enough.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}

TORCH_LIBRARY(fastuda, m) {
#define FASTUDA_DEF(schema) m.def(schema);
  FASTUDA_OP_SCHEMAS(FASTUDA_DEF)
#undef FASTUDA_DEF
}
