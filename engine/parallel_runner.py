"""One tensor-parallel rank's model runner, its collectives, and the step broadcast.

Rank 0 owns the scheduler, block manager and sampler. Each step it sends the step's inputs
to the other ranks in one broadcast of one int32 buffer, then every rank runs the same
forward on its shard (the all-reduces inside are the layers' own, engine/layers/parallel.py)
and the logits, split by vocabulary, are gathered on rank 0:

    rank 0:  schedule ── broadcast(step) ── forward ── gather(logits) ── sample
    rank r:              broadcast(step) ── forward ── gather(logits)

    buffer: | command, length, S, T, K, C, B, 0 | num_new_tokens[S] seq_lens[S] table_lens[S]
            | token_ids[T] sample_rows[K] copy_from[C] copy_to[C] block_tables[B] |

The buffer keeps its size between steps; a step that does not fit first sends a GROW
header, and both sides reallocate (to the next power of two) before the step itself goes.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.errors import TensorParallelError
from engine.kv_cache import ceil_div
from engine.layers.attention import AttnMetadata, build_attn_metadata
from engine.layers.parallel import TensorShard
from engine.model_runner import ModelRunner
from engine.scheduler import ScheduledBatch

NOOP, STEP, STOP, GROW = range(4)      # commands (NOOP: rank 0's heartbeat while idle)
_HEADER = 8


@dataclass
class CollectiveStats:
    count: int = 0
    seconds: float = 0.0                # host wall-clock inside the call (waiting for peers included)


class Collectives:
    """The ranks' collectives on `device`, each timed. On CUDA the time is the host's (the
    launch) unless `synchronize`, which waits for the device before stopping the clock."""

    def __init__(self, rank: int, size: int, device: torch.device, synchronize: bool = False):
        self.rank, self.size, self.device, self.synchronize = rank, size, device, synchronize
        self.stats = {name: CollectiveStats() for name in ("all_reduce", "broadcast", "gather")}

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place; returns `tensor`."""
        with self._timed("all_reduce"):
            dist.all_reduce(tensor)
        return tensor

    def broadcast(self, tensor: torch.Tensor) -> None:
        with self._timed("broadcast"):
            dist.broadcast(tensor, src=0)

    def gather_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
        """Each rank's (rows, vocab / size) slice -> rank 0's (rows, vocab); None elsewhere."""
        logits = logits.contiguous()
        parts = [torch.empty_like(logits) for _ in range(self.size)] if self.rank == 0 else None
        with self._timed("gather"):
            dist.gather(logits, parts, dst=0)
        return torch.cat(parts, dim=-1)[:, :vocab_size] if parts is not None else None

    def min(self, value: int) -> int:
        """The smallest of the ranks' values."""
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return int(tensor.item())

    def reset_stats(self) -> None:
        for stats in self.stats.values():
            stats.count, stats.seconds = 0, 0.0

    @contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        if self.synchronize and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        stats = self.stats[name]
        stats.count += 1
        stats.seconds += time.perf_counter() - started


@dataclass(frozen=True, slots=True)
class StepInputs:
    """What every rank needs to run one step: plain integers, no sequences."""

    num_new_tokens: list[int]                   # per sequence, in flattening order
    seq_lens: list[int]                         # cached + new tokens, per sequence
    block_tables: list[list[int]]               # each sequence's blocks, up to seq_lens
    token_ids: list[int]                        # the new tokens, sequence after sequence
    sample_rows: list[int]                      # sequences whose last row is sampled (may repeat)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def of(cls, batch: ScheduledBatch, block_size: int) -> "StepInputs":
        token_ids, seq_lens = [], []
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            token_ids += seq.token_ids[start: start + num_new]
            seq_lens.append(start + num_new)
        tables = [seq.block_table[: ceil_div(n, block_size)] for seq, n in zip(batch.seqs, seq_lens)]
        return cls(list(batch.num_new_tokens), seq_lens, tables, token_ids,
                   [index for _, index in batch.samples], list(batch.blocks_to_copy))

    def encode(self, command: int) -> list[int]:
        """The header and payload of the broadcast buffer."""
        pairs = self.blocks_to_copy
        payload = [*self.num_new_tokens, *self.seq_lens, *map(len, self.block_tables), *self.token_ids,
                   *self.sample_rows, *(a for a, _ in pairs), *(b for _, b in pairs),
                   *(block for table in self.block_tables for block in table)]
        counts = [len(self.seq_lens), len(self.token_ids), len(self.sample_rows), len(pairs),
                  sum(map(len, self.block_tables))]
        return [command, len(payload), *counts, 0, *payload]

    @classmethod
    def decode(cls, values: list[int]) -> "StepInputs":
        num_seqs, num_tokens, num_samples, num_copies, _ = values[2:7]
        sizes = [num_seqs] * 3 + [num_tokens, num_samples, num_copies, num_copies]
        parts, start = [], _HEADER
        for size in sizes:
            parts.append(values[start: start + size])
            start += size
        num_new, seq_lens, table_lens, token_ids, sample_rows, copy_from, copy_to = parts
        tables = []
        for size in table_lens:
            tables.append(values[start: start + size])
            start += size
        return cls(num_new, seq_lens, tables, token_ids, sample_rows, list(zip(copy_from, copy_to)))


