// The CPU epilogue and backward passes. This file is compiled once per instruction-set level
// (CMakeLists.txt: baseline, avx2, avx512, avx512bf16), each time with FASTNN_ISA_NS naming the
// level, and dispatch.cpp picks one at run time for each call's dtype. The loops are plain C++
// that the compiler vectorises at the level's width: every function they call is inline and
// branch-free.
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <stdexcept>
#include <vector>

#include "convert.h"
#include "epilogue.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef FASTNN_ISA_NS
#error "FASTNN_ISA_NS must name the instruction-set level this file is compiled for"
#endif

namespace fastnn {
namespace cpu {
namespace FASTNN_ISA_NS {

namespace {

// Work is cut into row blocks of kRowBlock rows: one task each, or, when there are too few row
// blocks to keep every thread busy, row block x column range. A task walks its rows in order and
// each row in chunks of kChunk columns through L1-resident float buffers, so memory streams front
// to back (walking a tile column-chunk by column-chunk across rows runs ~3x slower: the hardware
// prefetchers lose track). The row blocks do not depend on the thread count, so the bias-gradient
// sums (one partial per row block, added in block order) are the same bits for any thread count.
constexpr int64_t kRowBlock = 64;
constexpr int64_t kChunk = 512;  // a multiple of 8, so mask bytes never straddle chunks
// Outputs of at least this many bytes are written with non-temporal stores (convert.h): far larger
// than the caches, so an ordinary store's read of each destination line is pure waste. Not for the
// two GELUs: their passes are bound by arithmetic, not memory, and streaming slowed them (8192x1024
// float32, 2 threads, AMD EPYC: exact gelu forward 6.0-6.6 ms streamed against 5.5-6.1 plain,
// backward 8.1-8.3 against 7.6-7.9; gelu_tanh 6.5 / 8.6 against 5.3 / 7.9), where silu, relu and
// the identity gained or broke even.
constexpr int64_t kStreamBytes = int64_t(16) << 20;

template <typename T, Act A>
bool streams(int64_t rows, int64_t cols) {
  return A != Act::kGelu && A != Act::kGeluTanh && rows * cols * int64_t(sizeof(T)) >= kStreamBytes;
}
// Below this many elements a pass runs on one thread: waking the others costs more.
constexpr int64_t kMinParallelElems = int64_t(1) << 15;

struct Tiling {
  int64_t rows, cols, row_blocks, col_block, col_blocks;
  Tiling(int64_t r, int64_t c, int num_threads)
      : rows(r), cols(c), row_blocks((r + kRowBlock - 1) / kRowBlock), col_block(c), col_blocks(1) {
    const int64_t want = 4 * int64_t(num_threads);
    if (row_blocks < want && cols > kChunk) {
      const int64_t split = std::min((want + row_blocks - 1) / row_blocks, (cols + kChunk - 1) / kChunk);
      col_block = ((cols + split - 1) / split + kChunk - 1) / kChunk * kChunk;
      col_blocks = (cols + col_block - 1) / col_block;
    }
  }
  int64_t tiles() const { return row_blocks * col_blocks; }
};

template <typename Fn>
void parallel_tiles(const Tiling& t, int num_threads, Fn&& fn) {
  const int64_t n = t.tiles();
  const bool parallel = num_threads > 1 && t.rows * t.cols >= kMinParallelElems && n > 1;
  (void)parallel;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (parallel)
  for (int64_t i = 0; i < n; ++i) {
    const int64_t rb = i / t.col_blocks, cb = i % t.col_blocks;
    const int64_t r0 = rb * kRowBlock, c0 = cb * t.col_block;
    fn(rb, r0, std::min(r0 + kRowBlock, t.rows), c0, std::min(c0 + t.col_block, t.cols));
  }
}

// Calls fn(start, n) for the kChunk-column chunks of [c0, c1).
template <typename Fn>
inline void for_chunks(int64_t c0, int64_t c1, Fn&& fn) {
  for (int64_t s = c0; s < c1; s += kChunk) fn(s, std::min(kChunk, c1 - s));
}

template <typename Fn>
void parallel_range(int64_t n, int num_threads, bool parallel, Fn&& fn) {
  (void)parallel;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (parallel)
  for (int64_t i = 0; i < n; ++i) fn(i);
}

template <typename T>
using CT = typename Compute<T>::type;

// Activation<A> at the accuracy T's results need: the 16-bit types round every result to 8 or 11
// significant bits, so they use the float math made for that (activations.h, Accuracy::kHalf).
template <typename T, Act A>
struct ActivationFor {
  static constexpr Accuracy kAccuracy = sizeof(T) == 2 ? Accuracy::kHalf : Accuracy::kFloat32;
  static CT<T> f(CT<T> z) { return Activation<A>::template f<kAccuracy>(z); }
  // dy * act'(z) as torch's backward forms it
  static CT<T> grad(CT<T> dy, CT<T> z) { return grad_times<A, kAccuracy>(dy, z); }
};

// Bias-gradient partial sums: double for float32 and float64 inputs (the sum must beat PyTorch's
// own float32 reduction; groups of 8 float32 rows are added in float first, see kSumRows), float
// for the 16-bit types (already far finer than their rounding).
template <typename T>
using AccT = typename std::conditional<sizeof(T) >= 4, double, float>::type;

// Bias converted once to the compute type (zeros when absent), shared by all threads.
template <typename T>
std::vector<CT<T>> bias_in_compute_type(const T* bias, int64_t cols) {
  std::vector<CT<T>> b(size_t(cols), CT<T>(0));
  if (bias)
    for (int64_t c = 0; c < cols; ++c) b[size_t(c)] = load(bias[c]);
  return b;
}

// Packs 0/1 flags into bits: bit k of byte j is flags[8j + k]. n_flags is a multiple of 8.
inline void pack_flags(const uint8_t* flags, int64_t n_flags, uint8_t* out) {
  for (int64_t j = 0; j < n_flags / 8; ++j) {
    uint64_t w;
    std::memcpy(&w, flags + 8 * j, 8);
    // multiplication gathers byte k's low bit into bit 56 + k (little-endian byte order)
    out[j] = uint8_t((w * 0x0102040810204080ull) >> 56);
  }
}

// The sign mask of n values (mask_bit: z > 0, for relu NaN too), packed into out; flags is scratch
// for at least n rounded up to 8 bytes.
template <Act A, typename C>
inline void store_sign_mask(const C* z, int64_t n, uint8_t* flags, uint8_t* out) {
  FASTNN_SIMD
  for (int64_t i = 0; i < n; ++i) flags[i] = mask_bit<A>(z[i]);
  const int64_t padded = (n + 7) & ~int64_t(7);
  for (int64_t i = n; i < padded; ++i) flags[i] = 0;
  pack_flags(flags, padded, out);
}

// The inverse: flags[8j + k] = bit k of bits[j], for n_flags (a multiple of 8) flags. Bytes are
// spread to words and tested eight at a time, so the loops that read flags vectorise.
inline void unpack_flags(const uint8_t* bits, int64_t n_flags, uint8_t* flags) {
  for (int64_t j = 0; j < n_flags / 8; ++j) {
    // byte k of w keeps bit k of the mask byte; adding 0x7f per byte sets bit 7 when non-zero
    const uint64_t w = (uint64_t(bits[j]) * 0x0101010101010101ull) & 0x8040201008040201ull;
    const uint64_t f = ((w + 0x7f7f7f7f7f7f7f7full) >> 7) & 0x0101010101010101ull;
    std::memcpy(flags + 8 * j, &f, 8);
  }
}

// Column sums of the per-row-block partials, in block order, then rounded to the output type.
template <typename P, typename O>
void reduce_partials(std::vector<P>& partial, int64_t row_blocks, int64_t cols, O* out,
                     int num_threads) {
  const bool parallel = num_threads > 1 && row_blocks * cols >= kMinParallelElems;
  const int64_t chunks = (cols + kChunk - 1) / kChunk;
  parallel_range(chunks, num_threads, parallel, [&](int64_t ch) {
    const int64_t c0 = ch * kChunk, c1 = std::min(c0 + kChunk, cols);
    P* sum = partial.data();  // row block 0 accumulates the others
    for (int64_t rb = 1; rb < row_blocks; ++rb) {
      const P* p = partial.data() + rb * cols;
      FASTNN_SIMD
      for (int64_t c = c0; c < c1; ++c) sum[c] += p[c];
    }
    for (int64_t c = c0; c < c1; ++c) out[c] = O(sum[c]);
  });
}

// part[i] += v[i]. Its own loop: mixing the float math of a pass with double sums runs slower.
template <typename P, typename C>
inline void add_partial(P* part, const C* v, int64_t n) {
  FASTNN_SIMD
  for (int64_t i = 0; i < n; ++i) part[i] += v[i];
}

// Rows summed in the compute type before their sum goes into a partial (float32 into double):
// a tree of kSumRows rows adds log2(kSumRows) roundings, each at most half an ulp of a sum of 2-8
// rows, and converts and adds in double once per kSumRows rows. (With pairs of rows, one rounding,
// the float32 2048x3072 gelu backward pass took 4.9 ms with the bias gradient against 4.0 without
// it; groups of 8 made it 1.05-1.07x faster there and 1.11x at 256x3072, and left memory-bound
// passes as they were. Xeon with AMX, 2 threads.)
constexpr int64_t kSumRows = 8;

// part[i] += the sum of the kSumRows rows ending at v (row stride `cols`), as a tree.
template <typename P, typename C>
inline void add_partial_rows(P* part, const C* v, int64_t cols, int64_t n) {
  const C* a = v - 7 * cols;
  FASTNN_SIMD
  for (int64_t i = 0; i < n; ++i) {
    const C s01 = a[i] + a[i + cols], s23 = a[i + 2 * cols] + a[i + 3 * cols];
    const C s45 = a[i + 4 * cols] + a[i + 5 * cols], s67 = a[i + 6 * cols] + v[i];
    part[i] += P((s01 + s23) + (s45 + s67));
  }
}

// The same for row r of a task's rows [r0, r1) of a row-major matrix with `cols` columns, chunk v
// of which is already in memory: each kSumRows-th row of the task reads back the rows before it
// (still in cache) and adds them all; after a last, shorter group its rows are added one by one.
template <typename P, typename C>
inline void add_partial_by_row_groups(P* part, const C* v, int64_t cols, int64_t r, int64_t r0, int64_t r1,
                                      int64_t n) {
  static_assert(kSumRows == 8, "add_partial_rows adds 8 rows");
  const int64_t j = (r - r0) % kSumRows;
  if (j == kSumRows - 1) {
    add_partial_rows(part, v, cols, n);
  } else if (r + 1 == r1) {
    for (int64_t k = j; k >= 0; --k) add_partial(part, v - k * cols, n);
  }
  // else: added with a later row
}

// Asks for the lines of d[0, n), a chunk's output, before the chunk's arithmetic. For the 16-bit
// backward passes that also sum the bias gradient: their chunks run slower than the arithmetic and
// memory traffic would say while the output lines are still coming from memory (2 threads, AMD EPYC
// Zen 5, paired runs: bfloat16 2048x3072 relu backward with db 0.48-0.67 ms against 0.54-1.01 in five,
// 8192x768 0.40-0.43 against 0.65-0.92 in three, float16 alike; swiglu with both db 1.92-2.20 against
// 2.12-2.45 in five; unchanged without db, and for float32 no clear change either way).
template <typename T>
inline void prefetch_for_write(T* d, int64_t n) {
  constexpr int64_t kPerLine = 64 / int64_t(sizeof(T));
  for (int64_t i = 0; i < n; i += kPerLine) __builtin_prefetch(d + i, 1);
  __builtin_prefetch(d + n - 1, 1);
}

// v[i] += b[i]: a chunk's bias, in the compute type.
template <typename C>
inline void add_bias(C* v, const C* b, int64_t n) {
  FASTNN_SIMD
  for (int64_t i = 0; i < n; ++i) v[i] += b[i];
}

template <typename T, Act A>
void bias_act_forward_t(int64_t rows, int64_t cols, const T* acc, const T* bias, T* y,
                        uint8_t* mask, int num_threads) {
  using F = ActivationFor<T, A>;
  using C = CT<T>;
  const std::vector<C> b = bias_in_compute_type(bias, cols);
  const int64_t mbytes = mask_row_bytes(cols);
  const bool stream = streams<T, A>(rows, cols);
  parallel_tiles(Tiling(rows, cols, num_threads), num_threads,
                 [&](int64_t, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    alignas(64) C v[kChunk];
    alignas(64) uint8_t flags[kChunk];
    for (int64_t r = r0; r < r1; ++r) for_chunks(c0, c1, [&](int64_t s, int64_t n) {
      const int64_t o = r * cols + s;
      const C* bc = b.data() + s;
      if constexpr (widens_inline<T>) {
        if (!mask) {
          // widened as read (convert.h; bf16 256x3072 gelu, 2 threads, AVX-512 AMD EPYC: 163-191 us
          // against 233-247 with a conversion loop of its own). float / double go straight to y
          // unless streamed (each element is read before it is written, so y may be acc)
          const T* a = acc + o;
          C* out = v;
          if constexpr (std::is_same<T, C>::value) {
            if (!stream) out = y + o;
          }
          if (bias) {
            FASTNN_SIMD
            for (int64_t i = 0; i < n; ++i) out[i] = F::f(load(a[i]) + bc[i]);
          } else {
            FASTNN_SIMD
            for (int64_t i = 0; i < n; ++i) out[i] = F::f(load(a[i]));
          }
          if (out == v) store_chunk(stream, v, y + o, n);
          return;
        }
      }
      to_compute(acc + o, v, n);  // the whole chunk is read before y (maybe acc) is written
      if (bias) add_bias(v, bc, n);
      if (mask) store_sign_mask<A>(v, n, flags, mask + r * mbytes + s / 8);
      FASTNN_SIMD
      for (int64_t i = 0; i < n; ++i) v[i] = F::f(v[i]);
      store_chunk(stream, v, y + o, n);
    });
    if (stream) store_fence();
  });
}

// The forward pass over a product computed transposed (the caller's GEMM wrote acc_t = Z^T,
// [cols, rows], with the bias, or without it and the bias passed here, added in float as the
// row-major pass does): y = act(Z) row-major, and the product itself row-major where backward needs
// it (without the bias passed here: backward adds it again), or Z's sign mask. A task takes a block
// of rows x columns (TBlock): it gathers the block into an L1 buffer and then runs the row-major
// pass's loops over the buffer's rows.
template <typename T>
struct TBlock {
  // one whole 64-byte line of each column of acc_t (16-bit types had half of one, the other half
  // read again by the next task), and a 16 KB buffer of the compute type. With the gather's
  // prefetches (convert.h): bfloat16 256x3072 gelu pass from Z^T 0.56-0.58 ms, from 0.72 (Xeon
  // with AMX, 2 threads; 0.48-0.50 row-major)
  static constexpr int64_t kRows = 64 / int64_t(sizeof(T));
  static constexpr int64_t kCols = 16384 / (kRows * int64_t(sizeof(CT<T>)));  // a multiple of 8: mask
                                                                              // bytes never straddle
};

// Calls fn(r0, nr, c0, n) for the TBlock<T> blocks of a [rows, cols] output, one task each, a column
// block's row blocks in a row: consecutive tasks read the next line of the same columns of Z^T, whose
// pages and TLB entries are still at hand (3-10% faster than row block by row block, float32 and
// bfloat16 256x3072 - 512x4096, Xeon with AMX, 2 threads).
template <typename T, typename Fn>
void parallel_transposed_blocks(int64_t rows, int64_t cols, int num_threads, Fn&& fn) {
  constexpr int64_t kTRows = TBlock<T>::kRows, kTCols = TBlock<T>::kCols;
  const int64_t row_blocks = (rows + kTRows - 1) / kTRows, col_blocks = (cols + kTCols - 1) / kTCols;
  const bool parallel = num_threads > 1 && rows * cols >= kMinParallelElems && row_blocks * col_blocks > 1;
  (void)parallel;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (parallel)
  for (int64_t task = 0; task < row_blocks * col_blocks; ++task) {
    const int64_t r0 = task % row_blocks * kTRows, c0 = task / row_blocks * kTCols;
    fn(r0, std::min(kTRows, rows - r0), c0, std::min(kTCols, cols - c0));
  }
}

template <typename T, Act A>
void act_forward_from_transposed_t(int64_t rows, int64_t cols, const T* acc_t, int64_t ld_t, const T* bias,
                                   T* y, T* z, uint8_t* mask, int num_threads) {
  using F = ActivationFor<T, A>;
  using C = CT<T>;
  const std::vector<C> b = bias_in_compute_type(bias, cols);
  const int64_t mbytes = mask_row_bytes(cols);
  constexpr int64_t kTCols = TBlock<T>::kCols;
  parallel_transposed_blocks<T>(rows, cols, num_threads, [&](int64_t r0, int64_t nr, int64_t c0, int64_t n) {
    alignas(64) C v[TBlock<T>::kRows * kTCols];
    alignas(64) uint8_t flags[kTCols];
    gather_transposed(acc_t + c0 * ld_t + r0, ld_t, nr, n, v, kTCols);
    for (int64_t i = 0; i < nr; ++i) {
      C* row = v + i * kTCols;
      const int64_t o = (r0 + i) * cols + c0;
      if (z) from_compute(row, z + o, n);
      if (bias) add_bias(row, b.data() + c0, n);
      if (mask) store_sign_mask<A>(row, n, flags, mask + (r0 + i) * mbytes + c0 / 8);
      FASTNN_SIMD
      for (int64_t k = 0; k < n; ++k) row[k] = F::f(row[k]);
      from_compute(row, y + o, n);
    }
  });
}

// The gated unit's forward from its two products computed transposed (as above, each bias either
// in its product or passed here): y, and the products row-major when backward needs them.
template <typename T, Act A>
void glu_forward_from_transposed_t(int64_t rows, int64_t cols, const T* gate_t, const T* up_t, int64_t ld_t,
                                   const T* bias_g, const T* bias_u, T* y, T* z_gate, T* z_up, int num_threads) {
  using F = ActivationFor<T, A>;
  using C = CT<T>;
  const std::vector<C> bg = bias_in_compute_type(bias_g, cols), bu = bias_in_compute_type(bias_u, cols);
  constexpr int64_t kTCols = TBlock<T>::kCols;
  parallel_transposed_blocks<T>(rows, cols, num_threads, [&](int64_t r0, int64_t nr, int64_t c0, int64_t n) {
    alignas(64) C g[TBlock<T>::kRows * kTCols];
    alignas(64) C u[TBlock<T>::kRows * kTCols];
    gather_transposed(gate_t + c0 * ld_t + r0, ld_t, nr, n, g, kTCols);
    gather_transposed(up_t + c0 * ld_t + r0, ld_t, nr, n, u, kTCols);
    for (int64_t i = 0; i < nr; ++i) {
      C* gr = g + i * kTCols;
      C* ur = u + i * kTCols;
      const int64_t o = (r0 + i) * cols + c0;
      if (z_gate) from_compute(gr, z_gate + o, n);
      if (z_up) from_compute(ur, z_up + o, n);
      if (bias_g) add_bias(gr, bg.data() + c0, n);
      if (bias_u) add_bias(ur, bu.data() + c0, n);
      FASTNN_SIMD
      for (int64_t k = 0; k < n; ++k) gr[k] = F::f(gr[k]) * ur[k];
      from_compute(gr, y + o, n);
    }
  });
}

template <typename T, Act A>
void act_backward_t(int64_t rows, int64_t cols, const T* dy, const void* saved, const T* bias,
                    T* dz, CT<T>* dbias, int num_threads) {
  using F = ActivationFor<T, A>;
  using C = CT<T>;
  using P = AccT<T>;
  constexpr Saved kind = saved_for(A);
  const Tiling t(rows, cols, num_threads);
  std::vector<P> partial(dbias ? size_t(t.row_blocks * cols) : 0, P(0));
  const std::vector<C> b = bias_in_compute_type(kind == Saved::kPreact ? bias : nullptr, cols);
  const int64_t mbytes = mask_row_bytes(cols);
  const bool stream = kind != Saved::kNothing && streams<T, A>(rows, cols);
  parallel_tiles(t, num_threads, [&](int64_t rb, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    alignas(64) C g[kChunk];
    alignas(64) C zc[kChunk];
    alignas(64) uint8_t flags[kChunk];
    for (int64_t r = r0; r < r1; ++r) for_chunks(c0, c1, [&](int64_t s, int64_t n) {
      const int64_t o = r * cols + s;
      P* part = dbias ? partial.data() + rb * cols + s : nullptr;
      if (sizeof(T) == 2 && part && kind == Saved::kSignMask) prefetch_for_write(dz + o, n);
      if constexpr (widens_inline<T> && kind == Saved::kPreact) {
        // dY and the product widened as read (as the forward pass; bf16: 208-247 us against 278-292);
        // float / double dz straight to memory unless streamed; then its bias-gradient partial
        // from the hot chunk
        const T* d = dy + o;
        const T* zr = static_cast<const T*>(saved) + o;
        const C* bc = b.data() + s;
        C* out = g;
        if constexpr (std::is_same<T, C>::value) {
          if (!stream) out = dz + o;
        }
        FASTNN_SIMD
        for (int64_t i = 0; i < n; ++i) out[i] = F::grad(load(d[i]), load(zr[i]) + bc[i]);
        if (out == g) {
          if (part) add_partial(part, g, n);
          store_chunk(stream, g, dz + o, n);
        } else if (part) {
          // float / double written straight to dz: its partial from groups of rows read back (by
          // pairs against row by row: float32 2048x3072, 2 threads, AVX-512 AMD EPYC: gelu's pass
          // with the bias gradient took 2.53-2.83 ms against 3.06-3.27, swiglu's 4.16-4.46 against
          // 4.66-5.20)
          add_partial_by_row_groups(part, out, cols, r, r0, r1, n);
        }
        return;
      }
      if constexpr (std::is_same<T, C>::value && kind == Saved::kNothing) {
        // the identity's float / double bias gradient: dY's own rows, by groups
        if (part) add_partial_by_row_groups(part, dy + o, cols, r, r0, r1, n);
        return;
      }
      to_compute(dy + o, g, n);
      if (kind == Saved::kSignMask) {
        unpack_flags(static_cast<const uint8_t*>(saved) + r * mbytes + s / 8, (n + 7) & ~int64_t(7), flags);
        FASTNN_SIMD
        for (int64_t i = 0; i < n; ++i) g[i] = grad_through_mask<A>(g[i], flags[i] != 0);
      } else if (kind == Saved::kPreact) {
        to_compute(static_cast<const T*>(saved) + o, zc, n);
        const C* bc = b.data() + s;
        FASTNN_SIMD
        for (int64_t i = 0; i < n; ++i) g[i] = F::grad(g[i], zc[i] + bc[i]);
      }
      if (part) add_partial(part, g, n);
      if (kind != Saved::kNothing) store_chunk(stream, g, dz + o, n);
    });
    if (stream) store_fence();
  });
  if (dbias) reduce_partials(partial, t.row_blocks, cols, dbias, num_threads);
}

template <typename T, Act A>
void glu_forward_t(int64_t rows, int64_t cols, const T* acc_g, const T* acc_u, const T* bias_g,
                   const T* bias_u, T* y, int num_threads) {
  using F = ActivationFor<T, A>;
  using C = CT<T>;
  const std::vector<C> bg = bias_in_compute_type(bias_g, cols), bu = bias_in_compute_type(bias_u, cols);
  parallel_tiles(Tiling(rows, cols, num_threads), num_threads,
                 [&](int64_t, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    alignas(64) C g[kChunk];
    alignas(64) C u[kChunk];
    for (int64_t r = r0; r < r1; ++r) for_chunks(c0, c1, [&](int64_t s, int64_t n) {
      const int64_t o = r * cols + s;
      const C* bgc = bg.data() + s;
      const C* buc = bu.data() + s;
      if constexpr (widens_inline<T>) {
        const T* ag = acc_g + o;
        const T* au = acc_u + o;
        FASTNN_SIMD
        for (int64_t i = 0; i < n; ++i) g[i] = F::f(load(ag[i]) + bgc[i]) * (load(au[i]) + buc[i]);
      } else {
        to_compute(acc_g + o, g, n);
        to_compute(acc_u + o, u, n);
        FASTNN_SIMD
        for (int64_t i = 0; i < n; ++i) g[i] = F::f(g[i] + bgc[i]) * (u[i] + buc[i]);
      }
      from_compute(g, y + o, n);
    });
  });
}

template <typename T, Act A>
void glu_backward_t(int64_t rows, int64_t cols, const T* dy, const T* acc_g, const T* acc_u,
                    const T* bias_g, const T* bias_u, T* dz_g, T* dz_u, CT<T>* dbias_g,
                    CT<T>* dbias_u, int num_threads) {
  using F = ActivationFor<T, A>;
  using C = CT<T>;
  using P = AccT<T>;
  const Tiling t(rows, cols, num_threads);
  std::vector<P> part_g(dbias_g ? size_t(t.row_blocks * cols) : 0, P(0));
  std::vector<P> part_u(dbias_u ? size_t(t.row_blocks * cols) : 0, P(0));
  const std::vector<C> bg = bias_in_compute_type(bias_g, cols), bu = bias_in_compute_type(bias_u, cols);
  parallel_tiles(t, num_threads, [&](int64_t rb, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    alignas(64) C g[kChunk];
    alignas(64) C zg[kChunk];
    alignas(64) C zu[kChunk];
    for (int64_t r = r0; r < r1; ++r) for_chunks(c0, c1, [&](int64_t s, int64_t n) {
      const int64_t o = r * cols + s;
      P* pg = dbias_g ? part_g.data() + rb * cols + s : nullptr;
      P* pu = dbias_u ? part_u.data() + rb * cols + s : nullptr;
      if (sizeof(T) == 2 && (pg || pu)) {
        prefetch_for_write(dz_g + o, n);
        prefetch_for_write(dz_u + o, n);
      }
      const C* bgc = bg.data() + s;
      const C* buc = bu.data() + s;
      if constexpr (widens_inline<T>) {
        // read straight from dY and the products; dz_gate and dz_up go to zg and zu
        const T* d = dy + o;
        const T* ag = acc_g + o;
        const T* au = acc_u + o;
        FASTNN_SIMD
        for (int64_t i = 0; i < n; ++i) {
          const C a = load(ag[i]) + bgc[i], u = load(au[i]) + buc[i], gi = load(d[i]);
          zg[i] = F::grad(gi * u, a);
          zu[i] = gi * F::f(a);
        }
      } else {
        to_compute(dy + o, g, n);
        to_compute(acc_g + o, zg, n);
        to_compute(acc_u + o, zu, n);
        // in place: zg becomes dz_gate, zu becomes dz_up
        FASTNN_SIMD
        for (int64_t i = 0; i < n; ++i) {
          const C a = zg[i] + bgc[i], u = zu[i] + buc[i];
          zg[i] = F::grad(g[i] * u, a);
          zu[i] = g[i] * F::f(a);
        }
      }
      from_compute(zg, dz_g + o, n);
      from_compute(zu, dz_u + o, n);
      if constexpr (std::is_same<T, C>::value) {
        // float / double: the partials by groups of rows, from dz (as act_backward_t)
        if (pg) add_partial_by_row_groups(pg, dz_g + o, cols, r, r0, r1, n);
        if (pu) add_partial_by_row_groups(pu, dz_u + o, cols, r, r0, r1, n);
      } else {
        if (pg) add_partial(pg, zg, n);
        if (pu) add_partial(pu, zu, n);
      }
    });
  });
  if (dbias_g) reduce_partials(part_g, t.row_blocks, cols, dbias_g, num_threads);
  if (dbias_u) reduce_partials(part_u, t.row_blocks, cols, dbias_u, num_threads);
}

// dst = src^T for the weight-gradient GEMM dW = dZ^T X (see transpose in epilogue.h): tiles of
// 64 x 64 elements, each transposed as 8 x 8 blocks in registers where the ISA allows (SSE2's
// 16-bit unpacks for bfloat16 / float16, bit for bit; AVX's float shuffles for float32), the edges
// element by element.
template <typename T>
inline void transpose_8x8_block(const T* s, int64_t ls, T* d, int64_t ld) {
#if defined(__SSE2__)
  if constexpr (sizeof(T) == 2) {
    __m128i r[8], t[8];
    for (int k = 0; k < 8; ++k) r[k] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + k * ls));
    for (int k = 0; k < 8; k += 2) {  // pairs of rows interleaved: a0 b0 a1 b1 ..
      t[k] = _mm_unpacklo_epi16(r[k], r[k + 1]);
      t[k + 1] = _mm_unpackhi_epi16(r[k], r[k + 1]);
    }
    for (int k = 0; k < 8; k += 4) {  // quads of rows: a0 b0 c0 d0 a1 b1 c1 d1 ..
      r[k] = _mm_unpacklo_epi32(t[k], t[k + 2]);
      r[k + 1] = _mm_unpackhi_epi32(t[k], t[k + 2]);
      r[k + 2] = _mm_unpacklo_epi32(t[k + 1], t[k + 3]);
      r[k + 3] = _mm_unpackhi_epi32(t[k + 1], t[k + 3]);
    }
    for (int k = 0; k < 4; ++k) {  // r[k] holds columns 2k, 2k + 1 of rows 0-3, r[k + 4] of rows 4-7
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 2 * k * ld), _mm_unpacklo_epi64(r[k], r[k + 4]));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + (2 * k + 1) * ld), _mm_unpackhi_epi64(r[k], r[k + 4]));
    }
    return;
  }
