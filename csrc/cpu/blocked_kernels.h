// Register-blocked inner loops of the CPU fused pool: the two small matrix products every
// step of SPEC §2 reduces to, written as plain loops that the compiler vectorises (-O3 with
// the -march of CMakeLists.txt). Operands are padded scratch buffers: rows are `padded_dim`
// long, a multiple of the vector width, zero past D, and 64-byte aligned, so the products have
// no tail loops; row counts are multiples of kRowBlock (callers pad with zero rows).
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "cpu/variant.h"

namespace fastfuse {
namespace cpu {
inline namespace FASTFUSE_CPU_VARIANT {  // csrc/cpu/variant.h

#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
constexpr int kDotColumns = 4;  // 4 x 4 partial sums + 8 loads fit the 32 zmm registers
#elif defined(__AVX__)
constexpr int kVectorBytes = 32;
constexpr int kDotColumns = 2;  // 16 ymm registers
#else
constexpr int kVectorBytes = 16;
constexpr int kDotColumns = 2;
#endif
constexpr int kRowBlock = 4;
// accumulate_rows keeps kRowBlock x kWideChunks vectors of c in registers.
constexpr int kWideChunks = kVectorBytes == 64 ? 4 : 2;

template <typename T>
constexpr int64_t lanes() {
  return kVectorBytes / static_cast<int64_t>(sizeof(T));
}

inline int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// Halving horizontal reductions of a lane array: the upper half onto the lower half until one
// lane is left. Each step is a loop of constant length, so the compiler does it in vector
// registers (a runtime-length loop ran as a chain of dependent scalar ops through memory).
template <int64_t kWidth, typename T, typename Combine>
inline void halve_lanes(T* values, Combine combine) {
  if constexpr (kWidth >= 1) {
#pragma omp simd
    for (int64_t v = 0; v < kWidth; ++v) values[v] = combine(values[v], values[v + kWidth]);
    halve_lanes<kWidth / 2, T>(values, combine);
  }
}

template <typename T, int64_t kCount>
inline T sum_lanes(T (&values)[kCount]) {
  static_assert((kCount & (kCount - 1)) == 0, "a power of two lanes");
  halve_lanes<kCount / 2, T>(values, [](T a, T b) { return a + b; });
  return values[0];
}

template <typename T, int64_t kCount>
inline T max_lanes(T (&values)[kCount]) {
  static_assert((kCount & (kCount - 1)) == 0, "a power of two lanes");
  halve_lanes<kCount / 2, T>(values, [](T a, T b) { return a > b ? a : b; });
  return values[0];
}

// sum_{d < dim} term(d) with four independent vector accumulators (a single accumulator
// makes the loop wait on the add latency); term is inlined.
template <typename T, typename Term>
inline T reduce_sum(int64_t dim, Term term) {
  constexpr int64_t kWidth = 4 * lanes<T>();
  T partial[kWidth] = {};
  int64_t d = 0;
  for (; d + kWidth <= dim; d += kWidth) {
#pragma omp simd
    for (int64_t v = 0; v < kWidth; ++v) partial[v] += term(d + v);
  }
  T tail = 0;
  for (; d < dim; ++d) tail += term(d);
  return sum_lanes(partial) + tail;
}

// max_{d < dim} |row[d]| (NaN entries may be skipped: their token's statistics are NaN anyway).
template <typename T>
inline T reduce_max_abs(int64_t dim, const T* __restrict row) {
  constexpr int64_t kWidth = 4 * lanes<T>();
  T partial[kWidth] = {};
  int64_t d = 0;
  for (; d + kWidth <= dim; d += kWidth) {
#pragma omp simd
    for (int64_t v = 0; v < kWidth; ++v) {
      const T magnitude = row[d + v] < T(0) ? -row[d + v] : row[d + v];
      partial[v] = partial[v] > magnitude ? partial[v] : magnitude;
    }
  }
  T peak = max_lanes(partial);
  for (; d < dim; ++d) {
    const T magnitude = row[d] < T(0) ? -row[d] : row[d];
    peak = peak > magnitude ? peak : magnitude;
  }
  return peak;
}

// out[r * out_stride + c] = x_r . y_c for r < rows, c < cols: the H x tile scores w_h . xh_n
// (and g_h . xh_n in the backward). Each block keeps kRowBlock x kDotColumns partial sums of one
// vector each in registers, so a chunk of x_r or y_c is loaded once per block.
//
// `between_blocks()` runs before each block (e.g. RowPrefetcher::step: memory reads for later
// work, spread over the arithmetic).
struct NoHook {
  void operator()() const {}
};

template <typename T, typename Hook = NoHook>
void block_dots(const T* __restrict x, int64_t rows, const T* __restrict y, int64_t cols,
                int64_t padded_dim, T* __restrict out, int64_t out_stride, Hook between_blocks = {}) {
  constexpr int64_t kLanes = lanes<T>();
  for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
    for (int64_t c0 = 0; c0 < cols; c0 += kDotColumns) {
      between_blocks();
      T partial[kRowBlock][kDotColumns][kLanes] = {};
      for (int64_t d0 = 0; d0 < padded_dim; d0 += kLanes) {
        for (int i = 0; i < kRowBlock; ++i) {
          const T* x_chunk = x + (r0 + i) * padded_dim + d0;
          for (int k = 0; k < kDotColumns; ++k) {
            const T* y_chunk = y + (c0 + k) * padded_dim + d0;
#pragma omp simd
            for (int64_t v = 0; v < kLanes; ++v) partial[i][k][v] += x_chunk[v] * y_chunk[v];
          }
        }
      }
      for (int i = 0; i < kRowBlock; ++i) {
        for (int k = 0; k < kDotColumns; ++k) {
          out[(r0 + i) * out_stride + c0 + k] = sum_lanes(partial[i][k]);
        }
      }
    }
  }
}

// One column block of accumulate_rows: kChunks vectors of each of kRowBlock rows.
template <typename T, int kChunks>
inline void accumulate_rows_block(T* __restrict c, int64_t r0, int64_t d0, const T* __restrict a,
                                  int64_t a_row_stride, int64_t a_k_stride, const T* __restrict b,
                                  int64_t depth, int64_t padded_dim, const T* row_scale,
                                  bool overwrite) {
  constexpr int64_t kWidth = kChunks * lanes<T>();
  T sum[kRowBlock][kWidth];
  for (int i = 0; i < kRowBlock; ++i) {
    const T* c_row = c + (r0 + i) * padded_dim + d0;
    const T scale = overwrite ? T(0) : (row_scale ? row_scale[r0 + i] : T(1));
#pragma omp simd
    for (int64_t v = 0; v < kWidth; ++v) sum[i][v] = overwrite ? T(0) : scale * c_row[v];
  }
  for (int64_t k = 0; k < depth; ++k) {
    const T* b_row = b + k * padded_dim + d0;
    for (int i = 0; i < kRowBlock; ++i) {
      const T coefficient = a[(r0 + i) * a_row_stride + k * a_k_stride];
#pragma omp simd
      for (int64_t v = 0; v < kWidth; ++v) sum[i][v] += coefficient * b_row[v];
    }
  }
  for (int i = 0; i < kRowBlock; ++i) {
    T* c_row = c + (r0 + i) * padded_dim + d0;
#pragma omp simd
    for (int64_t v = 0; v < kWidth; ++v) c_row[v] = sum[i][v];
  }
}

// c_r = s_r * c_r + sum_k a(r, k) * b_k for r < rows, where a(r, k) = a[r * a_row_stride +
// k * a_k_stride] and s_r = row_scale[r] (1 when row_scale is null; c_r is not read when
// overwrite). Covers the online-softmax accumulator (acc_h = alpha_h acc_h + sum_n p_hn xh_n),
// dw_h += sum_n ds_hn xh_n and dxh_n = sum_h a_hn g_h + ds_hn w_h. Each block holds
// kRowBlock x 2 vectors of c in registers across the whole k loop. `between_blocks`: as in
// block_dots.
template <typename T, typename Hook = NoHook>
void accumulate_rows(T* __restrict c, int64_t rows, const T* __restrict a, int64_t a_row_stride,
                     int64_t a_k_stride, const T* __restrict b, int64_t depth, int64_t padded_dim,
                     const T* row_scale, bool overwrite, Hook between_blocks = {}) {
  constexpr int64_t kLanes = lanes<T>();
  for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
    int64_t d0 = 0;
    for (; d0 + kWideChunks * kLanes <= padded_dim; d0 += kWideChunks * kLanes) {
      between_blocks();
      accumulate_rows_block<T, kWideChunks>(c, r0, d0, a, a_row_stride, a_k_stride, b, depth,
                                            padded_dim, row_scale, overwrite);
    }
    for (; d0 < padded_dim; d0 += kLanes) {
      accumulate_rows_block<T, 1>(c, r0, d0, a, a_row_stride, a_k_stride, b, depth, padded_dim,
                                  row_scale, overwrite);
    }
  }
}

// Non-temporal (streaming) stores of one vector, for output rows written once and read by a
// later op: they skip reading in the lines about to be overwritten, and do not evict the
// tiles the kernel is working on. Callers issue store_fence() before their thread's work ends.
#if defined(__AVX512F__)
inline void stream_vector(float* out, const float* in, float scale) {
  _mm512_stream_ps(out, _mm512_mul_ps(_mm512_loadu_ps(in), _mm512_set1_ps(scale)));
}
inline void stream_vector(double* out, const double* in, double scale) {
  _mm512_stream_pd(out, _mm512_mul_pd(_mm512_loadu_pd(in), _mm512_set1_pd(scale)));
}
#elif defined(__AVX__)
inline void stream_vector(float* out, const float* in, float scale) {
  _mm256_stream_ps(out, _mm256_mul_ps(_mm256_loadu_ps(in), _mm256_set1_ps(scale)));
}
inline void stream_vector(double* out, const double* in, double scale) {
  _mm256_stream_pd(out, _mm256_mul_pd(_mm256_loadu_pd(in), _mm256_set1_pd(scale)));
}
#endif

// out[d] = in[d] * scale for d < dim (the same rounding as the plain loop), streamed where
// the target has vector stores: plain stores up to the first vector-aligned element, then
// streaming stores, then a plain tail.
template <typename T>
inline void scale_row_streaming(T* __restrict out, const T* __restrict in, T scale, int64_t dim) {
  int64_t d = 0;
#if defined(__AVX__)
  constexpr int64_t kLanes = lanes<T>();
  const uintptr_t address = reinterpret_cast<uintptr_t>(out);
  if (address % sizeof(T) == 0) {
    const int64_t misaligned = static_cast<int64_t>(address % kVectorBytes) / static_cast<int64_t>(sizeof(T));
    const int64_t head = std::min<int64_t>(dim, misaligned == 0 ? 0 : kLanes - misaligned);
    for (; d < head; ++d) out[d] = in[d] * scale;
    for (; d + kLanes <= dim; d += kLanes) stream_vector(out + d, in + d, scale);
  }
#endif
  for (; d < dim; ++d) out[d] = in[d] * scale;
}

// Orders this thread's streaming stores before what follows (another thread, or the caller
// after the parallel region, reads them).
inline void store_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

}  // namespace FASTFUSE_CPU_VARIANT
}  // namespace cpu
}  // namespace fastfuse
