"""attnserve's inference engine: knows nothing of HTTP.

    from engine import LLM, Encoder, SamplingParams
"""
from engine.config import EngineConfig, ModelConfig
from engine.guided import GuidedDecoding
from engine.llm_engine import LLM, LLMEngine
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "ModelConfig", "SamplingParams", "GuidedDecoding", "RequestOutput",
           "CompletionOutput", "Encoder"]
__version__ = "0.1.0"


def __getattr__(name):
    # The encoder stack loads only when asked for.
    if name == "Encoder":
        from engine.encoder_engine import Encoder
        return Encoder
    raise AttributeError(name)
