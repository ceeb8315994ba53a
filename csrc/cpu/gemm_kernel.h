// The CPU GEMM micro-kernel of the fused contrast kernels (csrc/cpu/contrast.cpp and any other
// kernel that multiplies small cache-resident tiles): small dense products whose operands are
// already in L1/L2, where a BLAS call's packing and dispatch overhead would dominate.
//
// Dense micro-kernel: Out[R][N] (+)= A[R][K] @ Bm[K][N], A addressed as A[r * a_rs + k * a_ks],
// Bm rows contiguous (row stride ldb). An RB x NB block of Out stays in vector registers over
// the K loop; each Bm row is loaded once per block and reused for the RB rows.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace fastuda {

// The vector width the target has registers for. A GCC vector wider than that (32 bytes in a
// portable build, FASTUDA_NATIVE=0, which targets SSE2) is split into halves and passed through
// memory between functions: the portable build ran the contrast kernels 10-12x slower than the
// native AVX2 one, far below scalar speed.
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

template <typename T>
struct SimdOf;
template <>
struct SimdOf<float> {
  typedef float type __attribute__((vector_size(kVecBytes)));
};
template <>
struct SimdOf<double> {
  typedef double type __attribute__((vector_size(kVecBytes)));
};

template <typename T>
inline typename SimdOf<T>::type load_vec(const T* p) {
  typename SimdOf<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void store_vec(T* p, const typename SimdOf<T>::type& v) {
  std::memcpy(p, &v, sizeof(v));
}

// A float vector written around the caches (a streaming store, no read-for-ownership of the line)
// when kStream and the target has one, else a plain store. With kStream, p must be aligned to the
// vector width. For outputs far larger than the caches that this kernel does not read again;
// streaming stores are weakly ordered: the caller fences them (_mm_sfence) before handing on.
template <bool kStream, typename T, typename V>
inline void put_vec(T* p, const V& v) {
#if defined(__x86_64__) || defined(__i386__)
  if constexpr (kStream && std::is_same_v<T, float>) {
#if defined(__AVX512F__)
    _mm512_stream_ps(p, (__m512)v);
#elif defined(__AVX__)
    _mm256_stream_ps(p, (__m256)v);
#else
    _mm_stream_ps(p, (__m128)v);
#endif
    return;
  }
#endif
  store_vec(p, v);
}

// The unroll pragmas matter: fully unrolled, the accumulators become registers; left as loops,
// GCC keeps them on the stack and reloads them at every step of k.
// With kPrefetch, columns [0, ahead_cols) of row k of `ahead` (same row stride as Bm) are
// requested while row k of Bm is used: the features of a later tile stream in spread over the work
// instead of in one burst. They go to L2 (a tile's rows fill all of L1 on their own).
// kStream: Out is written with streaming stores (put_vec), its rows aligned to the vector width.
// kSquareB: Bm's elements are squared as they are loaded (Out = A @ (Bm o Bm): the DistCL
// variance term, without a squared copy of the tile).
// init: the accumulators' initial values (row stride ldi; Out itself to accumulate), or null for
// zeros.
template <typename T, int RB, int NB, bool kPrefetch = false, bool kStream = false,
          bool kSquareB = false>
inline void gemm_block(int64_t K, const T* A, int64_t a_rs, int64_t a_ks, const T* Bm, int64_t ldb,
                       T* Out, int64_t ldo, const T* init, int64_t ldi, const T* ahead = nullptr,
                       int64_t ahead_cols = 0) {
  using V = typename SimdOf<T>::type;
  constexpr int kLanes = kVecBytes / sizeof(T);
  static_assert(NB % kLanes == 0, "the block width must be a whole number of vectors");
  constexpr int NV = NB / kLanes;
  V acc[RB][NV];
#pragma GCC unroll 32
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j)
      acc[r][j] = init != nullptr ? load_vec(init + r * ldi + j * kLanes) : V{};
  for (int64_t k = 0; k < K; ++k) {
    if constexpr (kPrefetch)
      for (int64_t j = 0; j < ahead_cols; j += 64 / sizeof(T))
        __builtin_prefetch(ahead + k * ldb + j, /*rw=*/0, /*locality=*/2);
    V b[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) {
      b[j] = load_vec(Bm + k * ldb + j * kLanes);
      if constexpr (kSquareB) b[j] *= b[j];
    }
#pragma GCC unroll 32
    for (int r = 0; r < RB; ++r) {
      const T a = A[r * a_rs + k * a_ks];
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[r][j] += a * b[j];
    }
  }
#pragma GCC unroll 32
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) put_vec<kStream>(Out + r * ldo + j * kLanes, acc[r][j]);
}

