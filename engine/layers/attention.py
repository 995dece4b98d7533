"""Attention over a flattened ragged batch, with or without a paged KV cache.

A step's tokens are flattened, one sequence after another, with no padding:

    rows:     | seq 0: 3 new tokens | seq 1: 1 | seq 2: 1 | seq 3: 5 new tokens |
    context:  | 7 cached + 3 new    | 40 + 1   | 9 + 1    | 0 + 5               |

Sequences with one new token (decodes) and those with several (prefill chunks) are run as
two groups, each padded to one batched SDPA call with a boolean mask, so a step costs at
most two attention calls per layer whatever its mix. Keys are read from the cache by whole
blocks (one index_select per group), which is what makes the paged layout cheap on a CPU.
Each backend decides its cache layout (`kv_cache_shape`); the runner allocates it.

`AttnMetadata` is built once per step by `build_attn_metadata` and handed to every layer.
Backends share one signature; the runner picks one per device and sets it on each
`Attention` module. `TorchAttention` is the readable reference every kernel is tested against.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine.kv_cache import ceil_div


@dataclass(frozen=True, slots=True)
class AttnGroup:
    """Sequences run as one padded SDPA call: (num_seqs, max_q) queries x (num_seqs, max_k) keys."""

    token_rows: torch.Tensor      # (num_queries,) row of each query in the flattened batch
    query_slots: torch.Tensor     # (num_queries,) where it sits in the (num_seqs * max_q) padded layout
    key_blocks: torch.Tensor      # (num_seqs, max_blocks) blocks of the key source holding each sequence's keys
    mask: torch.Tensor            # (num_seqs, 1, max_q, max_k) True where a query may attend
    seq_lens: torch.Tensor        # (num_seqs,) int32 keys per sequence (cached + new)
    query_lens: torch.Tensor      # (num_seqs,) int32 new tokens per sequence
    num_seqs: int
    max_q: int


@dataclass(frozen=True, slots=True)
class AttnMetadata:
    """Everything attention needs for one step; the same object reaches every layer."""

    slot_mapping: torch.Tensor | None  # (num_tokens,) cache slot of each new token; None: no cache
    block_size: int                    # tokens per block of the key source (1 without a cache)
    decode: AttnGroup | None           # sequences with exactly one new token
    prefill: AttnGroup | None          # sequences with several
    # The whole batch in row order, for kernels that walk the block tables themselves
    # (CpuPagedAttention).
    cu_seqlens_q: torch.Tensor | None = None   # (num_seqs + 1,) int32 first row of each sequence
    seq_lens: torch.Tensor | None = None       # (num_seqs,) int32 keys per sequence (cached + new)
    block_tables: torch.Tensor | None = None   # (num_seqs, max_blocks) int32, rows padded with 0; None: no cache
    causal: bool = True
    sliding_window: int | None = None          # a query sees keys with pos > q_pos - window


class AttentionBackend(Protocol):
    block_axis: int                     # which axis of kv_cache_shape counts blocks
    supports_cuda_graphs: bool          # decode steps may be captured and replayed

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int) -> tuple[int, ...]: ...

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor | None, v_cache: torch.Tensor | None,
                meta: AttnMetadata, scale: float) -> torch.Tensor: ...


class TorchAttention:
    """Reference backend in plain PyTorch; runs on any device.

    Its cache is head-major, (num_kv_heads, num_blocks, block_size, head_dim): gathering a
    group's blocks then yields each head's keys contiguous, (kv_heads, b, max_k, dim), so the
    attention matmuls run on dense batches with no further copy.
    """

    block_axis = 1
    supports_cuda_graphs = False        # its gathers and masks are shaped by each step

    def kv_cache_shape(self, num_blocks, block_size, num_kv_heads, head_dim):
        return (num_kv_heads, num_blocks, block_size, head_dim)

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        # q: (num_tokens, num_heads, head_dim); k, v: (num_tokens, num_kv_heads, head_dim)
        if meta.slot_mapping is not None:
            write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
            k_source, v_source = k_cache, v_cache          # (kv_heads, num_blocks, block_size, dim)
        else:                                              # every token its own one-slot "block"
            k_source, v_source = k.transpose(0, 1).unsqueeze(2), v.transpose(0, 1).unsqueeze(2)
        out = torch.empty_like(q)
        for group in (meta.decode, meta.prefill):
            if group is not None:
                out[group.token_rows] = padded_attention(q, k_source, v_source, group, scale)
        return out


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping):
    num_kv_heads, _, _, head_dim = k_cache.shape
    k_cache.view(num_kv_heads, -1, head_dim).index_copy_(1, slot_mapping, k.transpose(0, 1))
    v_cache.view(num_kv_heads, -1, head_dim).index_copy_(1, slot_mapping, v.transpose(0, 1))


def padded_attention(q, k_source, v_source, group: AttnGroup, scale: float) -> torch.Tensor:
    """SDPA for one group; returns (num_queries, num_heads, head_dim) in token_rows order."""
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = k_source.shape[0]
    per_kv = num_heads // num_kv_heads
    b, max_q = group.num_seqs, group.max_q

    if max_q == 1:                                         # decodes: nothing to pad
        padded_q = q[group.token_rows]
    else:
        padded_q = q.new_zeros(b * max_q, num_heads, head_dim)
        padded_q[group.query_slots] = q[group.token_rows]
    # Grouped-query attention without copying K/V per query head: the query heads that share
    # a KV head are stacked along the query axis, (kv_heads, b, per_kv * max_q, head_dim).
    padded_q = (padded_q.view(b, max_q, num_kv_heads, per_kv, head_dim)
                .permute(2, 0, 3, 1, 4).reshape(num_kv_heads, b, per_kv * max_q, head_dim))
    rows = block_rows(group.key_blocks, num_kv_heads, k_source.shape[1])
    keys = gather_blocks(k_source, rows, group.key_blocks.shape)   # (kv_heads, b, max_k, head_dim)
    values = gather_blocks(v_source, rows, group.key_blocks.shape)
    mask = group.mask.transpose(0, 1)                       # (1, b, max_q, max_k)
    if per_kv > 1 and max_q > 1:                           # one query row broadcasts as it is
        mask = mask.repeat(1, 1, per_kv, 1)

    out = F.scaled_dot_product_attention(padded_q, keys, values, attn_mask=mask, scale=scale)
    out = (out.view(num_kv_heads, b, per_kv, max_q, head_dim)
           .permute(1, 3, 0, 2, 4).reshape(b * max_q, num_heads, head_dim))
    return out if max_q == 1 else out[group.query_slots]


def block_rows(key_blocks: torch.Tensor, num_kv_heads: int, num_blocks: int) -> torch.Tensor:
    """The row of each (head, block) in the cache seen as (kv_heads * num_blocks, block_size * dim)."""
    heads = torch.arange(num_kv_heads, device=key_blocks.device)[:, None] * num_blocks
    return (heads + key_blocks.flatten()[None, :]).flatten()


def gather_blocks(source: torch.Tensor, rows: torch.Tensor, key_blocks_shape) -> torch.Tensor:
    """(kv_heads, num_blocks, block_size, dim) at key_blocks -> (kv_heads, b, max_k, dim).

    Each (head, block) is one contiguous row, and index_select along dim 0 copies whole rows:
    on a CPU 8x faster than selecting along the block axis of the 4-D cache (at batch 64 and
    256-token contexts that gather was 58% of a decode step)."""
    b, max_blocks = key_blocks_shape
    num_kv_heads, num_blocks, block_size, head_dim = source.shape
    gathered = source.reshape(num_kv_heads * num_blocks, block_size * head_dim).index_select(0, rows)
    return gathered.view(num_kv_heads, b, max_blocks * block_size, head_dim)


class Attention(nn.Module):
    """Scaled dot-product attention of one layer. Holds its slice of the KV pool, if any."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale if scale is not None else head_dim ** -0.5
        self.backend: AttentionBackend = TorchAttention()
        self.k_cache: torch.Tensor | None = None   # laid out as backend.kv_cache_shape says; set by the runner
        self.v_cache: torch.Tensor | None = None

    def forward(self, q, k, v, meta: AttnMetadata) -> torch.Tensor:
        # q: (num_tokens, num_heads * head_dim); k, v: (num_tokens, num_kv_heads * head_dim)
        num_tokens = q.shape[0]
        out = self.backend.forward(
            q.view(num_tokens, self.num_heads, self.head_dim),
            k.view(num_tokens, self.num_kv_heads, self.head_dim),
            v.view(num_tokens, self.num_kv_heads, self.head_dim),
            self.k_cache, self.v_cache, meta, self.scale)
        return out.view(num_tokens, self.num_heads * self.head_dim)


