// nvcc translation unit of the label kernels (the kernel text is shared with the host emulation).
#include "cuda/labels_kernels.cuh"
