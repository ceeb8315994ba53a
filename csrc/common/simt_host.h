// Host SIMT emulation: runs CUDA kernel source on the CPU, so the test suite executes the very code
// nvcc compiles for the GPU (csrc/cuda/<f>.cu). Only for g++ builds with FASTUDA_SIMT_HOST
// (the fastuda._C_emu extension); kernel sources include it through common/simt.h.
//
// Model. A launch runs its blocks one after another. The threads of a block are cooperative fibers
// on the calling OS thread; a fiber runs until it reaches a barrier (__syncthreads,
// __syncwarp, or a warp collective: shuffle, ballot, match) and then yields to the block scheduler.
// Consequences:
//   * `__shared__` is `static`: one block is alive at a time, so a static local is its shared memory;
//   * the built-ins threadIdx/blockIdx/blockDim/gridDim are globals the scheduler sets before it
//     resumes a fiber; atomics are plain read-modify-writes (one OS thread runs everything);
//   * execution is deterministic. Between two barriers the scheduler runs the fibers one at a time,
//     alternating ascending and descending thread order from round to round, so a read of another
//     thread's shared-memory write that lacks a barrier sees the stale value in at least one
//     direction and the tests fail instead of passing by luck;
//   * a barrier that not every thread of the block (or warp) reaches is reported as an error (CUDA
//     leaves it undefined), as are warp collectives over partial masks, block sizes over 1024, empty
//     grids and more than 48 KiB of dynamic shared memory (CUDA's default limit);
//   * the dynamic shared memory is filled with 0xFF bytes (NaN as float) before each block, so
//     reading it before writing shows up in the results.
// Fiber switches: on x86-64 Linux a 20-instruction stack switch (callee-saved registers, SSE/x87
// control words); elsewhere (or with -DFASTUDA_SIMT_UCONTEXT) swapcontext, which also saves the
// signal mask with a system call per switch and is several times slower.
// Why fibers and not one std::thread per CUDA thread: the test machines have 2 shared cores, and a
// 256-thread block synchronising through std::barrier costs hundreds of futex wake-ups per
// __syncthreads; fibers switch in user space and give reproducible results.
#pragma once

#ifndef FASTUDA_SIMT_HOST
#error "common/simt_host.h is the host emulation layer; compile with -DFASTUDA_SIMT_HOST"
#endif

#if defined(__x86_64__) && defined(__linux__) && !defined(FASTUDA_SIMT_UCONTEXT)
#define FASTUDA_SIMT_ASM_SWITCH 1
#include <xmmintrin.h>
#else
#include <ucontext.h>
#endif


#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- CUDA built-in types and qualifiers ----------------------------------------------------------
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
      : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

inline dim3 threadIdx, blockIdx, blockDim, gridDim;
inline constexpr int warpSize = 32;

#if FASTUDA_SIMT_ASM_SWITCH
// fastuda_simt_switch(&save, load): pushes the callee-saved state on the current stack, stores
// the stack pointer in *save, continues on the stack `load` (as saved by an earlier switch or
// prepared by start_fiber). Weak and hidden: every translation unit may emit it, one is kept.
extern "C" void fastuda_simt_switch(void** save_sp, void* load_sp);
asm(R"(
  .pushsection .text
  .weak fastuda_simt_switch
  .hidden fastuda_simt_switch
  .type fastuda_simt_switch, @function
fastuda_simt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fastuda_simt_switch, .-fastuda_simt_switch
  .popsection
)");
#endif

