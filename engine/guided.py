"""Grammar-constrained decoding: per-sequence token masks from a grammar library (llguidance).

    spec = GuidedDecoding("json", schema)              # or "regex", "choice", "grammar" (Lark)
    compiled = compiler.compile(spec)                  # InvalidGrammar naming the problem
    matcher = GrammarMatcher(compiled)                 # one per sequence
    bitmask = fill_bitmask(matchers)                   # (num_matchers, ceil(vocab / 32)) int32
    logits = apply_bitmask(logits, rows, bitmask)      # disallowed tokens -> -inf
    matcher.accept(token_id)                           # after each sampled token

llguidance was picked over xgrammar by measurement (BENCHMARKS.md, "Constrained decoding"):
it refuses the JSON-schema keywords it cannot enforce (uniqueItems, not, if/then, ...) where
xgrammar ignored them and let invalid output through; it compiles a schema in under a
millisecond (xgrammar: 30-90 ms); it imports in 0.1 s with no dependency (xgrammar pulls in
transformers: 5 s). Its masks cost more per token (batch 32: ~6 ms vs ~2 ms per step on the
2-core test machine), which a decode step of any real model hides.

The vocabulary is given to the library as each token's exact bytes (Tokenizer.token_bytes),
so byte-level BPE, sentencepiece byte fallback and GGUF vocabularies all read the same way.
Special tokens get an 0xFF prefix, llguidance's mark for tokens no text can spell: a schema
never produces `<|im_end|>` by writing its characters. Rows past the tokenizer's vocabulary
(a model's padded embedding) are special too, so they are never allowed. The text a grammar
forces is tokenized for llguidance into tokens whose bytes are exactly that text (exact_tokens:
a sentencepiece tokenizer's dummy-prefix space would otherwise be forced before it).
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from engine.errors import InvalidGrammar, InvalidParameter

if TYPE_CHECKING:
    from engine.tokenizer import Tokenizer

KINDS = ("json", "regex", "choice", "grammar")
MAX_CHOICES = 1024
MAX_GRAMMAR_CHARS = 1 << 20              # of the schema's JSON, the regex, the choices or the grammar
# Whitespace a JSON value may have between its tokens: flexible (a model may pretty-print) but
# bounded, so a small model cannot spend its whole budget on spaces (vLLM's users met that).
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,16}"
_CACHE_SIZE = 256                        # compiled grammars kept (an LRU, by spec)


@dataclass(frozen=True, slots=True, eq=False)
class GuidedDecoding:
    """One constraint on a completion's text.

    kind "json": value is a JSON schema (a dict; None: any JSON object); "regex": a pattern the
    whole text matches; "choice": a list of strings, the text is one of them; "grammar": a Lark
    grammar in llguidance's dialect (%json {...} embeds a schema). `param` is the request field
    it came from, named in errors."""

    kind: str
    value: Any = None
    param: str = "guided_decoding"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InvalidParameter(self.param, f"{self.param}: unknown constraint kind {self.kind!r} "
                                   f"(one of {', '.join(KINDS)})")
        expected = {"json": (dict, type(None)), "regex": str, "choice": (list, tuple), "grammar": str}[self.kind]
        if not isinstance(self.value, expected):
            raise InvalidParameter(self.param, f"{self.param}: a {self.kind} constraint takes "
                                   f"{_describe(expected)}, got {type(self.value).__name__}")
        if self.kind == "choice":
            if not self.value or len(self.value) > MAX_CHOICES or \
                    not all(isinstance(c, str) and c for c in self.value):
                raise InvalidParameter(self.param, f"{self.param}: choices must be 1 to {MAX_CHOICES} "
                                       "non-empty strings")
        if len(self.key) > MAX_GRAMMAR_CHARS:
            raise InvalidParameter(self.param, f"{self.param}: the constraint is longer than "
                                   f"{MAX_GRAMMAR_CHARS} characters")

    @property
    def key(self) -> str:
        """What identifies the compiled grammar (the cache key)."""
        return self.kind + "\0" + json.dumps(self.value, sort_keys=True, ensure_ascii=False)

    def __eq__(self, other):
        return isinstance(other, GuidedDecoding) and (self.key, self.param) == (other.key, other.param)

    def __hash__(self):
        return hash((self.key, self.param))


def _describe(expected) -> str:
    names = {dict: "a JSON schema object", type(None): "null", str: "a string", list: "a list of strings",
             tuple: "a list of strings"}
    kinds = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(dict.fromkeys(names[k] for k in kinds))


def grammar_text(spec: GuidedDecoding) -> str:
    """The llguidance grammar (its JSON form) a constraint stands for."""
    import llguidance
    if spec.kind == "json":
        schema = {"type": "object"} if spec.value is None else spec.value
        return llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_pattern": JSON_WHITESPACE})
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.value)
    if spec.kind == "choice":
        # Lark string literals take JSON's escapes: any text is one literal.
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.value))
    return llguidance.LLMatcher.grammar_from_lark(spec.value)


@dataclass(frozen=True, slots=True, eq=False)
class CompiledGrammar:
    spec: GuidedDecoding
    prototype: Any                       # a fresh llguidance.LLMatcher; each sequence copies it


class GrammarCompiler:
    """Compiles constraints against one tokenizer's vocabulary; thread-safe, cached by spec.

    The vocabulary is handed to llguidance on first use (~0.2 s for 49k tokens), so engines
    that never see a constraint never pay it."""

    def __init__(self, tokenizer: "Tokenizer", vocab_size: int, eos_token_ids: Sequence[int]):
        self._tokenizer = tokenizer
        self.vocab_size = max(vocab_size, tokenizer.vocab_size)
        self.eos_token_ids = [i for i in dict.fromkeys(eos_token_ids) if 0 <= i < self.vocab_size]
        self._lock = threading.Lock()
        self._lltokenizer = None
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()

    def compile(self, spec: GuidedDecoding) -> CompiledGrammar:
        """Raises InvalidGrammar (param: spec.param) saying what is wrong."""
        key = spec.key
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        import llguidance
        try:
            text = grammar_text(spec)
        except (ValueError, TypeError) as exc:
            raise InvalidGrammar(spec.param, f"{spec.param}: {exc}") from None
        # Building the matcher checks the grammar (and drops Python's lock while it works).
        prototype = llguidance.LLMatcher(self.lltokenizer(), text, log_level=0)
        if prototype.is_error():
            raise InvalidGrammar(spec.param, f"{spec.param}: the {_KIND_NAMES[spec.kind]} does not compile: "
                                 f"{_first_line(prototype.get_error())}")
        compiled = CompiledGrammar(spec, prototype)
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def lltokenizer(self):
        with self._lock:
            if self._lltokenizer is None:
                self._lltokenizer = self._build_lltokenizer()
            return self._lltokenizer

    def _build_lltokenizer(self):
        import llguidance
        tokenizer = self._tokenizer
        special = [i for i in range(self.vocab_size) if i >= tokenizer.vocab_size or tokenizer.is_special(i)]
        tokens = [tokenizer.token_bytes(i) if i < tokenizer.vocab_size else b"" for i in range(self.vocab_size)]
        for i in special:
            tokens[i] = b"\xff" + (tokens[i] or f"<[{i}]>".encode())
        by_bytes = {token: i for i, token in enumerate(tokens) if token and not token.startswith(b"\xff")}

        class Vocabulary:                # what llguidance.TokenizerWrapper reads
            eos_token_id = self.eos_token_ids[0] if self.eos_token_ids else None
            bos_token_id = tokenizer.bos_token_id
            special_token_ids = special

            def __call__(self, text: str) -> list[int]:
                return exact_tokens(tokenizer, text, by_bytes)
        vocabulary = Vocabulary()
        vocabulary.tokens = tokens
        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocabulary), n_vocab=self.vocab_size,
                                      eos_token=self.eos_token_ids or None)


def exact_tokens(tokenizer: Tokenizer, text: str, by_bytes: dict[bytes, int]) -> list[int]:
    """Token ids whose bytes are exactly the text's: what llguidance needs when it tokenizes the
    text a grammar forces. The tokenizer's own ids when they are (a sentencepiece tokenizer with
    a dummy prefix adds a space: T5's, Llama 2's), else the longest vocabulary match at each
    position (not canonical, but it spells the text)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    data = text.encode()
    if b"".join(tokenizer.token_bytes(i) for i in ids) == data:
        return ids
    longest = max(map(len, by_bytes), default=0)
    out, start = [], 0
    while start < len(data):
        length = next((n for n in range(min(longest, len(data) - start), 0, -1)
                       if data[start: start + n] in by_bytes), 0)
        if not length:
            return ids                   # a byte no token spells: the tokenizer's answer is all there is
        out.append(by_bytes[data[start: start + length]])
        start += length
    return out


