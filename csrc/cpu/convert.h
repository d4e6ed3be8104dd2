// Chunk conversions between a storage type and the compute type (float, or double for double),
// for the CPU kernels. Kernels convert a chunk of a row into an L1-resident float buffer, do all
// arithmetic in pure-float loops (which vectorise cleanly), and convert back. Where the build's
// instruction set has conversion instructions they are used: F16C / AVX-512 for float16,
// AVX512-BF16 for bfloat16 (one instruction instead of a dozen integer operations per vector);
// elsewhere the branch-free conversions of fastnn/dtype.h, which the compiler vectorises.
// Included only by epilogue_kernels.cpp (its per-ISA namespace keeps each build's copy apart).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "fastnn/dtype.h"

#if defined(__SSE2__)  // every x86-64 CPU: the transpose's 16-bit unpacks (epilogue_kernels.cpp)
#include <immintrin.h>
#endif

#if defined(_OPENMP)
#define FASTNN_SIMD _Pragma("omp simd")
#else
#define FASTNN_SIMD
#endif

namespace fastnn {
namespace cpu {
namespace FASTNN_ISA_NS {

// Plain copies as vector loops, not memcpy: glibc's memcpy for a few KB uses `rep movsb`, which
// some CPUs (AMD Zen among them) run several times slower than vector moves. CMake builds this
// code with -fno-tree-loop-distribute-patterns so the compiler does not turn the loops back into
// memcpy calls.
template <typename T>
inline void copy_chunk(const T* s, T* d, int64_t n) {
  FASTNN_SIMD
  for (int64_t i = 0; i < n; ++i) d[i] = s[i];
}
inline void to_compute(const float* s, float* d, int64_t n) { copy_chunk(s, d, n); }
inline void to_compute(const double* s, double* d, int64_t n) { copy_chunk(s, d, n); }
inline void from_compute(const float* s, float* d, int64_t n) { copy_chunk(s, d, n); }
inline void from_compute(const double* s, double* d, int64_t n) { copy_chunk(s, d, n); }

inline void to_compute(const bf16_t* s, float* d, int64_t n) {
  const uint16_t* u = reinterpret_cast<const uint16_t*>(s);
  FASTNN_SIMD
  for (int64_t i = 0; i < n; ++i) d[i] = bf16_to_float(u[i]);
}

inline void from_compute(const float* s, bf16_t* d, int64_t n) {
  uint16_t* u = reinterpret_cast<uint16_t*>(d);
  int64_t i = 0;
#if defined(__AVX512BF16__)
  for (; i + 16 <= n; i += 16) {
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(s + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(u + i), reinterpret_cast<const __m256i&>(h));
  }
#endif
  FASTNN_SIMD
  for (int64_t j = i; j < n; ++j) u[j] = float_to_bf16(s[j]);
}

inline void to_compute(const f16_t* s, float* d, int64_t n) {
  const uint16_t* u = reinterpret_cast<const uint16_t*>(s);
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(d + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + i))));
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u + i))));
#endif
  FASTNN_SIMD
  for (int64_t j = i; j < n; ++j) d[j] = f16_to_float(u[j]);
}

