"""Which weights run quantized (EngineConfig.quantization), decided once per engine, and the
module swaps that make it so. Models are built as float models and never know: their
nn.Linear / nn.Embedding modules are replaced from outside (STYLE.md 3 and 18).

    auto   a GGUF's Q4_0 / Q4_1 / Q8_0 matrices stay blocks (engine/layers/quantized_linear.py)
           on a CPU whose SIMD kernels load (AVX-512 VNNI or AVX2 build); everything else — HF
           checkpoints, F16 or K-quant GGUF tensors, CUDA, CPUs with neither — runs as "none".
    none   every weight float: the exact, batch-invariant reference.
    int8   every linear layer and the LM head quantized at load to Q8_0 blocks (a GGUF is
           dequantized first); the embedding lookup keeps its float rows.
    int4   the same with Q4_1 blocks (min and scale per 32); the LM head stays Q8_0.

Activations stay fp32 on every CPU kind: the kernels quantize them to int8 per block
themselves, so a bf16 activation dtype would buy nothing here (and could not be measured on
a CPU without native bf16).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from engine import kernels as cpu_kernels
from engine.layers.quant_blocks import BlockRows
from engine.layers.quantized_linear import QuantizedEmbedding, QuantizedLinear, quantizable

logger = logging.getLogger(__name__)

MODES = ("auto", "none", "int8", "int4")
# The LM head is Q8_0 in both modes: on SmolLM2 a Q4_1 head cost +8% perplexity to save ~40%
# of the head's time; Q8_0 costs under 1% (BENCHMARKS.md).
LM_HEAD_BITS = 8


@dataclass(frozen=True, slots=True)
class QuantizationPlan:
    mode: str                              # "none" | "gguf" | "int8" | "int4"
    kernels: ModuleType | None = None      # the C++ build that multiplies the blocks

    @property
    def gguf_kernels(self) -> ModuleType | None:
        """The kernels a GGUF's blocks are kept for; None: dequantize them at load."""
        return self.kernels if self.mode == "gguf" else None


@dataclass(frozen=True, slots=True)
class QuantizationSummary:
    """What runs quantized, for logs and /info."""

    mode: str                              # "none" | "gguf" | "int8" | "int4"
    linear_formats: tuple[str, ...] = ()   # each block format with its count, e.g. "210 Q4_1"
    lm_head: str | None = None             # the head's block format (None: float)
    embedding: str | None = None           # the lookup's block format (None: float)
    kernels: str | None = None             # "avx512" | "avx2" | "baseline"

    def __str__(self) -> str:
        if self.mode == "none":
            return "none: float weights"
        parts = [f"{self.mode}: linears {', '.join(self.linear_formats) or 'none'}",
                 f"lm head {self.lm_head or 'float'}",
                 f"embedding {self.embedding + ' dequantized on lookup' if self.embedding else 'float'}",
                 f"{self.kernels} kernels, int8 activations per block of 32"]
        return "; ".join(parts)


def plan_quantization(requested: str, checkpoint, device: torch.device) -> QuantizationPlan:
    """The plan for EngineConfig.quantization on this checkpoint and device."""
    if requested == "none":
        return QuantizationPlan("none")
    if requested == "auto":
        return _plan_auto(checkpoint, device)
    if device.type != "cpu":
        raise ValueError(f"quantization {requested} runs on the CPU (got device {device.type})")
    kernels = cpu_kernels.load()
    if kernels is None:
        raise ValueError(f"quantization {requested} needs the C++ CPU kernels, which did not "
                         "build or load here (see the log)")
    if kernels.isa == "baseline":
        logger.warning("quantization %s on a CPU without AVX2: the portable kernels are many "
                       "times slower than float32", requested)
    return QuantizationPlan(requested, kernels)


