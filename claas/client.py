"""A typed Python client for what an OpenAI client does not cover: adapters, feedback, health.

Chat goes through any OpenAI client (`Client.openai()` returns one set up for this server);
this client manages the adapters that chat is served by and sends the feedback that trains them.
The whole loop, against `$CLAAS_URL` (default http://127.0.0.1:8000) with `$CLAAS_API_KEY`:

    from claas.client import Client, FeedbackItem

    claas = Client()
    claas.adapters.create("alice/assistant")
    chat, ask = claas.openai(), [{"role": "user", "content": "Explain how a rainbow forms."}]
    first = chat.chat.completions.create(model="alice/assistant", messages=ask, max_tokens=64)
    done = claas.feedback.send_and_wait(
        FeedbackItem(completion_id=first.id, feedback="Way too long. One short sentence.")
    )
    print(f"{done.lora_id} is now at version {done.version}")
    again = chat.chat.completions.create(model="alice/assistant", messages=ask, max_tokens=64)
    print(again.choices[0].message.content)  # served by the new version

`AsyncClient` has the same methods, to be awaited. An error answer of the server raises a
`ClaasAPIError` subclass chosen by its status, carrying the server's message (which says what to
do next); a wait that runs out raises `FeedbackTimeout`; a server that cannot be reached raises
httpx's `TransportError`.

The client imports neither torch nor the server, only the foundation modules `claas.errors`,
`claas.ids` and `claas.records` (plain pydantic), so a program that only talks to a server
loads it in a fraction of a second.
"""

from __future__ import annotations

import asyncio
import builtins
import io
import os
import re
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Literal, Self, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from claas.errors import InvalidLoraId
from claas.ids import MEMORY_ID_PATTERN, parse_lora_id
from claas.records import Adapter, AdapterVersion, FeedbackStatus

if TYPE_CHECKING:
    from openai import AsyncOpenAI, OpenAI

__all__ = [
    "Adapter",
    "AdapterDeleted",
    "AdapterDetail",
    "AdapterVersion",
    "AsyncClient",
    "AuthenticationError",
    "ClaasAPIError",
    "Client",
    "ConflictError",
    "FeedbackAccepted",
    "FeedbackItem",
    "FeedbackTimeout",
    "FeedbackView",
    "Health",
    "MemoryForgotten",
    "MemoryItem",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServiceUnavailableError",
    "UnprocessableEntityError",
]

DEFAULT_URL = "http://127.0.0.1:8000"
# What an OpenAI client sends when there is no key: it insists on one, and a server without
# keys ignores the header.
_NO_KEY = "no-key"
_TERMINAL: tuple[FeedbackStatus, ...] = ("done", "failed")

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class ClaasAPIError(Exception):
    """An error answer of the server: `{"error": {"message", "type", "code"}}` as an exception.

    `status` is the HTTP status, `type` the server's error class (e.g. `AdapterNotFound`),
    `message` the server's own words, and `param` the field at fault when the server names one.
    """

    def __init__(self, status: int, type: str, message: str, param: str | None = None) -> None:
        super().__init__(f"{status} {type}: {message}")
        self.status = status
        self.type = type
        self.message = message
        self.param = param


class BadRequestError(ClaasAPIError):
    """400: the body could not be read, or asks for what the server does not do (`param`)."""


class RequestTooLargeError(ClaasAPIError):
    """413: the body is over the server's limit."""


class BadGatewayError(ClaasAPIError):
    """502: the server's inference backend (vLLM) answered with an error."""


class AuthenticationError(ClaasAPIError):
    """401: no API key, or one the server does not know."""


class PermissionDeniedError(ClaasAPIError):
    """403: the key does not reach this adapter's owner, or the owner is at a quota."""


class NotFoundError(ClaasAPIError):
    """404: no such adapter, version, completion or feedback request (for this key)."""


class ConflictError(ClaasAPIError):
    """409: the request conflicts with the current state (the adapter exists already, …)."""


class UnprocessableEntityError(ClaasAPIError):
    """422: a field is invalid; the message names it."""


