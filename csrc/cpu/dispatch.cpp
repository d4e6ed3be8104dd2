// Picks, once, the widest instruction-set build of the CPU kernels that this CPU can run.
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "epilogue.h"

// One declaration block per build of epilogue_kernels.cpp (CMake defines FASTNN_HAVE_<ISA>).
#define FASTNN_DECLARE_ISA(NS)                                                                    \
  namespace fastnn { namespace cpu { namespace NS {                                               \
  void bias_act_forward(DType, Act, int64_t, int64_t, const void*, const void*, void*, void*, int); \
  void act_forward_from_transposed(DType, Act, int64_t, int64_t, const void*, int64_t, const void*, \
                                   void*, void*, void*, int);                                     \
  void act_backward(DType, Act, int64_t, int64_t, const void*, const void*, const void*, void*,    \
                    void*, int);                                                                  \
  void glu_forward(DType, Act, int64_t, int64_t, const void*, const void*, const void*,            \
                   const void*, void*, int);                                                      \
  void glu_forward_from_transposed(DType, Act, int64_t, int64_t, const void*, const void*, int64_t,\
                                   const void*, const void*, void*, void*, void*, int);           \
  void glu_backward(DType, Act, int64_t, int64_t, const void*, const void*, const void*,           \
                    const void*, const void*, void*, void*, void*, void*, int);                   \
  void eval_activation(DType, Act, int64_t, const void*, void*, void*);                          \
  void transpose(DType, int64_t, int64_t, const void*, int64_t, void*, int64_t, int);           \
  } } }

FASTNN_DECLARE_ISA(baseline)
#ifdef FASTNN_HAVE_AVX2
FASTNN_DECLARE_ISA(avx2)
#endif
#ifdef FASTNN_HAVE_AVX512
FASTNN_DECLARE_ISA(avx512)
FASTNN_DECLARE_ISA(avx512bf16)
#endif

