// Attention on the CPU over a step's flattened ragged batch, reading K and V where they sit:
// in the paged cache through each sequence's block table (no gather copy), or, without a
// cache (encoders), in the step's own k, v rows.
//
// The cache holds one tile per (block, KV head); K is transposed in its tile, so a query's dot
// products with a block's keys are whole-vector FMAs down the head dimension:
//
//     k_cache, v_cache: (num_blocks, num_kv_heads, block_size * head_dim)
//     K tile: (head_dim, block_size)      key j of the block is column j
//     V tile: (block_size, head_dim)      value j of the block is row j
//
// A work item is (sequence, KV head, up to kQueryRows / per_kv of its new tokens). Its rows
// are those tokens x the query heads of the GQA group, so every K/V tile it reads serves all
// of them. It walks its keys a tile of whole blocks at a time with an online softmax:
//
//     for each key tile [t0, t1) the item can see:
//         S = Q K^T                                (rows, keys); Q is pre-scaled
//         per row, over its visible keys only:
//             m' = max(m, max S)   P = exp(S - m')   l = l e^(m - m') + sum P
//             O = O e^(m - m') + P V
//     out = O / l
//
// A row's visible keys are one interval [lo, hi): lo = q_pos - window + 1 (or 0), hi = q_pos + 1
// when causal (else seq_len). Nothing outside it reaches the softmax or P V, so cache slots past
// a sequence's end may hold anything, NaN included.
#include <ATen/Parallel.h>

#include <atomic>
#include <vector>

#include "attention_tiles.h"
#include "kernels.h"
#include "parallel.h"
#include "registry.h"

namespace attnserve {
namespace {

using namespace tiles;

constexpr int64_t kQueryRows = 48;   // rows per work item: its scores and output stay in L1/L2
constexpr int64_t kTileKeys = 128;   // keys per softmax step (whole blocks, at least one)

template <typename T>
struct Problem {
  const T* q = nullptr;              // (num_tokens, num_heads, head_dim), any token/head strides
  int64_t q_token_stride = 0, q_head_stride = 0;
  T* out = nullptr;                  // (num_tokens, num_heads, head_dim), contiguous
  const int32_t* cu_seqlens_q = nullptr;   // (num_seqs + 1,) first row of each sequence
  const int32_t* seq_lens = nullptr;       // (num_seqs,) keys per sequence, cached + new
  int64_t num_heads = 0, num_kv_heads = 0, head_dim = 0;
  float scale = 1.f;
  int64_t window = 0;                // 0: every earlier key
  bool causal = true;
  // Keys and values. With block_tables, the paged cache; without, the step's own rows,
  // (num_tokens, num_kv_heads, head_dim) with any token/head strides, key j of sequence s
  // at row cu_seqlens_q[s] + j.
  const T* k = nullptr;
  const T* v = nullptr;
  const int32_t* block_tables = nullptr;   // (num_seqs, max_blocks)
  int64_t max_blocks = 0;
  int64_t block_size = kTileKeys;          // rows: keys per tile
  int64_t k_token_stride = 0, k_head_stride = 0, v_token_stride = 0, v_head_stride = 0;

