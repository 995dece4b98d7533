// Quantized-linear tiles in portable C++, for CPUs without AVX2: the same arithmetic as the
// vector builds (exact int32 dot per block, then the scales in fp32), one value at a time.
#pragma once
#include <algorithm>
#include <cmath>

#include "quant_blocks.h"

namespace attnserve::quant {

constexpr int kTileRows = 1;

constexpr int zero_point(int format) { return format == kQ4_0 ? 8 : 0; }

template <int F, int R>
inline void tile(const PackedWeight& w, int64_t group, const QuantizedRows& x, int64_t row,
                 float* out) {
  for (int r = 0; r < R; ++r) {
    for (int lane = 0; lane < kGroupRows; ++lane) {
      float acc = 0.0f;
      for (int64_t b = 0; b < w.num_blocks; ++b) {
        const uint8_t* codes = w.block_codes(group, b, F);
        const int64_t i = x.at(row + r, b), s = w.scale_index(group, b) + lane;
        int32_t dot = x.offsets[i];
        for (int c = 0; c < kBlock; ++c) dot += code_at(codes, F, lane, c) * x.codes[i * kBlock + c];
        acc = std::fma(static_cast<float>(dot), static_cast<float>(w.scales[s]) * x.scales[i], acc);
        if constexpr (F == kQ4_1) acc = std::fma(static_cast<float>(w.mins[s]), x.sums[i], acc);
      }
      out[kGroupRows * r + lane] = acc;
    }
  }
}

inline int32_t quantize_block(const float* x, int8_t* codes, float* scale) {
  float amax = 0.0f;
  for (int c = 0; c < kBlock; ++c) amax = std::max(amax, std::fabs(x[c]));
  *scale = amax / 127.0f;
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  int32_t sum = 0;
  for (int c = 0; c < kBlock; ++c) {
    codes[c] = static_cast<int8_t>(std::nearbyint(x[c] * inv));   // nearest even, as cvtps2dq
    sum += codes[c];
  }
  return sum;
}

}  // namespace attnserve::quant
