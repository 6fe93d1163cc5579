"""An in-process claas server for `claas eval` without `--url`.

The same app `claas serve` runs (`create_app(Runtime.build(settings))`), under uvicorn in a
background thread on 127.0.0.1 with a free port, so the eval still goes through the public HTTP
API exactly as it would against a remote server. API keys are switched off: it listens on
loopback only and lives as long as the eval. Its limit on one owner's generations at once
(`max_concurrent_generations_per_owner`) is raised to the eval's `concurrency`: the eval is its
only client, and a step's requests would otherwise wait out 429s instead of being batched.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType

import uvicorn

from claas.api.app import create_app
from claas.models import LoadedModel
from claas.runtime import Runtime
from claas.settings import Settings


class InProcessServer:
    """`with InProcessServer(settings) as url:` serves claas at `url` until the block ends."""

    def __init__(
        self, settings: Settings, loaded: LoadedModel | None = None, concurrency: int = 1
    ) -> None:
        generations = max(settings.max_concurrent_generations_per_owner, concurrency)
        self.settings = settings.model_copy(
            update={
                "host": "127.0.0.1",
                "port": 0,
                "api_keys": {},
                "admin_key": None,
                "max_concurrent_generations_per_owner": generations,
            }
        )
        self.loaded = loaded
        self.runtime: Runtime | None = None
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None

    def __enter__(self) -> str:
        self.runtime = Runtime.build(self.settings, loaded=self.loaded)
        config = uvicorn.Config(
            create_app(self.runtime), host="127.0.0.1", port=0, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="claas-eval-server")
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.__exit__(None, None, None)
                raise RuntimeError("the in-process claas server did not start; see its log")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=60)
        if self.runtime is not None:
            self.runtime.close()
