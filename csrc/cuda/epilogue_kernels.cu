// CUDA kernels around the cuBLASLt GEMMs: see epilogue.h. Each thread handles VEC consecutive
// columns of a row (16-byte accesses when the rows allow it; the forward's pass over a whole buffer
// as one run of elements, with no row arithmetic), all arithmetic in float with the
// activation functors of fastnn/activations.h, one rounding at each store: for 16-bit outputs with
// the float math made for them (Accuracy::kHalf), as the CPU kernels.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>

#include "cuda_check.h"
#include "epilogue.h"

namespace fastnn {
namespace cuda {

namespace {

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// VEC elements moved as one aligned access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_f(const T* p, float (&out)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_f<T>(pk.v[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_f(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pk.v[i] = from_f<T>(in[i]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

constexpr int kThreads = 256;

template <typename T>
constexpr Accuracy kAccuracy = sizeof(T) == 2 ? Accuracy::kHalf : Accuracy::kFloat32;

template <Act A, typename T>
__device__ __forceinline__ float act_f(float z) {
  return Activation<A>::template f<kAccuracy<T>>(z);
}

// ---- forward epilogue --------------------------------------------------------------------------
// y[i] = act(acc[i]) over n elements laid out without gaps: the forward's pass over the GEMM's
// output, whose bias the GEMM added. VEC elements per step (16-byte accesses; acc and y aligned),
// no row arithmetic; the last n % VEC one at a time.
template <typename T, Act A, int VEC>
__global__ void act_flat_kernel(const T* acc, T* y, int64_t n) {
  const int64_t first = blockIdx.x * int64_t(blockDim.x) + threadIdx.x, step = int64_t(gridDim.x) * blockDim.x;
  const int64_t vecs = n / VEC;
  for (int64_t i = first; i < vecs; i += step) {
    float v[VEC];
    load_f<T, VEC>(acc + i * VEC, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = act_f<A, T>(v[k]);
    store_f<T, VEC>(y + i * VEC, v);
  }
  for (int64_t i = vecs * VEC + first; i < n; i += step) y[i] = from_f<T>(act_f<A, T>(to_f<T>(acc[i])));
}

// y = act(acc + bias) for any row strides, one element per step: the rest (a bias to add, rows
// with gaps such as gelu_tanh's padded kept z, unaligned memory).
template <typename T, Act A>
__global__ void bias_act_kernel(const T* acc, int64_t ld_acc, const T* bias, T* y, int64_t ld_y, int64_t rows,
                                int64_t cols) {
  const int64_t total = rows * cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    float v = to_f<T>(acc[r * ld_acc + c]);
    if (bias) v += to_f<T>(bias[c]);
    y[r * ld_y + c] = from_f<T>(act_f<A, T>(v));
  }
}

// Eight consecutive elements as 16-byte accesses (one for 16-bit types, two for float).
template <typename T>
__device__ __forceinline__ void load8_f(const T* p, float (&out)[8]) {
  constexpr int V = 16 / sizeof(T);
#pragma unroll
  for (int h = 0; h < 8; h += V) {
    float part[V];
    load_f<T, V>(p + h, part);
#pragma unroll
    for (int k = 0; k < V; ++k) out[h + k] = part[k];
  }
}

template <typename T>
__device__ __forceinline__ void store8_f(T* p, const float (&in)[8]) {
  constexpr int V = 16 / sizeof(T);
#pragma unroll
  for (int h = 0; h < 8; h += V) {
    float part[V];
#pragma unroll
    for (int k = 0; k < V; ++k) part[k] = in[h + k];
    store_f<T, V>(p + h, part);
  }
}

// One thread per mask byte: eight columns, their y values and the byte of sign bits (relu and
// leaky_relu). VEC8: the rows hold whole bytes (cols % 8 == 0) and allow 16-byte accesses; else
// one element at a time, the last byte of a row partly empty.
template <typename T, Act A, bool VEC8>
__global__ void bias_act_mask_kernel(const T* acc, int64_t ld_acc, const T* bias, T* y, int64_t ld_y, int64_t rows,
                                     int64_t cols, uint8_t* mask, int64_t mask_ld_bytes) {
  const int64_t total = rows * mask_ld_bytes;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / mask_ld_bytes, c0 = (i % mask_ld_bytes) * 8;
    uint32_t byte = 0;
    if (VEC8) {
      if (c0 < cols) {  // (the bytes past the row's last column, up to mask_ld_bytes, stay 0)
        float z[8];
        load8_f<T>(acc + r * ld_acc + c0, z);
        if (bias) {
          float b[8];
          load8_f<T>(bias + c0, b);
#pragma unroll
          for (int k = 0; k < 8; ++k) z[k] += b[k];
        }
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          byte |= uint32_t(mask_bit<A>(z[k])) << k;
          z[k] = act_f<A, T>(z[k]);
        }
        store8_f<T>(y + r * ld_y + c0, z);
      }
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const int64_t c = c0 + k;
        if (c < cols) {
          float z = to_f<T>(acc[r * ld_acc + c]);
          if (bias) z += to_f<T>(bias[c]);
          byte |= uint32_t(mask_bit<A>(z)) << k;
          y[r * ld_y + c] = from_f<T>(act_f<A, T>(z));
        }
      }
    }
    mask[i] = static_cast<uint8_t>(byte);
  }
}

