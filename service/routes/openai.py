"""OpenAI routes: /v1/completions, /v1/chat/completions, /v1/embeddings, /v1/models.

Streams send `text_completion` / `chat.completion.chunk` objects and end with `data: [DONE]`;
with stream_options.include_usage the last chunk before it has empty choices and the usage.
Choices are indexed prompt_index * n + i.

Structured outputs (response_format, guided_*) and forced tool calls are one constraint on the
text (service/structured.py); tool calls are read from the text (service/tools.py).
"""
from __future__ import annotations

import asyncio
import base64
import json
import math
import time
import uuid

from fastapi import APIRouter, Request

from engine.guided import GuidedDecoding
from engine.outputs import CompletionOutput, GeneratedToken, RequestOutput
from engine.sampling import SamplingParams
from service.embeddings import encode, json_response, truncation
from service.errors import APIError, openapi_errors
from service.generation import Generation, admit, collect, event_stream, max_new_tokens, merge
from service.runtime import VERSION, Server, info_of, server_of
from service.schemas import (ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest,
                             EmbeddingRequest, EmbeddingResponse, ModelCard, ModelList, SamplingFields,
                             StreamOptions)
from service.structured import check_tool_choice, openai_constraint, tools_offered
from service.tools import ToolCallParser, message_of, render_messages, template_tools

router = APIRouter(prefix="/v1", tags=["OpenAI"])

FINGERPRINT = f"attnserve-{VERSION}"
_ERRORS = openapi_errors(400, 401, 404, 413, 422, 429, 500, 503, openai=True)
_STREAM_DOC = {200: {"description": "JSON; with stream=true, server-sent events (text/event-stream) "
                     "ending with `data: [DONE]`"}}


def _sampling(body: SamplingFields, max_tokens: int, logprobs: int | None, guided: GuidedDecoding | None,
              prompt_logprobs: int | None = None):
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k if body.top_k not in (None, 0) else -1, min_p=body.min_p or 0.0, n=body.n,
        seed=body.seed, stop=stop, stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos, presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        logit_bias={int(k): v for k, v in body.logit_bias.items()} if body.logit_bias else None,
        guided_decoding=guided)


