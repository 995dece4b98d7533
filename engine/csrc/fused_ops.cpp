// The small ops between a decoder layer's matmuls, each one call instead of PyTorch's several:
// at one decode row a layer ran ~40 eager operators of a few microseconds each, as much time
// as its quantized matmuls (BENCHMARKS.md, per-step host cost).
//
//   rms_norm(x, weight, eps)          x / rms(x) * weight, the norm in fp32, rows independent
//   rotary_(q, k, cos, sin)           q and k rotated in place (Hugging Face's halves layout)
//   silu_mul(gate_up)                 silu(gate) * up, gate_up = [gate | up] per row
//   argmax_logsumexp(logits)          per row: the first argmax and log(sum(exp)), one pass
//                                     for the max and one for the sum (the sampler's two
//                                     reductions over the vocabulary; argmax is scalar in
//                                     PyTorch and was most of a batch-64 step's sampling)
//
// Each keeps its reference's arithmetic (engine/models/llama.py RMSNorm, engine/layers/rotary.py,
// F.silu(gate) * up): in fp32, values differ from it only by summation order in the norm; in
// bf16 / fp16 the same roundings happen at the same places.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cfloat>
#include <cmath>

#include "attention_vec.h"
#include "kernels.h"
#include "parallel.h"
#include "registry.h"

namespace attnserve {
namespace {

constexpr int64_t kRowsPerTask = 16;   // rows a thread takes at once: small ops, cheap tasks

template <typename T>
void rms_norm_rows(const T* x, int64_t x_stride, const T* weight, T* out, int64_t dim, double eps,
                   int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    const T* in = x + row * x_stride;
    T* dst = out + row * dim;
    float sum = 0.f;
    for (int64_t i = 0; i < dim; ++i) {
      const float v = static_cast<float>(in[i]);
      sum += v * v;
    }
    const float inv = 1.f / std::sqrt(sum / static_cast<float>(dim) + static_cast<float>(eps));
    for (int64_t i = 0; i < dim; ++i) {
      // The reference rounds the normed value to T, then multiplies by the T weight in T.
      const T normed = static_cast<T>(static_cast<float>(in[i]) * inv);
      dst[i] = static_cast<T>(static_cast<float>(weight[i]) * static_cast<float>(normed));
    }
  }
}

// One (token, head) of q or k: first half pairs with the second, as apply_rotary does.
template <typename T>
void rotate_head(T* head, const T* cos, const T* sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = static_cast<float>(head[i]), x2 = static_cast<float>(head[i + half]);
    const float c = static_cast<float>(cos[i]), s = static_cast<float>(sin[i]);
    // T(T(x1 c) - T(x2 s)), as the reference's separate tensor ops round.
    const T x1c = static_cast<T>(x1 * c), x2s = static_cast<T>(x2 * s);
    const T x2c = static_cast<T>(x2 * c), x1s = static_cast<T>(x1 * s);
    head[i] = static_cast<T>(static_cast<float>(x1c) - static_cast<float>(x2s));
    head[i + half] = static_cast<T>(static_cast<float>(x2c) + static_cast<float>(x1s));
  }
}

// One row: its max, the first index holding it, and log(sum(exp(x - max))) + max. A NaN or
// +infinity anywhere makes the result NaN, as logsumexp's is then not finite (-infinity, a
// masked token, is fine). NaN-ness is carried by max(-FLT_MAX, x) * 0: the vector max returns
// its second operand when one is NaN, and -infinity becomes -FLT_MAX.
void argmax_logsumexp_row(const float* x, int64_t n, int64_t* best, float* lse) {
  using vec::Wide;
  constexpr int64_t lanes = Wide::kLanes;
  const int64_t whole = Wide::kLanes > 1 ? n - n % lanes : 0;
  const Wide lowest = Wide::broadcast(-FLT_MAX);
  Wide wide_max = Wide::broadcast(-INFINITY), poison = Wide::zero();
  for (int64_t i = 0; i < whole; i += lanes) {
    const Wide v = Wide::load(x + i);
    wide_max = max(wide_max, v);
    poison = fma(max(lowest, v), Wide::zero(), poison);
  }
  float m = wide_max.reduce_max(), bad = poison.reduce_add();
  for (int64_t i = whole; i < n; ++i) {
    m = std::max(m, x[i]);
    if (std::isnan(x[i]) || x[i] == INFINITY) bad = NAN;
  }
  int64_t index = 0;
  while (index < n && !(x[index] == m)) ++index;   // the first maximum, as torch.argmax
  *best = index < n ? index : 0;
  Wide wide_sum = Wide::zero();
  const Wide shift = Wide::broadcast(m);
  for (int64_t i = 0; i < whole; i += lanes) wide_sum = wide_sum + exp(Wide::load(x + i) - shift);
  float sum = wide_sum.reduce_add();
  for (int64_t i = whole; i < n; ++i) sum += std::exp(x[i] - m);
  *lse = (bad == 0.f && std::isfinite(m)) ? m + std::log(sum) : NAN;
}

