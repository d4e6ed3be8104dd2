// The CPU backend's fused passes around a GEMM (the GEMM itself comes from torch in Python).
// All buffers are dense row-major [rows, cols] in the element type `dtype`, except:
//   bias          [cols] in dtype, or null
//   sign mask     [rows, mask_row_bytes(cols)] uint8, bit (c % 8) of byte c / 8 is mask_bit(z[c])
//                 (activations.h: z > 0, for relu NaN too)
//   bias gradient [cols] float32 for the 16/32-bit types, float64 for float64, or null
// Each function runs on `num_threads` threads (OpenMP) and is deterministic for a given input.
#pragma once

#include <cstdint>

#include "fastnn/activations.h"
#include "fastnn/dtype.h"

namespace fastnn {
namespace cpu {

inline int64_t mask_row_bytes(int64_t cols) { return (cols + 7) / 8; }

// y = act(z), z = acc + bias computed in float and never rounded; y may be the same buffer as
// acc. `mask`, when not null, receives the sign mask of z (what relu and leaky_relu backward
// need). The other activations' backward reads acc itself (the GEMM product the caller keeps)
// and the bias again, so nothing more is written.
void bias_act_forward(DType dtype, Act act, int64_t rows, int64_t cols, const void* acc,
                      const void* bias, void* y, void* mask, int num_threads);

// The same from a product the GEMM wrote transposed: acc_t is [cols, rows] with rows ld_t >= rows
// elements apart, Z^T with the bias in it, or without and `bias` (not null) added here in float.
// Writes y = act(Z) and, when not null, the product row-major (z: acc_t's values, without the bias
// added here) and Z's sign mask (mask).
void act_forward_from_transposed(DType dtype, Act act, int64_t rows, int64_t cols, const void* acc_t,
                                 int64_t ld_t, const void* bias, void* y, void* z, void* mask,
                                 int num_threads);

// dz = dy * act'(z), as torch's backward forms it (grad_times / grad_through_mask in
// activations.h). `saved` is the sign mask (relu, leaky_relu), or the product acc of the forward
// with z = acc + bias (bias may be null), or nothing (identity: dz is dy and is not written; only
// dbias is computed). dbias, when not null, receives the column sums of the
// unrounded dz.
void act_backward(DType dtype, Act act, int64_t rows, int64_t cols, const void* dy,
                  const void* saved, const void* bias, void* dz, void* dbias, int num_threads);

// Gated unit: y = act(acc_gate + bias_gate) * (acc_up + bias_up), in float; y may be the same
// buffer as acc_gate. Backward reads acc_gate and acc_up again.
void glu_forward(DType dtype, Act gate_act, int64_t rows, int64_t cols, const void* acc_gate,
                 const void* acc_up, const void* bias_gate, const void* bias_up, void* y,
                 int num_threads);

// The same from products the GEMMs wrote transposed ([cols, rows], both with rows ld_t elements
// apart; each bias in its product, or not null and added here in float): y, and the products
// row-major (z_gate, z_up) when not null.
void glu_forward_from_transposed(DType dtype, Act gate_act, int64_t rows, int64_t cols, const void* gate_t,
                                 const void* up_t, int64_t ld_t, const void* bias_gate, const void* bias_up,
                                 void* y, void* z_gate, void* z_up, int num_threads);

// With z_gate = acc_gate + bias_gate and z_up = acc_up + bias_up: dz_up = dy * act(z_gate),
// dz_gate = dy * z_up * act'(z_gate); bias gradients as above.
void glu_backward(DType dtype, Act gate_act, int64_t rows, int64_t cols, const void* dy,
                  const void* acc_gate, const void* acc_up, const void* bias_gate,
                  const void* bias_up, void* dz_gate, void* dz_up, void* dbias_gate,
                  void* dbias_up, int num_threads);

// dst = src^T: src is [rows, cols] with rows ld_src >= cols elements apart, dst [cols, rows] with
// rows ld_dst >= rows apart; bit for bit a copy. For the weight-gradient GEMM dW = dZ^T X, which
// oneDNN's bfloat16 GEMMs on AMX run much faster from a row-major dZ^T than from the transposed view
// of dZ (fastnn/backends/cpu.py, wgrad_from_copy). It writes dst with non-temporal stores, fastest
// where dst's rows start on 64-byte boundaries (ld_dst a multiple of 64 bytes).
void transpose(DType dtype, int64_t rows, int64_t cols, const void* src, int64_t ld_src, void* dst,
               int64_t ld_dst, int num_threads);

// The instruction-set level the kernels run at on this CPU ("avx512", "avx2" or "baseline"),
// and the levels this build contains.
const char* active_isa();
const char* compiled_isas();

// Test hook: out[i] = act(z[i]), dout[i] = act'(z[i]) through the same functor instantiations
// as the kernels, for float32 or float64 arrays; bfloat16 / float16 take float32 arrays and give
// the float values those kernels compute before they round them to 16 bits.
void eval_activation(DType dtype, Act act, int64_t n, const void* z, void* out, void* dout);

}  // namespace cpu
}  // namespace fastnn
