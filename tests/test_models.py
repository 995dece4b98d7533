"""Every generation family against transformers, from every checkpoint format we read, and
the loader's refusals: each names what is wrong and where."""
import json

import pytest
import torch
from conftest import save_tiny_checkpoint, tiny_hf_model
from safetensors.torch import load_file, save_file

from engine.layers.attention import build_attn_metadata
from engine.loader import CheckpointError, build_model, open_checkpoint
from tests.gguf_writer import write_gguf

FAMILIES = ["llama", "llama3", "mistral", "qwen2", "gpt2"]
# Different lengths; the longest outgrows Mistral's 12-token sliding window.
PROMPTS = [[5, 9, 200, 31, 7], [42], [3 + (i * 37) % 380 for i in range(29)], [11, 12, 13, 14, 15, 16, 17]]


def our_logits(path, prompts=PROMPTS) -> torch.Tensor:
    checkpoint = open_checkpoint(path)
    model = build_model(checkpoint, torch.float32, torch.device("cpu"))
    lengths = [len(p) for p in prompts]
    ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(n) for n in lengths])
    meta = build_attn_metadata(lengths, lengths, None, 1, sliding_window=checkpoint.config.sliding_window)
    with torch.inference_mode():
        return model.compute_logits(model(ids, positions, meta))     # (sum of lengths, vocab)


def reference_logits(hf_model, prompts=PROMPTS) -> torch.Tensor:
    """transformers on one right-padded batch; the padded positions are dropped."""
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([p + [0] * (longest - len(p)) for p in prompts])
    mask = torch.tensor([[1] * len(p) + [0] * (longest - len(p)) for p in prompts])
    with torch.no_grad():
        logits = hf_model(input_ids=ids, attention_mask=mask).logits
    return torch.cat([logits[i, : len(p)] for i, p in enumerate(prompts)])


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_on_a_padded_batch(family, safe, tmp_path):
    path = save_tiny_checkpoint(family, tmp_path / family, safe_serialization=safe)
    diff = (our_logits(path) - reference_logits(tiny_hf_model(family))).abs().max()
    assert diff < 1e-4


def test_sharded_checkpoints_load_every_shard(tmp_path):
    model = tiny_hf_model("llama")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert len(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]) > 1
    assert (our_logits(tmp_path) - reference_logits(model)).abs().max() < 1e-4


@pytest.mark.parametrize("tensor_type", ["F32", "Q8_0"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_gguf_files_match_transformers_reading_the_same_file(family, tensor_type, tmp_path):
    from transformers import AutoModelForCausalLM
    # Block-quantized rows need 256-wide inputs; transformers reads GPT-2 GGUFs as 1024 positions.
    source = tiny_hf_model(family, hidden_size=256, intermediate_size=256) if family != "gpt2" \
        else tiny_hf_model("gpt2", n_embd=256, n_positions=1024)
    path = write_gguf(source, tmp_path / f"{family}.gguf", tensor_type=tensor_type)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    assert (our_logits(path) - reference_logits(reference.eval())).abs().max() < 1e-4


# -- refusals ------------------------------------------------------------------------------

def test_unsupported_architecture_names_it_and_lists_ours(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bart", "architectures": ["BartModel"]}))
    with pytest.raises(CheckpointError, match=r"bart.*BartModel.*supported model types: bert, gpt2, llama.*t5"):
        open_checkpoint(tmp_path)


def test_missing_weights_and_unknown_names_fail_before_anything_loads(tmp_path):
    path = save_tiny_checkpoint("llama", tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights found"):
        open_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"neither a default model"):
        open_checkpoint(tmp_path / "does-not-exist")


def test_corrupt_weight_file_names_the_file(tmp_path):
    path = save_tiny_checkpoint("llama", tmp_path / "m")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    checkpoint = open_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read weights"):
        build_model(checkpoint, torch.float32, torch.device("cpu"))


def test_wrong_shape_names_the_tensor_and_both_shapes(tmp_path):
    path = save_tiny_checkpoint("llama", tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 100)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*\(64, 100\).*\(64, 128\)"):
        build_model(open_checkpoint(path), torch.float32, torch.device("cpu"))


def test_missing_tensor_is_named(tmp_path):
    path = save_tiny_checkpoint("llama", tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks tensors for model\.layers\.0\.self_attn\.qkv_proj\.weight:k_proj"):
        build_model(open_checkpoint(path), torch.float32, torch.device("cpu"))


def test_unsupported_gguf_quantization_names_file_tensor_and_type(tmp_path):
    import gguf
    import numpy as np
    path = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    qtype = gguf.GGMLQuantizationType.IQ4_NL
    _, bytes_per_block = gguf.GGML_QUANT_SIZES[qtype]
    writer.add_tensor("token_embd.weight", np.zeros((4, bytes_per_block), dtype=np.uint8), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"iq\.gguf.*token_embd\.weight.*IQ4_NL"):
        open_checkpoint(path)
