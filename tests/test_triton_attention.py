"""The CUDA backend's Triton kernels against TorchAttention, the reference.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set below
before the kernels are decorated): small shapes, but every edge the kernel has — contexts
of 1, exactly a block, a block + 1 and long; block sizes 4 and 16; GQA 1, 3, 4; head_dim 64
and 128; split-K partitions; sliding windows; block-table padding. On a GPU the same cases
run compiled, plus bf16 at realistic shapes and a CUDA-graph replay (tests named *_gpu).
"""
import dataclasses
import importlib
import math
import os
import sys

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine.layers import triton_attention as ta  # noqa: E402
from engine.layers.attention import TorchAttention, build_attn_metadata  # noqa: E402

if DEVICE == "cpu" and ta.triton is not None and not ta._INTERPRETED:
    ta = importlib.reload(ta)            # imported before TRITON_INTERPRET was set: redecorate

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 3e-2}


if ta.triton is not None:
    import triton.language as tl

    @ta.triton.jit
    def _probe_kernel(ptr):
        tl.store(ptr + tl.arange(0, 16), tl.full([16], 1.0, tl.float32))


@pytest.fixture(scope="module", autouse=True)
def triton_runs():
    """Skip (with the reason) where Triton is missing or cannot launch a trivial kernel here."""
    if ta.triton is None:
        pytest.skip("triton is not installed")
    try:
        probe = torch.zeros(16, device=DEVICE)
        _probe_kernel[(1,)](probe)
        assert probe.eq(1).all()
    except Exception as exc:              # noqa: BLE001 - any failure here means "cannot run"
        pytest.skip(f"triton cannot run a kernel on {DEVICE}: {type(exc).__name__}: {exc}")


@dataclasses.dataclass
class Batch:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    meta: object


def random_batch(query_lens, seq_lens, *, block_size, num_kv_heads=2, per_kv=1, head_dim=64,
                 dtype=torch.float32, window=None, pad_blocks=0, garbage=float("nan"),
                 device=DEVICE, seed=0) -> Batch:
    """A step over a cache whose blocks are scattered; every slot no sequence owns holds
    `garbage` (NaN: a kernel that reads one fails). pad_blocks extra block-table columns point
    at random blocks, as the padding a CUDA-graph runner adds would."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = [order[sum(blocks_per_seq[:i]): sum(blocks_per_seq[: i + 1])]
              for i in range(len(seq_lens))]
    meta = build_attn_metadata(query_lens, seq_lens, tables, block_size, device,
                               sliding_window=window)
    if pad_blocks:
        meta = dataclasses.replace(meta, decode=_pad_block_table(meta.decode, pad_blocks,
                                                                  num_blocks, block_size, g))
    num_heads, num_tokens = num_kv_heads * per_kv, sum(query_lens)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=g)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g)
    # (K/V, kv_heads, num_blocks, block_size, head_dim): both backends' head-major layout
    caches = torch.full((2, num_kv_heads, num_blocks, block_size, head_dim), garbage)
    # The context cached before this step gets random K/V; the step's new tokens come from k, v.
    cached = [(table[pos // block_size], pos % block_size)
              for table, seq_len, q_len in zip(tables, seq_lens, query_lens)
              for pos in range(seq_len - q_len)]
    if cached:
        blocks, slots = torch.tensor(cached).T
        caches[:, :, blocks, slots] = torch.randn(2, num_kv_heads, len(cached), head_dim, generator=g)
    q, k, v, caches = (t.to(device=device, dtype=dtype) for t in (q, k, v, caches))
    return Batch(q, k, v, caches[0], caches[1], meta)


def _pad_block_table(group, extra, num_blocks, block_size, g):
    b, _, max_q, max_k = group.mask.shape
    padding = torch.randint(0, num_blocks, (b, extra), generator=g).to(group.key_blocks.device)
    no_keys = torch.zeros(b, 1, max_q, extra * block_size, dtype=torch.bool,
                          device=group.mask.device)
    return dataclasses.replace(group, key_blocks=torch.cat([group.key_blocks, padding], 1),
                               mask=torch.cat([group.mask, no_keys], 3))


def reference(batch: Batch, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TorchAttention in fp32 on the same (rounded) inputs, garbage slots zeroed."""
    k_cache, v_cache = (torch.nan_to_num(c.float(), nan=0.0) for c in (batch.k_cache, batch.v_cache))
    out = TorchAttention().forward(batch.q.float(), batch.k.float(), batch.v.float(),
                                   k_cache, v_cache, batch.meta, scale)
    return out, k_cache, v_cache


def run_backend(batch: Batch, scale: float, window=None, **kernel_options) -> torch.Tensor:
    if not kernel_options:
        return ta.CudaAttention(window).forward(batch.q, batch.k, batch.v, batch.k_cache,
                                                batch.v_cache, batch.meta, scale)
    ta.triton_write_kv_cache(batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta.slot_mapping)
    out = torch.full_like(batch.q, float("nan"))
    ta.paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, batch.meta.decode, scale,
                              out, window, **kernel_options)
    return out