def logprob_token(server: Server, token_id: int) -> str:
    """A token as OpenAI's logprobs print it: its text, or "bytes:\\xe4\\xbd" when it holds
    only part of a character (its exact bytes are in `bytes`)."""
    raw = server.tokenizer.token_bytes(token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def logprob_or_floor(x: float) -> float:
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


class ChunkStream:
    """What every OpenAI stream shares: one chunk object per event (usage in each with
    continuous_usage_stats), the completions that still have something to say, and the
    closing usage chunk and `[DONE]`. Choices are indexed generation * n + completion."""

    def __init__(self, obj: str, head: dict, gens: list[Generation], n: int, options: StreamOptions | None):
        self.obj, self.head, self.gens, self.n = obj, head, gens, n
        self.include_usage = options is not None and options.include_usage
        self.continuous = options is not None and options.continuous_usage_stats
        self.num_generated = 0

    def chunk(self, choice: dict) -> str:
        event = {"object": self.obj, **self.head, "choices": [choice]}
        if self.include_usage:
            event["usage"] = _usage(self.gens, self.num_generated) if self.continuous else None
        return _sse(event)

    async def updates(self, wants_tokens: bool):
        """(choice index, completion output, its request's output) for each completion with new
        text, a finish, or (wants_tokens) new tokens; nothing after a completion's finish."""
        done: set[int] = set()
        async for g, out in merge(self.gens):
            for c in out.outputs:
                index = g * self.n + c.index
                if index in done:
                    continue
                _check_finished(c)
                self.num_generated += len(c.new_tokens)
                if not (c.delta_text or c.finish_reason or (wants_tokens and c.new_tokens)):
                    continue
                if c.finish_reason:
                    done.add(index)
                yield index, c, out

    def closing(self):
        if self.include_usage:
            yield _sse({"object": self.obj, **self.head, "choices": [],
                        "usage": _usage(self.gens, self.num_generated)})
        yield "data: [DONE]\n\n"


# -- completions -------------------------------------------------------------------------------

def completion_logprobs(server: Server, tokens: list[GeneratedToken], offset: int) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in tokens:
        out["tokens"].append(logprob_token(server, t.id))
        out["token_logprobs"].append(logprob_or_floor(t.logprob))
        out["top_logprobs"].append(_top_dict(server, t.top_logprobs))
        out["text_offset"].append(offset)
        offset += len(t.text)
    return out


def _prompt_text(server: Server, gen: Generation) -> str:
    return gen.prompt.text if gen.prompt.text is not None else server.tokenizer.decode(gen.prompt.ids)


def _echo(server: Server, gen: Generation, out: RequestOutput | None) -> tuple[str, dict | None]:
    """echo=true: the prompt's text; with logprobs (out: a request output carrying the prompt
    logprobs), its tokens with theirs (the first token's null: nothing predicts it)."""
    text = _prompt_text(server, gen)
    if out is None:
        return text, None
    ids = gen.prompt.ids
    encoded = server.tokenizer.encode_with_offsets(text) if gen.prompt.text is not None else []
    if [i for i, _, _ in encoded] == ids:
        offsets = [start for _, start, _ in encoded]
    else:                                     # token-id prompts: offsets of their printed tokens
        offsets = [0]
        for i in ids[:-1]:
            offsets.append(offsets[-1] + len(server.token_text(i)))
    entries = out.prompt_logprobs
    if entries is None or len(entries) != len(ids):
        raise APIError(500, "the prompt logprobs were not computed", error_type="generation")
    top = [None] + [_top_dict(server, e.top) for e in entries[1:]]
    return text, {"tokens": [logprob_token(server, i) for i in ids],
                  "token_logprobs": [None] + [logprob_or_floor(e.logprob) for e in entries[1:]],
                  "top_logprobs": top, "text_offset": offsets}


def _top_dict(server: Server, top: list[tuple[int, float]] | None) -> dict[str, float] | None:
    out: dict[str, float] = {}
    for i, lp in top or []:                 # most likely first; two ids may print alike
        out.setdefault(logprob_token(server, i), logprob_or_floor(lp))
    return out or None


def _joined(first: dict | None, second: dict) -> dict:
    return second if first is None else {key: first[key] + second[key] for key in second}


@router.post("/completions", response_model=Completion, responses={**_STREAM_DOC, **_ERRORS},
             summary="Text completions (OpenAI)")
async def completions(body: CompletionRequest, request: Request):
    server = server_of(request)
    server.require_ready()
    model = server.resolve_model("generate", body.model)
    asked = body.max_tokens if "max_tokens" in body.model_fields_set else None
    max_tokens = max_new_tokens(server, asked, "max_tokens", route_default=16)
    prompts = [body.prompt] if isinstance(body.prompt, str) or isinstance(body.prompt[0], int) else body.prompt
    prompt_logprobs = body.logprobs if body.echo else None
    params = _sampling(body, max_tokens, body.logprobs, openai_constraint(body), prompt_logprobs)
    gens = await admit(server, info_of(request), prompts, params,
                       asked_max_tokens="max_tokens" if asked is not None else None, asked_prompt_logprobs="echo")
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model,
            "system_fingerprint": FINGERPRINT}
    if body.stream:
        return event_stream(request, _completion_events(request, body, gens, head), gens)
    results = await collect(request, gens)
    choices, num_generated = [], 0
    for g, (gen, result) in enumerate(zip(gens, results)):
        with_logprobs = result.output if body.logprobs is not None else None
        prefix, prompt_logprobs = _echo(server, gen, with_logprobs) if body.echo else ("", None)
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
    stream = ChunkStream("text_completion", head, gens, body.n, body.stream_options)
    offsets: dict[int, int] = {}
    if body.echo and body.logprobs is None:
        for g, gen in enumerate(gens):
            for chunk in _echo_chunks(server, stream, gen, g, body.n, None, offsets):
                yield chunk
    async for index, c, out in stream.updates(wants_tokens=body.logprobs is not None):
        if body.echo and index not in offsets:      # with logprobs: once the prompt's are computed
            g = index // body.n
            for chunk in _echo_chunks(server, stream, gens[g], g, body.n, out, offsets):
                yield chunk
        logprobs = None
        if body.logprobs is not None:
            logprobs = completion_logprobs(server, c.new_tokens, offsets.get(index, 0))
        offsets[index] = offsets.get(index, 0) + sum(len(t.text) for t in c.new_tokens)
        yield stream.chunk({"index": index, "text": c.delta_text, "logprobs": logprobs,
                            "finish_reason": c.finish_reason})
    for event in stream.closing():
        yield event