// ---- backward: dz = dy * act'(z) and per-row-block column sums ---------------------------------
enum class Source { kNone, kPreact, kMask };

template <typename T, Act A, Source S, int VEC>
__global__ void act_backward_kernel(const T* dy, int64_t ld_dy, const T* z, int64_t ld_z, const uint8_t* mask,
                                    int64_t mask_ld_bytes, T* dz, int64_t ld_dz, int64_t rows, int64_t cols,
                                    int64_t rows_per_block, float* partial, T* bias_grad) {
  // block (x: column group, y: row block); each thread owns VEC columns over rows_per_block rows.
  // Column sums go to partial (one row per row block), or, with one row block, straight to
  // bias_grad (the same float32 sum, rounded once, as column_sum_kernel would give).
  const int64_t c = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) * VEC;
  if (c >= cols) return;
  const int64_t r0 = blockIdx.y * rows_per_block;
  const int64_t r1 = min(rows, r0 + rows_per_block);
  float sum[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) sum[k] = 0.0f;
  for (int64_t r = r0; r < r1; ++r) {
    float g[VEC];
    load_f<T, VEC>(dy + r * ld_dy + c, g);
    if (S == Source::kPreact) {
      float zv[VEC];
      load_f<T, VEC>(z + r * ld_z + c, zv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) g[k] = grad_times<A, kAccuracy<T>>(g[k], zv[k]);
    } else if (S == Source::kMask) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const int64_t ck = c + k;
        const bool on = (mask[r * mask_ld_bytes + (ck >> 3)] >> (ck & 7)) & 1;
        g[k] = grad_through_mask<A>(g[k], on);
      }
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) sum[k] += g[k];
    if (S != Source::kNone) store_f<T, VEC>(dz + r * ld_dz + c, g);
  }
  if (partial) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) partial[blockIdx.y * cols + c + k] = sum[k];
  }
  if (bias_grad) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) bias_grad[c + k] = from_f<T>(sum[k]);
  }
}

// bias_grad[c] = sum of partial[., c] over the row blocks, rounded once to T. A block covers 32
// columns with 8 lanes each: lane l sums row blocks l, l + 8, ... in order, then lane 0 adds the 8
// lane sums in order. The order is fixed by the shape: deterministic.
constexpr int kSumCols = 32, kSumLanes = 8;
template <typename T>
__global__ void column_sum_kernel(const float* partial, int64_t row_blocks, int64_t cols, T* out) {
  __shared__ float lane_sums[kSumLanes][kSumCols];
  const int64_t c = blockIdx.x * int64_t(kSumCols) + threadIdx.x;
  float s = 0.0f;
  if (c < cols)
    for (int64_t b = threadIdx.y; b < row_blocks; b += kSumLanes) s += partial[b * cols + c];
  lane_sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float total = 0.0f;
#pragma unroll
    for (int l = 0; l < kSumLanes; ++l) total += lane_sums[l][threadIdx.x];
    out[c] = from_f<T>(total);
  }
}

// ---- gated unit ----------------------------------------------------------------------------------
template <typename T, Act A, int VEC>
__global__ void glu_forward_kernel(const T* zg, const T* zu, T* y, int64_t n) {
  for (int64_t i = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) * VEC; i < n;
       i += int64_t(gridDim.x) * blockDim.x * VEC) {
    float g[VEC], u[VEC];
    load_f<T, VEC>(zg + i, g);
    load_f<T, VEC>(zu + i, u);
#pragma unroll
    for (int k = 0; k < VEC; ++k) g[k] = act_f<A, T>(g[k]) * u[k];
    store_f<T, VEC>(y + i, g);
  }
}

