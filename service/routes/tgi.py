"""TGI routes: /generate, /generate_stream, / (TGI's compat route: `stream` picks), /tokenize,
/detokenize.

TGI semantics: max_new_tokens defaults to 100; sampling happens when do_sample is true or a
sampling option (temperature != 1, top_k, top_p < 1, min_p) is set, and temperature 0 is
always greedy; a sampled request without a seed gets one, reported in details.seed;
generated_text keeps the stop sequence that ended it, as TGI does. parameters.grammar constrains
the text (a JSON schema or a regex; service/structured.py); decoder_input_details fills
details.prefill with each prompt token's logprob (the first's null).
"""
from __future__ import annotations

import json
import math
import random
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from engine.outputs import CompletionOutput, GeneratedToken
from engine.sampling import SamplingParams
from service.errors import APIError, openapi_errors
from service.generation import Generation, admit, collect, event_stream, max_new_tokens
from service.runtime import Server, TokenizeSlot, info_of, server_of
from service.structured import tgi_constraint
from service.schemas import (DetokenizeRequest, DetokenizeResponse, GenerateParameters, GenerateRequest,
                             GenerateResponse, SimpleToken, TokenizeRequest)

router = APIRouter(tags=["TGI"])

_GEN_ERRORS = openapi_errors(400, 401, 404, 413, 422, 429, 500, 503)
_STREAM_DOC = {200: {"description": "Server-sent events (text/event-stream), one per token "
                     "(`data: {...}`); the last carries generated_text and details"}}


# -- parameters ------------------------------------------------------------------------------

def tgi_sampling(server: Server, p: GenerateParameters, stream: bool = False) -> tuple[SamplingParams, int | None]:
    """GenerateParameters -> (SamplingParams, the seed to report). Prompt logprobs are computed
    for details.prefill, which only /generate answers, and only by a decoder-only model."""
    asked = p.max_new_tokens if "max_new_tokens" in p.model_fields_set else None
    max_tokens = max_new_tokens(server, asked, "parameters.max_new_tokens", route_default=100)
    uses_warpers = (p.temperature not in (None, 1.0) or p.top_k not in (None, 0, -1)
                    or p.top_p not in (None, 1.0) or p.min_p not in (None, 0.0))
    sample = (p.do_sample or uses_warpers) and p.temperature != 0.0
    seed = p.seed
    if sample and seed is None:
        seed = random.getrandbits(63)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=(1.0 if p.temperature is None else p.temperature) if sample else 0.0,
        top_k=p.top_k if p.top_k not in (None, 0) else -1, top_p=p.top_p or 1.0, min_p=p.min_p or 0.0,
        repetition_penalty=p.repetition_penalty or 1.0, frequency_penalty=p.frequency_penalty or 0.0,
        presence_penalty=p.presence_penalty or 0.0, seed=seed if sample else None, stop=list(p.stop),
        ignore_eos=p.ignore_eos, logprobs=p.top_n_tokens or None, guided_decoding=tgi_constraint(p.grammar),
        prompt_logprobs=0 if p.details and p.decoder_input_details and not stream
        and not server.generator.limits.is_encoder_decoder else None)
    return params, (seed if sample else None)


def finish_reason(c: CompletionOutput) -> str:
    if c.finish_reason == "length":
        return "length"
    return "stop_sequence" if isinstance(c.stop_reason, str) else "eos_token"


def generated_text(gen: Generation, c: CompletionOutput, p: GenerateParameters) -> str:
    text = c.text + (c.stop_reason if isinstance(c.stop_reason, str) else "")
    return (gen.prompt.text or "") + text if p.return_full_text else text


def finite_or_none(x: float | None) -> float | None:
    """TGI's JSON has no -inf: an impossible token's logprob is null."""
    return x if x is not None and math.isfinite(x) else None


def token_json(t: GeneratedToken) -> dict:
    return {"id": t.id, "text": t.text, "logprob": finite_or_none(t.logprob), "special": t.special}


def top_tokens_json(server: Server, t: GeneratedToken) -> list[dict]:
    return [{"id": i, "text": server.token_text(i), "logprob": finite_or_none(lp),
             "special": server.tokenizer.is_special(i)} for i, lp in (t.top_logprobs or [])]


async def _start(request: Request, body: GenerateRequest, stream: bool) -> tuple[Generation, int | None]:
    server = server_of(request)
    server.require_generator()
    params, seed = tgi_sampling(server, body.parameters, stream)
    asked = "parameters.max_new_tokens" if "max_new_tokens" in body.parameters.model_fields_set else None
    gens = await admit(server, info_of(request), [body.inputs], params, truncate=body.parameters.truncate,
                       asked_max_tokens=asked)
    return gens[0], seed


# -- routes ----------------------------------------------------------------------------------

@router.post("/generate", response_model=GenerateResponse, responses=_GEN_ERRORS,
             summary="Generate text (TGI)")
