"""Factories shared by the tests: tiny random checkpoints of every family (saved by
transformers, the reference), a tiny tokenizer, and sequences/schedulers with no model."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Before anything decorates a Triton kernel: on a CPU machine kernels run in Triton's
    # interpreter (tests/test_triton_attention.py checks them against the reference).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine.kv_cache import BlockManager
from engine.scheduler import PrefillCap, Scheduler
from engine.sequence import Sequence

TINY_VOCAB = 384
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_CORPUS = [
    "The cat sat on the mat. The dog sat on the log.",
    "def add(a, b):\n    return a + b\n",
    "Once upon a time there was a tiny model that served many requests at once.",
    "Paged attention keeps keys and values in fixed-size blocks.",
] * 20


def write_tiny_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer.json trained on a small corpus, with chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "add_bos_token": False, "chat_template": CHAT_TEMPLATE}))


# Tiny Mixture-of-Experts variants (engine/models/moe.py), each a family name for tiny_hf_model:
# between them top-1 and top-2, with and without renormalized router weights, a shared expert.
MOE_VARIANTS = {
    "mixtral": "top-2 of 4, renormalized (always, in Mixtral), sliding window 12",
    "qwen2_moe": "top-2 of 4, not renormalized, shared expert; layer 1 dense (mlp_only_layers)",
    "qwen2_moe_top1": "top-1 of 4, renormalized (norm_topk_prob), shared expert",
    "olmoe": "top-2 of 8, not renormalized, QK-norm",
    "olmoe_top1": "top-1 of 4, not renormalized, QK-norm, clip_qkv 1.5",
}


def tiny_hf_model(family: str, **overrides):
    """A tiny random transformers model of a family: llama, llama3 (rope scaling), mistral,
    qwen2, gpt2, or one of MOE_VARIANTS. Weights are drawn wide (std 0.2) so attention patterns
    really matter; MoE models' norm weights are drawn too (1 +- 0.2), so the QK-norms count."""
    import transformers as tf
    common = dict(vocab_size=TINY_VOCAB, initializer_range=0.2, bos_token_id=0, eos_token_id=2)
    llama_like = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    configs = {
        "llama": lambda: tf.LlamaConfig(**common, **llama_like),
        "llama3": lambda: tf.LlamaConfig(**common, **llama_like, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
        "mistral": lambda: tf.MistralConfig(**common, **{**llama_like, "num_key_value_heads": 1},
                                            sliding_window=12),
        "qwen2": lambda: tf.Qwen2Config(**common, **llama_like, tie_word_embeddings=True),
        "gpt2": lambda: tf.GPT2Config(**common, n_embd=64, n_layer=2, n_head=4, n_positions=512),
        "mixtral": lambda: tf.MixtralConfig(**common, **llama_like, num_local_experts=4,
                                            num_experts_per_tok=2, sliding_window=12),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(
            **common, **llama_like, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=96, norm_topk_prob=False, mlp_only_layers=[1]),
        "qwen2_moe_top1": lambda: tf.Qwen2MoeConfig(
            **common, **llama_like, num_experts=4, num_experts_per_tok=1, moe_intermediate_size=32,
            shared_expert_intermediate_size=96, norm_topk_prob=True),
        "olmoe": lambda: tf.OlmoeConfig(**common, **llama_like, num_experts=8, num_experts_per_tok=2,
                                        norm_topk_prob=False),
        "olmoe_top1": lambda: tf.OlmoeConfig(**common, **llama_like, num_experts=4, num_experts_per_tok=1,
                                             norm_topk_prob=False, clip_qkv=1.5),
    }
    config = configs[family]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model_cls = {"gpt2": tf.GPT2LMHeadModel, "mistral": tf.MistralForCausalLM,
                 "qwen2": tf.Qwen2ForCausalLM, "mixtral": tf.MixtralForCausalLM,
                 "qwen2_moe": tf.Qwen2MoeForCausalLM, "qwen2_moe_top1": tf.Qwen2MoeForCausalLM,
                 "olmoe": tf.OlmoeForCausalLM, "olmoe_top1": tf.OlmoeForCausalLM}.get(family, tf.LlamaForCausalLM)
    model = model_cls(config).eval()
    if family in MOE_VARIANTS:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.copy_(1 + 0.2 * torch.randn_like(param))
    return model


# Tiny T5 variants (engine/models/t5.py), each a family name for tiny_t5_model: both FFN kinds,
# tied and untied heads, and two position-bucket settings (32 buckets to distance 128, as every
# T5 has; 8 to distance 20, so that test lengths reach the logarithmic buckets and the last).
T5_VARIANTS = {
    "t5": "v1.0: ReLU FFN, head tied to the shared embedding (read at d_model**-0.5), buckets 32/128",
    "t5_buckets8": "v1.0 with 8 buckets to distance 20, 3 decoder layers over 2 encoder layers",
    "flan_t5": "v1.1 / Flan-T5: gated-GELU FFN, a head of its own, buckets 32/128",
    "flan_t5_buckets8": "v1.1 with 8 buckets to distance 20",
    "t5_gated_tied": "gated-GELU with the head tied and not rescaled (what transformers 5 builds for "
                     "tie_word_embeddings=false)",
}
T5_VOCAB = 320                    # the tiny spiece.model's pieces and 10 sentinels, padded like T5's


def tiny_t5_model(variant: str, **overrides):
    """A tiny random T5ForConditionalGeneration (T5_VARIANTS). The position-bias tables and the
    norm weights are drawn wide, so position and normalization really matter."""
    import transformers as tf
    gated = variant.startswith("flan") or variant == "t5_gated_tied"
    small_buckets = variant.endswith("buckets8")
    config = tf.T5Config(
        vocab_size=T5_VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2,
        num_decoder_layers=3 if variant == "t5_buckets8" else 2, num_heads=4,
        feed_forward_proj="gated-gelu" if gated else "relu", tie_word_embeddings=not gated,
        relative_attention_num_buckets=8 if small_buckets else 32,
        relative_attention_max_distance=20 if small_buckets else 128,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = tf.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("relative_attention_bias.weight"):
                param.normal_(std=1.0)
            elif name.endswith("layer_norm.weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
        if gated and variant != "t5_gated_tied":       # transformers 5 ties the head: untie it
            model.lm_head.weight = torch.nn.Parameter(0.05 * torch.randn_like(model.shared.weight))
    return model


def write_tiny_t5_tokenizer(directory: Path, extra_ids: int = 10) -> None:
    """T5's tokenizer files: a sentencepiece Unigram spiece.model trained on the repository's own
    text (benchmarks/sentences.py) with T5's special ids (<pad> 0, </s> 1, <unk> 2) and no BOS,
    and a tokenizer_config.json naming extra_ids sentinels."""
    import sentencepiece
    from benchmarks.sentences import mixed_sentences
    directory.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(mixed_sentences(600)), model_prefix=str(directory / "spiece"),
        model_type="unigram", vocab_size=T5_VOCAB - extra_ids - 10, hard_vocab_limit=False,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    (directory / "spiece.vocab").unlink()
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "extra_ids": extra_ids}))