namespace fastuda::simt {

inline constexpr unsigned kWarpSize = 32;
inline constexpr unsigned kMaxThreadsPerBlock = 1024;
inline constexpr size_t kMaxDynamicShared = 48 * 1024;
inline constexpr size_t kFiberStack = 256 * 1024;

struct Barrier {
  unsigned expected = 0, arrived = 0;
  uint64_t generation = 0;
};

struct Fiber {
#if FASTUDA_SIMT_ASM_SWITCH
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  dim3 tid;
  unsigned warp = 0, lane = 0;
  bool done = false;
  Barrier* waiting = nullptr;  // the barrier this fiber waits at (nullptr: runnable)
  uint64_t wait_generation = 0;
  uint64_t collectives = 0;  // warp collectives executed; its parity picks the slot buffer
};

struct Engine {
  std::mutex launch_mutex;  // `__shared__` is static: one launch at a time per process
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
#if FASTUDA_SIMT_ASM_SWITCH
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler;
#endif
  Fiber* current = nullptr;
  std::function<void()> body;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<uint64_t> warp_slots;  // [warp][2 buffers][32 lanes]
  std::vector<std::max_align_t> dynamic_smem;
  std::string error;  // first error a kernel reported (bad label, misuse of a collective)
  std::exception_ptr exception;
};

inline Engine& engine() {
  static Engine e;
  return e;
}

inline void report_kernel_error(const std::string& message) {
  Engine& e = engine();
  if (e.error.empty()) e.error = message;
}

inline void* dynamic_shared() { return engine().dynamic_smem.data(); }

inline Fiber& self() { return *engine().current; }

inline void fiber_entry();

inline void yield_to_scheduler(Fiber* f) {
#if FASTUDA_SIMT_ASM_SWITCH
  fastuda_simt_switch(&f->sp, engine().scheduler_sp);
#else
  swapcontext(&f->ctx, &engine().scheduler);
#endif
}

inline void resume_fiber(Fiber& f) {
#if FASTUDA_SIMT_ASM_SWITCH
  fastuda_simt_switch(&engine().scheduler_sp, f.sp);
#else
  swapcontext(&engine().scheduler, &f.ctx);
#endif
}

// A fresh fiber that will run fiber_entry() on `stack` when first resumed.
inline void start_fiber(Fiber& f, char* stack) {
#if FASTUDA_SIMT_ASM_SWITCH
  auto top = reinterpret_cast<uintptr_t>(stack + kFiberStack) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;  // fiber_entry's return address (never used): keeps the ABI's alignment
  *--sp = reinterpret_cast<void*>(&fiber_entry);  // where the first switch "returns" to
  for (int i = 0; i < 6; ++i) *--sp = nullptr;    // rbp rbx r12 r13 r14 r15
  uint16_t x87_control;
  asm volatile("fnstcw %0" : "=m"(x87_control));
  const uint64_t control = uint64_t(_mm_getcsr()) | (uint64_t(x87_control) << 32);
  *--sp = reinterpret_cast<void*>(control);
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = stack;
  f.ctx.uc_stack.ss_size = kFiberStack;
  f.ctx.uc_link = &engine().scheduler;
  makecontext(&f.ctx, fiber_entry, 0);
#endif
}

// Arrive at `b` and wait until every expected participant has arrived.
inline void sync(Barrier& b) {
  Engine& e = engine();
  Fiber* f = e.current;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
  } else {
    f->waiting = &b;
    f->wait_generation = b.generation;
  }
  yield_to_scheduler(f);  // the scheduler resumes us once the barrier opened
  f->waiting = nullptr;
}

inline unsigned lanes_in_warp(const Fiber& f) {
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  return std::min(kWarpSize, threads - f.warp * kWarpSize);
}

inline unsigned full_mask(const Fiber& f) {
  const unsigned n = lanes_in_warp(f);
  return n == 32 ? 0xffffffffu : ((1u << n) - 1u);
}

inline void check_mask(unsigned mask, const char* what) {
  const Fiber& f = self();
  if ((mask & full_mask(f)) != full_mask(f)) {
    report_kernel_error(std::string("simt emulation: ") + what +
                        " with a partial lane mask is not emulated (mask " +
                        std::to_string(mask) + ")");
  }
}

// Every lane publishes `value`; after the warp barrier each lane reads what `pick` selects from
// the 32 published values. Two slot buffers alternate, so one barrier per collective suffices: a
// lane can only overwrite a buffer after every lane has passed the next collective's barrier,
// i.e. after every lane has read this one.
template <typename T, typename Pick>
inline auto warp_exchange(T value, Pick pick) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>);
  Engine& e = engine();
  Fiber* f = e.current;
  uint64_t* slots = e.warp_slots.data() + (f->warp * 2 + (f->collectives++ & 1)) * kWarpSize;
  uint64_t raw = 0;
  std::memcpy(&raw, &value, sizeof(T));
  slots[f->lane] = raw;
  sync(e.warp_barriers[f->warp]);
  return pick(static_cast<const uint64_t*>(slots), f->lane, lanes_in_warp(*f));
}

template <typename T>
inline T from_slot(uint64_t raw) {
  T v;
  std::memcpy(&v, &raw, sizeof(T));
  return v;
}