template <typename T, Act A, int VEC>
__global__ void glu_backward_kernel(const T* dy, const T* zg, const T* zu, T* dzg, T* dzu, int64_t rows, int64_t cols,
                                    int64_t rows_per_block, float* partial_g, float* partial_u, T* bias_grad_g,
                                    T* bias_grad_u) {
  // column sums as act_backward_kernel's: to the partials, or with one row block to the bias grads
  const int64_t c = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) * VEC;
  if (c >= cols) return;
  const int64_t r0 = blockIdx.y * rows_per_block;
  const int64_t r1 = min(rows, r0 + rows_per_block);
  float sg[VEC], su[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) sg[k] = su[k] = 0.0f;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * cols + c;
    float g[VEC], a[VEC], u[VEC];
    load_f<T, VEC>(dy + o, g);
    load_f<T, VEC>(zg + o, a);
    load_f<T, VEC>(zu + o, u);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float dg = grad_times<A, kAccuracy<T>>(g[k] * u[k], a[k]);
      u[k] = g[k] * act_f<A, T>(a[k]);
      a[k] = dg;
      sg[k] += a[k];
      su[k] += u[k];
    }
    store_f<T, VEC>(dzg + o, a);
    store_f<T, VEC>(dzu + o, u);
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    if (partial_g) partial_g[blockIdx.y * cols + c + k] = sg[k];
    if (partial_u) partial_u[blockIdx.y * cols + c + k] = su[k];
    if (bias_grad_g) bias_grad_g[c + k] = from_f<T>(sg[k]);
    if (bias_grad_u) bias_grad_u[c + k] = from_f<T>(su[k]);
  }
}

// ---- dispatch ------------------------------------------------------------------------------------
template <typename Fn>
void dispatch_type(DType d, Fn&& fn) {
  switch (d) {
    case DType::kFloat32: fn(float{}); return;
    case DType::kFloat16: fn(__half{}); return;
    case DType::kBFloat16: fn(__nv_bfloat16{}); return;
    default: throw std::invalid_argument("fastnn CUDA kernels: float32, float16 and bfloat16 only");
  }
}

template <typename Fn>
void dispatch_activation(Act a, Fn&& fn) {
  if (!dispatch_act(a, fn)) throw std::invalid_argument("fastnn CUDA kernels: unknown activation code");
}

bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Elements per 16-byte access when every row start allows it, else 1.
template <typename T>
int vec_width(int64_t cols, std::initializer_list<int64_t> lds, std::initializer_list<const void*> ptrs) {
  constexpr int v = 16 / sizeof(T);
  if (cols % v) return 1;
  for (int64_t ld : lds)
    if (ld % v) return 1;
  for (const void* p : ptrs)
    if (!aligned16(p)) return 1;
  return v;
}

unsigned grid_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

// Threads per block of the backward kernels, one per VEC-column group of a row: the row's warps
// split evenly over the fewest blocks of at most kThreads, so that no block is mostly idle (bf16:
// N = 768 is 96 groups, one block of 96 threads, not 256 with 160 idle; N = 3072 is 384 groups, two
// blocks of 192, not 256 and a half-idle 256; N = 6400, 800 groups: 4 x 224, not 4 x 256).
unsigned threads_for_columns(int64_t col_groups) {
  constexpr int64_t kMaxWarps = kThreads / 32;
  const int64_t warps = (col_groups + 31) / 32;
  const int64_t blocks = (warps + kMaxWarps - 1) / kMaxWarps;
  return static_cast<unsigned>((warps + blocks - 1) / blocks * 32);
}

// Grid of the backward kernels: (column-group blocks, row blocks).
dim3 backward_grid(int64_t col_groups, unsigned threads, int64_t rows) {
  return dim3(static_cast<unsigned>((col_groups + threads - 1) / threads), static_cast<unsigned>(grad_row_blocks(rows)));
}

template <typename T>
void reduce_bias_grad(cudaStream_t stream, const float* partial, int64_t rows, int64_t cols, T* out) {
  const dim3 block(kSumCols, kSumLanes);
  column_sum_kernel<T><<<static_cast<unsigned>((cols + kSumCols - 1) / kSumCols), block, 0, stream>>>(
      partial, grad_row_blocks(rows), cols, out);
  FASTNN_CUDA_CHECK_LAUNCH("column_sum_kernel");
}

// A bias gradient over more than one row block is summed through partial scratch (one row block:
// the backward kernel writes it itself, no scratch, no second launch): refuse a missing one.
void check_bias_grad_scratch(int64_t rows, const void* bias_grad, const float* partial) {
  if (bias_grad && grad_row_blocks(rows) > 1 && !partial)
    throw std::invalid_argument("fastnn CUDA kernels: a bias gradient over more than 16 rows needs partial scratch");
}

}  // namespace