def _echo_chunks(server: Server, stream: ChunkStream, gen: Generation, g: int, n: int,
                 out: RequestOutput | None, offsets: dict[int, int]):
    text, logprobs = _echo(server, gen, out)
    for i in range(n):
        offsets[g * n + i] = len(text)
        yield stream.chunk({"index": g * n + i, "text": text, "logprobs": logprobs, "finish_reason": None})


# -- chat --------------------------------------------------------------------------------------

def chat_logprobs(server: Server, tokens: list[GeneratedToken]) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        # A special token adds nothing to the content: no bytes (null), so bytes join to it.
        raw = None if server.tokenizer.is_special(token_id) else list(server.tokenizer.token_bytes(token_id))
        return {"token": logprob_token(server, token_id), "logprob": logprob_or_floor(logprob), "bytes": raw}
    return {"content": [{**entry(t.id, t.logprob),
                         "top_logprobs": [entry(i, lp) for i, lp in (t.top_logprobs or [])]}
                        for t in tokens]}


async def _render_chat(server: Server, body: ChatCompletionRequest) -> str:
    return await asyncio.to_thread(_render, server, body)


def _render(server: Server, body: ChatCompletionRequest) -> str:
    tools = body.tools if tools_offered(body) else None
    kwargs = {**(body.chat_template_kwargs or {}), "tools": template_tools(tools)}
    try:
        messages = render_messages(body.messages, tools, server.tokenizer.chat_template_source(kwargs["tools"]))
        return server.tokenizer.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt,
                                                    **kwargs)
    except ValueError as exc:                # no template, or the template refused the conversation
        raise APIError(400, str(exc), param="messages", code="invalid_messages") from None


@router.post("/chat/completions", response_model=ChatCompletion,
             responses={**_STREAM_DOC, **_ERRORS},
             summary="Chat completions (OpenAI), through the model's chat template")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    server = server_of(request)
    server.require_ready()
    model = server.resolve_model("generate", body.model)
    if body.max_tokens is not None:
        max_new_tokens(server, body.max_tokens, "max_tokens", None)
    field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = max_new_tokens(server, getattr(body, field), field, route_default=None)
    top = (body.top_logprobs or 0) if body.logprobs else None
    check_tool_choice(body)
    params = _sampling(body, max_tokens, top, openai_constraint(body))
    prompt = await _render_chat(server, body)
    asked = field if getattr(body, field) is not None else None
    (gen,) = await admit(server, info_of(request), [prompt], params, add_special_tokens=False,
                         asked_max_tokens=asked)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model,
            "system_fingerprint": FINGERPRINT}
    if body.stream:
        return event_stream(request, _chat_events(request, body, gen, head), [gen])
    (result,) = await collect(request, [gen])
    choices = []
    for c in result.output.outputs:
        content, calls = message_of(c.text, tools_offered(body))
        choices.append({"index": c.index, "message": {"role": "assistant", "content": content, "tool_calls": calls},
                        "logprobs": chat_logprobs(server, result.tokens[c.index]) if body.logprobs else None,
                        "finish_reason": _finish_reason(c, calls)})
    num_generated = sum(len(c.token_ids) for c in result.output.outputs)
    return {"object": "chat.completion", **head, "choices": choices, "usage": _usage([gen], num_generated)}


def _finish_reason(c: CompletionOutput, calls: list | None) -> str:
    return "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason


