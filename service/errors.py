"""One error model, rendered in the shape of the route family that raised it.

    /v1/*           {"error": {"message", "type", "param", "code"}}          (OpenAI)
    everything else {"error": "...", "error_type": "validation" | ...}      (TGI / TEI)

What the engines raise (engine/errors.py) is mapped to an answer in one table,
`from_engine_error`, used by the app's handlers and by streams that fail after they started.
No traceback ever reaches a client: unexpected exceptions are logged here and answered with
a generic 500.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import (EngineStoppedError, InvalidGrammar, InvalidParameter, PromptTooLongError, QueueFullError,
                           RequestFailedError)

logger = logging.getLogger("service")

# status -> (native error_type, OpenAI type)
_KINDS = {
    400: ("validation", "invalid_request_error"),
    401: ("unauthorized", "authentication_error"),
    404: ("not_found", "not_found_error"),
    405: ("validation", "invalid_request_error"),
    408: ("validation", "invalid_request_error"),
    413: ("validation", "invalid_request_error"),
    415: ("validation", "invalid_request_error"),
    422: ("validation", "invalid_request_error"),
    429: ("overloaded", "rate_limit_error"),
    500: ("generation", "server_error"),
    503: ("not_ready", "service_unavailable_error"),
}


class APIError(Exception):
    """An answer that is not a success; raised anywhere in a request, rendered per family."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, error_type: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code, self.headers = code, headers
        self.error_type = error_type or _KINDS.get(status, ("generation", "server_error"))[0]

    @property
    def openai_type(self) -> str:
        return _KINDS.get(self.status, ("generation", "server_error"))[1]


class ClientGone(Exception):
    """The client disconnected while its request ran; it has been aborted (answered 499,
    nginx's code for it: nobody reads the answer, but logs and metrics count it)."""


def validation_error(message: str, param: str | None = None) -> APIError:
    return APIError(422, message, param=param, code="invalid_value")


_RETRY = {"Retry-After": "1"}
# engine exception -> its answer; the first matching row wins (subclasses first).
_ENGINE_ERRORS = (
    (PromptTooLongError, lambda e: APIError(400, str(e), param=e.param, code="context_length_exceeded")),
    (InvalidGrammar, lambda e: APIError(400, _naming(e), param=e.param, code="invalid_grammar")),
    (InvalidParameter, lambda e: APIError(422, _naming(e), param=e.param,
                                          code="invalid_prompt" if e.param == "prompt" else "invalid_value")),
    (QueueFullError, lambda e: APIError(429, str(e), headers=_RETRY, code="queue_full")),
    (EngineStoppedError, lambda e: APIError(503, str(e), headers=_RETRY)),
    (RequestFailedError, lambda e: APIError(500, f"generation failed: {e}", error_type="generation")),
)
ENGINE_ERRORS = tuple(kind for kind, _ in _ENGINE_ERRORS)


def _naming(exc: InvalidParameter) -> str:
    """The message, starting with the field it is about (as validation errors do)."""
    message = str(exc)
    return message if message.startswith(exc.param) else f"{exc.param}: {message}"


def from_engine_error(exc: Exception) -> APIError | None:
    """The answer an engine exception means; None for anything else (a bug: 500)."""
    for kind, answer in _ENGINE_ERRORS:
        if isinstance(exc, kind):
            return answer(exc)
    return None


def as_api_error(exc: Exception, what: str) -> APIError:
    """Any exception as an answer; what is not an APIError nor an engine error is logged (500)."""
    if isinstance(exc, APIError):
        return exc
    answer = from_engine_error(exc)
    if answer is None:
        logger.error("%s failed", what, exc_info=exc)
        answer = APIError(500, "internal server error (logged)")
    return answer


def is_openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def error_body(path: str, error: APIError) -> dict[str, Any]:
    if is_openai_path(path):
        return {"error": {"message": error.message, "type": error.openai_type,
                          "param": error.param, "code": error.code}}
    return {"error": error.message, "error_type": error.error_type}


def error_response(path: str, error: APIError) -> JSONResponse:
    return JSONResponse(error_body(path, error), status_code=error.status, headers=error.headers)


