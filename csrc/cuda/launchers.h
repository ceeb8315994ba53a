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

}  // namespace fastuda::FASTUDA_KNS
