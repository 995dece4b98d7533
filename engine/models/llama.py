"""The LLaMA family: LLaMA 1-3, SmolLM2, TinyLlama, Mistral (sliding window), Qwen2 (QKV bias).

RMSNorm, rotary embeddings, SwiGLU MLP, grouped-query attention. Parameter names follow
Hugging Face's LlamaForCausalLM; q/k/v and gate/up are each fused into one matmul.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.layers.activations import SiluAndMul
from engine.layers.attention import Attention, AttnMetadata
from engine.layers.linear import MergedLinear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import ApplyRotary, RotaryEmbedding


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.head_dim = config.head_dim
        q_size = config.num_heads * config.head_dim
        kv_size = config.num_kv_heads * config.head_dim
        self.qkv_proj = MergedLinear(config.hidden_size, {"q_proj": q_size, "k_proj": kv_size,
                                                          "v_proj": kv_size}, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.o_bias)
        self.rotary = ApplyRotary(config.head_dim)
        self.attn = Attention(config.num_heads, config.num_kv_heads, config.head_dim)

    def forward(self, hidden, cos, sin, meta: AttnMetadata):
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        q, k = self.rotary(q, k, cos, sin)
        return self.o_proj(self.attn(q, k, v, meta))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, intermediate_size: int | None = None):
        super().__init__()
        size = intermediate_size or config.intermediate_size
        self.gate_up_proj = MergedLinear(config.hidden_size, {"gate_proj": size, "up_proj": size},
                                         bias=config.mlp_bias)
        self.act = SiluAndMul()
        self.down_proj = nn.Linear(size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, hidden, cos, sin, meta):
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, meta)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        # The same layers run by one C++ call, where the runner installs it (engine/layers/decoder_stack.py).
        self.fused_layers = None

    def forward(self, input_ids, positions, meta):
        hidden = self.embed_tokens(input_ids)                          # (num_tokens, hidden)
        cos, sin = self.rotary(positions, hidden.dtype)
        if self.fused_layers is not None and self.fused_layers.accepts(meta):
            hidden = self.fused_layers(hidden, cos, sin, meta)
        else:
            for layer in self.layers:
                hidden = layer(hidden, cos, sin, meta)
        return self.norm(hidden)


class LlamaForCausalLM(nn.Module):
    # checkpoint projection -> the fused module that holds it
    packed_modules = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                      "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
    transposed_weights: tuple[str, ...] = ()
    model_class: type[nn.Module] = LlamaModel     # the decoder stack (MoE families bring theirs)
    # tensor parallelism (engine/layers/parallel.py): how each module splits over the ranks,
    # and the modules whose outputs are partial sums (all-reduced)
    tensor_parallel = {"q_proj": "heads", "k_proj": "kv_heads", "v_proj": "kv_heads", "o_proj": "rows",
                       "gate_proj": "columns", "up_proj": "columns", "down_proj": "rows",
                       "embed_tokens": "vocab", "lm_head": "vocab"}
    partial_sums = r"\.layers\.\d+\.(self_attn|mlp)$"

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = self.model_class(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(
            config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttnMetadata) -> torch.Tensor:
        """input_ids, positions: (num_tokens,) -> hidden states (num_tokens, hidden)."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(num_rows, hidden) -> (num_rows, vocab); a tied head reads the embedding matrix."""
        if self.lm_head is not None:
            return self.lm_head(hidden)
        return F.linear(hidden, self.model.embed_tokens.weight)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def checkpoint_name(self, name: str) -> str | None:
        """Our parameter name for a checkpoint tensor; None for tensors we do not load."""
        if name.endswith("rotary_emb.inv_freq"):
            return None                                                # recomputed, never loaded
        if name == "lm_head.weight" and self.lm_head is None:
            return None                                                # tied to the embedding
        return name
