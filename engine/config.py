"""ModelConfig (what a checkpoint is) and EngineConfig (how we run it).

Both are frozen: values found at run time (the number of KV blocks, the device chosen for
"auto") live in the objects that find them and are never written back here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# model_type in config.json -> the model file that implements it.
FAMILIES = {
    "gpt2": "gpt2",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "bert": "bert",
    "mixtral": "moe",
    "qwen2_moe": "moe",
    "olmoe": "moe",
    "t5": "t5",
}


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one we implement."""


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Rotary scaling as Hugging Face names it: "linear" or "llama3"."""

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ("linear", "llama3"):
            raise UnsupportedModelError(
                f"rope_scaling type {self.rope_type!r} is not supported (supported: linear, llama3)")
        if self.factor <= 0:
            raise ValueError(f"rope_scaling factor must be > 0, got {self.factor}")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model_type: str                      # as config.json says: "llama", "qwen2", "gpt2", "bert", ...
    architecture: str                    # e.g. "LlamaForCausalLM", "BertForSequenceClassification"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False               # Qwen2, optional on LLaMA ("attention_bias")
    o_bias: bool = False                 # LLaMA "attention_bias" also biases o_proj
    mlp_bias: bool = False
    sliding_window: int | None = None    # Mistral: each token sees at most this many keys
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    type_vocab_size: int = 0             # BERT token types
    id2label: tuple[str, ...] = ()       # BERT classification head labels, by index
    problem_type: str | None = None      # "multi_label_classification" -> sigmoid scores
    dtype: str | None = None             # the checkpoint's own dtype ("bfloat16", ...)
    # Sparse Mixture-of-Experts (the "moe" family); num_experts 0 is a dense model.
    num_experts: int = 0                 # routed experts per MoE layer
    num_experts_per_tok: int = 0         # top-k: experts each token is routed to
    moe_intermediate_size: int = 0       # each routed expert's hidden width
    norm_topk_prob: bool = False         # renormalize the top-k router weights to sum to 1
    shared_expert_intermediate_size: int = 0   # Qwen2-MoE: an expert every token runs (0: none)
    dense_layers: tuple[int, ...] = ()   # Qwen2-MoE: layers with a plain MLP instead of experts
    qk_norm: bool = False                # OLMoE: RMSNorm over the whole q and k projections
    clip_qkv: float | None = None        # OLMoE: q, k, v clamped to [-clip_qkv, clip_qkv]
    # Encoder-decoder (the "t5" family). num_layers counts the decoder's layers (those the KV
    # pool holds); the encoder input length is capped at max_position_embeddings.
    is_encoder_decoder: bool = False
    num_encoder_layers: int = 0
    decoder_start_token_id: int | None = None    # the decoder's first input (T5: the pad id)
    gated_mlp: bool = False                      # T5 v1.1 / Flan-T5: act(wi_0 x) * wi_1 x
    relative_attention_num_buckets: int = 0      # relative position buckets (T5's bias)
    relative_attention_max_distance: int = 0     # distances past it share the last bucket
    scale_decoder_outputs: bool = False          # T5 v1.0: hidden * d_model**-0.5 before the head

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config {name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of "
                             f"num_kv_heads {self.num_kv_heads}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be > 0, got {self.sliding_window}")
        if self.num_experts:
            _check_experts(self)
        if self.is_encoder_decoder:
            _check_encoder_decoder(self)

    @property
    def family(self) -> str:
        return FAMILIES[self.model_type]

    @property
    def is_causal(self) -> bool:
        return self.family != "bert"

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Build from a Hugging Face config.json dict (transformers 4.x or 5.x layout)."""
        model_type = hf.get("model_type")
        if model_type not in FAMILIES:
            archs = ", ".join(hf.get("architectures") or []) or "unknown architecture"
            raise UnsupportedModelError(
                f"model_type {model_type!r} ({archs}) is not supported; supported model types: "
                f"{', '.join(sorted(FAMILIES))}")
        architecture = (hf.get("architectures") or [_default_architecture(model_type)])[0]
        builder = {"gpt2": _gpt2_fields, "bert": _bert_fields, "moe": _moe_fields, "t5": _t5_fields}.get(
            FAMILIES[model_type], _llama_fields)
        return cls(model_type=model_type, architecture=architecture, **builder(hf),
                   **_token_fields(hf), dtype=hf.get("torch_dtype") or hf.get("dtype"))


