"""BERT encoders: all-MiniLM, BGE/E5-style embedders, sequence classifiers, masked LMs.

Word + position + token-type embeddings, post-LayerNorm blocks, GELU, bidirectional
attention over a flattened ragged batch (no padding outside attention). Parameter names
follow Hugging Face's BertModel (nested `encoder.layer.N.attention.self...`); q/k/v are
fused into one matmul. The heads are methods: `pool`, `classify`, `mlm_logits`.

A sentence-transformers directory says how token states become one vector per input
(`modules.json`, `1_Pooling/config.json`, `sentence_bert_config.json`); `read_pooling_config`
reads that into a `PoolingConfig`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig, UnsupportedModelError, read_json_file
from engine.layers.activations import activation
from engine.layers.attention import Attention, AttnMetadata
from engine.layers.linear import MergedLinear

# architecture -> head: "pooler" (BertModel), "classifier", "mlm"
HEADS = {"BertModel": "pooler", "BertForSequenceClassification": "classifier",
         "BertForMaskedLM": "mlm", "BertForPreTraining": "mlm"}
POOLING_MODES = ("cls", "mean", "max", "mean_sqrt_len", "lasttoken")


class BertEmbeddings(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(max(config.type_vocab_size, 1), config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)

    def forward(self, input_ids, positions, token_type_ids):
        hidden = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        if token_type_ids is None:   # all type 0: one broadcast row, no index tensor
            hidden = hidden + self.token_type_embeddings.weight[0]
        else:
            hidden = hidden + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(hidden)                                   # (num_tokens, hidden)


class BertSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        size = config.num_heads * config.head_dim
        self.qkv = MergedLinear(config.hidden_size, {"query": size, "key": size, "value": size},
                                bias=True)
        self.attn = Attention(config.num_heads, config.num_heads, config.head_dim)

    def forward(self, hidden, meta: AttnMetadata):
        q, k, v = self.qkv.split(self.qkv(hidden))
        return self.attn(q, k, v, meta)                                 # (num_tokens, hidden)


class BertAddNorm(nn.Module):
    """HF's BertSelfOutput and BertOutput: LayerNorm(dense(x) + residual)."""

    def __init__(self, in_features: int, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertAddNorm(config.hidden_size, config)

    def forward(self, hidden, meta):
        return self.output(self.self(hidden, meta), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act, "BERT")

    def forward(self, x):
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertAddNorm(config.intermediate_size, config)

    def forward(self, hidden, meta):
        hidden = self.attention(hidden, meta)
        return self.output(self.intermediate(hidden), hidden)


class BertEncoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_layers))

    def forward(self, hidden, meta):
        for layer in self.layer:
            hidden = layer(hidden, meta)
        return hidden


class BertTrunk(nn.Module):
    """HF's BertModel: embeddings, encoder and (for BertModel / classifiers) the CLS pooler."""

    def __init__(self, config: ModelConfig, with_pooler: bool):
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = nn.ModuleDict({"dense": nn.Linear(config.hidden_size, config.hidden_size)}
                                    ) if with_pooler else None

    def forward(self, input_ids, positions, meta, token_type_ids):
        return self.encoder(self.embeddings(input_ids, positions, token_type_ids), meta)