async def generate(body: GenerateRequest, request: Request):
    gen, seed = await _start(request, body, stream=False)
    return await _complete(request, gen, seed, body.parameters)


@router.post("/generate_stream", response_model=None, responses={**_STREAM_DOC, **_GEN_ERRORS},
             summary="Generate text as server-sent events (TGI)")
async def generate_stream(body: GenerateRequest, request: Request):
    gen, seed = await _start(request, body, stream=True)
    return event_stream(request, _events(request, gen, seed, body.parameters), [gen])


@router.post("/", response_model=list[GenerateResponse], responses=_GEN_ERRORS,
             summary="TGI compat route: /generate's answer in a one-element list (as TGI, and as its "
                     "`text_generation` client reads it), or /generate_stream's events when stream=true")
async def compat_generate(body: GenerateRequest, request: Request):
    if body.stream:
        return await generate_stream(body, request)
    return [await generate(body, request)]


async def _complete(request: Request, gen: Generation, seed: int | None, p: GenerateParameters):
    server = server_of(request)
    (result,) = await collect(request, [gen])
    c = result.output.outputs[0]
    answer = {"generated_text": generated_text(gen, c, p), "details": None}
    if p.details:
        tokens = result.tokens[0]
        answer["details"] = {
            "finish_reason": finish_reason(c), "generated_tokens": len(c.token_ids), "seed": seed,
            "prefill": _prefill(server, gen, result.output.prompt_logprobs) if p.decoder_input_details else [],
            "tokens": [token_json(t) for t in tokens],
            "top_tokens": [top_tokens_json(server, t) for t in tokens] if p.top_n_tokens else None,
            "best_of_sequences": None}
    return answer


def _prefill(server: Server, gen: Generation, entries) -> list[dict]:
    if server.generator.limits.is_encoder_decoder:      # the encoder reads the prompt, never predicts it
        entries = [None] * len(gen.prompt.ids)
    elif entries is None or len(entries) != len(gen.prompt.ids):
        raise APIError(500, "the prompt logprobs were not computed", error_type="generation")
    return [{"id": i, "text": server.token_text(i), "logprob": None if e is None else finite_or_none(e.logprob)}
            for i, e in zip(gen.prompt.ids, entries)]


async def _events(request: Request, gen: Generation, seed: int | None, p: GenerateParameters):
    server, index = server_of(request), 0
    async for out in gen:
        c = out.outputs[0]
        if c.finish_reason in ("abort", "error"):
            raise APIError(503, "the server is shutting down; the request was aborted")
        for j, token in enumerate(c.new_tokens):
            index += 1
            event = {"index": index, "token": token_json(token), "generated_text": None,
                     "details": None,
                     "top_tokens": top_tokens_json(server, token) if p.top_n_tokens else None}
            if out.finished and j == len(c.new_tokens) - 1:
                event["generated_text"] = generated_text(gen, c, p)
                event["details"] = {"finish_reason": finish_reason(c), "generated_tokens": len(c.token_ids),
                                    "seed": seed, "input_length": len(gen.prompt.ids)}
            yield "data: " + json.dumps(event) + "\n\n"


# -- tokens ----------------------------------------------------------------------------------

_TOKENIZE_ERRORS = openapi_errors(401, 404, 413, 422, 429, 503)


@router.post("/tokenize", response_model=list[SimpleToken], responses=_TOKENIZE_ERRORS,
             summary="Tokenize text (TGI): ids with their text and character offsets")
async def tokenize(body: TokenizeRequest, request: Request):
    server = server_of(request)
    server.require_generator()
    slot = server.tokenize_slot()
    # A long input has a big answer (1 MB of text: ~220k tokens, ~10 MB of JSON): the worker
    # writes it in pieces and they are streamed as they come, never held whole.
    pieces = slot.tokenize(body.inputs, body.add_special_tokens)
    try:
        first = await anext(pieces, None)           # errors before the first byte are a status
    except BaseException:
        await pieces.aclose()
        slot.release()
        raise
    return StreamingResponse(_json_list(first, pieces, slot), media_type="application/json",
                             background=BackgroundTask(slot.release))


async def _json_list(first: bytes | None, rest: AsyncIterator[bytes], slot: TokenizeSlot):
    try:
        yield b"[" + (first or b"")
        async for piece in rest:
            yield b"," + piece
        yield b"]"
    finally:
        await rest.aclose()
        slot.release()


@router.post("/detokenize", response_model=DetokenizeResponse, responses=_TOKENIZE_ERRORS,
             summary="Token ids back to text")
async def detokenize(body: DetokenizeRequest, request: Request):
    server = server_of(request)
    server.require_generator()
    vocab = server.generator.limits.vocab_size
    bad = next((i for i in body.inputs if i >= vocab), None)
    if bad is not None:
        raise APIError(422, f"inputs: token id {bad} is outside the vocabulary [0, {vocab})", param="inputs")
    async with server.tokenize_slot() as slot:
        text = await slot.detokenize(body.inputs, body.skip_special_tokens)
    return {"text": text}
