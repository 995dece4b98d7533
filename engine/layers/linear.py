"""Linear layers that fuse several checkpoint projections into one matmul."""
from __future__ import annotations

import torch
from torch import nn


class MergedLinear(nn.Linear):
    """Projections that read the same input (q/k/v, gate/up) stacked along the output.

    The checkpoint keeps them apart; `load_shard` writes each into its rows.
    """

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool):
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias)
        self.shard_sizes = dict(shard_sizes)
        self.shard_offsets, offset = {}, 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = offset
            offset += size

    def load_shard(self, shard: str, param_name: str, tensor: torch.Tensor) -> None:
        param = getattr(self, param_name)
        offset, size = self.shard_offsets[shard], self.shard_sizes[shard]
        expected = (size, *param.shape[1:])
        if tuple(tensor.shape) != expected:
            raise ValueError(f"shape {tuple(tensor.shape)}, expected {expected}")
        with torch.no_grad():
            param[offset: offset + size].copy_(tensor)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return split_shards(out, self.shard_sizes)


def split_shards(out: torch.Tensor, shard_sizes: dict[str, int]) -> tuple[torch.Tensor, ...]:
    """A merged projection's output, cut back into its parts (q, k, v / gate, up)."""
    return out.split(list(shard_sizes.values()), dim=-1)
