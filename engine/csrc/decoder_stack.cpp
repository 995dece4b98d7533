// A LLaMA-family decoder stack (engine/models/llama.py) run layer after layer in C++, with
// Python's lock released for the whole of it: one call per step where the Python modules made
// ~15 per layer. At one decode row on SmolLM2's 30 layers, those calls cost about as much as
// the quantized matmuls they drive (BENCHMARKS.md, "Where a batch-1 step goes").
//
// Per layer, the same kernels in the same order as the Python modules the runner swaps in
// (FusedRMSNorm, each projection's QuantMatrix or F.linear, FusedApplyRotary,
// CpuPagedAttention, FusedSiluAndMul), so the result equals theirs bit for bit
// (tests/test_decoder_stack.py):
//
//     x = rms_norm(h)          q, k, v = split(qkv(x))      rotary_(q, k)
//     write k, v to the cache  h = h + o(paged_attention(q))
//     x = rms_norm(h)          h = h + down(silu_mul(gate_up(x)))
#include <ATen/Dispatch.h>
#include <ATen/record_function.h>

#include <vector>

#include "kernels.h"
#include "parallel.h"
#include "registry.h"

namespace attnserve {
namespace {

namespace py = pybind11;

// a + b as aten's add computes it (in fp32, rounded once to T), on our workers: an aten add of
// a batch's hidden states is an OpenMP region, and libgomp's worker spinning after it took
// the core our workers needed (a batch-64 step 2.3x slower).
at::Tensor residual_add(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && a.sizes() == b.sizes() &&
                  a.scalar_type() == b.scalar_type(), "residual_add: a and b must match, contiguous");
  at::Tensor out = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "residual_add", [&] {
    const scalar_t* x = a.data_ptr<scalar_t>();
    const scalar_t* y = b.data_ptr<scalar_t>();
    scalar_t* z = out.data_ptr<scalar_t>();
    parallel_for(0, a.numel(), 16384, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        z[i] = static_cast<scalar_t>(static_cast<float>(x[i]) + static_cast<float>(y[i]));
    });
  });
  return out;
}

// One projection: our block-quantized matrix, or a dense (weight, bias) for at::linear, as
// F.linear runs it.
class Projection {
 public:
  explicit Projection(const py::object& spec) {
    if (py::isinstance<quant::QuantMatrix>(spec)) {
      owner_ = spec;                                      // keeps the matrix alive
      quant_ = spec.cast<const quant::QuantMatrix*>();
      return;
    }
    const auto dense = spec.cast<std::pair<at::Tensor, c10::optional<at::Tensor>>>();
    weight_ = dense.first;
    bias_ = dense.second;
  }

  at::Tensor operator()(const at::Tensor& x) const {
    return quant_ ? quant_->forward(x) : at::linear(x, weight_, bias_);
  }

 private:
  py::object owner_;
  const quant::QuantMatrix* quant_ = nullptr;
  at::Tensor weight_;
  c10::optional<at::Tensor> bias_;
};

struct Layer {
  at::Tensor input_norm, post_norm;     // RMSNorm weights
  Projection qkv, o, gate_up, down;
  at::Tensor k_cache, v_cache;          // this layer's slices of the pool (CpuPagedAttention layout)
};

class DecoderStack {
 public:
  // layers: one tuple per layer, (input_norm, qkv, o, post_norm, gate_up, down, k_cache,
  // v_cache); a projection is a QuantMatrix or a (weight, bias or None) pair.
  DecoderStack(const py::list& layers, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
               double norm_eps, double scale)
      : num_heads_(num_heads), num_kv_heads_(num_kv_heads), head_dim_(head_dim), eps_(norm_eps),
        scale_(scale) {
    for (const py::handle& item : layers) {
      const auto t = item.cast<py::tuple>();
      TORCH_CHECK(t.size() == 8, "a layer is (input_norm, qkv, o, post_norm, gate_up, down, k_cache, v_cache)");
      layers_.push_back(Layer{t[0].cast<at::Tensor>(), t[3].cast<at::Tensor>(),
                              Projection(t[1]), Projection(t[2]), Projection(t[4]), Projection(t[5]),
                              t[6].cast<at::Tensor>(), t[7].cast<at::Tensor>()});
    }
  }

  // hidden (tokens, hidden_size); cos, sin (tokens, head_dim / 2); the step's paged-attention
  // metadata as CpuPagedAttention takes it. Returns the last layer's hidden states.
  at::Tensor forward(at::Tensor hidden, const at::Tensor& cos, const at::Tensor& sin,
                     const at::Tensor& slot_mapping, const at::Tensor& cu_seqlens_q,
                     const at::Tensor& seq_lens, const at::Tensor& block_tables,
                     int64_t sliding_window, bool causal) const {
    RECORD_FUNCTION("attnserve::decoder_stack", std::vector<c10::IValue>({hidden}));
    const int64_t tokens = hidden.size(0);
    const int64_t q_size = num_heads_ * head_dim_, kv_size = num_kv_heads_ * head_dim_;
    for (const Layer& layer : layers_) {
      const at::Tensor qkv = layer.qkv(rms_norm(hidden, layer.input_norm, eps_));
      const at::Tensor q = qkv.narrow(1, 0, q_size);
      const at::Tensor k = qkv.narrow(1, q_size, kv_size);
      const at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size);
      rotary_(q, k, cos, sin, head_dim_);
      const at::Tensor k_heads = k.view({tokens, num_kv_heads_, head_dim_});
      paged_write_kv(k_heads, v.view({tokens, num_kv_heads_, head_dim_}), layer.k_cache, layer.v_cache,
                     slot_mapping);
      const at::Tensor attended = paged_attention(
          q.view({tokens, num_heads_, head_dim_}), layer.k_cache, layer.v_cache, cu_seqlens_q, seq_lens,
          block_tables, scale_, sliding_window, causal);
      hidden = residual_add(hidden, layer.o(attended.view({tokens, q_size})));
      const at::Tensor gate_up = layer.gate_up(rms_norm(hidden, layer.post_norm, eps_));
      hidden = residual_add(hidden, layer.down(silu_mul(gate_up)));
    }
    return hidden;
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

 private:
  std::vector<Layer> layers_;
  int64_t num_heads_, num_kv_heads_, head_dim_;
  double eps_, scale_;
};

static Register reg([](py::module_& m) {
  py::class_<DecoderStack>(m, "DecoderStack", "A LLaMA-family layer stack run in one call")
      .def(py::init<const py::list&, int64_t, int64_t, int64_t, double, double>(), py::arg("layers"),
           py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("norm_eps"),
           py::arg("scale"))
      .def("__call__", &DecoderStack::forward, py::arg("hidden"), py::arg("cos"), py::arg("sin"),
           py::arg("slot_mapping"), py::arg("cu_seqlens_q"), py::arg("seq_lens"), py::arg("block_tables"),
           py::arg("sliding_window"), py::arg("causal"), py::call_guard<py::gil_scoped_release>(),
           "hidden (tokens, hidden_size) through every layer: the last layer's hidden states")
      .def_property_readonly("num_layers", &DecoderStack::num_layers);
});

}  // namespace
}  // namespace attnserve
