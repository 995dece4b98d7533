"""What /embed, /classify and /v1/embeddings share: the encoder serving a task, and a
request that is dropped (its queued inputs skipped) when the client leaves.

The encoder's refusals are engine/errors.py's typed errors; service/errors.py answers them.
"""
from __future__ import annotations

import asyncio

from fastapi import Request

from engine.encoder_engine import EncoderOutput
from service.errors import ENGINE_ERRORS, APIError, ClientGone
from service.generation import client_disconnected
from service.runtime import Server, info_of, server_of


def encoder_for(server: Server, task: str, model: str | None = None):
    """The encoder serving `task` under the name a request gave (see Server.resolve_model)."""
    server.require_ready()
    server.resolve_model(task, model)
    return server.encoders[task]


async def encode(request: Request, task: str, submit, *args, model: str | None = None) -> EncoderOutput:
    """submit(engine, *args) -> Future; its result. ClientGone when the client left first."""
    server = server_of(request)
    engine = encoder_for(server, task, model)
    future = await asyncio.to_thread(submit, engine, *args)      # tokenizes: off the event loop
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
    server.metrics.embed_inputs.inc(len(output.data))
    info_of(request).prompt_tokens += output.num_tokens
    return output


def truncation(server: Server, asked: bool | int | None) -> bool | int:
    """What a request asked (True / False, or at most N tokens), else the server's --auto-truncate."""
    return server.settings.auto_truncate if asked is None else asked


def submit_embed(engine, inputs, normalize: bool, truncate: bool | int):
    return engine.submit_embed(inputs, normalize=normalize, truncate=truncate)


def submit_classify(engine, inputs, labels, truncate: bool | int, options):
    return engine.submit_classify(inputs, candidate_labels=labels, truncate=truncate, options=options)
