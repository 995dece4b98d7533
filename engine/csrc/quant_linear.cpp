// y = x W^T + b for block-quantized W (layout: quant_blocks.h), x fp32 (rows, in_features).
//
// Integer path (quantize_x=true): each activation row is quantized per block of 32 to int8
// with one fp32 scale (llama.cpp's approach), so a block's dot product is exact integer math
// and only the scales are fp32. Float path: x stays fp32 and the codes are widened; it matches
// dequantize-then-F.linear up to summation order. Threads split the output rows in groups of
// 16; within a group, kTileRows activation rows share each load of a weight block.
#include <ATen/Parallel.h>

#include <algorithm>

#include "quant_blocks.h"
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

PackedWeight packed_weight(const at::Tensor& codes, const at::Tensor& scales,
                           const c10::optional<at::Tensor>& mins, int64_t format,
                           int64_t in_features, int64_t out_features) {
  TORCH_CHECK(format == kQ4_0 || format == kQ4_1 || format == kQ8_0, "unknown format ", format);
  TORCH_CHECK(in_features % kBlock == 0, "in_features ", in_features, " is not a multiple of 32");
  const int64_t groups = (out_features + kGroupRows - 1) / kGroupRows;
  const int64_t blocks = in_features / kBlock;
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() &&
                  codes.numel() == groups * blocks * group_block_bytes(format),
              "codes: expected contiguous uint8 of ", groups * blocks * group_block_bytes(format),
              " bytes");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() &&
                  scales.numel() == groups * blocks * kGroupRows,
              "scales: expected contiguous float16 (groups, blocks, 16)");
  const bool has_mins = mins.has_value() && mins->defined();
  TORCH_CHECK(has_mins == (format == kQ4_1), "mins are given for Q4_1 and only Q4_1");
  if (has_mins)
    TORCH_CHECK(mins->scalar_type() == at::kHalf && mins->is_contiguous() &&
                    mins->numel() == scales.numel(),
                "mins: expected contiguous float16 shaped like scales");
  return {codes.data_ptr<uint8_t>(), scales.data_ptr<c10::Half>(),
          has_mins ? mins->data_ptr<c10::Half>() : nullptr, blocks};
}

// The activation rows of the integer path, with the tensors that own their memory.
struct QuantizedActivations {
  at::Tensor codes, scales, offsets, sums;
  QuantizedRows rows() const {
    return {codes.data_ptr<int8_t>(), scales.data_ptr<float>(), offsets.data_ptr<int32_t>(),
            sums.data_ptr<float>(), scales.size(1)};
  }
};

QuantizedActivations quantize_rows(const at::Tensor& x, int format) {
  const int64_t num_rows = x.size(0), blocks = x.size(1) / kBlock;
  const auto opts = x.options();
  QuantizedActivations q{at::empty({num_rows, x.size(1)}, opts.dtype(at::kChar)),
                         at::empty({num_rows, blocks}, opts),
                         at::empty({num_rows, blocks}, opts.dtype(at::kInt)),
                         at::empty({num_rows, blocks}, opts)};
  const float* src = x.data_ptr<float>();
  int8_t* codes = q.codes.data_ptr<int8_t>();
  float *scales = q.scales.data_ptr<float>(), *sums = q.sums.data_ptr<float>();
  int32_t* offsets = q.offsets.data_ptr<int32_t>();
  const int32_t zero = zero_point(format);
  at::parallel_for(0, num_rows * blocks, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int32_t sum = quantize_block(src + i * kBlock, codes + i * kBlock, scales + i);
      offsets[i] = -zero * sum;
      sums[i] = scales[i] * static_cast<float>(sum);
    }
  });
  return q;
}

// Per-block sums of x for the float path (mins and zero points multiply them).
at::Tensor block_sums(const at::Tensor& x) {
  const int64_t blocks = x.numel() / kBlock;
  at::Tensor sums = at::empty({x.size(0), x.size(1) / kBlock}, x.options());
  const float* src = x.data_ptr<float>();
  float* dst = sums.data_ptr<float>();
  at::parallel_for(0, blocks, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float sum = 0.0f;
      for (int c = 0; c < kBlock; ++c) sum += src[i * kBlock + c];
      dst[i] = sum;
    }
  });
  return sums;
}

// tile<F, R> for R = rows (1..kTileRows), chosen at run time for the last, partial tile.
template <int F, typename Rows, int R = kTileRows>
void tile_of(int rows, const PackedWeight& w, int64_t group, const Rows& x, int64_t row,
             float* out) {
  if constexpr (R > 1) {
    if (rows < R) return tile_of<F, Rows, R - 1>(rows, w, group, x, row, out);
  }
  tile<F, R>(w, group, x, row, out);
}

