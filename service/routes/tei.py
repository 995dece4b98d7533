"""TEI routes: /embed, /classify (alias /predict)."""
from __future__ import annotations

from fastapi import APIRouter, Request

from service.embeddings import encode, submit_classify, submit_embed
from service.errors import openapi_errors
from service.schemas import ClassifyRequest, EmbedRequest, LabelScore

router = APIRouter(tags=["TEI"])

_ENC_ERRORS = openapi_errors(400, 401, 404, 413, 422, 429, 503)


@router.post("/embed", response_model=list[list[float]], responses=_ENC_ERRORS,
             summary="Embeddings (TEI): one vector per input, L2-normalized unless normalize=false")
async def embed(body: EmbedRequest, request: Request):
    output = await encode(request, "embed", submit_embed, body.inputs, body.normalize, body.truncate)
    return output.data


@router.post("/classify", response_model=list[list[LabelScore]], responses=_ENC_ERRORS,
             summary="Classification (TEI): labels with scores, best first; zero-shot with candidate_labels")
async def classify(body: ClassifyRequest, request: Request):
    output = await encode(request, "classify", submit_classify, body.inputs, body.candidate_labels,
                          body.truncate)
    top_k = body.parameters.top_k if body.parameters else None
    return [scores[:top_k] for scores in output.data] if top_k else output.data


router.add_api_route("/predict", classify, methods=["POST"], response_model=list[list[LabelScore]],
                     responses=_ENC_ERRORS, summary="Alias of /classify (TEI)")
