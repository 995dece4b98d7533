"""Tokenizers, chat templates and the streaming detokenizer.

Every vocabulary becomes one `tokenizers.Tokenizer`: a Hugging Face `tokenizer.json` as is, a
WordPiece `vocab.txt`, and (through `engine.gguf_vocab`) a sentencepiece `tokenizer.model`, T5's
`spiece.model`, or the vocabulary embedded in a GGUF file. The serving path never imports `transformers`; tests
compare against it.
"""
from __future__ import annotations

import functools
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, processors

from engine import gguf_vocab
from engine.config import read_json_file

# Named special tokens as tokenizer_config.json spells them; chat templates see them by name.
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
_BERT_SPECIALS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                  "cls_token": "[CLS]", "mask_token": "[MASK]"}
_GGUF_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                     "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}
# A GGUF has no generation_config.json; like llama.cpp, treat these control tokens as ends of
# generation too (chat models end a turn with them rather than with the EOS token).
_END_OF_TURN = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<|endoftext|>", "<end_of_turn>")


class Tokenizer:
    """Text <-> token ids for one model, with its special tokens and chat template."""

    def __init__(self, backend: tokenizers.Tokenizer, special_tokens: dict[str, str], *,
                 add_bos: bool | None = None, add_eos: bool | None = None,
                 extra_eos_ids: Sequence[int] = (), chat_templates: dict[str, str] | None = None):
        """add_bos / add_eos: None keeps the backend's own post-processor (tokenizer.json's)."""
        self._backend = backend
        backend.no_padding()      # some tokenizer.json files pad/truncate every encode to 128
        backend.no_truncation()
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens.values()])
        self.special_tokens = special_tokens  # {"bos_token": "<s>", ...}: chat templates see these
        self.bos_token_id = self._id_of("bos_token")
        self.eos_token_id = self._id_of("eos_token")
        self.pad_token_id = self._id_of("pad_token")
        if add_bos is not None or add_eos is not None or backend.post_processor is None:
            self._set_bos_eos(bool(add_bos), bool(add_eos))
        if self.eos_token_id is None and extra_eos_ids:
            self.eos_token_id = extra_eos_ids[0]
        eos = (self.eos_token_id, *extra_eos_ids)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in eos if i is not None))
        self._special_ids = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self._chat_templates = chat_templates or {}
        self.chat_template: str | None = self._chat_templates.get("default")
        self._piece_bytes = _piece_decoder(json.loads(backend.to_str()).get("decoder"))
        self.token_bytes = functools.lru_cache(maxsize=1 << 16)(self._token_bytes)

    def _id_of(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self._backend.token_to_id(token)

    def _set_bos_eos(self, add_bos: bool, add_eos: bool) -> None:
        """Encode as [BOS] text [EOS], each per its flag (Hugging Face's `update_post_processor`)."""
        add_bos = add_bos and self.bos_token_id is not None
        add_eos = add_eos and self.eos_token_id is not None
        bos, eos = self.special_tokens.get("bos_token"), self.special_tokens.get("eos_token")
        single = " ".join([f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos)
        pair = " ".join([single] + [f"{bos}:1"] * add_bos + ["$B:1"] + [f"{eos}:1"] * add_eos)
        specials = [(bos, self.bos_token_id)] * add_bos + [(eos, self.eos_token_id)] * add_eos
        self._backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=specials)

    # --- loading ---

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """A Hugging Face checkpoint dir: tokenizer.json, else tokenizer.model, else T5's
        spiece.model, else vocab.txt."""
        path = Path(path)
        config = {**read_json_file(path / "special_tokens_map.json"), **read_json_file(path / "tokenizer_config.json")}
        backend, special_tokens, add_bos = _dir_backend(path, config)
        generation = read_json_file(path / "generation_config.json")
        return cls(backend, special_tokens, add_bos=add_bos, add_eos=config.get("add_eos_token"),
                   extra_eos_ids=_as_ids(generation.get("eos_token_id")),
                   chat_templates=_dir_chat_templates(path, config))

    @classmethod
    def from_gguf_metadata(cls, metadata: dict[str, Any]) -> "Tokenizer":
        """The tokenizer embedded in a GGUF file; metadata = {key: field.contents()}."""
        backend = gguf_vocab.build_tokenizer(metadata)
        tokens = metadata["tokenizer.ggml.tokens"]
        types = metadata.get("tokenizer.ggml.token_type") or []
        special_tokens = {}
        for name, key in _GGUF_SPECIAL_IDS.items():
            token_id = metadata.get(f"tokenizer.ggml.{key}")
            if token_id is not None and 0 <= token_id < len(tokens):
                special_tokens[name] = tokens[token_id]
        ends = [metadata.get(f"tokenizer.ggml.{key}") for key in ("eot_token_id", "eom_token_id")]
        ends += [i for i, (t, kind) in enumerate(zip(tokens, types))
                 if kind == gguf_vocab.CONTROL and t in _END_OF_TURN]
        is_sentencepiece = metadata["tokenizer.ggml.model"] == "llama"
        templates = {key.removeprefix("tokenizer.chat_template."): value for key, value in metadata.items()
                     if key.startswith("tokenizer.chat_template.")}
        if "tokenizer.chat_template" in metadata:
            templates["default"] = metadata["tokenizer.chat_template"]
        return cls(backend, special_tokens,
                   add_bos=metadata.get("tokenizer.ggml.add_bos_token", is_sentencepiece),
                   add_eos=metadata.get("tokenizer.ggml.add_eos_token", False),
                   extra_eos_ids=[i for i in ends if i is not None], chat_templates=templates)

    # --- encoding and decoding ---

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_pair(self, first: str, second: str, max_length: int | None = None, strategy: str = "longest_first",
                    direction: str = "right", max_second: int | None = None) -> tuple[list[int], list[int]]:
        """(ids, token type ids) of a pair as the model's template joins it ([CLS] first [SEP]
        second [SEP] for BERT: types 0 then 1). With max_length (special tokens included) the
        texts are cut as transformers' tokenizers cut them: "longest_first" takes from the longer
        text (both to half when each is too long), "only_second" from the second alone; ValueError
        when they cannot fit. direction "left" cuts a text's start instead of its end; max_second
        cuts the second text to that many tokens first (Cohere's max_tokens_per_doc)."""
        a = self._backend.encode(first, add_special_tokens=False)
        b = self._backend.encode(second, add_special_tokens=False)
        if max_second is not None:
            b.truncate(max_second, direction=direction)
        if max_length is not None:
            room = max_length - self.num_special_tokens(pair=True)
            n1, n2 = pair_lengths(len(a.ids), len(b.ids), room, strategy)
            a.truncate(n1, direction=direction)
            b.truncate(n2, direction=direction)
        pair = self._backend.post_process(a, b, add_special_tokens=True)
        return pair.ids, pair.type_ids

    def num_special_tokens(self, pair: bool = False) -> int:
        """Special tokens the template adds to one text (or to a pair)."""
        processor = self._backend.post_processor
        return 0 if processor is None else processor.num_special_tokens_to_add(pair)

    def encode_with_offsets(self, text: str, add_special_tokens: bool = True) -> list[tuple[int, int, int]]:
        """(id, start, stop), character offsets into `text`; added special tokens get (id, 0, 0)."""
        encoding = self._backend.encode(text, add_special_tokens=add_special_tokens)
        return [(i, start, stop) for i, (start, stop) in zip(encoding.ids, encoding.offsets)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        """The whole tokenizer as tokenizers' JSON (what service/tokenize_worker.py loads)."""
        return self._backend.to_str()

    def _token_bytes(self, token_id: int) -> bytes:
        """The bytes this token stands for, exactly: a token holding part of a character has
        those bytes, where decode() would write U+FFFD (OpenAI's logprobs `bytes`)."""
        piece = self._backend.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self._special_ids:
            return piece.encode()
        return self._piece_bytes(piece)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    # --- chat ---

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text for a conversation, rendered by the model's jinja2 chat template.

        kwargs reach the template as variables (tools, documents, ...); `chat_template` picks a
        named template or passes one literally. Raises ValueError when there is no template or
        the template rejects the conversation (raise_exception)."""
        template = self._pick_template(kwargs.pop("chat_template", None), kwargs.get("tools"))
        variables = {"tools": None, "documents": None, **self.special_tokens, **kwargs}
        try:
            return _compile_template(template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template error: {e}") from e

    def chat_template_source(self, tools: Any = None) -> str:
        """The template a conversation (offered these tools) renders through; ValueError if none."""
        return self._pick_template(None, tools)

    def _pick_template(self, requested: str | None, tools: Any) -> str:
        if requested is not None:
            return self._chat_templates.get(requested, requested)
        if tools and "tool_use" in self._chat_templates:
            return self._chat_templates["tool_use"]
        if self.chat_template is None:
            raise ValueError("this model has no chat template (none in tokenizer_config.json, "
                             "chat_template.jinja or the GGUF metadata); send a plain prompt instead")
        return self.chat_template


def pair_lengths(n1: int, n2: int, room: int, strategy: str) -> tuple[int, int]:
    """How many tokens of each text a pair keeps in `room` tokens, as the tokenizers library
    truncates: "longest_first" keeps a short text whole and cuts the longer one, or halves the
    room when both are long (an odd token to the longer); "only_second" cuts the second."""
    if n1 + n2 <= room:
        return n1, n2
    if strategy == "only_second":
        if n1 >= room:
            raise ValueError(f"the first text alone has {n1} tokens: no room for the second in {room}")
        return n1, room - n1
    if strategy != "longest_first":
        raise ValueError(f"truncation strategy must be longest_first or only_second, got {strategy!r}")
    if room < 2:
        raise ValueError(f"a pair needs at least 2 tokens of room, got {room}")
    short, long = sorted((n1, n2))
    short, long = (room // 2, room // 2 + room % 2) if short > room // 2 else (short, room - short)
    return (short, long) if n1 <= n2 else (long, short)


class IncrementalDetokenizer:
    """The text of a token stream, one token at a time, never splitting a UTF-8 character.

    Each step decodes only a short window of recent ids, twice (the vLLM/TGI way):

        ids:  ... | prefix_offset ...... read_offset | new token
                    already emitted, decoded again     decoded with that context;
                    as context (a leading space        what it adds to the text is
                    marker must stay a space)          the new text

    The window then slides to start at the old read_offset. While the new text ends in U+FFFD
    the bytes so far do not yet form a character, so nothing is emitted and the window grows.
    """

    _CONTEXT = 5  # prompt ids decoded before the first generated one

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids = self._context(list(prompt_ids))
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        # A prompt cut inside a character: its last bytes belong to the first new character.
        while self._read_offset and self._decode(self._ids[:self._read_offset]).endswith("\ufffd"):
            self._read_offset -= 1
        self._parts: list[str] = []

    def _context(self, prompt_ids: list[int]) -> list[int]:
        """The prompt's last few ids, starting on a character (ids that begin inside one decode to
        U+FFFD, and byte-fallback decoding turns the whole byte run into U+FFFD then)."""
        start = max(len(prompt_ids) - self._CONTEXT, 0)
        lowest = max(len(prompt_ids) - 2 * self._CONTEXT, 0)
        while start > lowest and self._decode(prompt_ids[start:]).startswith("\ufffd"):
            start -= 1
        return prompt_ids[start:]

    def push(self, token_id: int) -> str:
        """The new text this token completes; "" while its bytes do not yet form a character."""
        self._ids.append(token_id)
        return self._advance(allow_partial=False)

    def flush(self) -> str:
        """At the end of a stream: whatever is held back (bytes that never formed a character
        come out as U+FFFD, as decode() writes them)."""
        return self._advance(allow_partial=True)

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._parts)

    def _advance(self, allow_partial: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not allow_partial):
            return ""
        delta = new_text[len(prefix_text):]
        self._ids = self._ids[self._read_offset:]  # only the window is kept: O(1) per token
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        self._parts.append(delta)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)


# --- token bytes ---

def _piece_decoder(decoder: dict | None):
    """A vocabulary piece -> its bytes, by how the tokenizer's decoder reads pieces: byte-level
    BPE (GPT-2, Llama 3, Qwen2, SmolLM2) maps each character back to one byte; sentencepiece
    pieces spell a space as "▁" and bytes they lack as "<0xNN>" (byte fallback)."""
    kinds = _decoder_kinds(decoder)
    if "ByteLevel" in kinds:
        alphabet = _byte_level_alphabet()
        return lambda piece: bytes(alphabet.get(ch, ord("?")) for ch in piece)

    def sentencepiece_bytes(piece: str) -> bytes:
        if "ByteFallback" in kinds and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        if "WordPiece" in kinds and piece.startswith("##"):
            return piece[2:].encode()
        return piece.replace("\u2581", " ").encode()
    return sentencepiece_bytes


def _decoder_kinds(decoder: dict | None) -> set[str]:
    if not decoder:
        return set()
    return {decoder.get("type", ""), *(k for d in decoder.get("decoders", []) for k in _decoder_kinds(d))}


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE writes each byte as one printable character: the printable Latin-1 bytes
    as themselves, the other 68 as the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


# --- checkpoint-dir helpers ---

def _token_text(value: str | dict) -> str:
    """tokenizer_config.json writes a token as a string or as an AddedToken dict."""
    return value["content"] if isinstance(value, dict) else value


def _as_ids(value: int | list[int] | None) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def _add_config_tokens(backend: tokenizers.Tokenizer, config: dict[str, Any]) -> None:
    """Tokens tokenizer_config.json adds on top of a bare vocabulary (tokenizer.json has its own)."""
    for entry in config.get("added_tokens_decoder", {}).values():
        token = AddedToken(entry["content"], special=entry.get("special", False),
                           normalized=entry.get("normalized", False), lstrip=entry.get("lstrip", False),
                           rstrip=entry.get("rstrip", False), single_word=entry.get("single_word", False))
        backend.add_tokens([token])
    extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
    if isinstance(extra, list):
        backend.add_special_tokens([AddedToken(_token_text(t), special=True, normalized=False) for t in extra])


def _dir_backend(path: Path, config: dict[str, Any]) -> tuple[tokenizers.Tokenizer, dict[str, str], bool | None]:
    """(backend, named special tokens, add_bos) from the first tokenizer file the dir has."""
    named = {name: _token_text(config[name]) for name in _SPECIAL_NAMES if config.get(name)}
    add_bos = config.get("add_bos_token")
    if (path / "tokenizer.json").is_file():
        return tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")), named, add_bos
    if (path / "tokenizer.model").is_file():
        metadata = gguf_vocab.sentencepiece_metadata(path / "tokenizer.model")
        if config.get("add_prefix_space") is not None:
            metadata["tokenizer.ggml.add_space_prefix"] = config["add_prefix_space"]
        backend = gguf_vocab.build_tokenizer(metadata)
        tokens = metadata["tokenizer.ggml.tokens"]
        named = {**{name: tokens[metadata[f"tokenizer.ggml.{key}"]] for name, key in _GGUF_SPECIAL_IDS.items()
                    if f"tokenizer.ggml.{key}" in metadata}, **named}
        add_bos = True if add_bos is None else add_bos  # sentencepiece models start with <s>
    elif (path / "spiece.model").is_file():
        backend, spm_named = gguf_vocab.t5_tokenizer(path / "spiece.model", _t5_extra_ids(config))
        named = {**spm_named, **named}
    elif (path / "vocab.txt").is_file():
        named = {**_BERT_SPECIALS, **named}
        backend = gguf_vocab.wordpiece_tokenizer(path / "vocab.txt", named, config)
    else:
        raise FileNotFoundError(f"{path}: no tokenizer.json, tokenizer.model or vocab.txt")
    _add_config_tokens(backend, config)  # tokenizer.json lists its own; bare vocabularies do not
    return backend, named, add_bos


def _t5_extra_ids(config: dict[str, Any]) -> int:
    """How many <extra_id_N> sentinels T5's vocabulary ends with: tokenizer_config.json's
    extra_ids, else those its additional special tokens name, else T5Tokenizer's 100."""
    if config.get("extra_ids") is not None:
        return config["extra_ids"]
    extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
    named = [t for t in extra if isinstance(t, (str, dict)) and "<extra_id_" in _token_text(t)]
    return len(named) if named else 100


def _dir_chat_templates(path: Path, config: dict[str, Any]) -> dict[str, str]:
    """Named chat templates; newer transformers writes them to their own files."""
    if (path / "chat_template.jinja").is_file():
        raw = (path / "chat_template.jinja").read_text(encoding="utf-8")
    elif (path / "chat_template.json").is_file():
        raw = read_json_file(path / "chat_template.json").get("chat_template")
    else:
        raw = config.get("chat_template")
    if isinstance(raw, list):  # [{name, template}, ...]
        templates = {entry["name"]: entry["template"] for entry in raw}
    else:
        templates = {"default": raw} if raw else {}
    for extra in sorted(path.glob("additional_chat_templates/*.jinja")):
        templates.setdefault(extra.stem, extra.read_text(encoding="utf-8"))
    if templates and "default" not in templates:
        templates["default"] = next(iter(templates.values()))
    return templates


# --- chat template rendering (the environment Hugging Face templates are written for) ---

class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; here it
    just renders its body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja's own tojson escapes HTML characters, which would change the prompt text
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.cache
def _template_env() -> ImmutableSandboxedEnvironment:
    # Templates come from model repositories: untrusted code, hence the sandbox.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    try:
        return _template_env().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not parse: {e}") from e
