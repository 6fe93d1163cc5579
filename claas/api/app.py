"""The HTTP API: OpenAI-compatible chat, durable feedback, adapters, health and metrics.

Routes are thin: they validate with pydantic, call one runtime object, and leave the mapping of
domain errors to status codes to one handler (`_domain_error`). Every error body is
`{"error": {"message", "type", "code"}}` with a message that says what to do next.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from tinker import types

from claas.adapters import AdapterSpec
from claas.api.schemas import (
    AdapterCreate,
    ChatCompletionRequest,
    CompletionRequest,
    FeedbackRequestBody,
    RollbackBody,
    SamplingFields,
    ScoreRequest,
)
from claas.chat import Completion, ModelTarget, new_completion_id
from claas.errors import ClaasError, InvalidRequest
from claas.runtime import Runtime
from claas.store import FeedbackRequest, parse_lora_id, validate_lora_id

# ---------------------------------------------------------------------------------------------
# Auth
# ---------------------------------------------------------------------------------------------


class Unauthorized(ClaasError):
    status_code = 401


class Forbidden(ClaasError):
    status_code = 403


class PayloadTooLarge(ClaasError):
    status_code = 413


@dataclass(frozen=True)
class Principal:
    owner: str | None  # None: the admin (or no keys configured: a single local user)

    def check(self, lora_id: str) -> None:
        owner, _ = parse_lora_id(lora_id)
        if self.owner is not None and owner != self.owner:
            raise Forbidden(
                f"this API key belongs to {self.owner!r} and cannot reach {lora_id}; use "
                f"adapters named '{self.owner}/...'"
            )


def _principal(request: Request) -> Principal:
    runtime: Runtime = request.app.state.runtime
    keys, admin = runtime.settings.api_keys, runtime.settings.admin_key
    if not keys and not admin:
        return Principal(owner=None)
    header = request.headers.get("authorization", "")
    key = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
    if not key:
        raise Unauthorized("missing API key; send 'Authorization: Bearer <key>'")
    if admin and key == admin:
        return Principal(owner=None)
    if key not in keys:
        raise Unauthorized("unknown API key; check the key, or ask the operator for one")
    return Principal(owner=keys[key])


Caller = Annotated[Principal, Depends(_principal)]


# ---------------------------------------------------------------------------------------------
# Metrics and limits
# ---------------------------------------------------------------------------------------------


class Metrics:
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


class BodyLimit:
    """Refuse request bodies over `limit` bytes, declared or streamed, with a JSON 413."""

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
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise PayloadTooLarge(self._message())
            return message

        try:
            await self.app(scope, limited, send)
        except PayloadTooLarge as error:
            await _send_error(send, error)

    def _message(self) -> str:
        return f"request body over {self.limit} bytes; send less (CLAAS_MAX_BODY_BYTES)"


async def _send_error(send: Send, error: ClaasError) -> None:
    body = json.dumps(_error_body(error.status_code, str(error), type(error).__name__)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _error_body(code: int, message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": code}}


class ErrorResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error may quote input that is not valid UTF-8."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True).encode("ascii")


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


def create_app(runtime: Runtime) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.queue.start()
        app.state.ready = True
        try:
            yield
        finally:
            app.state.ready = False
            await runtime.queue.stop()

    app = FastAPI(
        title="claas",
        version="0.1.0",
        summary="Continual learning as a service: chat, give feedback, the adapter learns.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.ready = False
    metrics = Metrics(runtime)
    runtime.queue.on_trained = lambda request, seconds: metrics.train_seconds.observe(seconds)
    app.add_middleware(BodyLimit, limit=runtime.settings.max_body_bytes)

    @app.middleware("http")
    async def count(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Any:
        start = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        metrics.requests.labels(request.method, route, str(response.status_code)).inc()
        metrics.latency.labels(route).observe(time.perf_counter() - start)
        return response

    @app.exception_handler(ClaasError)
    async def _domain_error(request: Request, error: ClaasError) -> JSONResponse:
        return ErrorResponse(
            _error_body(error.status_code, str(error), type(error).__name__), error.status_code
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg')}"
            for e in error.errors()
        )
        message = f"invalid request: {problems}. Fix these fields and retry (see /docs)"
        return ErrorResponse(_error_body(422, message, "InvalidRequest"), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        hint = {404: "no such route; see /docs", 405: "method not allowed; see /docs"}
        message = hint.get(error.status_code, str(error.detail))
        return ErrorResponse(
            _error_body(error.status_code, message, "HTTPError"), error.status_code
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        message = (
            f"internal error ({type(error).__name__}); the server keeps running. Retry, and "
            "report it with the request if it persists"
        )
        return ErrorResponse(_error_body(500, message, "InternalError"), 500)

    _add_serving_routes(app, runtime)
    _add_feedback_routes(app, runtime)
    _add_adapter_routes(app, runtime)

    @app.get("/v1/health")
    async def health(request: Request) -> JSONResponse:
        database_ok = runtime.store.ping()
        body = {
            "status": "ok",
            "model": runtime.base_model,
            "model_loaded": runtime.tokenizer is not None,
            "ready": bool(request.app.state.ready),
            "database_ok": database_ok,
            "queue_depth": runtime.queue.depth() if database_ok else None,
        }
        ready = body["ready"] and database_ok and body["model_loaded"]
        if not ready:
            body["status"] = "unavailable"
        return JSONResponse(body, 200 if ready else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


# ---------------------------------------------------------------------------------------------
# Chat, completions, score
# ---------------------------------------------------------------------------------------------


def _sampling_params(
    runtime: Runtime, body: SamplingFields, prompt_len: int
) -> types.SamplingParams:
    settings = runtime.settings
    asked = body.max_completion_tokens or body.max_tokens
    if asked is not None and asked > settings.max_tokens_cap:
        raise InvalidRequest(
            f"max_tokens {asked} is over this server's cap of {settings.max_tokens_cap}; ask "
            "for fewer (CLAAS_MAX_TOKENS_CAP)"
        )
    if body.n > settings.max_samples:
        raise InvalidRequest(f"n={body.n} is over this server's cap of {settings.max_samples}")
    room = runtime.max_context - prompt_len
    max_tokens = asked if asked is not None else max(1, min(settings.max_tokens_cap, room))
    return types.SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop,
    )


def _target(runtime: Runtime, caller: Principal, model: str) -> ModelTarget:
    """Resolve `model` for this caller: another owner's name is refused before any lookup, and
    the names listed in a 404 are only the caller's own."""
    lora_id = model.partition("@")[0]
    with contextlib.suppress(InvalidRequest):  # not owner/name: resolve() explains
        caller.check(validate_lora_id(lora_id))
    return runtime.chat.resolve(model, owner=caller.owner)


