"""BERT against transformers: hidden states, classification and MLM logits, pooling, configs."""
from __future__ import annotations

import json

import pytest
import torch

from engine.config import UnsupportedModelError
from engine.layers.attention import build_attn_metadata
from engine.loader import CheckpointError, build_model, open_checkpoint, resolve_model_path
from engine.layers.attention import Attention
from engine.layers.encoder_attention import PerSequenceAttention, SequenceSpans
from engine.models.bert import PoolingConfig, SparsePooling, pool_hidden, read_pooling_config

transformers = pytest.importorskip("transformers")

ARCHITECTURES = ("BertModel", "BertForSequenceClassification", "BertForMaskedLM")
LENS = [5, 1, 9, 3, 2]


def tiny_bert_dir(tmp_path, architecture: str, fmt: str = "safetensors", **overrides):
    """A random tiny BERT saved by transformers; fmt "bin" writes an old-style pytorch_model.bin
    with the buffers and tied decoder weights such files carried."""
    torch.manual_seed(0)
    fields = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=48, max_position_embeddings=64, type_vocab_size=2,
                  initializer_range=0.2, num_labels=3)
    config = transformers.BertConfig(**{**fields, **overrides})
    hf = getattr(transformers, architecture)(config).eval()
    path = tmp_path / f"{architecture}-{fmt}"
    hf.save_pretrained(path)
    if fmt == "bin":
        (path / "model.safetensors").unlink()
        state = dict(hf.state_dict())
        prefix = "" if architecture == "BertModel" else "bert."
        state[f"{prefix}embeddings.position_ids"] = torch.arange(64)[None]
        state[f"{prefix}embeddings.token_type_ids"] = torch.zeros(1, 64, dtype=torch.long)
        torch.save(state, path / "pytorch_model.bin")
    return path, hf


def ragged_inputs(vocab_size=99, lens=LENS, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = [torch.randint(1, vocab_size, (n,), generator=gen) for n in lens]
    types = [torch.randint(0, 2, (n,), generator=gen) for n in lens]
    return ids, types


def run_ours(model, ids, types=None, per_sequence=False):
    """Our forward; per_sequence: with the CPU encoders' PerSequenceAttention instead of the
    padded reference."""
    lens = [len(x) for x in ids]
    meta = build_attn_metadata(lens, lens, None, 1, causal=False)
    if per_sequence:
        meta = SequenceSpans.of(lens)
        for module in model.modules():
            if isinstance(module, Attention):
                module.backend = PerSequenceAttention()
    positions = torch.cat([torch.arange(n) for n in lens])
    with torch.inference_mode():
        return model(torch.cat(ids), positions, meta, None if types is None else torch.cat(types))


def run_hf(hf, ids, types=None):
    """HF on the padded batch; returns (flattened last hidden states, raw output)."""
    batch, width = len(ids), max(len(x) for x in ids)
    input_ids = torch.zeros(batch, width, dtype=torch.long)
    mask, type_ids = torch.zeros_like(input_ids), torch.zeros_like(input_ids)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)], mask[i, : len(x)] = x, 1
        if types is not None:
            type_ids[i, : len(x)] = types[i]
    with torch.no_grad():
        out = hf(input_ids=input_ids, attention_mask=mask, token_type_ids=type_ids,
                 output_hidden_states=True)
    last = out.hidden_states[-1]
    return torch.cat([last[i, : len(x)] for i, x in enumerate(ids)]), out


