"""The CUDA attention backend: a Triton paged-attention decode kernel, SDPA for prefill.

`CudaAttention.forward` has `TorchAttention.forward`'s signature and computes the same thing
(tests/test_triton_attention.py holds it to the reference):

    write K/V      one Triton launch copies the step's new K and V rows to their cache slots
    decode group   `paged_decode_attention`: reads each sequence's blocks straight from the
                   pool through its block table (no gather copy), one launch, plus a small
                   reduce launch when the context is long enough to be split
    prefill group  the reference's padded SDPA with the group's causal/window mask, so PyTorch
                   picks its efficient kernel on the GPU

The cache is head-major, (num_kv_heads, num_blocks, block_size, head_dim), the reference's
layout: the prefill path reuses its gather, and one KV head's block is one contiguous run of
block_size * head_dim elements, which is exactly what a decode program reads.

The decode kernel, flash-decoding style. One program per (sequence, KV head, partition):

    grid = (num_seqs, num_kv_heads, num_partitions)

    seq s, KV head g:  queries = the PER_KV query heads g*PER_KV ... g*PER_KV + PER_KV - 1
                       (GQA: they share the KV head, so its keys are loaded once for all)
                       padded to BLOCK_H >= 16 rows, the smallest tl.dot tile

    keys of seq s:  |<-------------------------- seq_len ------------------------------->|
    windowed:       |  skipped: older than seq_len - window  |<-------- window -------->|
    partitions:     |<-- partition 0 -->|<-- partition 1 -->|<-- partition 2 -->|...
    tiles:          |tile|tile|tile|tile|tile|tile|tile|tile|...  TILE_N keys each

    each program:   for each tile of its partition that holds a key in [key_lo, seq_len):
                        pos   = tile_start + arange(TILE_N)                 # token positions
                        block = key_blocks[s, pos // BLOCK_SIZE]            # block table lookup
                        K, V  = cache[g, block, pos % BLOCK_SIZE, :]        # (TILE_N, HEAD_DIM)
                        S     = Q @ K^T * scale                             # (BLOCK_H, TILE_N) fp32
                        online softmax: running max m, running sum l, acc = sum p * V in fp32

    one partition:  out = acc / l, written straight to the query's row
    several:        each writes (m, l, acc) to scratch; `_reduce_partitions_kernel` rescales
                    them to a common max and writes out = sum(w * acc) / sum(w * l)

Why these choices:
- A tile spans several blocks (pos // BLOCK_SIZE per key), so the loop's width does not
  depend on the block size: block 16 still reads 64 keys per step, and block size 1 (the
  no-cache layout, each token its own "block") works unchanged.
- Only blocks below ceil(seq_len / BLOCK_SIZE) are read: padding entries of `key_blocks`
  are never touched, and the group's mask is never read (the window is a scalar).
- Split-K over partitions keeps the GPU busy when there are few sequences and long
  contexts: with one sequence and 8 KV heads a single program per head would use 8 SMs.
  The number of partitions follows from `key_blocks.shape` alone, a host-side integer,
  so a launch never syncs with the device and a captured CUDA graph stays valid as long
  as the padded block-table width is fixed.
- fp32 accumulation everywhere; P is rounded to the cache dtype before P @ V (as
  FlashAttention does) so both products run on tensor cores in bf16/fp16. fp32 caches use
  IEEE fp32 products, not TF32, so they match the reference to 1e-5.
"""
from __future__ import annotations

import math

import torch

from engine.layers.attention import AttnGroup, AttnMetadata, padded_attention

try:
    import triton
    import triton.language as tl
except ImportError:                      # the serving path imports fine; the backend refuses
    triton = tl = None

DEFAULT_TILE_N = 64                      # keys per inner-loop step
DEFAULT_PARTITION_SIZE = 512             # keys per split-K partition (a multiple of the tile)
_ENOUGH_PROGRAMS = 264                   # ~2 per SM of an H100: more, and splitting only adds work
_NO_SPLIT = 2**30                        # partition size of an unsplit launch (one constexpr)
_NUM_WARPS = 4
_NO_WINDOW = 2**31 - 1                   # "window" of a model without one: every key


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