class RateLimitError(ClaasAPIError):
    """429: the owner has too much feedback pending; retry after `retry_after` seconds."""

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(status, type, message, param)
        self.retry_after = retry_after


class ServiceUnavailableError(ClaasAPIError):
    """503: the server is not ready, or its inference backend cannot be reached."""


_ERROR_CLASSES: dict[int, type[ClaasAPIError]] = {
    400: BadRequestError,
    413: RequestTooLargeError,
    502: BadGatewayError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: UnprocessableEntityError,
    503: ServiceUnavailableError,
}


class FeedbackTimeout(TimeoutError):
    """A wait for a feedback request ran out before it was trained; `feedback` is its status then.

    The request stays queued and is still trained: wait again, or read its status later.
    """

    def __init__(self, feedback: FeedbackView, waited: float) -> None:
        super().__init__(
            f"feedback request {feedback.feedback_id} is still {feedback.status} after "
            f"{waited:g} s; it will still be trained: wait again with a longer timeout, or read "
            "its status later"
        )
        self.feedback = feedback


def _api_error(response: httpx.Response) -> ClaasAPIError:
    """The typed error for an error answer, with the server's message when the body has one."""
    try:
        detail = response.json()["error"]
        message, kind, param = str(detail["message"]), str(detail["type"]), detail.get("param")
    except (ValueError, KeyError, TypeError):  # not claas's error body: a proxy, a crash page
        message = response.text.strip() or response.reason_phrase
        kind, param = "HTTPError", None
    param = None if param is None else str(param)
    status = response.status_code
    if status == 429:
        return RateLimitError(
            status, kind, message, param, _seconds(response.headers.get("retry-after"))
        )
    return _ERROR_CLASSES.get(status, ClaasAPIError)(status, kind, message, param)


def _seconds(header: str | None) -> float | None:
    """`Retry-After` in seconds; None when absent or given as an HTTP date."""
    try:
        return float(header) if header is not None else None
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------
# What the server answers (the server's own schemas import torch; these mirror them)
# ---------------------------------------------------------------------------------------------


class _Answer(BaseModel):
    # Fields a newer server adds are ignored, so an older client keeps working.
    model_config = ConfigDict(frozen=True, extra="ignore")


class AdapterDetail(Adapter):
    """An adapter and all its versions, oldest first."""

    versions: list[AdapterVersion]


class AdapterDeleted(_Answer):
    lora_id: str
    deleted: bool
    versions_removed: int


class MemoryItem(_Answer):
    """One lesson an adapter remembers (the server's `MemoryView`): replayed by later feedback."""

    id: str
    lora_id: str
    feedback_id: str
    messages: list[dict[str, Any]]
    prompt_format: Literal["chat", "text"]
    feedback: str
    example: str | None
    created_at: float


class MemoryForgotten(_Answer):
    lora_id: str
    forgotten: int


class FeedbackAccepted(_Answer):
    """A feedback request admitted to the queue; it is trained in arrival order."""

    feedback_id: str
    status: FeedbackStatus
    lora_id: str


class FeedbackView(_Answer):
    """A feedback request and, once trained, what it produced (`version`, `metrics`)."""

    feedback_id: str
    lora_id: str
    status: FeedbackStatus
    items: list[dict[str, Any]]
    training: dict[str, Any]
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    metrics: dict[str, Any]
    version: int | None
    coalesced_into: str | None

    @property
    def finished(self) -> bool:
        """Done or failed: it will not change any more."""
        return self.status in _TERMINAL


class Health(_Answer):
    """Readiness: status `ok`, or `unavailable` with the part that is not ready."""

    status: Literal["ok", "unavailable"]
    model: str
    model_loaded: bool
    ready: bool
    database_ok: bool
    queue_depth: int | None
    inference: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------
# What the client sends
# ---------------------------------------------------------------------------------------------


