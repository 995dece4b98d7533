"""GGUF checkpoints, read with the `gguf` package and turned into the Hugging Face layout.

A GGUF file becomes exactly what the equivalent HF checkpoint holds: HF parameter names, HF
shapes, HF orientation, float32 values. One loader path then serves both formats. Beyond a
rename, four things differ from an HF checkpoint:
  * quantized blocks, dequantized here at load by `gguf.quants.dequantize` — or, when the
    loader asks (`keep_blocks`), Q4_0 / Q4_1 / Q8_0 matrices handed over as `BlockRows`,
    never through floats;
  * llama.cpp's converter interleaves the rotary halves of the attn_q / attn_k rows (llama
    only; its qwen2 converter leaves them alone), which we undo;
  * GPT-2: the converter stores the Conv1D weights transposed to (out, in); HF keeps (in, out);
  * MoE (Mixtral as "llama", qwen2moe, olmoe): each projection's experts are one stacked tensor,
    `ffn_{gate,up,down}_exps`, (num_experts, out, in); it keeps the name llama.cpp's converter
    merged it under (`mlp.experts.gate_proj.weight`) and the loader stacks it as it stacks the
    per-expert tensors of an HF checkpoint. Qwen2-MoE's shared-expert gate is stored as a
    vector; HF's is a (1, hidden) row.

Every check (names, types, shapes the un-permute needs) runs before the first tensor is
dequantized, so a bad file fails whole and nothing half-loads.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize

from engine.layers.quant_blocks import FORMATS as BLOCK_FORMATS, BlockRows

# read_metadata adds this key: which tensors the file holds decides tie_word_embeddings.
TENSOR_NAMES_KEY = "GGUF.tensor_names"

# What llama.cpp produces for these families; `gguf.quants` dequantizes every one of them.
SUPPORTED_TYPES = tuple(GGMLQuantizationType[name] for name in (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"))


class GGUFError(ValueError):
    """A GGUF file we cannot load; the message names the file and, where relevant, the tensor."""


# GGUF tensor name -> HF parameter name, one table per family. "{i}" is the block index.
LLAMA_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_output.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    # Mixtral, which llama.cpp writes as "llama": router and stacked experts
    "blk.{i}.ffn_gate_inp.weight": "model.layers.{i}.block_sparse_moe.gate.weight",
    "blk.{i}.ffn_gate_exps.weight": "model.layers.{i}.block_sparse_moe.experts.w1.weight",
    "blk.{i}.ffn_down_exps.weight": "model.layers.{i}.block_sparse_moe.experts.w2.weight",
    "blk.{i}.ffn_up_exps.weight": "model.layers.{i}.block_sparse_moe.experts.w3.weight",
}

# Qwen2-MoE and OLMoE: the LLaMA layout with routed experts stacked per projection.
_MOE_EXPERT_NAMES = {
    "blk.{i}.ffn_gate_inp.weight": "model.layers.{i}.mlp.gate.weight",
    "blk.{i}.ffn_gate_exps.weight": "model.layers.{i}.mlp.experts.gate_proj.weight",
    "blk.{i}.ffn_up_exps.weight": "model.layers.{i}.mlp.experts.up_proj.weight",
    "blk.{i}.ffn_down_exps.weight": "model.layers.{i}.mlp.experts.down_proj.weight",
}
QWEN2MOE_NAMES = {
    **LLAMA_NAMES, **_MOE_EXPERT_NAMES,
    "blk.{i}.ffn_gate_inp_shexp.weight": "model.layers.{i}.mlp.shared_expert_gate.weight",
    "blk.{i}.ffn_gate_shexp.weight": "model.layers.{i}.mlp.shared_expert.gate_proj.weight",
    "blk.{i}.ffn_up_shexp.weight": "model.layers.{i}.mlp.shared_expert.up_proj.weight",
    "blk.{i}.ffn_down_shexp.weight": "model.layers.{i}.mlp.shared_expert.down_proj.weight",
}
OLMOE_NAMES = {
    **LLAMA_NAMES, **_MOE_EXPERT_NAMES,
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
}

GPT2_NAMES = {
    "token_embd.weight": "transformer.wte.weight",
    "position_embd.weight": "transformer.wpe.weight",
    "output_norm.weight": "transformer.ln_f.weight",
    "output_norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "transformer.h.{i}.ln_1.weight",
    "blk.{i}.attn_norm.bias": "transformer.h.{i}.ln_1.bias",
    "blk.{i}.attn_qkv.weight": "transformer.h.{i}.attn.c_attn.weight",
    "blk.{i}.attn_qkv.bias": "transformer.h.{i}.attn.c_attn.bias",
    "blk.{i}.attn_output.weight": "transformer.h.{i}.attn.c_proj.weight",
    "blk.{i}.attn_output.bias": "transformer.h.{i}.attn.c_proj.bias",
    "blk.{i}.ffn_norm.weight": "transformer.h.{i}.ln_2.weight",
    "blk.{i}.ffn_norm.bias": "transformer.h.{i}.ln_2.bias",
    "blk.{i}.ffn_up.weight": "transformer.h.{i}.mlp.c_fc.weight",
    "blk.{i}.ffn_up.bias": "transformer.h.{i}.mlp.c_fc.bias",
    "blk.{i}.ffn_down.weight": "transformer.h.{i}.mlp.c_proj.weight",
    "blk.{i}.ffn_down.bias": "transformer.h.{i}.mlp.c_proj.bias",
}

# Tensors llama.cpp writes that carry no HF parameter; we refuse them rather than drop them.
_UNSERVED_HINTS = {
    "rope_freqs.weight": " (llama3 rope scaling stored as a frequency table; not supported)",
}

# HF GPT-2 keeps these Conv1D weights as (in, out); the converter wrote them (out, in).
GPT2_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight",
                   "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass(frozen=True, slots=True)
class _Family:
    architecture: str                      # HF "architectures"[0]
    names: dict[str, str]                  # GGUF name -> HF name
    rotary_permuted: bool = False          # attn_q / attn_k rows interleaved by the converter
    transposed: tuple[str, ...] = ()       # HF name suffixes stored transposed in the file
    model_type: str | None = None          # config.json's model_type, when not the GGUF arch name
    row_vectors: tuple[str, ...] = ()      # HF name suffixes of (1, n) weights the file holds as (n,)


# general.architecture -> family. A Mistral GGUF says "llama", and so does a Mixtral one
# (hf_config_from_gguf tells it by its experts).
FAMILIES = {
    "llama": _Family("LlamaForCausalLM", LLAMA_NAMES, rotary_permuted=True),
    "qwen2": _Family("Qwen2ForCausalLM", LLAMA_NAMES),
    "gpt2": _Family("GPT2LMHeadModel", GPT2_NAMES, transposed=GPT2_TRANSPOSED),
    "qwen2moe": _Family("Qwen2MoeForCausalLM", QWEN2MOE_NAMES, model_type="qwen2_moe",
                        row_vectors=("mlp.shared_expert_gate.weight",)),
    "olmoe": _Family("OlmoeForCausalLM", OLMOE_NAMES),
}


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """{key: python value} for every GGUF key-value field (via field.contents()), plus
    TENSOR_NAMES_KEY: the names of the file's tensors, in file order."""
    reader = _open(path)
    metadata = {key: field.contents() for key, field in reader.fields.items()}
    metadata[TENSOR_NAMES_KEY] = [tensor.name for tensor in reader.tensors]
    return metadata


