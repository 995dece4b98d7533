"""Decode steps replayed from CUDA graphs captured at fixed batch sizes (CUDA backend only).

A decode step launches hundreds of small kernels; replaying a captured graph launches them
all at once, which is what makes batch-1 decode approach the memory-bandwidth roofline.
A batch of n decodes runs in the graph of the smallest captured size >= n; the padding
sequences have zero keys and write nowhere (slot -1), so they cost a little work and change
nothing. Inputs go through static buffers the graphs were captured on.
"""
from __future__ import annotations

import bisect
import logging

import torch
from torch import nn

from engine.layers.attention import AttnGroup, AttnMetadata

logger = logging.getLogger(__name__)

_CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


class DecodeGraphs:
    def __init__(self, model: nn.Module, max_num_seqs: int, max_blocks_per_seq: int,
                 block_size: int, device: torch.device):
        self.model = model
        self.block_size = block_size
        self.sizes = sorted({s for s in _CAPTURE_SIZES if s < max_num_seqs} | {max_num_seqs})
        largest = self.sizes[-1]
        long = dict(dtype=torch.long, device=device)
        self.input_ids = torch.zeros(largest, **long)
        self.positions = torch.zeros(largest, **long)
        self.slot_mapping = torch.full((largest,), -1, **long)
        self.key_blocks = torch.zeros(largest, max_blocks_per_seq, **long)
        self.seq_lens = torch.zeros(largest, dtype=torch.int32, device=device)
        self.rows = torch.arange(largest, **long)
        self.query_lens = torch.ones(largest, dtype=torch.int32, device=device)
        self.no_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)  # the kernel needs none
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        pool = None
        for size in reversed(self.sizes):              # largest first: the rest reuse its memory
            pool = self._capture(size, pool)
        logger.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    @property
    def max_batch_size(self) -> int:
        return self.sizes[-1]

    def _metadata(self, size: int) -> AttnMetadata:
        group = AttnGroup(
            token_rows=self.rows[:size], query_slots=self.rows[:size],
            key_blocks=self.key_blocks[:size], mask=self.no_mask, seq_lens=self.seq_lens[:size],
            query_lens=self.query_lens[:size], num_seqs=size, max_q=1)
        return AttnMetadata(slot_mapping=self.slot_mapping[:size], block_size=self.block_size,
                            decode=group, prefill=None)

    def _forward(self, size: int) -> torch.Tensor:
        meta = self._metadata(size)
        hidden = self.model(self.input_ids[:size], self.positions[:size], meta)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture(self, size: int, pool):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):                  # warm up: compile and autotune first
            for _ in range(2):
                self._forward(size)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self.logits[size] = self._forward(size)
        self.graphs[size] = graph
        return graph.pool()

    @torch.inference_mode()
    def run(self, token_ids: list[int], positions: list[int], slot_mapping: list[int],
            block_tables: list[list[int]], seq_lens: list[int]) -> torch.Tensor:
        """Logits (n, vocab) for n decodes, one row per sequence, in order."""
        n = len(token_ids)
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        device = self.input_ids.device
        self.input_ids[:n].copy_(torch.tensor(token_ids), non_blocking=True)
        self.positions[:n].copy_(torch.tensor(positions), non_blocking=True)
        self.slot_mapping[:n].copy_(torch.tensor(slot_mapping), non_blocking=True)
        self.seq_lens[:n].copy_(torch.tensor(seq_lens, dtype=torch.int32), non_blocking=True)
        tables = torch.zeros(n, self.key_blocks.shape[1], dtype=torch.long)
        for row, table in enumerate(block_tables):
            tables[row, : len(table)] = torch.tensor(table)
        self.key_blocks[:n].copy_(tables.to(device, non_blocking=True))
        self.slot_mapping[n:size].fill_(-1)            # padding: no keys, no writes
        self.seq_lens[n:size].zero_()
        self.graphs[size].replay()
        return self.logits[size][:n]
