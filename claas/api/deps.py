"""The FastAPI dependencies the routes declare: the runtime, the caller, the tokenizer thread.

`create_app` puts one `Runtime`, `Metrics` and `Tokenizing` on `app.state`; the routes reach
them only through the `Annotated` aliases here (`RuntimeDep`, `Caller`, ...), so a route's
signature says what it uses.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

from fastapi import Depends, Request

from claas.api.auth import Principal, bearer_principal
from claas.api.middleware import Metrics
from claas.runtime import Runtime


class Tokenizing:
    """Tokenise off the event loop, on one thread.

    Tokenising a long prompt takes a noticeable while (benchmarks/tokenizing.md): doing it on a
    thread keeps health checks and streams flowing, and one thread means the tokenizer is never
    used by two requests at once.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="claas-tokenize")

    async def text(self, text: str) -> list[int]:
        def encode() -> list[int]:
            return [int(t) for t in self.runtime.tokenizer.encode(text)]

        return await asyncio.get_running_loop().run_in_executor(self.pool, encode)

    async def chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """The chat template's prompt tokens for `messages`."""
        return await asyncio.get_running_loop().run_in_executor(
            self.pool, self.runtime.chat.chat_prompt, messages
        )


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


def get_tokenizing(request: Request) -> Tokenizing:
    tokenizing: Tokenizing = request.app.state.tokenizing
    return tokenizing


def get_principal(request: Request) -> Principal:
    """The caller, from the `Authorization: Bearer` header; 401 if the key is missing/unknown."""
    return bearer_principal(get_runtime(request).settings, request.headers.get("authorization", ""))


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
TokenizingDep = Annotated[Tokenizing, Depends(get_tokenizing)]
Caller = Annotated[Principal, Depends(get_principal)]
