"""Encoder attention without padding: one softmax(q k^T) v per sequence of a packed batch.

An encoder batch holds whole sequences laid end to end, each attending to itself alone,
bidirectionally, with no KV cache:

    rows:   | seq 0: 9 tokens | seq 1: 152 tokens ............ | seq 2: 12 tokens |
    spans:  (0, 9)            (9, 161)                         (161, 173)

The reference (TorchAttention over build_attn_metadata's padded group) pads every sequence to
the longest: a batch mixing one-line and paragraph inputs spent most of its attention on
padding, and sorting inputs into length buckets to avoid that split batches into small
forwards. On a CPU, a call per sequence costs tens of microseconds and wastes nothing.

The encoder runner picks this backend on a CPU where our C++ op (CpuPagedAttention, which runs
the same packed rows in one call per layer) does not build; GPUs keep the padded reference.
Where both run, the C++ op is the faster (ms per MiniLM layer-call, one thread: the embed
benchmark's first 32 mixed sentences 6.1 vs 7.0, 32 short ones 0.36 vs 2.1, 16 long ones 13.5
vs 11.8); this stays the readable oracle without a compiler.

Each sequence is two matmuls around a softmax, not SDPA: for MiniLM's 32-wide heads and
sequences of 10-160 tokens, PyTorch's CPU SDPA kernel took 0.39 ms per sentence and layer on
the embed benchmark's sentences, the plain matmuls 0.25 (one thread).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Sequence

import torch


@dataclass(frozen=True, slots=True)
class SequenceSpans:
    """Attention metadata of a packed encoder batch: the rows [start, end) of each sequence."""
    spans: tuple[tuple[int, int], ...]
    slot_mapping: None = None          # no KV cache

    @classmethod
    def of(cls, seq_lens: Sequence[int]) -> "SequenceSpans":
        ends = list(accumulate(seq_lens))
        return cls(tuple(zip([0, *ends[:-1]], ends)))


class PerSequenceAttention:
    """Bidirectional attention of each sequence over itself; no padding, no cache."""

    block_axis = 1
    supports_cuda_graphs = False

    def kv_cache_shape(self, num_blocks, block_size, num_kv_heads, head_dim):
        raise NotImplementedError("an encoder keeps no KV cache")

    def forward(self, q, k, v, k_cache, v_cache, meta: SequenceSpans, scale: float) -> torch.Tensor:
        # q: (num_tokens, num_heads, head_dim); k, v: (num_tokens, num_kv_heads, head_dim)
        out = torch.empty_like(q)
        per_kv = q.shape[1] // k.shape[1]
        for start, end in meta.spans:
            keys, values = k[start:end].transpose(0, 1), v[start:end].transpose(0, 1)   # (kv_heads, len, dim)
            if per_kv > 1:
                keys, values = keys.repeat_interleave(per_kv, 0), values.repeat_interleave(per_kv, 0)
            scores = torch.bmm(q[start:end].transpose(0, 1), keys.transpose(1, 2)).mul_(scale)  # (heads, len, len)
            weights = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
            out[start:end] = torch.bmm(weights, values).transpose(0, 1)
        return out