def save_tiny_t5_checkpoint(variant: str, directory: Path, safe_serialization: bool = True, **overrides) -> Path:
    tiny_t5_model(variant, **overrides).save_pretrained(directory, safe_serialization=safe_serialization)
    write_tiny_t5_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_t5_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """T5 variant -> a saved tiny checkpoint directory (with its spiece.model)."""
    root = tmp_path_factory.mktemp("tiny-t5")
    return {variant: save_tiny_t5_checkpoint(variant, root / variant) for variant in T5_VARIANTS}


def save_tiny_checkpoint(family: str, directory: Path, safe_serialization: bool = True, **overrides) -> Path:
    model = tiny_hf_model(family, **overrides)
    model.save_pretrained(directory, safe_serialization=safe_serialization)
    write_tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="session", autouse=True)
def cpu_kernels_built():
    """Build this CPU's kernels before any test starts a server that would load (and, the first
    time, compile) them within its startup deadline. `make test` has built them already."""
    from engine import kernels
    kernels.load()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """family -> a saved tiny checkpoint directory (with tokenizer), made once per session."""
    root = tmp_path_factory.mktemp("tiny")
    return {family: save_tiny_checkpoint(family, root / family)
            for family in ("llama", "llama3", "mistral", "qwen2", "gpt2")}