class FeedbackItem(BaseModel):
    """Feedback on one answer, named by its completion id or by adapter + prompt + response.

    The completion id (the `id` of the chat completion, or of any chunk of a streamed one) is
    exact; the texts are matched after normalising whitespace, for callers that did not keep
    the id. `example` is an answer you would have wanted: the teacher is shown it (what the
    model never says, a name, can be taught). `training` overrides fields of the server's
    training config for this request.
    """

    model_config = ConfigDict(extra="forbid")

    feedback: str
    example: str | None = None
    completion_id: str | None = None
    choice_index: int = 0
    lora_id: str | None = None
    prompt: str | None = None
    response: str | None = None
    training: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _names_an_answer(self) -> FeedbackItem:
        if self.completion_id is None and None in (self.lora_id, self.prompt, self.response):
            raise ValueError(
                "name the answer with completion_id, or with lora_id + prompt + response"
            )
        return self


@dataclass(frozen=True)
class _Request(Generic[T]):
    """One HTTP call and how to read its answer, shared by the sync and the async client."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: dict[str, str | int | float] | None = None
    json: dict[str, Any] | None = None
    wait: float = 0.0  # seconds the server may hold the answer: added to the client's timeout
    accept: frozenset[int] = frozenset()  # error statuses whose body `parse` reads itself


def _as(model: type[M]) -> Callable[[httpx.Response], M]:
    return lambda response: model.model_validate_json(response.content)


def _adapter_path(lora_id: str) -> str:
    try:
        owner, name = parse_lora_id(lora_id)
    except InvalidLoraId as error:
        raise ValueError(str(error)) from None
    return f"/v1/adapters/{owner}/{name}"


def _create(
    lora_id: str,
    rank: int | None,
    lora_alpha: float | None,
    target_modules: Sequence[str] | None,
    base_model: str | None,
    seed: int | None,
) -> _Request[AdapterDetail]:
    fields = {
        "rank": rank,
        "lora_alpha": lora_alpha,
        "target_modules": None if target_modules is None else list(target_modules),
        "base_model": base_model,
        "seed": seed,
    }
    body = {"lora_id": lora_id, **{k: v for k, v in fields.items() if v is not None}}
    return _Request("POST", "/v1/adapters", _as(AdapterDetail), json=body)


def _list(prefix: str) -> _Request[list[Adapter]]:
    def parse(response: httpx.Response) -> list[Adapter]:
        return [Adapter.model_validate(a) for a in response.json()["data"]]

    return _Request("GET", "/v1/adapters", parse, params={"prefix": prefix})


def _archive(lora_id: str, version: int | None) -> _Request[bytes]:
    params: dict[str, str | int | float] = {} if version is None else {"version": version}
    path = f"{_adapter_path(lora_id)}/export"
    return _Request("GET", path, lambda response: response.content, params=params)


def _memory(lora_id: str, limit: int, offset: int) -> _Request[list[MemoryItem]]:
    def parse(response: httpx.Response) -> list[MemoryItem]:
        return [MemoryItem.model_validate(m) for m in response.json()["data"]]

    params: dict[str, str | int | float] = {"limit": limit, "offset": offset}
    return _Request("GET", f"{_adapter_path(lora_id)}/memory", parse, params=params)


def _forget(lora_id: str, memory_id: str | None) -> _Request[MemoryForgotten]:
    path = f"{_adapter_path(lora_id)}/memory"
    if memory_id is not None:
        if not re.fullmatch(MEMORY_ID_PATTERN, memory_id):  # never a path of its own ("..")
            raise ValueError(
                f"{memory_id!r} is not a memory item's id (mem-…, from .memory()); give one, "
                "or None to forget them all"
            )
        path += f"/{memory_id}"
    return _Request("DELETE", path, _as(MemoryForgotten))


def _unpack(archive: bytes, directory: str | os.PathLike[str]) -> Path:
    """Unpack an export into `directory` (created if missing; files of the same name replaced)."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(archive)) as files:
        files.extractall(target)  # zipfile drops absolute and '..' parts of member names
    return target


def _feedback_body(items: Sequence[FeedbackItem]) -> dict[str, Any]:
    if not items:
        raise ValueError("send at least one FeedbackItem")
    return {"items": [item.model_dump(exclude_none=True) for item in items]}