def hf_config_from_gguf(metadata: dict[str, Any]) -> dict[str, Any]:
    """A Hugging Face config.json-style dict for a llama (or Mixtral), qwen2, gpt2, qwen2moe or
    olmoe GGUF's metadata."""
    arch = _architecture(metadata)
    if TENSOR_NAMES_KEY not in metadata:
        raise GGUFError(f"GGUF metadata lacks {TENSOR_NAMES_KEY!r}; build it with read_metadata()")
    fields = _gpt2_config(metadata) if arch == "gpt2" else _llama_config(metadata, arch)
    tokens = metadata.get("tokenizer.ggml.tokens") or ()
    vocab_size = metadata.get(f"{arch}.vocab_size") or len(tokens)
    if not vocab_size:
        raise GGUFError(f"GGUF {_model_name(metadata)}: neither {arch}.vocab_size nor "
                        "tokenizer.ggml.tokens says the vocabulary size")
    family = FAMILIES[arch]
    config = {"model_type": family.model_type or arch, "architectures": [family.architecture],
              "vocab_size": vocab_size, **fields,
              "tie_word_embeddings": "output.weight" not in metadata[TENSOR_NAMES_KEY],
              **_token_ids(metadata)}
    if metadata.get(f"{arch}.expert_count"):
        config |= _moe_config(metadata, arch)
    return config


