"""Cohere's rerank (`/v1/rerank`, `/v2/rerank`: what its SDK's Client and ClientV2 call), in the
shape Jina, vLLM, LiteLLM, LangChain and LlamaIndex also send and read.

Documents that do not fit beside the query are cut to fit (Cohere truncates long documents);
the query is never cut. Errors of /v1/rerank have the OpenAI shape, as every /v1 route's;
those of /v2/rerank the native one, as every other route's."""
from __future__ import annotations

from fastapi import APIRouter, Request

from service.embeddings import encode, json_response
from service.errors import openapi_errors
from service.runtime import info_of
from service.schemas import CohereRerankRequest, RerankResponse

router = APIRouter(tags=["Cohere"])

_STATUSES = (400, 401, 404, 413, 422, 429, 503)


async def rerank(body: CohereRerankRequest, request: Request):
    texts = body.texts
    output = await encode(request, "rerank", body.query, texts, True, strategy="only_second",
                          max_text_tokens=body.max_tokens_per_doc, model=body.model)
    order = sorted(range(len(texts)), key=lambda i: -output.data[i])[: body.top_n]
    results = [{"index": i, "relevance_score": output.data[i],
                **({"document": {"text": texts[i]}} if body.return_documents else {})} for i in order]
    info = info_of(request)
    return json_response({
        "id": f"rerank-{info.request_id}", "model": info.model, "results": results,
        "usage": {"total_tokens": output.num_tokens},
        "meta": {"api_version": {"version": "2" if request.url.path.startswith("/v2/") else "1"},
                 "billed_units": {"search_units": 1}, "tokens": {"input_tokens": output.num_tokens}}})


for path, what in (("/v1/rerank", "Rerank (Cohere v1, Jina, vLLM)"), ("/v2/rerank", "Rerank (Cohere v2)")):
    router.add_api_route(path, rerank, methods=["POST"], response_model=RerankResponse,
                         responses=openapi_errors(*_STATUSES, openai=path.startswith("/v1/")),
                         summary=f"{what}: documents scored against the query, best first (top_n of them). A "
                                 "cross-encoder (--reranker-model) reads each (query, document) pair; a "
                                 "bi-encoder scores by cosine (/info says which)")
