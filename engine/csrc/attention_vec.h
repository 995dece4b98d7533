// Float vectors for the attention kernels, one struct per instruction set with the same small
// interface, so each loop is written once:
//
//     Wide     the widest this build has: 16 lanes (AVX-512), 8 (AVX2) or 1 (portable)
//     Scalar   one lane, for the tail of a row that is not a whole number of Wide vectors
//
// Loads widen the cache's element type (float, bfloat16, float16) to fp32: every product and
// sum is fp32 whatever the cache holds.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace attnserve::vec {

// exp(r) for |r| <= ln(2)/2, Taylor to r^7: relative error below 1.5e-7, about one fp32 ulp.
constexpr float kExpCoeffs[] = {1.f, 1.f, 1.f / 2, 1.f / 6, 1.f / 24, 1.f / 120, 1.f / 720,
                                1.f / 5040};
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693145751953125f;         // ln 2 = kLn2Hi + kLn2Lo, kLn2Hi exact in
constexpr float kLn2Lo = 1.42860682030941723e-6f;    // few bits so n * kLn2Hi rounds to nothing
constexpr float kExpMin = -87.0f;                    // 2^n stays a normal float above; 0 below

struct Scalar {
  static constexpr int kLanes = 1;
  float x;

  static Scalar zero() { return {0.f}; }
  static Scalar broadcast(float value) { return {value}; }
  static Scalar load(const float* p) { return {*p}; }
  static Scalar load(const c10::BFloat16* p) { return {static_cast<float>(*p)}; }
  static Scalar load(const c10::Half* p) { return {static_cast<float>(*p)}; }
  void store(float* p) const { *p = x; }
  float reduce_add() const { return x; }
  float reduce_max() const { return x; }
  friend Scalar operator+(Scalar a, Scalar b) { return {a.x + b.x}; }
  friend Scalar operator-(Scalar a, Scalar b) { return {a.x - b.x}; }
  friend Scalar operator*(Scalar a, Scalar b) { return {a.x * b.x}; }
  friend Scalar fma(Scalar a, Scalar b, Scalar c) { return {a.x * b.x + c.x}; }
  friend Scalar max(Scalar a, Scalar b) { return {std::max(a.x, b.x)}; }
  friend Scalar exp(Scalar a) { return {std::exp(a.x)}; }
};

#if defined(__AVX512F__)
struct Vec512 {
  static constexpr int kLanes = 16;
  __m512 x;

  static Vec512 zero() { return {_mm512_setzero_ps()}; }
  static Vec512 broadcast(float value) { return {_mm512_set1_ps(value)}; }
  static Vec512 load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Vec512 load(const c10::BFloat16* p) {
    // bfloat16 is the top half of an fp32: widen each lane to 32 bits, shift into place.
    __m512i halves = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(halves, 16))};
  }
  static Vec512 load(const c10::Half* p) {
    return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }
  void store(float* p) const { _mm512_storeu_ps(p, x); }
  float reduce_add() const { return _mm512_reduce_add_ps(x); }
  float reduce_max() const { return _mm512_reduce_max_ps(x); }
  friend Vec512 operator+(Vec512 a, Vec512 b) { return {_mm512_add_ps(a.x, b.x)}; }
  friend Vec512 operator-(Vec512 a, Vec512 b) { return {_mm512_sub_ps(a.x, b.x)}; }
  friend Vec512 operator*(Vec512 a, Vec512 b) { return {_mm512_mul_ps(a.x, b.x)}; }
  friend Vec512 fma(Vec512 a, Vec512 b, Vec512 c) { return {_mm512_fmadd_ps(a.x, b.x, c.x)}; }
  friend Vec512 max(Vec512 a, Vec512 b) { return {_mm512_max_ps(a.x, b.x)}; }
  friend Vec512 exp(Vec512 a) {
    // exp(a) = 2^n * exp(r), n = round(a / ln 2), r = a - n ln 2; scalef applies the 2^n.
    __m512 x = _mm512_max_ps(a.x, _mm512_set1_ps(kExpMin));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
    __m512 p = _mm512_set1_ps(kExpCoeffs[7]);
    for (int i = 6; i >= 0; --i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpCoeffs[i]));
    const __mmask16 normal = _mm512_cmp_ps_mask(a.x, _mm512_set1_ps(kExpMin), _CMP_GE_OQ);
    return {_mm512_maskz_scalef_ps(normal, p, n)};                // 0 below kExpMin (and -inf)
  }
};
using Wide = Vec512;

#elif defined(__AVX2__)
struct Vec256 {
  static constexpr int kLanes = 8;
  __m256 x;

  static Vec256 zero() { return {_mm256_setzero_ps()}; }
  static Vec256 broadcast(float value) { return {_mm256_set1_ps(value)}; }
  static Vec256 load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Vec256 load(const c10::BFloat16* p) {
    __m256i halves = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(halves, 16))};
  }
  static Vec256 load(const c10::Half* p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
  }
  void store(float* p) const { _mm256_storeu_ps(p, x); }
  float reduce_add() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  float reduce_max() const {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
  }
  friend Vec256 operator+(Vec256 a, Vec256 b) { return {_mm256_add_ps(a.x, b.x)}; }
  friend Vec256 operator-(Vec256 a, Vec256 b) { return {_mm256_sub_ps(a.x, b.x)}; }
  friend Vec256 operator*(Vec256 a, Vec256 b) { return {_mm256_mul_ps(a.x, b.x)}; }
  friend Vec256 fma(Vec256 a, Vec256 b, Vec256 c) { return {_mm256_fmadd_ps(a.x, b.x, c.x)}; }
  friend Vec256 max(Vec256 a, Vec256 b) { return {_mm256_max_ps(a.x, b.x)}; }
  friend Vec256 exp(Vec256 a) {
    // As Vec512's, with 2^n built in the exponent bits (n >= -126 thanks to kExpMin).
    __m256 x = _mm256_max_ps(a.x, _mm256_set1_ps(kExpMin));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
    __m256 p = _mm256_set1_ps(kExpCoeffs[7]);
    for (int i = 6; i >= 0; --i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpCoeffs[i]));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 normal = _mm256_cmp_ps(a.x, _mm256_set1_ps(kExpMin), _CMP_GE_OQ);
    return {_mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(bits)), normal)};  // 0 below kExpMin
  }
};
using Wide = Vec256;

#else
using Wide = Scalar;
#endif

}  // namespace attnserve::vec