def validate_gguf(path: str | os.PathLike) -> None:
    """Check every tensor's name, type and shape without dequantizing any of them."""
    _plan(path, _open(path), read_metadata(path))


def has_block_tensors(path: str | os.PathLike) -> bool:
    """Whether any matrix in the file is Q4_0, Q4_1 or Q8_0 (what `keep_blocks` keeps)."""
    return any(_is_block_matrix(tensor) for tensor in _open(path).tensors)


def iter_gguf_tensors(path: str | os.PathLike, metadata: dict[str, Any] | None = None,
                      keep_blocks: bool = False) -> Iterator[tuple[str, torch.Tensor | BlockRows]]:
    """(HF name, float32 tensor in HF layout) for every tensor in the file, dequantized.

    keep_blocks: Q4_0 / Q4_1 / Q8_0 matrices come as BlockRows instead (rows in HF order),
    except those HF stores transposed (GPT-2's Conv1D), whose blocks would cut across rows.
    The whole file is checked before the first tensor is produced."""
    reader = _open(path)
    if metadata is None:
        metadata = read_metadata(path)
    plan = _plan(path, reader, metadata)
    family = FAMILIES[metadata["general.architecture"]]
    for tensor, hf_name, num_heads in plan:
        if keep_blocks and _is_block_matrix(tensor) and not hf_name.endswith(family.transposed):
            yield hf_name, _to_blocks(tensor, num_heads)
        else:
            yield hf_name, _to_hf(path, tensor, hf_name, family, num_heads)


# --- reading -------------------------------------------------------------------------------

def _open(path: str | os.PathLike) -> GGUFReader:
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise GGUFError(f"{path}: cannot read the GGUF file ({exc.strerror or exc})") from None
    return _open_cached(os.fspath(path), stat.st_mtime_ns, stat.st_size)


# Loading opens the file three times (metadata, validation, tensors); parsing a 50k-token
# vocabulary costs seconds, so keep the last reader. Its tensors are views of a memory map.
@functools.lru_cache(maxsize=1)
def _open_cached(path: str, mtime_ns: int, size: int) -> GGUFReader:
    try:
        return GGUFReader(path)
    except Exception as exc:    # the reader signals truncation and bad headers many ways
        raise GGUFError(f"{path}: not a valid GGUF file ({type(exc).__name__}: {exc})") from None


def _plan(path, reader: GGUFReader,
          metadata: dict[str, Any]) -> list[tuple[ReaderTensor, str, int | None]]:
    """(tensor, HF name, heads to un-permute by or None) for every tensor; raises on the
    first name, type or shape we cannot serve."""
    try:
        family = FAMILIES[_architecture(metadata)]
        rotary_heads = _rotary_heads(metadata) if family.rotary_permuted else {}
    except GGUFError as exc:
        raise GGUFError(f"{path}: {exc}") from None
    plan = []
    for tensor in reader.tensors:
        hf_name = _hf_name(family.names, tensor.name)
        if hf_name is None:
            raise GGUFError(f"{path}: tensor {tensor.name!r} is not a "
                            f"{metadata['general.architecture']} weight we know"
                            + _UNSERVED_HINTS.get(tensor.name, ""))
        if tensor.tensor_type not in SUPPORTED_TYPES:
            raise GGUFError(
                f"{path}: tensor {tensor.name!r} has quantization type {tensor.tensor_type.name}, "
                f"which is not supported (supported: {', '.join(t.name for t in SUPPORTED_TYPES)})")
        num_heads = rotary_heads.get(hf_name.split(".")[-2])
        rows = int(tensor.shape[-1])                 # ne is numpy's shape reversed
        if num_heads is not None and rows % (2 * num_heads):
            raise GGUFError(f"{path}: tensor {tensor.name!r} has {rows} rows, "
                            f"not a whole number of rotary heads ({num_heads})")
        plan.append((tensor, hf_name, num_heads))
    return plan


