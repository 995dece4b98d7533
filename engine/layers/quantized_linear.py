"""Linear layers and embeddings whose weights stay block-quantized (Q4_0 / Q4_1 / Q8_0).

`QuantizedLinear` multiplies through the C++ kernels (engine/csrc/quant_linear.cpp): each
activation row is quantized to int8 per block of 32, as llama.cpp does, so a weight block's
dot product is integer math and only its scales are fp32. That kernel beat a dense fp32
F.linear at every row count we serve (1 to 512 rows: the AVX-512 VNNI build against fp32 on
the same CPU, the AVX2 build against fp32 limited to AVX2; BENCHMARKS.md), so there is no
dense path to route large batches to, and a row's result never depends on its batch.

`QuantizedEmbedding` dequantizes the rows it looks up, so a tied embedding / LM head keeps
one quantized copy instead of a float32 one beside it.
"""
from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from engine.layers.linear import split_shards
from engine.layers.quant_blocks import BLOCK, BlockRows, PackedBlocks


class _PackedWeight(nn.Module):
    """The buffers of a PackedBlocks, and the kernels' QuantMatrix over them (no copy)."""

    def __init__(self, blocks: PackedBlocks, kernels: ModuleType, bias: torch.Tensor | None = None):
        super().__init__()
        self.format = blocks.format
        self.in_features, self.out_features = blocks.in_features, blocks.out_features
        self.register_buffer("codes", blocks.codes, persistent=False)
        self.register_buffer("scales", blocks.scales, persistent=False)
        self.register_buffer("mins", blocks.mins, persistent=False)
        bias = None if bias is None else bias.detach().float().contiguous()
        self.register_buffer("bias", bias, persistent=False)
        self.kernels = kernels
        self.matrix = kernels.QuantMatrix(blocks.codes, blocks.scales, blocks.mins,
                                          blocks.format_code, blocks.in_features,
                                          blocks.out_features, bias)

    def packed(self) -> PackedBlocks:
        return PackedBlocks(self.format, self.out_features, self.in_features, self.codes,
                            self.scales, self.mins)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight (out_features, in_features) the blocks stand for."""
        return self.matrix.rows(torch.arange(self.out_features))


class QuantizedLinear(_PackedWeight):
    """y = x W^T + b with W in blocks; x of any float dtype (the kernels compute in fp32)."""

    def __init__(self, blocks: PackedBlocks, bias: torch.Tensor | None, kernels: ModuleType,
                 shard_sizes: dict[str, int] | None = None):
        super().__init__(blocks, kernels, bias)
        self.shard_sizes = shard_sizes           # a MergedLinear's, so split() still works

    @classmethod
    def from_rows(cls, rows: BlockRows, bias: torch.Tensor | None, kernels: ModuleType,
                  shard_sizes: dict[str, int] | None = None) -> "QuantizedLinear":
        return cls(rows.pack(), bias, kernels, shard_sizes)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, kernels: ModuleType) -> "QuantizedLinear":
        """Quantize a float nn.Linear (or MergedLinear) to Q8_0 (bits=8) or Q4_1 (bits=4)."""
        rows = BlockRows.quantize(linear.weight, bits)
        return cls.from_rows(rows, linear.bias, kernels, getattr(linear, "shard_sizes", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matrix(x)                    # (..., in_features) -> (..., out_features)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return split_shards(out, self.shard_sizes)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.format}, bias={self.bias is not None}")


class QuantizedEmbedding(_PackedWeight):
    """nn.Embedding over block-quantized rows, dequantized on lookup to `dtype`."""

    def __init__(self, blocks: PackedBlocks, kernels: ModuleType, dtype: torch.dtype):
        super().__init__(blocks, kernels)
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.matrix.rows(ids).to(self.dtype)                     # (*ids.shape, dim)

    def tied_head(self) -> QuantizedLinear:
        """The LM head reading these same blocks (no copy)."""
        return QuantizedLinear(self.packed(), None, self.kernels)

    def extra_repr(self) -> str:
        return f"{self.out_features}, {self.in_features}, {self.format}"


def quantizable(linear: nn.Linear) -> bool:
    """Whether a linear layer's rows split into whole blocks."""
    return linear.in_features % BLOCK == 0