std::tuple<at::Tensor, at::Tensor> argmax_logsumexp(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.scalar_type() == at::kFloat,
              "argmax_logsumexp: logits must be (rows, vocab) float32, contiguous");
  const int64_t rows = logits.size(0), n = logits.size(1);
  auto ids = at::empty({rows}, logits.options().dtype(at::kLong));
  auto lse = at::empty({rows}, logits.options());
  const float* x = logits.data_ptr<float>();
  int64_t* id_out = ids.data_ptr<int64_t>();
  float* lse_out = lse.data_ptr<float>();
  parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) argmax_logsumexp_row(x + row * n, n, id_out + row, lse_out + row);
  });
  return {ids, lse};
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "rms_norm: x must be (rows, dim) with unit column stride");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(),
              "rms_norm: weight must be (dim,) contiguous");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "rms_norm: x and weight dtypes differ");
  auto out = at::empty({x.size(0), x.size(1)}, x.options());
  const int64_t dim = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* in = x.data_ptr<scalar_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    parallel_for(0, x.size(0), kRowsPerTask, [&](int64_t begin, int64_t end) {
      rms_norm_rows(in, x.stride(0), w, dst, dim, eps, begin, end);
    });
  });
  return out;
}

void rotary_(at::Tensor q, at::Tensor k, const at::Tensor& cos, const at::Tensor& sin, int64_t head_dim) {
  // q: (tokens, q_heads * head_dim), k: (tokens, kv_heads * head_dim), unit column stride (views
  // of the fused qkv output are fine); cos, sin: (tokens, head_dim / 2) contiguous.
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2 && q.stride(1) == 1 && k.stride(1) == 1,
              "rotary_: q and k must be (tokens, heads * head_dim) with unit column stride");
  TORCH_CHECK(head_dim % 2 == 0 && q.size(1) % head_dim == 0 && k.size(1) % head_dim == 0,
              "rotary_: widths must be whole heads of an even head_dim");
  const int64_t half = head_dim / 2, tokens = q.size(0);
  TORCH_CHECK(k.size(0) == tokens && cos.sizes() == sin.sizes() && cos.size(0) == tokens &&
              cos.size(-1) == half && cos.is_contiguous() && sin.is_contiguous(),
              "rotary_: cos and sin must be (tokens, head_dim / 2), contiguous");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == cos.scalar_type(),
              "rotary_: q, k, cos and sin must share a dtype");
  const int64_t q_heads = q.size(1) / head_dim, k_heads = k.size(1) / head_dim;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rotary_", [&] {
    scalar_t* qp = q.data_ptr<scalar_t>();
    scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* cp = cos.data_ptr<scalar_t>();
    const scalar_t* sp = sin.data_ptr<scalar_t>();
    parallel_for(0, tokens, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t h = 0; h < q_heads; ++h) rotate_head(qp + t * q.stride(0) + h * head_dim, cp + t * half, sp + t * half, half);
        for (int64_t h = 0; h < k_heads; ++h) rotate_head(kp + t * k.stride(0) + h * head_dim, cp + t * half, sp + t * half, half);
      }
    });
  });
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0,
              "silu_mul: gate_up must be (rows, 2 * size) with unit column stride");
  const int64_t size = gate_up.size(1) / 2;
  auto out = at::empty({gate_up.size(0), size}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_mul", [&] {
    const scalar_t* in = gate_up.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    parallel_for(0, gate_up.size(0), kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* gate = in + row * gate_up.stride(0);
        const scalar_t* up = gate + size;
        for (int64_t i = 0; i < size; ++i) {
          const float g = static_cast<float>(gate[i]);
          const scalar_t act = static_cast<scalar_t>(g / (1.f + std::exp(-g)));
          dst[row * size + i] = static_cast<scalar_t>(static_cast<float>(act) * static_cast<float>(up[i]));
        }
      }
    });
  });
  return out;
}

static Register reg([](pybind11::module_& m) {
  m.def("rms_norm", &rms_norm, "x / rms(x) * weight per row, the norm in fp32", pybind11::arg("x"),
        pybind11::arg("weight"), pybind11::arg("eps"));
  m.def("rotary_", &rotary_, "rotate q and k in place (halves layout)", pybind11::arg("q"), pybind11::arg("k"),
        pybind11::arg("cos"), pybind11::arg("sin"), pybind11::arg("head_dim"));
  m.def("silu_mul", &silu_mul, "silu(gate) * up for gate_up = [gate | up]", pybind11::arg("gate_up"));
  m.def("argmax_logsumexp", &argmax_logsumexp, "per row: first argmax, log(sum(exp)) (NaN if not finite)",
        pybind11::arg("logits"));
});

}  // namespace attnserve
