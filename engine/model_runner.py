"""The model runner: owns the KV pool, turns a ScheduledBatch into tensors, runs the model.

The pool is one tensor (2, num_layers, *layout), the layout being what the attention
backend asks for (e.g. (num_kv_heads, num_blocks, block_size, head_dim)); each attention
layer is handed its slices of K and V.
"""
from __future__ import annotations

import logging

import torch

from engine import kernels
from engine.config import EngineConfig, ModelConfig
from engine.kv_cache import ceil_div
from engine.layers.attention import (Attention, AttentionBackend, AttnMetadata, TorchAttention,
                                    build_attn_metadata)
from engine.layers.cpu_attention import CpuPagedAttention
from engine.layers.decoder_stack import use_fused_stack
from engine.layers.fused import use_fused_ops
from engine.models import CausalLM
from engine.scheduler import ScheduledBatch
from engine.seq2seq import Seq2SeqMetadata, build_seq2seq_metadata

logger = logging.getLogger(__name__)

_DEFAULT_CPU_KV_BYTES = 2 * 2**30
_GPU_MEMORY_UTILIZATION = 0.85


def select_backend(config: ModelConfig, device: torch.device) -> AttentionBackend:
    """The one place the attention implementation is chosen: Triton kernels on CUDA when the
    head size suits them, our C++ op on a CPU when it builds, the PyTorch reference elsewhere.
    Encoder-decoder models (T5) run on the reference's cache layout on every device: they add
    a learned relative position bias to every score, which neither the C++ op nor the Triton
    kernels take (engine/layers/relative_position.py)."""
    if config.is_encoder_decoder:
        logger.info("attention: TorchAttention layout with T5's position bias (encoder-decoder)")
        return TorchAttention()
    if device.type == "cuda":
        from engine.layers import triton_attention  # CPU-only installs never import triton
        if triton_attention.supports_head_dim(config.head_dim):
            return triton_attention.CudaAttention(sliding_window=config.sliding_window)
        logger.warning("head_dim %d has no Triton kernel; using the PyTorch attention", config.head_dim)
    if device.type == "cpu":
        ops = kernels.load()
        if ops is not None:
            logger.info("attention: CpuPagedAttention (%s build)", ops.isa)
            return CpuPagedAttention(ops)
        logger.info("attention: TorchAttention (no CPU kernels)")
    return TorchAttention()