def _send(items: Sequence[FeedbackItem]) -> _Request[FeedbackAccepted]:
    return _Request("POST", "/v1/feedback", _as(FeedbackAccepted), json=_feedback_body(items))


def _send_and_wait(items: Sequence[FeedbackItem], timeout: float) -> _Request[FeedbackView]:
    """POST /v1/feedback?wait=true: the server holds the answer until trained or timed out."""

    def parse(response: httpx.Response) -> FeedbackView:
        view = FeedbackView.model_validate_json(response.content)
        if response.status_code == 202:  # the server's wait ran out before training finished
            raise FeedbackTimeout(view, timeout)
        return view

    return _Request(
        "POST",
        "/v1/feedback",
        parse,
        params={"wait": "true", "timeout": timeout},
        json=_feedback_body(items),
        wait=timeout,
    )


def _status(feedback_id: str) -> _Request[FeedbackView]:
    if not feedback_id:
        raise ValueError("give the feedback_id that sending the feedback returned")
    return _Request("GET", f"/v1/feedback/{quote(feedback_id, safe='')}", _as(FeedbackView))


def _log(lora_id: str, limit: int, offset: int) -> _Request[list[FeedbackView]]:
    def parse(response: httpx.Response) -> list[FeedbackView]:
        return [FeedbackView.model_validate(v) for v in response.json()["data"]]

    params: dict[str, str | int | float] = {"lora_id": lora_id, "limit": limit, "offset": offset}
    return _Request("GET", "/v1/feedback", parse, params=params)


def _health() -> _Request[Health]:
    def parse(response: httpx.Response) -> Health:
        try:  # a 503 from /v1/health is still the report, saying which part is not ready
            return Health.model_validate_json(response.content)
        except ValidationError:
            raise _api_error(response) from None

    return _Request("GET", "/v1/health", parse, accept=frozenset({503}))


