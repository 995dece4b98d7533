"""Write tiny GGUF files the way llama.cpp's convert_hf_to_gguf.py (+ llama-quantize) would.

    from tests.gguf_writer import write_gguf
    model = LlamaForCausalLM(LlamaConfig(hidden_size=256, ...))
    write_gguf(model, tmp_path / "tiny.gguf", tensor_type="Q4_1")
    write_gguf((state_dict, config), tmp_path / "tiny.gguf")  # PretrainedConfig or config.json dict

Families: llama (and mistral, written as GGUF "llama" like llama.cpp does), qwen2, gpt2, and
the MoE families: mixtral (GGUF "llama" with experts), qwen2_moe ("qwen2moe"), olmoe.

What lands in the file, as the converter writes it:
  * tensor names from gguf's own TensorNameMap (independent of engine/gguf_file.py's tables);
  * llama/mistral: q_proj / k_proj rows (weights and biases) permuted for ggml's rotary;
    qwen2: not permuted (llama.cpp's Qwen2 converter does not);
  * gpt2: Conv1D weights transposed to (out, in), and output.weight written as a copy of
    token_embd (the converter does this because HF GPT-2 ties them);
  * llama/qwen2 with tie_word_embeddings: no output.weight (HF saves no lm_head then);
  * metadata keys as set_gguf_parameters writes them (qwen2 has no vocab_size key, so readers
    count tokenizer.ggml.tokens), and a placeholder vocabulary "<t0>", "<t1>", ... with the
    config's bos/eos/pad ids;
  * MoE: each projection's experts stacked into one (num_experts, out, in) tensor,
    ffn_{gate,up,down}_exps (from transformers 5's fused gate_up_proj / down_proj or from
    per-expert tensors), the router ffn_gate_inp kept F32 as the converter forces, Qwen2-MoE's
    shared-expert gate squeezed to a vector, and {arch}.expert_count / expert_used_count /
    expert_feed_forward_length / expert_shared_feed_forward_length; norm_topk_prob, when set,
    as {arch}.expert_weights_norm.

tensor_type applies to every 2-D weight; 1-D tensors (norms, biases) stay F32, as llama.cpp
keeps them. Supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (via gguf.quants.quantize)
and Q6_K (gguf.quants cannot quantize it; `quantize_q6_k` below does). A quantized type needs
every 2-D weight's row length (its input dimension) to be a multiple of the block size: 32, or
256 for Q6_K; the writer raises ValueError rather than fall back to another type.
Rope scaling: "linear" is written as llama.cpp does; "llama3" is refused (llama.cpp writes it as
a rope_freqs tensor, which this helper does not produce).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter

QUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q6_K")
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2",
             "mixtral": "llama", "qwen2_moe": "qwen2moe", "olmoe": "olmoe"}
F32_ALWAYS = ("ffn_gate_inp.weight",)            # the converter never quantizes the router
GPT2_CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")


def write_gguf(source: Any, path: str | Path, tensor_type: str = "F32") -> Path:
    """Write `source` (an HF causal-LM model, or a (state_dict, config) pair) as a GGUF file."""
    state_dict, config = _state_dict_and_config(source)
    if tensor_type not in QUANTIZABLE:
        raise ValueError(f"tensor_type {tensor_type!r} not one of {QUANTIZABLE}")
    model_type = config["model_type"]
    arch = GGUF_ARCH[model_type]
    path = Path(path)
    writer = GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{model_type}")
    _write_hparams(writer, arch, config, tensor_type)
    _write_vocab(writer, config)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], _num_layers(config))
    for name, weight in _converted_tensors(state_dict, config, arch):
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for {name}")
        _add_tensor(writer, gguf_name, weight, tensor_type)
        if arch == "gpt2" and gguf_name == "token_embd.weight":
            _add_tensor(writer, "output.weight", weight, tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _state_dict_and_config(source: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if isinstance(source, tuple):
        state_dict, config = source
    else:
        state_dict, config = source.state_dict(), source.config
    if not isinstance(config, dict):
        config = config.to_dict()
    return state_dict, config


def _num_layers(config: dict[str, Any]) -> int:
    return config.get("num_hidden_layers") or config["n_layer"]


def _rope_theta(config: dict[str, Any]) -> float:
    rope = config.get("rope_parameters") or {}      # transformers 5; 4.x keeps it at the top
    return rope.get("rope_theta") or config.get("rope_theta", 10000.0)


def _write_hparams(writer: GGUFWriter, arch: str, config: dict[str, Any], tensor_type: str) -> None:
    file_type = "ALL_F32" if tensor_type == "F32" else f"MOSTLY_{tensor_type}"
    writer.add_file_type(gguf.LlamaFileType[file_type])
    if arch == "gpt2":             # GPT2Model.set_gguf_parameters
        writer.add_block_count(config["n_layer"])
        writer.add_context_length(config.get("n_ctx") or config["n_positions"])
        writer.add_embedding_length(config["n_embd"])
        writer.add_feed_forward_length(4 * config["n_embd"])
        writer.add_head_count(config["n_head"])
        writer.add_layer_norm_eps(config["layer_norm_epsilon"])
        return
    # TextModel.set_gguf_parameters, then LlamaModel's additions for llama.
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if config.get("head_dim"):
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    if arch == "llama":
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(
            config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
        _write_rope_scaling(writer, config)
    num_experts = config.get("num_local_experts") or config.get("num_experts")
    if num_experts:
        _write_moe_hparams(writer, config, num_experts)


def _write_moe_hparams(writer: GGUFWriter, config: dict[str, Any], num_experts: int) -> None:
    writer.add_expert_count(num_experts)
    writer.add_expert_used_count(config["num_experts_per_tok"])
    if config.get("moe_intermediate_size"):                       # Qwen2MoeModel
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    if config.get("shared_expert_intermediate_size"):
        writer.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])
    if config.get("norm_topk_prob"):
        writer.add_expert_weights_norm(True)


def _write_rope_scaling(writer: GGUFWriter, config: dict[str, Any]) -> None:
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif rope_type != "default":
        raise ValueError(f"rope scaling {rope_type!r} is not written by this helper")


def _write_vocab(writer: GGUFWriter, config: dict[str, Any]) -> None:
    vocab_size = config["vocab_size"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"<t{i}>" for i in range(vocab_size)])
    writer.add_token_types([gguf.TokenType.NORMAL] * vocab_size)
    for key, add in (("bos_token_id", writer.add_bos_token_id),
                     ("eos_token_id", writer.add_eos_token_id),
                     ("pad_token_id", writer.add_pad_token_id)):
        token_id = config.get(key)
        if isinstance(token_id, list):
            token_id = token_id[0]
        if token_id is not None:
            add(token_id)


def _converted_tensors(state_dict: dict[str, torch.Tensor], config: dict[str, Any], arch: str):
    """(HF name, float32 numpy array in the layout the converter writes) per tensor."""
    tied = config.get("tie_word_embeddings", arch == "gpt2")
    for name, tensor in _stacked_experts(state_dict).items():
        if name == "lm_head.weight" and tied:
            continue               # HF's safetensors holds no tied lm_head
        array = tensor.detach().to(torch.float32).numpy()
        num_heads = config.get("num_attention_heads")
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            array = permute_rotary(array, num_heads)
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            array = permute_rotary(array, config.get("num_key_value_heads") or num_heads)
        elif arch == "gpt2" and name.endswith(GPT2_CONV1D):
            array = array.T
        elif name.endswith("mlp.shared_expert_gate.weight"):
            array = array.reshape(-1)                  # llama.cpp holds it as a vector
        yield name, np.ascontiguousarray(array)


def _stacked_experts(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with each layer's experts as the converter merges them before naming:
    `...mlp.experts.{gate,up,down}_proj.weight`, (num_experts, out, in). Takes transformers 5's
    fused gate_up_proj / down_proj and the per-expert tensors of older checkpoints (Mixtral's
    block_sparse_moe / w1 w2 w3 renamed as it goes)."""
    out: dict[str, torch.Tensor] = {}
    per_expert: dict[str, dict[int, torch.Tensor]] = {}
    renames = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
    for name, tensor in state_dict.items():
        name = name.replace(".block_sparse_moe.", ".mlp.")
        head, found, tail = name.partition(".mlp.experts.")
        if not found:
            out[name] = tensor
        elif tail == "gate_up_proj":
            gate, up = tensor.chunk(2, dim=1)
            out[f"{head}.mlp.experts.gate_proj.weight"] = gate
            out[f"{head}.mlp.experts.up_proj.weight"] = up
        elif tail == "down_proj":
            out[f"{head}.mlp.experts.down_proj.weight"] = tensor
        else:                                          # "{e}.{projection}.weight"
            expert, projection, _ = tail.split(".")
            key = f"{head}.mlp.experts.{renames.get(projection, projection)}.weight"
            per_expert.setdefault(key, {})[int(expert)] = tensor
    for key, experts in per_expert.items():
        out[key] = torch.stack([experts[e] for e in range(len(experts))])
    return out