// Columns that do not fill a vector (N % lanes of them)
template <typename T, bool kSquareB = false>
inline void gemm_tail(int64_t R, int64_t K, int64_t N, const T* A, int64_t a_rs, int64_t a_ks,
                      const T* Bm, int64_t ldb, T* Out, int64_t ldo, const T* init, int64_t ldi) {
  for (int64_t r = 0; r < R; ++r) {
    T* o = Out + r * ldo;
    const T* in = init != nullptr ? init + r * ldi : nullptr;
    if (in != o)  // in == o: accumulate in place
      for (int64_t n = 0; n < N; ++n) o[n] = in != nullptr ? in[n] : T(0);
    for (int64_t k = 0; k < K; ++k) {
      const T a = A[r * a_rs + k * a_ks];
      const T* b = Bm + k * ldb;
      for (int64_t n = 0; n < N; ++n) o[n] += a * (kSquareB ? b[n] * b[n] : b[n]);
    }
  }
}

template <typename T>
constexpr int kLanesOf = kVecBytes / sizeof(T);

// Register blocks are RB rows x NB columns, NB two vectors wide (one for the last columns). The
// accumulators plus the loaded vectors of Bm and the broadcast must fit the vector registers (32
// with AVX-512, 16 with AVX2): with AVX2, 6 x 2 accumulators + 2 + 1 = 15. A 3 x 4-vector block
// (17 registers) made GCC re-load Bm from memory into every FMA, load-bound on AVX2.
template <typename T>
constexpr int block_rows(int vectors_per_row) {
  constexpr int acc_registers = kVecBytes == 64 ? 26 : 12;
  return acc_registers / vectors_per_row;
}

// gemm_block for a run-time number of rows (1 .. RB)
template <typename T, int NB, int RB, bool kPrefetch, bool kStream, bool kSquareB>
inline void gemm_rows(int64_t rows, int64_t K, const T* A, int64_t a_rs, int64_t a_ks,
                      const T* Bm, int64_t ldb, T* Out, int64_t ldo, const T* init, int64_t ldi,
                      const T* ahead, int64_t ahead_cols) {
  if constexpr (RB > 0) {
    if (rows == RB)
      return gemm_block<T, RB, NB, kPrefetch, kStream, kSquareB>(K, A, a_rs, a_ks, Bm, ldb, Out,
                                                                 ldo, init, ldi, ahead,
                                                                 ahead_cols);
    gemm_rows<T, NB, RB - 1, kPrefetch, kStream, kSquareB>(rows, K, A, a_rs, a_ks, Bm, ldb, Out,
                                                           ldo, init, ldi, ahead, ahead_cols);
  }
}

// All R rows of one column block of width NB, in equal register blocks (19 classes: 5 + 5 + 5 +
// 4, not 6 + 6 + 6 + 1), so every block has enough independent accumulators to hide the FMA
// latency. With `ahead`, the first row block also prefetches ahead_cols columns of it.
template <typename T, int NB, bool kStream, bool kSquareB>
inline void gemm_column(int64_t R, int64_t K, const T* A, int64_t a_rs, int64_t a_ks, const T* Bm,
                        int64_t ldb, T* Out, int64_t ldo, const T* init, int64_t ldi,
                        const T* ahead, int64_t ahead_cols) {
  constexpr int kMaxRows = block_rows<T>(NB / kLanesOf<T>);
  const int64_t n_blocks = (R + kMaxRows - 1) / kMaxRows;
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    const int64_t r = R * blk / n_blocks;
    const int64_t rows = R * (blk + 1) / n_blocks - r;
    if (ahead != nullptr && blk == 0)
      gemm_rows<T, NB, kMaxRows, true, kStream, kSquareB>(rows, K, A, a_rs, a_ks, Bm, ldb, Out,
                                                          ldo, init, ldi, ahead, ahead_cols);
    else
      gemm_rows<T, NB, kMaxRows, false, kStream, kSquareB>(
          rows, K, A + r * a_rs, a_rs, a_ks, Bm, ldb, Out + r * ldo, ldo,
          init != nullptr ? init + r * ldi : nullptr, ldi, nullptr, 0);
  }
}