def load(path):
    return build_model(open_checkpoint(path), torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("per_sequence", [False, True], ids=["padded", "per-sequence"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_matches_transformers(tmp_path, architecture, fmt, per_sequence):
    path, hf = tiny_bert_dir(tmp_path, architecture, fmt)
    model = load(path)
    ids, types = ragged_inputs()
    ours = run_ours(model, ids, types, per_sequence)
    ref, out = run_hf(hf, ids, types)
    assert ref.abs().max() > 0.5                       # not trivially small numbers
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    seq_lens = torch.tensor(LENS)
    if architecture == "BertForSequenceClassification":
        logits = model.classify(model.pool(ours, seq_lens, "cls"))
        torch.testing.assert_close(logits, out.logits, atol=1e-4, rtol=0)
    if architecture == "BertForMaskedLM":
        ref_logits = torch.cat([out.logits[i, :n] for i, n in enumerate(LENS)])
        torch.testing.assert_close(model.mlm_logits(ours), ref_logits, atol=1e-4, rtol=0)


def test_token_types_are_honoured(tmp_path):
    path, hf = tiny_bert_dir(tmp_path, "BertModel")
    model = load(path)
    ids, types = ragged_inputs()
    with_types, without = run_ours(model, ids, types), run_ours(model, ids)
    assert (with_types - without).abs().max() > 1e-2
    torch.testing.assert_close(without, run_hf(hf, ids)[0], atol=1e-4, rtol=0)


def test_heads_follow_architecture(tmp_path):
    model = load(tiny_bert_dir(tmp_path, "BertModel")[0])
    hidden = torch.zeros(2, 32)
    with pytest.raises(UnsupportedModelError, match="no classification head"):
        model.classify(hidden)
    with pytest.raises(UnsupportedModelError, match="no masked-LM head"):
        model.mlm_logits(hidden)
    assert load(tiny_bert_dir(tmp_path, "BertForMaskedLM")[0]).bert.pooler is None


def test_unknown_architecture_is_refused(tmp_path):
    path, _ = tiny_bert_dir(tmp_path, "BertModel")
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["BertForQuestionAnswering"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="BertForQuestionAnswering"):
        load(path)


def test_old_tf_names_and_missing_tensors(tmp_path):
    path, hf = tiny_bert_dir(tmp_path, "BertModel", "bin")
    state = torch.load(path / "pytorch_model.bin")
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in state.items()}
    torch.save(renamed, path / "pytorch_model.bin")
    ids, _ = ragged_inputs()
    torch.testing.assert_close(run_ours(load(path), ids), run_hf(hf, ids)[0], atol=1e-4, rtol=0)
    del renamed["encoder.layer.1.attention.self.key.weight"]
    torch.save(renamed, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="qkv"):
        load(path)


@pytest.mark.parametrize("mode", ["cls", "mean", "max", "mean_sqrt_len", "lasttoken"])
def test_pooling_matches_a_loop(mode):
    torch.manual_seed(0)
    lens = [3, 1, 6, 2]
    hidden = torch.randn(sum(lens), 8)
    segments = hidden.split(lens)
    expected = {
        "cls": lambda s: s[0], "lasttoken": lambda s: s[-1], "max": lambda s: s.max(0).values,
        "mean": lambda s: s.mean(0), "mean_sqrt_len": lambda s: s.sum(0) / len(s) ** 0.5,
    }[mode]
    pooled = pool_hidden(hidden, torch.tensor(lens), mode)
    torch.testing.assert_close(pooled, torch.stack([expected(s) for s in segments]))


def test_pooling_config_of_minilm():
    config = read_pooling_config(resolve_model_path("all-minilm-l6-v2"))
    assert config == PoolingConfig(mode="mean", normalize=True, max_seq_length=256, lowercase=False)


def test_pooling_config_variants(tmp_path):
    assert read_pooling_config(tmp_path) == PoolingConfig()      # plain HF dir: mean pooling
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    assert read_pooling_config(tmp_path) == PoolingConfig(mode="cls", normalize=False)
    modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UnsupportedModelError, match="Dense"):
        read_pooling_config(tmp_path)


def test_minilm_hidden_states_match_transformers():
    """The real checkpoint, ids from the HF tokenizer (a test oracle only)."""
    path = resolve_model_path("all-minilm-l6-v2")
    hf = transformers.AutoModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    texts = ["A man is eating food.", "def f(x):\n    return x ** 2", "東京は日本の首都です 🍣",
             "Café naïve résumé " * 20]
    ids = [torch.tensor(tokenizer(t)["input_ids"]) for t in texts]
    ours = run_ours(load(path), ids)
    torch.testing.assert_close(ours, run_hf(hf, ids)[0], atol=1e-4, rtol=0)


def test_per_sequence_attention_equals_the_padded_reference():
    """Sequences of very different lengths (the case padding wastes most on), grouped heads too."""
    from engine.layers.attention import TorchAttention
    torch.manual_seed(0)
    lens = [2, 40, 7, 1, 23]
    for heads, kv_heads in ((4, 4), (4, 2)):
        q = torch.randn(sum(lens), heads, 8)
        k, v = torch.randn(sum(lens), kv_heads, 8), torch.randn(sum(lens), kv_heads, 8)
        reference = TorchAttention().forward(q, k, v, None, None, build_attn_metadata(lens, lens, None, 1, causal=False),
                                             0.35)
        ours = PerSequenceAttention().forward(q, k, v, None, None, SequenceSpans.of(lens), 0.35)
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    assert SequenceSpans.of([2, 3, 1]).spans == ((0, 2), (2, 5), (5, 6))


@pytest.mark.parametrize("strategy, activation", [("max", "relu"), ("sum", "relu"), ("max", "log1p_relu")])
def test_sparse_head_matches_a_loop(tmp_path, strategy, activation):
    """SPLADE: transformers' MLM logits, activated and pooled per sequence, small chunks or not."""
    path, hf = tiny_bert_dir(tmp_path, "BertForMaskedLM")
    model = load(path)
    ids, _ = ragged_inputs()
    hidden = run_ours(model, ids)
    _, out = run_hf(hf, ids)
    expected = []
    for i, n in enumerate(LENS):
        weights = torch.log1p(torch.relu(out.logits[i, :n]))
        weights = torch.log1p(weights) if activation == "log1p_relu" else weights
        expected.append(weights.max(0).values if strategy == "max" else weights.sum(0))
    for chunk in (3, 256):
        with torch.inference_mode():
            ours = model.sparse(hidden, torch.tensor(LENS), SparsePooling(strategy, activation), chunk_tokens=chunk)
        torch.testing.assert_close(ours, torch.stack(expected), atol=1e-4, rtol=0)
    with pytest.raises(UnsupportedModelError, match="SPLADE pooling"):
        SparsePooling("mean")


def test_pooling_config_of_a_sparse_encoder_and_prompts(tmp_path):
    modules = [{"idx": 0, "name": "0", "path": "", "type":
                "sentence_transformers.sparse_encoder.modules.mlm_transformer.MLMTransformer"},
               {"idx": 1, "name": "1", "path": "1_SpladePooling", "type":
                "sentence_transformers.sparse_encoder.modules.splade_pooling.SpladePooling"}]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_SpladePooling").mkdir()
    (tmp_path / "1_SpladePooling" / "config.json").write_text(json.dumps(
        {"pooling_strategy": "sum", "activation_function": "log1p_relu", "word_embedding_dimension": 99}))
    (tmp_path / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "query: ", "document": ""}, "default_prompt_name": "document"}))
    config = read_pooling_config(tmp_path)
    assert config.sparse == SparsePooling("sum", "log1p_relu")
    assert config.prompts == {"query": "query: ", "document": ""} and config.default_prompt_name == "document"
    (tmp_path / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "query: "}, "default_prompt_name": "passage"}))
    with pytest.raises(UnsupportedModelError, match="default_prompt_name 'passage'"):
        read_pooling_config(tmp_path)
