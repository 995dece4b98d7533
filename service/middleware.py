"""The one ASGI middleware every request passes: request id, API keys, draining, the body
limit and deadline, a log line and the request metrics. Pure ASGI, so streams pass through
untouched.

Order: X-Request-Id -> 401 (bad key) -> 503 (draining) -> 413 (body too large) -> 415 (body
not JSON) -> the app, which gets 413 / 408 while reading a body that grows too large or stops
arriving (a chunked body has no Content-Length; a slow client must not hold a request forever).
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import itertools
import secrets

from fastapi import HTTPException
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import APIError, error_response
from service.runtime import RequestInfo, Server

access_log = logging.getLogger("service.access")
logger = logging.getLogger("service")

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})   # no key needed, served while draining
TOKENIZE_PATHS = frozenset({"/tokenize", "/detokenize"})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# What `curl -d` and a plain fetch() send for a JSON body: read as JSON. Any other type that
# is not JSON (multipart, XML, images, ...) is a 415.
_READ_AS_JSON = frozenset({"", "application/x-www-form-urlencoded", "text/plain"})


class ServiceMiddleware:
    def __init__(self, app: ASGIApp, server: Server, routes: frozenset[str]):
        self.app, self.server = app, server
        self.routes = frozenset(_template(r) for r in routes if "{" not in r)
        # "/v1/models/{model_id:path}" -> (its label "/v1/models/{model_id}", a pattern of its paths)
        self.templates = [(_template(r), re.compile("^" + re.sub(r"\{[^}]+\}", ".+", r) + "$"))
                          for r in routes if "{" in r]
        self.keys = [key.encode() for key in server.settings.api_keys]

    def route_label(self, path: str) -> str:
        """The route a path is counted under in the metrics: its template, or "other"."""
        if path in self.routes:
            return path
        return next((label for label, pattern in self.templates if pattern.match(path)), "other")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = Headers(scope=scope)
        path = scope["path"]
        given_id = headers.get("x-request-id", "")
        info = RequestInfo(request_id=given_id if _REQUEST_ID.match(given_id) else _new_request_id(),
                           route=self.route_label(path))
        scope["attnserve.info"] = info
        if scope["method"] == "POST" and _media_type(headers) in _READ_AS_JSON:
            _treat_body_as_json(scope)          # `curl -d '{...}'` sends form-urlencoded

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                info.status = message["status"]
                MutableHeaders(scope=message)["x-request-id"] = info.request_id
            await send(message)

        counted = path not in OPEN_PATHS                # what a drain waits to answer
        self.server.num_in_flight += counted
        try:
            rejection = self._reject(scope["method"], path, headers)
            if rejection is not None:
                await error_response(path, rejection)(scope, receive, send_with_id)
            else:
                await self.app(scope, self._limit_body(receive, started), send_with_id)
        except Exception:
            logger.exception("unhandled error on %s %s", scope["method"], path)
            if info.status == 0:
                await error_response(path, APIError(500, "internal server error (logged)"))(
                    scope, receive, send_with_id)
        finally:
            self.server.num_in_flight -= counted
            self._record(scope, info, time.perf_counter() - started)

    def _reject(self, method: str, path: str, headers: Headers) -> APIError | None:
        if self.keys and path not in OPEN_PATHS and not self._authorized(headers.get("authorization", "")):
            return APIError(401, "missing or invalid API key: send Authorization: Bearer <key>",
                            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if path in TOKENIZE_PATHS and self.server.num_tokenizing >= self.server.settings.max_tokenize_concurrency:
            # Refused before its body is read: a flood of 1 MB bodies costs no parsing.
            return self.server.tokenize_slots_full()
        if self.server.status in ("draining", "stopped") and path not in OPEN_PATHS:
            return APIError(503, "the server is shutting down", headers={"Retry-After": "1",
                                                                         "Connection": "close"})
        limit = self.server.settings.max_body_bytes
        length = headers.get("content-length", "")
        if limit and length.isdigit() and int(length) > limit:
            return APIError(413, f"the body has {length} bytes; the limit is {limit}")
        media_type = _media_type(headers)
        if method == "POST" and media_type not in _READ_AS_JSON and not _is_json(media_type):
            return APIError(415, f"Content-Type {media_type!r} is not supported: send the body as "
                            "application/json", param="body", code="unsupported_media_type")
        return None

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        given = token.strip().encode()
        ok = False
        for key in self.keys:                   # every key compared: timing says nothing
            ok |= hmac.compare_digest(given, key)
        return ok and scheme.lower() == "bearer"

    def _limit_body(self, receive: Receive, started: float) -> Receive:
        """`receive`, with 413 once the body outgrows the limit and 408 when it has not all
        arrived --read-timeout seconds after the headers; the connection is then closed."""
        limit, timeout = self.server.settings.max_body_bytes, self.server.settings.read_timeout
        seen, complete = 0, False

        async def limited() -> Message:
            nonlocal seen, complete
            if complete or not timeout:
                message = await receive()
            else:
                try:                            # (a body already there is taken even when late)
                    left = max(started + timeout - time.perf_counter(), 0.05)
                    message = await asyncio.wait_for(receive(), left)
                except TimeoutError:
                    raise HTTPException(408, f"the body did not arrive within {timeout:g} s",
                                        headers={"Connection": "close"}) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if limit and seen > limit:      # chunked bodies have no Content-Length
                    raise HTTPException(413, f"the body is over the limit of {limit} bytes")
            else:
                complete = True                 # http.disconnect: nothing more will come
            return message
        return limited

    def _record(self, scope: Scope, info: RequestInfo, duration: float) -> None:
        status = info.status or 500
        metrics = self.server.metrics
        metrics.requests.labels(info.route, str(status), info.model).inc()
        metrics.request_duration.labels(info.route).observe(duration)
        prompt = ""
        if self.server.settings.log_prompts and info.prompt is not None:
            prompt = f" prompt={info.prompt[:2000]!r}"
        access_log.info("%s %s %d %.3fs prompt_tokens=%d completion_tokens=%d id=%s%s",
                        scope["method"], scope["path"], status, duration, info.prompt_tokens,
                        info.completion_tokens, info.request_id, prompt)


# Assigned request ids: 32 hex digits, a random prefix per process and a counter (uuid4 per
# request cost a system call each: measurable when a flood of requests is being refused).
_ID_PREFIX = secrets.token_hex(8)
_ID_COUNTER = itertools.count()


def _new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def _template(route: str) -> str:
    return re.sub(r"\{(\w+):\w+\}", r"{\1}", route)            # "{model_id:path}" -> "{model_id}"


def _media_type(headers: Headers) -> str:
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _is_json(media_type: str) -> bool:
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


def _treat_body_as_json(scope: Scope) -> None:
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
    scope["headers"] = headers + [(b"content-type", b"application/json")]
