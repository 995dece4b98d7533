"""T5 (v1.0) and T5 v1.1 / Flan-T5: the encoder-decoder Transformer (T5ForConditionalGeneration).

    encoder   per block: bidirectional self-attention, FFN; run once per request over its input
    decoder   per block: causal self-attention over the paged KV cache (like any decoder),
              cross-attention over the encoder's output, FFN

What differs from the decoders in llama.py:
- no position embeddings: each stack adds a learned per-head bias to every attention score by
  the bucket of the key's distance from the query (engine/layers/relative_position.py); the
  table sits in block 0 and every block of the stack shares it;
- scores are q.k, not scaled by 1/sqrt(head_dim);
- T5's "layer norm" is an RMS norm (no mean, no bias), before each sublayer;
- FFN: act(wi x) (v1.0: ReLU) or act(wi_0 x) * wi_1 x (v1.1, Flan-T5: "gated-gelu");
- v1.0 reads its logits off the shared embedding at hidden * d_model**-0.5 (tied head);
  v1.1 has a head of its own and no rescale.

The cross-attention's keys and values depend on the encoder's output only, so they are
computed once: in the step a sequence is admitted, its encoder output is projected by every
decoder layer's EncDecAttention k/v and written to the sequence's cross blocks in that layer's
KV cache (Seq2SeqMetadata, engine/seq2seq.py); every step after reads them there. Each decoder
block holds one `Attention` (`cache`): its slice of the KV pool, decoder tokens in the
sequences' block tables and encoder outputs in their cross block tables.

Parameter names are Hugging Face's; q/k/v, the cross-attention's k/v and wi_0/wi_1 are fused
(`packed_modules`; the cross-attention's q/k/v are renamed first so they do not fuse with
the self-attention's).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.layers.activations import activation
from engine.layers.attention import Attention, AttnMetadata, padded_attention, write_kv_cache
from engine.layers.linear import MergedLinear
from engine.layers.norm import RMSNorm
from engine.layers.relative_position import biased_attention, group_biases
from engine.seq2seq import Seq2SeqMetadata

# Checkpoint names -> ours where they differ: the cross-attention's q stays apart and its k/v
# fuse into kv_proj; the stacks' embed_tokens are the shared embedding under other names.
_RENAMES = {".EncDecAttention.q.": ".EncDecAttention.q_proj.",
            ".EncDecAttention.k.": ".EncDecAttention.k_proj.",
            ".EncDecAttention.v.": ".EncDecAttention.v_proj."}
_SHARED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# transformers never reads it either (T5's cross-attention has no position bias)
_UNUSED = "EncDecAttention.relative_attention_bias.weight"


def _clamp_fp16(hidden: torch.Tensor) -> torch.Tensor:
    """transformers clamps T5's residual stream in float16, where v1.1 overflows."""
    if hidden.dtype != torch.float16:
        return hidden
    limit = torch.finfo(torch.float16).max - 1000
    return hidden.clamp(-limit, limit)


class DenseActDense(nn.Module):                        # v1.0: wo(act(wi x))
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.wi = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.wo = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = activation(config.hidden_act, "t5")

    def forward(self, x):
        return self.wo(self.act(self.wi(x)))


class DenseGatedActDense(nn.Module):                   # v1.1: wo(act(wi_0 x) * wi_1 x)
    def __init__(self, config: ModelConfig):
        super().__init__()
        size = config.intermediate_size
        self.wi = MergedLinear(config.hidden_size, {"wi_0": size, "wi_1": size}, bias=False)
        self.wo = nn.Linear(size, config.hidden_size, bias=False)
        self.act = activation(config.hidden_act, "t5")

    def forward(self, x):
        gate, up = self.wi.split(self.wi(x))
        return self.wo(self.act(gate) * up)


class T5SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, has_relative_attention_bias: bool):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        inner = config.num_heads * config.head_dim
        self.qkv = MergedLinear(config.hidden_size, {"q": inner, "k": inner, "v": inner}, bias=False)
        self.o = nn.Linear(inner, config.hidden_size, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)

    def forward(self, hidden, meta: AttnMetadata, biases, cache: Attention | None):
        num_tokens = hidden.shape[0]
        q, k, v = (t.view(num_tokens, self.num_heads, self.head_dim) for t in self.qkv.split(self.qkv(hidden)))
        if cache is None:                              # the encoder: each token its own one-slot block
            k_source, v_source = k.transpose(0, 1).unsqueeze(2), v.transpose(0, 1).unsqueeze(2)
        else:
            write_kv_cache(k, v, cache.k_cache, cache.v_cache, meta.slot_mapping)
            k_source, v_source = cache.k_cache, cache.v_cache
        out = biased_attention(q, k_source, v_source, meta, biases)
        return self.o(out.view(num_tokens, -1))