def _default_architecture(model_type: str) -> str:
    return {"gpt2": "GPT2LMHeadModel", "bert": "BertModel", "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
            "olmoe": "OlmoeForCausalLM", "t5": "T5ForConditionalGeneration"}[model_type]


def _token_fields(hf: dict[str, Any]) -> dict[str, Any]:
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    return dict(bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids,
                pad_token_id=hf.get("pad_token_id"))


def _gpt2_fields(hf: dict[str, Any]) -> dict[str, Any]:
    hidden = hf["n_embd"]
    return dict(
        vocab_size=hf["vocab_size"], hidden_size=hidden, num_layers=hf["n_layer"],
        num_heads=hf["n_head"], num_kv_heads=hf["n_head"], head_dim=hidden // hf["n_head"],
        intermediate_size=hf.get("n_inner") or 4 * hidden,
        max_position_embeddings=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        hidden_act=hf.get("activation_function", "gelu_new"),
        tie_word_embeddings=hf.get("tie_word_embeddings", True))


def _llama_fields(hf: dict[str, Any]) -> dict[str, Any]:
    num_heads = hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or {}
    # transformers 5 keeps theta and scaling in "rope_parameters"; 4.x at the top level.
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    attention_bias = hf.get("attention_bias", False)
    return dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6), hidden_act=hf.get("hidden_act", "silu"),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_scaling=_rope_scaling(scaling),
        qkv_bias=hf["model_type"] == "qwen2" or attention_bias, o_bias=attention_bias,
        mlp_bias=hf.get("mlp_bias", False), sliding_window=_sliding_window(hf),
        tie_word_embeddings=hf.get("tie_word_embeddings", False))


def _rope_scaling(scaling: dict[str, Any] | None) -> RopeScaling | None:
    if not scaling:
        return None
    rope_type = scaling.get("rope_type") or scaling.get("type")
    if rope_type == "default":
        return None
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return RopeScaling(rope_type=rope_type, **{k: scaling[k] for k in keys if k in scaling})


def _sliding_window(hf: dict[str, Any]) -> int | None:
    window = hf.get("sliding_window")
    if hf["model_type"] in ("mistral", "mixtral"):
        return window
    if hf["model_type"] in ("qwen2", "qwen2_moe") and hf.get("use_sliding_window") and window:
        # Qwen2 slides only on some layers; one window per model is all we implement.
        raise UnsupportedModelError(f"{hf['model_type']} with use_sliding_window=true is not supported")
    return None


def _moe_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """Mixtral, Qwen2-MoE, OLMoE: the LLaMA fields plus their experts and routing."""
    fields = _llama_fields(hf)
    model_type = hf["model_type"]
    if model_type == "mixtral":                # renormalizes its top-k always; no flag
        return fields | dict(num_experts=hf["num_local_experts"], num_experts_per_tok=hf["num_experts_per_tok"],
                             moe_intermediate_size=hf["intermediate_size"], norm_topk_prob=True)
    experts = dict(num_experts=hf["num_experts"], num_experts_per_tok=hf["num_experts_per_tok"],
                   norm_topk_prob=bool(hf.get("norm_topk_prob", False)))
    if model_type == "olmoe":
        return fields | experts | dict(moe_intermediate_size=hf["intermediate_size"], qk_norm=True,
                                       clip_qkv=hf.get("clip_qkv"))
    # qwen2_moe: some layers may be dense (mlp_only_layers, or off the decoder_sparse_step)
    step, dense_only = hf.get("decoder_sparse_step") or 1, set(hf.get("mlp_only_layers") or ())
    dense = tuple(i for i in range(fields["num_layers"])
                  if i in dense_only or not hf["num_experts"] or (i + 1) % step)
    return fields | experts | dict(
        moe_intermediate_size=hf["moe_intermediate_size"], dense_layers=dense,
        shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size") or 0,
        qkv_bias=hf.get("qkv_bias", True))      # transformers 4 had no flag: always biased