inline void fiber_entry() {
  Engine& e = engine();
  try {
    e.body();
  } catch (...) {
    if (!e.exception) e.exception = std::current_exception();
  }
  e.current->done = true;
#if FASTUDA_SIMT_ASM_SWITCH
  yield_to_scheduler(e.current);  // never resumed
  __builtin_unreachable();
#endif
  // ucontext: returning resumes the scheduler through uc_link
}

inline void run_block() {
  Engine& e = engine();
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  for (unsigned i = 0; i < threads; ++i) {
    Fiber& f = e.fibers[i];
    start_fiber(f, e.stacks[i].get());
    f.done = false;
    f.waiting = nullptr;
    f.collectives = 0;
  }
  e.block_barrier = Barrier{threads, 0, 0};
  for (unsigned w = 0; w < e.warp_barriers.size(); ++w)
    e.warp_barriers[w] = Barrier{std::min(kWarpSize, threads - w * kWarpSize), 0, 0};
  std::memset(static_cast<void*>(e.dynamic_smem.data()), 0xFF,
              e.dynamic_smem.size() * sizeof(std::max_align_t));
  unsigned alive = threads;
  for (uint64_t round = 0; alive > 0; ++round) {
    bool resumed_any = false;
    for (unsigned k = 0; k < threads; ++k) {
      Fiber& f = e.fibers[(round & 1) ? threads - 1 - k : k];
      if (f.done || (f.waiting && f.waiting->generation == f.wait_generation)) continue;
      e.current = &f;
      threadIdx = f.tid;
      resume_fiber(f);
      resumed_any = true;
      if (f.done) --alive;
    }
    if (!resumed_any) {
      unsigned at_block = 0;
      for (unsigned i = 0; i < threads; ++i)
        at_block += (!e.fibers[i].done && e.fibers[i].waiting == &e.block_barrier);
      throw std::runtime_error(
          "simt emulation: deadlock in block (" + std::to_string(blockIdx.x) + "," +
          std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) + "): " +
          std::to_string(threads - alive) + " of " + std::to_string(threads) +
          " threads returned while " + std::to_string(at_block) +
          " wait at __syncthreads (a barrier must be reached by every thread of the block, or "
          "a warp collective by every lane of the warp)");
    }
  }
}

// Runs kernel<<<grid, block, smem>>>(args...) on the host. Raises std::runtime_error for a bad
// configuration, a deadlock, or an error the kernel reported (report_kernel_error).
template <typename... KArgs, typename... Args>
void launch(dim3 grid, dim3 block, size_t smem, void (*kernel)(KArgs...), Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "wrong number of kernel arguments");
  Engine& e = engine();
  std::lock_guard<std::mutex> lock(e.launch_mutex);
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0 || threads > kMaxThreadsPerBlock ||
      grid.y > 65535 || grid.z > 65535 || smem > kMaxDynamicShared) {
    throw std::runtime_error(
        "simt emulation: invalid launch configuration: grid (" + std::to_string(grid.x) + "," +
        std::to_string(grid.y) + "," + std::to_string(grid.z) + "), block (" +
        std::to_string(block.x) + "," + std::to_string(block.y) + "," + std::to_string(block.z) +
        "), " + std::to_string(smem) + " bytes of dynamic shared memory");
  }
  std::tuple<std::decay_t<KArgs>...> bound(std::forward<Args>(args)...);
  // Each thread gets its own copy of the parameters, as on the device.
  e.body = [&bound, kernel] {
    auto params = bound;
    std::apply(kernel, params);
  };
  e.error.clear();
  e.exception = nullptr;
  if (e.fibers.size() < threads) {
    e.fibers.resize(threads);
    while (e.stacks.size() < threads) e.stacks.emplace_back(new char[kFiberStack]);
  }
  const unsigned warps = unsigned((threads + kWarpSize - 1) / kWarpSize);
  e.warp_barriers.assign(warps, Barrier{});
  e.warp_slots.assign(size_t(warps) * 2 * kWarpSize, 0);
  e.dynamic_smem.assign((smem + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t),
                        std::max_align_t{});
  blockDim = block;
  gridDim = grid;
  for (unsigned i = 0; i < threads; ++i) {
    Fiber& f = e.fibers[i];
    f.tid = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
    f.warp = i / kWarpSize;
    f.lane = i % kWarpSize;
  }
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = dim3(bx, by, bz);
        run_block();
        if (e.exception) std::rethrow_exception(e.exception);
      }
  e.body = nullptr;
  if (!e.error.empty()) throw std::runtime_error(e.error);
}

}  // namespace fastuda::simt