class _Settings:
    """Where the server is and which key to send: arguments, else `CLAAS_URL`/`CLAAS_API_KEY`."""

    def __init__(self, base_url: str | None, api_key: str | None, timeout: float) -> None:
        self.base_url = (base_url or os.environ.get("CLAAS_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key or os.environ.get("CLAAS_API_KEY") or None
        self.timeout = timeout

    @property
    def openai_base_url(self) -> str:
        """The OpenAI-compatible API's base URL, for any OpenAI client."""
        return f"{self.base_url}/v1"

    def _headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _timeout(self, request: _Request[Any]) -> float:
        return self.timeout + request.wait


def _checked(response: httpx.Response, request: _Request[T]) -> T:
    if response.is_error and response.status_code not in request.accept:
        raise _api_error(response)
    return request.parse(response)


# ---------------------------------------------------------------------------------------------
# The sync client
# ---------------------------------------------------------------------------------------------


class Client(_Settings):
    """The claas API over HTTP, blocking. Close it (or use `with`) to release its connections.

    `timeout` bounds each call, in seconds; a wait for training gets its own timeout on top.
    """

    def __init__(
        self, base_url: str | None = None, api_key: str | None = None, timeout: float = 60.0
    ) -> None:
        super().__init__(base_url, api_key, timeout)
        self._http = httpx.Client(base_url=self.base_url, headers=self._headers())
        self.adapters = AdaptersAPI(self)
        self.feedback = FeedbackAPI(self)

    def health(self) -> Health:
        """The server's readiness report; a not-ready server answers it too (status unavailable)."""
        return self._call(_health())

    def openai(self) -> OpenAI:
        """An OpenAI client for this server's chat API, with the same key and timeout."""
        from openai import OpenAI

        return OpenAI(
            base_url=self.openai_base_url, api_key=self.api_key or _NO_KEY, timeout=self.timeout
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, request: _Request[T]) -> T:
        response = self._http.request(
            request.method,
            request.path,
            params=request.params,
            json=request.json,
            timeout=self._timeout(request),
        )
        return _checked(response, request)


class AdaptersAPI:
    """`Client.adapters`: create, list, read, roll back, delete and export adapters."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def create(
        self,
        lora_id: str,
        *,
        rank: int | None = None,
        lora_alpha: float | None = None,
        target_modules: Sequence[str] | None = None,
        base_model: str | None = None,
        seed: int | None = None,
    ) -> AdapterDetail:
        """Create `owner/name` at version 1; what is not given takes the server's default."""
        request = _create(lora_id, rank, lora_alpha, target_modules, base_model, seed)
        return self._client._call(request)

    def list(self, prefix: str = "") -> builtins.list[Adapter]:
        """The adapters this key reaches whose id starts with `prefix`."""
        return self._client._call(_list(prefix))

    def get(self, lora_id: str) -> AdapterDetail:
        """The adapter and all its versions."""
        return self._client._call(_Request("GET", _adapter_path(lora_id), _as(AdapterDetail)))

    def rollback(self, lora_id: str, version: int) -> AdapterDetail:
        """Serve (and train from) `version` again; later versions stay listed."""
        path = f"{_adapter_path(lora_id)}/rollback"
        request = _Request("POST", path, _as(AdapterDetail), json={"version": version})
        return self._client._call(request)

    def delete(self, lora_id: str) -> AdapterDeleted:
        """Delete the adapter, all its versions and its feedback requests."""
        return self._client._call(_Request("DELETE", _adapter_path(lora_id), _as(AdapterDeleted)))

    def memory(self, lora_id: str, limit: int = 50, offset: int = 0) -> builtins.list[MemoryItem]:
        """What the adapter remembers of its feedback (replayed by later requests), newest
        first."""
        return self._client._call(_memory(lora_id, limit, offset))

    def forget(self, lora_id: str, memory_id: str | None = None) -> MemoryForgotten:
        """Forget one remembered lesson, or (`memory_id` None) all of them; no later request
        replays it. What the weights learned stays: roll back or delete to undo that."""
        return self._client._call(_forget(lora_id, memory_id))

    def archive(self, lora_id: str, version: int | None = None) -> bytes:
        """A version (default: the current one) as a zip of its PEFT directory."""
        return self._client._call(_archive(lora_id, version))

    def export(
        self, lora_id: str, directory: str | os.PathLike[str], version: int | None = None
    ) -> Path:
        """Unpack a version into `directory`, loadable by `PeftModel.from_pretrained`."""
        return _unpack(self.archive(lora_id, version), directory)


class FeedbackAPI:
    """`Client.feedback`: send feedback, wait until it is trained, read status and log."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def send(self, *items: FeedbackItem) -> FeedbackAccepted:
        """Queue one request (all items on one adapter, trained as one step); return at once."""
        return self._client._call(_send(items))

    def send_and_wait(self, *items: FeedbackItem, timeout: float = 600.0) -> FeedbackView:
        """Queue one request and hold the call until it is trained (`timeout` ≤ 3600 s).

        Returns the finished request (status done, or failed with `error`); raises
        `FeedbackTimeout` when the server's wait runs out first.
        """
        return self._client._call(_send_and_wait(items, timeout))

    def status(self, feedback_id: str) -> FeedbackView:
        return self._client._call(_status(feedback_id))

    def wait(self, feedback_id: str, timeout: float = 600.0, interval: float = 0.5) -> FeedbackView:
        """Poll the status every `interval` s until done or failed; `FeedbackTimeout` after
        `timeout` s. For a request sent earlier, or after `send_and_wait` timed out."""
        deadline = time.monotonic() + timeout
        while not (view := self.status(feedback_id)).finished:
            left = deadline - time.monotonic()
            if left <= 0:
                raise FeedbackTimeout(view, timeout)
            time.sleep(min(interval, left))
        return view

    def log(self, lora_id: str, limit: int = 50, offset: int = 0) -> list[FeedbackView]:
        """The adapter's feedback requests, newest first, one page."""
        return self._client._call(_log(lora_id, limit, offset))


# ---------------------------------------------------------------------------------------------
# The async client: the same calls, awaited
# ---------------------------------------------------------------------------------------------


class AsyncClient(_Settings):
    """The claas API over HTTP, for asyncio. Close it (or use `async with`) when done."""

    def __init__(
        self, base_url: str | None = None, api_key: str | None = None, timeout: float = 60.0
    ) -> None:
        super().__init__(base_url, api_key, timeout)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self._headers())
        self.adapters = AsyncAdaptersAPI(self)
        self.feedback = AsyncFeedbackAPI(self)

    async def health(self) -> Health:
        """The server's readiness report; a not-ready server answers it too (status unavailable)."""
        return await self._call(_health())

    def openai(self) -> AsyncOpenAI:
        """An async OpenAI client for this server's chat API, with the same key and timeout."""
        from openai import AsyncOpenAI

        return AsyncOpenAI(
            base_url=self.openai_base_url, api_key=self.api_key or _NO_KEY, timeout=self.timeout
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _call(self, request: _Request[T]) -> T:
        response = await self._http.request(
            request.method,
            request.path,
            params=request.params,
            json=request.json,
            timeout=self._timeout(request),
        )
        return _checked(response, request)


class AsyncAdaptersAPI:
    """`AsyncClient.adapters`: as `AdaptersAPI`, awaited."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def create(
        self,
        lora_id: str,
        *,
        rank: int | None = None,
        lora_alpha: float | None = None,
        target_modules: Sequence[str] | None = None,
        base_model: str | None = None,
        seed: int | None = None,
    ) -> AdapterDetail:
        request = _create(lora_id, rank, lora_alpha, target_modules, base_model, seed)
        return await self._client._call(request)

    async def list(self, prefix: str = "") -> builtins.list[Adapter]:
        return await self._client._call(_list(prefix))

    async def get(self, lora_id: str) -> AdapterDetail:
        return await self._client._call(_Request("GET", _adapter_path(lora_id), _as(AdapterDetail)))

    async def rollback(self, lora_id: str, version: int) -> AdapterDetail:
        path = f"{_adapter_path(lora_id)}/rollback"
        request = _Request("POST", path, _as(AdapterDetail), json={"version": version})
        return await self._client._call(request)

    async def delete(self, lora_id: str) -> AdapterDeleted:
        request = _Request("DELETE", _adapter_path(lora_id), _as(AdapterDeleted))
        return await self._client._call(request)

    async def memory(
        self, lora_id: str, limit: int = 50, offset: int = 0
    ) -> builtins.list[MemoryItem]:
        return await self._client._call(_memory(lora_id, limit, offset))

    async def forget(self, lora_id: str, memory_id: str | None = None) -> MemoryForgotten:
        return await self._client._call(_forget(lora_id, memory_id))

    async def archive(self, lora_id: str, version: int | None = None) -> bytes:
        return await self._client._call(_archive(lora_id, version))

    async def export(
        self, lora_id: str, directory: str | os.PathLike[str], version: int | None = None
    ) -> Path:
        archive = await self.archive(lora_id, version)
        return await asyncio.to_thread(_unpack, archive, directory)


class AsyncFeedbackAPI:
    """`AsyncClient.feedback`: as `FeedbackAPI`, awaited."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def send(self, *items: FeedbackItem) -> FeedbackAccepted:
        return await self._client._call(_send(items))

    async def send_and_wait(self, *items: FeedbackItem, timeout: float = 600.0) -> FeedbackView:
        return await self._client._call(_send_and_wait(items, timeout))

    async def status(self, feedback_id: str) -> FeedbackView:
        return await self._client._call(_status(feedback_id))

    async def wait(
        self, feedback_id: str, timeout: float = 600.0, interval: float = 0.5
    ) -> FeedbackView:
        deadline = time.monotonic() + timeout
        while not (view := await self.status(feedback_id)).finished:
            left = deadline - time.monotonic()
            if left <= 0:
                raise FeedbackTimeout(view, timeout)
            await asyncio.sleep(min(interval, left))
        return view

    async def log(self, lora_id: str, limit: int = 50, offset: int = 0) -> list[FeedbackView]:
        return await self._client._call(_log(lora_id, limit, offset))
