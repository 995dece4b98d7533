"""Attention with T5's relative position bias, over the same ragged groups as TorchAttention.

T5 has no position embeddings: every attention score q.k (unscaled) gets a learned bias per
head, looked up by the bucket of the key's distance from the query. Nearby distances have a
bucket each; farther ones share logarithmically wider buckets up to max_distance, past which
all share the last. The encoder's buckets tell left from right (bidirectional), the decoder's
only look back (causal).

The bias is built once per step and group from the positions the metadata already implies
(query i of a sequence sits at seq_len - query_len + i, key j at j) and shared by every layer
of a stack; positions a query may not see are -inf in it, so it is SDPA's whole float mask.
The fused kernels (the C++ op, Triton) take no additive bias: T5 attention runs here on every
device, reading the cache in TorchAttention's head-major layout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.layers.attention import AttnGroup, AttnMetadata, block_rows, gather_blocks


@dataclass(frozen=True, slots=True)
class GroupBiases:
    """The float mask of each group of one AttnMetadata: (heads, b, max_q, max_k)."""

    decode: torch.Tensor | None
    prefill: torch.Tensor | None


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """key position - query position -> bucket in [0, num_buckets) (Mesh TensorFlow's rule, as
    transformers computes it)."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # log(0) is -inf for distance 0; those are small and never read from this branch
    large = max_exact + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).to(torch.long)
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


def group_biases(meta: AttnMetadata, table: torch.nn.Embedding, bidirectional: bool,
                 num_buckets: int, max_distance: int) -> GroupBiases:
    def bias(group: AttnGroup | None) -> torch.Tensor | None:
        if group is None:
            return None
        max_k = group.key_blocks.shape[1] * meta.block_size
        q_idx = torch.arange(group.max_q, device=group.seq_lens.device)
        q_pos = (group.seq_lens - group.query_lens).long()[:, None] + q_idx          # (b, max_q)
        k_pos = torch.arange(max_k, device=q_pos.device)
        relative = k_pos[None, None, :] - q_pos[:, :, None]                         # (b, max_q, max_k)
        buckets = relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
        values = table(buckets).permute(3, 0, 1, 2)                                 # (heads, b, max_q, max_k)
        return values.masked_fill(~group.mask.transpose(0, 1), float("-inf"))
    return GroupBiases(bias(meta.decode), bias(meta.prefill))


def biased_attention(q: torch.Tensor, k_source: torch.Tensor, v_source: torch.Tensor,
                     meta: AttnMetadata, biases: GroupBiases) -> torch.Tensor:
    """q: (num_tokens, heads, head_dim); k/v_source: (heads, num_blocks, block_size, head_dim),
    the cache or (without one) each token its own block -> (num_tokens, heads, head_dim)."""
    out = torch.empty_like(q)
    for group, bias in ((meta.decode, biases.decode), (meta.prefill, biases.prefill)):
        if group is not None:
            out[group.token_rows] = _group_attention(q, k_source, v_source, group, bias)
    return out


def _group_attention(q, k_source, v_source, group: AttnGroup, bias: torch.Tensor) -> torch.Tensor:
    num_heads, head_dim = q.shape[1:]
    b, max_q = group.num_seqs, group.max_q
    if max_q == 1:                                         # decodes: nothing to pad
        padded_q = q[group.token_rows]
    else:
        padded_q = q.new_zeros(b * max_q, num_heads, head_dim)
        padded_q[group.query_slots] = q[group.token_rows]
    padded_q = padded_q.view(b, max_q, num_heads, head_dim).permute(2, 0, 1, 3)  # (heads, b, max_q, dim)
    rows = block_rows(group.key_blocks, num_heads, k_source.shape[1])
    keys = gather_blocks(k_source, rows, group.key_blocks.shape)                # (heads, b, max_k, dim)
    values = gather_blocks(v_source, rows, group.key_blocks.shape)
    out = F.scaled_dot_product_attention(padded_q, keys, values, attn_mask=bias, scale=1.0)
    out = out.permute(1, 2, 0, 3).reshape(b * max_q, num_heads, head_dim)
    return out if max_q == 1 else out[group.query_slots]
