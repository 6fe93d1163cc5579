"""What wraps every request: the body-size limit, the request log, the Prometheus metrics.

`add_middleware` installs all three, outermost first: the metrics, then the request log, then
the body limit. A body refused by the limit is still logged and counted (under the route
`unmatched`); an unexpected exception is logged with its traceback and answered with the app's
500 by the request log, so the metrics count it too.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.datastructures import Headers
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from claas.api.auth import DASHBOARD_COOKIE, bearer_key, keys_configured, principal_for_key
from claas.api.errors import domain_error_body
from claas.errors import ClaasError
from claas.logs import current_request_id
from claas.runtime import Runtime
from claas.settings import Settings

http_logger = logging.getLogger("claas.http")

# A client's X-Request-ID is kept if it looks like an id; otherwise one is made up.
REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+=-]{0,127}")
# Polled by load balancers and Prometheus: their successful requests are logged at debug.
QUIET_ROUTES = frozenset({"/v1/health", "/metrics"})


class PayloadTooLarge(ClaasError):
    status_code = 413


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (served at /metrics)."""

    def __init__(self, runtime: Runtime) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "claas_http_requests_total",
            "HTTP requests",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "claas_http_request_seconds", "HTTP latency", ["route"], registry=self.registry
        )
        self.train_seconds = Histogram(
            "claas_feedback_train_seconds",
            "Time to train one feedback batch",
            buckets=(0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320),
            registry=self.registry,
        )
        depth = Gauge("claas_feedback_queue_depth", "Queued feedback", registry=self.registry)
        depth.set_function(runtime.queue.depth)


class RequestMetrics(BaseHTTPMiddleware):
    """Count each request and time it, labelled by its route's path template."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        super().__init__(app)
        self.metrics = metrics

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        start = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        self.metrics.requests.labels(request.method, route, str(response.status_code)).inc()
        self.metrics.latency.labels(route).observe(time.perf_counter() - start)
        return response


class RequestLog:
    """One `claas.http` log line per request, when its response is sent.

    The line has the method, the path (no query string) and its route template, the status,
    `duration_ms` until the last byte, the response `bytes`, the caller (`owner`, and `auth`:
    owner, admin, unknown_key, no_key or open when no keys are configured; never the key
    itself), the client address and the request id: the client's `X-Request-ID` if it looks
    like one, else a new one. The id is sent back as `X-Request-ID`, and every record logged
    while the request is handled carries it. Levels: info; warning for a 5xx answer; error for
    an unhandled exception; debug for a successful health check or metrics scrape.

    An exception the routes did not handle is logged here, at error level with its traceback,
    and answered with the app's own 500 handler; so neither Starlette nor uvicorn log it again.
    If the response had already started, the exception goes on to uvicorn, which cuts the
    connection (and logs it too).
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        given = Headers(scope=scope).get("x-request-id", "")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        status: int | None = None
        sent = 0

        async def send_logged(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        token = current_request_id.set(request_id)
        try:
            await self.app(scope, receive, send_logged)
        except Exception as error:
            started = status is not None
            if not started:
                handler = _server_error_handler(scope["app"])
                if handler is None:
                    raise
                response = handler(Request(scope, receive), error)
                if inspect.isawaitable(response):
                    response = await response
                await response(scope, receive, send_logged)
            self._log(scope, request_id, status, start, sent, error)
            if started:
                raise
        else:
            self._log(scope, request_id, status, start, sent)
        finally:
            current_request_id.reset(token)

    def _log(
        self,
        scope: Scope,
        request_id: str,
        status: int | None,
        start: float,
        sent: int,
        error: Exception | None = None,
    ) -> None:
        route = getattr(scope.get("route"), "path", None)
        client = scope.get("client")
        fields: dict[str, Any] = {
            "method": scope["method"],
            "path": scope["path"],
            "route": route,
            "status": status,
            "duration_ms": round((time.perf_counter() - start) * 1000, 2),
            "bytes": sent,
            **self._caller(scope),
            "client": client[0] if client else None,
            "request_id": request_id,
        }
        if error is not None:  # unhandled: the line carries its traceback
            level = logging.ERROR
        elif status is None or status >= 500:
            level = logging.WARNING
        else:
            level = logging.DEBUG if route in QUIET_ROUTES and status < 400 else logging.INFO
        http_logger.log(
            level,
            "%s %s %s",
            scope["method"],
            scope["path"],
            status,
            extra=fields,
            exc_info=error,
        )

    def _caller(self, scope: Scope) -> dict[str, str | None]:
        """Who called, as the routes will see it: a Bearer key, else on the dashboard's pages
        its sign-in cookie."""
        if not keys_configured(self.settings):
            return {"owner": None, "auth": "open"}
        request = Request(scope)
        key = bearer_key(request.headers.get("authorization", "")) or ""
        if not key and scope["path"].startswith("/dashboard"):
            key = request.cookies.get(DASHBOARD_COOKIE, "")
        if not key:
            return {"owner": None, "auth": "no_key"}
        principal = principal_for_key(self.settings, key)
        if principal is None:
            return {"owner": None, "auth": "unknown_key"}
        if principal.owner is None:
            return {"owner": None, "auth": "admin"}
        return {"owner": principal.owner, "auth": "owner"}


def _server_error_handler(app: Any) -> Callable[[Request, Exception], Any] | None:
    """The app's handler of unexpected exceptions, chosen as Starlette chooses it."""
    found = None
    for key, handler in app.exception_handlers.items():
        if key in (500, Exception):
            found = handler
    return found


class BodyLimit:
    """Refuse request bodies over `limit` bytes, declared or streamed, with a JSON 413.

    The body is read (at most `limit` bytes of it) before the app sees the request, so a chunked
    upload without a Content-Length is refused the same way as a declared one, instead of
    failing mid-parse.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _send_error(send, PayloadTooLarge(self._message()))
            return
        buffered: list[Message] = []
        received = 0
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break  # the client went away; let the app see it
            received += len(message.get("body", b""))
            if received > self.limit:
                await _send_error(send, PayloadTooLarge(self._message()))
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)

    def _message(self) -> str:
        return f"request body over {self.limit} bytes; send less (CLAAS_MAX_BODY_BYTES)"


async def _send_error(send: Send, error: ClaasError) -> None:
    body = json.dumps(domain_error_body(error)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def add_middleware(app: FastAPI, runtime: Runtime, metrics: Metrics) -> None:
    """The body limit, inside the request log, inside the metrics (added last, so outermost)."""
    app.add_middleware(BodyLimit, limit=runtime.settings.max_body_bytes)
    app.add_middleware(RequestLog, settings=runtime.settings)
    app.add_middleware(RequestMetrics, metrics=metrics)