#endif
#if defined(__AVX__)
  if constexpr (std::is_same<T, float>::value) {
    transpose_8x8(s, ls, d, ld);
    return;
  }
#endif
  for (int i = 0; i < 8; ++i)
    for (int k = 0; k < 8; ++k) d[k * ld + i] = s[i * ls + k];
}

// A task transposes a 64 x 64 tile into an L1 buffer, then writes the buffer's rows out with
// non-temporal stores. dst's rows are hundreds of lines apart and each gets one or two lines per tile:
// written with ordinary stores, every line was first read for ownership and the reads went unpredicted
// (bfloat16 2048x3072, one thread: 8.5 ms, against 2.2 ms streamed and 1.8-2.4 ms for a plain copy).
// The GEMM that reads dst finds it in memory rather than the caches, which costs it nothing visible.
template <typename T>
void transpose_t(int64_t rows, int64_t cols, const T* src, int64_t ld_src, T* dst, int64_t ld_dst,
                 int num_threads) {
  constexpr int64_t kTile = 64, kLd = kTile + 8;
  const int64_t row_tiles = (rows + kTile - 1) / kTile, col_tiles = (cols + kTile - 1) / kTile;
  const bool parallel = num_threads > 1 && rows * cols >= kMinParallelElems;
  parallel_range(row_tiles * col_tiles, num_threads, parallel, [&](int64_t task) {
    alignas(64) T buf[kTile * kLd];
    const int64_t r0 = task / col_tiles * kTile, c0 = task % col_tiles * kTile;
    const int64_t nr = std::min(kTile, rows - r0), nc = std::min(kTile, cols - c0);
    const T* s = src + r0 * ld_src + c0;
    int64_t r = 0;
    for (; r + 8 <= nr; r += 8) {
      int64_t c = 0;
      for (; c + 8 <= nc; c += 8) transpose_8x8_block(s + r * ld_src + c, ld_src, buf + c * kLd + r, kLd);
      for (; c < nc; ++c)
        for (int64_t i = r; i < r + 8; ++i) buf[c * kLd + i] = s[i * ld_src + c];
    }
    for (; r < nr; ++r)
      for (int64_t c = 0; c < nc; ++c) buf[c * kLd + r] = s[r * ld_src + c];
    for (int64_t c = 0; c < nc; ++c) copy_streaming(buf + c * kLd, dst + (c0 + c) * ld_dst + r0, nr);
    store_fence();
  });
}

