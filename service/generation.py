"""What every generation route shares: admission (ready, queue bound, tokenization, length),
the per-request metrics, waiting for a result while watching the client, and aborts.

    gens = await admit(server, info, prompts, params)     # 503 / 429 / 400 / 422 raise here,
                                                          # before any byte is sent
    async for i, out in merge(gens): ...                  # streaming
    results = await collect(request, gens)                # non-streaming; ClientGone if it left

Prompts and parameters are validated by the engine's own rules (engine/limits.py,
SamplingParams); its typed errors become HTTP answers in service/errors.py.

A Generation that ends without its final output (client gone, exception) aborts its engine
request, so the KV blocks are free within one step.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from engine.async_engine import RequestStream
from engine.errors import EngineStoppedError, RequestFailedError
from engine.outputs import GeneratedToken, RequestOutput
from engine.sampling import SamplingParams
from service.errors import APIError, ClientGone, as_api_error, error_event
from service.runtime import RequestInfo, Server, info_of

logger = logging.getLogger("service")
_ids = itertools.count()
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Prompt:
    ids: list[int]
    text: str | None = None                 # for return_full_text / echo / --log-prompts


@dataclass
class Result:
    """A finished request: its last output and every token of each completion."""
    output: RequestOutput
    tokens: list[list[GeneratedToken]]


@dataclass
class Generation:
    """One engine request, with the accounting of what it delivers."""
    server: Server
    info: RequestInfo
    prompt: Prompt
    stream: RequestStream
    arrival: float
    finished: bool = False
    num_tokens: int = 0
    last_token_at: float | None = None
    final: RequestOutput | None = None
    abort_reason: str = "client_disconnect"
    _closed: bool = field(default=False, repr=False)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._outputs()

    async def _outputs(self) -> AsyncIterator[RequestOutput]:
        try:
            async for out in self.stream:
                self._account(out)
                yield out
        except (RequestFailedError, EngineStoppedError) as exc:   # mid-request: it failed
            self.finished = True
            logger.error("request %s failed in the engine: %s", self.info.request_id, exc)
            raise APIError(500, f"generation failed: {exc}", error_type="generation") from None
        finally:
            self.close()

    def _account(self, out: RequestOutput) -> None:
        m = self.server.metrics
        now = time.monotonic()
        new = sum(len(c.new_tokens) for c in out.outputs)
        if new:
            if self.num_tokens == 0:
                first = out.metrics.first_token_time or now
                m.ttft.observe(max(0.0, first - self.arrival))
                scheduled = out.metrics.first_scheduled_time or first
                m.queue_time.observe(max(0.0, scheduled - self.arrival))
            elif self.last_token_at is not None:
                m.itl.observe(now - self.last_token_at)
            self.last_token_at = now
            self.num_tokens += new
            self.info.completion_tokens += new
            m.generation_tokens.inc(new)
        if out.finished:
            self.finished, self.final = True, out
            if out.outputs and all(c.finish_reason == "abort" for c in out.outputs):
                m.aborted.labels("shutdown").inc()        # only a drain aborts from inside

    def abort(self, reason: str) -> None:
        self.abort_reason = reason
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.finished:
            self.stream.abort()
            self.server.metrics.aborted.labels(self.abort_reason).inc()
            logger.info("request %s aborted (%s) after %d tokens", self.stream.request_id,
                        self.abort_reason, self.num_tokens)

    @property
    def was_aborted(self) -> bool:
        return self.final is not None and all(c.finish_reason == "abort" for c in self.final.outputs)


# -- admission ----------------------------------------------------------------------------------

async def admit(server: Server, info: RequestInfo, prompts: Sequence[str | list[int]],
                params: SamplingParams, *, truncate: int | None = None, add_special_tokens: bool = True,
                asked_max_tokens: str | None = None,
                asked_prompt_logprobs: str = "prompt_logprobs") -> list[Generation]:
    """Queue one engine request per prompt, all in one engine iteration; every rejection
    raises before anything runs. --max-queue counts sequences: n for each prompt.
    asked_max_tokens names the field when the client set the cap itself: then a prompt and
    cap that do not fit the model together are a 400 (as vLLM), where a default cap is cut.
    asked_prompt_logprobs names the field that asks for prompt logprobs (echo, ...)."""
    server.require_generator()
    info.model = server.model_id
    generator, limit = server.generator, server.settings.max_queue
    generator.limits.validate_n(params.n)
    generator.limits.validate_logit_bias(params.logit_bias)
    generator.limits.validate_prompt_logprobs(params.prompt_logprobs, asked_prompt_logprobs)
    num_seqs = len(prompts) * params.n
    if num_seqs > limit:
        raise APIError(422, f"the request asks for {num_seqs} sequences ({len(prompts)} prompts x n={params.n}); "
                       f"this server queues at most {limit} (--max-queue)", param="n", code="invalid_value")
    waiting = generator.stats().num_waiting_seqs + server.num_admitting
    if waiting + num_seqs > limit:
        raise APIError(429, f"the queue is full ({waiting} sequences waiting, limit {limit}); "
                       "retry later", headers={"Retry-After": "1"}, code="queue_full")
    server.num_admitting += num_seqs          # reserved before any await: the check stays exact
    try:
        tokenized = await server.tokenizing(_tokenize_all, server, prompts, add_special_tokens)
        for prompt in tokenized:
            if truncate is not None and len(prompt.ids) > truncate:
                prompt.ids = prompt.ids[-truncate:]
            generator.limits.validate_prompt(prompt.ids)   # all of them, before any is queued
            if asked_max_tokens is not None:
                generator.limits.validate_fit(len(prompt.ids), params.max_tokens, asked_max_tokens)
        server.require_ready()                # not draining since the request came in
        info.prompt = "\n".join(p.text for p in tokenized if p.text) or None
        streams = await generator.add_requests(
            [p.ids for p in tokenized], params, [f"{info.request_id}-{next(_ids)}" for _ in tokenized],
            info.arrival, group_id=f"{info.request_id}/{next(_ids)}")  # one client request: fair as one
    finally:
        server.num_admitting -= num_seqs
    gens = [Generation(server, info, prompt, stream, info.arrival) for prompt, stream in zip(tokenized, streams)]
    num_prompt = sum(len(g.prompt.ids) for g in gens)
    info.prompt_tokens += num_prompt
    server.metrics.prompt_tokens.inc(num_prompt)
    return gens


def _tokenize_all(server: Server, prompts: Sequence[str | list[int]], add_special_tokens: bool) -> list[Prompt]:
    tokenizer = server.tokenizer
    out = []
    for prompt in prompts:
        if isinstance(prompt, str):
            out.append(Prompt(tokenizer.encode(prompt, add_special_tokens=add_special_tokens), prompt))
        else:
            out.append(Prompt(list(prompt), None))
    return out


def max_new_tokens(server: Server, asked: int | None, field_name: str, route_default: int | None) -> int:
    """How many tokens a request may generate: what it asked (422 past the limit), else the
    operator's --default-max-tokens, else the route's own default (None: the rest of the
    model's length). Never past --max-new-tokens-limit nor the model's length; the engine
    further stops each prompt at max_model_len."""
    limit, why = server.max_model_len, "this model's max_model_len"
    operator_limit = server.settings.max_new_tokens_limit
    if operator_limit is not None and operator_limit < limit:
        limit, why = operator_limit, "this server's --max-new-tokens-limit"
    if asked is not None:
        if asked > limit:
            raise APIError(422, f"{field_name} must be <= {limit} ({why}), got {asked}",
                           param=field_name, code="invalid_value")
        return asked
    return min(server.settings.default_max_tokens or route_default or limit, limit)


# -- consuming ----------------------------------------------------------------------------------

async def collect(request: Request, gens: list[Generation]) -> list[Result]:
    """Run every generation to its end while watching the client; ClientGone if it left."""
    work = asyncio.ensure_future(asyncio.gather(*(_collect_one(g) for g in gens)))
    watcher = asyncio.ensure_future(client_disconnected(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone = not work.done()
        if gone:                              # the client left (or this handler was cancelled)
            for gen in gens:
                gen.abort("client_disconnect")
            work.cancel()
            work.add_done_callback(_retrieve)
        watcher.cancel()
    if gone:
        raise ClientGone()
    if work.exception() is not None:          # one failed: the others of this request stop too
        abort_unfinished(gens, "error")
    results = work.result()                   # re-raises an APIError from a failed generation
    if any(g.was_aborted for g in gens):
        raise APIError(503, "the server is shutting down; the request was aborted before it finished")
    return results


def abort_unfinished(gens: list[Generation], reason: str) -> None:
    for gen in gens:
        if not gen.finished:
            gen.abort(reason)


def event_stream(request: Request, events: AsyncIterator[str], gens: list[Generation]) -> StreamingResponse:
    """An SSE response of `events`. A failure after the stream started is its last event, in
    the route family's error shape; whatever is left unfinished (the client left while an
    event was being sent, or before the first) is aborted once the response ends."""
    async def guarded() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except Exception as exc:
            error = as_api_error(exc, f"stream {info_of(request).request_id}")
            yield error_event(request.url.path, error)

    async def cleanup() -> None:
        if any(not gen.finished for gen in gens):
            abort_unfinished(gens, "client_disconnect")
            info_of(request).status = 499         # counted as nginx counts a client that left
    return StreamingResponse(guarded(), media_type="text/event-stream", headers=SSE_HEADERS,
                             background=BackgroundTask(cleanup))


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()                    # retrieved: asyncio logs nothing


async def _collect_one(gen: Generation) -> Result:
    last, tokens = None, []
    async for out in gen:
        if not tokens:
            tokens = [[] for _ in out.outputs]
        for completion in out.outputs:
            tokens[completion.index].extend(completion.new_tokens)
        last = out
    return Result(last, tokens)


async def client_disconnected(request: Request) -> None:
    # The body has been read: the next message is http.disconnect, when the client leaves.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def merge(gens: list[Generation]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several generations as they come: (generation index, output)."""
    if len(gens) == 1:
        async for out in gens[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, gen: Generation) -> None:
        try:
            async for out in gen:
                queue.put_nowait((i, out, None))
        except Exception as exc:
            queue.put_nowait((i, None, exc))
        finally:
            queue.put_nowait((i, None, None))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    reason = "client_disconnect"
    try:
        remaining = len(gens)
        while remaining:
            i, out, error = await queue.get()
            if error is not None:
                reason = "error"
                raise error
            if out is None:
                remaining -= 1
                continue
            yield i, out
    finally:
        abort_unfinished(gens, reason)
        for task in tasks:
            task.cancel()

