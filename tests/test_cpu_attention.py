"""The C++ CPU attention op (CpuPagedAttention) against TorchAttention, the reference.

Every case runs on this CPU's build and on the AVX2 build (both load in one process), over
caches whose blocks are shuffled and whose unowned slots hold NaN, so a kernel that reads a
slot it should not fails. Ragged steps mix decodes at context edges (1 key, exactly a block, a
block + 1, long) with prefill chunks over cached context, longer than one work item's rows.
Then the engine: greedy tokens under batching and preemption equal the reference's, and the
encoder runs the op too.
"""
from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams, kernels
from engine.config import EncoderConfig
from engine.device import cpu_features
from engine.encoder_runner import EncoderRunner
from engine.layers.attention import Attention, TorchAttention, build_attn_metadata
from engine.layers.cpu_attention import CpuPagedAttention

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
# (query_lens, seq_lens): decodes at 1 key, a block, a block + 1 and a context of several
# 128-key tiles; prefill chunks from the start, over cached context (one spanning tiles), and
# longer than one work item (48 rows).
RAGGED = ([1, 1, 1, 1, 7, 33, 70, 1], [1, 16, 17, 300, 27, 33, 300, 5])


@pytest.fixture(params=["native", "avx2"])
def ops(request):
    if request.param == "avx2" and not cpu_features().has_avx2:
        pytest.skip("this CPU has no AVX2")
    module = kernels.load(None if request.param == "native" else "avx2")
    assert module is not None, "a C++ compiler is on every machine we target"
    return module


@dataclasses.dataclass
class Step:
    q: torch.Tensor               # (num_tokens, num_heads, head_dim), views of one qkv row
    k: torch.Tensor               # (num_tokens, num_kv_heads, head_dim)
    v: torch.Tensor
    keys: torch.Tensor            # (num_blocks, num_kv_heads, block_size, head_dim) cache contents
    values: torch.Tensor
    meta: object


def random_step(query_lens, seq_lens, *, block_size=16, num_kv_heads=2, per_kv=1, head_dim=64,
                dtype=torch.float32, window=None, seed=0) -> Step:
    """A step over shuffled blocks; cached context is random, every other slot NaN."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = [order[sum(blocks_per_seq[:i]): sum(blocks_per_seq[: i + 1])]
              for i in range(len(seq_lens))]
    meta = build_attn_metadata(query_lens, seq_lens, tables, block_size, sliding_window=window)
    num_heads, num_tokens = num_kv_heads * per_kv, sum(query_lens)
    # q, k, v are strided views of one row per token, as a merged qkv projection gives them.
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=g).to(dtype)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], 1)
    cache = torch.full((2, num_blocks, num_kv_heads, block_size, head_dim), float("nan"))
    cached = [(table[pos // block_size], pos % block_size)
              for table, seq_len, q_len in zip(tables, seq_lens, query_lens)
              for pos in range(seq_len - q_len)]
    if cached:
        blocks, slots = torch.tensor(cached).T
        # (the indexed axes are apart, so they come first: (len(cached), K/V, kv_heads, dim))
        cache[:, blocks, :, slots] = torch.randn(len(cached), 2, num_kv_heads, head_dim, generator=g)
    cache = cache.to(dtype)
    return Step(q.view(num_tokens, num_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim),
                v.view(num_tokens, num_kv_heads, head_dim), cache[0], cache[1], meta)


def to_paged(keys, values):
    """(num_blocks, kv_heads, block_size, dim) contents -> the op's tiles: K transposed."""
    num_blocks, num_kv_heads, block_size, head_dim = keys.shape
    k_cache = keys.transpose(2, 3).reshape(num_blocks, num_kv_heads, block_size * head_dim)
    return k_cache.contiguous(), values.reshape(num_blocks, num_kv_heads, -1).clone()


def from_paged(k_cache, v_cache, block_size):
    num_blocks, num_kv_heads, tile = k_cache.shape
    head_dim = tile // block_size
    keys = k_cache.view(num_blocks, num_kv_heads, head_dim, block_size).transpose(2, 3)
    return keys, v_cache.view(num_blocks, num_kv_heads, block_size, head_dim)


def reference(step: Step, scale: float):
    """TorchAttention in fp32 over the same (rounded) inputs; its head-major caches, NaN as 0
    (its padded gathers read unowned slots and mask them; 0 * NaN would poison the sum)."""
    k_cache, v_cache = (torch.nan_to_num(c.float(), nan=0.0).transpose(0, 1).contiguous()
                        for c in (step.keys, step.values))
    out = TorchAttention().forward(step.q.float(), step.k.float(), step.v.float(), k_cache,
                                   v_cache, step.meta, scale)
    return out, k_cache.transpose(0, 1), v_cache.transpose(0, 1)