def _hf_name(table: dict[str, str], gguf_name: str) -> str | None:
    prefix, block, rest = (gguf_name.split(".", 2) + ["", ""])[:3]
    if prefix == "blk" and block.isdigit():
        pattern = table.get(f"blk.{{i}}.{rest}")
        return pattern.format(i=int(block)) if pattern else None
    return table.get(gguf_name)


def _rotary_heads(metadata: dict[str, Any]) -> dict[str, int]:
    """Projection -> the head count its rows were permuted by (keys: kv heads, as in GQA)."""
    arch = metadata["general.architecture"]
    num_heads = _require(metadata, f"{arch}.attention.head_count")
    return {"q_proj": num_heads,
            "k_proj": metadata.get(f"{arch}.attention.head_count_kv") or num_heads}


def _to_hf(path, tensor: ReaderTensor, hf_name: str, family: _Family,
           num_heads: int | None) -> torch.Tensor:
    try:
        array = dequantize(tensor.data, tensor.tensor_type)   # numpy shape: ne reversed
    except Exception as exc:
        raise GGUFError(f"{path}: tensor {tensor.name!r} ({tensor.tensor_type.name}) could "
                        f"not be dequantized ({exc})") from None
    if not array.flags.writeable:              # F32 comes back as a view of the memory map
        array = array.copy()
    weight = torch.from_numpy(array.astype(np.float32, copy=False))
    if num_heads is not None:
        weight = _unpermute_rotary(weight, num_heads)
    if hf_name.endswith(family.transposed):
        weight = weight.T
    if hf_name.endswith(family.row_vectors) and weight.dim() == 1:
        weight = weight[None]
    return weight.contiguous()


def _is_block_matrix(tensor: ReaderTensor) -> bool:
    return tensor.tensor_type.name in BLOCK_FORMATS and len(tensor.shape) == 2


def _to_blocks(tensor: ReaderTensor, num_heads: int | None) -> BlockRows:
    raw = torch.from_numpy(np.array(tensor.data))   # (rows, row bytes), copied off the memory map
    if num_heads is not None:                       # a row is whole blocks: move rows, not values
        raw = _unpermute_rotary(raw, num_heads)
    return BlockRows.from_gguf(tensor.tensor_type.name, raw)


