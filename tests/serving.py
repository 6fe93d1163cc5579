"""Shared test helpers: a real uvicorn server on 127.0.0.1, the calls most tests make, API keys."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from claas.client.calls import tls_context
from claas.eval.server import ThreadedServer
from claas.models import LoadedModel, tiny_llama
from claas.records import FINISHED
from claas.sdpo.engine import SDPOEngine
from claas.settings import Settings

HELLO = [{"role": "user", "content": "Hello there!"}]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a process that must be told its port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def bearer(key: str) -> dict[str, str]:
    """Request headers that send `key` as the API key."""
    return {"authorization": f"Bearer {key}"}


# Two owners' keys and an admin key, for `make_server(..., api_keys=OWNER_KEYS, admin_key=...)`.
OWNER_KEYS = {"sk-alice": "alice", "sk-bob": "bob"}
ADMIN_KEY = "sk-admin"
ALICE, BOB, ADMIN = bearer("sk-alice"), bearer("sk-bob"), bearer(ADMIN_KEY)


class LiveServer(ThreadedServer):
    """A real uvicorn server on 127.0.0.1 (free port), in a background thread, started at once;
    `client` calls it."""

    def __init__(self, settings: Settings, loaded: LoadedModel) -> None:
        super().__init__(settings, loaded)
        self.client = httpx.Client(base_url=self.start(), timeout=120, verify=tls_context())

    def close(self) -> None:
        self.client.close()
        super().close()


def make_server(
    tmp_path: Path, model_cache: Path, loaded: LoadedModel | None = None, **settings: Any
) -> LiveServer:
    return LiveServer(
        Settings(data_dir=tmp_path / "data", **settings),
        loaded if loaded is not None else tiny_llama(model_cache, seed=0),
    )


def wait_healthy(
    url: str,
    process: subprocess.Popen[Any],
    timeout: float,
    output: Callable[[], str] = lambda: "claas serve exited",
) -> None:
    """Until the `claas serve` process at `url` answers /v1/health with 200; fails (with
    `output()`) if it exits or `timeout` seconds pass first.

    One client polls: `httpx.get` builds a client, and so an SSL context with its CA bundle,
    on every call, which made the polling cost more CPU than the process it waited for."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2, verify=tls_context()) as probe:
        while True:
            try:
                if probe.get(f"{url}/v1/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert process.poll() is None, output()
            assert time.monotonic() < deadline, output()
            time.sleep(0.2)


def save_tiny_model(model_cache: Path, directory: Path) -> Path:
    """The tiny random Llama (seed 0) saved as a model directory, for `claas serve --model`."""
    loaded = tiny_llama(model_cache, seed=0)
    loaded.model.save_pretrained(directory)
    loaded.tokenizer.save_pretrained(directory)
    return directory


def create(live: LiveServer, lora_id: str, headers: dict[str, str] | None = None) -> Any:
    response = live.client.post(
        "/v1/adapters", json={"lora_id": lora_id, "rank": 4}, headers=headers or {}
    )
    assert response.status_code == 201, response.text
    return response.json()


def chat(live: LiveServer, model: str, **fields: Any) -> httpx.Response:
    """A short greedy chat; `h=` passes request headers (an API key)."""
    headers = fields.pop("h", {})
    body = {"model": model, "messages": HELLO, "max_tokens": 8, "temperature": 0, **fields}
    return live.client.post("/v1/chat/completions", json=body, headers=headers)


def finished(
    client: httpx.Client,
    feedback_id: str,
    timeout: float = 300,
    headers: dict[str, str] | None = None,
) -> Any:
    """Poll a feedback request until it is done or failed; return its status."""
    deadline = time.monotonic() + timeout
    while True:
        status = client.get(f"/v1/feedback/{feedback_id}", headers=headers or {}).json()
        if status["status"] in FINISHED:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.05)


def train_once(
    live: LiveServer,
    completion_id: str,
    feedback: str = "x",
    headers: dict[str, str] | None = None,
) -> Any:
    """One quick feedback step (steps_per_batch=1), waited for; the finished request."""
    item = {
        "completion_id": completion_id,
        "feedback": feedback,
        "training": {"steps_per_batch": 1},
    }
    response = live.client.post(
        "/v1/feedback?wait=true", json={"items": [item]}, headers=headers or {}
    )
    assert response.status_code == 200, response.text
    return response.json()


def error_of(response: httpx.Response) -> tuple[int, str]:
    """An error answer's status and message."""
    return response.status_code, response.json()["error"]["message"]


class HeldTraining:
    """A gate in front of the server's real `SDPOEngine.distill`: each training step waits
    until `release()`, so a test sees a request still pending when its wait runs out.

    Training itself is not replaced, only held; nothing but the wall clock could otherwise keep
    a step on the tiny model from finishing first. The gate opens by itself after 300 s, so a
    failed test cannot hang the server's shutdown.
    """

    def __init__(self, engine: SDPOEngine, monkeypatch: pytest.MonkeyPatch) -> None:
        self._open = threading.Event()
        distill = engine.distill

        async def held(*args: Any, **kwargs: Any) -> Any:
            await asyncio.to_thread(self._open.wait, 300)
            return await distill(*args, **kwargs)

        monkeypatch.setattr(engine, "distill", held)

    def release(self) -> None:
        self._open.set()
