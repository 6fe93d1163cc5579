"""Every error answer of the API: one body model, the exception handlers that send it.

The body is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}` (`ErrorEnvelope`),
with a message that says what to do next and `param` naming the field at fault, if one is.
Domain errors (`ClaasError`) carry their own status; request validation, unknown routes and
unexpected exceptions are mapped here, in one place.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from claas.errors import ClaasError


class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong, and what to do next.")
    type: str = Field(description="The error's class, e.g. AdapterNotFound.")
    param: str | None = Field(
        None, description="The request field at fault (dotted path), when one is."
    )
    code: int = Field(description="The HTTP status.")


class ErrorEnvelope(BaseModel):
    """Every error answer of the API (OpenAI's shape): `{"error": {...}}`."""

    error: ErrorDetail


_STATUS_MEANING = {
    400: "The body could not be read, or asks for what this server does not do (`param`).",
    401: "No API key, or an unknown one.",
    403: "The API key does not reach this adapter, or the owner is at a quota.",
    404: "No such adapter, version, rollout or feedback request (for this key).",
    409: "Conflicts with the current state (exists already, base-model rollout, …).",
    413: "The request body is over the server's limit.",
    422: "A field is invalid; the message names it.",
    429: "The owner is at a limit of work in flight (feedback queued, generations running); "
    "retry after `Retry-After` seconds.",
    503: "The server is not ready, or is shutting down (nothing was queued); retry after "
    "`Retry-After` seconds.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses, each with the real error body."""
    return {code: {"model": ErrorEnvelope, "description": _STATUS_MEANING[code]} for code in codes}


def error_body(code: int, message: str, kind: str, param: str | None = None) -> dict[str, Any]:
    """The JSON of an error answer, as `ErrorEnvelope` documents it."""
    detail = ErrorDetail(message=message, type=kind, param=param, code=code)
    return ErrorEnvelope(error=detail).model_dump()


def domain_error_body(error: ClaasError) -> dict[str, Any]:
    return error_body(error.status_code, str(error), type(error).__name__, error.param)


def internal_error_body(error: Exception) -> dict[str, Any]:
    """The 500 of an exception nothing expected: the app's answer, or a stream's last event."""
    message = (
        f"internal error ({type(error).__name__}); the server keeps running. Retry, and "
        "report it with the request if it persists"
    )
    return error_body(500, message, "InternalError")


class ErrorResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error may quote input that is not valid UTF-8."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True).encode("ascii")


async def _domain_error(request: Request, error: ClaasError) -> JSONResponse:
    return ErrorResponse(domain_error_body(error), error.status_code, headers=error.headers or None)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    fields = [".".join(str(p) for p in e.get("loc", ()) if p != "body") for e in error.errors()]
    problems = "; ".join(
        f"{field}: {e.get('msg')}" for field, e in zip(fields, error.errors(), strict=True)
    )
    message = f"invalid request: {problems}. Fix these fields and retry (see /docs)"
    return ErrorResponse(
        error_body(422, message, "InvalidRequest", next(filter(None, fields), None)), 422
    )


async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    hint = {404: "no such route; see /docs", 405: "method not allowed; see /docs"}
    message = hint.get(error.status_code, str(error.detail))
    headers = dict(error.headers or {})
    if error.status_code == 405:
        allowed = _allowed_methods(request)
        headers["Allow"] = ", ".join(allowed)
        message = f"method not allowed; this path takes {', '.join(allowed)} (see /docs)"
    return ErrorResponse(
        error_body(error.status_code, message, "HTTPError"), error.status_code, headers=headers
    )


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route takes at this path. Starlette's own `Allow` names only the first
    route whose path matched, where GET and POST on one path are two routes."""
    methods: set[str] = set()
    for route in _leaf_routes(request.app.router.routes):
        match, _ = route.matches(request.scope)  # PARTIAL: the path matched, not the method
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def _leaf_routes(routes: Iterable[Any]) -> Iterator[Any]:
    """The routes of the app, those of included routers too (FastAPI wraps each included router
    in one route; its routes carry their full paths, as claas includes routers without a prefix)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _leaf_routes(included.routes)
        else:
            yield route


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    return ErrorResponse(internal_error_body(error), 500)


def add_exception_handlers(app: FastAPI) -> None:
    """Map every error a request can end in to an `ErrorEnvelope` answer."""
    app.exception_handler(ClaasError)(_domain_error)
    app.exception_handler(RequestValidationError)(_validation_error)
    app.exception_handler(StarletteHTTPException)(_http_error)
    app.exception_handler(Exception)(_unexpected)
