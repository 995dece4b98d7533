"""One attention layer-call on the CPU: TorchAttention against CpuPagedAttention.

    python -m benchmarks.attention_step [--repeats 15] [--threads N] [--dtype bfloat16] [--cpu-time]

SmolLM2-135M shapes (9 query heads, 3 KV heads, head_dim 64, blocks of 16 tokens), fp32 unless
--dtype says: decode steps at batch 1/16/64 with 256- and 1024-token contexts, and one 512-token prefill
chunk. Each call writes the step's new K/V and attends, as a layer does. Blocks are shuffled
across the pool, and calls cycle through enough layers' caches (>= 256 MiB per backend) that
each reads its keys from memory, not from the last call's L3, as in a 30-layer model.
Last, an encoder batch (all-MiniLM-L6-v2 shapes: 12 heads, head_dim 32; no cache, both ways).

Backends: the reference; the C++ op of this CPU's build; the C++ op of the AVX2 build (if
this CPU has AVX2). Rounds interleave the backends; a row prints the median ms per call and
the reference's time over each op's. Wall-clock time by default; --cpu-time counts the
process's CPU time instead, which on a shared machine leaves out the time spent waiting for
a core (with --threads 1; with more it would count OpenMP's spinning too).
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from dataclasses import dataclass

import torch

from benchmarks.common import machine
from engine import kernels
from engine.device import cpu_features
from engine.layers.attention import TorchAttention, build_attn_metadata
from engine.layers.cpu_attention import CpuPagedAttention

BLOCK_SIZE = 16
MIN_POOL_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Case:
    name: str
    query_lens: list[int]
    seq_lens: list[int]
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    paged: bool = True                 # False: an encoder batch, no cache, bidirectional


CASES = [Case(f"decode b{b} ctx{ctx}", [1] * b, [ctx] * b) for b in (1, 16, 64) for ctx in (256, 1024)]
CASES.append(Case("prefill chunk 512", [512], [512]))
_ENCODER_LENS = [random.Random(0).randrange(90, 160) for _ in range(16)]
CASES.append(Case("encoder 16 x ~128", _ENCODER_LENS, _ENCODER_LENS, 12, 12, 32, paged=False))


class Layers:
    """A backend's per-layer caches and the step's inputs; `call()` runs the next layer."""

    def __init__(self, backend, case: Case, dtype: torch.dtype, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        num_tokens = sum(case.query_lens)
        self.q = torch.randn(num_tokens, case.num_heads, case.head_dim, generator=g).to(dtype)
        self.k, self.v = torch.randn(2, num_tokens, case.num_kv_heads, case.head_dim, generator=g).to(dtype)
        self.scale, self.backend, self.next_layer = case.head_dim ** -0.5, backend, 0
        if not case.paged:
            self.meta = build_attn_metadata(case.query_lens, case.seq_lens, None, 1, causal=False)
            self.caches = [(None, None)]
            return
        blocks_per_seq = [math.ceil(s / BLOCK_SIZE) for s in case.seq_lens]
        num_blocks = sum(blocks_per_seq)
        order = torch.randperm(num_blocks, generator=g).tolist()
        tables = [order[sum(blocks_per_seq[:i]): sum(blocks_per_seq[: i + 1])]
                  for i in range(len(case.seq_lens))]
        self.meta = build_attn_metadata(case.query_lens, case.seq_lens, tables, BLOCK_SIZE)
        shape = backend.kv_cache_shape(num_blocks, BLOCK_SIZE, case.num_kv_heads, case.head_dim)
        num_layers = max(1, math.ceil(MIN_POOL_BYTES / (2 * math.prod(shape) * dtype.itemsize)))
        self.caches = torch.randn(num_layers, 2, *shape, generator=g).to(dtype)  # (layers, K/V, *layout)

    def call(self) -> None:
        k_cache, v_cache = self.caches[self.next_layer]
        self.next_layer = (self.next_layer + 1) % len(self.caches)
        self.backend.forward(self.q, self.k, self.v, k_cache, v_cache, self.meta, self.scale)


def time_calls(layers: Layers, clock=time.perf_counter, min_seconds: float = 0.05) -> float:
    """ms per call over at least min_seconds of back-to-back calls."""
    calls, started = 0, clock()
    while (elapsed := clock() - started) < min_seconds or calls < 3:
        layers.call()
        calls += 1
    return elapsed / calls * 1e3


def backends() -> dict[str, object]:
    found = {"torch": TorchAttention()}
    ops = kernels.load()
    if ops is not None:
        found[f"cpp {ops.isa}"] = CpuPagedAttention(ops)
    if cpu_features().has_avx2 and ops is not None and ops.isa != "avx2":
        found["cpp avx2"] = CpuPagedAttention(kernels.load("avx2"))
    return found


def run_case(case: Case, found: dict[str, object], repeats: int, dtype: torch.dtype,
             clock) -> dict[str, float]:
    layers = {name: Layers(backend, case, dtype) for name, backend in found.items()}
    for each in layers.values():                       # warm up: first touch, thread pool
        time_calls(each, clock, min_seconds=0.02)
    samples = {name: [] for name in layers}
    for _ in range(repeats):                           # interleaved, so noise hits all alike
        for name, each in layers.items():
            samples[name].append(time_calls(each, clock))
    return {name: statistics.median(times) for name, times in samples.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds per case")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--dtype", default="float32", help="of q, k, v and the cache")
    parser.add_argument("--cpu-time", action="store_true", help="time by the process's CPU time")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    found = backends()
    print(f"machine: {machine()}; torch threads {torch.get_num_threads()}")
    print(f"cpu flags: {', '.join(sorted(cpu_features().flags))}")
    print(f"{args.dtype}, 9 heads / 3 KV heads, head_dim 64, block {BLOCK_SIZE} (the encoder: 12 / 12 / 32); "
          f"median {'CPU' if args.cpu_time else 'wall-clock'} ms per layer-call of {args.repeats} rounds")
    ops_names = [name for name in found if name != "torch"]
    header = f"{'case':<22}" + "".join(f"{name:>12}" for name in found)
    print(header + "".join(f"{'torch/' + name.removeprefix('cpp '):>14}" for name in ops_names))
    clock = time.process_time if args.cpu_time else time.perf_counter
    for case in CASES:
        ms = run_case(case, found, args.repeats, getattr(torch, args.dtype), clock)
        row = f"{case.name:<22}" + "".join(f"{ms[name]:>12.3f}" for name in found)
        print(row + "".join(f"{ms['torch'] / ms[name]:>13.1f}x" for name in ops_names), flush=True)


if __name__ == "__main__":
    main()
