// y = x W^T + b for block-quantized W (layout: quant_blocks.h), x of any float dtype.
//
// Each activation row is quantized per block of 32 to int8 with one fp32 scale (llama.cpp's
// approach), so a block's dot product is exact integer math and only the scales are fp32.
// (An fp32-activation path, exact against dequantize-then-F.linear, measured 2-4x slower at
// every shape and row count and was removed; BENCHMARKS.md.) Threads split the output rows in
// groups of 16; within a group, kTileRows activation rows share each load of a weight block.
//
// Python holds one QuantMatrix per weight (quant_matrix.h): the checks run once at load, and a
// call costs one pybind dispatch.
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <vector>

#include "parallel.h"
#include "quant_blocks.h"
#include "quant_matrix.h"
#include "registry.h"
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
#include "quant_avx512.h"
#elif defined(__AVX2__)
#include "quant_avx2.h"
#else
#include "quant_scalar.h"
#endif

namespace attnserve::quant {
namespace {

// Fewer groups than this per task and waking another thread costs more than it saves.
constexpr int64_t kMinGroupsPerTask = 4;

// Quantized activation rows, reused call after call by the calling thread.
struct Scratch {
  std::vector<int8_t> codes;
  std::vector<float> scales, sums;
  std::vector<int32_t> offsets;
};

QuantizedRows quantize_rows(const float* x, int64_t num_rows, int64_t in_features, int format,
                            Scratch& s) {
  const int64_t blocks = num_rows * (in_features / kBlock);
  s.codes.resize(num_rows * in_features);
  s.scales.resize(blocks);
  s.sums.resize(blocks);
  s.offsets.resize(blocks);
  const int32_t zero = zero_point(format);
  parallel_for(0, blocks, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int32_t sum = quantize_block(x + i * kBlock, s.codes.data() + i * kBlock, &s.scales[i]);
      s.offsets[i] = -zero * sum;
      s.sums[i] = s.scales[i] * static_cast<float>(sum);
    }
  });
  return {s.codes.data(), s.scales.data(), s.offsets.data(), s.sums.data(), in_features / kBlock};
}

// tile<F, R> for R = rows (1..kTileRows), chosen at run time for the last, partial tile.
template <int F, int R = kTileRows>
void tile_of(int rows, const PackedWeight& w, int64_t group, const QuantizedRows& x, int64_t row,
             float* out) {
  if constexpr (R > 1) {
    if (rows < R) return tile_of<F, R - 1>(rows, w, group, x, row, out);
  }
  tile<F, R>(w, group, x, row, out);
}

template <int F>
void multiply(const PackedWeight& w, const QuantizedRows& x, int64_t num_rows, int64_t out_features,
              const float* bias, float* y) {
  const int64_t groups = (out_features + kGroupRows - 1) / kGroupRows;
  parallel_for(0, groups, kMinGroupsPerTask, [&](int64_t g0, int64_t g1) {
    alignas(64) float out[kTileRows * kGroupRows];   // (tile rows, 16)
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t first = g * kGroupRows;
      const int64_t lanes = std::min<int64_t>(kGroupRows, out_features - first);  // last group: fewer
      for (int64_t row = 0; row < num_rows; row += kTileRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kTileRows, num_rows - row));
        tile_of<F>(rows, w, g, x, row, out);
        for (int r = 0; r < rows; ++r) {
          float* dst = y + (row + r) * out_features + first;
          for (int64_t lane = 0; lane < lanes; ++lane)
            dst[lane] = out[kGroupRows * r + lane] + (bias ? bias[first + lane] : 0.0f);
        }
      }
    }
  });
}

}  // namespace

QuantMatrix::QuantMatrix(at::Tensor codes, at::Tensor scales, c10::optional<at::Tensor> mins,
                         int64_t format, int64_t in_features, int64_t out_features,
                         c10::optional<at::Tensor> bias)
    : codes_(std::move(codes)), scales_(std::move(scales)), format_(format),
      in_features_(in_features), out_features_(out_features) {
  TORCH_CHECK(format == kQ4_0 || format == kQ4_1 || format == kQ8_0, "unknown format ", format);
  TORCH_CHECK(in_features % kBlock == 0, "in_features ", in_features, " is not a multiple of 32");
  const int64_t groups = (out_features + kGroupRows - 1) / kGroupRows, blocks = in_features / kBlock;
  TORCH_CHECK(codes_.scalar_type() == at::kByte && codes_.is_contiguous() &&
                  codes_.numel() == groups * blocks * group_block_bytes(format),
              "codes: expected contiguous uint8 (groups, blocks, ", group_block_bytes(format), ")");
  TORCH_CHECK(scales_.scalar_type() == at::kHalf && scales_.is_contiguous() &&
                  scales_.numel() == groups * blocks * kGroupRows,
              "scales: expected contiguous float16 (groups, blocks, 16)");
  if (mins.has_value() && mins->defined()) mins_ = *mins;
  TORCH_CHECK(mins_.defined() == (format == kQ4_1), "mins are given for Q4_1 and only Q4_1");
  TORCH_CHECK(!mins_.defined() || (mins_.scalar_type() == at::kHalf && mins_.is_contiguous() &&
                                   mins_.numel() == scales_.numel()),
              "mins: expected contiguous float16 shaped like scales");
  if (bias.has_value() && bias->defined()) bias_ = bias->to(at::kFloat).contiguous();
  TORCH_CHECK(!bias_.defined() || bias_.numel() == out_features, "bias: expected (out_features,)");
  weight_ = {codes_.data_ptr<uint8_t>(), scales_.data_ptr<c10::Half>(),
             mins_.defined() ? mins_.data_ptr<c10::Half>() : nullptr, blocks};
}