class BertMLMHead(nn.Module):
    """HF's cls.predictions without its decoder weight, which is the word embedding (tied)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.transform = nn.ModuleDict({
            "dense": nn.Linear(config.hidden_size, config.hidden_size),
            "LayerNorm": nn.LayerNorm(config.hidden_size, eps=config.norm_eps)})
        self.act = activation(config.hidden_act, "BERT")
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden, word_embeddings: torch.Tensor):
        hidden = self.transform["LayerNorm"](self.act(self.transform["dense"](hidden)))
        return F.linear(hidden, word_embeddings, self.bias)            # (num_rows, vocab)


class BertModel(nn.Module):
    """One class for every BERT architecture; `config.architecture` picks the head."""

    packed_modules = {"query": "qkv", "key": "qkv", "value": "qkv"}
    transposed_weights: tuple[str, ...] = ()
    # Checkpoint tensors that are not parameters: buffers, the tied MLM decoder, NSP head.
    _ignored = ("embeddings.position_ids", "embeddings.token_type_ids",
                "cls.predictions.decoder.weight", "cls.seq_relationship.")
    # Old TF-converted checkpoints name LayerNorm parameters gamma / beta.
    _renames = {"LayerNorm.gamma": "LayerNorm.weight", "LayerNorm.beta": "LayerNorm.bias",
                "cls.predictions.decoder.bias": "cls.predictions.bias"}

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.architecture not in HEADS:
            raise UnsupportedModelError(f"BERT architecture {config.architecture!r} is not "
                                        f"supported (supported: {', '.join(HEADS)})")
        self.config = config
        self.head = HEADS[config.architecture]
        self.bert = BertTrunk(config, with_pooler=self.head != "mlm")
        self.classifier = nn.Linear(config.hidden_size, len(config.id2label)) \
            if self.head == "classifier" else None
        self.cls = nn.ModuleDict({"predictions": BertMLMHead(config)}) if self.head == "mlm" else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttnMetadata,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions, token_type_ids: (num_tokens,) -> (num_tokens, hidden)."""
        return self.bert(input_ids, positions, attn_metadata, token_type_ids)

    def pool(self, hidden: torch.Tensor, seq_lens: torch.Tensor, mode: str) -> torch.Tensor:
        """(num_tokens, hidden) rows of sequences laid end to end -> (num_seqs, hidden)."""
        return pool_hidden(hidden, seq_lens, mode)

    def classify(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        """CLS rows (num_seqs, hidden) -> logits (num_seqs, num_labels), through the pooler."""
        if self.classifier is None:
            raise UnsupportedModelError(f"{self.config.architecture} has no classification head")
        pooled = torch.tanh(self.bert.pooler["dense"](cls_hidden))
        return self.classifier(pooled)

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(num_rows, hidden) -> (num_rows, vocab) masked-LM logits."""
        if self.cls is None:
            raise UnsupportedModelError(f"{self.config.architecture} has no masked-LM head")
        return self.cls["predictions"](hidden, self.bert.embeddings.word_embeddings.weight)

    def sparse(self, hidden: torch.Tensor, seq_lens: torch.Tensor, pooling: "SparsePooling",
               chunk_tokens: int = 256) -> torch.Tensor:
        """SPLADE: (num_tokens, hidden) -> (num_seqs, vocab), the masked-LM logits activated and
        pooled per sequence. Logits are made chunk_tokens rows at a time: a whole batch's
        would take num_tokens * vocab floats (a gigabyte for 8k tokens)."""
        segment = torch.repeat_interleave(torch.arange(len(seq_lens), device=hidden.device), seq_lens)
        out = hidden.new_zeros(len(seq_lens), self.config.vocab_size, dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_tokens):
            weights = self.mlm_logits(hidden[start: start + chunk_tokens]).float().relu_().log1p_()
            if pooling.activation == "log1p_relu":
                weights = weights.log1p_()
            index = segment[start: start + chunk_tokens, None].expand_as(weights)
            if pooling.strategy == "max":      # weights are >= 0: the zeros start no higher
                out.scatter_reduce_(0, index, weights, "amax")
            else:
                out.scatter_add_(0, index, weights)
        return out

    def checkpoint_name(self, name: str) -> str | None:
        """Our parameter name for a checkpoint tensor; None for tensors we do not load."""
        for old, new in self._renames.items():
            if name.endswith(old):
                name = name[: -len(old)] + new
        if any(part in name for part in self._ignored):
            return None
        if name.startswith(("cls.", "classifier.")):
            return name if getattr(self, name.split(".")[0]) is not None else None
        name = name if name.startswith("bert.") else f"bert.{name}"
        if name.startswith("bert.pooler.") and self.bert.pooler is None:
            return None                                  # pre-training checkpoints used as MLM
        return name


def pool_hidden(hidden: torch.Tensor, seq_lens: torch.Tensor, mode: str) -> torch.Tensor:
    """Segment pooling without a Python loop per sequence; seq_lens: (num_seqs,) long."""
    ends = seq_lens.cumsum(0)                                          # (num_seqs,)
    if mode == "cls":
        return hidden[ends - seq_lens]
    if mode == "lasttoken":
        return hidden[ends - 1]
    segment = torch.repeat_interleave(torch.arange(len(seq_lens), device=hidden.device), seq_lens)
    out = hidden.new_zeros(len(seq_lens), hidden.shape[1])
    if mode == "max":
        index = segment[:, None].expand_as(hidden)
        return out.scatter_reduce_(0, index, hidden, "amax", include_self=False)
    sums = out.index_add_(0, segment, hidden)
    if mode == "mean":
        return sums / seq_lens[:, None].to(hidden.dtype)
    if mode == "mean_sqrt_len":
        return sums / seq_lens[:, None].to(hidden.dtype).sqrt()
    raise ValueError(f"pooling mode {mode!r} is not one of {', '.join(POOLING_MODES)}")


@dataclass(frozen=True, slots=True)
class SparsePooling:
    """SPLADE (sentence-transformers' SpladePooling): a masked LM's logits, activated as
    log(1 + relu(x)) (log1p_relu: log1p once more), pooled over an input's tokens."""
    strategy: str = "max"               # "max" | "sum"
    activation: str = "relu"            # "relu" | "log1p_relu"

    def __post_init__(self):
        if self.strategy not in ("max", "sum") or self.activation not in ("relu", "log1p_relu"):
            raise UnsupportedModelError(f"SPLADE pooling {self.strategy}/{self.activation} is not supported "
                                        "(supported: max or sum, of relu or log1p_relu)")


@dataclass(frozen=True, slots=True)
class PoolingConfig:
    """What a checkpoint's sentence-transformers files say about using it: how token states
    become one vector (or a sparse one), and the prompts it was trained with."""

    mode: str = "mean"                  # one of POOLING_MODES
    normalize: bool = False             # the directory's pipeline ends in a Normalize module
    max_seq_length: int | None = None   # sentence_bert_config.json; None: the model's limit
    lowercase: bool = False             # sentence_bert_config.json do_lower_case
    sparse: SparsePooling | None = None  # a sparse encoder (SpladePooling): no dense vectors
    prompts: dict[str, str] = field(default_factory=dict)   # name -> text put before an input
    default_prompt_name: str | None = None                  # the prompt used when none is named

    def __post_init__(self):
        if self.mode not in POOLING_MODES:
            raise UnsupportedModelError(f"pooling mode {self.mode!r} is not supported "
                                        f"(supported: {', '.join(POOLING_MODES)})")
        if self.default_prompt_name is not None and self.default_prompt_name not in self.prompts:
            raise UnsupportedModelError(f"default_prompt_name {self.default_prompt_name!r} is not one of the "
                                        f"prompts {sorted(self.prompts)}")


# 1_Pooling/config.json key -> our mode
_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                 "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
                 "pooling_mode_lasttoken": "lasttoken", "pooling_mode_weightedmean_tokens": "weightedmean"}
_KNOWN_MODULES = ("Transformer", "MLMTransformer", "Pooling", "Normalize", "SpladePooling")


def read_pooling_config(directory: Path) -> PoolingConfig:
    """Read a sentence-transformers directory; a plain HF directory gets mean pooling, as
    sentence-transformers itself gives a model it wraps."""
    directory = Path(directory)
    st_config = read_json_file(directory / "sentence_bert_config.json")
    model_config = read_json_file(directory / "config_sentence_transformers.json")
    fields = dict(max_seq_length=st_config.get("max_seq_length"),
                  lowercase=bool(st_config.get("do_lower_case", False)),
                  prompts=dict(model_config.get("prompts") or {}),
                  default_prompt_name=model_config.get("default_prompt_name") or None)
    modules = read_json_file(directory / "modules.json")
    if not modules:
        return PoolingConfig(**fields)
    kinds = {m["type"].rsplit(".", 1)[-1]: m for m in modules}
    unknown = sorted(set(kinds) - set(_KNOWN_MODULES))
    if unknown:
        raise UnsupportedModelError(f"{directory}: sentence-transformers modules {unknown} are "
                                    f"not supported (supported: {', '.join(_KNOWN_MODULES)})")
    mode, sparse = "mean", None
    if "Pooling" in kinds:
        pooling = read_json_file(directory / kinds["Pooling"].get("path", "") / "config.json")
        modes = [_POOLING_KEYS[k] for k, on in pooling.items() if k in _POOLING_KEYS and on]
        if len(modes) != 1:
            raise UnsupportedModelError(f"{directory}: pooling must be exactly one mode, got {modes}")
        if pooling.get("include_prompt") is False:
            raise UnsupportedModelError(f"{directory}: pooling without the prompt's tokens (include_prompt "
                                        "false) is not supported")
        mode = modes[0]
    if "SpladePooling" in kinds:
        splade = read_json_file(directory / kinds["SpladePooling"].get("path", "") / "config.json")
        sparse = SparsePooling(splade.get("pooling_strategy", "max"), splade.get("activation_function", "relu"))
    return PoolingConfig(mode=mode, normalize="Normalize" in kinds, sparse=sparse, **fields)

