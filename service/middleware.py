"""The one ASGI middleware every request passes: request id, API keys, draining, the body
limit, a log line and the request metrics. Pure ASGI, so streams pass through untouched.

Order: X-Request-Id -> 401 (bad key) -> 503 (draining) -> 413 (body too large) -> the app.
"""
from __future__ import annotations

import hmac
import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import APIError, error_response
from service.runtime import RequestInfo, Server

access_log = logging.getLogger("service.access")
logger = logging.getLogger("service")

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})   # no key needed, served while draining
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class ServiceMiddleware:
    def __init__(self, app: ASGIApp, server: Server, routes: frozenset[str]):
        self.app, self.server, self.routes = app, server, routes
        self.keys = [key.encode() for key in server.settings.api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = Headers(scope=scope)
        path = scope["path"]
        given_id = headers.get("x-request-id", "")
        info = RequestInfo(request_id=given_id if _REQUEST_ID.match(given_id) else uuid.uuid4().hex,
                           route=path if path in self.routes else "other")
        scope["attnserve.info"] = info
        if scope["method"] == "POST" and not _is_json(headers.get("content-type")):
            _treat_body_as_json(scope)          # `curl -d '{...}'` sends form-urlencoded

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                info.status = message["status"]
                MutableHeaders(scope=message)["x-request-id"] = info.request_id
            await send(message)

        try:
            rejection = self._reject(path, headers)
            if rejection is not None:
                await error_response(path, rejection)(scope, receive, send_with_id)
            else:
                await self.app(scope, self._limit_body(receive), send_with_id)
        except Exception:
            logger.exception("unhandled error on %s %s", scope["method"], path)
            if info.status == 0:
                await error_response(path, APIError(500, "internal server error (logged)"))(
                    scope, receive, send_with_id)
        finally:
            self._record(scope, info, time.perf_counter() - started)

    def _reject(self, path: str, headers: Headers) -> APIError | None:
        if self.keys and path not in OPEN_PATHS and not self._authorized(headers.get("authorization", "")):
            return APIError(401, "missing or invalid API key: send Authorization: Bearer <key>",
                            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if self.server.status in ("draining", "stopped") and path not in OPEN_PATHS:
            return APIError(503, "the server is shutting down", headers={"Retry-After": "1",
                                                                         "Connection": "close"})
        limit = self.server.settings.max_body_bytes
        length = headers.get("content-length", "")
        if limit and length.isdigit() and int(length) > limit:
            return APIError(413, f"the body has {length} bytes; the limit is {limit}")
        return None

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        given = token.strip().encode()
        ok = False
        for key in self.keys:                   # every key compared: timing says nothing
            ok |= hmac.compare_digest(given, key)
        return ok and scheme.lower() == "bearer"

    def _limit_body(self, receive: Receive) -> Receive:
        limit = self.server.settings.max_body_bytes
        if not limit:
            return receive
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:                # chunked bodies have no Content-Length
                    raise HTTPException(413, f"the body is over the limit of {limit} bytes")
            return message
        return limited

    def _record(self, scope: Scope, info: RequestInfo, duration: float) -> None:
        status = info.status or 500
        metrics = self.server.metrics
        metrics.requests.labels(info.route, str(status)).inc()
        metrics.request_duration.labels(info.route).observe(duration)
        prompt = ""
        if self.server.settings.log_prompts and info.prompt is not None:
            prompt = f" prompt={info.prompt[:2000]!r}"
        access_log.info("%s %s %d %.3fs prompt_tokens=%d completion_tokens=%d id=%s%s",
                        scope["method"], scope["path"], status, duration, info.prompt_tokens,
                        info.completion_tokens, info.request_id, prompt)


def _is_json(content_type: str | None) -> bool:
    return content_type is not None and ("json" in content_type.lower() or "multipart" in content_type.lower())


def _treat_body_as_json(scope: Scope) -> None:
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
    scope["headers"] = headers + [(b"content-type", b"application/json")]
