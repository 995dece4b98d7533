"""What /embed, /classify and /v1/embeddings share: the encoder serving a task, its errors
mapped to HTTP, and a request that is dropped (its queued inputs skipped) when the client leaves.
"""
from __future__ import annotations

import asyncio

from fastapi import Request

from engine.encoder_engine import (EncoderError, EncoderOutput, EngineStoppedError, InputTooLongError,
                                   QueueFullError)
from service.errors import APIError
from service.generation import ClientGone, client_disconnected
from service.runtime import RequestInfo, Server


def encoder_for(server: Server, task: str):
    server.require_ready()
    engine = server.encoders.get(task)
    if engine is None:
        what = "embedding" if task == "embed" else "classifier"
        raise APIError(404, f"this server serves no {what} model (start it with --{what}-model)",
                       param="model", code="model_not_found")
    return engine


async def encode(request: Request, server: Server, info: RequestInfo, task: str, submit, *args) -> EncoderOutput:
    """submit(engine, *args) -> Future; its result, or the HTTP error it means."""
    engine = encoder_for(server, task)
    try:
        future = await asyncio.to_thread(submit, engine, *args)      # tokenizes: off the event loop
    except InputTooLongError as exc:
        raise APIError(400, str(exc), param="inputs", code="context_length_exceeded") from None
    except EncoderError as exc:
        field = "candidate_labels" if str(exc).startswith("candidate_labels") else "inputs"
        raise APIError(422, f"{field}: {exc}", param=field, code="invalid_value") from None
    except QueueFullError as exc:
        raise APIError(429, str(exc), headers={"Retry-After": "1"}, code="queue_full") from None
    except EngineStoppedError as exc:
        raise APIError(503, str(exc), headers={"Retry-After": "1"}) from None
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
    except EngineStoppedError as exc:
        raise APIError(503, str(exc), headers={"Retry-After": "1"}) from None
    except Exception as exc:
        raise APIError(500, f"the encoder failed: {type(exc).__name__}: {exc}", error_type="generation") from exc
    num_inputs = len(output.data)
    server.metrics.embed_inputs.inc(num_inputs)
    info.prompt_tokens += output.num_tokens
    return output


def submit_embed(engine, inputs, normalize: bool, truncate: bool):
    return engine.submit_embed(inputs, normalize=normalize, truncate=truncate)


def submit_classify(engine, inputs, labels, truncate: bool):
    return engine.submit_classify(inputs, candidate_labels=labels, truncate=truncate)
