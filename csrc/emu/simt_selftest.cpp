// Self-test kernels of the host SIMT emulator (common/simt_host.h), exposed as
// torch.ops.fastuda_emu.simt_selftest(case, threads) so tests/ops/test_cuda_emulated.py can check
// the emulator itself: that it executes correct CUDA code correctly and that it catches the
// mistakes it promises to catch (missing barriers, early returns, partial-mask collectives,
// invalid launch configurations).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/simt.h"

namespace fastuda::emu {
namespace {

// Block sum of in[blockIdx.x * blockDim.x + t] three ways (shared-memory tree, warp shuffles,
// and a ballot/match census); out[block] = tree, out[grid + block] = shuffles, out[2 grid + block]
// = number of distinct values in the block (from __match_any_sync), out[3 grid + block] = number
// of odd values (from __ballot_sync).
__global__ void reduce_kernel(const float* in, float* out, int racy) {
  __shared__ float tree[1024];
  __shared__ float warp_sums[32];
  __shared__ int distinct[32], odd[32];
  const int t = threadIdx.x, lane = t % 32, warp = t / 32, warps = (blockDim.x + 31) / 32;
  const float v = in[blockIdx.x * blockDim.x + t];
  tree[t] = v;
  if (!racy) __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (t < stride) tree[t] += tree[t + stride];
    if (!racy) __syncthreads();
  }
  float s = v;
  for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
  const unsigned peers = __match_any_sync(0xffffffffu, int(v));
  const unsigned odd_lanes = __ballot_sync(0xffffffffu, int(v) % 2 != 0);
  // lanes that lead their group of equal values: one per distinct value
  const unsigned leaders = __ballot_sync(0xffffffffu, lane == __ffs(int(peers)) - 1);
  if (lane == 0) {
    warp_sums[warp] = s;
    distinct[warp] = __popc(leaders);
    odd[warp] = __popc(odd_lanes);
  }
  __syncthreads();
  if (t == 0) {
    float total = 0.0f;
    int n_distinct = 0, n_odd = 0;
    for (int w = 0; w < warps; ++w) {
      total += warp_sums[w];
      n_distinct += distinct[w];
      n_odd += odd[w];
    }
    out[blockIdx.x] = tree[0];
    out[gridDim.x + blockIdx.x] = total;
    out[2 * gridDim.x + blockIdx.x] = float(n_distinct);
    out[3 * gridDim.x + blockIdx.x] = float(n_odd);
  }
}

__global__ void early_return_kernel(float* out) {
  if (threadIdx.x == 3) return;  // this thread never reaches the barrier
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void partial_mask_kernel(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, float(threadIdx.x), 1);
}

at::Tensor simt_selftest(int64_t which, int64_t threads, const at::Tensor& values) {
  TORCH_CHECK_VALUE(values.dim() == 1 && values.scalar_type() == at::kFloat &&
                        values.is_contiguous() && values.size(0) % threads == 0,
                    "simt_selftest: values must be contiguous float32 [k * threads]");
  const int64_t blocks = values.size(0) / threads;
  // room for the per-block results and for the per-thread writes of the failure cases
  at::Tensor out = at::zeros({std::max<int64_t>(4 * blocks, 2048)}, values.options());
  switch (which) {
    case 0:  // correct code
    case 1:  // the same without __syncthreads in the tree reduction
      FASTUDA_LAUNCH(reduce_kernel, dim3(unsigned(blocks)), dim3(unsigned(threads)), 0, nullptr,
                     values.const_data_ptr<float>(), out.mutable_data_ptr<float>(), int(which));
      return out;
    case 2:
      FASTUDA_LAUNCH(early_return_kernel, dim3(1), dim3(unsigned(threads)), 0, nullptr,
                     out.mutable_data_ptr<float>());
      return out;
    case 3:
      FASTUDA_LAUNCH(partial_mask_kernel, dim3(1), dim3(32), 0, nullptr,
                     out.mutable_data_ptr<float>());
      return out;
    case 4:  // more threads than a block may have
      FASTUDA_LAUNCH(early_return_kernel, dim3(1), dim3(2048), 0, nullptr,
                     out.mutable_data_ptr<float>());
      return out;
    default:
      TORCH_CHECK_VALUE(false, "simt_selftest: unknown case ", which);
  }
}

}  // namespace
}  // namespace fastuda::emu

TORCH_LIBRARY_FRAGMENT(fastuda_emu, m) {
  m.def("simt_selftest(int which, int threads, Tensor values) -> Tensor",
        torch::dispatch(c10::DispatchKey::CPU, &fastuda::emu::simt_selftest));
}
