"""OpenAI routes: /v1/completions, /v1/chat/completions, /v1/embeddings, /v1/models.

Streams send `text_completion` / `chat.completion.chunk` objects and end with `data: [DONE]`;
with stream_options.include_usage the last chunk before it has empty choices and the usage.
Choices are indexed prompt_index * n + i.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import time
import uuid

from fastapi import APIRouter, Request, Response

from engine.outputs import CompletionOutput, GeneratedToken
from service.encoding import encode, encoder_for, submit_embed
from service.errors import APIError, error_event, openapi_errors
from service.generation import (ClientGone, Generation, admit, check_max_tokens, collect, event_stream, merge,
                                sampling_params)
from service.routes.native import info_of, server_of
from service.runtime import VERSION, Server
from service.schemas import (ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest,
                             EmbeddingRequest, EmbeddingResponse, ModelList, SamplingFields)

logger = logging.getLogger("service")
router = APIRouter(prefix="/v1", tags=["OpenAI"])

FINGERPRINT = f"attnserve-{VERSION}"
_ERRORS = openapi_errors(400, 401, 404, 413, 422, 429, 500, 503, openai=True)
_STREAM_DOC = {200: {"description": "JSON; with stream=true, server-sent events (text/event-stream) "
                     "ending with `data: [DONE]`"}}


def check_model(server: Server, model: str | None, served: str | None = None) -> str:
    served = served or server.model_id
    if model is not None and model != served:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {served!r} "
                       "(see /v1/models)", param="model", code="model_not_found")
    return served


def _sampling(server: Server, body: SamplingFields, max_tokens: int | None, logprobs: int | None):
    max_num_seqs = server.engine.config.max_num_seqs
    if body.n > max_num_seqs:                 # the engine schedules a request's n sequences together
        raise APIError(422, f"n must be <= {max_num_seqs} (this server's --max-num-seqs), got {body.n}",
                       param="n", code="invalid_value")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return sampling_params(
        max_tokens=max_tokens or server.max_model_len,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k if body.top_k not in (None, 0) else -1, min_p=body.min_p or 0.0, n=body.n,
        seed=body.seed, stop=stop, stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos, presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0, logprobs=logprobs)


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0       # OpenAI's floor for "impossible"


def _usage(gens: list[Generation], completion_tokens: int) -> dict:
    prompt_tokens = sum(len(g.prompt.ids) for g in gens)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(obj: dict) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


def _check_finished(c: CompletionOutput) -> None:
    if c.finish_reason in ("abort", "error"):
        raise APIError(503, "the server is shutting down; the request was aborted before it finished")


# -- completions -------------------------------------------------------------------------------

def completion_logprobs(server: Server, tokens: list[GeneratedToken], offset: int) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in tokens:
        out["tokens"].append(server.token_text(t.id))
        out["token_logprobs"].append(_finite(t.logprob))
        top: dict[str, float] = {}
        for i, lp in t.top_logprobs or []:      # most likely first; two ids may print alike
            top.setdefault(server.token_text(i), _finite(lp))
        out["top_logprobs"].append(top or None)
        out["text_offset"].append(offset)
        offset += len(t.text)
    return out


def _prompt_text(server: Server, gen: Generation) -> str:
    return gen.prompt.text if gen.prompt.text is not None else server.tokenizer.decode(gen.prompt.ids)


def _echo(server: Server, gen: Generation, with_logprobs: bool) -> tuple[str, dict | None]:
    """echo=true: the prompt's text, and its tokens for logprobs (their logprobs are null: the
    engine does not compute prompt logprobs)."""
    text = _prompt_text(server, gen)
    if not with_logprobs:
        return text, None
    ids = gen.prompt.ids
    encoded = server.tokenizer.encode_with_offsets(text) if gen.prompt.text is not None else []
    if [i for i, _, _ in encoded] == ids:
        offsets = [start for _, start, _ in encoded]
    else:                                     # token-id prompts: offsets of their printed tokens
        offsets = [0]
        for i in ids[:-1]:
            offsets.append(offsets[-1] + len(server.token_text(i)))
    return text, {"tokens": [server.token_text(i) for i in ids], "token_logprobs": [None] * len(ids),
                  "top_logprobs": [None] * len(ids), "text_offset": offsets}


def _joined(first: dict | None, second: dict) -> dict:
    return second if first is None else {key: first[key] + second[key] for key in second}


@router.post("/completions", response_model=Completion, responses={**_STREAM_DOC, **_ERRORS},
             summary="Text completions (OpenAI)")
async def completions(body: CompletionRequest, request: Request):
    server = server_of(request)
    server.require_generator()
    model = check_model(server, body.model)
    if "max_tokens" in body.model_fields_set:       # the default 16 is cut to the model's length
        check_max_tokens(server, body.max_tokens, "max_tokens")
    prompts = [body.prompt] if isinstance(body.prompt, str) or isinstance(body.prompt[0], int) else body.prompt
    params = _sampling(server, body, body.max_tokens, body.logprobs)
    gens = await admit(server, info_of(request), prompts, params)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model,
            "system_fingerprint": FINGERPRINT}
    if body.stream:
        return event_stream(_completion_events(request, body, gens, head), gens)
    try:
        results = await collect(request, gens)
    except ClientGone:
        return Response(status_code=499)
    choices, num_generated = [], 0
    for g, (gen, result) in enumerate(zip(gens, results)):
        prefix, prompt_logprobs = _echo(server, gen, body.logprobs is not None) if body.echo else ("", None)
        for c in result.output.outputs:
            num_generated += len(c.token_ids)
            logprobs = None
            if body.logprobs is not None:
                logprobs = _joined(prompt_logprobs, completion_logprobs(server, result.tokens[c.index], len(prefix)))
            choices.append({"index": g * body.n + c.index, "text": prefix + c.text,
                            "finish_reason": c.finish_reason, "logprobs": logprobs})
    return {"object": "text_completion", **head, "choices": choices, "usage": _usage(gens, num_generated)}


async def _completion_events(request: Request, body: CompletionRequest, gens: list[Generation], head: dict):
    server = server_of(request)
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    continuous = body.stream_options is not None and body.stream_options.continuous_usage_stats
    offsets: dict[int, int] = {}
    done: set[int] = set()
    num_generated = 0

    def chunk(choice: dict) -> str:
        event = {"object": "text_completion", **head, "choices": [choice]}
        if include_usage:
            event["usage"] = _usage(gens, num_generated) if continuous else None
        return _sse(event)

    try:
        if body.echo:
            for g, gen in enumerate(gens):
                text, logprobs = _echo(server, gen, body.logprobs is not None)
                for i in range(body.n):
                    offsets[g * body.n + i] = len(text)
                    yield chunk({"index": g * body.n + i, "text": text, "logprobs": logprobs, "finish_reason": None})
        async for g, out in merge(gens):
            for c in out.outputs:
                index = g * body.n + c.index
                if index in done:
                    continue
                _check_finished(c)
                num_generated += len(c.new_tokens)
                wants_logprobs = body.logprobs is not None and c.new_tokens
                if not (c.delta_text or c.finish_reason or wants_logprobs):
                    continue
                logprobs = None
                if body.logprobs is not None:
                    logprobs = completion_logprobs(server, c.new_tokens, offsets.get(index, 0))
                offsets[index] = offsets.get(index, 0) + sum(len(t.text) for t in c.new_tokens)
                if c.finish_reason:
                    done.add(index)
                yield chunk({"index": index, "text": c.delta_text, "logprobs": logprobs,
                             "finish_reason": c.finish_reason})
        if include_usage:
            yield _sse({"object": "text_completion", **head, "choices": [],
                        "usage": _usage(gens, num_generated)})
        yield "data: [DONE]\n\n"
    except APIError as exc:
        yield error_event(request.url.path, exc)
    except Exception:
        logger.exception("stream %s failed", info_of(request).request_id)
        yield error_event(request.url.path, APIError(500, "internal server error (logged)"))


# -- chat --------------------------------------------------------------------------------------

def chat_logprobs(server: Server, tokens: list[GeneratedToken]) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        text = server.token_text(token_id)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}
    return {"content": [{**entry(t.id, t.logprob),
                         "top_logprobs": [entry(i, lp) for i, lp in (t.top_logprobs or [])]}
                        for t in tokens]}


async def _render_chat(server: Server, body: ChatCompletionRequest) -> str:
    messages = []
    for m in body.messages:
        message = {"role": m.role, "content": m.text()}
        if m.name:
            message["name"] = m.name
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        messages.append(message)
    try:
        return await asyncio.to_thread(server.tokenizer.apply_chat_template, messages,
                                       add_generation_prompt=body.add_generation_prompt)
    except ValueError as exc:                # no template, or the template refused the conversation
        raise APIError(400, str(exc), param="messages", code="invalid_messages") from None


@router.post("/chat/completions", response_model=ChatCompletion,
             responses={**_STREAM_DOC, **_ERRORS},
             summary="Chat completions (OpenAI), through the model's chat template")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    server = server_of(request)
    server.require_generator()
    model = check_model(server, body.model)
    check_max_tokens(server, body.max_tokens, "max_tokens")
    check_max_tokens(server, body.max_completion_tokens, "max_completion_tokens")
    max_tokens = body.max_completion_tokens or body.max_tokens
    top = (body.top_logprobs or 0) if body.logprobs else None
    params = _sampling(server, body, max_tokens, top)
    prompt = await _render_chat(server, body)
    (gen,) = await admit(server, info_of(request), [prompt], params, add_special_tokens=False)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model,
            "system_fingerprint": FINGERPRINT}
    if body.stream:
        return event_stream(_chat_events(request, body, gen, head), [gen])
    try:
        (result,) = await collect(request, [gen])
    except ClientGone:
        return Response(status_code=499)
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(server, result.tokens[c.index]) if body.logprobs else None,
                "finish_reason": c.finish_reason} for c in result.output.outputs]
    num_generated = sum(len(c.token_ids) for c in result.output.outputs)
    return {"object": "chat.completion", **head, "choices": choices, "usage": _usage([gen], num_generated)}


async def _chat_events(request: Request, body: ChatCompletionRequest, gen: Generation, head: dict):
    server = server_of(request)
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    continuous = body.stream_options is not None and body.stream_options.continuous_usage_stats
    done: set[int] = set()
    num_generated = 0

    def chunk(choice: dict) -> str:
        event = {"object": "chat.completion.chunk", **head, "choices": [choice]}
        if include_usage:
            event["usage"] = _usage([gen], num_generated) if continuous else None
        return _sse(event)

    try:
        for i in range(body.n):
            yield chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None})
        async for _, out in merge([gen]):
            for c in out.outputs:
                if c.index in done:
                    continue
                _check_finished(c)
                num_generated += len(c.new_tokens)
                wants_logprobs = body.logprobs and c.new_tokens
                if not (c.delta_text or c.finish_reason or wants_logprobs):
                    continue
                if c.finish_reason:
                    done.add(c.index)
                delta = {"content": c.delta_text} if c.delta_text or not c.finish_reason else {}
                yield chunk({"index": c.index, "delta": delta, "finish_reason": c.finish_reason,
                             "logprobs": chat_logprobs(server, c.new_tokens) if body.logprobs else None})
        if include_usage:
            yield _sse({"object": "chat.completion.chunk", **head, "choices": [],
                        "usage": _usage([gen], num_generated)})
        yield "data: [DONE]\n\n"
    except APIError as exc:
        yield error_event(request.url.path, exc)
    except Exception:
        logger.exception("stream %s failed", info_of(request).request_id)
        yield error_event(request.url.path, APIError(500, "internal server error (logged)"))


# -- embeddings --------------------------------------------------------------------------------

@router.post("/embeddings", response_model=EmbeddingResponse, responses=_ERRORS,
             summary="Embeddings (OpenAI), L2-normalized")
async def embeddings(body: EmbeddingRequest, request: Request):
    server = server_of(request)
    encoder = encoder_for(server, "embed")
    model = check_model(server, body.model, encoder.runner.model_id)
    dimension = encoder.runner.config.hidden_size
    if body.dimensions is not None and body.dimensions != dimension:
        raise APIError(422, f"dimensions: this model's embeddings have {dimension} dimensions, "
                       f"got {body.dimensions}", param="dimensions", code="invalid_value")
    try:
        output = await encode(request, server, info_of(request), "embed", submit_embed, body.input, True, False)
    except ClientGone:
        return Response(status_code=499)
    data = [{"object": "embedding", "index": i,
             "embedding": _base64(vector) if body.encoding_format == "base64" else vector}
            for i, vector in enumerate(output.data)]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": output.num_tokens, "total_tokens": output.num_tokens}}


def _base64(vector: list[float]) -> str:
    import numpy as np
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


# -- models ------------------------------------------------------------------------------------

@router.get("/models", response_model=ModelList, responses=openapi_errors(401, openai=True),
            summary="The models this server serves")
async def models(request: Request):
    server = server_of(request)
    created = server.started_at
    cards, listed = [], set()
    if server.llm is not None:
        cards.append({"id": server.model_id, "object": "model", "created": created, "owned_by": "attnserve",
                      "max_model_len": server.max_model_len, "task": "generate"})
        listed.add(server.model_id)
    for task, model_id in server.encoder_ids().items():
        if model_id not in listed:
            listed.add(model_id)
            cards.append({"id": model_id, "object": "model", "created": created, "owned_by": "attnserve",
                          "max_model_len": server.encoders[task].runner.max_length, "task": task})
    return {"object": "list", "data": cards}