def _check_experts(config: "ModelConfig") -> None:
    if not 1 <= config.num_experts_per_tok <= config.num_experts:
        raise ValueError(f"num_experts_per_tok must be in [1, num_experts {config.num_experts}], "
                         f"got {config.num_experts_per_tok}")
    if config.moe_intermediate_size <= 0:
        raise ValueError(f"config moe_intermediate_size must be > 0, got {config.moe_intermediate_size}")
    if config.clip_qkv is not None and config.clip_qkv <= 0:
        raise ValueError(f"clip_qkv must be > 0, got {config.clip_qkv}")


def _t5_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """T5 v1.0 (ReLU FFN, tied head read at d_model**-0.5) and v1.1 / Flan-T5 (gated-GELU,
    untied head, no rescale), in transformers 4's and 5's spellings.

    transformers 5 writes tie_word_embeddings: true for every T5 and keeps the v1.0 rescale as
    scale_decoder_outputs; a head of its own is then only seen as lm_head.weight in the
    checkpoint, so the loader settles tie_word_embeddings from the weights
    (engine/loader.py)."""
    architectures = hf.get("architectures") or ["T5ForConditionalGeneration"]
    if architectures[0] != "T5ForConditionalGeneration":
        raise UnsupportedModelError(f"t5 architecture {architectures[0]!r} is not supported "
                                    "(supported: T5ForConditionalGeneration)")
    act = hf.get("feed_forward_proj", "relu").split("-")
    if len(act) > 2 or (len(act) == 2 and act[0] != "gated"):
        raise UnsupportedModelError(f"t5 feed_forward_proj {hf['feed_forward_proj']!r} is not supported "
                                    "(expected 'ACT' or 'gated-ACT')")
    hidden_act = "gelu_new" if act == ["gated", "gelu"] else act[-1]
    tied = hf.get("tie_word_embeddings", True) is not False
    start = hf.get("decoder_start_token_id")
    return dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["d_model"],
        num_layers=hf.get("num_decoder_layers") or hf["num_layers"], num_encoder_layers=hf["num_layers"],
        num_heads=hf["num_heads"], num_kv_heads=hf["num_heads"], head_dim=hf["d_kv"],
        intermediate_size=hf["d_ff"], max_position_embeddings=hf.get("n_positions") or 512,
        norm_eps=hf.get("layer_norm_epsilon", 1e-6), hidden_act=hidden_act, gated_mlp=len(act) == 2,
        tie_word_embeddings=tied, scale_decoder_outputs=hf.get("scale_decoder_outputs", tied),
        is_encoder_decoder=True,
        decoder_start_token_id=start if start is not None else hf.get("pad_token_id", 0),
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128))


def _check_encoder_decoder(config: "ModelConfig") -> None:
    if config.decoder_start_token_id is None or not 0 <= config.decoder_start_token_id < config.vocab_size:
        raise ValueError(f"decoder_start_token_id must be a token id in [0, {config.vocab_size}), "
                         f"got {config.decoder_start_token_id}")
    if config.num_encoder_layers <= 0:
        raise ValueError(f"config num_encoder_layers must be > 0, got {config.num_encoder_layers}")
    # Buckets split in exact and logarithmic halves (the encoder's halved again by direction):
    # each part needs a bucket, and the logarithmic part a range beyond the exact one.
    buckets, distance = config.relative_attention_num_buckets, config.relative_attention_max_distance
    if buckets < 4 or distance <= buckets // 2:
        raise ValueError("relative_attention_num_buckets must be >= 4 and relative_attention_max_distance "
                         f"above half of it, got {buckets} and {distance}")


