// cuBLASLt GEMMs with epilogues, for row-major torch tensors.
//
// Row-major C[M, N] = A[M, K] @ B[K, N] is column-major C^T = B^T A^T, so each call below is
// phrased in row-major terms and mapped onto cuBLASLt's column-major view inside lt_gemm.cpp.
// Handles and heuristic results are cached per thread and (device, shape, leading dims, dtype,
// epilogue, alignments), a bounded number of them;
// the workspace comes from the caller (torch's caching allocator) and the stream is the caller's
// (torch's current stream).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "fastnn/dtype.h"

namespace fastnn {
namespace cuda {

// Epilogues, in fastnn's words (codes shared with fastnn/backends/cuda.py).
enum class Epilogue : int32_t {
  kNone = 0,         // D = A B
  kBias = 1,         // D = A B + bias (bias along D's columns, i.e. per output feature)
  kReluBias = 2,     // D = relu(A B + bias)
  kReluAuxBias = 3,  // ... and the sign bits of (A B + bias) into aux (1 bit per element)
  kGeluBias = 4,     // D = gelu_tanh(A B + bias) (cuBLASLt's GELU is the tanh form)
  kGeluAuxBias = 5,  // ... and the pre-activation (A B + bias) into aux
  kDReluBgrad = 6,   // D = (A B) * relu'(from aux bits); bias_grad = column sums of D
  kDGeluBgrad = 7,   // D = (A B) * gelu_tanh'(aux); bias_grad = column sums of D
  kBgradB = 8,       // D = A B; bias_grad = column sums of op(A)^T, i.e. of our A over the
                     // reduction dimension (wgrad dW = dZ^T X gives db = sum_m dZ)
  kRelu = 9,         // the bias-free forms of 2-5
  kReluAux = 10,
  kGelu = 11,
  kGeluAux = 12,
};

struct GemmArgs {
  int device = 0;
  cudaStream_t stream = nullptr;
  DType dtype = DType::kBFloat16;  // A, B, D and bias
  bool allow_tf32 = false;         // float32 only
  // Row-major: D[M, N] = op_a(A) @ op_b(B) (+ beta * D when accumulate)
  int64_t m = 0, n = 0, k = 0;
  const void* a = nullptr;
  int64_t lda = 0;
  bool trans_a = false;  // A is stored as [K, M] and read transposed
  const void* b = nullptr;
  int64_t ldb = 0;
  bool trans_b = false;  // B is stored as [N, K] and read transposed (nn.Linear weights)
  void* d = nullptr;
  int64_t ldd = 0;
  bool accumulate = false;
  Epilogue epilogue = Epilogue::kNone;
  const void* bias = nullptr;  // [N] in dtype (forward epilogues; 16-bit: as the C matrix, lt_gemm.cpp)
  void* bias_grad = nullptr;   // [N] in dtype (BGRAD epilogues)
  void* aux = nullptr;         // [M, aux_ld] elements of dtype, or bits for the relu mask
  int64_t aux_ld = 0;  // cuBLASLt wants a multiple of 128 (relu bits) or 8 (gelu elements): see
                       // relu_aux_ld / gelu_aux_ld in fastnn/backends/cuda.py
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

// Runs the GEMM. Returns false (having launched nothing) when cuBLASLt has no algorithm for this
// epilogue with these shapes and alignments, so that the caller can take its own path; throws
// std::runtime_error on any other failure.
bool lt_gemm(const GemmArgs& args);

// Plans cached by the calling thread, and the most it keeps.
size_t plan_cache_size();
size_t plan_cache_limit();

// The cuBLASLt version this module runs with (cublasLtGetVersion).
size_t cublaslt_version();

}  // namespace cuda
}  // namespace fastnn