// Out[R][N] = init[R][N] + A[R][K] @ Bm[K][N] (init row stride ldi; null: zeros; Out: accumulate).
// `ahead`: optional, as Bm but for a later tile; its first N columns are fetched into cache during
// the first row block. kStream: Out is written with streaming stores; Out and ldo must then be
// aligned to the vector width and N a whole number of vectors (the scalar tail has plain stores).
template <typename T, bool kStream = false, bool kSquareB = false>
void gemm_init(int64_t R, int64_t K, int64_t N, const T* A, int64_t a_rs, int64_t a_ks,
               const T* Bm, int64_t ldb, T* Out, int64_t ldo, const T* init, int64_t ldi,
               const T* ahead = nullptr) {
  constexpr int kLanes = kLanesOf<T>;
  constexpr int NB = 2 * kLanes;
  int64_t n0 = 0;
  const auto init_at = [&](int64_t col) { return init != nullptr ? init + col : nullptr; };
  for (; n0 + NB <= N; n0 += NB) {
    gemm_column<T, NB, kStream, kSquareB>(R, K, A, a_rs, a_ks, Bm + n0, ldb, Out + n0, ldo,
                                          init_at(n0), ldi, n0 == 0 ? ahead : nullptr, N);
  }
  if (n0 + kLanes <= N) {
    gemm_column<T, kLanes, kStream, kSquareB>(R, K, A, a_rs, a_ks, Bm + n0, ldb, Out + n0, ldo,
                                              init_at(n0), ldi, n0 == 0 ? ahead : nullptr, N);
    n0 += kLanes;
  }
  if (n0 < N)
    gemm_tail<T, kSquareB>(R, K, N - n0, A, a_rs, a_ks, Bm + n0, ldb, Out + n0, ldo, init_at(n0),
                           ldi);
}

// Two products of the same shape and an elementwise epilogue in one pass over the output:
//   Out[R][N] = A1[R][K] @ B1[K][N] + E[R][N] o (A2[R][K] @ B2[K][N])
// (the DistCL feature gradient: mu^T g_a + x o (Sigma'^T g_b)). A1 and A2 share their strides,
// B1 and B2 their row stride ldb; E has row stride lde. Both accumulator sets of an RB x NB
// block stay in registers over K; E is read once, in the block's epilogue, and its rows are
// requested when the block starts. kStream as for gemm_block. One block of NB columns: one
// vector with AVX2 (2 x RB accumulators of 16 registers), two with AVX-512.
template <typename T, int RB, int NB, bool kStream>
inline void gemm_pair_block(int64_t K, const T* A1, const T* A2, int64_t a_rs, int64_t a_ks,
                            const T* B1, const T* B2, int64_t ldb, const T* E, int64_t lde,
                            T* Out, int64_t ldo) {
  using V = typename SimdOf<T>::type;
  constexpr int kLanes = kVecBytes / sizeof(T);
  constexpr int NV = NB / kLanes;
#pragma GCC unroll 32
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < NB; j += 64 / sizeof(T)) __builtin_prefetch(E + r * lde + j, 0, 3);
  V acc1[RB][NV], acc2[RB][NV];
