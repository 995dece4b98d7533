"""Model families, by the `family` of their ModelConfig, and what the loader and the runner
rely on in each: `CheckpointModel` (every model) and `CausalLM` (generation models)."""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from engine.config import ModelConfig
from engine.layers.attention import AttnMetadata
from engine.models.bert import BertModel
from engine.models.gpt2 import GPT2LMHeadModel
from engine.models.llama import LlamaForCausalLM
from engine.models.moe import MoeForCausalLM
from engine.models.t5 import T5ForConditionalGeneration


class CheckpointModel(Protocol):
    """What engine/loader.py needs to fill a model from a checkpoint."""

    config: ModelConfig
    packed_modules: dict[str, str]          # checkpoint projection -> the fused module holding it
    transposed_weights: tuple[str, ...]     # checkpoint weights stored (in, out): GPT-2's Conv1D
    tensor_parallel: dict[str, str]         # module name -> how it splits over ranks (engine/layers/parallel.py)
    partial_sums: str                       # regex: modules whose outputs are summed over ranks

    def checkpoint_name(self, name: str) -> str | None:
        """Our parameter name for a checkpoint tensor; None for tensors we do not load."""


class CausalLM(CheckpointModel, Protocol):
    """What engine/model_runner.py (and quantization) need of a generation model."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttnMetadata) -> torch.Tensor:
        """input_ids, positions: (num_tokens,) -> hidden states (num_tokens, hidden). An
        encoder-decoder model (T5) takes a Seq2SeqMetadata: the decoder's AttnMetadata and its
        step's encoder inputs (engine/seq2seq.py)."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(num_rows, hidden) -> (num_rows, vocab)."""

    def get_input_embeddings(self) -> nn.Embedding: ...


MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "bert": BertModel,
    "gpt2": GPT2LMHeadModel,
    "llama": LlamaForCausalLM,
    "moe": MoeForCausalLM,
    "t5": T5ForConditionalGeneration,
}


def model_class(config: ModelConfig) -> type[nn.Module]:
    return MODEL_CLASSES[config.family]
