"""TEI routes: /embed, /classify (alias /predict)."""
from __future__ import annotations

from fastapi import APIRouter, Request

from engine.encoder_engine import ClassifyOptions
from service.embeddings import encode, submit_classify, submit_embed, truncation
from service.errors import openapi_errors
from service.runtime import server_of
from service.schemas import ClassifyRequest, EmbedRequest, LabelScore

router = APIRouter(tags=["TEI"])

_ENC_ERRORS = openapi_errors(400, 401, 404, 413, 422, 429, 503)


@router.post("/embed", response_model=list[list[float]], responses=_ENC_ERRORS,
             summary="Embeddings (TEI): one vector per input, L2-normalized unless normalize=false")
async def embed(body: EmbedRequest, request: Request):
    truncate = truncation(server_of(request), body.truncate)
    output = await encode(request, "embed", submit_embed, body.inputs, body.normalize, truncate)
    return output.data


_CLASSIFY_ANSWER = list[list[LabelScore]] | list[LabelScore]


@router.post("/classify", response_model=_CLASSIFY_ANSWER, responses=_ENC_ERRORS,
             summary="Classification (TEI): labels with scores, best first, per input; zero-shot with "
                     "candidate_labels. The Hugging Face Inference API's zero-shot request (one input, "
                     "parameters.candidate_labels) gets that API's answer: one list")
async def classify(body: ClassifyRequest, request: Request):
    p = body.parameters
    options = ClassifyOptions(multi_label=p.multi_label, hypothesis_template=p.hypothesis_template,
                              function_to_apply=p.function_to_apply) if p else ClassifyOptions()
    output = await encode(request, "classify", submit_classify, body.inputs, body.labels,
                          truncation(server_of(request), body.truncate), options)
    top_k = p.top_k if p else None
    answer = [scores[:top_k] for scores in output.data] if top_k else output.data
    hf_zero_shot = p is not None and p.candidate_labels is not None and isinstance(body.inputs, str)
    return answer[0] if hf_zero_shot else answer


router.add_api_route("/predict", classify, methods=["POST"], response_model=_CLASSIFY_ANSWER,
                     responses=_ENC_ERRORS, summary="Alias of /classify (TEI)")