class ModelRunner:
    def __init__(self, model: CausalLM, model_config: ModelConfig, engine_config: EngineConfig,
                 device: torch.device, dtype: torch.dtype):
        self.model = model
        self.model_config = model_config
        self.config = engine_config
        self.device, self.dtype = device, dtype
        self.block_size = engine_config.block_size
        self.num_blocks = self._decide_num_blocks()
        self.backend = select_backend(model_config, device)
        self.cpu_kernels = self._cpu_kernels()
        if self.cpu_kernels is not None:
            logger.info("fused CPU ops: %d modules", use_fused_ops(model, self.cpu_kernels))
        self.kv_cache = self._allocate_kv_cache()
        if self.cpu_kernels is not None:
            layers = use_fused_stack(model, self.cpu_kernels)
            logger.info("decoder layers run %s", f"by one C++ call ({layers} layers)" if layers else "in Python")
        self.graphs = None                  # DecodeGraphs once captured (CUDA only)

    def _cpu_kernels(self):
        """Our CPU kernels when this runner uses them, for the small ops and the sampler: with
        the C++ attention op; and for an encoder-decoder on a CPU, whose attention stays the
        reference (the op takes no position bias) while its norms can still run fused."""
        if isinstance(self.backend, CpuPagedAttention):
            return self.backend.ops
        if self.model_config.is_encoder_decoder and self.device.type == "cpu":
            return kernels.load()
        return None

    @property
    def bytes_per_block(self) -> int:
        c = self.model_config
        elements = 2 * c.num_layers * self.block_size * c.num_kv_heads * c.head_dim
        return elements * torch.finfo(self.dtype).bits // 8

    def _decide_num_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        budget = self.config.kv_cache_memory
        if budget is None and self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(free - (1 - _GPU_MEMORY_UTILIZATION) * total)
        budget = budget if budget is not None else _DEFAULT_CPU_KV_BYTES
        num_blocks = budget // self.bytes_per_block
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory of {budget} bytes holds no block of "
                             f"{self.bytes_per_block} bytes")
        return num_blocks

    def _allocate_kv_cache(self) -> torch.Tensor:
        c = self.model_config
        layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        shape = self.backend.kv_cache_shape(self.num_blocks, self.block_size, c.num_kv_heads, c.head_dim)
        # Zeroed, not empty: padding keys read stale slots, and 0 * NaN garbage would be NaN.
        kv_cache = torch.zeros(2, c.num_layers, *shape, dtype=self.dtype, device=self.device)
        for i, attn in enumerate(layers):
            attn.backend = self.backend
            attn.k_cache, attn.v_cache = kv_cache[0, i], kv_cache[1, i]
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB) on %s", self.num_blocks,
                    self.block_size, kv_cache.numel() * kv_cache.element_size() / 2**20, self.device)
        return kv_cache

    def capture_cuda_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        """Replay decode steps from CUDA graphs from now on (CUDA backend only)."""
        from engine.cuda_graphs import DecodeGraphs
        max_blocks = ceil_div(max_model_len, self.block_size)
        self.graphs = DecodeGraphs(self.model, max_num_seqs, max_blocks, self.block_size, self.device)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Run one step; returns logits (len(batch.samples), vocab), one row per sample."""
        if batch.blocks_to_copy:
            self.copy_blocks(batch.blocks_to_copy)
        if self.graphs is not None and self._is_graph_decode(batch):
            return self._replay_decode(batch)
        hidden = self._forward(batch)
        return self.model.compute_logits(hidden[self._sample_rows(batch)])

    @torch.inference_mode()
    def execute_with_hidden(self, batch: ScheduledBatch,
                            seq_indices: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """execute(), and the hidden states of every token batch.seqs[j] computes this step, for
        each j in seq_indices (prompt logprobs: compute_logits of them, a slice at a time)."""
        if batch.blocks_to_copy:
            self.copy_blocks(batch.blocks_to_copy)
        hidden = self._forward(batch)
        ends = torch.tensor(batch.num_new_tokens).cumsum(0).tolist()
        rows = [hidden[ends[j] - batch.num_new_tokens[j]: ends[j]] for j in seq_indices]
        return self.model.compute_logits(hidden[self._sample_rows(batch)]), rows

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden)

    def _forward(self, batch: ScheduledBatch) -> torch.Tensor:
        input_ids, positions, meta = self.prepare_inputs(batch)
        return self.model(input_ids, positions, meta)                 # (num_tokens, hidden)

    def _sample_rows(self, batch: ScheduledBatch) -> torch.Tensor:
        last_rows = torch.tensor(batch.num_new_tokens).cumsum(0) - 1
        return last_rows[[index for _, index in batch.samples]].to(self.device)

    def _is_graph_decode(self, batch: ScheduledBatch) -> bool:
        return (len(batch.seqs) <= self.graphs.max_batch_size and len(batch.samples) == len(batch.seqs)
                and all(n == 1 for n in batch.num_new_tokens))

    def _replay_decode(self, batch: ScheduledBatch) -> torch.Tensor:
        positions = [seq.num_computed_tokens for seq in batch.seqs]
        logits = self.graphs.run(
            token_ids=[seq.token_ids[pos] for seq, pos in zip(batch.seqs, positions)],
            positions=positions,
            slot_mapping=[seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size
                          for seq, pos in zip(batch.seqs, positions)],
            block_tables=[seq.block_table for seq in batch.seqs],
            seq_lens=[pos + 1 for pos in positions])
        return logits[[index for _, index in batch.samples]]

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: whole blocks, every layer, K and V."""
        sources, targets = (torch.tensor(x, device=self.device) for x in zip(*pairs))
        axis = 2 + self.backend.block_axis                  # past the (K/V, layer) axes
        self.kv_cache.index_copy_(axis, targets, self.kv_cache.index_select(axis, sources))

    def prepare_inputs(self, batch: ScheduledBatch
                       ) -> tuple[torch.Tensor, torch.Tensor, AttnMetadata | Seq2SeqMetadata]:
        token_ids: list[int] = []
        positions: list[int] = []
        seq_lens = []
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            token_ids += seq.token_ids[start: start + num_new]
            positions += range(start, start + num_new)
            seq_lens.append(start + num_new)
        meta = build_attn_metadata(
            batch.num_new_tokens, seq_lens, [seq.block_table for seq in batch.seqs],
            self.block_size, self.device, causal=True,
            sliding_window=self.model_config.sliding_window)
        if self.model_config.is_encoder_decoder:       # the step's encoder inputs and cross blocks
            meta = build_seq2seq_metadata(batch, meta, self.block_size, self.device)
        return (torch.tensor(token_ids, dtype=torch.long, device=self.device),
                torch.tensor(positions, dtype=torch.long, device=self.device), meta)