def error_event(path: str, error: APIError) -> bytes:
    """The last event of a stream that failed after it started."""
    return b"data: " + json.dumps(error_body(path, error)).encode() + b"\n\n"


# A field another client library spells differently -> (OpenAI routes' name, TGI / TEI routes' name).
_SPELLINGS = {
    "stop_sequences": ("stop", "stop"),
    "max_new_tokens": ("max_tokens", "max_new_tokens"),
    "max_tokens": ("max_tokens", "max_new_tokens"),
    "num_return_sequences": ("n", None),
    "return_full_text": ("echo", "return_full_text"),
}


def describe_validation(errors: list[dict[str, Any]], openai: bool = False) -> tuple[str, str | None]:
    """pydantic errors -> ("field: what is wrong; ...", first field). The branches of a union
    that one value failed are one error: the first."""
    parts, fields, first = [], [], None
    for err in errors:
        location = [str(p) for p in err.get("loc", ()) if p != "body"]
        # pydantic names the union member it tried ("str", "list[int]"): not the client's field
        location = [p for p in location if not _is_type_tag(p)]
        field = ".".join(location) or "body"
        if field in fields:
            continue
        message = err.get("msg", "invalid").removeprefix("Value error, ")
        if err.get("type") == "json_invalid":
            message = "the body is not valid JSON (or not UTF-8)"
            field = "body"
        elif err.get("type") == "extra_forbidden":
            message = "unknown field (not supported by this server)" + _spelling_hint(location, openai)
        fields.append(field)
        first = first or field
        parts.append(f"{field}: {message}")
    if len(parts) > 5:
        parts = [*parts[:5], f"and {len(parts) - 5} more"]
    return "; ".join(parts), first


def _spelling_hint(location: list[str], openai: bool) -> str:
    name = location[-1] if location else ""
    right = _SPELLINGS.get(name, (None, None))[0 if openai else 1]
    if right is None or right == name and (openai or location[:1] == ["parameters"]):
        return ""
    if not openai and location[:1] != ["parameters"]:
        right = f"parameters.{right}"              # TGI's options sit under "parameters"
    return f"; use {right!r}"


def _is_type_tag(part: str) -> bool:
    return part in ("str", "int", "list[int]", "list[str]", "list[list[int]]", "function-after[...]") \
        or part.startswith(("function-", "list[", "tagged-union[", "constrained-"))


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(request.url.path, exc)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone):
        return Response(status_code=499)

    for kind in ENGINE_ERRORS:
        @app.exception_handler(kind)
        async def _engine_error(request: Request, exc: Exception):
            return error_response(request.url.path, from_engine_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, field = describe_validation(list(exc.errors()), openai=is_openai_path(request.url.path))
        return error_response(request.url.path, APIError(422, message, param=field, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400 and exc.__cause__ is not None:
            # FastAPI answers 400 for a body it could not parse (not UTF-8, nested too deeply
            # for the JSON parser, a number of more than 4300 digits); to us, a malformed body
            return error_response(request.url.path, APIError(
                422, "body: the body is not valid JSON (or not UTF-8, or nested too deeply, or has a number "
                "too long to read)", param="body", code="invalid_json"))
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on "
                   f"{request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error_response(request.url.path, APIError(exc.status_code, message, headers=exc.headers))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(request.url.path, APIError(500, "internal server error (logged)"))


# OpenAPI: the error bodies each family answers with.
def openapi_errors(*statuses: int, openai: bool = False) -> dict[int | str, dict[str, Any]]:
    from service.schemas import NativeError, OpenAIErrorResponse
    descriptions = {400: "prompt longer than the model allows, or a schema / regex / grammar that does not "
                    "compile", 401: "missing or wrong API key",
                    404: "unknown model", 408: "the body did not arrive in time (--read-timeout)",
                    413: "body too large", 415: "the body is not sent as JSON", 422: "invalid field",
                    429: "queue full (see Retry-After)", 500: "generation failed",
                    503: "loading or draining"}
    if 422 in statuses:                       # a route with a body: it may come late, or not as JSON
        statuses = tuple(sorted({*statuses, 408, 415}))
    model = OpenAIErrorResponse if openai else NativeError
    return {s: {"model": model, "description": descriptions[s]} for s in statuses}
