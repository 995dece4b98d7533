"""Activation functions by their Hugging Face config names (`hidden_act`, `activation_function`)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import UnsupportedModelError


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "relu": F.relu,
    "silu": F.silu,
}


class SiluAndMul(nn.Module):
    """SwiGLU's gating: silu(gate) * up, for gate_up = [gate | up] along the last axis."""

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


def activation(name: str, family: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise UnsupportedModelError(f"{family} activation {name!r} is not supported "
                                    f"(supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]
