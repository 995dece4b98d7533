// Block-quantized weights as the quantized-linear kernels read them, and activation rows
// prepared for them. engine/layers/quant_blocks.py writes this layout; it is the contract.
//
// Formats (GGUF's names), per block of 32 input columns with fp16 scale d (and min m):
//   Q4_0  4-bit code u in 0..15     value = d * (u - 8)
//   Q4_1  4-bit code u in 0..15     value = d * u + m
//   Q8_0  8-bit code q in -127..127 value = d * q
//
// Output rows are packed 16 at a time (a "group"), so one 16-lane register holds one value per
// output row and no horizontal sum is ever needed. One (group, block) is 4 (4-bit) or 8 (8-bit)
// vectors of 64 bytes; byte 4*r + t of vector j holds column 4*j + t of row r:
//
//     vector j:  | row 0: c0 c1 c2 c3 | row 1: c0 c1 c2 c3 | ... | row 15: c0 c1 c2 c3 |
//     4-bit: low nibble = quad j (columns 4j..4j+3), high nibble = quad j + 4 (16+4j..16+4j+3)
//     8-bit: vectors 0..7 = quads 0..7, the int8 code itself
//
// so a 32-bit lane is four consecutive columns of one row: one dot-product instruction against
// four broadcast activation bytes yields one partial sum per row. Scales and mins are fp16,
// (groups, blocks, 16): one 32-byte load per (group, block).
#pragma once
#include <c10/util/Half.h>

#include <cstdint>

namespace attnserve::quant {

constexpr int kBlock = 32;       // columns per block, for weights and activations alike
constexpr int kGroupRows = 16;   // output rows packed together
constexpr int kQuads = 8;        // 4-column quads per block
constexpr int64_t kPrefetchBytes = 4096;   // software prefetch distance in the codes stream

enum Format : int { kQ4_0 = 0, kQ4_1 = 1, kQ8_0 = 2 };

constexpr bool is_q8(int format) { return format == kQ8_0; }
constexpr int code_vectors(int format) { return is_q8(format) ? 8 : 4; }
constexpr int64_t group_block_bytes(int format) { return 64 * code_vectors(format); }

struct PackedWeight {
  const uint8_t* codes;        // (groups, blocks, group_block_bytes)
  const c10::Half* scales;     // (groups, blocks, 16)
  const c10::Half* mins;       // (groups, blocks, 16), Q4_1 only
  int64_t num_blocks;          // in_features / 32

  const uint8_t* block_codes(int64_t group, int64_t block, int format) const {
    return codes + (group * num_blocks + block) * group_block_bytes(format);
  }
  int64_t scale_index(int64_t group, int64_t block) const {
    return (group * num_blocks + block) * kGroupRows;
  }
};

// Activation rows quantized per block of 32 like Q8_0 (llama.cpp's approach), so a weight
// block's dot product is integer: x . w = sx * (dw * sum(q_x * u) + ...) per block.
struct QuantizedRows {
  const int8_t* codes;         // (rows, in_features), -127..127
  const float* scales;         // (rows, blocks)
  const int32_t* offsets;      // (rows, blocks): -zero_point * sum(codes), the weights' zero point
  const float* sums;           // (rows, blocks): scale * sum(codes), for Q4_1's mins
  int64_t num_blocks;

  int64_t at(int64_t row, int64_t block) const { return row * num_blocks + block; }
};

// The code of row r (0..15) and column c (0..31) within one (group, block)'s bytes.
inline int code_at(const uint8_t* block, int format, int r, int c) {
  const int quad = c / 4, t = c % 4;
  if (is_q8(format)) return static_cast<int8_t>(block[64 * quad + 4 * r + t]);
  const uint8_t byte = block[64 * (quad % 4) + 4 * r + t];
  return quad < 4 ? byte & 0x0F : byte >> 4;
}

inline float weight_value(int format, int code, float scale, float min) {
  switch (format) {
    case kQ4_0: return scale * static_cast<float>(code - 8);
    case kQ4_1: return scale * static_cast<float>(code) + min;
    default: return scale * static_cast<float>(code);
  }
}

}  // namespace attnserve::quant