async def _chat_events(request: Request, body: ChatCompletionRequest, gen: Generation, head: dict):
    server = server_of(request)
    stream = ChunkStream("chat.completion.chunk", head, [gen], body.n, body.stream_options)
    parsers = [ToolCallParser() for _ in range(body.n)] if tools_offered(body) else None
    for i in range(body.n):
        yield stream.chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None})
    async for index, c, _ in stream.updates(wants_tokens=body.logprobs):
        logprobs = chat_logprobs(server, c.new_tokens) if body.logprobs else None
        if parsers is None:
            delta = {"content": c.delta_text} if c.delta_text or not c.finish_reason else {}
            yield stream.chunk({"index": index, "delta": delta, "finish_reason": c.finish_reason,
                                "logprobs": logprobs})
            continue
        for chunk in _tool_chunks(stream, parsers[index], index, c, logprobs):
            yield chunk
    for event in stream.closing():
        yield event


def _tool_chunks(stream: ChunkStream, parser: ToolCallParser, index: int, c: CompletionOutput, logprobs):
    """Chunks of one update read for tool calls: content deltas, a call's first delta (id, type,
    name), its argument fragments; the finish on the last (with the update's logprobs)."""
    events = parser.feed(c.delta_text) + (parser.finish() if c.finish_reason else [])
    deltas = []
    for event in events:
        if event.kind == "content":
            deltas.append({"content": event.text})
        elif event.kind == "call":
            deltas.append({"tool_calls": [{"index": event.index, "id": event.id, "type": "function",
                                           "function": {"name": event.text, "arguments": ""}}]})
        else:
            deltas.append({"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]})
    if not deltas and not (c.finish_reason or logprobs):
        return
    finish = _finish_reason(c, parser.calls) if c.finish_reason else None
    deltas = deltas or [{}]
    for k, delta in enumerate(deltas):
        last = k == len(deltas) - 1
        yield stream.chunk({"index": index, "delta": delta, "finish_reason": finish if last else None,
                            "logprobs": logprobs if last else None})


# -- embeddings --------------------------------------------------------------------------------

@router.post("/embeddings", response_model=EmbeddingResponse, responses=_ERRORS,
             summary="Embeddings (OpenAI), L2-normalized; dimensions keeps the first N (Matryoshka)")
async def embeddings(body: EmbeddingRequest, request: Request):
    server = server_of(request)
    asked = body.truncate_prompt_tokens
    truncate = truncation(server, True if asked == -1 else asked)
    output = await encode(request, "embed", body.input, True, truncate, dimensions=body.dimensions, model=body.model,
                          param="input")
    vectors = output.data                                         # (n, dim) float32
    if body.encoding_format == "base64":
        vectors = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    data = [{"object": "embedding", "index": i, "embedding": vector} for i, vector in enumerate(vectors)]
    return json_response({"object": "list", "data": data, "model": info_of(request).model,
                          "usage": {"prompt_tokens": output.num_tokens, "total_tokens": output.num_tokens}})


# -- models ------------------------------------------------------------------------------------

@router.get("/models", response_model=ModelList, responses=openapi_errors(401, openai=True),
            summary="The models this server serves")
async def models(request: Request):
    return {"object": "list", "data": _model_cards(server_of(request))}


@router.get("/models/{model_id:path}", response_model=ModelCard, responses=openapi_errors(401, 404, openai=True),
            summary="One served model (OpenAI models.retrieve)")
async def model(model_id: str, request: Request):
    card = next((c for c in _model_cards(server_of(request)) if c["id"] == model_id), None)
    if card is None:
        raise APIError(404, f"the model {model_id!r} is not served here (see /v1/models)", param="model",
                       code="model_not_found")
    return card


def _model_cards(server: Server) -> list[dict]:
    created = server.started_at
    cards, listed = [], set()
    if server.generator is not None:
        cards.append({"id": server.model_id, "object": "model", "created": created, "owned_by": "attnserve",
                      "max_model_len": server.max_model_len, "task": "generate", "tasks": ["generate"]})
        listed.add(server.model_id)
    for name, encoder in server.encoders.items():
        tasks = [task for task, names in server.tasks.items() if name in names]
        if name not in listed and tasks:
            listed.add(name)
            main = next(task for task in ("embed", "embed_sparse", "rerank", "classify", "fill_mask") if task in tasks)
            cards.append({"id": name, "object": "model", "created": created, "owned_by": "attnserve",
                          "max_model_len": encoder.limits.max_length, "task": main, "tasks": tasks})
    return cards
