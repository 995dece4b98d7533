"""create_app(settings): the FastAPI app, its lifespan and its middleware.

The lifespan starts loading the models in the background and yields at once, so /health,
/ready and the routes answer 503 (not a refused connection) while the models load and warm
up. On shutdown it drains: admission stops, running requests get up to --drain-timeout, the
rest are aborted, the engine loops stop.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service.errors import install_handlers
from service.middleware import OPEN_PATHS, ServiceMiddleware
from service.routes import admin, cohere, openai, tei, tgi
from service.runtime import VERSION, Server
from service.schemas import ChatCompletionChunk, Completion, NativeError, OpenAIErrorResponse, StreamResponse
from service.settings import Settings

logger = logging.getLogger("service")
_DOC_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})

DESCRIPTION = """TGI-, TEI- and OpenAI-compatible inference.

Errors: `/v1/*` answer `{"error": {"message", "type", "param", "code"}}`, the other routes
`{"error": "...", "error_type": "..."}`. With API keys configured every route but `/health`,
`/ready` and `/metrics` needs `Authorization: Bearer <key>`.
"""


def create_app(settings: Settings | None = None, on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    """The app for `settings`; `on_fatal(message)` is called if a model fails to load, or the
    generation engine stops for good (a tensor-parallel rank died)."""
    server = Server(settings or Settings(), on_fatal=on_fatal)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.ensure_future(server.start())
        try:
            yield
        finally:
            if not loading.done():
                loading.cancel()
            await server.stop()
            logger.info("stopped")

    app = FastAPI(title="attnserve", version=VERSION, description=DESCRIPTION, lifespan=lifespan,
                  strict_content_type=False)
    app.state.server = server
    app.openapi = lambda: _openapi(app, server)
    install_handlers(app)
    routers = [tgi.router, tei.router, openai.router, cohere.router, admin.router]
    for router in routers:
        app.include_router(router)
    routes = frozenset(route.path for router in routers for route in router.routes) | _DOC_PATHS
    app.add_middleware(ServiceMiddleware, server=server, routes=routes)
    if server.settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=server.settings.cors_origins,
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
                           expose_headers=["X-Request-Id", "Retry-After"])
    return app


# route -> (the model of its server-sent events, its error body, whether it ends with [DONE])
_STREAMS = {"/generate_stream": (StreamResponse, NativeError, False), "/": (StreamResponse, NativeError, False),
            "/v1/completions": (Completion, OpenAIErrorResponse, True),
            "/v1/chat/completions": (ChatCompletionChunk, OpenAIErrorResponse, True)}


def _openapi(app: FastAPI, server: Server) -> dict:
    if app.openapi_schema is None:
        _add_streams(FastAPI.openapi(app))          # (FastAPI caches it in app.openapi_schema)
        if server.settings.api_keys:
            _add_security(app.openapi_schema)
    if not getattr(app.state, "openapi_has_model_bounds", False) and server.status == "ready":
        _add_model_bounds(app.openapi_schema, server)
        app.state.openapi_has_model_bounds = True
    return app.openapi_schema


def _add_model_bounds(spec: dict, server: Server) -> None:
    """The bounds that depend on the loaded models: max tokens, embedding dimensions."""
    components = spec["components"]["schemas"]
    bounds, token_ids = [], []
    if server.generator is not None:
        bounds = [("GenerateParameters", "max_new_tokens", None, server.max_model_len),
                  ("CompletionRequest", "max_tokens", None, server.max_model_len),
                  ("ChatCompletionRequest", "max_tokens", None, server.max_model_len),
                  ("ChatCompletionRequest", "max_completion_tokens", None, server.max_model_len)]
        vocab = server.generator.limits.vocab_size
        token_ids = [("CompletionRequest", "prompt", vocab), ("DetokenizeRequest", "inputs", vocab)]
    embedders = [server.encoders[name].limits for name in server.served_models("embed")]
    if embedders:                             # the widest of them, when there are several
        dimension, vocab = max(e.hidden_size for e in embedders), max(e.vocab_size for e in embedders)
        bounds += [("EmbeddingRequest", "dimensions", 1, dimension), ("EmbedRequest", "dimensions", 1, dimension)]
        token_ids += [("EmbedRequest", "inputs", vocab), ("EmbeddingRequest", "input", vocab)]
    sparse = [server.encoders[name].limits for name in server.served_models("embed_sparse")]
    if sparse:
        token_ids.append(("SparseEmbedRequest", "inputs", max(e.vocab_size for e in sparse)))
    for component, field, minimum, maximum in bounds:
        prop = components[component]["properties"][field]
        for branch in prop.get("anyOf", [prop]):
            if branch.get("type") == "integer":
                branch["maximum"] = maximum
                if minimum is not None:
                    branch["minimum"] = minimum
    for component, field, size in token_ids:
        _bound_integers(components[component]["properties"][field], size - 1)


def _add_security(spec: dict) -> None:
    """With API keys, every route but the open ones needs a bearer key (/docs' Authorize)."""
    spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, operations in spec["paths"].items():
        if path not in OPEN_PATHS:
            for operation in operations.values():
                operation["security"] = [{"bearer": []}]


def _bound_integers(node, maximum: int) -> None:
    if isinstance(node, dict):
        if node.get("type") == "integer":
            node["maximum"] = maximum
        for value in node.values():
            _bound_integers(value, maximum)
    elif isinstance(node, list):
        for value in node:
            _bound_integers(value, maximum)


def _add_streams(spec: dict) -> None:
    """FastAPI documents JSON bodies only: add each stream's events (`data:` holds JSON)."""
    components = spec["components"]["schemas"]
    for path, (event, error, ends_with_done) in _STREAMS.items():
        for model in (event, error):
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
            for name, definition in schema.pop("$defs", {}).items():
                components.setdefault(name, definition)
            components.setdefault(model.__name__, schema)
        data = {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [
            {"$ref": f"#/components/schemas/{event.__name__}"},
            {"$ref": f"#/components/schemas/{error.__name__}"}]}}
        if ends_with_done:
            data = {"anyOf": [{"const": "[DONE]"}, data]}
        content = spec["paths"][path]["post"]["responses"]["200"].setdefault("content", {})
        content["text/event-stream"] = {"schema": {"type": "object", "required": ["data"],
                                                   "properties": {"data": data}}}
        if path == "/generate_stream":
            content.pop("application/json", None)