  bool paged() const { return block_tables != nullptr; }
  int64_t per_kv() const { return num_heads / num_kv_heads; }
  int64_t tile_keys() const { return std::max<int64_t>(1, kTileKeys / block_size) * block_size; }
  int64_t scores_stride() const {            // a tile's keys, rounded up to whole vectors
    return (tile_keys() + Wide::kLanes - 1) / Wide::kLanes * Wide::kLanes;
  }
  int64_t tile_offset(int64_t seq, int64_t block_index, int64_t kv_head) const {
    const int64_t block = block_tables[seq * max_blocks + block_index];
    return (block * num_kv_heads + kv_head) * block_size * head_dim;
  }
};

struct WorkItem {
  int64_t seq, kv_head;
  int64_t first_query, num_queries;  // which of the sequence's new tokens, in order
  int64_t cost;                      // rows x visible keys, to hand out the longest first
};

// The interval of key positions a run of new tokens can see, together.
struct KeyRange {
  int64_t lo, hi;
};

template <typename T>
int64_t first_position(const Problem<T>& p, int64_t seq, int64_t first_query) {
  const int64_t query_len = p.cu_seqlens_q[seq + 1] - p.cu_seqlens_q[seq];
  return p.seq_lens[seq] - query_len + first_query;
}

template <typename T>
KeyRange visible_keys(const Problem<T>& p, int64_t seq, int64_t first_pos, int64_t last_pos) {
  const int64_t lo = p.window > 0 ? std::max<int64_t>(0, first_pos - p.window + 1) : 0;
  const int64_t hi = p.causal ? last_pos + 1 : p.seq_lens[seq];
  return {lo, hi};
}

// Per-thread buffers, sized for the largest item.
template <typename T>
struct Scratch {
  std::vector<float> q, scores, acc, row_max, row_sum, rescale;
  std::vector<KeyRange> cols;              // the tile columns each row sees
  std::vector<const T*> value_rows;        // the V row of each key of the current tile
  std::vector<T> k_tile;                   // rows: the tile's keys transposed, as the cache holds them