template <int F, typename Rows>
void multiply(const PackedWeight& w, const Rows& x, int64_t num_rows, int64_t out_features,
              const float* bias, float* y) {
  const int64_t groups = (out_features + kGroupRows - 1) / kGroupRows;
  at::parallel_for(0, groups, kMinGroupsPerTask, [&](int64_t g0, int64_t g1) {
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

template <typename Rows>
void multiply_format(int64_t format, const PackedWeight& w, const Rows& x, int64_t num_rows,
                     int64_t out_features, const float* bias, float* y) {
  switch (format) {
    case kQ4_0: return multiply<kQ4_0>(w, x, num_rows, out_features, bias, y);
    case kQ4_1: return multiply<kQ4_1>(w, x, num_rows, out_features, bias, y);
    default: return multiply<kQ8_0>(w, x, num_rows, out_features, bias, y);
  }
}

at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                        const c10::optional<at::Tensor>& mins, int64_t format,
                        int64_t out_features, const c10::optional<at::Tensor>& bias,
                        bool quantize_x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x: expected contiguous float32 (rows, in_features)");
  const PackedWeight w = packed_weight(codes, scales, mins, format, x.size(1), out_features);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->numel() == out_features, "bias: expected float32 (out_features,)");
  const float* bias_ptr = has_bias ? bias->data_ptr<float>() : nullptr;
  at::Tensor y = at::empty({x.size(0), out_features}, x.options());   // (rows, out_features)
  if (x.size(0) == 0) return y;
  if (quantize_x) {
    const QuantizedActivations q = quantize_rows(x, static_cast<int>(format));
    multiply_format(format, w, q.rows(), x.size(0), out_features, bias_ptr, y.data_ptr<float>());
  } else {
    const at::Tensor sums = block_sums(x);
    const FloatRows rows{x.data_ptr<float>(), sums.data_ptr<float>(), sums.size(1)};
    multiply_format(format, w, rows, x.size(0), out_features, bias_ptr, y.data_ptr<float>());
  }
  return y;
}

// Rows `ids` of W in fp32: an embedding lookup, or the whole matrix for a dense GEMM.
at::Tensor dequantize_rows(const at::Tensor& codes, const at::Tensor& scales,
                           const c10::optional<at::Tensor>& mins, int64_t format,
                           int64_t in_features, int64_t out_features, const at::Tensor& ids) {
  const PackedWeight w = packed_weight(codes, scales, mins, format, in_features, out_features);
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong, "ids: expected int64 (n,)");
  const at::Tensor ids_c = ids.contiguous();
  const int64_t* id = ids_c.data_ptr<int64_t>();
  for (int64_t i = 0; i < ids_c.numel(); ++i)
    TORCH_CHECK(id[i] >= 0 && id[i] < out_features, "row id ", id[i], " out of range [0, ",
                out_features, ")");
  at::Tensor out = at::empty({ids_c.numel(), in_features}, scales.options().dtype(at::kFloat));
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, ids_c.numel(), 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t group = id[i] / kGroupRows, lane = id[i] % kGroupRows;
      for (int64_t b = 0; b < w.num_blocks; ++b) {
        const uint8_t* block = w.block_codes(group, b, static_cast<int>(format));
        const int64_t s = w.scale_index(group, b) + lane;
        const float scale = w.scales[s], min = w.mins ? static_cast<float>(w.mins[s]) : 0.0f;
        for (int c = 0; c < kBlock; ++c)
          dst[i * in_features + b * kBlock + c] = weight_value(
              static_cast<int>(format), code_at(block, static_cast<int>(format), lane, c), scale, min);
      }
    }
  });
  return out;
}

Register reg([](pybind11::module_& m) {
  m.def("quant_linear", &quant_linear,
        "y = x W^T (+ bias) for block-quantized W (engine/csrc/quant_blocks.h); x float32 "
        "(rows, in_features); quantize_x: int8 activations per block of 32, else fp32",
        pybind11::arg("x"), pybind11::arg("codes"), pybind11::arg("scales"), pybind11::arg("mins"),
        pybind11::arg("format"), pybind11::arg("out_features"), pybind11::arg("bias"),
        pybind11::arg("quantize_x"));
  m.def("dequantize_rows", &dequantize_rows, "rows `ids` of a block-quantized W as float32",
        pybind11::arg("codes"), pybind11::arg("scales"), pybind11::arg("mins"),
        pybind11::arg("format"), pybind11::arg("in_features"), pybind11::arg("out_features"),
        pybind11::arg("ids"));
});

}  // namespace
}  // namespace attnserve::quant
