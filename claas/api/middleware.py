"""What wraps every request: the body-size limit and the Prometheus request metrics.

`add_middleware` installs both; the metrics middleware is the outer one, so a body refused by
the limit is still counted (under the route `unmatched`).
"""

from __future__ import annotations

import json
import time

from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from claas.api.errors import domain_error_body
from claas.errors import ClaasError
from claas.runtime import Runtime


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
    """The body limit, inside the request metrics (added last, so outermost)."""
    app.add_middleware(BodyLimit, limit=runtime.settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)
