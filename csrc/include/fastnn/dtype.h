// Element types crossing the torch-free boundary, and the host conversions of the 16-bit
// floats to and from float. Conversions are branch-free bit arithmetic so that loops using them
// vectorise on any x86-64 or Arm CPU (no F16C or AVX512-BF16 needed); rounding is to nearest even.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "fastnn/activations.h"

namespace fastnn {

// Codes shared with Python (fastnn/_native.py): keep in sync.
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat64: return "float64";
  }
  return "unknown";
}

// Bytes per element.
inline size_t dtype_size(DType d) {
  switch (d) {
    case DType::kFloat32: return 4;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
    case DType::kFloat64: return 8;
  }
  return 0;
}

// Host storage types for the 16-bit floats: just the bits.
struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

inline namespace FASTNN_ISA_NS {

inline float bf16_to_float(uint16_t h) { return math::from_bits(uint32_t(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  const uint32_t u = math::to_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = ((u >> 16) | 0x40u);
  return uint16_t((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

inline float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t em = uint32_t(h & 0x7fffu) << 13;  // exponent and mantissa in float position
  const uint32_t exp = em & 0x0f800000u;
  // normal numbers: rebias the exponent by 127 - 15
  const uint32_t normal = em + (uint32_t(127 - 15) << 23);
  // inf / NaN: exponent all ones
  const uint32_t infnan = em + (uint32_t(255 - 31) << 23);
  // subnormals: let the FPU normalise (value = mantissa * 2^-24)
  const float sub = math::from_bits(em + (uint32_t(127 - 15 + 1) << 23)) - math::from_bits(uint32_t(127 - 14) << 23);
  const uint32_t mag = exp == 0x0f800000u ? infnan : (exp == 0 ? math::to_bits(sub) : normal);
  return math::from_bits(mag | sign);
}

inline uint16_t float_to_f16(float f) {
  const uint32_t u = math::to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // at or above 65520 (the first value that rounds to inf): inf, or a quiet NaN
  const uint32_t big = a > 0x7f800000u ? 0x7e00u : 0x7c00u;
  // below 2^-14 the result is subnormal: adding 0.5 shifts the mantissa into place and the FPU
  // rounds it to nearest even
  const float sub_f = math::from_bits(a) + 0.5f;
  const uint32_t sub = math::to_bits(sub_f) - 0x3f000000u;
  // normal: rebias, then round to nearest even on the 13 dropped bits
  const uint32_t odd = (a >> 13) & 1u;
  const uint32_t normal = (a + (uint32_t(15 - 127) << 23) + 0xfffu + odd) >> 13;
  const uint32_t mag = a >= 0x477ff000u ? big : (a < 0x38800000u ? sub : normal);
  return uint16_t(mag | sign);
}

// load/store between a storage type and the float (or double) the math runs in
inline float load(float v) { return v; }
inline double load(double v) { return v; }
inline float load(bf16_t v) { return bf16_to_float(v.bits); }
inline float load(f16_t v) { return f16_to_float(v.bits); }

template <typename T>
struct Store;
template <>
struct Store<float> {
  static float from(float v) { return v; }
};
template <>
struct Store<double> {
  static double from(double v) { return v; }
};
template <>
struct Store<bf16_t> {
  static bf16_t from(float v) { return bf16_t{float_to_bf16(v)}; }
};
template <>
struct Store<f16_t> {
  static f16_t from(float v) { return f16_t{float_to_f16(v)}; }
};

// The type arithmetic runs in: float for every storage type except double.
template <typename T>
struct Compute {
  using type = float;
};
template <>
struct Compute<double> {
  using type = double;
};

}  // inline namespace FASTNN_ISA_NS

}  // namespace fastnn