def _usage(completion: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }


def _logprobs_view(runtime: Runtime, tokens: list[int], logprobs: list[float]) -> dict[str, Any]:
    pieces = runtime.tokenizer.convert_ids_to_tokens(tokens)
    return {
        "content": [
            {"token": piece, "logprob": lp, "bytes": None, "top_logprobs": []}
            for piece, lp in zip(pieces, logprobs, strict=True)
        ]
    }


def _add_serving_routes(app: FastAPI, runtime: Runtime) -> None:
    @app.get("/v1/models")
    async def models(caller: Caller) -> dict[str, Any]:
        names = [runtime.base_model] + [
            a.lora_id
            for a in runtime.store.list_adapters(f"{caller.owner}/" if caller.owner else "")
        ]
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "owned_by": "claas"} for n in names],
        }

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        body: ChatCompletionRequest, caller: Caller
    ) -> dict[str, Any] | StreamingResponse:
        if len(body.messages) > runtime.settings.max_messages:
            raise InvalidRequest(
                f"{len(body.messages)} messages is over the cap of "
                f"{runtime.settings.max_messages}; send fewer turns"
            )
        target = _target(runtime, caller, body.model)
        messages = [m.as_template_message() for m in body.messages]
        prompt = runtime.chat.chat_prompt(messages)
        params = _sampling_params(runtime, body, len(prompt))
        if body.stream:
            return _stream(runtime, target, prompt, messages, params, body, "chat.completion.chunk")
        completion = await runtime.chat.complete(target, prompt, messages, params, body.n)
        return {
            "id": completion.id,
            "object": "chat.completion",
            "created": completion.created,
            "model": completion.model,
            "choices": [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "finish_reason": c.finish_reason,
                    "logprobs": _logprobs_view(runtime, c.tokens, c.logprobs)
                    if body.logprobs
                    else None,
                }
                for c in completion.choices
            ],
            "usage": _usage(completion),
        }

    @app.post("/v1/completions", response_model=None)
    async def completions(
        body: CompletionRequest, caller: Caller
    ) -> dict[str, Any] | StreamingResponse:
        target = _target(runtime, caller, body.model)
        prompt = [int(t) for t in runtime.tokenizer.encode(body.prompt)]
        messages = [{"role": "user", "content": body.prompt}]
        params = _sampling_params(runtime, body, len(prompt))
        if body.stream:
            return _stream(runtime, target, prompt, messages, params, body, "text_completion")
        completion = await runtime.chat.complete(
            target, prompt, messages, params, body.n, prompt_text=body.prompt, prompt_format="text"
        )
        return {
            "id": completion.id,
            "object": "text_completion",
            "created": completion.created,
            "model": completion.model,
            "choices": [
                {"index": c.index, "text": c.text, "finish_reason": c.finish_reason}
                for c in completion.choices
            ],
            "usage": _usage(completion),
        }

    @app.post("/v1/score")
    async def score(body: ScoreRequest, caller: Caller) -> dict[str, Any]:
        target = _target(runtime, caller, body.model)
        messages = [m.as_template_message() for m in body.messages]
        prompt = runtime.chat.chat_prompt(messages)
        tokens = [int(t) for t in runtime.tokenizer.encode(body.completion)]
        logprobs = await runtime.chat.score(target, prompt, tokens)
        return {
            "model": target.name,
            "tokens": runtime.tokenizer.convert_ids_to_tokens(tokens),
            "token_ids": tokens,
            "logprobs": logprobs,
            "total_logprob": float(sum(logprobs)),
        }