def permute_rotary(array: np.ndarray, num_heads: int) -> np.ndarray:
    """The converter's q/k row order: each head's two rotary halves interleaved."""
    rows = array.shape[0]
    halves = array.reshape(num_heads, 2, rows // num_heads // 2, *array.shape[1:])
    return halves.swapaxes(1, 2).reshape(array.shape)


def _add_tensor(writer: GGUFWriter, name: str, array: np.ndarray, tensor_type: str) -> None:
    if array.ndim == 1 or tensor_type == "F32" or name.endswith(F32_ALWAYS):
        writer.add_tensor(name, array.astype(np.float32))
        return
    qtype = GGMLQuantizationType[tensor_type]
    block_size = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block_size:
        raise ValueError(f"{name}: row length {array.shape[-1]} is not a multiple of the "
                         f"{tensor_type} block size {block_size}")
    if tensor_type == "F16":
        writer.add_tensor(name, array.astype(np.float16))
    elif tensor_type == "Q6_K":
        writer.add_tensor(name, quantize_q6_k(array), raw_dtype=qtype)
    else:
        writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)


def quantize_q6_k(array: np.ndarray) -> np.ndarray:
    """Q6_K blocks (uint8, numpy shape (*rows, row_length // 256 * 210)) for float rows.

    A plain round-to-nearest encoder (llama.cpp searches for better scales; any valid encoding
    serves a reader test). One block holds 256 values in 16 groups of 16:
        ql[128]  low 4 bits of each 6-bit quant      qh[64]  high 2 bits, four quants a byte
        scales[16]  int8 scale per group             d       float16 scale of the scales
    value = d * scales[g] * (q - 32). Quant i of a block, with i = 128*h + 32*j + l, keeps its
    low nibble in ql[64*h + 32*(j % 2) + l] (low half if j < 2, else high half) and its top two
    bits in qh[32*h + l] at bit 2*j.
    """
    rows = array.shape[:-1]
    x = array.astype(np.float32).reshape(-1, 16, 16)           # (num_blocks, group, 16)
    group_scale = np.abs(x).max(axis=-1) / 31                  # (num_blocks, 16)
    d = (group_scale.max(axis=-1, keepdims=True) / 127).astype(np.float16)
    safe_d = np.where(d == 0, 1, d).astype(np.float32)
    # Round scales up, so no quant needs more than 6 bits: error <= half a step per value.
    scales = np.clip(np.ceil(group_scale / safe_d), 0, 127).astype(np.int8)
    step = d.astype(np.float32) * scales                       # (num_blocks, 16)
    safe_step = np.where(step == 0, 1, step)[..., None]
    q = np.clip(np.round(x / safe_step), -32, 31) * (step[..., None] != 0)
    q = (q + 32).astype(np.uint8).reshape(-1, 2, 4, 32)        # (num_blocks, h, j, l)
    ql = (q[:, :, :2] & 0xF) | ((q[:, :, 2:] & 0xF) << 4)      # (num_blocks, h, j%2, l)
    qh = sum(((q[:, :, j] >> 4) & 3) << (2 * j) for j in range(4)).astype(np.uint8)
    blocks = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), scales.view(np.uint8),
                             d.view(np.uint8)], axis=1)        # (num_blocks, 210)
    return blocks.reshape(*rows, -1)
