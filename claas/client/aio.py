"""The asyncio client: `AsyncClient`, the same calls as `claas.client.sync`, awaited."""

from __future__ import annotations

import asyncio
import builtins
import os
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

import httpx

from claas.client import calls
from claas.client.errors import FeedbackTimeout
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
from claas.records import Adapter, FeedbackStatus

if TYPE_CHECKING:
    from openai import AsyncOpenAI

T = TypeVar("T")


class AsyncClient(calls.Endpoint):
    """The claas API over HTTP, for asyncio. Close it (or use `async with`) when done."""

    def __init__(
        self, base_url: str | None = None, api_key: str | None = None, timeout: float = 60.0
    ) -> None:
        super().__init__(base_url, api_key, timeout)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self._headers(), verify=calls.tls_context()
        )
        self.adapters = AsyncAdaptersAPI(self)
        self.feedback = AsyncFeedbackAPI(self)

    async def health(self) -> Health:
        """The server's readiness report; a not-ready server answers it too (status unavailable)."""
        return await self._call(calls.health())

    async def score(self, model: str, messages: Sequence[dict[str, Any]], completion: str) -> Score:
        return await self._call(calls.score(model, messages, completion))

    def openai(self) -> AsyncOpenAI:
        """An async OpenAI client for this server's chat API, with the same key and timeout."""
        from openai import AsyncOpenAI, DefaultAsyncHttpxClient

        return AsyncOpenAI(
            base_url=self.openai_base_url,
            api_key=self.api_key or calls.NO_KEY,
            timeout=self.timeout,
            http_client=DefaultAsyncHttpxClient(verify=calls.tls_context()),
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

    async def _call(self, request: calls.Call[T]) -> T:
        response = await self._http.request(
            request.method,
            request.path,
            params=request.params,
            json=request.json,
            timeout=self._timeout(request),
        )
        return calls.checked(response, request)


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
        request = calls.create(lora_id, rank, lora_alpha, target_modules, base_model, seed)
        return await self._client._call(request)

    async def list(self, prefix: str = "") -> builtins.list[Adapter]:
        return await self._client._call(calls.list_adapters(prefix))

    async def get(self, lora_id: str) -> AdapterDetail:
        return await self._client._call(calls.get_adapter(lora_id))

    async def rollback(self, lora_id: str, version: int) -> AdapterDetail:
        return await self._client._call(calls.rollback(lora_id, version))

    async def delete(self, lora_id: str) -> AdapterDeleted:
        return await self._client._call(calls.delete(lora_id))

    async def memory(
        self, lora_id: str, limit: int = 50, offset: int = 0
    ) -> builtins.list[MemoryItem]:
        return await self._client._call(calls.memory(lora_id, limit, offset))

    async def forget(self, lora_id: str, memory_id: str | None = None) -> MemoryForgotten:
        return await self._client._call(calls.forget(lora_id, memory_id))

    async def archive(self, lora_id: str, version: int | None = None) -> bytes:
        return await self._client._call(calls.archive(lora_id, version))

    async def export(
        self, lora_id: str, directory: str | os.PathLike[str], version: int | None = None
    ) -> Path:
        archive = await self.archive(lora_id, version)
        return await asyncio.to_thread(calls.unpack, archive, directory)


class AsyncFeedbackAPI:
    """`AsyncClient.feedback`: as `FeedbackAPI`, awaited."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def send(self, *items: FeedbackItem) -> FeedbackAccepted:
        return await self._client._call(calls.send(items))

    async def send_and_wait(self, *items: FeedbackItem, timeout: float = 600.0) -> FeedbackView:
        return await self._client._call(calls.send_and_wait(items, timeout))

    async def status(self, feedback_id: str) -> FeedbackView:
        return await self._client._call(calls.status(feedback_id))

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

    async def log(
        self,
        lora_id: str,
        limit: int = 50,
        offset: int = 0,
        statuses: Sequence[FeedbackStatus] = (),
    ) -> list[FeedbackView]:
        return await self._client._call(calls.log(lora_id, limit, offset, statuses))
