"""The blocking client: `Client`, with `Client.adapters` and `Client.feedback`."""

from __future__ import annotations

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
    from openai import OpenAI

T = TypeVar("T")


class Client(calls.Endpoint):
    """The claas API over HTTP, blocking. Close it (or use `with`) to release its connections.

    `timeout` bounds each call, in seconds; a wait for training gets its own timeout on top.
    """

    def __init__(
        self, base_url: str | None = None, api_key: str | None = None, timeout: float = 60.0
    ) -> None:
        super().__init__(base_url, api_key, timeout)
        self._http = httpx.Client(
            base_url=self.base_url, headers=self._headers(), verify=calls.tls_context()
        )
        self.adapters = AdaptersAPI(self)
        self.feedback = FeedbackAPI(self)

    def health(self) -> Health:
        """The server's readiness report; a not-ready server answers it too (status unavailable)."""
        return self._call(calls.health())

    def score(self, model: str, messages: Sequence[dict[str, Any]], completion: str) -> Score:
        """How likely `model` (an adapter, or the base model) finds `completion` after
        `messages`: the log-probability of each of its tokens."""
        return self._call(calls.score(model, messages, completion))

    def openai(self) -> OpenAI:
        """An OpenAI client for this server's chat API, with the same key and timeout."""
        from openai import DefaultHttpxClient, OpenAI

        return OpenAI(
            base_url=self.openai_base_url,
            api_key=self.api_key or calls.NO_KEY,
            timeout=self.timeout,
            http_client=DefaultHttpxClient(verify=calls.tls_context()),
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

    def _call(self, request: calls.Call[T]) -> T:
        response = self._http.request(
            request.method,
            request.path,
            params=request.params,
            json=request.json,
            timeout=self._timeout(request),
        )
        return calls.checked(response, request)


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
        request = calls.create(lora_id, rank, lora_alpha, target_modules, base_model, seed)
        return self._client._call(request)

    def list(self, prefix: str = "") -> builtins.list[Adapter]:
        """The adapters this key reaches whose id starts with `prefix`."""
        return self._client._call(calls.list_adapters(prefix))

    def get(self, lora_id: str) -> AdapterDetail:
        """The adapter and all its versions."""
        return self._client._call(calls.get_adapter(lora_id))

    def rollback(self, lora_id: str, version: int) -> AdapterDetail:
        """Serve (and train from) `version` again; later versions stay listed."""
        return self._client._call(calls.rollback(lora_id, version))

    def delete(self, lora_id: str) -> AdapterDeleted:
        """Delete the adapter, all its versions and its feedback requests."""
        return self._client._call(calls.delete(lora_id))

    def memory(self, lora_id: str, limit: int = 50, offset: int = 0) -> builtins.list[MemoryItem]:
        """What the adapter remembers of its feedback (replayed by later requests), newest
        first."""
        return self._client._call(calls.memory(lora_id, limit, offset))

    def forget(self, lora_id: str, memory_id: str | None = None) -> MemoryForgotten:
        """Forget one remembered lesson, or (`memory_id` None) all of them; no later request
        replays it. What the weights learned stays: roll back or delete to undo that."""
        return self._client._call(calls.forget(lora_id, memory_id))

    def archive(self, lora_id: str, version: int | None = None) -> bytes:
        """A version (default: the current one) as a zip of its PEFT directory."""
        return self._client._call(calls.archive(lora_id, version))

    def export(
        self, lora_id: str, directory: str | os.PathLike[str], version: int | None = None
    ) -> Path:
        """Unpack a version into `directory`, loadable by `PeftModel.from_pretrained`."""
        return calls.unpack(self.archive(lora_id, version), directory)


class FeedbackAPI:
    """`Client.feedback`: send feedback, wait until it is trained, read status and log."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def send(self, *items: FeedbackItem) -> FeedbackAccepted:
        """Queue one request (all items on one adapter, trained as one step); return at once."""
        return self._client._call(calls.send(items))

    def send_and_wait(self, *items: FeedbackItem, timeout: float = 600.0) -> FeedbackView:
        """Queue one request and hold the call until it is trained (`timeout` ≤ 3600 s).

        Returns the finished request (status done, or failed with `error`); raises
        `FeedbackTimeout` when the server's wait runs out first.
        """
        return self._client._call(calls.send_and_wait(items, timeout))

    def status(self, feedback_id: str) -> FeedbackView:
        return self._client._call(calls.status(feedback_id))

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

    def log(
        self,
        lora_id: str,
        limit: int = 50,
        offset: int = 0,
        statuses: Sequence[FeedbackStatus] = (),
    ) -> list[FeedbackView]:
        """The adapter's feedback requests, newest first, one page; only those in `statuses`
        if given (e.g. `claas.records.PENDING`)."""
        return self._client._call(calls.log(lora_id, limit, offset, statuses))
