// fastnn._C: the torch-free native module. Tensors cross as raw addresses (int), sizes, dtype and
// activation codes; fastnn/_native.py checks shapes, dtypes and contiguity before every call, and
// the checks here only stop what would crash.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>

#include "cpu/epilogue.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using fastnn::Act;
using fastnn::DType;

namespace {

DType to_dtype(int code) {
  if (code < 0 || code > 3) throw std::invalid_argument("fastnn._C: unknown dtype code " + std::to_string(code));
  return static_cast<DType>(code);
}

Act to_act(int code) {
  if (code < 0 || code >= fastnn::kNumActs)
    throw std::invalid_argument("fastnn._C: unknown activation code " + std::to_string(code));
  return static_cast<Act>(code);
}

const void* cptr(uintptr_t p) { return reinterpret_cast<const void*>(p); }
void* mptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

void check_sizes(int64_t rows, int64_t cols, int num_threads) {
  if (rows < 0 || cols < 0) throw std::invalid_argument("fastnn._C: negative size");
  if (num_threads < 1) throw std::invalid_argument("fastnn._C: num_threads must be >= 1");
}

// A transposed product's rows are ld_t >= rows elements apart.
void check_leading_dim(int64_t ld_t, int64_t rows) {
  if (ld_t < rows) throw std::invalid_argument("fastnn._C: leading dimension ld_t is below rows");
}

// With no rows the bias gradient is zero (float32 sums, float64 for float64).
void zero_bias_grad(uintptr_t dbias, int64_t cols, DType d) {
  if (dbias && cols > 0) std::memset(mptr(dbias), 0, size_t(cols) * (d == DType::kFloat64 ? 8 : 4));
}

void require(uintptr_t p, const char* what) {
  if (!p) throw std::invalid_argument(std::string("fastnn._C: ") + what + " must not be null");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastnn native CPU kernels (torch-free)";

  m.def("cpu_bias_act_forward",
        [](int dtype, int act, int64_t rows, int64_t cols, uintptr_t acc, uintptr_t bias,
           uintptr_t y, uintptr_t mask, int num_threads) {
          check_sizes(rows, cols, num_threads);
          if (rows * cols == 0) return;
          require(acc, "acc");
          require(y, "y");
          const DType d = to_dtype(dtype);
          const Act a = to_act(act);
          py::gil_scoped_release nogil;
          fastnn::cpu::bias_act_forward(d, a, rows, cols, cptr(acc), cptr(bias), mptr(y), mptr(mask), num_threads);
        });

  m.def("cpu_act_forward_from_transposed",
        [](int dtype, int act, int64_t rows, int64_t cols, uintptr_t acc_t, int64_t ld_t, uintptr_t bias,
           uintptr_t y, uintptr_t z, uintptr_t mask, int num_threads) {
          check_sizes(rows, cols, num_threads);
          check_leading_dim(ld_t, rows);
          if (rows * cols == 0) return;
          require(acc_t, "acc_t");
          require(y, "y");
          const DType d = to_dtype(dtype);
          const Act a = to_act(act);
          py::gil_scoped_release nogil;
          fastnn::cpu::act_forward_from_transposed(d, a, rows, cols, cptr(acc_t), ld_t, cptr(bias), mptr(y),
                                                   mptr(z), mptr(mask), num_threads);
        });

  m.def("cpu_act_backward",
        [](int dtype, int act, int64_t rows, int64_t cols, uintptr_t dy, uintptr_t saved,
           uintptr_t bias, uintptr_t dz, uintptr_t dbias, int num_threads) {
          check_sizes(rows, cols, num_threads);
          const DType d = to_dtype(dtype);
          const Act a = to_act(act);
          if (rows * cols == 0) {
            zero_bias_grad(dbias, cols, d);
            return;
          }
          require(dy, "dy");
          if (fastnn::saved_for(a) != fastnn::Saved::kNothing) {
            require(saved, "saved");
            require(dz, "dz");
          }
          py::gil_scoped_release nogil;
          fastnn::cpu::act_backward(d, a, rows, cols, cptr(dy), cptr(saved), cptr(bias), mptr(dz), mptr(dbias),
                                    num_threads);
        });

  m.def("cpu_glu_forward",
        [](int dtype, int gate_act, int64_t rows, int64_t cols, uintptr_t acc_gate,
           uintptr_t acc_up, uintptr_t bias_gate, uintptr_t bias_up, uintptr_t y, int num_threads) {
          check_sizes(rows, cols, num_threads);
          if (rows * cols == 0) return;
          require(acc_gate, "acc_gate");
          require(acc_up, "acc_up");
          require(y, "y");
          const DType d = to_dtype(dtype);
          const Act a = to_act(gate_act);
          py::gil_scoped_release nogil;
          fastnn::cpu::glu_forward(d, a, rows, cols, cptr(acc_gate), cptr(acc_up), cptr(bias_gate),
                                   cptr(bias_up), mptr(y), num_threads);
        });

  m.def("cpu_glu_forward_from_transposed",
        [](int dtype, int gate_act, int64_t rows, int64_t cols, uintptr_t gate_t, uintptr_t up_t, int64_t ld_t,
           uintptr_t bias_gate, uintptr_t bias_up, uintptr_t y, uintptr_t z_gate, uintptr_t z_up, int num_threads) {
          check_sizes(rows, cols, num_threads);
          check_leading_dim(ld_t, rows);
          if (rows * cols == 0) return;
          require(gate_t, "gate_t");
          require(up_t, "up_t");
          require(y, "y");
          const DType d = to_dtype(dtype);
          const Act a = to_act(gate_act);
          py::gil_scoped_release nogil;
          fastnn::cpu::glu_forward_from_transposed(d, a, rows, cols, cptr(gate_t), cptr(up_t), ld_t,
                                                   cptr(bias_gate), cptr(bias_up), mptr(y), mptr(z_gate), mptr(z_up),
                                                   num_threads);
        });

  m.def("cpu_glu_backward",
        [](int dtype, int gate_act, int64_t rows, int64_t cols, uintptr_t dy, uintptr_t acc_gate,
           uintptr_t acc_up, uintptr_t bias_gate, uintptr_t bias_up, uintptr_t dz_gate, uintptr_t dz_up,
           uintptr_t dbias_gate, uintptr_t dbias_up, int num_threads) {
          check_sizes(rows, cols, num_threads);
          const DType d = to_dtype(dtype);
          const Act a = to_act(gate_act);
          if (rows * cols == 0) {
            zero_bias_grad(dbias_gate, cols, d);
            zero_bias_grad(dbias_up, cols, d);
            return;
          }
          for (auto [p, what] : {std::pair<uintptr_t, const char*>{dy, "dy"}, {acc_gate, "acc_gate"},
                                 {acc_up, "acc_up"}, {dz_gate, "dz_gate"}, {dz_up, "dz_up"}})
            require(p, what);
          py::gil_scoped_release nogil;
          fastnn::cpu::glu_backward(d, a, rows, cols, cptr(dy), cptr(acc_gate), cptr(acc_up), cptr(bias_gate),
                                    cptr(bias_up), mptr(dz_gate), mptr(dz_up), mptr(dbias_gate),
                                    mptr(dbias_up), num_threads);
        });

  m.def("cpu_transpose",
        [](int dtype, int64_t rows, int64_t cols, uintptr_t src, int64_t ld_src, uintptr_t dst, int64_t ld_dst,
           int num_threads) {
          check_sizes(rows, cols, num_threads);
          if (ld_src < cols || ld_dst < rows)
            throw std::invalid_argument("fastnn._C: cpu_transpose's leading dimensions are below its sizes");
          if (rows * cols == 0) return;
          require(src, "src");
          require(dst, "dst");
          const DType d = to_dtype(dtype);
          py::gil_scoped_release nogil;
          fastnn::cpu::transpose(d, rows, cols, cptr(src), ld_src, mptr(dst), ld_dst, num_threads);
        });

  m.def("cpu_eval_activation", [](int dtype, int act, int64_t n, uintptr_t z, uintptr_t out, uintptr_t dout) {
    if (n < 0) throw std::invalid_argument("fastnn._C: negative size");
    if (n == 0) return;
    require(z, "z");
    require(out, "out");
    require(dout, "dout");
    fastnn::cpu::eval_activation(to_dtype(dtype), to_act(act), n, cptr(z), mptr(out), mptr(dout));
  });

  m.def("build_info", []() {
    py::dict info;
    info["version"] = FASTNN_VERSION;
    info["cpu_isas_compiled"] = fastnn::cpu::compiled_isas();
    info["cpu_isa_active"] = fastnn::cpu::active_isa();
#ifdef _OPENMP
    info["openmp"] = std::to_string(_OPENMP);
    info["omp_max_threads"] = omp_get_max_threads();
#else
    info["openmp"] = py::none();
#endif
#if defined(__clang__)
    info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    info["compiler"] = std::string("gcc ") + __VERSION__;
#else
    info["compiler"] = "unknown";
#endif
    return info;
  });
}
