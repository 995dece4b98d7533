"""A LLaMA-family model's layer stack run by one C++ call per step (engine/csrc/decoder_stack.cpp).

The runner installs it on a CPU where our kernels build, after swapping in the fused small
ops and allocating the KV pool: the C++ stack calls those same kernels, in the same order, on
the same weights and cache slices, so its output equals the Python layers' bit for bit, with
none of their per-operator Python cost and without holding Python's lock (the HTTP server's
thread and the tokenizer pools run meanwhile). The Python layers stay the path for every
model it does not take (tensor-parallel or MoE layers, the PyTorch attention reference) and
for steps without a cache.
"""
from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from engine.layers.attention import AttnMetadata
from engine.layers.cpu_attention import CpuPagedAttention
from engine.layers.fused import FusedApplyRotary, FusedRMSNorm, FusedSiluAndMul
from engine.layers.linear import MergedLinear
from engine.layers.quantized_linear import QuantizedLinear
from engine.models.llama import LlamaDecoderLayer, LlamaModel


class FusedDecoderStack:
    def __init__(self, stack):
        self.stack = stack                  # the kernels' DecoderStack

    @staticmethod
    def accepts(meta: AttnMetadata) -> bool:
        return meta.slot_mapping is not None and meta.block_tables is not None

    def __call__(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 meta: AttnMetadata) -> torch.Tensor:
        half = cos.shape[-1]
        return self.stack(hidden, cos.view(-1, half), sin.view(-1, half), meta.slot_mapping,
                          meta.cu_seqlens_q, meta.seq_lens, meta.block_tables,
                          meta.sliding_window or 0, meta.causal)


def use_fused_stack(model: nn.Module, kernels: ModuleType) -> int:
    """Installs a FusedDecoderStack on `model`'s LlamaModel when every layer is one it runs
    exactly; returns how many layers it took (0: the Python layers run)."""
    decoder = getattr(model, "model", None)
    if type(decoder) is not LlamaModel:
        return 0
    decoder.fused_layers = None
    norms = [norm for layer in decoder.layers for norm in (layer.input_layernorm, layer.post_attention_layernorm)]
    if (not all(map(_runs_exactly, decoder.layers)) or len({norm.eps for norm in norms}) != 1
            or len({layer.self_attn.attn.scale for layer in decoder.layers}) != 1):
        return 0
    attn = decoder.layers[0].self_attn.attn
    specs = [(layer.input_layernorm.weight.detach(), _projection(layer.self_attn.qkv_proj),
              _projection(layer.self_attn.o_proj), layer.post_attention_layernorm.weight.detach(),
              _projection(layer.mlp.gate_up_proj), _projection(layer.mlp.down_proj),
              layer.self_attn.attn.k_cache, layer.self_attn.attn.v_cache) for layer in decoder.layers]
    decoder.fused_layers = FusedDecoderStack(kernels.DecoderStack(
        specs, attn.num_heads, attn.num_kv_heads, attn.head_dim, norms[0].eps, attn.scale))
    return len(specs)


def _runs_exactly(layer: nn.Module) -> bool:
    """Whether the C++ stack computes exactly what this layer's modules do."""
    if type(layer) is not LlamaDecoderLayer or any(_hooked(m) for m in layer.modules()):
        return False                    # (tensor parallelism sums partial outputs in hooks)
    attn, mlp = layer.self_attn, layer.mlp
    return (type(layer.input_layernorm) is FusedRMSNorm and type(layer.post_attention_layernorm) is FusedRMSNorm
            and type(attn.rotary) is FusedApplyRotary and type(mlp.act) is FusedSiluAndMul
            and isinstance(attn.attn.backend, CpuPagedAttention) and attn.attn.k_cache is not None
            and all(_projection(p) is not None for p in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                                                          mlp.down_proj)))


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _projection(module: nn.Module):
    """What the C++ stack takes for a projection: a QuantMatrix, or (weight, bias) for F.linear;
    None for any other module (tensor-parallel splits, adapters)."""
    if type(module) is QuantizedLinear:
        return module.matrix
    if type(module) in (nn.Linear, MergedLinear):
        bias = None if module.bias is None else module.bias.detach()
        return module.weight.detach(), bias
    return None
