// The activations of fastnn and their derivatives: one definition, used by the CPU kernels
// (csrc/cpu) and the CUDA kernels (csrc/cuda). The Python reference is fastnn/activations.py;
// tests/test_activations.py checks these functors against it.
//
// Float math on the host is written branch-free from +, *, / and bit operations so that the
// compiler vectorises the epilogue loops (libm's expf/erff calls would not vectorise); on the
// device it is CUDA's own math library, except the exact gelu's Gaussian tail (gauss_tail), which
// is the host's code on both. Double uses the C library everywhere (gradcheck only).
#pragma once

#include <cstdint>
#include <cstring>
#include <cmath>

#if defined(__CUDACC__)
#define FASTNN_HD __host__ __device__ __forceinline__
#else
#define FASTNN_HD inline
#endif

// Each CPU instruction-set build of the kernels compiles this header with its own flags; the
// inline namespace gives each build its own symbols, so the linker can never hand an AVX-512
// copy of an inline function to the baseline kernels.
#ifndef FASTNN_ISA_NS
#define FASTNN_ISA_NS generic
#endif

namespace fastnn {

// Codes shared with Python (fastnn/activations.py): keep in sync.
enum class Act : int32_t {
  kIdentity = 0,
  kRelu = 1,
  kGelu = 2,
  kGeluTanh = 3,
  kSilu = 4,
  kSigmoid = 5,
  kTanh = 6,
  kLeakyRelu = 7,
  kSquaredRelu = 8,
  kQuickGelu = 9,
};
constexpr int32_t kNumActs = 10;
constexpr double kQuickGeluScale = 1.702;  // quick_gelu(z) = z sigmoid(1.702 z) (CLIP's activation)
constexpr double kLeakySlope = 0.01;  // used as T(kLeakySlope): 0.01f in float

// How accurate the host's float math must be. kFloat32: to float32's own precision (float32
// results; the float32 test hook). kHalf: for results the kernels round to bfloat16 or float16 (8
// or 11 significant bits): gelu's Gaussian tail and the sigmoid family's exp take shorter
// polynomials there, relative error at most 1.8e-5 (gelu) and 2.8e-6 (exp) in place of a few
// 1e-8, so that a rounded gelu is within 0.504 bfloat16 ulp and 0.525 float16 ulp of the exact
// value (0.501 from the float32 math; every float32 z with 2^-16 <= |z| <= 16, tests and
// benchmarks/activation_accuracy.py --dtype), and the 16-bit passes run 15-23% faster (gelu and
// silu, bfloat16 256x3072, 2 threads, AMD EPYC Zen 4). The double math ignores it, and so does the
// device's, except gauss_tail's.
enum class Accuracy : int32_t { kFloat32 = 0, kHalf = 1 };

// What backward needs besides dY: nothing, the sign of Z (1 bit per element), or Z itself.
enum class Saved : int32_t { kNothing = 0, kSignMask = 1, kPreact = 2 };

FASTNN_HD constexpr Saved saved_for(Act a) {
  return a == Act::kIdentity ? Saved::kNothing
         : (a == Act::kRelu || a == Act::kLeakyRelu) ? Saved::kSignMask
                                                     : Saved::kPreact;
}

inline namespace FASTNN_ISA_NS {
namespace math {

FASTNN_HD float from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

FASTNN_HD uint32_t to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

FASTNN_HD float select(bool c, float a, float b) { return c ? a : b; }
FASTNN_HD float copysign(float mag, float sign) {
  return from_bits((to_bits(mag) & 0x7fffffffu) | (to_bits(sign) & 0x80000000u));
}
FASTNN_HD float abs(float x) { return from_bits(to_bits(x) & 0x7fffffffu); }

#if !defined(__CUDA_ARCH__)
// Round to nearest integer for |x| < 2^22, with no SSE4.1 round instruction needed.
inline float round_small(float x) {
  const float magic = 12582912.0f;  // 1.5 * 2^23
  return (x + magic) - magic;
}
#endif

// The sigmoid family only ever needs exp of a non-positive number (exp(-|z|)), so the host
// version handles x <= 0 alone: no overflow path. Cody-Waite reduction x = n ln2 + r,
// |r| <= ln2/2, then a degree-6 minimax polynomial (1.7e-8 relative; Accuracy::kHalf: one step of
// reduction and degree 4, 2.6e-6). NaN propagates, so the callers need no check of their own (a
// select per check: measurable in these loops).
template <Accuracy Acc = Accuracy::kFloat32>
FASTNN_HD float exp_nonpos(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  const float xc = x < -87.0f ? -87.0f : x;  // NaN stays NaN
  // kn = n + 127 + 1.5 * 2^23 with n = round(x / ln2): the low mantissa bits of kn hold n + 127,
  // so shifting its bits by 23 builds 2^n without a float-to-int conversion
  const float kn = xc * 1.44269504088896341f + 12583039.0f;
  const float n = kn - 12583039.0f;
  float p;
  if constexpr (Acc == Accuracy::kFloat32) {
    const float r = (xc - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
    p = 1.383684576e-03f;
    p = p * r + 8.374815807e-03f;
    p = p * r + 4.166822508e-02f;
    p = p * r + 1.666641980e-01f;
    p = p * r + 4.999999106e-01f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
  } else {
    const float r = xc - n * 0.693147180559945309f;
    p = 4.145861045e-02f;
    p = p * r + 1.679090858e-01f;
    p = p * r + 5.000435710e-01f;
    p = p * r + 9.999634027e-01f;
    p = p * r + 9.999992847e-01f;
  }
  // below -87 the result would be subnormal: flush to 0, as PyTorch's own vectorised float math
  return x < -87.0f ? 0.0f : p * from_bits(to_bits(kn) << 23);
#endif
}

// exp(x) - 1 for x <= 0, accurate near 0 where exp(x) - 1 would cancel (tanh needs only this).
FASTNN_HD float expm1_nonpos(float x) {
#if defined(__CUDA_ARCH__)
  return ::expm1f(x);
#else
  const float xc = x > -88.0f ? (x < 0.0f ? x : 0.0f) : -88.0f;  // NaN -> -88
  const float n = round_small(xc * 1.44269504088896341f);
  const float r = (xc - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
  // expm1(r) = r + r^2/2! + ... + r^9/9!
  float p = 2.75573192239858907e-6f;
  p = p * r + 2.48015873015873016e-5f;
  p = p * r + 1.98412698412698413e-4f;
  p = p * r + 1.38888888888888889e-3f;
  p = p * r + 8.33333333333333333e-3f;
  p = p * r + 4.16666666666666667e-2f;
  p = p * r + 1.66666666666666667e-1f;
  p = p * r + 0.5f;
  p = p * r * r + r;
  // expm1(x) = 2^n expm1(r) + (2^n - 1); exact for n == 0
  const float two_n = from_bits(uint32_t(int32_t(n) + 127) << 23);
  return two_n * p + (two_n - 1.0f);
#endif
}

// a / d for d >= 1: gauss_tail's s. The host divides. The device's IEEE division costs a slow-path
// check on top of its reciprocal; the approximate reciprocal (2 ulp) suffices for kHalf, whose P is
// 1.3e-5 off anyway, and kFloat32 takes one Newton step on the quotient (within an ulp, as the
// host's division). An error of one ulp in s moves q by at most 0.7 ulp for |z| < 1, 1.8 for
// |z| < 3 and 5.9 in the far tail (d ln P / d ln s of both fits).
template <Accuracy Acc>
FASTNN_HD float tail_ratio(float a, float d) {
#if defined(__CUDA_ARCH__)
  const float r = __fdividef(1.0f, d);
  const float s = a * r;
  return Acc == Accuracy::kHalf ? s : fmaf(fmaf(-s, d, a), r, s);
#else
  return a / d;
#endif
}

// The Gaussian tail q = Phi(-|z|) = erfc(|z| / sqrt 2) / 2, and g = exp(-z^2 / 2) from the same
// exponential: gelu and its derivative need both (Phi(z) is 1 - q for z > 0, q otherwise).
// Host: q = g P(s), s = k|z| / (1 + k|z|) in [0, 1), P a degree-8 polynomial fitted for fastnn
// (relative error at most 2.2e-8 (1 + z^2 / 2), tighter where most values are); s, unlike 1/(1 +
// k|z|), keeps its relative accuracy near z = 0, where q is most sensitive to it. g = 2^u, u =
// -z^2 log2(e) / 2, from a degree-6 polynomial of u's fractional part, u's integer part added to
// the exponent bits. The rounding of z^2 (and of u, without FMA) is the largest error: a few ulp
// of q for |z| < 3, growing as z^2 / 2 ulp into the tail (about 130 at z = -12.9). Below u = -120
// (|z| > 12.9, where |gelu| < 3e-37) q and g are 0, as PyTorch's vectorised float math flushes
// (its own float32 gelu is 0 from z = -6 or so): flushing there keeps q = P g (P > 2^-5.1) and
// every product after it normal. A subnormal in any lane costs a microcode assist on Intel cores:
// with |z| spread to 13, -125 here made the loop about 2x slower on a Xeon with AMX (no change
// with the CPU's flush-to-zero on). Written for the multiply-add pipes, which bound these loops:
// 19 multiplies or multiply-adds, 3 additions and one division per gelu element (the erfc-based
// form before it took 27 multiplies; 25% faster on an AVX-512 AMD EPYC, and more accurate
// everywhere). Computing u's integer and fractional parts with multiply-adds straight from z^2
// (one operation fewer), s as |z| / (|z| + 1/k) (one fewer) and flushing by a mask rather than
// clamping |z| and u (a compare and a blend fewer) made the gelu passes about 10% faster again
// (float32 and bfloat16, forward and backward, 256x3072 in cache, Xeon with AMX), no less accurate
// (benchmarks/activation_accuracy.py).
// Accuracy::kHalf: P of degree 5 (its own 1/k; relative error 1.3e-5 in float) and 2^f of degree
// 4 (2.6e-6), two minimax fits of the same forms.
// The device runs this code too, not CUDA's erfcf and expf: for 8 bfloat16 elements the gelu
// epilogue's SASS (sm_90) is 447 instructions with those, 343 with this (kFloat32) and 275 (kHalf),
// PyTorch's erff-based gelu 241; its derivative 562, 370 and 305 (PyTorch's 354). In the time an
// H200's memory moves a 16-bit pass's 4 bytes per element (6 backward) its SMs issue about 28 (42)
// instructions per element: CUDA's math made those passes compute-bound.
template <Accuracy Acc = Accuracy::kFloat32>
FASTNN_HD float gauss_tail(float z, float& g) {
  // (|z| = inf makes s and P NaN, replaced by the flush below; a NaN z comes out of the callers
  // through z itself)
  const float a = abs(z);
  float P;
  if constexpr (Acc == Accuracy::kFloat32) {
    const float s = tail_ratio<Acc>(a, a + 2.61891398f);  // k|z| / (1 + k|z|) with 1/k = 2.61891398
    P = -3.379232436e-02f;  // the fit's coefficients halved (q = erfc / 2)
    P = P * s + 8.07652995e-02f;
    P = P * s - 2.022573724e-02f;
    P = P * s - 1.803578995e-02f;
    P = P * s - 1.301403046e-01f;
    P = P * s - 3.672394669e-03f;
    P = P * s + 6.69860244e-01f;
    P = P * s - 1.044795275e+00f;
    P = P * s + 0.5f;
  } else {
    const float s = tail_ratio<Acc>(a, a + 2.78f);
    P = 9.942591935e-02f;
    P = P * s - 2.396062762e-01f;
    P = P * s - 6.786319613e-02f;
    P = P * s + 8.168928623e-01f;
    P = P * s - 1.108631253e+00f;
    P = P * s + 4.999947250e-01f;
  }
  // u = z^2 c, c = -log2(e) / 2, is not rounded where the compiler fuses these multiply-adds
  // (the builds with FMA): then f is u - n exactly rounded; without FMA, u is rounded first
  // (below u = -120 n, f and p are garbage or inf, never subnormal, and g is set to 0)
  const float z2 = z * z;
  const bool normal = z2 < 166.355323f;  // u > -120; false for NaN too
  // kn = n + 1.5 * 2^23 with n = round(u): n is in kn's low mantissa bits, two's complement
  const float kn = z2 * -0.721347520444481703f + 12582912.0f;
  const float n = kn - 12582912.0f;
  const float f = z2 * -0.721347520444481703f - n;  // u - n, in [-1/2, 1/2]
  float p;  // 2^f, minimax (1.6e-8 relative; kHalf 2.6e-6)
  if constexpr (Acc == Accuracy::kFloat32) {
    p = 1.534581243e-04f;
    p = p * f + 1.339993090e-03f;
    p = p * f + 9.618489072e-03f;
    p = p * f + 5.550328642e-02f;
    p = p * f + 2.402264625e-01f;
    p = p * f + 6.931471825e-01f;
    p = p * f + 1.0f;
  } else {
    p = 9.570103139e-03f;
    p = p * f + 5.591786653e-02f;
    p = p * f + 2.402474433e-01f;
    p = p * f + 6.931217909e-01f;
    p = p * f + 9.999992848e-01f;
  }
  // p * 2^n by adding n to p's exponent: p >= 1/sqrt 2 and n >= -120 keep it normal
  g = normal ? from_bits(to_bits(p) + (to_bits(kn) << 23)) : 0.0f;
  return normal ? P * g : 0.0f;
}

// tanh(x) = -expm1(-2|x|) / (2 + expm1(-2|x|)) with the sign of x: no cancellation near 0.
FASTNN_HD float tanh(float x) {
#if defined(__CUDA_ARCH__)
  return ::tanhf(x);
#else
  const float e = expm1_nonpos(-2.0f * abs(x));
  return x == x ? copysign(-e / (2.0f + e), x) : x;
#endif
}

template <Accuracy = Accuracy::kFloat32>
FASTNN_HD double exp_nonpos(double x) { return ::exp(x); }
template <Accuracy = Accuracy::kFloat32>
FASTNN_HD double gauss_tail(double z, double& g) {
  g = ::exp(-0.5 * z * z);
  return 0.5 * ::erfc(::fabs(z) * 0.70710678118654752);
}
FASTNN_HD double tanh(double x) { return ::tanh(x); }
FASTNN_HD double abs(double x) { return ::fabs(x); }

// s = sigmoid(z) and sc = 1 - s = sigmoid(-z), both to full relative accuracy (1 - s would
// cancel for large z): with e = exp(-|z|), the pair is 1/(1+e) and e/(1+e) in the order of sign(z).
// (A NaN z gives NaN from exp_nonpos.)
template <Accuracy Acc = Accuracy::kFloat32, typename T>
FASTNN_HD void sigmoid_pair(T z, T& s, T& sc) {
  const T e = exp_nonpos<Acc>(-abs(z));
  const T r = T(1) / (T(1) + e);
  const bool pos = z >= T(0);
  s = pos ? r : e * r;
  sc = pos ? e * r : r;
}

template <Accuracy Acc = Accuracy::kFloat32, typename T>
FASTNN_HD T sigmoid(T z) {
  const T e = exp_nonpos<Acc>(-abs(z));
  return (z >= T(0) ? T(1) : e) / (T(1) + e);
}

// 1 - tanh(z)^2 = 4e / (1 + e)^2 with e = exp(-2|z|): no cancellation where tanh(z) is near +-1.
template <Accuracy Acc = Accuracy::kFloat32, typename T>
FASTNN_HD T tanh_derivative(T z) {
  const T e = exp_nonpos<Acc>(T(-2) * abs(z));
  const T d = T(1) + e;
  return T(4) * e / (d * d);  // NaN from e for a NaN z
}

}  // namespace math

// Activation<A>::f(z) and ::df(z) = d f / dz, for T = float or double; f<Accuracy::kHalf>(z) for a
// result rounded to 16 bits.
template <Act A>
struct Activation;

template <>
struct Activation<Act::kIdentity> {
  template <Accuracy = Accuracy::kFloat32, typename T> static FASTNN_HD T f(T z) { return z; }
  template <Accuracy = Accuracy::kFloat32, typename T> static FASTNN_HD T df(T) { return T(1); }
};

template <>
struct Activation<Act::kRelu> {
  // written so that NaN propagates, as torch.relu
  template <Accuracy = Accuracy::kFloat32, typename T> static FASTNN_HD T f(T z) { return z < T(0) ? T(0) : z; }
  // torch's threshold_backward: 0 where z <= 0 (z == 0 included), 1 elsewhere (NaN included)
  template <Accuracy = Accuracy::kFloat32, typename T> static FASTNN_HD T df(T z) { return z <= T(0) ? T(0) : T(1); }
};

template <>
struct Activation<Act::kLeakyRelu> {
  template <Accuracy = Accuracy::kFloat32, typename T> static FASTNN_HD T f(T z) { return z > T(0) ? z : T(kLeakySlope) * z; }
  // torch's leaky_relu_backward: the slope where z <= 0 and at NaN
  template <Accuracy = Accuracy::kFloat32, typename T> static FASTNN_HD T df(T z) { return z > T(0) ? T(1) : T(kLeakySlope); }
};

template <>
struct Activation<Act::kSquaredRelu> {
  template <Accuracy = Accuracy::kFloat32, typename T> static FASTNN_HD T f(T z) { return z < T(0) ? T(0) : z * z; }
  // df(NaN) = NaN, as autograd gives through torch.square(F.relu(z))
  template <Accuracy = Accuracy::kFloat32, typename T> static FASTNN_HD T df(T z) { return z < T(0) ? T(0) : T(2) * z; }
};

// Exact gelu: z * Phi(z), Phi(z) = 1 - q for z > 0 and q otherwise, from the Gaussian tail
// q = Phi(-|z|) (which keeps the negative tail's relative accuracy).
template <>
struct Activation<Act::kGelu> {
  template <typename T> static FASTNN_HD T cdf(T q, T z) { return z > T(0) ? T(1) - q : q; }
  template <Accuracy Acc = Accuracy::kFloat32, typename T> static FASTNN_HD T f(T z) {
    T g;
    return z * cdf(math::gauss_tail<Acc>(z, g), z);
  }
  template <Accuracy Acc = Accuracy::kFloat32, typename T> static FASTNN_HD T df(T z) {
    T g;  // exp(-z^2 / 2)
    return cdf(math::gauss_tail<Acc>(z, g), z) + z * g * T(0.39894228040143268);
  }
};

// gelu_tanh: 0.5 z (1 + tanh(u)) with u = sqrt(2/pi) (z + 0.044715 z^3); the identity
// 1 + tanh(u) = 2 sigmoid(2u) avoids the cancellation of 1 + tanh(u) for negative z.
template <>
struct Activation<Act::kGeluTanh> {
  template <typename T> static FASTNN_HD T u2(T z) {
    return T(2 * 0.79788456080286536) * (z + T(0.044715) * z * z * z);
  }
  template <Accuracy Acc = Accuracy::kFloat32, typename T> static FASTNN_HD T f(T z) { return z * math::sigmoid<Acc>(u2(z)); }
  template <Accuracy Acc = Accuracy::kFloat32, typename T> static FASTNN_HD T df(T z) {
    T s, sc;
    math::sigmoid_pair<Acc>(u2(z), s, sc);
    const T du2 = T(2 * 0.79788456080286536) * (T(1) + T(3 * 0.044715) * z * z);
    return s + z * s * sc * du2;
  }
};

template <>
struct Activation<Act::kSilu> {
  template <Accuracy Acc = Accuracy::kFloat32, typename T> static FASTNN_HD T f(T z) { return z * math::sigmoid<Acc>(z); }
  template <Accuracy Acc = Accuracy::kFloat32, typename T> static FASTNN_HD T df(T z) {
    T s, sc;
    math::sigmoid_pair<Acc>(z, s, sc);
    return s * (T(1) + z * sc);
  }
};

template <>
struct Activation<Act::kQuickGelu> {
  template <Accuracy Acc = Accuracy::kFloat32, typename T> static FASTNN_HD T f(T z) { return z * math::sigmoid<Acc>(T(kQuickGeluScale) * z); }
  template <Accuracy Acc = Accuracy::kFloat32, typename T> static FASTNN_HD T df(T z) {
    T s, sc;
    math::sigmoid_pair<Acc>(T(kQuickGeluScale) * z, s, sc);
    return s * (T(1) + T(kQuickGeluScale) * z * sc);
  }
};

template <>
struct Activation<Act::kSigmoid> {
  template <Accuracy Acc = Accuracy::kFloat32, typename T> static FASTNN_HD T f(T z) { return math::sigmoid<Acc>(z); }
  template <Accuracy Acc = Accuracy::kFloat32, typename T> static FASTNN_HD T df(T z) {
    T s, sc;
    math::sigmoid_pair<Acc>(z, s, sc);
    return s * sc;
  }
};

template <>
struct Activation<Act::kTanh> {
  template <Accuracy Acc = Accuracy::kFloat32, typename T> static FASTNN_HD T f(T z) { return math::tanh(z); }
  template <Accuracy Acc = Accuracy::kFloat32, typename T> static FASTNN_HD T df(T z) { return math::tanh_derivative<Acc>(z); }
};

// dz = dy * f'(z) as PyTorch's backward forms it. relu's and squared_relu's gradients pass
// through torch's threshold_backward, which gives exactly 0 where z <= 0 whatever dy is; a product
// would give NaN there for an inf or NaN dy (fp16 overflow). The others are the product.
template <Act A, Accuracy Acc = Accuracy::kFloat32, typename T>
FASTNN_HD T grad_times(T dy, T z) {
  if constexpr (A == Act::kRelu || A == Act::kSquaredRelu) {
    return z <= T(0) ? T(0) : dy * Activation<A>::template df<Acc>(z);
  } else {
    return dy * Activation<A>::template df<Acc>(z);
  }
}

// The sign mask's bit (relu, leaky_relu): whether dy passes unscaled. z > 0, and for relu also NaN
// (torch's threshold_backward passes dy there; leaky_relu_backward scales it).
template <Act A, typename T>
FASTNN_HD bool mask_bit(T z) {
  if constexpr (A == Act::kRelu) {
    return !(z <= T(0));
  } else {
    return z > T(0);
  }
}

// dz from the sign mask's bit: dy where it passes, else 0 (relu, whatever dy) or the slope times dy.
template <Act A, typename T>
FASTNN_HD T grad_through_mask(T dy, bool passes) {
  if constexpr (A == Act::kLeakyRelu) {
    return passes ? dy : T(kLeakySlope) * dy;
  } else {
    return passes ? dy : T(0);
  }
}

}  // inline namespace FASTNN_ISA_NS

// Calls fn(std::integral_constant-like tag) with the activation as a compile-time constant, so
// kernels are instantiated once per activation with no switch in their inner loops.
template <Act A>
struct ActTag {
  static constexpr Act value = A;
};

template <typename Fn>
inline bool dispatch_act(Act a, Fn&& fn) {
  switch (a) {
    case Act::kIdentity: fn(ActTag<Act::kIdentity>{}); return true;
    case Act::kRelu: fn(ActTag<Act::kRelu>{}); return true;
    case Act::kGelu: fn(ActTag<Act::kGelu>{}); return true;
    case Act::kGeluTanh: fn(ActTag<Act::kGeluTanh>{}); return true;
    case Act::kSilu: fn(ActTag<Act::kSilu>{}); return true;
    case Act::kSigmoid: fn(ActTag<Act::kSigmoid>{}); return true;
    case Act::kTanh: fn(ActTag<Act::kTanh>{}); return true;
    case Act::kLeakyRelu: fn(ActTag<Act::kLeakyRelu>{}); return true;
    case Act::kSquaredRelu: fn(ActTag<Act::kSquaredRelu>{}); return true;
    case Act::kQuickGelu: fn(ActTag<Act::kQuickGelu>{}); return true;
  }
  return false;
}

}  // namespace fastnn