  Scratch(const Problem<T>& p, int64_t rows)
      : q(rows * p.head_dim), scores(rows * p.scores_stride()), acc(rows * p.head_dim),
        row_max(rows), row_sum(rows), rescale(rows), cols(rows), value_rows(p.tile_keys()),
        k_tile(p.paged() ? 0 : p.head_dim * p.scores_stride()) {}
};

// -- a tile of keys -------------------------------------------------------------------------

// scores[:, c] for every key c of the tile [t0, t1), t0 on a block boundary: one K tile per block.
template <typename T>
void paged_tile_scores(const Problem<T>& p, const WorkItem& item, int64_t rows, int64_t t0,
                       int64_t t1, Scratch<T>& w) {
  const int64_t bs = p.block_size, stride = p.scores_stride();
  for (int64_t start = t0; start < t1; start += bs) {
    const T* k_tile = p.k + p.tile_offset(item.seq, start / bs, item.kv_head);
    float* scores = w.scores.data() + (start - t0);
    int64_t col = 0;
    for (; col + Wide::kLanes <= bs; col += Wide::kLanes)
      dot_rows<Wide>(w.q.data(), rows, p.head_dim, k_tile, bs, col, scores, stride);
    for (; col < bs; ++col)
      dot_rows<Scalar>(w.q.data(), rows, p.head_dim, k_tile, bs, col, scores, stride);
  }
}

// The same from the step's own rows: they are transposed into one tile first (a copy per key
// and dim, against `rows` FMAs each), then read as a cache tile would be.
template <typename T>
void row_tile_scores(const Problem<T>& p, const WorkItem& item, int64_t rows, int64_t t0,
                     int64_t t1, Scratch<T>& w) {
  const int64_t stride = p.scores_stride(), first_row = p.cu_seqlens_q[item.seq];
  for (int64_t c = 0; c < t1 - t0; ++c) {
    const T* key = p.k + (first_row + t0 + c) * p.k_token_stride + item.kv_head * p.k_head_stride;
    for (int64_t d = 0; d < p.head_dim; ++d) w.k_tile[d * stride + c] = key[d];
  }
  for (int64_t col = 0; col < t1 - t0; col += Wide::kLanes)      // stride is whole vectors
    dot_rows<Wide>(w.q.data(), rows, p.head_dim, w.k_tile.data(), stride, col, w.scores.data(),
                   stride);
}

template <typename T>
void point_at_values(const Problem<T>& p, const WorkItem& item, int64_t t0, int64_t t1, Scratch<T>& w) {
  if (!p.paged()) {
    const T* first = p.v + (p.cu_seqlens_q[item.seq] + t0) * p.v_token_stride +
                     item.kv_head * p.v_head_stride;
    for (int64_t c = 0; c < t1 - t0; ++c) w.value_rows[c] = first + c * p.v_token_stride;
    return;
  }
  for (int64_t start = t0; start < t1; start += p.block_size) {
    const T* v_tile = p.v + p.tile_offset(item.seq, start / p.block_size, item.kv_head);
    for (int64_t j = 0; j < std::min(p.block_size, t1 - start); ++j)
      w.value_rows[start - t0 + j] = v_tile + j * p.head_dim;
  }
}

// The tile's softmax step for every row, then O = O * rescale + P V, kValueRows at a time
// over the keys any of them sees (the others' weights are 0 there).
template <typename T>
void update_rows(const Problem<T>& p, const WorkItem& item, int64_t rows, int64_t first_pos,
                 int64_t t0, int64_t t1, Scratch<T>& w) {
  const int64_t per_kv = p.per_kv(), stride = p.scores_stride(), n = t1 - t0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t pos = first_pos + r / per_kv;
    const KeyRange keys = visible_keys(p, item.seq, pos, pos);
    w.cols[r] = {std::clamp(keys.lo - t0, int64_t{0}, n), std::clamp(keys.hi - t0, int64_t{0}, n)};
    w.rescale[r] = softmax_step(w.scores.data() + r * stride, n, w.cols[r].lo, w.cols[r].hi,
                                w.row_max[r], w.row_sum[r]);
  }
  for (int64_t r = 0; r < rows; r += kValueRows) {
    const int64_t count = std::min(kValueRows, rows - r);
    KeyRange seen{n, 0};
    for (int64_t i = r; i < r + count; ++i) {
      if (w.cols[i].lo >= w.cols[i].hi) continue;
      seen = {std::min(seen.lo, w.cols[i].lo), std::max(seen.hi, w.cols[i].hi)};
    }
    if (seen.lo >= seen.hi) continue;
    weigh_group<T>(count, w.acc.data() + r * p.head_dim, p.head_dim, &w.rescale[r],
                   w.scores.data() + r * stride, stride, seen.lo, seen.hi, w.value_rows.data());
  }
}

// -- one work item --------------------------------------------------------------------------

// Rows are token-major: row r is new token r / per_kv, query head kv_head * per_kv + r % per_kv.
// Scaled and transposed to (head_dim, rows), the layout dot_keys reads.
template <typename T>
void load_queries(const Problem<T>& p, const WorkItem& item, Scratch<T>& w) {
  const int64_t per_kv = p.per_kv(), first_row = p.cu_seqlens_q[item.seq] + item.first_query;
  const int64_t rows = item.num_queries * per_kv;
  for (int64_t i = 0; i < item.num_queries; ++i) {
    for (int64_t j = 0; j < per_kv; ++j) {
      const T* src = p.q + (first_row + i) * p.q_token_stride +
                     (item.kv_head * per_kv + j) * p.q_head_stride;
      float* dst = w.q.data() + i * per_kv + j;
      for (int64_t d = 0; d < p.head_dim; ++d) dst[d * rows] = static_cast<float>(src[d]) * p.scale;
    }
  }
}

template <typename T>
void store_output(const Problem<T>& p, const WorkItem& item, const Scratch<T>& w) {
  const int64_t per_kv = p.per_kv(), first_row = p.cu_seqlens_q[item.seq] + item.first_query;
  for (int64_t i = 0; i < item.num_queries; ++i) {
    for (int64_t j = 0; j < per_kv; ++j) {
      const int64_t r = i * per_kv + j;
      T* dst = p.out + ((first_row + i) * p.num_heads + item.kv_head * per_kv + j) * p.head_dim;
      const float* acc = w.acc.data() + r * p.head_dim;
      const float inv_sum = w.row_sum[r] > 0.f ? 1.f / w.row_sum[r] : 0.f;
      for (int64_t d = 0; d < p.head_dim; ++d) dst[d] = static_cast<T>(acc[d] * inv_sum);
    }
  }
}

template <typename T>
void attend(const Problem<T>& p, const WorkItem& item, Scratch<T>& w) {
  const int64_t rows = item.num_queries * p.per_kv();
  const int64_t first_pos = first_position(p, item.seq, item.first_query);
  const KeyRange keys = visible_keys(p, item.seq, first_pos, first_pos + item.num_queries - 1);
  load_queries(p, item, w);
  std::fill_n(w.row_max.begin(), rows, -std::numeric_limits<float>::infinity());
  std::fill_n(w.row_sum.begin(), rows, 0.f);
  std::fill_n(w.acc.begin(), rows * p.head_dim, 0.f);

  const int64_t tile_keys = p.tile_keys();
  // Tiles start at multiples of tile_keys whatever the item, so a row sums its keys in the same
  // order in any batch and any split of its chunk: fp32 results do not depend on the batch.
  for (int64_t t0 = keys.lo / tile_keys * tile_keys; t0 < keys.hi; t0 += tile_keys) {
    const int64_t t1 = std::min(t0 + tile_keys, keys.hi);
    if (p.paged())
      paged_tile_scores(p, item, rows, t0, t1, w);
    else
      row_tile_scores(p, item, rows, t0, t1, w);
    point_at_values(p, item, t0, t1, w);
    update_rows(p, item, rows, first_pos, t0, t1, w);
  }
  store_output(p, item, w);
}

// -- the whole step -------------------------------------------------------------------------

template <typename T>
std::vector<WorkItem> plan(const Problem<T>& p, int64_t num_seqs) {
  const int64_t per_kv = p.per_kv(), tokens_per_item = std::max<int64_t>(1, kQueryRows / per_kv);
  std::vector<WorkItem> items;
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    const int64_t query_len = p.cu_seqlens_q[seq + 1] - p.cu_seqlens_q[seq];
    for (int64_t first = 0; first < query_len; first += tokens_per_item) {
      const int64_t n = std::min(tokens_per_item, query_len - first);
      const int64_t first_pos = first_position(p, seq, first);
      const KeyRange keys = visible_keys(p, seq, first_pos, first_pos + n - 1);
      for (int64_t g = 0; g < p.num_kv_heads; ++g)
        items.push_back({seq, g, first, n, n * per_kv * (keys.hi - keys.lo)});
    }
  }
  // Longest first, then threads take the next item as they finish: prefill chunks' late,
  // long tiles do not all land on one thread.
  std::stable_sort(items.begin(), items.end(),
                   [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; });
  return items;
}

