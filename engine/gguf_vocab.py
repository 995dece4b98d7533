"""A `tokenizers.Tokenizer` built from a bare vocabulary: GGUF metadata, a sentencepiece model
(Llama's BPE `tokenizer.model`, T5's Unigram `spiece.model`) or a WordPiece vocab.txt.

A GGUF file carries no tokenizer.json, only llama.cpp's description of one: the token strings,
their types, and either BPE merges (`tokenizer.ggml.model == "gpt2"`, byte-level) or
sentencepiece scores (`"llama"`). A sentencepiece `tokenizer.model` is that second kind, so it
is first read into the same GGUF-shaped dict and then built by the same code.

The normalizer / pre-tokenizer / decoder chosen here are the ones the model's own
tokenizer.json would have, so ids and text round-trip as Hugging Face's tokenizers do.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

import sentencepiece
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

# Token types, llama.cpp's numbering (the same as sentencepiece's piece types).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPACE_MARKER = "\u2581"  # sentencepiece writes " " as "▁"

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> how text is cut into words before the merges run. None is GPT-2's
# own regex (built into ByteLevel); "digits" is GPT-2's regex after splitting off every digit
# (StarCoder's vocabulary, which SmolLM reuses, has no multi-digit tokens).
_WORD_SPLITS = {
    "default": None, "gpt-2": None,
    "smollm": "digits", "starcoder": "digits", "refact": "digits",
    "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}
# Llama 3 looks a whole word up in the vocabulary before merging (its tokenizer.json says
# "ignore_merges"; llama.cpp does the same for this pre-tokenizer).
_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3"}


def build_tokenizer(metadata: dict[str, Any]) -> Tokenizer:
    """The tokenizer a GGUF-shaped metadata dict describes (no BOS/EOS post-processing yet)."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(metadata)
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(metadata)
    else:
        raise ValueError(f"GGUF tokenizer.ggml.model {kind!r} is not supported (supported: gpt2, llama)")
    _add_typed_tokens(tokenizer, metadata["tokenizer.ggml.tokens"], metadata.get("tokenizer.ggml.token_type"))
    return tokenizer


