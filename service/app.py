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
from service.middleware import ServiceMiddleware
from service.routes import admin, native, openai
from service.runtime import VERSION, Server
from service.settings import Settings

logger = logging.getLogger("service")
_DOC_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})

DESCRIPTION = """TGI-, TEI- and OpenAI-compatible inference.

Errors: `/v1/*` answer `{"error": {"message", "type", "param", "code"}}`, the other routes
`{"error": "...", "error_type": "..."}`. With API keys configured every route but `/health`,
`/ready` and `/metrics` needs `Authorization: Bearer <key>`.
"""


def create_app(settings: Settings | None = None, on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    """The app for `settings`; `on_fatal(message)` is called if a model fails to load."""
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
    install_handlers(app)
    routers = [native.router, openai.router, admin.router]
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
