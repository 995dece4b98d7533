// Quantized-linear tiles for AVX2 + FMA: a group's 16 output rows as two halves of 8.
//
// vpmaddubsw (unsigned x signed bytes -> int16 pairs) then vpmaddwd against
// ones (-> int32 per four columns, one lane per row). 4-bit products are small enough to sum
// the 8 quads in int16 first (8 * 2 * 15 * 127 = 30480 < 32767); 8-bit ones are not, and
// vpmaddubsw needs one unsigned operand: |w| against sign(w) * x, widened every quad.
#pragma once
#include <immintrin.h>

#include <cstring>

#include "quant_blocks.h"

namespace attnserve::quant {

constexpr int kTileRows = 4;      // activation rows sharing one load of a weight block

// Q8_0 codes stay signed here (the sign trick), so only Q4_0 has a zero point.
constexpr int zero_point(int format) { return format == kQ4_0 ? 8 : 0; }

inline __m256 load_halves(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// The codes kPrefetchBytes ahead, into L1 (see quant_avx512.h).
template <int F>
inline void prefetch_ahead(const uint8_t* codes) {
  for (int j = 0; j < code_vectors(F); ++j)
    _mm_prefetch(reinterpret_cast<const char*>(codes + kPrefetchBytes + 64 * j), _MM_HINT_T0);
}

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The 8 quads of one (group, block) for rows 8 * half .. 8 * half + 7: 4-bit codes as bytes.
template <int F>
inline void load_quads(const uint8_t* p, int half, __m256i quads[kQuads]) {
  p += 32 * half;
  if constexpr (is_q8(F)) {
    for (int j = 0; j < kQuads; ++j)
      quads[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * j));
  } else {
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int j = 0; j < 4; ++j) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * j));
      quads[j] = _mm256_and_si256(v, low);
      quads[j + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    }
  }
}

// sum over the block of code * x_code, one int32 per row of the half.
template <int F>
inline __m256i block_dot(const __m256i quads[kQuads], const int8_t* xq, int32_t offset) {
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (is_q8(F)) {
    __m256i dot = _mm256_set1_epi32(offset);
    for (int j = 0; j < kQuads; ++j) {
      const __m256i xj = _mm256_set1_epi32(load_i32(xq + 4 * j));
      const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(quads[j]),
                                                 _mm256_sign_epi8(xj, quads[j]));
      dot = _mm256_add_epi32(dot, _mm256_madd_epi16(pairs, ones));
    }
    return dot;
  } else {
    __m256i pairs = _mm256_setzero_si256();
    for (int j = 0; j < kQuads; ++j)
      pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(
          quads[j], _mm256_set1_epi32(load_i32(xq + 4 * j))));
    return _mm256_add_epi32(_mm256_madd_epi16(pairs, ones), _mm256_set1_epi32(offset));
  }
}

// out[r * 16 + lane] = row (row + r) of x . weight row (16 * group + lane).
template <int F, int R>
inline void tile(const PackedWeight& w, int64_t group, const QuantizedRows& x, int64_t row,
                 float* out) {
  for (int half = 0; half < 2; ++half) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < w.num_blocks; ++b) {
      __m256i quads[kQuads];
      const uint8_t* codes = w.block_codes(group, b, F);
      if (half == 0) prefetch_ahead<F>(codes);      // the second half finds the group in cache
      load_quads<F>(codes, half, quads);
      const int64_t s = w.scale_index(group, b) + 8 * half;
      const __m256 d = load_halves(w.scales + s);
      for (int r = 0; r < R; ++r) {
        const int64_t i = x.at(row + r, b);
        const __m256i dot = block_dot<F>(quads, x.codes + i * kBlock, x.offsets[i]);
        const __m256 scale = _mm256_mul_ps(d, _mm256_set1_ps(x.scales[i]));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[r]);
        if constexpr (F == kQ4_1)
          acc[r] = _mm256_fmadd_ps(load_halves(w.mins + s), _mm256_set1_ps(x.sums[i]), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + kGroupRows * r + 8 * half, acc[r]);
  }
}

inline float horizontal_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline int32_t horizontal_sum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// One activation block to int8 codes (round to nearest even); returns sum(codes).
inline int32_t quantize_block(const float* x, int8_t* codes, float* scale) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 v[4], amax = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
  }
  const float top = horizontal_max(amax);
  *scale = top / 127.0f;
  const __m256 inv = _mm256_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
  __m256i q[4];
  for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
  const int32_t sum = horizontal_sum(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]),
                                                      _mm256_add_epi32(q[2], q[3])));
  // packs interleave the 128-bit lanes; the permute puts the 32 codes back in order.
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]),
                                            _mm256_packs_epi32(q[2], q[3]));
  const __m256i ordered = _mm256_permutevar8x32_epi32(packed,
                                                      _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes), ordered);
  return sum;
}

}  // namespace attnserve::quant
