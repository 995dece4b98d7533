"""`quantization="int8"`: weight-only int8 for every linear layer and the LM head, on the CPU.

Weights are quantized once, symmetric, one scale per output row; activations stay bfloat16.
A decode step at small batch is bound by reading weights, and int8 reads half of bf16's bytes
(a quarter of fp32's); PyTorch's int8 kernel reads them no faster per byte, so one stream
gains less than that (BENCHMARKS.md: 27.8 tok/s against bf16's 25.5 and fp32's 14.9). On the
bundled text SmolLM2-135M's perplexity rises ~1% (benchmarks/perplexity.py, which
tests/test_quantization.py holds under 2%). Needs a CPU with native bf16 (AVX-512 BF16 or
AMX); elsewhere the kernel is many times slower than fp32, so the engine refuses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.device import cpu_features
from engine.layers.linear import split_shards

# Up to this many rows the int8 kernel beats bf16 (on a 2-core Zen 4, 576 x 3072: 1 row 2x
# faster, 16 rows 2x slower); beyond, compute binds and the bf16 copy is used.
INT8_KERNEL_MAX_ROWS = 4


class Int8Linear(nn.Module):
    """y = x W^T + b with W quantized to int8, one scale per output row; x in bfloat16.

    A few rows (decode at small batch) are bound by reading W: they go through the int8 kernel,
    which reads half of bf16's bytes. Many rows are bound by compute, where that kernel is slow:
    they multiply a bf16 copy of the same quantized weights.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 shard_sizes: dict[str, int] | None = None):
        super().__init__()
        weight = weight.detach().float()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12)
        qweight = (weight / scales[:, None]).round_().to(torch.int8)
        self.register_buffer("qweight", qweight, persistent=False)
        self.register_buffer("scales", scales.to(torch.bfloat16), persistent=False)
        self.register_buffer("dequantized", (qweight.float() * scales[:, None]).to(torch.bfloat16),
                             persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16),
                             persistent=False)
        self.shard_sizes = shard_sizes           # a MergedLinear's, so split() still works

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        return cls(linear.weight, linear.bias, getattr(linear, "shard_sizes", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        if rows.shape[0] <= INT8_KERNEL_MAX_ROWS:
            out = torch._weight_int8pack_mm(rows, self.qweight, self.scales)
        else:
            out = F.linear(rows, self.dequantized)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*shape[:-1], self.out_features)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return split_shards(out, self.shard_sizes)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Swap every nn.Linear of a causal LM (the LM head too, tied or not) for Int8Linear."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        raise ValueError("quantization int8 runs on the CPU with bfloat16 activations "
                         f"(got device {device.type}, dtype {str(dtype).removeprefix('torch.')})")
    if not cpu_features().has_native_bf16:
        raise ValueError("quantization int8 needs a CPU with native bf16 (AVX-512 BF16 or AMX); "
                         "without, its kernels run slower than float32")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear.from_linear(child))
    if getattr(model, "lm_head", None) is None:   # tied: the head reads the embedding matrix
        model.lm_head = Int8Linear(model.get_input_embeddings().weight, None)
    return model