// Calls fn(T{}) with the storage type of dtype. A level builds only the types dispatch.cpp sends
// it (FASTNN_ISA_BF16_ONLY, FASTNN_ISA_NO_FLOAT64: see CMakeLists.txt); the others are not
// instantiated here, which is most of the build's time.
template <typename Fn>
void dispatch_dtype(DType d, Fn&& fn) {
  switch (d) {
#ifndef FASTNN_ISA_BF16_ONLY
    case DType::kFloat32: fn(float{}); return;
    case DType::kFloat16: fn(f16_t{}); return;
#ifndef FASTNN_ISA_NO_FLOAT64
    case DType::kFloat64: fn(double{}); return;
#endif
#endif
    case DType::kBFloat16: fn(bf16_t{}); return;
    default: break;
  }
  throw std::invalid_argument("fastnn cpu: dtype code not built at this instruction-set level");
}

template <typename Fn>
void dispatch_act_or_throw(Act a, Fn&& fn) {
  if (!dispatch_act(a, fn)) throw std::invalid_argument("fastnn cpu: unknown activation code");
}

}  // namespace

void bias_act_forward(DType dtype, Act act, int64_t rows, int64_t cols, const void* acc,
                      const void* bias, void* y, void* mask, int num_threads) {
  dispatch_dtype(dtype, [&](auto tv) {
    using T = decltype(tv);
    dispatch_act_or_throw(act, [&](auto at) {
      bias_act_forward_t<T, decltype(at)::value>(rows, cols, static_cast<const T*>(acc),
                                                 static_cast<const T*>(bias), static_cast<T*>(y),
                                                 static_cast<uint8_t*>(mask), num_threads);
    });
  });
}