_KIND_NAMES = {"json": "JSON schema", "regex": "regular expression", "choice": "choice",
               "grammar": "grammar"}


def _first_line(message: str, limit: int = 500) -> str:
    # llguidance appends its parser state and the grammar after the first lines: not the client's;
    # and a message may quote a whole (huge) regex.
    message = message.split("\n<state>", 1)[0].strip()
    return message if len(message) <= limit else message[:limit] + "..."


class GrammarMatcher:
    """One sequence's place in its grammar. It advances on each accepted token, and can be
    rebuilt from the sequence's output tokens (`sync`) whenever they disagree."""

    def __init__(self, compiled: CompiledGrammar):
        self.compiled = compiled
        self._matcher = compiled.prototype.deep_copy()
        self.num_tokens = 0              # tokens accepted

    def accept(self, token_id: int) -> bool:
        """Advance; False if the grammar did not allow it (the matcher is then in error)."""
        self.num_tokens += 1
        return self._matcher.consume_token(token_id)

    def sync(self, output_token_ids: Sequence[int]) -> None:
        """Make the matcher's state the one these output tokens lead to."""
        if self.num_tokens == len(output_token_ids) and not self._matcher.is_error():
            return
        self._matcher = self.compiled.prototype.deep_copy()
        self._matcher.consume_tokens(list(output_token_ids))
        self.num_tokens = len(output_token_ids)

    @property
    def is_finished(self) -> bool:
        """Nothing more may follow: the text is complete."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    @property
    def is_accepting(self) -> bool:
        return self._matcher.is_accepting()

    @property
    def error(self) -> str | None:
        return _first_line(self._matcher.get_error()) if self._matcher.is_error() else None

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        words = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


_executor = None
_executor_lock = threading.Lock()


def fill_bitmask(matchers: Sequence[GrammarMatcher], vocab_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The allowed tokens of each matcher, one row of bits each (bit j of word w: token 32w + j),
    computed in llguidance's thread pool without Python's lock (into `out` if given)."""
    import llguidance
    global _executor
    # numpy allocates it: a torch op on the CPU may wait for a busy intra-op thread pool.
    bitmask = out if out is not None else torch.from_numpy(
        np.zeros((len(matchers), bitmask_words(vocab_size)), dtype=np.int32))
    if len(matchers) == 1:
        matchers[0].fill(bitmask, 0)
        return bitmask
    with _executor_lock:
        if _executor is None:
            _executor = llguidance.LLExecutor()
    _executor.unsafe_compute_mask_ptr([(m._matcher, i) for i, m in enumerate(matchers)],
                                      bitmask.data_ptr(), bitmask.shape[1] * 4, len(matchers))
    return bitmask


def disallow(bitmask: torch.Tensor, row: int, token_ids: Sequence[int]) -> None:
    """Clear these tokens' bits in one row, in place."""
    words = bitmask.numpy().view(np.uint32)
    for token_id in token_ids:
        words[row, token_id // 32] &= np.uint32(~(1 << (token_id % 32)) & 0xFFFFFFFF)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> np.ndarray:
    """(rows, words) int32 bits -> (rows, vocab_size) bool, True where allowed."""
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, bitorder="little")
    return bits[:, :vocab_size].view(np.bool_)


def apply_bitmask(logits: torch.Tensor, rows: Sequence[int], bitmask: torch.Tensor) -> torch.Tensor:
    """logits (num_rows, vocab) with every token a row's mask forbids at -inf (a new tensor);
    rows[i] is the logits row bitmask[i] applies to, the other rows are left as they are."""
    num_rows, vocab = logits.shape
    allowed = np.ones((num_rows, vocab), dtype=np.bool_)
    allowed[list(rows)] = unpack_bitmask(bitmask, vocab)
    return torch.where(torch.from_numpy(allowed).to(logits.device), logits, float("-inf"))