def run_op(ops, step: Step, scale: float):
    k_cache, v_cache = to_paged(step.keys, step.values)
    out = CpuPagedAttention(ops).forward(step.q, step.k, step.v, k_cache, v_cache, step.meta, scale)
    return out, *from_paged(k_cache, v_cache, step.keys.shape[2])


def assert_matches(ops, step: Step, dtype=torch.float32):
    scale = step.q.shape[-1] ** -0.5
    expected, expected_keys, expected_values = reference(step, scale)
    out, keys, values = run_op(ops, step, scale)
    assert out.dtype == dtype and out.shape == step.q.shape
    torch.testing.assert_close(out.float(), expected, atol=TOLERANCE[dtype], rtol=0)
    torch.testing.assert_close(keys.float().nan_to_num(), expected_keys, atol=0, rtol=0)
    torch.testing.assert_close(values.float().nan_to_num(), expected_values, atol=0, rtol=0)


@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("per_kv", [1, 2, 3])
def test_ragged_steps_match_the_reference(ops, block_size, per_kv):
    assert_matches(ops, random_step(*RAGGED, block_size=block_size, per_kv=per_kv))


@pytest.mark.parametrize("window", [1, 5, 16, 40])
@pytest.mark.parametrize("block_size", [16, 5])
def test_sliding_windows_match_the_reference(ops, window, block_size):
    assert_matches(ops, random_step(*RAGGED, block_size=block_size, per_kv=3, window=window))


def test_smollm2_shapes_at_long_contexts(ops):
    """9 query heads over 3 KV heads, head_dim 64, blocks of 16: decodes and a 300-token chunk."""
    step = random_step([1, 1, 1, 300], [300, 1000, 513, 812], num_kv_heads=3, per_kv=3, seed=1)
    assert_matches(ops, step)


@pytest.mark.parametrize("head_dim", [40, 128])
def test_head_dims_off_the_vector_width(ops, head_dim):
    assert_matches(ops, random_step(*RAGGED, per_kv=2, head_dim=head_dim))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_caches_accumulate_in_fp32(ops, dtype):
    step = random_step(*RAGGED, num_kv_heads=3, per_kv=3, dtype=dtype, window=40)
    assert_matches(ops, step, dtype)


def test_every_thread_count_gives_the_same_bits(ops):
    step = random_step(*RAGGED, num_kv_heads=3, per_kv=3)
    threads = torch.get_num_threads()
    outputs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outputs.append(run_op(ops, step, 0.125)[0])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outputs[0], out) for out in outputs[1:])


@pytest.mark.parametrize("block_size", [16, 5])
def test_a_sequence_gets_the_same_bits_in_any_batch_and_any_chunk_split(ops, block_size):
    """fp32 promises batch invariance: a row sums its keys in the same order whatever else
    runs and however its prompt was chunked, sliding window included."""
    step = random_step(*RAGGED, block_size=block_size, num_kv_heads=3, per_kv=3, window=200)
    query_lens, seq_lens = RAGGED
    backend = CpuPagedAttention(ops)
    caches = to_paged(step.keys, step.values)
    batched = backend.forward(step.q, step.k, step.v, *(c.clone() for c in caches), step.meta, 0.125)

    def alone(seq: int, first: int, count: int) -> torch.Tensor:
        """Rows first .. first + count of sequence seq's new tokens, as a step of their own."""
        start = sum(query_lens[:seq]) + first
        seq_len = seq_lens[seq] - query_lens[seq] + first + count
        meta = build_attn_metadata([count], [seq_len], [step.meta.block_tables[seq].tolist()],
                                   block_size, sliding_window=200)
        rows = slice(start, start + count)
        return backend.forward(step.q[rows], step.k[rows], step.v[rows], *caches, meta, 0.125)

    chunk = torch.cat([alone(6, 0, 30), alone(6, 30, 40)])     # 70 new tokens in two steps
    assert torch.equal(chunk, batched[44:114])
    assert torch.equal(alone(3, 0, 1), batched[3:4])             # a decode at 300 keys


def test_negative_slots_write_nothing(ops):
    step = random_step([2], [2], num_kv_heads=1)
    k_cache, v_cache = to_paged(step.keys, step.values)
    before = k_cache.clone(), v_cache.clone()
    ops.paged_write_kv(step.k, step.v, k_cache, v_cache, torch.tensor([-1, -1]))
    assert torch.equal(k_cache.nan_to_num(), before[0].nan_to_num())
    assert torch.equal(v_cache.nan_to_num(), before[1].nan_to_num())