void act_forward_from_transposed(DType dtype, Act act, int64_t rows, int64_t cols, const void* acc_t,
                                 int64_t ld_t, const void* bias, void* y, void* z, void* mask, int num_threads) {
  dispatch_dtype(dtype, [&](auto tv) {
    using T = decltype(tv);
    dispatch_act_or_throw(act, [&](auto at) {
      act_forward_from_transposed_t<T, decltype(at)::value>(rows, cols, static_cast<const T*>(acc_t), ld_t,
                                                            static_cast<const T*>(bias),
                                                            static_cast<T*>(y), static_cast<T*>(z),
                                                            static_cast<uint8_t*>(mask), num_threads);
    });
  });
}

void glu_forward_from_transposed(DType dtype, Act gate_act, int64_t rows, int64_t cols, const void* gate_t,
                                 const void* up_t, int64_t ld_t, const void* bias_gate, const void* bias_up,
                                 void* y, void* z_gate, void* z_up, int num_threads) {
  dispatch_dtype(dtype, [&](auto tv) {
    using T = decltype(tv);
    dispatch_act_or_throw(gate_act, [&](auto at) {
      glu_forward_from_transposed_t<T, decltype(at)::value>(
          rows, cols, static_cast<const T*>(gate_t), static_cast<const T*>(up_t), ld_t,
          static_cast<const T*>(bias_gate), static_cast<const T*>(bias_up), static_cast<T*>(y),
          static_cast<T*>(z_gate), static_cast<T*>(z_up), num_threads);
    });
  });
}