def _stream(
    runtime: Runtime,
    target: ModelTarget,
    prompt: list[int],
    messages: list[dict[str, Any]],
    params: types.SamplingParams,
    body: SamplingFields,
    kind: str,
) -> StreamingResponse:
    """Server-sent events, token by token, ending with [DONE]."""
    queue: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()
    chunk_id = new_completion_id()
    created = int(time.time())

    def chunk(index: int, text: str | None, finish: str | None) -> str:
        if kind == "text_completion":
            choice: dict[str, Any] = {"index": index, "text": text or "", "finish_reason": finish}
        else:
            delta = {"role": "assistant", "content": text} if text is not None else {}
            choice = {"index": index, "delta": delta, "finish_reason": finish}
        payload = {
            "id": chunk_id,
            "object": kind,
            "created": created,
            "model": target.name,
            "choices": [choice],
        }
        return f"data: {json.dumps(payload)}\n\n"

    async def events() -> AsyncIterator[str]:
        task = asyncio.create_task(
            runtime.chat.complete(
                target,
                prompt,
                messages,
                params,
                body.n,
                on_text=lambda index, delta: queue.put_nowait((index, delta)),
                prompt_text=messages[-1]["content"] if kind == "text_completion" else None,
                completion_id=chunk_id,
                prompt_format="text" if kind == "text_completion" else "chat",
            )
        )
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (item := await queue.get()) is not None:
                yield chunk(item[0], item[1], None)
            completion = task.result()
            for choice in completion.choices:
                yield chunk(choice.index, None, choice.finish_reason)
            usage = {
                "id": chunk_id,
                "object": kind,
                "created": created,
                "model": target.name,
                "choices": [],
                "usage": _usage(completion),
            }
            yield f"data: {json.dumps(usage)}\n\n"
        except ClaasError as error:
            error_body = _error_body(error.status_code, str(error), type(error).__name__)
            yield f"data: {json.dumps(error_body)}\n\n"
        except Exception as error:
            error_body = _error_body(500, f"internal error ({type(error).__name__})", "Internal")
            yield f"data: {json.dumps(error_body)}\n\n"
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


# ---------------------------------------------------------------------------------------------
# Feedback
# ---------------------------------------------------------------------------------------------