template <typename T>
void run(const Problem<T>& p, int64_t num_seqs) {
  const std::vector<WorkItem> items = plan(p, num_seqs);
  const int64_t rows = std::max<int64_t>(1, kQueryRows / p.per_kv()) * p.per_kv();
  const int64_t num_threads = std::min<int64_t>(at::get_num_threads(), items.size());
  std::atomic<size_t> next{0};
  parallel_for(0, num_threads, 1, [&](int64_t, int64_t) {
    Scratch<T> w(p, rows);
    for (size_t i = next++; i < items.size(); i = next++) attend(p, items[i], w);
  });
}

// -- the ops --------------------------------------------------------------------------------

template <typename F>
void dispatch_dtype(at::ScalarType dtype, F&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(float{});
    case at::kBFloat16: return fn(c10::BFloat16{});
    case at::kHalf: return fn(c10::Half{});
    default: TORCH_CHECK(false, "paged attention: no kernel for ", dtype);
  }
}

void check_cache(const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t head_dim) {
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes(),
              "caches must be contiguous (num_blocks, num_kv_heads, block_size * head_dim)");
  TORCH_CHECK(k_cache.size(2) % head_dim == 0, "cache tiles are not whole rows of head_dim");
}

void check_int32(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kInt && t.is_contiguous(), "metadata must be contiguous int32");
}