class StepChannel:
    """Rank 0 -> every rank: one broadcast per step. Rank 0 sends under `lock`, held for the
    whole step (its forward's collectives included), so a heartbeat never comes between."""

    def __init__(self, collectives: Collectives, capacity: int):
        self.collectives = collectives
        self.buffer = torch.zeros(_pow2(capacity), dtype=torch.int32, device=collectives.device)
        self.lock = threading.Lock()
        self.last_sent = time.monotonic()

    def send(self, command: int, inputs: StepInputs | None = None) -> None:
        values = inputs.encode(command) if inputs is not None else [command, 0] + [0] * (_HEADER - 2)
        if len(values) > self.buffer.numel():
            capacity = _pow2(len(values))
            self._broadcast([GROW, capacity] + [0] * (_HEADER - 2))
            self.buffer = torch.zeros(capacity, dtype=torch.int32, device=self.buffer.device)
        self._broadcast(values)
        self.last_sent = time.monotonic()

    def receive(self) -> tuple[int, StepInputs | None]:
        """(command, inputs) from rank 0; blocks until it sends."""
        while True:
            self.collectives.broadcast(self.buffer)
            command, length = self.buffer[:2].tolist()
            if command == GROW:
                self.buffer = torch.zeros(length, dtype=torch.int32, device=self.buffer.device)
                continue
            if command != STEP:
                return command, None
            return command, StepInputs.decode(self.buffer[: _HEADER + length].tolist())

    def _broadcast(self, values: list[int]) -> None:
        self.buffer[: len(values)].copy_(torch.tensor(values, dtype=torch.int32))
        self.collectives.broadcast(self.buffer)


def step_capacity(config: EngineConfig) -> int:
    """The buffer's first size: a full step of tokens and sequences with short block tables
    (a longer step grows it once)."""
    return _HEADER + config.max_num_batched_tokens + 8 * config.max_num_seqs + 64


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class TensorParallelRunner(ModelRunner):
    """A rank's ModelRunner: its shard of the model and of the KV cache (its KV heads; the same
    block ids on every rank). Rank 0's `execute` sends each step through `channel` and runs it;
    the other ranks `run` what they receive. `fail` turns an error on rank 0 into the engine's
    end: after a failed collective the ranks can no longer agree on anything."""

    def __init__(self, model, shard: TensorShard, engine_config: EngineConfig, device: torch.device,
                 dtype: torch.dtype, collectives: Collectives, channel: StepChannel | None = None,
                 fail: Callable[[BaseException], TensorParallelError] | None = None):
        self.collectives, self.channel, self.fail = collectives, channel, fail
        self.vocab_size = shard.config.vocab_size
        super().__init__(model, shard.local_config, engine_config, device, dtype)

    def _decide_num_blocks(self) -> int:
        # Every rank must hold the same block ids: the fewest any rank's memory allows.
        return self.collectives.min(super()._decide_num_blocks())

    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Rank 0: send the step to the other ranks and run it; logits (len(batch.samples), vocab)."""
        inputs = StepInputs.of(batch, self.block_size)
        try:
            with self.channel.lock:
                self.channel.send(STEP, inputs)
                return self.run(inputs)
        except Exception as exc:
            raise self.fail(exc) from exc

    @torch.inference_mode()
    def run(self, inputs: StepInputs) -> torch.Tensor | None:
        """Every rank: one step on its shard; rank 0 gets the whole logits, the others None."""
        if inputs.blocks_to_copy:
            self.copy_blocks(inputs.blocks_to_copy)
        input_ids, positions, meta = self.step_tensors(inputs)
        hidden = self.model(input_ids, positions, meta)               # (num_tokens, hidden)
        if not inputs.sample_rows:
            return hidden.new_empty(0, self.vocab_size) if self.collectives.rank == 0 else None
        last_rows = torch.tensor(inputs.num_new_tokens).cumsum(0) - 1
        rows = last_rows[inputs.sample_rows].to(self.device)
        logits = self.model.compute_logits(hidden[rows])               # (num_samples, vocab / ranks)
        return self.collectives.gather_vocab(logits, self.vocab_size)

    def step_tensors(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor, AttnMetadata]:
        positions = [pos for n, s in zip(inputs.num_new_tokens, inputs.seq_lens) for pos in range(s - n, s)]
        meta = build_attn_metadata(inputs.num_new_tokens, inputs.seq_lens, inputs.block_tables,
                                   self.block_size, self.device, causal=True,
                                   sliding_window=self.model_config.sliding_window)
        return (torch.tensor(inputs.token_ids, dtype=torch.long, device=self.device),
                torch.tensor(positions, dtype=torch.long, device=self.device), meta)
