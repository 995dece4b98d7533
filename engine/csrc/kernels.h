// The kernels one source calls from another: each is defined (and bound to Python) in its
// own source; decoder_stack.cpp runs a whole layer stack through them.
#pragma once
#include <torch/extension.h>

#include "quant_matrix.h"

namespace attnserve {

// fused_ops.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
void rotary_(at::Tensor q, at::Tensor k, const at::Tensor& cos, const at::Tensor& sin, int64_t head_dim);
at::Tensor silu_mul(const at::Tensor& gate_up);

// paged_attention.cpp
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens,
                           const at::Tensor& block_tables, double scale, int64_t sliding_window,
                           bool causal);
void paged_write_kv(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                    const at::Tensor& v_cache, const at::Tensor& slot_mapping);

}  // namespace attnserve
