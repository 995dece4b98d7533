"""The C++ versions of the small ops between a decoder layer's matmuls (engine/csrc/fused_ops.cpp),
swapped in by the runner on a CPU where our kernels build, as it picks the CPU attention op.

At one decode row a layer ran ~40 eager PyTorch operators of a few microseconds each, as much
time as its quantized matmuls; RMSNorm alone was six of them (a cast, the norm, a cast back,
the weight). Each module here is one call. The PyTorch modules they replace (RMSNorm,
ApplyRotary, SiluAndMul) stay the reference they are tested against.
"""
from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from engine.layers.activations import SiluAndMul
from engine.layers.norm import RMSNorm
from engine.layers.rotary import ApplyRotary


class FusedRMSNorm(nn.Module):
    def __init__(self, norm: nn.Module, kernels: ModuleType):
        super().__init__()
        self.weight, self.eps, self.kernels = norm.weight, norm.eps, kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        return self.kernels.rms_norm(rows, self.weight, self.eps).view(x.shape)


class FusedApplyRotary(nn.Module):
    """Rotates q and k in place (they are views of the step's fresh q/k/v projection)."""

    def __init__(self, head_dim: int, kernels: ModuleType):
        super().__init__()
        self.head_dim, self.kernels = head_dim, kernels

    def forward(self, q, k, cos, sin):
        half = self.head_dim // 2
        self.kernels.rotary_(q, k, cos.view(-1, half), sin.view(-1, half), self.head_dim)
        return q, k


class FusedSiluAndMul(nn.Module):
    def __init__(self, kernels: ModuleType):
        super().__init__()
        self.kernels = kernels

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.kernels.silu_mul(gate_up)


def use_fused_ops(model: nn.Module, kernels: ModuleType) -> int:
    """Swaps every RMSNorm, ApplyRotary and SiluAndMul of `model` for its fused version;
    returns how many were swapped."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            fused = _fused(child, kernels)
            if fused is not None:
                setattr(parent, name, fused)
                swapped += 1
    return swapped


def _fused(module: nn.Module, kernels: ModuleType) -> nn.Module | None:
    if type(module) is RMSNorm:
        return FusedRMSNorm(module, kernels)
    if type(module) is ApplyRotary:
        return FusedApplyRotary(module.head_dim, kernels)
    if type(module) is SiluAndMul:
        return FusedSiluAndMul(kernels)
    return None