void bias_act_forward(cudaStream_t stream, DType dtype, Act act, int64_t rows, int64_t cols, const void* acc,
                      int64_t ld_acc, const void* bias, void* y, int64_t ld_y, uint8_t* mask, int64_t mask_ld_bits) {
  if (rows == 0 || cols == 0) return;
  dispatch_type(dtype, [&](auto tv) {
    using T = decltype(tv);
    const T* a = static_cast<const T*>(acc);
    const T* b = static_cast<const T*>(bias);
    T* out = static_cast<T*>(y);
    dispatch_activation(act, [&](auto at) {
      constexpr Act A = decltype(at)::value;
      if (mask) {
        if constexpr (saved_for(A) == Saved::kSignMask) {
          const int64_t mask_ld_bytes = mask_ld_bits / 8;
          const unsigned grid = grid_for(rows * mask_ld_bytes);
          if (cols % 8 == 0 && vec_width<T>(cols, {ld_acc, ld_y}, {acc, bias, y}) > 1) {
            bias_act_mask_kernel<T, A, true><<<grid, kThreads, 0, stream>>>(a, ld_acc, b, out, ld_y, rows, cols, mask,
                                                                            mask_ld_bytes);
          } else {
            bias_act_mask_kernel<T, A, false><<<grid, kThreads, 0, stream>>>(a, ld_acc, b, out, ld_y, rows, cols, mask,
                                                                             mask_ld_bytes);
          }
          FASTNN_CUDA_CHECK_LAUNCH("bias_act_mask_kernel");
          return;
        } else {
          throw std::invalid_argument("fastnn CUDA kernels: a sign mask is kept for relu and leaky_relu only");
        }
      }
      if (!bias && ld_acc == cols && ld_y == cols && aligned16(acc) && aligned16(y)) {
        constexpr int V = 16 / sizeof(T);
        const int64_t n = rows * cols;
        act_flat_kernel<T, A, V><<<grid_for((n + V - 1) / V), kThreads, 0, stream>>>(a, out, n);
        FASTNN_CUDA_CHECK_LAUNCH("act_flat_kernel");
      } else {
        bias_act_kernel<T, A><<<grid_for(rows * cols), kThreads, 0, stream>>>(a, ld_acc, b, out, ld_y, rows, cols);
        FASTNN_CUDA_CHECK_LAUNCH("bias_act_kernel");
      }
    });
  });
}

void act_backward(cudaStream_t stream, DType dtype, Act act, int64_t rows, int64_t cols, const void* dy,
                  int64_t ld_dy, const void* z, int64_t ld_z, const uint8_t* mask, int64_t mask_ld_bits, void* dz,
                  int64_t ld_dz, void* bias_grad, float* partial) {
  if (cols == 0) return;
  if (rows == 0) {
    if (bias_grad) FASTNN_CUDA_CHECK(cudaMemsetAsync(bias_grad, 0, cols * dtype_size(dtype), stream));
    return;
  }
  const Saved kind = saved_for(act);
  if (kind == Saved::kNothing && !bias_grad) return;
  check_bias_grad_scratch(rows, bias_grad, partial);
  const bool one_block = grad_row_blocks(rows) == 1;
  dispatch_type(dtype, [&](auto tv) {
    using T = decltype(tv);
    const T* g = static_cast<const T*>(dy);
    const T* zp = static_cast<const T*>(z);
    T* d = static_cast<T*>(dz);
    T* db = static_cast<T*>(bias_grad);
    float* part = bias_grad && !one_block ? partial : nullptr;
    T* direct = one_block ? db : nullptr;
    dispatch_activation(act, [&](auto at) {
      constexpr Act A = decltype(at)::value;
      constexpr Source S = saved_for(A) == Saved::kNothing ? Source::kNone
                           : saved_for(A) == Saved::kSignMask ? Source::kMask
                                                              : Source::kPreact;
      const int64_t rpb = grad_rows_per_block(rows);
      const int vec = vec_width<T>(cols, {ld_dy, S == Source::kPreact ? ld_z : 0, S == Source::kNone ? 0 : ld_dz},
                                   {dy, S == Source::kPreact ? z : nullptr, S == Source::kNone ? nullptr : dz});
      if (vec > 1) {
        constexpr int V = 16 / sizeof(T);
        const unsigned threads = threads_for_columns(cols / V);
        act_backward_kernel<T, A, S, V><<<backward_grid(cols / V, threads, rows), threads, 0, stream>>>(
            g, ld_dy, zp, ld_z, mask, mask_ld_bits / 8, d, ld_dz, rows, cols, rpb, part, direct);
      } else {
        const unsigned threads = threads_for_columns(cols);
        act_backward_kernel<T, A, S, 1><<<backward_grid(cols, threads, rows), threads, 0, stream>>>(
            g, ld_dy, zp, ld_z, mask, mask_ld_bits / 8, d, ld_dz, rows, cols, rpb, part, direct);
      }
      FASTNN_CUDA_CHECK_LAUNCH("act_backward_kernel");
    });
    if (part) reduce_bias_grad(stream, part, rows, cols, db);
  });
}

