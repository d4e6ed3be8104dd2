// CUDA kernels for what cuBLASLt's epilogues lack: every activation's fused epilogue after a
// GEMM, the fused backward dZ = dY * act'(Z) with a deterministic bias-gradient reduction, and
// the gated unit. Matrices are row-major with a row stride (ld, in elements); the sign mask is
// cuBLASLt's RELU_AUX layout: row m's bits start at bit m * mask_ld_bits, bit c % 8 of byte c / 8.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "fastnn/activations.h"
#include "fastnn/dtype.h"

namespace fastnn {
namespace cuda {

// y = act(acc + bias) (bias may be null; acc may be y). mask, when not null, receives the sign
// bits of acc + bias (relu, leaky_relu).
void bias_act_forward(cudaStream_t stream, DType dtype, Act act, int64_t rows, int64_t cols, const void* acc,
                      int64_t ld_acc, const void* bias, void* y, int64_t ld_y, uint8_t* mask, int64_t mask_ld_bits);

// dz = dy * act'(z), z read from `z` (ld_z) or the sign mask; identity: dz = dy (dz may be dy).
// bias_grad ([cols] in dtype), when not null, receives the column sums of the unrounded dz, summed
// in float32 and rounded once; partial is float32 scratch of bias_grad_scratch_elems(rows, cols)
// elements (none, and may be null, where one row block holds every row: the kernel then writes
// bias_grad itself, in one launch).
void act_backward(cudaStream_t stream, DType dtype, Act act, int64_t rows, int64_t cols, const void* dy,
                  int64_t ld_dy, const void* z, int64_t ld_z, const uint8_t* mask, int64_t mask_ld_bits, void* dz,
                  int64_t ld_dz, void* bias_grad, float* partial);

// Gated unit on the two GEMM outputs (biases already added): y = act(z_gate) * z_up.
void glu_forward(cudaStream_t stream, DType dtype, Act gate_act, int64_t rows, int64_t cols, const void* z_gate,
                 const void* z_up, void* y);

// dz_up = dy * act(z_gate), dz_gate = dy * z_up * act'(z_gate); bias gradients as above (each
// with its own partial scratch).
void glu_backward(cudaStream_t stream, DType dtype, Act gate_act, int64_t rows, int64_t cols, const void* dy,
                  const void* z_gate, const void* z_up, void* dz_gate, void* dz_up, void* bias_grad_gate,
                  void* bias_grad_up, float* partial_gate, float* partial_up);

// Rows per bias-gradient partial sum: 16, or a multiple of 16 that keeps the row blocks within
// kMaxGradRowBlocks (so the partial sums stay small and the grid within CUDA's limits). Short row
// blocks give the backward kernels enough blocks to fill a GPU at transformer shapes (M = 4096,
// N = 768: 256 row blocks, where 64-row blocks gave 64). A function of the shape alone, so the
// reduction order never depends on the GPU.
constexpr int64_t kMaxGradRowBlocks = 1024;
inline int64_t grad_rows_per_block(int64_t rows) {
  const int64_t per_block = (rows + kMaxGradRowBlocks - 1) / kMaxGradRowBlocks;
  return 16 * (per_block > 16 ? (per_block + 15) / 16 : 1);
}
inline int64_t grad_row_blocks(int64_t rows) {
  const int64_t rpb = grad_rows_per_block(rows);
  return (rows + rpb - 1) / rpb;
}
// float32 elements of partial scratch a bias gradient needs (0: one row block, written directly).
inline int64_t bias_grad_scratch_elems(int64_t rows, int64_t cols) {
  const int64_t blocks = grad_row_blocks(rows);
  return blocks > 1 ? blocks * cols : 0;
}

}  // namespace cuda
}  // namespace fastnn
