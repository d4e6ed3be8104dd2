// fastnn._cuda: the CUDA part, a separate module that fastnn imports only on first use, so that
// `import fastnn` works where no CUDA driver, runtime or cuBLAS is installed. Tensors cross as
// raw addresses; streams as the integer handle of torch's current stream, with the device index
// (this module's statically linked CUDA runtime keeps its own current device); fastnn/backends/cuda.py
// checks shapes, dtypes, devices and strides before every call.
#include <pybind11/pybind11.h>

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <string>

#include "cuda/cuda_check.h"
#include "cuda/epilogue.h"
#include "cuda/lt_gemm.h"

namespace py = pybind11;
using fastnn::Act;
using fastnn::DType;
namespace fc = fastnn::cuda;

namespace {

DType to_dtype(int code) {
  if (code < 0 || code > 2) throw std::invalid_argument("fastnn._cuda: dtype code must be float32, float16 or bfloat16");
  return static_cast<DType>(code);
}

Act to_act(int code) {
  if (code < 0 || code >= fastnn::kNumActs) throw std::invalid_argument("fastnn._cuda: unknown activation code");
  return static_cast<Act>(code);
}

template <typename T = void>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

cudaStream_t stream_of(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "fastnn CUDA kernels and cuBLASLt GEMMs (torch-free)";

  m.def("lt_gemm",
        [](int device, uintptr_t stream, int dtype, bool allow_tf32, int64_t mm, int64_t n, int64_t k, uintptr_t a,
           int64_t lda, bool trans_a, uintptr_t b, int64_t ldb, bool trans_b, uintptr_t d, int64_t ldd,
           bool accumulate, int epilogue, uintptr_t bias, uintptr_t bias_grad, uintptr_t aux, int64_t aux_ld,
           uintptr_t workspace, size_t workspace_bytes) {
          if (epilogue < 0 || epilogue > 12) throw std::invalid_argument("fastnn._cuda: unknown epilogue code");
          fc::GemmArgs g;
          g.device = device;
          g.stream = stream_of(stream);
          g.dtype = to_dtype(dtype);
          g.allow_tf32 = allow_tf32;
          g.m = mm, g.n = n, g.k = k;
          g.a = ptr(a), g.lda = lda, g.trans_a = trans_a;
          g.b = ptr(b), g.ldb = ldb, g.trans_b = trans_b;
          g.d = ptr(d), g.ldd = ldd, g.accumulate = accumulate;
          g.epilogue = static_cast<fc::Epilogue>(epilogue);
          g.bias = ptr(bias), g.bias_grad = ptr(bias_grad), g.aux = ptr(aux), g.aux_ld = aux_ld;
          g.workspace = ptr(workspace), g.workspace_bytes = workspace_bytes;
          py::gil_scoped_release nogil;
          return fc::lt_gemm(g);
        },
        "Row-major D[M, N] = op(A) @ op(B) with a cuBLASLt epilogue; False if cuBLASLt has no algorithm for it");

  m.def("bias_act_forward",
        [](int device, uintptr_t stream, int dtype, int act, int64_t rows, int64_t cols, uintptr_t acc, int64_t ld_acc,
           uintptr_t bias, uintptr_t y, int64_t ld_y, uintptr_t mask, int64_t mask_ld_bits) {
          const DType d = to_dtype(dtype);
          const Act a = to_act(act);
          py::gil_scoped_release nogil;
          FASTNN_CUDA_CHECK(cudaSetDevice(device));
          fc::bias_act_forward(stream_of(stream), d, a, rows, cols, ptr(acc), ld_acc, ptr(bias), ptr(y), ld_y,
                               ptr<uint8_t>(mask), mask_ld_bits);
        });

  m.def("act_backward",
        [](int device, uintptr_t stream, int dtype, int act, int64_t rows, int64_t cols, uintptr_t dy, int64_t ld_dy, uintptr_t z,
           int64_t ld_z, uintptr_t mask, int64_t mask_ld_bits, uintptr_t dz, int64_t ld_dz, uintptr_t bias_grad,
           uintptr_t partial) {
          const DType d = to_dtype(dtype);
          const Act a = to_act(act);
          py::gil_scoped_release nogil;
          FASTNN_CUDA_CHECK(cudaSetDevice(device));
          fc::act_backward(stream_of(stream), d, a, rows, cols, ptr(dy), ld_dy, ptr(z), ld_z, ptr<uint8_t>(mask),
                           mask_ld_bits, ptr(dz), ld_dz, ptr(bias_grad), ptr<float>(partial));
        });

  m.def("glu_forward", [](int device, uintptr_t stream, int dtype, int act, int64_t rows, int64_t cols, uintptr_t zg, uintptr_t zu,
                          uintptr_t y) {
    const DType d = to_dtype(dtype);
    const Act a = to_act(act);
    py::gil_scoped_release nogil;
    FASTNN_CUDA_CHECK(cudaSetDevice(device));
    fc::glu_forward(stream_of(stream), d, a, rows, cols, ptr(zg), ptr(zu), ptr(y));
  });

  m.def("glu_backward",
        [](int device, uintptr_t stream, int dtype, int act, int64_t rows, int64_t cols, uintptr_t dy, uintptr_t zg, uintptr_t zu,
           uintptr_t dzg, uintptr_t dzu, uintptr_t bgg, uintptr_t bgu, uintptr_t pg, uintptr_t pu) {
          const DType d = to_dtype(dtype);
          const Act a = to_act(act);
          py::gil_scoped_release nogil;
          FASTNN_CUDA_CHECK(cudaSetDevice(device));
          fc::glu_backward(stream_of(stream), d, a, rows, cols, ptr(dy), ptr(zg), ptr(zu), ptr(dzg), ptr(dzu),
                           ptr(bgg), ptr(bgu), ptr<float>(pg), ptr<float>(pu));
        });

  m.def("bias_grad_scratch_elems", &fc::bias_grad_scratch_elems);
  m.def("plan_cache_size", &fc::plan_cache_size, "cuBLASLt plans cached by the calling thread");
  m.def("plan_cache_limit", &fc::plan_cache_limit, "the most plans one thread keeps");

  m.def("build_info", []() {
    py::dict info;
    info["version"] = FASTNN_VERSION;
    info["cuda_archs"] = FASTNN_CUDA_ARCHS_STR;
    info["cuda_runtime_compiled"] = CUDART_VERSION;
    info["cublaslt_compiled"] = std::to_string(CUBLAS_VER_MAJOR) + "." + std::to_string(CUBLAS_VER_MINOR) + "." +
                                std::to_string(CUBLAS_VER_PATCH);
    info["cublaslt_runtime"] = fc::cublaslt_version();
    int driver = 0;
    info["cuda_driver"] = cudaDriverGetVersion(&driver) == cudaSuccess ? py::int_(driver) : py::int_(0);
    return info;
  });
}
