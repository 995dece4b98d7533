// QuantMatrix: one block-quantized weight (quant_blocks.h) and its kernels (quant_linear.cpp).
// Python holds one per projection; decoder_stack.cpp calls the same objects from C++.
#pragma once
#include <torch/extension.h>

#include "quant_blocks.h"

namespace attnserve::quant {

class QuantMatrix {
 public:
  QuantMatrix(at::Tensor codes, at::Tensor scales, c10::optional<at::Tensor> mins, int64_t format,
              int64_t in_features, int64_t out_features, c10::optional<at::Tensor> bias);

  // x W^T + b: (..., in_features) -> (..., out_features), in x's dtype.
  at::Tensor forward(const at::Tensor& x) const;
  // Rows `ids` (any shape) of W in fp32: (*ids.shape, in_features). An embedding lookup.
  at::Tensor rows(const at::Tensor& ids) const;

 private:
  void dequantize_row(int64_t id, float* dst) const;

  at::Tensor codes_, scales_, mins_, bias_;   // own the memory weight_ points into
  int64_t format_, in_features_, out_features_;
  PackedWeight weight_{};
};

}  // namespace attnserve::quant