class T5CrossAttention(nn.Module):
    """The decoder's queries over its sequence's encoder output, whose K/V sit in the cache."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        inner = config.num_heads * config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.kv_proj = MergedLinear(config.hidden_size, {"k_proj": inner, "v_proj": inner}, bias=False)
        self.o = nn.Linear(inner, config.hidden_size, bias=False)

    def write_encoder_kv(self, encoded: torch.Tensor, slot_mapping: torch.Tensor, cache: Attention) -> None:
        """encoded: (num_encoder_tokens, hidden) -> their K/V at their cross slots."""
        k, v = (t.view(encoded.shape[0], self.num_heads, self.head_dim)
                for t in self.kv_proj.split(self.kv_proj(encoded)))
        write_kv_cache(k, v, cache.k_cache, cache.v_cache, slot_mapping)

    def forward(self, hidden, cross: AttnMetadata, cache: Attention):
        num_tokens = hidden.shape[0]
        q = self.q_proj(hidden).view(num_tokens, self.num_heads, self.head_dim)
        out = torch.empty_like(q)
        for group in (cross.decode, cross.prefill):
            if group is not None:
                out[group.token_rows] = padded_attention(q, cache.k_cache, cache.v_cache, group, 1.0)
        return self.o(out.view(num_tokens, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5SelfAttention(config, has_relative_attention_bias)
        self.layer_norm = RMSNorm(config.hidden_size, config.norm_eps)

    def forward(self, hidden, meta, biases, cache):
        return hidden + self.SelfAttention(self.layer_norm(hidden), meta, biases, cache)


class T5LayerCrossAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.EncDecAttention = T5CrossAttention(config)
        self.layer_norm = RMSNorm(config.hidden_size, config.norm_eps)

    def forward(self, hidden, cross, cache):
        return hidden + self.EncDecAttention(self.layer_norm(hidden), cross, cache)


class T5LayerFF(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.DenseReluDense = (DenseGatedActDense if config.gated_mlp else DenseActDense)(config)
        self.layer_norm = RMSNorm(config.hidden_size, config.norm_eps)

    def forward(self, hidden):
        return hidden + self.DenseReluDense(self.layer_norm(hidden))


class T5EncoderBlock(nn.Module):
    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(config, index == 0), T5LayerFF(config)])

    def forward(self, hidden, meta, biases):
        hidden = _clamp_fp16(self.layer[0](hidden, meta, biases, None))
        return _clamp_fp16(self.layer[1](hidden))


class T5DecoderBlock(nn.Module):
    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(config, index == 0), T5LayerCrossAttention(config),
                                    T5LayerFF(config)])
        # This layer's slice of the KV pool (the runner sets it); scores are unscaled.
        self.cache = Attention(config.num_heads, config.num_heads, config.head_dim, scale=1.0)

    def forward(self, hidden, meta: Seq2SeqMetadata, biases):
        hidden = _clamp_fp16(self.layer[0](hidden, meta.decoder, biases, self.cache))
        hidden = _clamp_fp16(self.layer[1](hidden, meta.cross, self.cache))
        return _clamp_fp16(self.layer[2](hidden))


class T5Stack(nn.Module):
    def __init__(self, config: ModelConfig, is_decoder: bool):
        super().__init__()
        if is_decoder:
            self.block = nn.ModuleList(T5DecoderBlock(config, i) for i in range(config.num_layers))
        else:
            self.block = nn.ModuleList(T5EncoderBlock(config, i) for i in range(config.num_encoder_layers))
        self.final_layer_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.bidirectional = not is_decoder
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance

    def forward(self, hidden, meta, self_attn_meta: AttnMetadata):
        """hidden: (num_tokens, hidden) embedded inputs; meta: what the blocks read."""
        table = self.block[0].layer[0].SelfAttention.relative_attention_bias
        biases = group_biases(self_attn_meta, table, self.bidirectional, self.num_buckets, self.max_distance)
        for block in self.block:
            hidden = block(hidden, meta, biases)
        return self.final_layer_norm(hidden)


class T5ForConditionalGeneration(nn.Module):
    # checkpoint projection -> the fused module that holds it (after _RENAMES)
    packed_modules = {"q": "qkv", "k": "qkv", "v": "qkv", "k_proj": "kv_proj", "v_proj": "kv_proj",
                      "wi_0": "wi", "wi_1": "wi"}
    transposed_weights: tuple[str, ...] = ()

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.hidden_size)
        self.encoder = T5Stack(config, is_decoder=False)
        self.decoder = T5Stack(config, is_decoder=True)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(
            config.hidden_size, config.vocab_size, bias=False)
        self.output_scale = config.hidden_size ** -0.5 if config.scale_decoder_outputs else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: Seq2SeqMetadata) -> torch.Tensor:
        """input_ids: (num_tokens,) decoder tokens -> decoder hidden states (num_tokens, hidden).
        First, the step's new encoder inputs are encoded into their cross blocks. (positions
        go unused: T5's positions are the bias the metadata implies.)"""
        if meta.encoder is not None:
            encoded = self.encoder(self.shared(meta.encoder_input_ids), meta.encoder, meta.encoder)
            for block in self.decoder.block:
                block.layer[1].EncDecAttention.write_encoder_kv(encoded, meta.cross_slot_mapping, block.cache)
        return self.decoder(self.shared(input_ids), meta, meta.decoder)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(num_rows, hidden) -> (num_rows, vocab); a tied head reads the shared embedding."""
        if self.output_scale is not None:
            hidden = hidden * self.output_scale
        if self.lm_head is not None:
            return self.lm_head(hidden)
        return F.linear(hidden, self.shared.weight)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.shared

    def checkpoint_name(self, name: str) -> str | None:
        """Our parameter name for a checkpoint tensor; None for tensors we do not load."""
        if name in _SHARED_ALIASES:
            return "shared.weight"
        if name.endswith(_UNUSED) or (name == "lm_head.weight" and self.lm_head is None):
            return None
        for old, new in _RENAMES.items():
            name = name.replace(old, new)
        return name