def _plan_auto(checkpoint, device: torch.device) -> QuantizationPlan:
    if device.type != "cpu" or not checkpoint.is_gguf:
        return QuantizationPlan("none")
    from engine.gguf_file import has_block_tensors
    if not has_block_tensors(checkpoint.path):
        return QuantizationPlan("none")
    kernels = cpu_kernels.load()
    if kernels is None or kernels.isa == "baseline":     # portable kernels lose to float32
        return QuantizationPlan("none")
    return QuantizationPlan("gguf", kernels)


def quantize_model(model: nn.Module, plan: QuantizationPlan) -> nn.Module:
    """int8 / int4: swap every nn.Linear whose rows split into blocks, and the LM head (tied
    or not), for a QuantizedLinear. Other plans leave the model as it is."""
    if plan.mode not in ("int8", "int4"):
        return model
    bits = 8 if plan.mode == "int8" else 4
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and quantizable(child):
                head = parent is model and name == "lm_head"
                layer_bits = LM_HEAD_BITS if head else bits
                setattr(parent, name, QuantizedLinear.from_linear(child, layer_bits, plan.kernels))
    if getattr(model, "lm_head", None) is None:       # tied: the head reads the embedding matrix
        weight = model.get_input_embeddings().weight
        rows = BlockRows.quantize(weight, LM_HEAD_BITS)
        model.lm_head = QuantizedLinear.from_rows(rows, None, plan.kernels)
    return model


def swap_in_blocks(model: nn.Module, blocks: dict[str, BlockRows], kernels: ModuleType,
                   dtype: torch.dtype) -> None:
    """Replace each module whose weight the loader kept as blocks.

    `blocks` maps the loader's keys, "<module>.weight" or "<merged module>.weight:<shard>", to
    their rows. A merged module becomes one QuantizedLinear when all its shards are blocks of
    formats that mix (Q4_0 with Q4_1); otherwise its blocks are dequantized into its float
    weight. A tied model's LM head reads the quantized embedding's blocks."""
    by_module: dict[str, dict[str | None, BlockRows]] = defaultdict(dict)
    for key, rows in blocks.items():
        param, _, shard = key.partition(":")
        by_module[param.removesuffix(".weight")][shard or None] = rows
    for module_name, shards in by_module.items():
        module = model.get_submodule(module_name)
        if isinstance(module, nn.Embedding):
            embedding = QuantizedEmbedding(shards[None].pack(), kernels, dtype)
            _set_submodule(model, module_name, embedding)
            if getattr(model, "lm_head", None) is None:
                model.lm_head = embedding.tied_head()
            continue
        rows = shards[None] if None in shards else _merged_rows(module, shards)
        if rows is None:
            _dequantize_into(module, shards)
            continue
        _set_submodule(model, module_name, QuantizedLinear.from_rows(
            rows, module.bias, kernels, getattr(module, "shard_sizes", None)))


def summarize(model: nn.Module, plan: QuantizationPlan) -> QuantizationSummary:
    if plan.mode == "none":
        return QuantizationSummary("none")
    head = getattr(model, "lm_head", None)
    counts: dict[str, int] = defaultdict(int)
    for module in model.modules():
        if isinstance(module, QuantizedLinear) and module is not head:
            counts[module.format] += 1
    embedding = model.get_input_embeddings()
    return QuantizationSummary(
        plan.mode, tuple(f"{n} {fmt}" for fmt, n in sorted(counts.items())),
        head.format if isinstance(head, QuantizedLinear) else None,
        embedding.format if isinstance(embedding, QuantizedEmbedding) else None,
        plan.kernels.isa)


def _merged_rows(module: nn.Module, shards: dict[str | None, BlockRows]) -> BlockRows | None:
    order = list(getattr(module, "shard_sizes", {}))
    if sorted(order) != sorted(shards):              # some shards arrived as floats
        return None
    return BlockRows.cat([shards[name] for name in order])


def _dequantize_into(module: nn.Module, shards: dict[str | None, BlockRows]) -> None:
    with torch.no_grad():
        for shard, rows in shards.items():
            if shard is None:
                module.weight.copy_(rows.dequantize())
            else:
                module.load_shard(shard, "weight", rows.dequantize())


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
