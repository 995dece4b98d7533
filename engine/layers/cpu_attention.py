"""The CPU attention backend: a C++ paged-attention op (engine/csrc/paged_attention.cpp).

`CpuPagedAttention.forward` has `TorchAttention.forward`'s signature and computes the same
thing (tests/test_cpu_attention.py holds it to the reference on every CPU kind we build):

    write K/V    `paged_write_kv` copies the step's new K and V rows to their cache slots
    attention    `paged_attention` runs every sequence of the step, decodes and prefill
                 chunks alike, reading K/V through the block tables where they sit

Where TorchAttention gathers each group's blocks into a padded copy and masks it, the op
walks each (sequence, KV head) block by block with an online softmax: the cache is read
once, and only the keys a query can see are touched.

Its cache layout, one tile per (block, KV head), K transposed within the tile so the scores
of a block's keys are whole-vector FMAs down head_dim:

    k_cache, v_cache: (num_blocks, num_kv_heads, block_size * head_dim)
    K tile: (head_dim, block_size)      V tile: (block_size, head_dim)

Without a cache (encoders: each sequence attends to its own tokens, both ways unless causal)
`varlen_attention` runs the same loop over the step's own k, v rows.
"""
from __future__ import annotations

from types import ModuleType

from engine.layers.attention import AttnMetadata


class CpuPagedAttention:
    """Backend for CPUs with our compiled kernels; `ops` is what `engine.kernels.load()` gave."""

    block_axis = 0
    supports_cuda_graphs = False

    def __init__(self, ops: ModuleType):
        self.ops = ops

    def kv_cache_shape(self, num_blocks, block_size, num_kv_heads, head_dim):
        return (num_blocks, num_kv_heads, block_size * head_dim)

    def forward(self, q, k, v, k_cache, v_cache, meta: AttnMetadata, scale: float):
        # q: (num_tokens, num_heads, head_dim); k, v: (num_tokens, num_kv_heads, head_dim)
        window = meta.sliding_window or 0
        if meta.slot_mapping is None:
            return self.ops.varlen_attention(q, k, v, meta.cu_seqlens_q, scale, window, meta.causal)
        self.ops.paged_write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return self.ops.paged_attention(q, k_cache, v_cache, meta.cu_seqlens_q, meta.seq_lens,
                                        meta.block_tables, scale, window, meta.causal)
