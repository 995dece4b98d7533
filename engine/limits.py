"""What callers may ask of an engine, and what it is doing now: the narrow door the service
sees the engines through.

`*Limits` are frozen once an engine is built, so any thread may read them (and validate a
request against them before queueing it). `GenerationStats` is a snapshot the engine thread
publishes; readers never touch the block manager or the scheduler the engine thread owns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from engine.errors import InvalidParameter, PromptTooLongError


@dataclass(frozen=True, slots=True)
class GenerationLimits:
    model_id: str
    vocab_size: int
    max_model_len: int                   # prompt + generated tokens
    max_num_seqs: int                    # sequences per step: a request's n run together
    block_size: int
    num_blocks: int
    device: str                          # "cpu", "cuda:0", ...
    dtype: str                           # "float32", "bfloat16", ...
    quantization: str = "none"           # what the weights run as, in words

    @property
    def max_prompt_len(self) -> int:
        return self.max_model_len - 1    # at least one token is generated

    def validate_prompt(self, prompt_ids: Sequence[int], param: str = "prompt") -> None:
        """Raises InvalidParameter (empty, ids outside the vocabulary) or PromptTooLongError."""
        if not prompt_ids:
            raise InvalidParameter(param, "the prompt is empty: it must contain at least one token")
        if len(prompt_ids) > self.max_prompt_len:
            raise PromptTooLongError(
                param, f"the prompt has {len(prompt_ids)} tokens but this model allows at most "
                f"{self.max_prompt_len} prompt tokens (max_model_len {self.max_model_len}, which "
                "counts prompt and generated tokens)", len(prompt_ids), self.max_prompt_len)
        low, high = min(prompt_ids), max(prompt_ids)
        if low < 0 or high >= self.vocab_size:
            raise InvalidParameter(param, f"token id {low if low < 0 else high} is outside the "
                                   f"vocabulary [0, {self.vocab_size})")

    def validate_fit(self, num_prompt_tokens: int, max_tokens: int, param: str = "max_tokens") -> None:
        """A prompt and an explicit cap on new tokens must fit the model together."""
        total = num_prompt_tokens + max_tokens
        if total > self.max_model_len:
            raise PromptTooLongError(
                param, f"this model's maximum context length is {self.max_model_len} tokens, but "
                f"{total} were asked for ({num_prompt_tokens} in the prompt, {max_tokens} in {param}): "
                f"shorten the prompt or lower {param}", total, self.max_model_len)

    def validate_n(self, n: int) -> None:
        if n > self.max_num_seqs:
            raise InvalidParameter("n", f"n {n} exceeds max_num_seqs {self.max_num_seqs} (the "
                                   "server's --max-num-seqs): the completions of one request run together")


@dataclass(frozen=True, slots=True)
class GenerationStats:
    num_running: int                     # requests in the engine, scheduled at least once
    num_waiting: int                     # accepted, not yet scheduled
    num_waiting_seqs: int                # their sequences (n each): what --max-queue bounds
    num_free_blocks: int
    kv_cache_usage: float                # fraction of KV blocks in use


@dataclass(frozen=True, slots=True)
class EncoderStats:
    num_queued_inputs: int               # inputs waiting for a batch
    is_alive: bool                       # the worker thread runs


@dataclass(frozen=True, slots=True)
class EncoderLimits:
    model_id: str
    max_length: int                      # tokens per input, special tokens included
    hidden_size: int                     # the embedding dimension
    vocab_size: int
    has_classifier: bool                 # a classification head (else zero-shot only)
    labels: tuple[str, ...]              # the head's labels, by index
    max_inputs_per_request: int | None   # None: no limit (offline)
    device: str
    dtype: str
    tasks: frozenset[str] = frozenset()  # what it answers: embed, similarity, classify, rerank, embed_sparse, fill_mask
    rerank_scoring: str = "cosine"       # "cross-encoder" (a one-label head) | "cosine" (a bi-encoder)
    prompts: tuple[str, ...] = ()        # prompt names from its sentence-transformers config
    default_prompt_name: str | None = None
    mask_token: str | None = None        # fill-mask: the text of its [MASK] token
