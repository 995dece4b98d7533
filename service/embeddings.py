"""What every encoder route shares: the encoder serving a task under the model a request
names, a request that is dropped (its queued inputs skipped) when the client leaves, and the
JSON of its answer.

The encoder's refusals are engine/errors.py's typed errors; service/errors.py answers them.
"""
from __future__ import annotations

import asyncio
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import Response

from engine.encoder_engine import EncoderOutput
from service.errors import ENGINE_ERRORS, APIError, ClientGone
from service.generation import client_disconnected
from service.runtime import Server, info_of, server_of

# Requests with at most this much text are tokenized on the event loop: a one-sentence
# request's tokenizing (tens of microseconds) costs less than the hop to a thread and back.
INLINE_TOKENIZE_CHARS = 2048


def encoder_for(server: Server, task: str, model: str | None = None):
    """The encoder serving `task` under the name a request gave (see Server.resolve_model)."""
    server.require_ready()
    return server.encoder(task, model)


async def encode(request: Request, task: str, *args: Any, model: str | None = None, **options: Any) -> EncoderOutput:
    """The task's EncoderOutput for engine.submit(task, *args, **options) (engine/encoder_tasks.py);
    ClientGone when the client left first."""
    server = server_of(request)
    engine = encoder_for(server, task, model)
    info = info_of(request)
    info.model = engine.limits.model_id
    if _text_size(args) <= INLINE_TOKENIZE_CHARS:
        future = engine.submit(task, *args, **options)
    else:                                     # tokenizes: off the event loop
        future = await server.tokenizing(lambda: engine.submit(task, *args, **options))
    result = asyncio.wrap_future(future)
    watcher = asyncio.ensure_future(client_disconnected(request))
    try:
        await asyncio.wait({result, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not result.done():
            result.cancel()                   # its queued inputs are skipped
    if result.cancelled():
        raise ClientGone()
    try:
        output = result.result()
    except ENGINE_ERRORS:
        raise                                 # answered by its handler
    except Exception as exc:                  # our bug, in the worker
        raise APIError(500, f"the encoder failed: {type(exc).__name__}: {exc}", error_type="generation") from exc
    server.metrics.embed_inputs.labels(info.model).inc(output.num_inputs)
    info.prompt_tokens += output.num_tokens
    return output


def _text_size(value: Any, depth: int = 0) -> int:
    """Characters of text in a request's arguments (strings, and lists of them)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, (list, tuple)) and depth < 2:
        return sum(_text_size(item, depth + 1) for item in value)
    return 0


def truncation(server: Server, asked: bool | int | None) -> bool | int:
    """What a request asked (True / False, or at most N tokens), else the server's --auto-truncate."""
    return server.settings.auto_truncate if asked is None else asked


def direction(asked: str | None) -> str:
    """TEI's truncation_direction ("Right" / "Left", any case) as the engine names it."""
    return (asked or "right").lower()


def json_response(data: Any) -> Response:
    """An answer as JSON, written by orjson: numpy arrays as they are (float32 in their shortest
    exact form), without the response model's validation (a 384-float vector through pydantic
    and json.dumps cost more than the rest of the request's handling)."""
    return Response(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")