void act_backward(DType dtype, Act act, int64_t rows, int64_t cols, const void* dy,
                  const void* saved, const void* bias, void* dz, void* dbias, int num_threads) {
  dispatch_dtype(dtype, [&](auto tv) {
    using T = decltype(tv);
    dispatch_act_or_throw(act, [&](auto at) {
      act_backward_t<T, decltype(at)::value>(rows, cols, static_cast<const T*>(dy), saved,
                                             static_cast<const T*>(bias), static_cast<T*>(dz),
                                             static_cast<CT<T>*>(dbias), num_threads);
    });
  });
}

void glu_forward(DType dtype, Act gate_act, int64_t rows, int64_t cols, const void* acc_gate,
                 const void* acc_up, const void* bias_gate, const void* bias_up, void* y,
                 int num_threads) {
  dispatch_dtype(dtype, [&](auto tv) {
    using T = decltype(tv);
    dispatch_act_or_throw(gate_act, [&](auto at) {
      glu_forward_t<T, decltype(at)::value>(
          rows, cols, static_cast<const T*>(acc_gate), static_cast<const T*>(acc_up),
          static_cast<const T*>(bias_gate), static_cast<const T*>(bias_up), static_cast<T*>(y),
          num_threads);
    });
  });
}

void glu_backward(DType dtype, Act gate_act, int64_t rows, int64_t cols, const void* dy,
                  const void* acc_gate, const void* acc_up, const void* bias_gate,
                  const void* bias_up, void* dz_gate, void* dz_up, void* dbias_gate,
                  void* dbias_up, int num_threads) {
  dispatch_dtype(dtype, [&](auto tv) {
    using T = decltype(tv);
    dispatch_act_or_throw(gate_act, [&](auto at) {
      glu_backward_t<T, decltype(at)::value>(
          rows, cols, static_cast<const T*>(dy), static_cast<const T*>(acc_gate),
          static_cast<const T*>(acc_up), static_cast<const T*>(bias_gate),
          static_cast<const T*>(bias_up), static_cast<T*>(dz_gate), static_cast<T*>(dz_up),
          static_cast<CT<T>*>(dbias_gate), static_cast<CT<T>*>(dbias_up), num_threads);
    });
  });
}