// Every read must stay inside the tensors: a wrong table would otherwise read other memory.
// seq_lens and block_tables may be null (no cache: keys are the sequence's own rows).
void check_sequences(const at::Tensor& cu_seqlens_q, const int32_t* seq_lens,
                     const at::Tensor* block_tables, int64_t num_tokens, int64_t num_blocks,
                     int64_t block_size) {
  const int32_t* starts = cu_seqlens_q.data_ptr<int32_t>();
  const int64_t num_seqs = cu_seqlens_q.size(0) - 1;
  TORCH_CHECK(num_seqs >= 0 && starts[0] == 0 && starts[num_seqs] == num_tokens,
              "cu_seqlens_q must run from 0 to the number of tokens");
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t query_len = starts[s + 1] - starts[s];
    const int64_t seq_len = seq_lens ? seq_lens[s] : query_len;
    TORCH_CHECK(query_len >= 0 && query_len <= seq_len, "sequence ", s, ": bad lengths");
    if (block_tables == nullptr) continue;
    const int64_t used = (seq_len + block_size - 1) / block_size;
    TORCH_CHECK(used <= block_tables->size(1), "sequence ", s, ": block table too short");
    const int32_t* table = block_tables->data_ptr<int32_t>() + s * block_tables->size(1);
    for (int64_t b = 0; b < used; ++b)
      TORCH_CHECK(table[b] >= 0 && table[b] < num_blocks, "sequence ", s, ": block out of range");
  }
}

// What both ops share: queries, output, sequences, masking.
template <typename T>
Problem<T> problem(const at::Tensor& q, at::Tensor& out, const at::Tensor& cu_seqlens_q,
                   const int32_t* seq_lens, int64_t num_kv_heads, double scale,
                   int64_t sliding_window, bool causal) {
  Problem<T> p;
  p.q = q.data_ptr<T>();
  p.q_token_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.out = out.data_ptr<T>();
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  p.seq_lens = seq_lens;
  p.num_heads = q.size(1);
  p.num_kv_heads = num_kv_heads;
  p.head_dim = q.size(2);
  p.scale = static_cast<float>(scale);
  p.window = sliding_window;
  p.causal = causal;
  return p;
}

// k, v: (num_tokens, num_kv_heads, head_dim), any token/head strides -> their cache slots;
// a negative slot is a padding token and writes nothing.
template <typename T>
void write_tokens(const at::Tensor& k, const at::Tensor& v, T* k_cache, T* v_cache,
                  const int64_t* slots, int64_t block_size, int64_t begin, int64_t end) {
  const int64_t num_kv_heads = k.size(1), head_dim = k.size(2);
  const T* k_data = k.data_ptr<T>();
  const T* v_data = v.data_ptr<T>();
  for (int64_t t = begin; t < end; ++t) {
    if (slots[t] < 0) continue;
    const int64_t block = slots[t] / block_size, offset = slots[t] % block_size;
    for (int64_t g = 0; g < num_kv_heads; ++g) {
      const int64_t tile = (block * num_kv_heads + g) * block_size * head_dim;
      const T* k_row = k_data + t * k.stride(0) + g * k.stride(1);
      const T* v_row = v_data + t * v.stride(0) + g * v.stride(1);
      for (int64_t d = 0; d < head_dim; ++d) k_cache[tile + d * block_size + offset] = k_row[d];
      std::copy_n(v_row, head_dim, v_cache + tile + offset * head_dim);
    }
  }
}

}  // namespace

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens,
                           const at::Tensor& block_tables, double scale, int64_t sliding_window,
                           bool causal) {
  const int64_t head_dim = q.size(2), num_seqs = seq_lens.size(0);
  check_cache(k_cache, v_cache, head_dim);
  TORCH_CHECK(q.stride(2) == 1 && q.scalar_type() == k_cache.scalar_type(),
              "q must have unit stride in head_dim and the cache's dtype");
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0, "query heads must be a multiple of KV heads");
  for (const at::Tensor* t : {&cu_seqlens_q, &seq_lens, &block_tables}) check_int32(*t);
  TORCH_CHECK(cu_seqlens_q.size(0) == num_seqs + 1 && block_tables.size(0) == num_seqs,
              "metadata lengths disagree");
  check_sequences(cu_seqlens_q, seq_lens.data_ptr<int32_t>(), &block_tables, q.size(0),
                  k_cache.size(0), k_cache.size(2) / head_dim);
  at::Tensor out = at::empty(q.sizes(), q.options());
  dispatch_dtype(q.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    Problem<T> p = problem<T>(q, out, cu_seqlens_q, seq_lens.data_ptr<int32_t>(), k_cache.size(1),
                              scale, sliding_window, causal);
    p.k = k_cache.data_ptr<T>();
    p.v = v_cache.data_ptr<T>();
    p.block_tables = block_tables.data_ptr<int32_t>();
    p.max_blocks = block_tables.size(1);
    p.block_size = k_cache.size(2) / head_dim;
    run(p, num_seqs);
  });
  return out;
}