def assert_close(batch: Batch, window=None, **kernel_options) -> None:
    scale = batch.q.shape[-1] ** -0.5
    expected, _, _ = reference(batch, scale)
    out = run_backend(batch, scale, window, **kernel_options)
    assert out.dtype == batch.q.dtype
    diff = (out.float() - expected).abs().max().item()
    assert diff < TOLERANCE[batch.q.dtype], f"max abs diff {diff}"


SPLIT = dict(tile_n=16, partition_size=32)     # several partitions even at short contexts


def edge_contexts(block_size: int) -> list[int]:
    return [1, block_size, block_size + 1, 300, 37]


@pytest.mark.parametrize("block_size,per_kv,head_dim,options", [
    (16, 3, 64, {}),
    (4, 1, 128, {}),
    (16, 4, 128, SPLIT),
    (4, 3, 64, SPLIT),
])
def test_decode_matches_reference(block_size, per_kv, head_dim, options):
    contexts = edge_contexts(block_size)
    batch = random_batch([1] * len(contexts), contexts, block_size=block_size, per_kv=per_kv,
                         head_dim=head_dim, pad_blocks=3)
    assert_close(batch, **options)


@pytest.mark.parametrize("enough_programs", [264, 1], ids=["split", "one-pass"])
def test_decode_long_context_default_partitions(enough_programs, monkeypatch):
    # Past DEFAULT_PARTITION_SIZE keys a small grid is split; a grid that fills the GPU is not.
    monkeypatch.setattr(ta, "_ENOUGH_PROGRAMS", enough_programs)
    contexts = [700, 1, 1030, 512, 513]
    batch = random_batch([1] * len(contexts), contexts, block_size=16, per_kv=3, pad_blocks=1)
    assert_close(batch)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", [{}, SPLIT], ids=["one-pass", "split"])
def test_decode_half_precision(dtype, options):
    contexts = edge_contexts(16)
    batch = random_batch([1] * len(contexts), contexts, block_size=16, per_kv=3, dtype=dtype)
    assert_close(batch, **options)


@pytest.mark.parametrize("window", [1, 7, 40])
@pytest.mark.parametrize("options", [{}, SPLIT], ids=["one-pass", "split"])
def test_decode_sliding_window(window, options):
    contexts = [1, 4, 5, 7, 8, 100]
    batch = random_batch([1] * len(contexts), contexts, block_size=4, num_kv_heads=1, per_kv=4,
                         window=window, pad_blocks=2)          # one KV head, as Mistral-tiny
    assert_close(batch, window, **options)


def test_write_kv_cache_skips_negative_slots_and_reads_strided_rows():
    num_kv_heads, head_dim = 3, 64
    # bf16 in, bf16 cache, as the model runs (the interpreter's fp32 -> bf16 cast truncates).
    qkv = torch.randn(5, (4 + 2 * num_kv_heads) * head_dim, device=DEVICE, dtype=torch.bfloat16)
    k = qkv[:, 4 * head_dim: (4 + num_kv_heads) * head_dim].view(5, num_kv_heads, head_dim)
    v = qkv[:, (4 + num_kv_heads) * head_dim:].view(5, num_kv_heads, head_dim)
    k_cache = torch.zeros(num_kv_heads, 4, 4, head_dim, device=DEVICE, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([9, -1, 0, 15, -1], device=DEVICE)
    ta.triton_write_kv_cache(k, v, k_cache, v_cache, slots)
    written = slots >= 0
    flat_k, flat_v = (c.view(num_kv_heads, -1, head_dim).transpose(0, 1) for c in (k_cache, v_cache))
    assert torch.equal(flat_k[slots[written]], k[written])
    assert torch.equal(flat_v[slots[written]], v[written])
    untouched = torch.ones(16, dtype=torch.bool, device=DEVICE)
    untouched[slots[written]] = False
    assert not flat_k[untouched].any() and not flat_v[untouched].any()


@pytest.mark.parametrize("window", [None, 6])
def test_forward_mixed_decode_and_prefill(window):
    # Decodes of 17 and 40 keys; a fresh prompt of 5; a chunk of 9 after 3 cached tokens.
    query_lens, seq_lens = [1, 5, 1, 9], [17, 5, 40, 12]
    batch = random_batch(query_lens, seq_lens, block_size=4, per_kv=3, window=window,
                         garbage=0.0)    # the prefill path's SDPA multiplies masked zeros by V
    scale = 0.125
    expected, k_cache, v_cache = reference(batch, scale)
    num_tokens, num_heads, head_dim = batch.q.shape
    qkv = torch.cat([t.reshape(num_tokens, -1) for t in (batch.q, batch.k, batch.v)], 1)
    q, k, v = qkv.split([num_heads * head_dim, batch.k[0].numel(), batch.v[0].numel()], 1)
    out = ta.CudaAttention(window).forward(                  # strided views, as the model passes
        q.view_as(batch.q), k.view_as(batch.k), v.view_as(batch.v), batch.k_cache,
        batch.v_cache, batch.meta, scale)
    assert (out - expected).abs().max().item() < 1e-4
    assert torch.equal(batch.k_cache, k_cache) and torch.equal(batch.v_cache, v_cache)


def test_cache_layout_is_the_references():
    # The prefill path runs the reference's gather on this backend's cache, and the runner's
    # copy-on-write uses block_axis: both need the same layout.
    args = (10, 16, 3, 64)
    assert ta.CudaAttention().kv_cache_shape(*args) == TorchAttention().kv_cache_shape(*args)
    assert ta.CudaAttention.block_axis == TorchAttention.block_axis


def test_forward_without_cache():
    lens = [1, 6, 1]
    meta = build_attn_metadata(lens, lens, None, 1, DEVICE)
    q, k, v = (torch.randn(8, h, 64, device=DEVICE) for h in (4, 2, 2))
    expected = TorchAttention().forward(q, k, v, None, None, meta, 0.125)
    out = ta.CudaAttention().forward(q, k, v, None, None, meta, 0.125)
    assert (out - expected).abs().max().item() < 1e-4


def test_refuses_unsupported_shapes_clearly():
    assert [d for d in (8, 16, 48, 64, 80, 96, 128, 256) if ta.supports_head_dim(d)] == [16, 64, 128, 256]
    batch = random_batch([1], [5], block_size=4, head_dim=48, garbage=0.0)
    with pytest.raises(ValueError, match="head_dim to be a power of two >= 16, got 48"):
        run_backend(batch, 0.1)
    batch = random_batch([1], [5], block_size=4, head_dim=64, garbage=0.0)
    with pytest.raises(ValueError, match="multiple of tile_n"):
        run_backend(batch, 0.1, tile_n=16, partition_size=24)


def test_module_imports_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)         # import triton -> ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.find_spec("engine.layers.triton_attention")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(RuntimeError, match="needs triton"):
        module.CudaAttention()