void glu_forward(cudaStream_t stream, DType dtype, Act gate_act, int64_t rows, int64_t cols, const void* z_gate,
                 const void* z_up, void* y) {
  const int64_t n = rows * cols;
  if (n == 0) return;
  dispatch_type(dtype, [&](auto tv) {
    using T = decltype(tv);
    dispatch_activation(gate_act, [&](auto at) {
      constexpr Act A = decltype(at)::value;
      const T* g = static_cast<const T*>(z_gate);
      const T* u = static_cast<const T*>(z_up);
      T* out = static_cast<T*>(y);
      if (vec_width<T>(n, {}, {z_gate, z_up, y}) > 1) {
        constexpr int V = 16 / sizeof(T);
        glu_forward_kernel<T, A, V><<<grid_for(n / V), kThreads, 0, stream>>>(g, u, out, n);
      } else {
        glu_forward_kernel<T, A, 1><<<grid_for(n), kThreads, 0, stream>>>(g, u, out, n);
      }
      FASTNN_CUDA_CHECK_LAUNCH("glu_forward_kernel");
    });
  });
}

void glu_backward(cudaStream_t stream, DType dtype, Act gate_act, int64_t rows, int64_t cols, const void* dy,
                  const void* z_gate, const void* z_up, void* dz_gate, void* dz_up, void* bias_grad_gate,
                  void* bias_grad_up, float* partial_gate, float* partial_up) {
  if (cols == 0) return;
  if (rows == 0) {
    if (bias_grad_gate) FASTNN_CUDA_CHECK(cudaMemsetAsync(bias_grad_gate, 0, cols * dtype_size(dtype), stream));
    if (bias_grad_up) FASTNN_CUDA_CHECK(cudaMemsetAsync(bias_grad_up, 0, cols * dtype_size(dtype), stream));
    return;
  }
  check_bias_grad_scratch(rows, bias_grad_gate, partial_gate);
  check_bias_grad_scratch(rows, bias_grad_up, partial_up);
  const bool one_block = grad_row_blocks(rows) == 1;
  dispatch_type(dtype, [&](auto tv) {
    using T = decltype(tv);
    dispatch_activation(gate_act, [&](auto at) {
      constexpr Act A = decltype(at)::value;
      const int64_t rpb = grad_rows_per_block(rows);
      const T* g = static_cast<const T*>(dy);
      const T* zg = static_cast<const T*>(z_gate);
      const T* zu = static_cast<const T*>(z_up);
      T* dg = static_cast<T*>(dz_gate);
      T* du = static_cast<T*>(dz_up);
      T* bg = static_cast<T*>(bias_grad_gate);
      T* bu = static_cast<T*>(bias_grad_up);
      float* pg = bias_grad_gate && !one_block ? partial_gate : nullptr;
      float* pu = bias_grad_up && !one_block ? partial_up : nullptr;
      T* direct_g = one_block ? bg : nullptr;
      T* direct_u = one_block ? bu : nullptr;
      if (vec_width<T>(cols, {}, {dy, z_gate, z_up, dz_gate, dz_up}) > 1) {
        constexpr int V = 16 / sizeof(T);
        const unsigned threads = threads_for_columns(cols / V);
        glu_backward_kernel<T, A, V><<<backward_grid(cols / V, threads, rows), threads, 0, stream>>>(
            g, zg, zu, dg, du, rows, cols, rpb, pg, pu, direct_g, direct_u);
      } else {
        const unsigned threads = threads_for_columns(cols);
        glu_backward_kernel<T, A, 1><<<backward_grid(cols, threads, rows), threads, 0, stream>>>(
            g, zg, zu, dg, du, rows, cols, rpb, pg, pu, direct_g, direct_u);
      }
      FASTNN_CUDA_CHECK_LAUNCH("glu_backward_kernel");
      if (pg) reduce_bias_grad(stream, pg, rows, cols, bg);
      if (pu) reduce_bias_grad(stream, pu, rows, cols, bu);
    });
  });
}

}  // namespace cuda
}  // namespace fastnn
