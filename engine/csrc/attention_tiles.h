// The arithmetic of one tile of attention, independent of where keys come from: scores
// Q K^T from a transposed K tile, the online-softmax step of a row, and O += P V.
// Rows are one work item's (query token, query head) pairs; see paged_attention.cpp.
#pragma once
#include <algorithm>
#include <cstdint>
#include <limits>

#include "attention_vec.h"

namespace attnserve::tiles {

using vec::Scalar;
using vec::Wide;

// -- Q K^T ----------------------------------------------------------------------------------

// ROWS rows of scores for one vector's worth of a K tile's keys (columns col .. col + lanes).
// q is transposed, (head_dim, q_stride): the ROWS values of one d sit side by side; the K
// tile is (head_dim, k_stride).
template <int ROWS, typename V, typename T>
void dot_keys(const float* q, int64_t q_stride, int64_t head_dim, const T* k_tile,
              int64_t k_stride, int64_t col, float* scores, int64_t scores_stride) {
  V acc[ROWS];
  for (int r = 0; r < ROWS; ++r) acc[r] = V::zero();
  const T* k = k_tile + col;
  for (int64_t d = 0; d < head_dim; ++d, q += q_stride, k += k_stride) {
    const V key = V::load(k);
    for (int r = 0; r < ROWS; ++r) acc[r] = fma(V::broadcast(q[r]), key, acc[r]);
  }
  for (int r = 0; r < ROWS; ++r) acc[r].store(scores + r * scores_stride + col);
}

// The last `count` rows (0 <= count <= ROWS) in one group, its accumulators in registers.
template <typename V, typename T, int ROWS = 7>
void dot_last_rows(const float* q, int64_t count, int64_t q_stride, int64_t head_dim,
                   const T* k_tile, int64_t k_stride, int64_t col, float* scores, int64_t stride) {
  if constexpr (ROWS > 0) {
    if (count == ROWS)
      return dot_keys<ROWS, V>(q, q_stride, head_dim, k_tile, k_stride, col, scores, stride);
    dot_last_rows<V, T, ROWS - 1>(q, count, q_stride, head_dim, k_tile, k_stride, col, scores,
                                  stride);
  }
}

// All rows: groups of 8, then the rest in one group.
template <typename V, typename T>
void dot_rows(const float* q, int64_t rows, int64_t head_dim, const T* k_tile, int64_t k_stride,
              int64_t col, float* scores, int64_t stride) {
  int64_t r = 0;
  for (; r + 8 <= rows; r += 8)
    dot_keys<8, V>(q + r, rows, head_dim, k_tile, k_stride, col, scores + r * stride, stride);
  dot_last_rows<V>(q + r, rows - r, rows, head_dim, k_tile, k_stride, col, scores + r * stride,
                   stride);
}

// -- softmax and P V ------------------------------------------------------------------------

// n is a whole number of Wide vectors (score rows are padded to one).
inline float max_of(const float* x, int64_t n) {
  Wide best = Wide::broadcast(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < n; i += Wide::kLanes) best = max(best, Wide::load(x + i));
  return best.reduce_max();
}

// x = exp(x - shift) in place; returns the sum. n is a whole number of Wide vectors.
inline float exp_shifted(float* x, int64_t n, float shift) {
  Wide sum = Wide::zero();
  const Wide shift_v = Wide::broadcast(shift);
  for (int64_t i = 0; i < n; i += Wide::kLanes) {
    const Wide e = exp(Wide::load(x + i) - shift_v);
    e.store(x + i);
    sum = sum + e;
  }
  return sum.reduce_add();
}

// One row's online-softmax step over the tile's n columns, of which it sees [c0, c1): its
// scores become weights, 0 where it sees nothing (-inf before exp, so no column needs a
// scalar tail); returns the factor its running sum and output scale by.
inline float softmax_step(float* scores, int64_t n, int64_t c0, int64_t c1, float& row_max,
                          float& row_sum) {
  const int64_t padded = (n + Wide::kLanes - 1) / Wide::kLanes * Wide::kLanes;
  if (c0 >= c1) {
    std::fill(scores, scores + padded, 0.f);
    return 1.f;
  }
  std::fill(scores, scores + c0, -std::numeric_limits<float>::infinity());
  std::fill(scores + c1, scores + padded, -std::numeric_limits<float>::infinity());
  const float new_max = std::max(row_max, max_of(scores, padded));
  const float rescale = std::exp(row_max - new_max);           // 0 on the first tile (-inf)
  row_sum = row_sum * rescale + exp_shifted(scores, padded, new_max);
  row_max = new_max;
  return rescale;
}

// ROWS rows of acc, head dims [d, d + NV vectors): acc * rescale + sum over keys c in [c0, c1)
// of p[c] * V[c]. The rows share each load of V.
template <int ROWS, int NV, typename V, typename T>
void weigh_values(float* acc, int64_t head_dim, const float* rescale, const float* p,
                  int64_t p_stride, int64_t c0, int64_t c1, const T* const* value_rows, int64_t d) {
  V sum[ROWS][NV];
  for (int r = 0; r < ROWS; ++r)
    for (int j = 0; j < NV; ++j)
      sum[r][j] = V::load(acc + r * head_dim + d + j * V::kLanes) * V::broadcast(rescale[r]);
  for (int64_t c = c0; c < c1; ++c) {
    const T* row = value_rows[c] + d;
    V value[NV];
    for (int j = 0; j < NV; ++j) value[j] = V::load(row + j * V::kLanes);
    for (int r = 0; r < ROWS; ++r) {
      const V weight = V::broadcast(p[r * p_stride + c]);
      for (int j = 0; j < NV; ++j) sum[r][j] = fma(weight, value[j], sum[r][j]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int j = 0; j < NV; ++j) sum[r][j].store(acc + r * head_dim + d + j * V::kLanes);
}

// All of head_dim for ROWS rows: chunks of 4, 2, 1 vectors, then single lanes.
template <int ROWS, typename T>
void weigh_rows(float* acc, int64_t head_dim, const float* rescale, const float* p,
                int64_t p_stride, int64_t c0, int64_t c1, const T* const* value_rows) {
  constexpr int64_t L = Wide::kLanes;
  int64_t d = 0;
  for (; d + 4 * L <= head_dim; d += 4 * L)
    weigh_values<ROWS, 4, Wide>(acc, head_dim, rescale, p, p_stride, c0, c1, value_rows, d);
  if (d + 2 * L <= head_dim) {
    weigh_values<ROWS, 2, Wide>(acc, head_dim, rescale, p, p_stride, c0, c1, value_rows, d);
    d += 2 * L;
  }
  if (d + L <= head_dim) {
    weigh_values<ROWS, 1, Wide>(acc, head_dim, rescale, p, p_stride, c0, c1, value_rows, d);
    d += L;
  }
  for (; d < head_dim; ++d)
    weigh_values<ROWS, 1, Scalar>(acc, head_dim, rescale, p, p_stride, c0, c1, value_rows, d);
}

// Rows whose P V share each V load: enough accumulators (rows x 4 vectors) to keep the FMA
// units busy, few enough for the registers (AVX-512 has 32, AVX2 16).
constexpr int64_t kValueRows = Wide::kLanes >= 16 ? 4 : 2;

// A group of `count` rows (0 < count <= ROWS), as one weigh_rows instantiation.
template <typename T, int ROWS = kValueRows>
void weigh_group(int64_t count, float* acc, int64_t head_dim, const float* rescale,
                 const float* p, int64_t p_stride, int64_t c0, int64_t c1,
                 const T* const* value_rows) {
  if constexpr (ROWS > 0) {
    if (count == ROWS)
      return weigh_rows<ROWS>(acc, head_dim, rescale, p, p_stride, c0, c1, value_rows);
    weigh_group<T, ROWS - 1>(count, acc, head_dim, rescale, p, p_stride, c0, c1, value_rows);
  }
}

}  // namespace attnserve::tiles