# -- on a GPU only ------------------------------------------------------------------------

@requires_gpu
@pytest.mark.parametrize("num_kv_heads,per_kv,head_dim,window", [
    (8, 4, 128, None),          # Llama-3-8B-like
    (3, 3, 64, None),           # SmolLM2-135M
    (8, 4, 128, 1000),          # Mistral-like window
])
def test_decode_bf16_realistic_gpu(num_kv_heads, per_kv, head_dim, window):
    g = torch.Generator().manual_seed(1)
    contexts = [1, 16, 17, 4096, *torch.randint(1, 3000, (28,), generator=g).tolist()]
    batch = random_batch([1] * len(contexts), contexts, block_size=16, num_kv_heads=num_kv_heads,
                         per_kv=per_kv, head_dim=head_dim, dtype=torch.bfloat16, window=window,
                         pad_blocks=4, device="cuda")
    assert_close(batch, window)


@requires_gpu
def test_forward_mixed_bf16_gpu():
    batch = random_batch([1, 300, 1, 64], [2000, 300, 513, 1000], block_size=16, num_kv_heads=8,
                         per_kv=4, head_dim=128, dtype=torch.bfloat16, garbage=0.0, device="cuda")
    expected, _, _ = reference(batch, 128 ** -0.5)
    out = ta.CudaAttention().forward(batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache,
                                     batch.meta, 128 ** -0.5)
    assert (out.float() - expected).abs().max().item() < TOLERANCE[torch.bfloat16]


@requires_gpu
def test_decode_replays_in_a_cuda_graph_gpu():
    """No host syncs in the launch: capture once, change the sequence lengths, replay."""
    batch = random_batch([1] * 4, [700, 1, 33, 1024], block_size=16, num_kv_heads=2, per_kv=4,
                         head_dim=128, dtype=torch.bfloat16, garbage=0.0, device="cuda")
    backend, scale = ta.CudaAttention(), 128 ** -0.5
    group = batch.meta.decode
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):                          # compile and warm up off-graph
        backend.forward(batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta, scale)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache,
                              batch.meta, scale)
    new_lens = [500, 1, 20, 1000]
    group.seq_lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
    meta = build_attn_metadata([1] * 4, new_lens, group.key_blocks.tolist(), 16, "cuda")
    graph.replay()
    torch.cuda.synchronize()
    # The graph wrote k, v to the old slots; compare against the reference over the new lengths.
    expected = TorchAttention().forward(
        batch.q.float(), batch.k.float(), batch.v.float(), batch.k_cache.float(),
        batch.v_cache.float(), dataclasses.replace(meta, slot_mapping=batch.meta.slot_mapping),
        scale)
    assert (out.float() - expected).abs().max().item() < TOLERANCE[torch.bfloat16]