void transpose(DType dtype, int64_t rows, int64_t cols, const void* src, int64_t ld_src, void* dst,
               int64_t ld_dst, int num_threads) {
  dispatch_dtype(dtype, [&](auto tv) {
    using T = decltype(tv);
    transpose_t<T>(rows, cols, static_cast<const T*>(src), ld_src, static_cast<T*>(dst), ld_dst, num_threads);
  });
}

void eval_activation(DType dtype, Act act, int64_t n, const void* z, void* out, void* dout) {
  // float32 / float64 arrays; bfloat16 / float16 ask for their kernels' float math (before the
  // rounding to 16 bits) on float32 arrays
  const auto eval = [&](auto tv, auto storage) {
    using T = decltype(tv);
    dispatch_act_or_throw(act, [&](auto at) {
      using F = ActivationFor<decltype(storage), decltype(at)::value>;
      const T* zi = static_cast<const T*>(z);
      T* o = static_cast<T*>(out);
      T* d = static_cast<T*>(dout);
      FASTNN_SIMD
      for (int64_t i = 0; i < n; ++i) {
        o[i] = F::f(zi[i]);
        d[i] = F::grad(T(1), zi[i]);  // act'(z)
      }
    });
  };
  switch (dtype) {
    case DType::kFloat32: return eval(float(), float());
    case DType::kFloat64: return eval(double(), double());
    case DType::kBFloat16: return eval(float(), bf16_t());
    case DType::kFloat16: return eval(float(), f16_t());
  }
  throw std::invalid_argument("fastnn cpu: unknown dtype code");
}

}  // namespace FASTNN_ISA_NS
}  // namespace cpu
}  // namespace fastnn
