"""What generation hands back, and the per-completion text state that produces it:
incremental detokenization, stop tokens and stop strings, and streaming deltas."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.sampling import SamplingParams

if TYPE_CHECKING:
    from engine.prompt_logprobs import PromptLogprob
    from engine.tokenizer import Tokenizer


@dataclass(slots=True)
class GeneratedToken:
    id: int
    text: str                                   # what this token added to the text ("" mid-character)
    logprob: float
    special: bool
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str                                   # the text so far (all of it once finished)
    token_ids: list[int]
    finish_reason: str | None = None            # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None        # the stop string or stop token id; None for EOS
    delta_text: str = ""                        # text added since the previous output
    new_tokens: list[GeneratedToken] = field(default_factory=list)  # tokens since the previous output
    cumulative_logprob: float = 0.0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0                  # prompt tokens the prefix cache served


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    error: str | None = None                    # set when this request failed alone
    # With params.prompt_logprobs: one per prompt token (None first), in every output from the
    # first one on (the prompt is computed before any token is generated).
    prompt_logprobs: list["PromptLogprob | None"] | None = None

    # The first completion, for the common n == 1 case.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


class CompletionState:
    """Text of one completion as tokens arrive.

    Stop strings are matched on the text across token boundaries and cut from it. While
    any could still be completing, its possible beginning (up to the longest stop string
    minus one character) is held back from deltas, so a streamed text never shows
    characters the final text will not have.
    """

    def __init__(self, index: int, tokenizer: "Tokenizer", prompt_ids: list[int],
                 params: SamplingParams, eos_token_ids: frozenset[int]):
        from engine.tokenizer import IncrementalDetokenizer
        self.index = index
        self.tokenizer = tokenizer
        self.params = params
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids,
                                                  skip_special_tokens=params.skip_special_tokens)
        self.stop_token_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else eos_token_ids)
        self.holdback = max((len(s) for s in params.stop), default=1) - 1
        self.text = ""
        self.token_ids: list[int] = []
        self.num_emitted_chars = 0
        self.pending_tokens: list[GeneratedToken] = []
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.cumulative_logprob = 0.0

    def add_token(self, token_id: int, logprob: float,
                  top_logprobs: list[tuple[int, float]] | None) -> None:
        self.token_ids.append(token_id)
        self.cumulative_logprob += logprob
        if token_id in self.stop_token_ids:
            self.pending_tokens.append(GeneratedToken(token_id, "", logprob, True, top_logprobs))
            self.finish("stop", token_id if token_id in self.params.stop_token_ids else None)
            return
        piece = self.detokenizer.push(token_id)
        self.pending_tokens.append(GeneratedToken(
            token_id, piece, logprob, self.tokenizer.is_special(token_id), top_logprobs))
        self._append_text(piece)

    def _append_text(self, piece: str) -> None:
        search_from = max(0, len(self.text) - self.holdback)
        self.text += piece
        if not self.params.stop or not piece:
            return
        matches = [(at, stop) for stop in self.params.stop
                   if (at := self.text.find(stop, search_from)) != -1]
        if matches:
            at, stop = min(matches)
            self.text = self.text[:at]
            self.finish("stop", stop)

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        if self.finish_reason is not None:
            return
        if not isinstance(stop_reason, str):
            # Bytes still waiting for the rest of a character will never get it.
            tail = self.detokenizer.flush()
            self.text += tail
            if self.pending_tokens and tail:
                self.pending_tokens[-1].text += tail
        self.finish_reason, self.stop_reason = reason, stop_reason

    def take_output(self) -> CompletionOutput:
        """The output since the last call: new tokens and the text now safe to show."""
        finished = self.finish_reason is not None
        stable = len(self.text) if finished or not self.params.stop else len(self.text) - self.holdback
        stable = max(stable, self.num_emitted_chars)
        delta = self.text[self.num_emitted_chars: stable]
        self.num_emitted_chars = stable
        new_tokens, self.pending_tokens = self.pending_tokens, []
        return CompletionOutput(
            index=self.index, text=self.text[:stable], token_ids=list(self.token_ids),
            finish_reason=self.finish_reason, stop_reason=self.stop_reason, delta_text=delta,
            new_tokens=new_tokens, cumulative_logprob=self.cumulative_logprob)
