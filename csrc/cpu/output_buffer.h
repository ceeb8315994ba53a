// The feature-gradient buffer of a CPU backward kernel, kept for the next call.
//
// A backward returns a gradient as large as its feature input (50 MiB at DAFormer scale) every
// training step. PyTorch's CPU allocator caches nothing: glibc maps every block over 32 MiB fresh
// and unmaps it on free, so each call page-faults the whole gradient in again, and the kernel
// zeroes and maps pages instead of computing. On a 2-core AMD EPYC (Zen 4) that fault path took
// more CPU time than proto_contrast's arithmetic (24 ms of system time against 19 ms of user time
// per forward + backward, 2026-12-04). Like the CUDA caching allocator, a GradBuffer keeps the
// storage of the gradient it handed out last; when the caller has dropped every reference to it
// (autograd frees the feature gradient once the producer's backward has consumed it), the next
// call of the same size writes into the same pages. A gradient still referenced anywhere (a
// retained .grad, a view) is never reused: the next call allocates a new one.
//
// Cost: between steps the process keeps one gradient-sized block per op resident, as a GPU
// caching allocator does. FASTUDA_CPU_REUSE_GRAD=0 turns the reuse off (read once per process).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/strides.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace fastuda {

// A large output about to be written in full: ask Linux for transparent huge pages first (where
// THP is in "madvise" mode). Faulting in 4 KiB pages costs more CPU time than the contrast
// kernels' arithmetic at DAFormer scale; the advice is only a hint and its failure is harmless.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(t.data_ptr()) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(t.data_ptr()) + t.nbytes()) & ~(kHuge - 1);
  if (end >= begin + 4 * kHuge) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

inline bool grad_reuse_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("FASTUDA_CPU_REUSE_GRAD");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled;
}

class GradBuffer {
 public:
  // Below this size glibc serves the block from its heap, which it reuses without faults.
  static constexpr int64_t kMinBytes = int64_t(4) << 20;

  // An uninitialised contiguous tensor of `sizes`: the kept storage when nobody else holds it and
  // it has exactly the bytes needed, else a fresh block (advised to use huge pages).
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& opts) {
    const int64_t bytes = c10::multiply_integers(sizes) *
                          static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(
                              opts.dtype())));
    if (grad_reuse_enabled() && bytes >= kMinBytes) {
      c10::Storage storage;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        // use_count 1: only this cache refers to the storage (every tensor or view holds one)
        if (kept_ && kept_.use_count() == 1 && static_cast<int64_t>(kept_.nbytes()) == bytes &&
            kept_.device() == opts.device())
          storage = std::move(kept_);
        kept_ = c10::Storage();
      }
      if (storage) {
        at::Tensor out = at::empty({0}, opts);
        out.set_(storage, 0, sizes, c10::contiguous_strides(sizes));
        return out;
      }
    }
    at::Tensor out = at::empty(sizes, opts);
    advise_huge_pages(out);
    return out;
  }

  // Keeps `t`'s storage for the next call (large blocks only).
  void keep(const at::Tensor& t) {
    if (!grad_reuse_enabled() || static_cast<int64_t>(t.nbytes()) < kMinBytes) return;
    std::lock_guard<std::mutex> lock(mutex_);
    kept_ = t.storage();
  }

 private:
  std::mutex mutex_;
  c10::Storage kept_;
};

}  // namespace fastuda