// ---- CUDA device built-ins ---------------------------------------------------------------------
inline void __syncthreads() { fastuda::simt::sync(fastuda::simt::engine().block_barrier); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  fastuda::simt::check_mask(mask, "__syncwarp");
  auto& e = fastuda::simt::engine();
  fastuda::simt::sync(e.warp_barriers[e.current->warp]);
}
inline void __threadfence() {}
inline void __threadfence_block() {}

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  fastuda::simt::check_mask(mask, "__shfl_sync");
  return fastuda::simt::warp_exchange(v, [&](const uint64_t* s, unsigned lane, unsigned n) {
    const unsigned from = (lane / width) * width + unsigned(src) % unsigned(width);
    return fastuda::simt::from_slot<T>(s[from < n ? from : lane]);
  });
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  fastuda::simt::check_mask(mask, "__shfl_xor_sync");
  return fastuda::simt::warp_exchange(v, [&](const uint64_t* s, unsigned lane, unsigned n) {
    const unsigned from = lane ^ unsigned(lane_mask);
    const bool same_segment = from / width == lane / width;
    return fastuda::simt::from_slot<T>(s[same_segment && from < n ? from : lane]);
  });
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  fastuda::simt::check_mask(mask, "__shfl_down_sync");
  return fastuda::simt::warp_exchange(v, [&](const uint64_t* s, unsigned lane, unsigned n) {
    const unsigned from = lane + delta;
    const bool same_segment = from / width == lane / width;
    return fastuda::simt::from_slot<T>(s[same_segment && from < n ? from : lane]);
  });
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  fastuda::simt::check_mask(mask, "__shfl_up_sync");
  return fastuda::simt::warp_exchange(v, [&](const uint64_t* s, unsigned lane, unsigned) {
    const bool ok = lane % width >= delta;
    return fastuda::simt::from_slot<T>(s[ok ? lane - delta : lane]);
  });
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  fastuda::simt::check_mask(mask, "__ballot_sync");
  return fastuda::simt::warp_exchange(predicate != 0, [](const uint64_t* s, unsigned, unsigned n) {
    unsigned bits = 0;
    for (unsigned i = 0; i < n; ++i) bits |= (s[i] & 1u) << i;
    return bits;
  });
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) {
  const auto& f = fastuda::simt::self();
  return __ballot_sync(mask, predicate) == fastuda::simt::full_mask(f);
}
template <typename T>
inline unsigned __match_any_sync(unsigned mask, T value) {
  fastuda::simt::check_mask(mask, "__match_any_sync");
  return fastuda::simt::warp_exchange(value, [](const uint64_t* s, unsigned lane, unsigned n) {
    unsigned bits = 0;
    for (unsigned i = 0; i < n; ++i) bits |= unsigned(s[i] == s[lane]) << i;
    return bits;
  });
}
inline unsigned __activemask() { return fastuda::simt::full_mask(fastuda::simt::self()); }

inline int __popc(unsigned x) { return std::popcount(x); }
inline int __popcll(unsigned long long x) { return std::popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }

template <typename T> inline T __ldg(const T* p) { return *p; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }

// One OS thread runs all fibers and a fiber only yields at barriers, so read-modify-write is atomic.
template <typename T, typename U> inline T atomicAdd(T* a, U v) {
  T old = *a;
  *a = T(old + v);
  return old;
}
template <typename T, typename U> inline T atomicMax(T* a, U v) {
  T old = *a;
  *a = std::max(old, T(v));
  return old;
}
template <typename T, typename U> inline T atomicMin(T* a, U v) {
  T old = *a;
  *a = std::min(old, T(v));
  return old;
}
template <typename T, typename U> inline T atomicOr(T* a, U v) {
  T old = *a;
  *a = T(old | v);
  return old;
}
template <typename T, typename U> inline T atomicExch(T* a, U v) {
  T old = *a;
  *a = T(v);
  return old;
}
template <typename T> inline T atomicCAS(T* a, T compare, T value) {
  T old = *a;
  if (old == compare) *a = value;
  return old;
}