@pytest.fixture(scope="session")
def tiny_moe_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """MoE variant -> a saved tiny checkpoint directory (one tensor per expert, with tokenizer)."""
    root = tmp_path_factory.mktemp("tiny-moe")
    return {variant: save_tiny_checkpoint(variant, root / variant) for variant in MOE_VARIANTS}


@pytest.fixture(scope="session")
def tiny_llama(tiny_checkpoints) -> Path:
    return tiny_checkpoints["llama"]


# -- tiny BERT-family encoders with a real vocabulary -------------------------------------

MINILM_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def save_tiny_bert(directory: Path, architecture: str, **overrides) -> Path:
    """A random tiny BERT of `architecture` saved by transformers, with all-MiniLM-L6-v2's
    tokenizer (a real WordPiece vocabulary: [MASK], pairs, real words). Weights are drawn wide
    (std 0.5) so scores of different inputs differ well beyond any tolerance a test uses."""
    import shutil

    import transformers

    from engine.loader import resolve_model_path
    fields = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=128, initializer_range=0.5)
    config = transformers.BertConfig(**{**fields, **overrides})
    torch.manual_seed(0)
    getattr(transformers, architecture)(config).eval().save_pretrained(directory)
    source = resolve_model_path("all-minilm-l6-v2")
    for name in MINILM_TOKENIZER_FILES:
        shutil.copy(source / name, directory / name)
    return directory


@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory) -> Path:
    """A random one-label BertForSequenceClassification: sentence-transformers' CrossEncoder."""
    return save_tiny_bert(tmp_path_factory.mktemp("cross-encoder") / "model", "BertForSequenceClassification",
                          num_labels=1)


@pytest.fixture(scope="session")
def tiny_mlm(tmp_path_factory) -> Path:
    """A random BertForMaskedLM: fill-mask, and SPLADE when read as such. (std 0.2: wide
    enough for fill-mask probabilities to differ, narrow enough for SPLADE weights of ~1 to stay
    within fp32's 1e-5 of the reference after its additions in another order.)"""
    return save_tiny_bert(tmp_path_factory.mktemp("mlm") / "model", "BertForMaskedLM", initializer_range=0.2)


@pytest.fixture(scope="session")
def tiny_splade(tmp_path_factory, tiny_mlm) -> Path:
    """tiny_mlm saved by sentence-transformers as a SparseEncoder (MLM + SpladePooling max)."""
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import MLMTransformer, SpladePooling
    directory = tmp_path_factory.mktemp("splade") / "model"
    SparseEncoder(modules=[MLMTransformer(str(tiny_mlm)), SpladePooling("max")], device="cpu").save(str(directory))
    return directory


# -- engine pieces without a model -----------------------------------------------------

def make_seq(seq_id: int, num_prompt_tokens: int, max_tokens: int = 16, first_token: int = 0,
             request_id: str | None = None) -> Sequence:
    """A sequence whose prompt is distinct per seq_id unless first_token says otherwise."""
    tokens = [first_token + seq_id * 1000 + i for i in range(num_prompt_tokens)]
    return Sequence(seq_id, request_id or f"r{seq_id}", tokens, num_prompt_tokens, max_tokens)


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8,
                   max_num_batched_tokens: int = 32, prefix_caching: bool = True,
                   max_prefill_tokens: int | PrefillCap | None = None) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size, prefix_caching), max_num_seqs,
                     max_num_batched_tokens, max_prefill_tokens)