inline void from_compute(const float* s, f16_t* d, int64_t n) {
  uint16_t* u = reinterpret_cast<uint16_t*>(d);
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(u + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(u + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  FASTNN_SIMD
  for (int64_t j = i; j < n; ++j) u[j] = float_to_f16(s[j]);
}

// Whether a loop can widen T to the compute type as it reads (a copy, or bfloat16's shift) instead
// of converting each chunk in a loop of its own first: one pass less over the L1 buffer. Not
// float16, whose conversion instructions (F16C, AVX-512) work in to_compute's own loop.
template <typename T>
constexpr bool widens_inline = !std::is_same<T, f16_t>::value;

// dst[i * ld_dst + c] = src[c * ld_src + i] in the compute type, for i < nr and c < n: a block of a
// transposed matrix gathered into an L1 buffer. With AVX: 8x8 tiles loaded as eight vectors of
// eight floats (16-bit types widened on the way: AVX2's shift for bfloat16, F16C for float16),
// transposed in registers (24 shuffles) and stored as eight vectors; the edges and other types one
// by one (one element at a time made a bfloat16 256x3072 gelu pass from Z^T 1.6x slower than the
// row-major pass).
template <typename T>
struct Gathers8x8 : std::false_type {};

#if defined(__AVX__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
template <>
struct Gathers8x8<float> : std::true_type {};
#endif
#if defined(__AVX2__)
inline __m256 load8(const bf16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
template <>
struct Gathers8x8<bf16_t> : std::true_type {};
#endif
#if defined(__AVX__) && defined(__F16C__)
inline __m256 load8(const f16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
template <>
struct Gathers8x8<f16_t> : std::true_type {};
#endif

#if defined(__AVX__)
template <typename T>
inline void transpose_8x8(const T* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m256 r[8], t[8];
  for (int k = 0; k < 8; ++k) r[k] = load8(src + k * ld_src);
  for (int k = 0; k < 8; k += 2) {
    t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
    t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
  }
  for (int k = 0; k < 8; k += 4) {
    r[k] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int k = 0; k < 4; ++k) {
    _mm256_storeu_ps(dst + k * ld_dst, _mm256_permute2f128_ps(r[k], r[k + 4], 0x20));
    _mm256_storeu_ps(dst + (k + 4) * ld_dst, _mm256_permute2f128_ps(r[k], r[k + 4], 0x31));
  }
}
#endif

template <typename T>
inline void gather_transposed(const T* src, int64_t ld_src, int64_t nr, int64_t n,
                              typename Compute<T>::type* dst, int64_t ld_dst) {
  int64_t c = 0;
#if defined(__AVX__)
  if constexpr (Gathers8x8<T>::value) {
    const int64_t nr8 = nr & ~int64_t(7);
    // Each column is a short run at its own address, which the hardware prefetchers do not follow:
    // the lines kAhead columns on are asked for while these are transposed.
    constexpr int64_t kAhead = 16;
    for (; c + 8 <= n; c += 8) {
      for (int64_t k = c + kAhead; k < std::min(c + kAhead + 8, n); ++k) {
        __builtin_prefetch(src + k * ld_src);
        __builtin_prefetch(src + k * ld_src + nr - 1);
      }
      for (int64_t i = 0; i < nr8; i += 8) transpose_8x8(src + c * ld_src + i, ld_src, dst + i * ld_dst + c, ld_dst);
      for (int64_t i = nr8; i < nr; ++i)
        for (int64_t k = 0; k < 8; ++k) dst[i * ld_dst + c + k] = load(src[(c + k) * ld_src + i]);
    }
  }
#endif
  for (; c < n; ++c)
    for (int64_t i = 0; i < nr; ++i) dst[i * ld_dst + c] = load(src[c * ld_src + i]);
}

// Non-temporal stores for outputs far larger than the caches: the write goes straight to memory
// instead of first reading each destination line (the read-for-ownership an ordinary store makes).
// Only whole, 32-byte aligned vectors; the rest is stored as usual. The caller fences (store_fence)
// before other threads read the output.
inline void from_compute_streaming(const float* s, float* d, int64_t n) {
  int64_t i = 0;
#if defined(__AVX__)
  if ((reinterpret_cast<uintptr_t>(d) & 31) == 0)
    for (; i + 8 <= n; i += 8) _mm256_stream_ps(d + i, _mm256_load_ps(s + i));
#endif
  copy_chunk(s + i, d + i, n - i);
}
// n elements copied with non-temporal stores where d is 16-byte aligned (SSE2, any x86-64), the
// rest with ordinary stores. Streaming pays for whole cache lines: give it line-aligned rows (lines
// shared with ordinary stores, or partly streamed from two sides, made a transpose 3-9x slower).
// The caller fences (store_fence) before other threads read d.
template <typename T>
inline void copy_streaming(const T* s, T* d, int64_t n) {
  int64_t i = 0;
#if defined(__SSE2__)
  constexpr int64_t kPer = 16 / int64_t(sizeof(T));
  if ((reinterpret_cast<uintptr_t>(d) & 15) == 0)
    for (; i + kPer <= n; i += kPer)
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
#endif
  copy_chunk(s + i, d + i, n - i);
}
// 16-bit outputs are half the bytes; they keep ordinary stores.
template <typename T>
inline void from_compute_streaming(const typename Compute<T>::type* s, T* d, int64_t n) { from_compute(s, d, n); }
// A finished chunk to its place in the output: streamed when the output is far larger than the
// caches (the kernels decide once per call), else stored as usual.
template <typename C, typename T>
inline void store_chunk(bool stream, const C* s, T* d, int64_t n) {
  if (stream)
    from_compute_streaming(s, d, n);
  else
    from_compute(s, d, n);
}
inline void store_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

}  // namespace FASTNN_ISA_NS
}  // namespace cpu
}  // namespace fastnn
