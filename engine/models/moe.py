"""Sparse Mixture-of-Experts decoders: Mixtral, Qwen2-MoE (Qwen1.5-MoE), OLMoE.

LLaMA's attention, norms and rotary embeddings, with the MLP replaced by a router and
experts (engine/layers/moe.py): each token runs the top_k of num_experts SwiGLU MLPs and sums
their outputs weighted by the router's softmax. What differs by family:

    Mixtral     top-k weights always renormalized; a sliding window when the config sets one
    Qwen2-MoE   renormalized if norm_topk_prob; a shared expert every token runs, scaled by
                sigmoid(shared_expert_gate(x)); q/k/v biases; optionally some dense layers
    OLMoE       renormalized if norm_topk_prob; RMSNorm over the whole q and k projections
                (QK-norm, before the rotary), optionally q/k/v clamped to clip_qkv

Parameter names follow transformers 5 (`mlp.gate`, `mlp.experts.gate_up_proj`, ...); Mixtral's
older names (`block_sparse_moe`, `w1`/`w2`/`w3`) are renamed in `checkpoint_name`.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.config import ModelConfig
from engine.layers.activations import activation
from engine.layers.attention import AttnMetadata
from engine.layers.moe import GroupedExperts, TopKRouter
from engine.layers.rotary import RotaryEmbedding
from engine.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, RMSNorm

# Mixtral checkpoints: block and expert projection names -> ours (those of Qwen2-MoE and OLMoE)
_MIXTRAL_BLOCK = (".block_sparse_moe.", ".mlp.")
_MIXTRAL_EXPERT = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


class MoeAttention(LlamaAttention):
    """LLaMA attention with OLMoE's QK-norm and q/k/v clamp when the config asks for them."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.q_norm = self.k_norm = None
        if config.qk_norm:
            self.q_norm = RMSNorm(config.num_heads * config.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(config.num_kv_heads * config.head_dim, config.norm_eps)
        self.clip_qkv = config.clip_qkv

    def forward(self, hidden, cos, sin, meta: AttnMetadata):
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q, k = self.rotary(q, k, cos, sin)
        return self.o_proj(self.attn(q, k, v, meta))


class SparseMoeBlock(nn.Module):
    """Router + grouped experts (+ Qwen2-MoE's gated shared expert)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = TopKRouter(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                               config.norm_topk_prob)
        self.experts = GroupedExperts(config.num_experts, config.hidden_size, config.moe_intermediate_size,
                                      activation(config.hidden_act, config.model_type))
        self.shared_expert = self.shared_expert_gate = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = LlamaMLP(config, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, expert_ids = self.gate(x)                             # (num_tokens, top_k) each
        out = self.experts(x, expert_ids, weights)                     # (num_tokens, hidden)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


class MoeDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = MoeAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        is_dense = layer_index in config.dense_layers
        self.mlp = LlamaMLP(config) if is_dense else SparseMoeBlock(config)

    def forward(self, hidden, cos, sin, meta):
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, meta)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class MoeModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.layers = nn.ModuleList(MoeDecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)

    def forward(self, input_ids, positions, meta):
        hidden = self.embed_tokens(input_ids)                          # (num_tokens, hidden)
        cos, sin = self.rotary(positions, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, meta)
        return self.norm(hidden)


class MoeForCausalLM(LlamaForCausalLM):
    """MixtralForCausalLM, Qwen2MoeForCausalLM, OlmoeForCausalLM."""

    model_class = MoeModel
    # experts whole per rank; OLMoE's QK-norms span every head (the shared expert splits as an MLP)
    tensor_parallel = LlamaForCausalLM.tensor_parallel | {"experts": "experts", "q_norm": "heads",
                                                          "k_norm": "kv_heads"}

    def checkpoint_name(self, name: str) -> str | None:
        """Our parameter name for a checkpoint tensor; None for tensors we do not load."""
        if self.config.model_type == "mixtral":
            name = _mixtral_name(name)
        return super().checkpoint_name(name)


def _mixtral_name(name: str) -> str:
    """model.layers.0.block_sparse_moe.experts.3.w1.weight -> model.layers.0.mlp.experts.3.gate_proj.weight
    (and the stacked experts.w1.weight of a GGUF file alike)."""
    name = name.replace(*_MIXTRAL_BLOCK)
    head, found, tail = name.partition(".experts.")
    if not found:
        return name
    parts = tail.split(".")
    parts = [_MIXTRAL_EXPERT.get(part, part) for part in parts]
    return head + found + ".".join(parts)
