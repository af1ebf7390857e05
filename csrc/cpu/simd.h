// Scalar helpers written so that GCC vectorizes the loops that call them (`#pragma omp simd`):
// no branches, no library calls, no lookup tables. No torch headers.
//
// fast_exp(x): Cephes' expf scheme. x = n ln2 + r with n = round(x log2e), |r| <= ln2/2, ln2 split
// in a high and a low part so r is exact to float precision; exp(r) by a degree-6 minimax polynomial
// (Cephes' coefficients); 2^n assembled in the exponent bits. Max error about 1-2 ulp over the
// range we use (x <= ~0.1: arguments are z - max or z - lse). Below -87.3 (where 2^n would leave
// the normal range) the result is exactly 0, so exp(-inf) == 0; a NaN argument gives NaN.
#pragma once
#include <cstdint>
#include <cstring>

#include "reasonrl.h"

#if defined(__GNUC__)
#define RR_INLINE inline __attribute__((always_inline))
#else
#define RR_INLINE inline
#endif

#ifdef __FAST_MATH__
#error "csrc/cpu/simd.h relies on IEEE rounding (fast_exp's round-to-nearest trick): no -ffast-math"
#endif

namespace reasonrl {
namespace simd {

RR_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

RR_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

RR_INLINE float fast_exp(float x) {
  constexpr float kLo = -87.3f;  // exp(kLo) ~ 1.2e-38, the smallest normal float
  constexpr float kHi = 88.3f;
  // `x < kLo ? kLo : x` (not fmaxf) keeps a NaN a NaN.
  float xc = x < kLo ? kLo : x;
  xc = xc > kHi ? kHi : xc;
  // round-to-nearest by the 1.5 * 2^23 trick: branchless and vectorizes on every ISA
  const float shifter = 12582912.0f;
  float n = xc * 1.44269504088896341f + shifter;
  n -= shifter;
  float r = xc - n * 0.693359375f;  // ln2 high part (exact in few bits)
  r = r - n * -2.12194440e-4f;       // ln2 low part
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t e = static_cast<int32_t>(n) + 127;  // n in [-126, 128): a normal float's exponent
  float scale = bits_to_float(static_cast<uint32_t>(e) << 23);
  float y = p * scale;
  return x < kLo ? 0.0f : y;
}

// bfloat16 is the top half of a float32: widening is a shift, narrowing rounds to nearest even.
RR_INLINE float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

RR_INLINE uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return static_cast<uint16_t>(nan ? ((u >> 16) | 0x0040u) : rounded);  // quiet the NaN
}

// IEEE half, exact and branchless (so these vectorize on every ISA; GCC 12 does not vectorize its
// own _Float16 conversions, and older compilers lack _Float16).
RR_INLINE float f16_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t em = h & 0x7fffu;
  // Reinterpret exponent+mantissa as a float and rescale by 2^(127-15): exact for normals and
  // subnormals (needs no denormals-are-zero mode); inf/NaN get the float's all-ones exponent.
  float mag = bits_to_float(em << 13) * 5.192296858534828e+33f;  // 2^112
  uint32_t u = em >= 0x7c00u ? (0x7f800000u | (em << 13)) : float_to_bits(mag);
  return bits_to_float(u | sign);
}

RR_INLINE uint16_t float_to_f16(float f) {
  uint32_t u = float_to_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  // normal half: rebias the exponent (-112 << 23) and round the 13 dropped bits to nearest even
  uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;
  // half subnormal: adding 0.5 makes the float's ulp 2^-24, the half's; the add rounds (RNE)
  uint32_t sub = float_to_bits(bits_to_float(a) + 0.5f) - 0x3f000000u;
  uint32_t r = a < 0x38800000u ? sub : normal;
  r = a >= 0x477ff000u ? 0x7c00u : r;  // rounds to inf (65520 and up) or is inf
  r = a > 0x7f800000u ? 0x7e00u : r;   // NaN stays NaN (quiet)
  return static_cast<uint16_t>(sign | r);
}

}  // namespace simd

// Element traits: the storage type of a DType and its float32 load / store.
template <DType D>
struct Elem;
template <>
struct Elem<DType::f32> {
  using T = float;
  static RR_INLINE float load(float v) { return v; }
  static RR_INLINE float store(float f) { return f; }
};
template <>
struct Elem<DType::bf16> {
  using T = uint16_t;
  static RR_INLINE float load(uint16_t v) { return simd::bf16_to_float(v); }
  static RR_INLINE uint16_t store(float f) { return simd::float_to_bf16(f); }
};
template <>
struct Elem<DType::f16> {
  using T = uint16_t;
  static RR_INLINE float load(uint16_t v) { return simd::f16_to_float(v); }
  static RR_INLINE uint16_t store(float f) { return simd::float_to_f16(f); }
};

}  // namespace reasonrl