#pragma GCC unroll 32
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) acc1[r][j] = acc2[r][j] = V{};
  for (int64_t k = 0; k < K; ++k) {
    V b1[NV], b2[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) {
      b1[j] = load_vec(B1 + k * ldb + j * kLanes);
      b2[j] = load_vec(B2 + k * ldb + j * kLanes);
    }
#pragma GCC unroll 32
    for (int r = 0; r < RB; ++r) {
      const T a1 = A1[r * a_rs + k * a_ks], a2 = A2[r * a_rs + k * a_ks];
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) {
        acc1[r][j] += a1 * b1[j];
        acc2[r][j] += a2 * b2[j];
      }
    }
  }
#pragma GCC unroll 32
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j)
      put_vec<kStream>(Out + r * ldo + j * kLanes,
                       acc1[r][j] + load_vec(E + r * lde + j * kLanes) * acc2[r][j]);
}

template <typename T, int NB, int RB, bool kStream>
inline void gemm_pair_rows(int64_t rows, int64_t K, const T* A1, const T* A2, int64_t a_rs,
                           int64_t a_ks, const T* B1, const T* B2, int64_t ldb, const T* E,
                           int64_t lde, T* Out, int64_t ldo) {
  if constexpr (RB > 0) {
    if (rows == RB)
      return gemm_pair_block<T, RB, NB, kStream>(K, A1, A2, a_rs, a_ks, B1, B2, ldb, E, lde, Out,
                                                 ldo);
    gemm_pair_rows<T, NB, RB - 1, kStream>(rows, K, A1, A2, a_rs, a_ks, B1, B2, ldb, E, lde, Out,
                                           ldo);
  }
}

template <typename T, int NB, bool kStream>
inline void gemm_pair_column(int64_t R, int64_t K, const T* A1, const T* A2, int64_t a_rs,
                             int64_t a_ks, const T* B1, const T* B2, int64_t ldb, const T* E,
                             int64_t lde, T* Out, int64_t ldo) {
  constexpr int kMaxRows = block_rows<T>(2 * (NB / kLanesOf<T>));
  const int64_t n_blocks = (R + kMaxRows - 1) / kMaxRows;
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    const int64_t r = R * blk / n_blocks, rows = R * (blk + 1) / n_blocks - r;
    gemm_pair_rows<T, NB, kMaxRows, kStream>(rows, K, A1 + r * a_rs, A2 + r * a_rs, a_rs, a_ks,
                                             B1, B2, ldb, E + r * lde, lde, Out + r * ldo, ldo);
  }
}

// gemm_pair over R rows and N columns, N a whole number of vectors (kStream: Out, ldo aligned)
template <typename T, bool kStream = false>
void gemm_pair(int64_t R, int64_t K, int64_t N, const T* A1, const T* A2, int64_t a_rs,
               int64_t a_ks, const T* B1, const T* B2, int64_t ldb, const T* E, int64_t lde,
               T* Out, int64_t ldo) {
  constexpr int kLanes = kLanesOf<T>;
  constexpr int NB = kVecBytes == 64 ? 2 * kLanes : kLanes;
  int64_t n0 = 0;
  for (; n0 + NB <= N; n0 += NB)
    gemm_pair_column<T, NB, kStream>(R, K, A1, A2, a_rs, a_ks, B1 + n0, B2 + n0, ldb, E + n0,
                                     lde, Out + n0, ldo);
  if constexpr (NB != kLanes)
    if (n0 < N)
      gemm_pair_column<T, kLanes, kStream>(R, K, A1, A2, a_rs, a_ks, B1 + n0, B2 + n0, ldb,
                                           E + n0, lde, Out + n0, ldo);
}

// Out[R][N] (+)= A[R][K] @ Bm[K][N] (accumulate: add to Out); kSquareB: A @ (Bm o Bm)
template <typename T, bool kSquareB = false>
void gemm(int64_t R, int64_t K, int64_t N, const T* A, int64_t a_rs, int64_t a_ks, const T* Bm,
          int64_t ldb, T* Out, int64_t ldo, bool accumulate, const T* ahead = nullptr) {
  gemm_init<T, false, kSquareB>(R, K, N, A, a_rs, a_ks, Bm, ldb, Out, ldo,
                                accumulate ? Out : nullptr, ldo, ahead);
}

}  // namespace fastuda
