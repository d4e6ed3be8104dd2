// The activations of fastnn and their derivatives: one definition, used by the CPU kernels
// (csrc/cpu) and the CUDA kernels (csrc/cuda). The Python reference is fastnn/activations.py;
// tests/test_activations.py checks these functors against it.
//
// Float math on the host is written branch-free from +, *, / and bit operations so that the
// compiler vectorises the epilogue loops (libm's expf/erff calls would not vectorise); on the
// device it is CUDA's own math library. Double uses the C library everywhere (gradcheck only).
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

// The activations only ever need exp of a non-positive number (exp(-|z|), exp(-z^2)), so the
// host version handles x <= 0 alone: no overflow path. Cody-Waite reduction x = n ln2 + r,
// |r| <= ln2/2, then a degree-6 Taylor polynomial (1.2e-7 relative). NaN is the caller's to
// propagate.
FASTNN_HD float exp_nonpos(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  const float xc = x > -87.0f ? x : -87.0f;  // NaN -> -87
  // kn = n + 127 + 1.5 * 2^23 with n = round(x / ln2): the low mantissa bits of kn hold n + 127,
  // so shifting its bits by 23 builds 2^n without a float-to-int conversion
  const float kn = xc * 1.44269504088896341f + 12583039.0f;
  const float n = kn - 12583039.0f;
  const float r = (xc - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
  float p = 1.38888888888888889e-3f;
  p = p * r + 8.33333333333333333e-3f;
  p = p * r + 4.16666666666666667e-2f;
  p = p * r + 1.66666666666666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
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

// erfc(x), and gauss = exp(-x^2) from the same exponential (gelu's derivative needs both).
// For a = |x|: erfc(a) = t exp(-a^2) R(t), t = 1/(1 + a/2), R a degree-9 polynomial fitted for
// fastnn (2.2e-8 relative on [0, 10.5]); erfc(-a) = 2 - erfc(a). About 4 ulp for a < 2; beyond,
// the rounding of a^2 costs about a^2 / 2 ulp of relative accuracy, where erfc(a) < 0.005 (an
// exact a^2 split would cost two more operations per element for digits no activation needs).
FASTNN_HD float erfc_gauss(float x, float& gauss) {
#if defined(__CUDA_ARCH__)
  gauss = ::expf(-x * x);
  return ::erfcf(x);
#else
  // no clamp needed: a = inf gives t = 0 and gauss = 0; a NaN propagates through t
  const float a = abs(x);
  const float t = 1.0f / (1.0f + 0.5f * a);
  float R = 1.082214267e-02f;
  R = R * t - 1.155026193e-01f;
  R = R * t + 4.111981575e-01f;
  R = R * t - 6.471331549e-01f;
  R = R * t + 4.029489263e-01f;
  R = R * t - 8.891207996e-02f;
  R = R * t + 2.224570323e-01f;
  R = R * t + 2.392663571e-01f;
  R = R * t + 2.827874214e-01f;
  R = R * t + 2.820677952e-01f;
  gauss = exp_nonpos(-a * a);
  const float e = t * gauss * R;
  return x < 0.0f ? 2.0f - e : e;
#endif
}

FASTNN_HD float erfc(float x) {
  float gauss;
  return erfc_gauss(x, gauss);
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

FASTNN_HD double exp_nonpos(double x) { return ::exp(x); }
FASTNN_HD double erfc_gauss(double x, double& gauss) {
  gauss = ::exp(-x * x);
  return ::erfc(x);
}
FASTNN_HD double erfc(double x) { return ::erfc(x); }
FASTNN_HD double tanh(double x) { return ::tanh(x); }
FASTNN_HD double abs(double x) { return ::fabs(x); }

// s = sigmoid(z) and sc = 1 - s = sigmoid(-z), both to full relative accuracy (1 - s would
// cancel for large z): with e = exp(-|z|), the pair is 1/(1+e) and e/(1+e) in the order of sign(z).
template <typename T>
FASTNN_HD void sigmoid_pair(T z, T& s, T& sc) {
  const T e = exp_nonpos(-abs(z));
  const T r = T(1) / (T(1) + e);
  const bool pos = z >= T(0);
  s = pos ? r : (z == z ? e * r : z);
  sc = pos ? e * r : r;
}

template <typename T>
FASTNN_HD T sigmoid(T z) {
  T s, sc;
  sigmoid_pair(z, s, sc);
  return s;
}

// 1 - tanh(z)^2 = 4e / (1 + e)^2 with e = exp(-2|z|): no cancellation where tanh(z) is near +-1.
template <typename T>
FASTNN_HD T tanh_derivative(T z) {
  const T e = exp_nonpos(T(-2) * abs(z));
  const T d = T(1) + e;
  return z == z ? T(4) * e / (d * d) : z;
}

}  // namespace math

// Activation<A>::f(z) and ::df(z) = d f / dz, for T = float or double.
template <Act A>
struct Activation;

template <>
struct Activation<Act::kIdentity> {
  template <typename T> static FASTNN_HD T f(T z) { return z; }
  template <typename T> static FASTNN_HD T df(T) { return T(1); }
};

template <>
struct Activation<Act::kRelu> {
  // written so that NaN propagates, as torch.relu
  template <typename T> static FASTNN_HD T f(T z) { return z < T(0) ? T(0) : z; }
  // derivative 0 at z == 0, as torch's threshold_backward
  template <typename T> static FASTNN_HD T df(T z) { return z > T(0) ? T(1) : T(0); }
};

template <>
struct Activation<Act::kLeakyRelu> {
  template <typename T> static FASTNN_HD T f(T z) { return z > T(0) ? z : T(kLeakySlope) * z; }
  template <typename T> static FASTNN_HD T df(T z) { return z > T(0) ? T(1) : T(kLeakySlope); }
};

template <>
struct Activation<Act::kSquaredRelu> {
  template <typename T> static FASTNN_HD T f(T z) { return z < T(0) ? T(0) : z * z; }
  template <typename T> static FASTNN_HD T df(T z) { return z > T(0) ? T(2) * z : T(0); }
};

// Exact gelu: z * Phi(z), Phi(z) = erfc(-z / sqrt 2) / 2 (erfc keeps the negative tail accurate).
template <>
struct Activation<Act::kGelu> {
  template <typename T> static FASTNN_HD T f(T z) {
    return T(0.5) * z * math::erfc(-z * T(0.70710678118654752));
  }
  template <typename T> static FASTNN_HD T df(T z) {
    T gauss;  // exp(-z^2 / 2)
    const T cdf = T(0.5) * math::erfc_gauss(-z * T(0.70710678118654752), gauss);
    return cdf + z * gauss * T(0.39894228040143268);
  }
};

// gelu_tanh: 0.5 z (1 + tanh(u)) with u = sqrt(2/pi) (z + 0.044715 z^3); the identity
// 1 + tanh(u) = 2 sigmoid(2u) avoids the cancellation of 1 + tanh(u) for negative z.
template <>
struct Activation<Act::kGeluTanh> {
  template <typename T> static FASTNN_HD T u2(T z) {
    return T(2 * 0.79788456080286536) * (z + T(0.044715) * z * z * z);
  }
  template <typename T> static FASTNN_HD T f(T z) { return z * math::sigmoid(u2(z)); }
  template <typename T> static FASTNN_HD T df(T z) {
    T s, sc;
    math::sigmoid_pair(u2(z), s, sc);
    const T du2 = T(2 * 0.79788456080286536) * (T(1) + T(3 * 0.044715) * z * z);
    return s + z * s * sc * du2;
  }
};

template <>
struct Activation<Act::kSilu> {
  template <typename T> static FASTNN_HD T f(T z) { return z * math::sigmoid(z); }
  template <typename T> static FASTNN_HD T df(T z) {
    T s, sc;
    math::sigmoid_pair(z, s, sc);
    return s * (T(1) + z * sc);
  }
};

template <>
struct Activation<Act::kQuickGelu> {
  template <typename T> static FASTNN_HD T f(T z) { return z * math::sigmoid(T(kQuickGeluScale) * z); }
  template <typename T> static FASTNN_HD T df(T z) {
    T s, sc;
    math::sigmoid_pair(T(kQuickGeluScale) * z, s, sc);
    return s * (T(1) + T(kQuickGeluScale) * z * sc);
  }
};

template <>
struct Activation<Act::kSigmoid> {
  template <typename T> static FASTNN_HD T f(T z) { return math::sigmoid(z); }
  template <typename T> static FASTNN_HD T df(T z) {
    T s, sc;
    math::sigmoid_pair(z, s, sc);
    return s * sc;
  }
};

template <>
struct Activation<Act::kTanh> {
  template <typename T> static FASTNN_HD T f(T z) { return math::tanh(z); }
  template <typename T> static FASTNN_HD T df(T z) { return math::tanh_derivative(z); }
};

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