def _bert_fields(hf: dict[str, Any]) -> dict[str, Any]:
    id2label = hf.get("id2label") or {}
    labels = tuple(str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(len(id2label)))
    num_heads = hf["num_attention_heads"]
    return dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=num_heads, num_kv_heads=num_heads,
        head_dim=hf["hidden_size"] // num_heads, intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 512),
        norm_eps=hf.get("layer_norm_eps", 1e-12), hidden_act=hf.get("hidden_act", "gelu"),
        type_vocab_size=hf.get("type_vocab_size", 2), id2label=labels,
        problem_type=hf.get("problem_type"), tie_word_embeddings=True)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How the engine runs a model. Memory and batch bounds, device, dtype."""

    device: str = "auto"                 # "auto" | "cpu" | "cuda"
    dtype: str = "auto"                  # "auto" | "float32" | "bfloat16" | "float16"
    block_size: int = 16                 # tokens per KV block
    kv_cache_memory: int | str | None = None   # bytes ("2GiB" too) for the KV pool; None: by device
    num_kv_blocks: int | None = None     # overrides kv_cache_memory when set (tests)
    max_num_seqs: int = 64               # sequences per step
    max_num_batched_tokens: int = 512    # tokens per step (decode + prefill chunks)
    max_prefill_tokens: int | None = None  # prompt tokens per step while decodes run; None: by device
    max_model_len: int | None = None     # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    enforce_eager: bool = False          # CUDA: never replay decode steps from CUDA graphs
    num_threads: int | None = None       # torch intra-op threads on CPU; None: all cores
    quantization: str = "auto"           # auto | none | int8 | int4 (engine/quantization.py)
    tensor_parallel_size: int = 1        # ranks the model is split over (engine/distributed.py)
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.kv_cache_memory, str):
            object.__setattr__(self, "kv_cache_memory", parse_bytes(self.kv_cache_memory))
        if self.quantization is None:            # the old spelling of "none"
            object.__setattr__(self, "quantization", "none")
        if self.quantization not in ("auto", "none", "int8", "int4"):
            raise ValueError("quantization must be auto, none, int8 or int4, "
                             f"got {self.quantization!r}")
        _check_device_and_dtype(self.device, self.dtype)
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_prefill_tokens is not None and self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {self.max_prefill_tokens}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")


@dataclass(frozen=True, slots=True)
class EncoderConfig:
    """How an encoder runs: device, dtype and its dynamic batching."""

    device: str = "auto"                 # "auto" | "cpu" | "cuda"
    dtype: str = "auto"                  # "auto" | "float32" | "bfloat16" | "float16"
    max_batch_tokens: int = 16384        # tokens (padding included) in one batch
    max_batch_size: int = 128            # inputs in one batch
    batch_wait_ms: float = 2.0           # longest an input waits for others to fill its batch
    max_queue: int = 4096                # queued inputs beyond which submits are refused
    max_inputs_per_request: int = 2048
    num_workers: int | None = None       # threads running batches; None: on a CPU one per core, up to 4
    num_threads: int | None = None       # torch intra-op threads of each worker on CPU; None: the cores shared out

    def __post_init__(self):
        _check_device_and_dtype(self.device, self.dtype)
        for name in ("max_batch_tokens", "max_batch_size", "max_queue", "max_inputs_per_request"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms}")
        for name in ("num_workers", "num_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < self.max_inputs_per_request:
            raise ValueError(f"max_queue {self.max_queue} is below max_inputs_per_request "
                             f"{self.max_inputs_per_request}: a full request could never be queued")


def _check_device_and_dtype(device: str, dtype: str) -> None:
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")


def read_json_file(path: Path) -> Any:
    """A checkpoint's JSON file ({} when it is absent)."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def parse_bytes(text: str | int) -> int:
    """"2GiB" -> 2147483648; plain integers are bytes."""
    if isinstance(text, int):
        return text
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
             "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "b": 1}
    cleaned = text.strip().lower().replace(" ", "")
    for unit, scale in units.items():
        if cleaned.endswith(unit):
            return int(float(cleaned[: -len(unit)]) * scale)
    return int(cleaned)

