"""What callers may ask of an engine, and what it is doing now: the narrow door the service
sees the engines through.

`*Limits` are frozen once an engine is built, so any thread may read them (and validate a
request against them before queueing it). `GenerationStats` is a snapshot the engine thread
publishes; readers never touch the block manager or the scheduler the engine thread owns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

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
    # Encoder-decoder models (T5): the prompt is the encoder's input, capped on its own;
    # max_model_len counts the decoder's tokens (its start token and the generated ones).
    # 0: a decoder-only model, whose prompt and output share max_model_len.
    max_encoder_len: int = 0
    tensor_parallel_size: int = 1        # ranks the model is split over

    @property
    def is_encoder_decoder(self) -> bool:
        return self.max_encoder_len > 0

    @property
    def max_prompt_len(self) -> int:
        if self.is_encoder_decoder:
            return self.max_encoder_len
        return self.max_model_len - 1    # at least one token is generated

    def validate_prompt(self, prompt_ids: Sequence[int], param: str = "prompt") -> None:
        """Raises InvalidParameter (empty, ids outside the vocabulary) or PromptTooLongError."""
        if not prompt_ids:
            raise InvalidParameter(param, "the prompt is empty: it must contain at least one token")
        if self.is_encoder_decoder and len(prompt_ids) > self.max_prompt_len:
            raise PromptTooLongError(
                param, f"the prompt has {len(prompt_ids)} tokens but this encoder-decoder model encodes "
                f"at most {self.max_prompt_len} prompt tokens", len(prompt_ids), self.max_prompt_len)
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
        """A prompt and an explicit cap on new tokens must fit the model together (an
        encoder-decoder's new tokens fit its decoder, after the start token)."""
        if self.is_encoder_decoder:
            if 1 + max_tokens > self.max_model_len:
                raise PromptTooLongError(
                    param, f"this encoder-decoder model generates at most {self.max_model_len - 1} tokens "
                    f"(max_model_len {self.max_model_len} counts the decoder's start token), but {param} is "
                    f"{max_tokens}: lower {param}", 1 + max_tokens, self.max_model_len)
            return
        total = num_prompt_tokens + max_tokens
        if total > self.max_model_len:
            raise PromptTooLongError(
                param, f"this model's maximum context length is {self.max_model_len} tokens, but "
                f"{total} were asked for ({num_prompt_tokens} in the prompt, {max_tokens} in {param}): "
                f"shorten the prompt or lower {param}", total, self.max_model_len)

    def validate_logit_bias(self, logit_bias: Mapping[int, float] | None) -> None:
        bad = next((i for i in (logit_bias or ()) if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise InvalidParameter("logit_bias", f"logit_bias: token id {bad} is outside the vocabulary "
                                   f"[0, {self.vocab_size})")

    def validate_prompt_logprobs(self, prompt_logprobs: int | None, param: str = "prompt_logprobs") -> None:
        """An encoder-decoder model reads its prompt with the encoder and never predicts it; split
        over ranks, a model's step computes only the sampled rows' logits."""
        if prompt_logprobs is None:
            return
        if self.is_encoder_decoder:
            raise InvalidParameter(param, f"{param}: this encoder-decoder model encodes the prompt and never "
                                   "predicts it, so the prompt has no logprobs")
        if self.tensor_parallel_size > 1:
            raise InvalidParameter(param, f"{param}: prompt logprobs are not computed with tensor parallelism "
                                   f"(this server splits the model over {self.tensor_parallel_size} ranks)")

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
