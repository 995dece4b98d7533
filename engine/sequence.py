"""A sequence being generated: its tokens, where it stands, and its block table.

Pure Python on purpose: the scheduler and block manager are tested with these alone.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def is_finished(self) -> bool:
        return self not in (SequenceStatus.WAITING, SequenceStatus.RUNNING)


@dataclass(eq=False)
class Sequence:
    """One completion. A request with n > 1 owns n of them that share its prompt's blocks."""

    seq_id: int
    request_id: str
    token_ids: list[int]                 # prompt, then generated tokens
    num_prompt_tokens: int
    max_tokens: int                      # generated tokens allowed
    index: int = 0                       # which of the request's n completions
    arrival_time: float = 0.0
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0         # tokens whose K/V are in the cache
    num_cached_tokens: int = 0           # prompt tokens served by the prefix cache at admission
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)   # of the full blocks of token_ids
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    siblings: list["Sequence"] = field(default_factory=list)  # forked off this one after its prefill
    sampling_state: Any = None           # the engine's per-sequence sampling state (e.g. its RNG)
    group_id: str = ""                   # the client request it belongs to (fairness); "": its own
    grammar: Any = None                  # its GrammarMatcher (engine/guided.py) when the text is constrained
    # The first position whose logits prompt logprobs still need (None: none): the prefix cache
    # serves only the blocks before it, the rest of the prompt runs through the model.
    prompt_logits_from: int | None = None
    # Encoder-decoder models: the encoder's input (the prompt; token_ids are the decoder's,
    # from its start token) and the blocks holding its output's K/V. Empty for decoder-only.
    encoder_token_ids: list[int] = field(default_factory=list)
    cross_block_table: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.group_id = self.group_id or self.request_id

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_encoder_tokens(self) -> int:
        return len(self.encoder_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