class CudaAttention:
    """Backend for CUDA devices: Triton paged decode, SDPA prefill. Same forward as TorchAttention.

    `sliding_window` is the model's (ModelConfig.sliding_window); the prefill group already
    has it in its mask, the decode kernel needs it as a number.
    """

    block_axis = 1
    supports_cuda_graphs = True         # shapes depend on static buffers only; slot -1 writes nothing

    def __init__(self, sliding_window: int | None = None):
        if triton is None:
            raise RuntimeError("the cuda attention backend needs triton, which is not installed "
                               "(pip install triton); use the torch backend on this machine")
        self.sliding_window = sliding_window

    def kv_cache_shape(self, num_blocks, block_size, num_kv_heads, head_dim):
        return (num_kv_heads, num_blocks, block_size, head_dim)

    def forward(self, q, k, v, k_cache, v_cache, meta: AttnMetadata, scale: float):
        # q: (num_tokens, num_heads, head_dim); k, v: (num_tokens, num_kv_heads, head_dim)
        if meta.slot_mapping is not None:
            triton_write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
            k_source, v_source = k_cache, v_cache          # (kv_heads, num_blocks, block_size, dim)
        else:                                              # every token its own one-slot "block"
            k_source, v_source = k.transpose(0, 1).unsqueeze(2), v.transpose(0, 1).unsqueeze(2)
        out = torch.empty_like(q)
        if meta.decode is not None:
            paged_decode_attention(q, k_source, v_source, meta.decode, scale, out,
                                   self.sliding_window)
        if meta.prefill is not None:
            out[meta.prefill.token_rows] = padded_attention(q, k_source, v_source,
                                                            meta.prefill, scale)
        return out


# -- the KV-cache write -------------------------------------------------------------------

def triton_write_kv_cache(k, v, k_cache, v_cache, slot_mapping) -> None:
    """k, v: (num_tokens, kv_heads, dim) -> cache slots slot_mapping (num_tokens,); slot < 0 skips.

    k_cache and v_cache are same-shaped slices of one pool, so they share strides.
    """
    num_tokens, num_kv_heads, head_dim = k.shape
    _check_head_dim(head_dim)
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), *_cache_strides(k_cache),
        num_kv_heads, BLOCK_SIZE=k_cache.shape[2], HEAD_DIM=head_dim,
        BLOCK_KV_HEADS=triton.next_power_of_2(num_kv_heads), num_warps=_NUM_WARPS)