def build_attn_metadata(
    query_lens: Sequence[int],
    seq_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]] | None,
    block_size: int,
    device: torch.device | str = "cpu",
    causal: bool = True,
    sliding_window: int | None = None,
) -> AttnMetadata:
    """Metadata for sequences whose new tokens are flattened in this order.

    query_lens[i] new tokens of sequence i sit at positions seq_lens[i] - query_lens[i] ...
    seq_lens[i] - 1. With block_tables the new K/V go to the cache and keys are read from it;
    without, each sequence attends only to its own new tokens (seq_lens must equal query_lens).
    """
    if block_tables is None:
        if list(seq_lens) != list(query_lens):
            raise ValueError("without a KV cache every sequence must be computed whole")
        block_size = 1
    starts = _cumsum([0, *query_lens])
    slot_mapping = None
    if block_tables is not None:
        slot_mapping = torch.tensor(
            [block_tables[i][pos // block_size] * block_size + pos % block_size
             for i, (q_len, s_len) in enumerate(zip(query_lens, seq_lens))
             for pos in range(s_len - q_len, s_len)], dtype=torch.long, device=device)
    groups = {True: [], False: []}
    for i, q_len in enumerate(query_lens):
        groups[q_len == 1].append(i)

    def group(indices: list[int]) -> AttnGroup | None:
        if not indices:
            return None
        if block_tables is not None:
            tables = [block_tables[i][: ceil_div(seq_lens[i], block_size)] for i in indices]
        else:
            tables = [list(range(starts[i], starts[i] + query_lens[i])) for i in indices]
        return _build_group(indices, query_lens, seq_lens, starts, tables, block_size,
                            causal, sliding_window, device)

    return AttnMetadata(slot_mapping=slot_mapping, block_size=block_size,
                        decode=group(groups[True]), prefill=group(groups[False]),
                        **_whole_batch(starts, seq_lens, block_tables, block_size, device),
                        causal=causal, sliding_window=sliding_window)


def build_cross_attn_metadata(
    query_lens: Sequence[int],
    key_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    device: torch.device | str = "cpu",
) -> AttnMetadata:
    """Metadata for queries that read keys already in the cache and write none (an
    encoder-decoder's cross-attention): each of sequence i's query_lens[i] new tokens sees
    all key_lens[i] keys its block table holds, however many queries that is. Only the groups
    are filled: it is read by padded_attention, never by a backend's forward."""
    starts = _cumsum([0, *query_lens])
    groups = {True: [], False: []}
    for i, q_len in enumerate(query_lens):
        groups[q_len == 1].append(i)

    def group(indices: list[int]) -> AttnGroup | None:
        if not indices:
            return None
        tables = [block_tables[i][: ceil_div(key_lens[i], block_size)] for i in indices]
        return _build_group(indices, query_lens, key_lens, starts, tables, block_size,
                            False, None, device)

    return AttnMetadata(slot_mapping=None, block_size=block_size, decode=group(groups[True]),
                        prefill=group(groups[False]), causal=False)


def _whole_batch(starts, seq_lens, block_tables, block_size, device) -> dict:
    """AttnMetadata's cu_seqlens_q (= starts), seq_lens and block_tables: int32, row order."""
    int32 = dict(dtype=torch.int32, device=device)
    batch = dict(cu_seqlens_q=torch.tensor(starts, **int32), seq_lens=torch.tensor(list(seq_lens), **int32))
    if block_tables is not None:
        num_blocks = [ceil_div(s_len, block_size) for s_len in seq_lens]
        max_blocks = max(num_blocks, default=0)
        padded = [list(table[:n]) + [0] * (max_blocks - n) for table, n in zip(block_tables, num_blocks)]
        batch["block_tables"] = torch.tensor(padded, **int32).view(len(padded), max_blocks)
    return batch


def _build_group(indices, query_lens, seq_lens, starts, tables, block_size,
                 causal, sliding_window, device) -> AttnGroup:
    q_lens = torch.tensor([query_lens[i] for i in indices], dtype=torch.long)
    s_lens = torch.tensor([seq_lens[i] for i in indices], dtype=torch.long)
    b, max_q = len(indices), int(q_lens.max())
    max_blocks = max(len(t) for t in tables)
    key_blocks = torch.zeros(b, max_blocks, dtype=torch.long)   # padding reads block 0, masked
    for row, table in enumerate(tables):
        key_blocks[row, : len(table)] = torch.tensor(table, dtype=torch.long)

    q_idx = torch.arange(max_q)
    q_valid = q_idx[None, :] < q_lens[:, None]                          # (b, max_q)
    token_rows = (torch.tensor([starts[i] for i in indices])[:, None] + q_idx)[q_valid]
    query_slots = (torch.arange(b)[:, None] * max_q + q_idx)[q_valid]

    k_pos = torch.arange(max_blocks * block_size)                       # (max_k,)
    q_pos = (s_lens - q_lens)[:, None] + q_idx                          # (b, max_q) absolute positions
    mask = (k_pos[None, None, :] < s_lens[:, None, None]).expand(b, max_q, -1)  # (b, max_q, max_k)
    if causal:
        mask = mask & (k_pos[None, None, :] <= q_pos[:, :, None])
    if sliding_window is not None:
        mask = mask & (k_pos[None, None, :] > q_pos[:, :, None] - sliding_window)
    # Padding queries see key 0 only, so softmax never meets an all-False row (NaN).
    mask = mask | ((~q_valid[:, :, None]) & (k_pos[None, None, :] == 0))
    return AttnGroup(
        token_rows=token_rows.to(device), query_slots=query_slots.to(device),
        key_blocks=key_blocks.to(device), mask=mask.unsqueeze(1).to(device),
        seq_lens=s_lens.to(device=device, dtype=torch.int32),
        query_lens=q_lens.to(device=device, dtype=torch.int32), num_seqs=b, max_q=max_q)


def _cumsum(values: Sequence[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out
