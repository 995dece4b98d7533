"""GPT-2: learned positions, pre-LayerNorm blocks, GELU (tanh), a head tied to the embedding.

Parameter names follow Hugging Face's GPT2LMHeadModel. Its Conv1D layers store weights as
(in, out); the loader transposes the names in `transposed_weights` into nn.Linear's (out, in).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.layers.activations import activation
from engine.layers.attention import Attention, AttnMetadata


class GPT2Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.q_size = config.num_heads * config.head_dim     # the hidden size, unless heads are split
        self.c_attn = nn.Linear(config.hidden_size, 3 * self.q_size)
        self.c_proj = nn.Linear(self.q_size, config.hidden_size)
        self.attn = Attention(config.num_heads, config.num_heads, config.head_dim)

    def forward(self, hidden, meta: AttnMetadata):
        q, k, v = self.c_attn(hidden).split(self.q_size, dim=-1)
        return self.c_proj(self.attn(q, k, v, meta))


class GPT2MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.intermediate_size)
        self.c_proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act, "GPT-2")

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = GPT2Attention(config)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = GPT2MLP(config)

    def forward(self, hidden, meta):
        hidden = hidden + self.attn(self.ln_1(hidden), meta)
        return hidden + self.mlp(self.ln_2(hidden))


class GPT2Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)

    def forward(self, input_ids, positions, meta):
        hidden = self.wte(input_ids) + self.wpe(positions)             # (num_tokens, hidden)
        for block in self.h:
            hidden = block(hidden, meta)
        return self.ln_f(hidden)


class GPT2LMHeadModel(nn.Module):
    packed_modules: dict[str, str] = {}
    transposed_weights = ("attn.c_attn.weight", "attn.c_proj.weight",
                          "mlp.c_fc.weight", "mlp.c_proj.weight")
    # tensor parallelism (engine/layers/parallel.py), as LlamaForCausalLM's
    tensor_parallel = {"c_attn": "qkv", "c_fc": "columns", "c_proj": "rows", "wte": "vocab", "lm_head": "vocab"}
    partial_sums = r"\.h\.\d+\.(attn|mlp)$"
    # Buffers older checkpoints saved next to the weights (causal masks), never loaded.
    _ignored_suffixes = (".attn.bias", ".attn.masked_bias")

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(
            config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttnMetadata) -> torch.Tensor:
        """input_ids, positions: (num_tokens,) -> hidden states (num_tokens, hidden)."""
        return self.transformer(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(num_rows, hidden) -> (num_rows, vocab); a tied head reads the embedding matrix."""
        if self.lm_head is not None:
            return self.lm_head(hidden)
        return F.linear(hidden, self.transformer.wte.weight)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def checkpoint_name(self, name: str) -> str | None:
        if name.endswith(self._ignored_suffixes):
            return None
        if name == "lm_head.weight":
            return None if self.lm_head is None else name
        # GPT2Model checkpoints (the original "gpt2") have no "transformer." prefix.
        return name if name.startswith("transformer.") else f"transformer.{name}"