@_jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
                     stride_k_token, stride_k_head, stride_v_token, stride_v_head,
                     stride_c_block, stride_c_slot, stride_c_head, num_kv_heads,
                     BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_KV_HEADS: tl.constexpr):
    # One program per new token: all its KV heads, K and V, in one go.
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_KV_HEADS)
    dims = tl.arange(0, HEAD_DIM)
    num_written = tl.where(slot >= 0, num_kv_heads, 0)      # slot < 0: a padding token
    mask = (heads < num_written)[:, None] & (dims < HEAD_DIM)[None, :]   # (KV_HEADS, DIM)
    dst = ((slot // BLOCK_SIZE) * stride_c_block + (slot % BLOCK_SIZE) * stride_c_slot
           + heads.to(tl.int64)[:, None] * stride_c_head + dims[None, :])      # (KV_HEADS, DIM)
    k = tl.load(k_ptr + token * stride_k_token + heads[:, None] * stride_k_head + dims[None, :],
                mask=mask)
    v = tl.load(v_ptr + token * stride_v_token + heads[:, None] * stride_v_head + dims[None, :],
                mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


# -- paged decode -------------------------------------------------------------------------

def paged_decode_attention(q, k_source, v_source, group: AttnGroup, scale: float,
                           out: torch.Tensor, sliding_window: int | None = None,
                           tile_n: int = DEFAULT_TILE_N,
                           partition_size: int | None = None) -> None:
    """Attention of each decode query over its sequence's cached keys, into out's rows.

    q, out: (num_tokens, num_heads, head_dim), out written at group.token_rows only;
    k_source, v_source: (kv_heads, num_blocks, block_size, head_dim) read through
    group.key_blocks (num_seqs, max_blocks); group.seq_lens (num_seqs,) keys per sequence.
    partition_size None: split by DEFAULT_PARTITION_SIZE only while the grid is small.
    """
    num_heads, head_dim = q.shape[1:]
    num_kv_heads, _, block_size, _ = k_source.shape
    _check_head_dim(head_dim)
    _check_power_of_two("block_size", block_size, 1)
    _check_power_of_two("tile_n", tile_n, 16)
    if partition_size is not None and partition_size % tile_n:
        raise ValueError(f"partition_size {partition_size} must be a multiple of tile_n {tile_n}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not share {num_kv_heads} KV heads evenly")
    if k_source.stride() != v_source.stride():
        raise ValueError("k_source and v_source must share one layout")
    for name, t in (("q", q), ("out", out)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous head_dim (stride {t.stride(-1)})")
    per_kv = num_heads // num_kv_heads
    num_seqs, max_blocks = group.key_blocks.shape
    if partition_size is None:
        few_programs = num_seqs * num_kv_heads < _ENOUGH_PROGRAMS
        partition_size = DEFAULT_PARTITION_SIZE if few_programs else _NO_SPLIT
    num_parts = triton.cdiv(max_blocks * block_size, partition_size)
    split = num_parts > 1
    partition_size = partition_size if split else _NO_SPLIT
    if split:
        part_m = q.new_empty(num_seqs, num_heads, num_parts, dtype=torch.float32)
        part_l = torch.empty_like(part_m)
        part_acc = q.new_empty(num_seqs, num_heads, num_parts, head_dim, dtype=torch.float32)
    else:
        part_m = part_l = part_acc = out                     # unused when not split
    cache_dtype = k_source.dtype
    _paged_decode_kernel[(num_seqs, num_kv_heads, num_parts)](
        q, k_source, v_source, out, part_m, part_l, part_acc,
        group.token_rows, group.key_blocks, group.seq_lens,
        scale * math.log2(math.e), sliding_window or _NO_WINDOW, num_parts,
        q.stride(0), q.stride(1), *_cache_strides(k_source),
        out.stride(0), out.stride(1), group.key_blocks.stride(0),
        PER_KV=per_kv, BLOCK_H=max(16, triton.next_power_of_2(per_kv)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, TILE_N=tile_n, PARTITION_SIZE=partition_size, SPLIT=split,
        PRECISION="ieee" if cache_dtype == torch.float32 else None,   # None: tensor cores
        UPCAST=_INTERPRETED and cache_dtype != torch.float32, num_warps=_NUM_WARPS)
    if split:
        _reduce_partitions_kernel[(num_seqs, num_heads)](
            out, part_m, part_l, part_acc, group.token_rows, out.stride(0), out.stride(1),
            num_heads, num_parts, HEAD_DIM=head_dim,
            NUM_PARTS_P2=triton.next_power_of_2(num_parts), num_warps=_NUM_WARPS)


@_jit
def _paged_decode_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
        token_rows_ptr, key_blocks_ptr, seq_lens_ptr,
        scale_log2, window, num_parts,
        stride_q_row, stride_q_head, stride_c_block, stride_c_slot, stride_c_head,
        stride_o_row, stride_o_head, stride_kb_seq,
        PER_KV: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, PARTITION_SIZE: tl.constexpr,
        SPLIT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq)
    row = tl.load(token_rows_ptr + seq).to(tl.int64)          # the query's row in q and out
    key_lo = tl.maximum(seq_len - window, 0)                  # first key the query sees
    part_lo = part * PARTITION_SIZE
    part_hi = tl.minimum(part_lo + PARTITION_SIZE, seq_len)
    lo = tl.maximum(part_lo, key_lo)
    tile_lo = (lo // TILE_N) * TILE_N    # tiles stay aligned to the partition's start

    h = tl.arange(0, BLOCK_H)
    head_ok = h < PER_KV                                       # rows past PER_KV are padding
    heads = kv_head * PER_KV + h                               # (BLOCK_H,) query heads
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + row * stride_q_row + heads[:, None] * stride_q_head + dims[None, :],
                mask=head_ok[:, None], other=0.0)              # (BLOCK_H, HEAD_DIM)
    if UPCAST:   # the CPU interpreter's tl.dot mis-multiplies bf16; fp32 operands are exact
        q = q.to(tl.float32)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)         # running max (log2 units)
    l = tl.zeros([BLOCK_H], tl.float32)                        # running sum of exp2
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)            # running sum of p * V
    # Every tile visited holds at least one key in [lo, part_hi), so m is finite after it.
    for tile_start in range(tile_lo, part_hi, TILE_N):
        pos = tile_start + tl.arange(0, TILE_N)                # (TILE_N,) key positions
        valid = (pos >= lo) & (pos < part_hi)
        block = tl.load(key_blocks_ptr + seq * stride_kb_seq + pos // BLOCK_SIZE,
                        mask=valid, other=0).to(tl.int64)
        offs = (block * stride_c_block + (pos % BLOCK_SIZE) * stride_c_slot
                + kv_head.to(tl.int64) * stride_c_head)         # (TILE_N,)
        k = tl.load(k_cache_ptr + offs[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_cache_ptr + offs[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2   # (BLOCK_H, TILE_N)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)                              # rescales the old sums
        p = tl.exp2(s - m_new[:, None])                        # (BLOCK_H, TILE_N)
        l = l * alpha + tl.sum(p, 1)
        p = p.to(v_cache_ptr.dtype.element_ty)                  # tensor-core P @ V, as flash does
        if UPCAST:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m = m_new

    if SPLIT:
        # Partial results; empty partitions store m = -inf, l = 0 and weigh nothing.
        part_row = (seq * (tl.num_programs(1) * PER_KV) + heads) * num_parts + part   # (BLOCK_H,)
        tl.store(part_m_ptr + part_row, m, mask=head_ok)
        tl.store(part_l_ptr + part_row, l, mask=head_ok)
        tl.store(part_acc_ptr + part_row[:, None] * HEAD_DIM + dims[None, :], acc,
                 mask=head_ok[:, None])
    else:
        l = tl.where(l > 0, l, 1.0)                             # seq_len 0 (padding): zeros, not NaN
        result = acc / l[:, None]
        tl.store(out_ptr + row * stride_o_row + heads[:, None] * stride_o_head + dims[None, :],
                 result.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])


@_jit
def _reduce_partitions_kernel(out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, token_rows_ptr,
                              stride_o_row, stride_o_head, num_heads, num_parts,
                              HEAD_DIM: tl.constexpr, NUM_PARTS_P2: tl.constexpr):
    # One program per (sequence, query head): merge its partitions' softmax states.
    seq = tl.program_id(0)
    head = tl.program_id(1)
    parts = tl.arange(0, NUM_PARTS_P2)
    ok = parts < num_parts
    base = (seq * num_heads + head) * num_parts
    m = tl.load(part_m_ptr + base + parts, mask=ok, other=float("-inf"))   # (NUM_PARTS_P2,)
    l = tl.load(part_l_ptr + base + parts, mask=ok, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max > float("-inf"), m_max, 0.0)       # all empty (seq_len 0): no NaN
    w = tl.exp2(m - m_max)                                    # empty partitions weigh 0
    dims = tl.arange(0, HEAD_DIM)
    acc = tl.load(part_acc_ptr + (base + parts)[:, None] * HEAD_DIM + dims[None, :],
                  mask=ok[:, None], other=0.0)                 # (NUM_PARTS_P2, HEAD_DIM)
    total = tl.sum(l * w, 0)
    total = tl.where(total > 0, total, 1.0)
    result = tl.sum(acc * w[:, None], 0) / total
    row = tl.load(token_rows_ptr + seq).to(tl.int64)
    tl.store(out_ptr + row * stride_o_row + head * stride_o_head + dims,
             result.to(out_ptr.dtype.element_ty))


# -- layout and checks --------------------------------------------------------------------

def supports_head_dim(head_dim: int) -> bool:
    """Whether the kernels take this head_dim; the runner keeps TorchAttention otherwise."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def _cache_strides(cache: torch.Tensor) -> tuple[int, int, int]:
    """(block, slot, head) strides of a (kv_heads, num_blocks, block_size, dim) cache; the
    kernels index by these alone, so another layout needs only this and kv_cache_shape."""
    if cache.stride(3) != 1:
        raise ValueError(f"the KV cache needs a contiguous head_dim (stride {cache.stride(3)})")
    return cache.stride(1), cache.stride(2), cache.stride(0)


def _check_head_dim(head_dim: int) -> None:
    _check_power_of_two("head_dim", head_dim, 16)


def _check_power_of_two(name: str, value: int, minimum: int) -> None:
    if value < minimum or value & (value - 1):
        raise ValueError(f"the triton attention kernels need {name} to be a power of two "
                         f">= {minimum}, got {value}")


# The CPU interpreter (TRITON_INTERPRET=1, read when the kernels above were decorated) runs
# tl.dot on bf16/fp16 wrongly; the kernel then multiplies in fp32, after the same roundings.
_INTERPRETED = triton is not None and type(_paged_decode_kernel).__name__ == "InterpretedFunction"
