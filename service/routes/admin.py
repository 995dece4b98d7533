"""Operations: /health (liveness), /ready (readiness), /info, /metrics."""
from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.errors import APIError, openapi_errors
from service.metrics import CONTENT_TYPE
from service.runtime import VERSION, server_of
from service.schemas import MAX_STOP, Health, Info

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=Health, responses=openapi_errors(503),
            summary="Liveness: 200 while the engine loop runs and makes progress")
async def health(request: Request):
    server = server_of(request)
    if server.status in ("loading", "failed"):
        server.require_ready()                  # raises the loading / failed 503
    _require_alive(server)
    return {"status": "ok"}


@router.get("/ready", response_model=Health, responses=openapi_errors(503),
            summary="Readiness: 200 when every model is loaded and warm and the server is not draining")
async def ready(request: Request):
    server = server_of(request)
    server.require_ready()
    _require_alive(server)
    return {"status": "ready"}


def _require_alive(server) -> None:
    if server.generator is not None and not server.generator.is_alive:
        raise APIError(503, "the engine loop is not running or is stuck")
    for name, encoder in server.encoders.items():
        if not encoder.stats().is_alive and server.status == "ready":
            raise APIError(503, f"the encoder {name!r} is not running")


@router.get("/info", response_model=Info, responses=openapi_errors(401, 503),
            summary="Model, limits and live engine state (TGI-style)")
async def info(request: Request):
    server = server_of(request)
    if server.status in ("loading", "failed") or (server.generator is None and not server.encoders):
        server.require_ready()                  # (the latter: stopping before anything loaded)
    encoders = server.encoder_ids()
    settings = server.settings
    queued = sum(e.stats().num_queued_inputs for e in server.encoders.values())
    common = {"model_id": server.model_id, "max_queue": settings.max_queue, "version": VERSION,
              "max_batch_tokens": settings.max_batch_tokens, "max_batch_size": settings.max_batch_size,
              "embedding_model_id": encoders.get("embed"), "classifier_model_id": encoders.get("classify"),
              "reranker_model_id": encoders.get("rerank"), "num_queued_inputs": queued,
              "models": _served_models(server)}
    if server.generator is None:              # encoder-only: TEI's answer, generation fields null
        limits = server.encoders[server.model_id].limits
        return {**common, "model_dtype": limits.dtype, "model_device_type": _device_type(limits.device),
                "model_pipeline_tag": _PIPELINE_TAGS[_main_task(server, server.model_id)],
                "max_input_tokens": limits.max_length}
    limits, stats = server.generator.limits, server.generator.stats()
    return {
        **common, "model_dtype": limits.dtype, "model_device_type": _device_type(limits.device),
        "max_input_tokens": limits.max_prompt_len, "max_total_tokens": limits.max_model_len,
        "max_model_len": limits.max_model_len, "max_new_tokens_default": 100,
        "block_size": limits.block_size, "num_blocks": limits.num_blocks,
        "num_free_blocks": stats.num_free_blocks, "kv_cache_usage": stats.kv_cache_usage,
        "num_requests_running": stats.num_running, "num_requests_waiting": stats.num_waiting,
        "max_num_seqs": limits.max_num_seqs, "max_stop_sequences": MAX_STOP, "max_best_of": 1,
        "quantization": limits.quantization,
    }


# an encoder's main task -> the Hugging Face pipeline tag TEI's /info gives it
_PIPELINE_TAGS = {"embed": "feature-extraction", "embed_sparse": "feature-extraction", "rerank": "text-ranking",
                  "classify": "text-classification", "fill_mask": "fill-mask"}


def _main_task(server, name: str) -> str:
    tasks = [task for task, names in server.tasks.items() if name in names]
    return next(task for task in _PIPELINE_TAGS if task in tasks)


def _served_models(server) -> list[dict]:
    """Each model with its tasks; an encoder that reranks says how (cross-encoder or cosine)."""
    models = []
    if server.generator is not None:
        models.append({"id": server.model_id, "tasks": ["generate"],
                       "max_input_tokens": server.generator.limits.max_prompt_len})
    for name, encoder in server.encoders.items():
        limits = encoder.limits
        tasks = [task for task, names in server.tasks.items() if name in names]
        models.append({"id": name, "tasks": tasks, "max_input_tokens": limits.max_length,
                       "dimension": limits.hidden_size,
                       "rerank_scoring": limits.rerank_scoring if "rerank" in tasks else None,
                       "prompts": list(limits.prompts), "default_prompt_name": limits.default_prompt_name})
    return models


def _device_type(device: str) -> str:
    return device.split(":", 1)[0]                  # "cuda:0" -> "cuda"


@router.get("/metrics", response_class=Response, summary="Prometheus text exposition",
            responses={200: {"content": {CONTENT_TYPE: {}}, "description": "metrics"}})
async def metrics(request: Request):
    return Response(server_of(request).metrics.render(), media_type=CONTENT_TYPE)