def _add_feedback_routes(app: FastAPI, runtime: Runtime) -> None:
    @app.post("/v1/feedback", status_code=202)
    async def submit_feedback(
        body: FeedbackRequestBody,
        caller: Caller,
        wait: bool = Query(False, description="Block until trained; return the result."),
        timeout: float = Query(600.0, gt=0, le=3600, description="Longest wait, seconds."),
    ) -> JSONResponse:
        request = await runtime.queue.admit(body.items, allowed=caller.check)
        if not wait:
            return JSONResponse(
                {"feedback_id": request.id, "status": request.status, "lora_id": request.lora_id},
                202,
            )
        try:
            done = await runtime.queue.wait(request.id, timeout)
        except TimeoutError:
            current = runtime.store.get_feedback(request.id)
            return JSONResponse({"feedback_id": request.id, **_feedback_view(current)}, 202)
        return JSONResponse({"feedback_id": done.id, **_feedback_view(done)}, 200)

    @app.get("/v1/feedback/{feedback_id}")
    async def feedback_status(feedback_id: str, caller: Caller) -> dict[str, Any]:
        request = runtime.store.get_feedback(feedback_id)
        caller.check(request.lora_id)
        return {"feedback_id": request.id, **_feedback_view(request)}

    @app.get("/v1/feedback")
    async def feedback_log(
        caller: Caller,
        lora_id: str = Query(..., max_length=200),
        limit: int = Query(50, ge=1, le=500),
        offset: int = Query(0, ge=0),
    ) -> dict[str, Any]:
        caller.check(lora_id)
        runtime.store.get_adapter(lora_id)
        requests = runtime.store.list_feedback(lora_id, limit=limit, offset=offset)
        return {
            "lora_id": lora_id,
            "data": [{"feedback_id": r.id, **_feedback_view(r)} for r in requests],
            "limit": limit,
            "offset": offset,
        }


def _feedback_view(request: FeedbackRequest) -> dict[str, Any]:
    view = request.model_dump()
    view.pop("id", None)
    return view


# ---------------------------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------------------------


def _lora(owner: str, name: str) -> str:
    return f"{owner}/{name}"


def _add_adapter_routes(app: FastAPI, runtime: Runtime) -> None:
    adapters = runtime.adapters

    @app.post("/v1/adapters", status_code=201)
    async def create_adapter(body: AdapterCreate, caller: Caller) -> dict[str, Any]:
        caller.check(body.lora_id)
        spec = AdapterSpec.model_validate(body.model_dump(exclude={"lora_id"}))
        adapter = await adapters.init(body.lora_id, spec)
        return {**adapter.model_dump(), "versions": _versions(runtime, adapter.lora_id)}

    @app.get("/v1/adapters")
    async def list_adapters(
        caller: Caller, prefix: str = Query("", max_length=200)
    ) -> dict[str, Any]:
        if caller.owner is not None and not prefix.startswith(f"{caller.owner}/"):
            if not f"{caller.owner}/".startswith(prefix):
                return {"data": []}
            prefix = f"{caller.owner}/"
        return {"data": [a.model_dump() for a in adapters.list_adapters(prefix)]}

    @app.get("/v1/adapters/{owner}/{name}")
    async def get_adapter(owner: str, name: str, caller: Caller) -> dict[str, Any]:
        lora_id = _lora(owner, name)
        caller.check(lora_id)
        adapter = adapters.get(lora_id)
        return {**adapter.model_dump(), "versions": _versions(runtime, lora_id)}

    @app.post("/v1/adapters/{owner}/{name}/rollback")
    async def rollback(owner: str, name: str, body: RollbackBody, caller: Caller) -> dict[str, Any]:
        lora_id = _lora(owner, name)
        caller.check(lora_id)
        adapter = adapters.rollback(lora_id, body.version)
        return {**adapter.model_dump(), "versions": _versions(runtime, lora_id)}

    @app.delete("/v1/adapters/{owner}/{name}")
    async def delete(owner: str, name: str, caller: Caller) -> dict[str, Any]:
        lora_id = _lora(owner, name)
        caller.check(lora_id)
        removed = await adapters.delete(lora_id)
        await runtime.queue.notify()  # its queued requests are gone: release any waiters
        return {"lora_id": lora_id, "deleted": True, "versions_removed": len(removed)}

    @app.get("/v1/adapters/{owner}/{name}/export")
    async def export(
        owner: str, name: str, caller: Caller, version: int | None = Query(None, ge=1, le=2**31)
    ) -> Response:
        lora_id = _lora(owner, name)
        caller.check(lora_id)
        archive = await asyncio.to_thread(adapters.export, lora_id, version)
        filename = f"{owner}-{name}.zip"
        return Response(
            archive,
            media_type="application/zip",
            headers={"content-disposition": f'attachment; filename="{filename}"'},
        )


def _versions(runtime: Runtime, lora_id: str) -> list[dict[str, Any]]:
    return [v.model_dump() for v in runtime.adapters.versions(lora_id)]