def _byte_level_bpe(metadata: dict[str, Any]) -> Tokenizer:
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in _WORD_SPLITS:
        raise ValueError(f"GGUF tokenizer.ggml.pre {pre!r} is not supported "
                         f"(supported: {', '.join(sorted(_WORD_SPLITS))})")
    tokens = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ", 1)) for merge in metadata["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges,
                                     ignore_merges=pre in _IGNORE_MERGES))
    split = _WORD_SPLITS[pre]
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == "digits":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(metadata: dict[str, Any]) -> Tokenizer:
    tokens = metadata["tokenizer.ggml.tokens"]
    types = metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    merges = _merges_from_scores(tokens, metadata["tokenizer.ggml.scores"], types)
    tokenizer = Tokenizer(models.BPE(
        vocab={token: i for i, token in enumerate(tokens)}, merges=merges,
        unk_token=tokens[unk_id] if unk_id is not None else None, fuse_unk=True, byte_fallback=True))
    # "first": the space marker goes before the text's first word only, not again after
    # every special token (Hugging Face's non-legacy Llama tokenizer).
    add_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPACE_MARKER, prepend_scheme="first" if add_prefix else "never", split=False)
    steps = [decoders.Replace(SPACE_MARKER, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:  # the space the encoder added is not part of the text
        steps.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Sentencepiece BPE has no merge list: at each step it joins the adjacent pair whose union
    is the best-scored piece. As a ranked list of merges that is every split of every normal
    piece into two known pieces, best-scored piece first (ties: lower id first)."""
    known = {token: i for i, token in enumerate(tokens)}
    ranked = sorted((i for i, token in enumerate(tokens) if types[i] == NORMAL and len(token) > 1),
                    key=lambda i: -scores[i])
    merges = []
    for i in ranked:
        piece = tokens[i]
        merges.extend((piece[:k], piece[k:]) for k in range(1, len(piece))
                      if piece[:k] in known and piece[k:] in known)
    return merges


def _add_typed_tokens(tokenizer: Tokenizer, tokens: list[str], types: list[int] | None) -> None:
    """Control and unknown tokens become special added tokens (matched whole in text, dropped by
    skip_special_tokens); user-defined ones are matched whole but are ordinary text."""
    if not types:
        return
    special = [AddedToken(t, special=True, normalized=False)
               for t, kind in zip(tokens, types) if kind in (CONTROL, UNKNOWN)]
    plain = [AddedToken(t, special=False, normalized=False)
             for t, kind in zip(tokens, types) if kind == USER_DEFINED]
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(plain)


def sentencepiece_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """A sentencepiece `tokenizer.model`, read with `sentencepiece`, as GGUF-shaped metadata."""
    processor = sentencepiece.SentencePieceProcessor(model_file=os.fspath(path))
    proto = _sentencepiece_proto_facts(processor.serialized_model_proto())
    if proto["model_type"] != _SPM_BPE:
        raise ValueError(f"{path}: only BPE sentencepiece models (Llama, Mistral) are supported, "
                         f"this one has model_type {proto['model_type']}")
    n = processor.get_piece_size()
    special_ids = {key: getattr(processor, name)() for key, name in (
        ("bos_token_id", "bos_id"), ("eos_token_id", "eos_id"),
        ("unknown_token_id", "unk_id"), ("padding_token_id", "pad_id"))}
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [processor.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [processor.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": proto["piece_types"],
        "tokenizer.ggml.add_space_prefix": proto["add_dummy_prefix"],
        **{f"tokenizer.ggml.{key}": i for key, i in special_ids.items() if i >= 0},
    }


def t5_tokenizer(path: str | os.PathLike, extra_ids: int) -> tuple[Tokenizer, dict[str, str]]:
    """T5's `spiece.model` (sentencepiece Unigram) as transformers' T5Tokenizer builds it, with
    its named special tokens ({"eos_token": "</s>", ...}).

    The pieces keep their ids and scores; `extra_ids` sentinels follow at the top of the
    vocabulary in reverse (<extra_id_0> is the last id), special tokens like the control pieces
    (<pad>, </s>). Text is normalized by the model's own rules (its precompiled charsmap), cut
    at whitespace, each word marked with "▁", and `</s>` is appended (no BOS)."""
    processor = sentencepiece.SentencePieceProcessor(model_file=os.fspath(path))
    proto = _sentencepiece_proto_facts(processor.serialized_model_proto())
    if proto["model_type"] != _SPM_UNIGRAM:
        raise ValueError(f"{path}: a T5 spiece.model is a Unigram sentencepiece model, this one has "
                         f"model_type {proto['model_type']}")
    num_pieces = processor.get_piece_size()
    pieces = [processor.id_to_piece(i) for i in range(num_pieces)]
    sentinels = [f"<extra_id_{i}>" for i in range(extra_ids - 1, -1, -1)]
    vocab = [(piece, processor.get_score(i)) for i, piece in enumerate(pieces)] + [(s, 0.0) for s in sentinels]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=processor.unk_id(), byte_fallback=False))
    if proto["precompiled_charsmap"]:
        tokenizer.normalizer = normalizers.Precompiled(proto["precompiled_charsmap"])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement=SPACE_MARKER, prepend_scheme="always", split=True)])
    tokenizer.decoder = decoders.Metaspace(replacement=SPACE_MARKER, prepend_scheme="always", split=True)
    eos = pieces[processor.eos_id()]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", eos], pair=["$A", eos, "$B", eos], special_tokens=[(eos, processor.eos_id())])
    _add_typed_tokens(tokenizer, pieces, proto["piece_types"])
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in reversed(sentinels)])
    ids = {"eos_token": processor.eos_id(), "unk_token": processor.unk_id(), "pad_token": processor.pad_id()}
    return tokenizer, {name: pieces[i] for name, i in ids.items() if i >= 0}


def wordpiece_tokenizer(vocab_file: str | os.PathLike, special_tokens: dict[str, str],
                        config: dict[str, Any]) -> Tokenizer:
    """BERT's tokenizer from its vocab.txt (one token per line, the line number is its id), with
    the options tokenizer_config.json gives BertTokenizer."""
    with open(vocab_file, encoding="utf-8") as f:
        vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token=special_tokens["unk_token"], max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=config.get("tokenize_chinese_chars", True),
        strip_accents=config.get("strip_accents"), lowercase=config.get("do_lower_case", True))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    cls, sep = special_tokens["cls_token"], special_tokens["sep_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    return tokenizer


# --- the few facts `SentencePieceProcessor` does not expose, read from the model's protobuf ---
# (ModelProto: 1 pieces {1 piece, 2 score, 3 type}, 2 trainer_spec {3 model_type},
#  3 normalizer_spec {2 precompiled_charsmap, 3 add_dummy_prefix}). protobuf is not one of our
#  dependencies.

_SPM_UNIGRAM, _SPM_BPE = 1, 2


def _sentencepiece_proto_facts(serialized: bytes) -> dict[str, Any]:
    facts = {"model_type": _SPM_UNIGRAM, "add_dummy_prefix": True, "piece_types": [],
             "precompiled_charsmap": b""}
    for field, value in _proto_fields(serialized):
        if field == 1:
            facts["piece_types"].append(dict(_proto_fields(value)).get(3, NORMAL))
        elif field == 2:
            facts["model_type"] = dict(_proto_fields(value)).get(3, _SPM_UNIGRAM)
        elif field == 3:
            spec = dict(_proto_fields(value))
            facts["add_dummy_prefix"] = bool(spec.get(3, True))
            facts["precompiled_charsmap"] = spec.get(2, b"")
    return facts


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) pairs of one protobuf message: ints for varints, bytes otherwise."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire in (1, 5):  # fixed 64 / 32 bits (scores are floats; we take those from the processor)
            size = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise ValueError(f"malformed sentencepiece model (protobuf wire type {wire})")
        yield key >> 3, value


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