def test_metadata_that_would_read_outside_the_cache_is_refused(ops):
    step = random_step([1, 3], [20, 3])
    k_cache, v_cache = to_paged(step.keys, step.values)
    m = step.meta

    def attend(**changes):
        m2 = dataclasses.replace(m, **changes)
        return ops.paged_attention(step.q, k_cache, v_cache, m2.cu_seqlens_q, m2.seq_lens,
                                   m2.block_tables, 0.125, 0, True)

    attend()
    with pytest.raises(RuntimeError, match="block out of range"):
        attend(block_tables=torch.full_like(m.block_tables, k_cache.shape[0]))
    with pytest.raises(RuntimeError, match="block table too short"):
        attend(seq_lens=m.seq_lens + 16)
    with pytest.raises(RuntimeError, match="cu_seqlens_q"):
        attend(cu_seqlens_q=m.cu_seqlens_q - 1)
    with pytest.raises(RuntimeError, match="slot past the cache"):
        ops.paged_write_kv(step.k, step.v, k_cache, v_cache, m.slot_mapping + k_cache.numel())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("causal", [True, False])
def test_without_a_cache_matches_the_reference(ops, causal, window, dtype):
    """Encoders: no cache, each sequence attends to its own rows (both ways unless causal);
    lengths under, at and over a 128-key tile, head_dim 32 (MiniLM's), GQA 2."""
    lens, num_kv_heads, per_kv, head_dim = [3, 1, 9, 128, 300], 3, 2, 32
    meta = build_attn_metadata(lens, lens, None, 1, causal=causal, sliding_window=window)
    g = torch.Generator().manual_seed(0)
    num_heads, num_tokens = num_kv_heads * per_kv, sum(lens)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=g).to(dtype)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], 1)
    q, k, v = (x.view(num_tokens, -1, head_dim) for x in (q, k, v))
    expected = TorchAttention().forward(q.float(), k.float(), v.float(), None, None, meta, 0.2)
    out = CpuPagedAttention(ops).forward(q, k, v, None, None, meta, 0.2)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=TOLERANCE[dtype], rtol=0)


# -- the engine ---------------------------------------------------------------------------

def greedy_tokens(path, seed: int) -> tuple[dict[str, list[int]], LLMEngine]:
    """40 requests arriving at random steps into a pool too small for them (preemption)."""
    engine = LLMEngine(str(path), EngineConfig(num_kv_blocks=40, block_size=4,
                                               max_num_batched_tokens=24, max_num_seqs=64))
    rng = random.Random(seed)
    pending = [(f"r{i}", [rng.randrange(3, 300) for _ in range(rng.randrange(1, 40))],
                SamplingParams(max_tokens=rng.randrange(1, 24), temperature=0, ignore_eos=True))
               for i in range(40)]
    results = {}
    while pending or engine.has_unfinished_requests():
        for _ in range(rng.randrange(0, 4)):
            if pending:
                engine.add_request(*pending.pop(0))
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.token_ids
    return results, engine


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_engine_greedy_tokens_equal_the_reference_backend(family, tiny_checkpoints, monkeypatch):
    ours, engine = greedy_tokens(tiny_checkpoints[family], seed=5)
    assert isinstance(engine.runner.backend, CpuPagedAttention)
    assert engine.scheduler.num_preemptions > 0
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    theirs, engine = greedy_tokens(tiny_checkpoints[family], seed=5)
    assert isinstance(engine.runner.backend, TorchAttention)
    assert ours == theirs


def test_forked_sequences_copy_the_shared_tail_along_the_block_axis(tiny_llama):
    """n = 3 shares the prompt's blocks; each sibling copies the half-full last block
    (ModelRunner.copy_blocks, along block_axis) before writing to it: greedy, all three
    must be the single completion."""
    def complete(n: int) -> list[list[int]]:
        engine = LLMEngine(str(tiny_llama), EngineConfig(num_kv_blocks=64, block_size=4,
                                                         enable_prefix_caching=False))
        engine.add_request("r", list(range(3, 25)), SamplingParams(n=n, max_tokens=8, temperature=0,
                                                                   ignore_eos=True))
        while engine.has_unfinished_requests():
            outputs = engine.step()
        assert isinstance(engine.runner.backend, CpuPagedAttention)
        return [c.token_ids for c in outputs[0].outputs]

    assert complete(3) == complete(1) * 3


def test_the_encoder_runs_the_op_on_a_cpu():
    runner = EncoderRunner("all-minilm-l6-v2", EncoderConfig(device="cpu"))
    backends = {type(m.backend) for m in runner.model.modules() if isinstance(m, Attention)}
    assert backends == {CpuPagedAttention}
