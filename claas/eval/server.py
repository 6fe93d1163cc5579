"""An in-process claas server for `claas eval` without `--url` (and for the tests).

`ThreadedServer` runs the same app `claas serve` runs (`create_app(Runtime.build(settings))`)
under uvicorn in a background thread on 127.0.0.1 with a free port, so a caller still goes
through the public HTTP API exactly as it would against a remote server:

    with ThreadedServer(settings) as url:
        httpx.get(f"{url}/v1/health")

`InProcessServer` is the one `claas eval` starts: its settings are `eval_settings(...)`'s.
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

START_SECONDS = 120.0  # loading the model and binding, on a loaded machine


class ThreadedServer:
    """claas at `start()`'s URL, on 127.0.0.1, until `close()`; the settings are taken as given
    (bar host and port). `loaded` serves an already loaded model instead of `settings.model`."""

    def __init__(self, settings: Settings, loaded: LoadedModel | None = None) -> None:
        self.settings = settings
        self.loaded = loaded
        self.url = ""
        self._runtime: Runtime | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def runtime(self) -> Runtime:
        """What the server serves with (its store, queue, engine), once started."""
        if self._runtime is None:
            raise RuntimeError("the server is not started: call start() first")
        return self._runtime

    def start(self) -> str:
        """Build the runtime, start serving, and return the URL once it is bound."""
        self._runtime = Runtime.build(self.settings, loaded=self.loaded)
        config = uvicorn.Config(
            create_app(self._runtime), host="127.0.0.1", port=0, log_level="warning"
        )
        self._server = server = uvicorn.Server(config)
        # A daemon, so a server that never stops cannot keep the process alive.
        self._thread = thread = threading.Thread(
            target=server.run, name="claas-server", daemon=True
        )
        thread.start()
        deadline = time.monotonic() + START_SECONDS
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                self.close()
                raise RuntimeError("the in-process claas server did not start; see its log")
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    def close(self) -> None:
        """Stop serving (waiting for the thread) and close the runtime."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=60)
        if self._runtime is not None:
            self._runtime.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()


def eval_settings(settings: Settings, concurrency: int = 1) -> Settings:
    """`settings` as the eval's own server runs with them.

    API keys are switched off: it listens on loopback only and lives as long as the eval. Its
    limit on one owner's generations at once (`max_concurrent_generations_per_owner`) is raised
    to the eval's `concurrency`: the eval is its only client, and a step's requests would
    otherwise wait out 429s instead of being batched.
    """
    generations = max(settings.max_concurrent_generations_per_owner, concurrency)
    return settings.model_copy(
        update={
            "host": "127.0.0.1",
            "port": 0,
            "api_keys": {},
            "admin_key": None,
            "max_concurrent_generations_per_owner": generations,
        }
    )


class InProcessServer(ThreadedServer):
    """`with InProcessServer(settings, concurrency=n) as url:` the server `claas eval` starts
    when it is given no `--url`, with `eval_settings(settings, n)`."""

    def __init__(
        self, settings: Settings, loaded: LoadedModel | None = None, concurrency: int = 1
    ) -> None:
        super().__init__(eval_settings(settings, concurrency), loaded)
