"""An in-process claas server for `claas eval` without `--url`.

The same app `claas serve` runs (`create_app(Runtime.build(settings))`), under uvicorn in a
background thread on 127.0.0.1 with a free port, so the eval still goes through the public HTTP
API exactly as it would against a remote server. API keys are switched off: it listens on
loopback only and lives as long as the eval.
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

    def __init__(self, settings: Settings, loaded: LoadedModel | None = None) -> None:
        self.settings = settings.model_copy(
            update={"host": "127.0.0.1", "port": 0, "api_keys": {}, "admin_key": None}
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