at::Tensor varlen_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& cu_seqlens_q, double scale, int64_t sliding_window,
                            bool causal) {
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1 && k.sizes() == v.sizes() &&
                  q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(),
              "q, k, v must share a dtype and have unit stride in head_dim");
  TORCH_CHECK(q.size(1) % k.size(1) == 0 && q.size(0) == k.size(0) && q.size(2) == k.size(2),
              "q and k must have the same tokens and head_dim, whole GQA groups");
  check_int32(cu_seqlens_q);
  check_sequences(cu_seqlens_q, nullptr, nullptr, q.size(0), 0, 1);
  const int32_t* starts = cu_seqlens_q.data_ptr<int32_t>();
  const int64_t num_seqs = cu_seqlens_q.size(0) - 1;
  std::vector<int32_t> seq_lens(num_seqs);       // each sequence is all new: keys = queries
  for (int64_t s = 0; s < num_seqs; ++s) seq_lens[s] = starts[s + 1] - starts[s];
  at::Tensor out = at::empty(q.sizes(), q.options());
  dispatch_dtype(q.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    Problem<T> p = problem<T>(q, out, cu_seqlens_q, seq_lens.data(), k.size(1), scale,
                              sliding_window, causal);
    p.k = k.data_ptr<T>();
    p.v = v.data_ptr<T>();
    p.k_token_stride = k.stride(0);
    p.k_head_stride = k.stride(1);
    p.v_token_stride = v.stride(0);
    p.v_head_stride = v.stride(1);
    run(p, num_seqs);
  });
  return out;
}

void paged_write_kv(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                    const at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  const int64_t head_dim = k.size(2);
  check_cache(k_cache, v_cache, head_dim);
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1 && k.sizes() == v.sizes() &&
                  k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k.scalar_type(),
              "k and v must match, have unit stride in head_dim and the cache's dtype");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() &&
                  slot_mapping.size(0) == k.size(0),
              "slot_mapping must be contiguous int64, one per token");
  const int64_t block_size = k_cache.size(2) / head_dim;
  TORCH_CHECK(k.size(1) == k_cache.size(1), "k and the cache must have the same KV heads");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < k.size(0); ++t)
    TORCH_CHECK(slots[t] < k_cache.size(0) * block_size, "token ", t, ": slot past the cache");
  dispatch_dtype(k.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    T* k_data = k_cache.data_ptr<T>();
    T* v_data = v_cache.data_ptr<T>();
    parallel_for(0, k.size(0), 64, [&](int64_t begin, int64_t end) {
      write_tokens(k, v, k_data, v_data, slots, block_size, begin, end);
    });
  });
}

static Register reg([](pybind11::module_& m) {
  m.def("paged_attention", &paged_attention,
        "out (num_tokens, num_heads, head_dim) = attention of q over the paged cache "
        "(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale, sliding_window, causal)");
  m.def("varlen_attention", &varlen_attention,
        "out = attention of each sequence's q over its own k, v rows, no cache "
        "(q, k, v, cu_seqlens_q, scale, sliding_window, causal)");
  m.def("paged_write_kv", &paged_write_kv,
        "write k, v (num_tokens, num_kv_heads, head_dim) to their slots of the paged cache "
        "(k, v, k_cache, v_cache, slot_mapping)");
});

}  // namespace attnserve
