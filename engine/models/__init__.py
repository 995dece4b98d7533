"""Model families, by the `family` of their ModelConfig."""
from __future__ import annotations

from torch import nn

from engine.config import ModelConfig
from engine.models.bert import BertModel
from engine.models.gpt2 import GPT2LMHeadModel
from engine.models.llama import LlamaForCausalLM

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "bert": BertModel,
    "gpt2": GPT2LMHeadModel,
    "llama": LlamaForCausalLM,
}


def model_class(config: ModelConfig) -> type[nn.Module]:
    return MODEL_CLASSES[config.family]
