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
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Query, Request
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
from claas.api.auth import Principal, bearer_principal
from claas.api.dashboard import dashboard_router
from claas.api.schemas import (
    MAX_OFFSET,
    AdapterCreate,
    ChatCompletionRequest,
    CompletionRequest,
    FeedbackRequestBody,
    RollbackBody,
    SamplingFields,
    ScoreRequest,
    error_responses,
)
from claas.chat import Completion, ModelTarget, new_completion_id
from claas.errors import ClaasError, InvalidRequest
from claas.runtime import Runtime
from claas.store import (
    LORA_ID_PART,
    LORA_ID_PATTERN,
    FeedbackRequest,
    feedback_missing,
    validate_lora_id,
)

# ---------------------------------------------------------------------------------------------
# Auth
# ---------------------------------------------------------------------------------------------


class PayloadTooLarge(ClaasError):
    status_code = 413


def _principal(request: Request) -> Principal:
    runtime: Runtime = request.app.state.runtime
    return bearer_principal(runtime.settings, request.headers.get("authorization", ""))


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
            _error_body(error.status_code, str(error), type(error).__name__),
            error.status_code,
            headers=error.headers or None,
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
            _error_body(error.status_code, message, "HTTPError"),
            error.status_code,
            headers=error.headers,  # Allow on a 405
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
    app.include_router(dashboard_router(runtime))

    @app.get("/v1/health", responses=error_responses(503))
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