def _unpermute_rotary(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo the converter's row order for q/k (weights or biases).

    HF rotates the two halves of each head against each other (rotate_half); ggml rotates
    adjacent pairs, so the converter interleaves the halves:
        HF rows of one head:    a0 a1 ... a(d/2-1) b0 b1 ... b(d/2-1)
        GGUF rows of that head: a0 b0 a1 b1 ... a(d/2-1) b(d/2-1)
    """
    rows = weight.shape[0]
    pairs = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return pairs.transpose(1, 2).reshape(weight.shape)   # (num_heads, 2, d/2, ...) flattened


# --- config --------------------------------------------------------------------------------

def _architecture(metadata: dict[str, Any]) -> str:
    arch = metadata.get("general.architecture")
    if arch not in FAMILIES:
        raise GGUFError(f"GGUF {_model_name(metadata)}: architecture {arch!r} is not supported "
                        f"(supported: {', '.join(sorted(FAMILIES))})")
    return arch


def _llama_config(metadata: dict[str, Any], arch: str) -> dict[str, Any]:
    def key(name: str) -> str:
        return f"{arch}.{name}"
    num_heads = _require(metadata, key("attention.head_count"))
    config = {
        "hidden_size": _require(metadata, key("embedding_length")),
        "intermediate_size": _require(metadata, key("feed_forward_length")),
        "num_hidden_layers": _require(metadata, key("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": metadata.get(key("attention.head_count_kv")) or num_heads,
        "max_position_embeddings": _require(metadata, key("context_length")),
        "rms_norm_eps": _f32(_require(metadata, key("attention.layer_norm_rms_epsilon"))),
        "rope_theta": _f32(metadata.get(key("rope.freq_base"), 10000.0)),
    }
    # For these families the rotary dimension is the whole head.
    head_dim = (metadata.get(key("attention.key_length"))
                or metadata.get(key("rope.dimension_count")))
    if head_dim:
        config["head_dim"] = head_dim
    if arch == "llama" and "blk.0.attn_q.bias" in metadata[TENSOR_NAMES_KEY]:
        config["attention_bias"] = True
    if (scaling := _rope_scaling(metadata, arch)) is not None:
        config["rope_scaling"] = scaling
    return config


def _rope_scaling(metadata: dict[str, Any], arch: str) -> dict[str, Any] | None:
    prefix = f"{arch}.rope.scaling."
    rope_type = metadata.get(prefix + "type")
    if rope_type in (None, "none"):
        return None
    if rope_type not in ("linear", "llama3"):
        raise GGUFError(f"GGUF {_model_name(metadata)}: rope scaling {rope_type!r} is not "
                        "supported (supported: linear, llama3)")
    scaling = {"rope_type": rope_type, "factor": _f32(_require(metadata, prefix + "factor"))}
    if rope_type == "llama3":
        optional = {"low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor",
                    "original_context_length": "original_max_position_embeddings"}
        scaling |= {hf: _f32(metadata[prefix + g]) if "freq" in g else metadata[prefix + g]
                    for g, hf in optional.items() if prefix + g in metadata}
    return scaling


def _moe_config(metadata: dict[str, Any], arch: str) -> dict[str, Any]:
    """The config.json fields of a Mixtral ("llama" with experts), Qwen2-MoE or OLMoE GGUF."""
    names = set(metadata[TENSOR_NAMES_KEY])
    num_experts = metadata[f"{arch}.expert_count"]
    num_used = _require(metadata, f"{arch}.expert_used_count")
    if arch == "llama":                         # Mixtral: renormalizes its top-k weights, always
        return {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
                "num_local_experts": num_experts, "num_experts_per_tok": num_used}
    # llama.cpp does not renormalize qwen2moe's or olmoe's, unless the file says so.
    config = {"num_experts": num_experts, "num_experts_per_tok": num_used,
              "norm_topk_prob": bool(metadata.get(f"{arch}.expert_weights_norm", False))}
    if arch == "olmoe":
        clip = metadata.get("olmoe.attention.clamp_kqv")
        return config | {"attention_bias": "blk.0.attn_q.bias" in names,
                         "clip_qkv": _f32(clip) if clip else None}
    # qwen2moe (every layer routed: llama.cpp has no dense layers for it)
    shared = any(name.endswith(".ffn_gate_shexp.weight") for name in names)
    return config | {
        "moe_intermediate_size": _require(metadata, f"{arch}.expert_feed_forward_length"),
        "shared_expert_intermediate_size": (
            _require(metadata, f"{arch}.expert_shared_feed_forward_length") if shared else 0),
        "qkv_bias": "blk.0.attn_q.bias" in names}


def _gpt2_config(metadata: dict[str, Any]) -> dict[str, Any]:
    hidden = _require(metadata, "gpt2.embedding_length")
    return {
        "n_embd": hidden,
        "n_layer": _require(metadata, "gpt2.block_count"),
        "n_head": _require(metadata, "gpt2.attention.head_count"),
        "n_positions": _require(metadata, "gpt2.context_length"),
        "n_inner": metadata.get("gpt2.feed_forward_length") or 4 * hidden,
        "layer_norm_epsilon": _f32(metadata.get("gpt2.attention.layer_norm_epsilon", 1e-5)),
        "activation_function": "gelu_new",   # ggml's gelu is the tanh approximation
    }


def _token_ids(metadata: dict[str, Any]) -> dict[str, Any]:
    names = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
             "pad_token_id": "padding_token_id"}
    return {hf: metadata[f"tokenizer.ggml.{g}"] for hf, g in names.items()
            if f"tokenizer.ggml.{g}" in metadata}


def _require(metadata: dict[str, Any], key: str) -> Any:
    if key not in metadata:
        raise GGUFError(f"GGUF {_model_name(metadata)}: metadata key {key!r} is missing")
    return metadata[key]


def _model_name(metadata: dict[str, Any]) -> str:
    return repr(metadata.get("general.name", "(unnamed)"))


def _f32(value: float) -> float:
    """GGUF stores these as float32: 1e-5 reads back as 9.99999974e-06. Recover the shortest
    decimal that rounds to the same float32, which is what the HF config said."""
    return float(str(np.float32(value)))
