"""Each call of the claas API as data: its method, path, body and how to read the answer.

The sync client (`claas.client.sync`) and the async one (`claas.client.aio`) send the same
`Call`s, each through its own httpx client; everything but the sending lives here, once.
`Endpoint` is where the server is and which key to send.
"""

from __future__ import annotations

import functools
import io
import os
import re
import ssl
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from claas.client.errors import FeedbackTimeout, api_error
from claas.client.models import (
    AdapterDeleted,
    AdapterDetail,
    FeedbackAccepted,
    FeedbackItem,
    FeedbackView,
    Health,
    MemoryForgotten,
    MemoryItem,
    Score,
)
from claas.errors import InvalidLoraId
from claas.ids import MEMORY_ID_PATTERN, parse_lora_id
from claas.records import Adapter, FeedbackStatus

DEFAULT_URL = "http://127.0.0.1:8000"
# What an OpenAI client sends when there is no key: it insists on one, and a server without
# keys ignores the header.
NO_KEY = "no-key"

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Call(Generic[T]):
    """One HTTP call and how to read its answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: Mapping[str, str | int | float | list[str]] | None = None
    json: dict[str, Any] | None = None
    wait: float = 0.0  # seconds the server may hold the answer: added to the client's timeout
    accept: frozenset[int] = frozenset()  # error statuses whose body `parse` reads itself


def as_model(model: type[M]) -> Callable[[httpx.Response], M]:
    return lambda response: model.model_validate_json(response.content)


def adapter_path(lora_id: str) -> str:
    try:
        owner, name = parse_lora_id(lora_id)
    except InvalidLoraId as error:
        raise ValueError(str(error)) from None
    return f"/v1/adapters/{owner}/{name}"


def create(
    lora_id: str,
    rank: int | None,
    lora_alpha: float | None,
    target_modules: Sequence[str] | None,
    base_model: str | None,
    seed: int | None,
) -> Call[AdapterDetail]:
    fields = {
        "rank": rank,
        "lora_alpha": lora_alpha,
        "target_modules": None if target_modules is None else list(target_modules),
        "base_model": base_model,
        "seed": seed,
    }
    body = {"lora_id": lora_id, **{k: v for k, v in fields.items() if v is not None}}
    return Call("POST", "/v1/adapters", as_model(AdapterDetail), json=body)


def list_adapters(prefix: str) -> Call[list[Adapter]]:
    def parse(response: httpx.Response) -> list[Adapter]:
        return [Adapter.model_validate(a) for a in response.json()["data"]]

    return Call("GET", "/v1/adapters", parse, params={"prefix": prefix})


def get_adapter(lora_id: str) -> Call[AdapterDetail]:
    return Call("GET", adapter_path(lora_id), as_model(AdapterDetail))


def rollback(lora_id: str, version: int) -> Call[AdapterDetail]:
    path = f"{adapter_path(lora_id)}/rollback"
    return Call("POST", path, as_model(AdapterDetail), json={"version": version})


def delete(lora_id: str) -> Call[AdapterDeleted]:
    return Call("DELETE", adapter_path(lora_id), as_model(AdapterDeleted))


def archive(lora_id: str, version: int | None) -> Call[bytes]:
    params: dict[str, str | int | float] = {} if version is None else {"version": version}
    path = f"{adapter_path(lora_id)}/export"
    return Call("GET", path, lambda response: response.content, params=params)


def memory(lora_id: str, limit: int, offset: int) -> Call[list[MemoryItem]]:
    def parse(response: httpx.Response) -> list[MemoryItem]:
        return [MemoryItem.model_validate(m) for m in response.json()["data"]]

    params: dict[str, str | int | float] = {"limit": limit, "offset": offset}
    return Call("GET", f"{adapter_path(lora_id)}/memory", parse, params=params)


def forget(lora_id: str, memory_id: str | None) -> Call[MemoryForgotten]:
    path = f"{adapter_path(lora_id)}/memory"
    if memory_id is not None:
        if not re.fullmatch(MEMORY_ID_PATTERN, memory_id):  # never a path of its own ("..")
            raise ValueError(
                f"{memory_id!r} is not a memory item's id (mem-…, from .memory()); give one, "
                "or None to forget them all"
            )
        path += f"/{memory_id}"
    return Call("DELETE", path, as_model(MemoryForgotten))


def unpack(archive: bytes, directory: str | os.PathLike[str]) -> Path:
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


def send(items: Sequence[FeedbackItem]) -> Call[FeedbackAccepted]:
    return Call("POST", "/v1/feedback", as_model(FeedbackAccepted), json=_feedback_body(items))


def send_and_wait(items: Sequence[FeedbackItem], timeout: float) -> Call[FeedbackView]:
    """POST /v1/feedback?wait=true: the server holds the answer until trained or timed out."""

    def parse(response: httpx.Response) -> FeedbackView:
        view = FeedbackView.model_validate_json(response.content)
        if response.status_code == 202:  # the server's wait ran out before training finished
            raise FeedbackTimeout(view, timeout)
        return view

    return Call(
        "POST",
        "/v1/feedback",
        parse,
        params={"wait": "true", "timeout": timeout},
        json=_feedback_body(items),
        wait=timeout,
    )


def status(feedback_id: str) -> Call[FeedbackView]:
    if not feedback_id:
        raise ValueError("give the feedback_id that sending the feedback returned")
    return Call("GET", f"/v1/feedback/{quote(feedback_id, safe='')}", as_model(FeedbackView))


def log(
    lora_id: str, limit: int, offset: int, statuses: Sequence[FeedbackStatus] = ()
) -> Call[list[FeedbackView]]:
    def parse(response: httpx.Response) -> list[FeedbackView]:
        return [FeedbackView.model_validate(v) for v in response.json()["data"]]

    params: dict[str, str | int | float | list[str]] = {
        "lora_id": lora_id,
        "limit": limit,
        "offset": offset,
    }
    if statuses:
        params["status"] = list(statuses)
    return Call("GET", "/v1/feedback", parse, params=params)


def score(model: str, messages: Sequence[dict[str, Any]], completion: str) -> Call[Score]:
    """POST /v1/score: the log-probability of each token of `completion` after `messages`."""
    body = {"model": model, "messages": list(messages), "completion": completion}
    return Call("POST", "/v1/score", as_model(Score), json=body)


def health() -> Call[Health]:
    def parse(response: httpx.Response) -> Health:
        try:  # a 503 from /v1/health is still the report, saying which part is not ready
            return Health.model_validate_json(response.content)
        except ValidationError:
            raise api_error(response) from None

    return Call("GET", "/v1/health", parse, accept=frozenset({503}))


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The TLS settings of every client this process makes (httpx's defaults, read once):
    building them loads the CA bundle, 50 ms of CPU, and a client is often made for one call."""
    return httpx.create_ssl_context()


class Endpoint:
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

    def _timeout(self, request: Call[Any]) -> float:
        return self.timeout + request.wait


def checked(response: httpx.Response, request: Call[T]) -> T:
    if response.is_error and response.status_code not in request.accept:
        raise api_error(response)
    return request.parse(response)
