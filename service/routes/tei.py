"""TEI routes: /embed, /classify (alias /predict), /rerank, /similarity, /embed_sparse; and the
Hugging Face Inference API's /fill_mask.

Each takes an optional `model` (an extension: TEI serves one model) naming the served model to
use; null is the task's default, the first the server was started with."""
from __future__ import annotations

from fastapi import APIRouter, Request

from engine.encoder_engine import ClassifyOptions
from service.embeddings import direction, encode, json_response, truncation
from service.errors import openapi_errors
from service.runtime import server_of
from service.schemas import (ClassifyRequest, EmbedRequest, FillMaskProposal, FillMaskRequest, LabelScore,
                             RankedText, RerankRequest, SimilarityRequest, SparseEmbedRequest, SparseValue)

router = APIRouter(tags=["TEI"])

_ENC_ERRORS = openapi_errors(400, 401, 404, 413, 422, 429, 503)


@router.post("/embed", response_model=list[list[float]], responses=_ENC_ERRORS,
             summary="Embeddings (TEI): one vector per input, L2-normalized unless normalize=false")
async def embed(body: EmbedRequest, request: Request):
    output = await encode(request, "embed", body.inputs, body.normalize, truncation(server_of(request), body.truncate),
                          dimensions=body.dimensions, prompt_name=body.prompt_name,
                          direction=direction(body.truncation_direction), model=body.model)
    return json_response(output.data)


_CLASSIFY_ANSWER = list[list[LabelScore]] | list[LabelScore]


@router.post("/classify", response_model=_CLASSIFY_ANSWER, responses=_ENC_ERRORS,
             summary="Classification (TEI): labels with scores, best first, per input; zero-shot with "
                     "candidate_labels. The Hugging Face Inference API's zero-shot request (one input, "
                     "parameters.candidate_labels) gets that API's answer: one list")
async def classify(body: ClassifyRequest, request: Request):
    p = body.parameters
    options = ClassifyOptions(multi_label=p.multi_label, hypothesis_template=p.hypothesis_template,
                              function_to_apply=p.function_to_apply) if p else ClassifyOptions()
    output = await encode(request, "classify", body.inputs, body.labels,
                          truncation(server_of(request), body.truncate), options,
                          direction=direction(body.truncation_direction), model=body.model)
    top_k = p.top_k if p else None
    answer = [scores[:top_k] for scores in output.data] if top_k else output.data
    hf_zero_shot = p is not None and p.candidate_labels is not None and isinstance(body.inputs, str)
    return answer[0] if hf_zero_shot else answer


router.add_api_route("/predict", classify, methods=["POST"], response_model=_CLASSIFY_ANSWER,
                     responses=_ENC_ERRORS, summary="Alias of /classify (TEI)")


@router.post("/rerank", response_model=list[RankedText], responses=_ENC_ERRORS,
             summary="Rerank (TEI): texts scored against the query, best first. A cross-encoder (--reranker-"
                     "model) reads each (query, text) pair; a bi-encoder scores by cosine (/info says which)")
async def rerank(body: RerankRequest, request: Request):
    output = await encode(request, "rerank", body.query, body.texts, truncation(server_of(request), body.truncate),
                          body.raw_scores, direction=direction(body.truncation_direction), model=body.model)
    order = sorted(range(len(output.data)), key=lambda i: -output.data[i])
    return json_response([{"index": i, "score": output.data[i], **({"text": body.texts[i]} if body.return_text else {})}
                          for i in order])


@router.post("/similarity", response_model=list[float], responses=_ENC_ERRORS,
             summary="Sentence similarity (TEI, Hugging Face Inference API): the cosine of each sentence's "
                     "embedding with the source sentence's")
async def similarity(body: SimilarityRequest, request: Request):
    p = body.parameters
    truncate = body.truncate if p is None or p.truncate is None else p.truncate
    cut = body.truncation_direction if p is None or p.truncation_direction is None else p.truncation_direction
    prompt_name = body.prompt_name if p is None or p.prompt_name is None else p.prompt_name
    output = await encode(request, "similarity", body.inputs.source_sentence, body.inputs.sentences,
                          truncation(server_of(request), truncate), direction=direction(cut),
                          prompt_name=prompt_name, model=body.model)
    return json_response(output.data)


@router.post("/embed_sparse", response_model=list[list[SparseValue]], responses=_ENC_ERRORS,
             summary="Sparse embeddings (TEI, SPLADE): per input, the vocabulary ids with a non-zero weight")
async def embed_sparse(body: SparseEmbedRequest, request: Request):
    output = await encode(request, "embed_sparse", body.inputs, truncation(server_of(request), body.truncate),
                          direction=direction(body.truncation_direction), model=body.model)
    return json_response([[{"index": i, "value": v} for i, v in zip(vector.indices, vector.values)]
                          for vector in output.data])


_FILL_MASK_ANSWER = list[FillMaskProposal] | list[list[FillMaskProposal]] | list[list[list[FillMaskProposal]]]


@router.post("/fill_mask", response_model=_FILL_MASK_ANSWER, responses=_ENC_ERRORS, tags=["Hugging Face"],
             summary="Fill-mask (Hugging Face Inference API, transformers' fill-mask pipeline): the likeliest "
                     "tokens for each mask token, best first. One text with one mask: a list; several masks: "
                     "a list per mask; a list of texts: one such answer per text")
async def fill_mask(body: FillMaskRequest, request: Request):
    output = await encode(request, "fill_mask", body.inputs, body.option("top_k") or 5, body.option("targets"),
                          truncation(server_of(request), body.truncate), model=body.model)
    answers = [per_mask[0] if len(per_mask) == 1 else per_mask for per_mask in output.data]
    return json_response(answers[0] if isinstance(body.inputs, str) else answers)
