"""What the engines refuse or fail with, typed, so no caller parses a message to learn why.

Both engines (generation and encoder) raise the same kinds; the service maps each kind to
an HTTP answer in one table (service/errors.py).
"""
from __future__ import annotations


class InvalidParameter(ValueError):
    """A request field the engine cannot accept; `param` names it (e.g. "temperature")."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class PromptTooLongError(InvalidParameter):
    """A prompt (or encoder input) longer than the model allows."""

    def __init__(self, param: str, message: str, num_tokens: int, max_tokens: int):
        super().__init__(param, message)
        self.num_tokens, self.max_tokens = num_tokens, max_tokens


class InvalidGrammar(InvalidParameter):
    """A constraint on the output (JSON schema, regex, choices, grammar) that does not compile."""


class QueueFullError(RuntimeError):
    """Too much is waiting already; retry later."""


class EngineStoppedError(RuntimeError):
    """The engine is not running: never started, stopped, or its loop died."""


class RequestFailedError(RuntimeError):
    """One request failed inside the engine; the others go on."""


class TensorParallelError(EngineStoppedError):
    """A tensor-parallel rank died or a collective failed: the engine cannot go on."""