namespace fastnn {
namespace cpu {

namespace {

enum class Isa { kBaseline, kAvx2, kAvx512, kAvx512Bf16 };

Isa detect_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
#ifdef FASTNN_HAVE_AVX512
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma"))
    return __builtin_cpu_supports("avx512bf16") ? Isa::kAvx512Bf16 : Isa::kAvx512;
#endif
#ifdef FASTNN_HAVE_AVX2
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
#endif
  return Isa::kBaseline;
}

// FASTNN_CPU_ISA=baseline|avx2|avx512 caps the level (to test every build on one machine).
Isa capped(Isa best) {
  const char* env = std::getenv("FASTNN_CPU_ISA");
  if (!env || !*env) return best;
  const std::string want(env);
  Isa cap = best;
  if (want == "baseline") cap = Isa::kBaseline;
  else if (want == "avx2") cap = Isa::kAvx2;
  else if (want == "avx512") cap = Isa::kAvx512;
  else if (want == "avx512bf16") cap = Isa::kAvx512Bf16;
  return static_cast<int>(cap) < static_cast<int>(best) ? cap : best;
}

Isa isa() {
  static const Isa chosen = capped(detect_isa());
  return chosen;
}

// The build a call of this dtype runs in. Only bfloat16 differs between avx512 and avx512bf16 (the
// one-instruction rounding), so the avx512bf16 build holds bfloat16 alone; float64 runs the baseline
// build everywhere (its exp / erfc / tanh are scalar libm calls at every level, and it is the
// reference dtype, not a speed one). CMakeLists.txt builds each level with just these types.
[[maybe_unused]] Isa level_for(DType dtype) {
  const Isa level = isa();
  if (dtype == DType::kFloat64) return Isa::kBaseline;
  if (level == Isa::kAvx512Bf16 && dtype != DType::kBFloat16) return Isa::kAvx512;
  return level;
}

}  // namespace

#if defined(FASTNN_HAVE_AVX512) && defined(FASTNN_HAVE_AVX2)
#define FASTNN_CALL(fn, dtype, ...)                                     \
  switch (level_for(dtype)) {                                           \
    case Isa::kAvx512Bf16: return avx512bf16::fn(dtype, __VA_ARGS__);   \
    case Isa::kAvx512: return avx512::fn(dtype, __VA_ARGS__);           \
    case Isa::kAvx2: return avx2::fn(dtype, __VA_ARGS__);               \
    default: return baseline::fn(dtype, __VA_ARGS__);                   \
  }
#elif defined(FASTNN_HAVE_AVX2)
#define FASTNN_CALL(fn, dtype, ...)                                          \
  if (level_for(dtype) == Isa::kAvx2) return avx2::fn(dtype, __VA_ARGS__);   \
  return baseline::fn(dtype, __VA_ARGS__);
#else
#define FASTNN_CALL(fn, dtype, ...) return baseline::fn(dtype, __VA_ARGS__);
#endif

const char* active_isa() {
  switch (isa()) {
    case Isa::kAvx512Bf16: return "avx512bf16";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

const char* compiled_isas() {
  return "baseline"
#ifdef FASTNN_HAVE_AVX2
         ",avx2"
#endif
#ifdef FASTNN_HAVE_AVX512
         ",avx512,avx512bf16"
#endif
      ;
}

void bias_act_forward(DType dtype, Act act, int64_t rows, int64_t cols, const void* acc,
                      const void* bias, void* y, void* mask, int num_threads) {
  FASTNN_CALL(bias_act_forward, dtype, act, rows, cols, acc, bias, y, mask, num_threads)
}

void act_forward_from_transposed(DType dtype, Act act, int64_t rows, int64_t cols, const void* acc_t,
                                 int64_t ld_t, const void* bias, void* y, void* z, void* mask, int num_threads) {
  FASTNN_CALL(act_forward_from_transposed, dtype, act, rows, cols, acc_t, ld_t, bias, y, z, mask, num_threads)
}

void act_backward(DType dtype, Act act, int64_t rows, int64_t cols, const void* dy,
                  const void* saved, const void* bias, void* dz, void* dbias, int num_threads) {
  FASTNN_CALL(act_backward, dtype, act, rows, cols, dy, saved, bias, dz, dbias, num_threads)
}

void glu_forward(DType dtype, Act gate_act, int64_t rows, int64_t cols, const void* acc_gate,
                 const void* acc_up, const void* bias_gate, const void* bias_up, void* y,
                 int num_threads) {
  FASTNN_CALL(glu_forward, dtype, gate_act, rows, cols, acc_gate, acc_up, bias_gate, bias_up, y,
              num_threads)
}

void glu_forward_from_transposed(DType dtype, Act gate_act, int64_t rows, int64_t cols, const void* gate_t,
                                 const void* up_t, int64_t ld_t, const void* bias_gate, const void* bias_up,
                                 void* y, void* z_gate, void* z_up, int num_threads) {
  FASTNN_CALL(glu_forward_from_transposed, dtype, gate_act, rows, cols, gate_t, up_t, ld_t, bias_gate, bias_up,
              y, z_gate, z_up, num_threads)
}

void glu_backward(DType dtype, Act gate_act, int64_t rows, int64_t cols, const void* dy,
                  const void* acc_gate, const void* acc_up, const void* bias_gate,
                  const void* bias_up, void* dz_gate, void* dz_up, void* dbias_gate,
                  void* dbias_up, int num_threads) {
  FASTNN_CALL(glu_backward, dtype, gate_act, rows, cols, dy, acc_gate, acc_up, bias_gate, bias_up,
              dz_gate, dz_up, dbias_gate, dbias_up, num_threads)
}

void transpose(DType dtype, int64_t rows, int64_t cols, const void* src, int64_t ld_src, void* dst,
               int64_t ld_dst, int num_threads) {
  FASTNN_CALL(transpose, dtype, rows, cols, src, ld_src, dst, ld_dst, num_threads)
}

void eval_activation(DType dtype, Act act, int64_t n, const void* z, void* out, void* dout) {
  FASTNN_CALL(eval_activation, dtype, act, n, z, out, dout)
}

}  // namespace cpu
}  // namespace fastnn