_SERVING_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The completion; with stream=true, server-sent events.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    **error_responses(400, 401, 403, 404, 409, 413, 422),
}
_ADAPTER_RESPONSES = error_responses(401, 403, 404, 422)


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
    # Tokenising a long prompt takes a while (about 0.6 s for 800 KB): do it off the event loop,
    # on one thread, so health checks and streams keep flowing and the tokenizer is never used
    # by two requests at once.
    tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="claas-tokenize")

    async def tokenize(text: str) -> list[int]:
        def encode() -> list[int]:
            return [int(t) for t in runtime.tokenizer.encode(text)]

        return await asyncio.get_running_loop().run_in_executor(tokenizing, encode)

    async def chat_prompt(messages: list[dict[str, Any]]) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(
            tokenizing, runtime.chat.chat_prompt, messages
        )

    @app.get("/v1/models", responses=error_responses(401))
    async def models(caller: Caller) -> dict[str, Any]:
        names = [runtime.base_model] + [
            a.lora_id
            for a in runtime.store.list_adapters(f"{caller.owner}/" if caller.owner else "")
        ]
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "owned_by": "claas"} for n in names],
        }

    @app.post("/v1/chat/completions", response_model=None, responses=_SERVING_RESPONSES)
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
        prompt = await chat_prompt(messages)
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

    @app.post("/v1/completions", response_model=None, responses=_SERVING_RESPONSES)
    async def completions(
        body: CompletionRequest, caller: Caller
    ) -> dict[str, Any] | StreamingResponse:
        target = _target(runtime, caller, body.model)
        prompt = await tokenize(body.prompt)
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

    @app.post("/v1/score", responses=error_responses(400, 401, 403, 404, 409, 413, 422))
    async def score(body: ScoreRequest, caller: Caller) -> dict[str, Any]:
        target = _target(runtime, caller, body.model)
        messages = [m.as_template_message() for m in body.messages]
        prompt = await chat_prompt(messages)
        tokens = await tokenize(body.completion)
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
    @app.post(
        "/v1/feedback",
        status_code=202,
        responses={
            200: {"description": "Trained (with wait=true): the finished request."},
            **error_responses(400, 401, 403, 404, 409, 413, 422, 429),
        },
    )
    async def submit_feedback(
        body: FeedbackRequestBody,
        caller: Caller,
        wait: bool = Query(False, description="Block until trained; return the result."),
        timeout: float = Query(600.0, gt=0, le=3600, description="Longest wait, seconds."),
    ) -> JSONResponse:
        request = await runtime.queue.admit(body.items, owner=caller.owner)
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

    @app.get("/v1/feedback/{feedback_id}", responses=error_responses(401, 404, 422))
    async def feedback_status(feedback_id: str, caller: Caller) -> dict[str, Any]:
        request = runtime.store.get_feedback(feedback_id)
        if not caller.sees(request.lora_id):
            raise feedback_missing(feedback_id)  # exactly as if it did not exist
        return {"feedback_id": request.id, **_feedback_view(request)}

    @app.get("/v1/feedback", responses=error_responses(401, 403, 404, 422))
    async def feedback_log(
        caller: Caller,
        lora_id: str = Query(..., max_length=200, json_schema_extra={"pattern": LORA_ID_PATTERN}),
        limit: int = Query(50, ge=1, le=500),
        offset: int = Query(0, ge=0, le=MAX_OFFSET),
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


_PART = f"^{LORA_ID_PART.pattern}$"
OwnerPart = Annotated[
    str, Path(description="owner of owner/name", json_schema_extra={"pattern": _PART})
]
NamePart = Annotated[
    str, Path(description="name of owner/name", json_schema_extra={"pattern": _PART})
]


def _lora(owner: str, name: str) -> str:
    return f"{owner}/{name}"


def _add_adapter_routes(app: FastAPI, runtime: Runtime) -> None:
    adapters = runtime.adapters

    @app.post(
        "/v1/adapters", status_code=201, responses=error_responses(400, 401, 403, 409, 413, 422)
    )
    async def create_adapter(body: AdapterCreate, caller: Caller) -> dict[str, Any]:
        caller.check(body.lora_id)
        spec = AdapterSpec.model_validate(body.model_dump(exclude={"lora_id"}))
        adapter = await adapters.init(body.lora_id, spec)
        return {**adapter.model_dump(), "versions": _versions(runtime, adapter.lora_id)}

    @app.get("/v1/adapters", responses=error_responses(401, 422))
    async def list_adapters(
        caller: Caller, prefix: str = Query("", max_length=200)
    ) -> dict[str, Any]:
        if caller.owner is not None and not prefix.startswith(f"{caller.owner}/"):
            if not f"{caller.owner}/".startswith(prefix):
                return {"data": []}
            prefix = f"{caller.owner}/"
        return {"data": [a.model_dump() for a in adapters.list_adapters(prefix)]}

    @app.get("/v1/adapters/{owner}/{name}", responses=_ADAPTER_RESPONSES)
    async def get_adapter(owner: OwnerPart, name: NamePart, caller: Caller) -> dict[str, Any]:
        lora_id = _lora(owner, name)
        caller.check(lora_id)
        adapter = adapters.get(lora_id)
        return {**adapter.model_dump(), "versions": _versions(runtime, lora_id)}

    @app.post(
        "/v1/adapters/{owner}/{name}/rollback",
        responses=error_responses(400, 401, 403, 404, 413, 422),
    )
    async def rollback(
        owner: OwnerPart, name: NamePart, body: RollbackBody, caller: Caller
    ) -> dict[str, Any]:
        lora_id = _lora(owner, name)
        caller.check(lora_id)
        adapter = adapters.rollback(lora_id, body.version)
        return {**adapter.model_dump(), "versions": _versions(runtime, lora_id)}

    @app.delete("/v1/adapters/{owner}/{name}", responses=_ADAPTER_RESPONSES)
    async def delete(owner: OwnerPart, name: NamePart, caller: Caller) -> dict[str, Any]:
        lora_id = _lora(owner, name)
        caller.check(lora_id)
        removed = await adapters.delete(lora_id)
        await runtime.queue.notify()  # its queued requests are gone: release any waiters
        return {"lora_id": lora_id, "deleted": True, "versions_removed": len(removed)}

    @app.get(
        "/v1/adapters/{owner}/{name}/export",
        response_class=Response,
        responses={
            200: {
                "description": "A zip of the version's PEFT directory.",
                "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
            },
            **_ADAPTER_RESPONSES,
        },
    )
    async def export(
        owner: OwnerPart,
        name: NamePart,
        caller: Caller,
        version: int | None = Query(None, ge=1, le=2**31),
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