// (..., in_features) -> (..., out_features), in x's dtype.
at::Tensor QuantMatrix::forward(const at::Tensor& x) const {
  RECORD_FUNCTION("attnserve::quant_linear", std::vector<c10::IValue>({x}));   // profiler tables
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features_, "x: expected (..., ", in_features_, ")");
  const at::Tensor rows = x.reshape({-1, in_features_}).to(at::kFloat).contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features_;
  at::Tensor y = at::empty({rows.size(0), out_features_}, rows.options());
  if (rows.size(0) > 0) {
    thread_local Scratch scratch;
    const QuantizedRows q = quantize_rows(rows.data_ptr<float>(), rows.size(0), in_features_,
                                          static_cast<int>(format_), scratch);
    const float* bias = bias_.defined() ? bias_.data_ptr<float>() : nullptr;
    switch (format_) {
      case kQ4_0: multiply<kQ4_0>(weight_, q, rows.size(0), out_features_, bias, y.data_ptr<float>()); break;
      case kQ4_1: multiply<kQ4_1>(weight_, q, rows.size(0), out_features_, bias, y.data_ptr<float>()); break;
      default: multiply<kQ8_0>(weight_, q, rows.size(0), out_features_, bias, y.data_ptr<float>());
    }
  }
  return y.view(shape).to(x.scalar_type());
}

// Rows `ids` (any shape) of W in fp32: (*ids.shape, in_features). An embedding lookup.
at::Tensor QuantMatrix::rows(const at::Tensor& ids) const {
  RECORD_FUNCTION("attnserve::quant_rows", std::vector<c10::IValue>({ids}));
  TORCH_CHECK(ids.scalar_type() == at::kLong, "ids: expected int64");
  const at::Tensor flat = ids.reshape({-1}).contiguous();
  const int64_t* id = flat.data_ptr<int64_t>();
  for (int64_t i = 0; i < flat.numel(); ++i)
    TORCH_CHECK(id[i] >= 0 && id[i] < out_features_, "row id ", id[i], " out of range [0, ",
                out_features_, ")");
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(in_features_);
  at::Tensor out = at::empty(shape, scales_.options().dtype(at::kFloat));
  float* dst = out.data_ptr<float>();
  parallel_for(0, flat.numel(), 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) dequantize_row(id[i], dst + i * in_features_);
  });
  return out;
}

void QuantMatrix::dequantize_row(int64_t id, float* dst) const {
  const int f = static_cast<int>(format_);
  const int64_t group = id / kGroupRows, lane = id % kGroupRows;
  for (int64_t b = 0; b < weight_.num_blocks; ++b) {
    const uint8_t* block = weight_.block_codes(group, b, f);
    const int64_t s = weight_.scale_index(group, b) + lane;
    const float scale = weight_.scales[s];
    const float min = weight_.mins ? static_cast<float>(weight_.mins[s]) : 0.0f;
    for (int c = 0; c < kBlock; ++c)
      dst[b * kBlock + c] = weight_value(f, code_at(block, f, static_cast<int>(lane), c), scale, min);
  }
}

namespace {

Register reg([](pybind11::module_& m) {
  namespace py = pybind11;
  // module_local: each CPU kind's build registers this same C++ type, and tests load two.
  py::class_<QuantMatrix>(m, "QuantMatrix",
                          "A block-quantized weight (engine/csrc/quant_blocks.h) and its kernels",
                          py::module_local())
      .def(py::init<at::Tensor, at::Tensor, c10::optional<at::Tensor>, int64_t, int64_t, int64_t,
                    c10::optional<at::Tensor>>(),
           py::arg("codes"), py::arg("scales"), py::arg("mins"), py::arg("format"),
           py::arg("in_features"), py::arg("out_features"), py::arg("bias"))
      .def("__call__", &QuantMatrix::forward, py::arg("x"), py::call_guard<py::gil_scoped_release>(),
           "x W^T + b: (..., in_features) -> (..., out_features), in x's dtype")
      .def("rows", &QuantMatrix::rows, py::arg("ids"), py::call_guard<py::gil_scoped_release>(),
           "rows `ids` of W, dequantized: (*ids.shape, in_features) float32");
});

}  // namespace
}  // namespace attnserve::quant
